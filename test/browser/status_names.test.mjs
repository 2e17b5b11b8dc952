// Names clients choose reach the status page (issue 18, part 5): channels named with markup,
// made by plain HTTP requests with presence info of the same kind, show in the page's
// channel table as text; none of it runs or becomes an element. The page builds its DOM
// with textContent from the stats JSON, and its Content-Security-Policy allows no script
// but its own inline one. Fixture: test/browser/fixtures/status.lua.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startLua, launchBrowser, newPage, cleanup, waitFor, readSSE } from './lib.mjs';

const NAMES = [
  '<img src=x onerror="window.__pwned=1">',
  '<script>window.__pwned=2',
  '"><svg onload="window.__pwned=3">',
  "' onmouseover='window.__pwned=4",
  '&lt;b&gt; & <b>bold <tr><td>row',
];
// (no "/" in them: the path is decoded before it is routed, so a "/" would split the name)

let srv;
let browser;

before(async () => {
  srv = await startLua('test/browser/fixtures/status.lua', { CHANNELS: 'ticks' });
  browser = await launchBrowser();
});
after(cleanup);

// A stream of channel `name` that joins its presence with the same markup as key and info.
function openStream(name) {
  return new Promise((resolve, reject) => {
    const q = new URLSearchParams({ user: name, info: name });
    const req = http.get(`${srv.url}/ch/${encodeURIComponent(name)}?${q}`,
      { headers: { accept: 'text/event-stream' } }, (res) => {
        res.on('data', () => {});
        res.on('error', () => {});
        if (res.statusCode !== 200) reject(new Error(`stream: ${res.statusCode}`));
        else resolve(req);
      });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error('stream head: timeout')));
  });
}

test('channel names and presence with markup show as text and run nothing', { timeout: 60_000 }, async () => {
  const streams = await Promise.all(NAMES.map(openStream));
  for (const name of NAMES) {
    const res = await fetch(`${srv.url}/ch/${encodeURIComponent(name)}`, {
      method: 'POST', body: name, signal: AbortSignal.timeout(5_000),
    });
    assert.equal(res.status, 200, await res.text());
  }
  // The stats JSON carries the names exactly.
  const { events } = await fetch(`${srv.url}/status/events`, { headers: { accept: 'text/event-stream' } })
    .then((r) => readSSE(r, { stopWhen: (e) => e.type === 'stats' }));
  const stats = JSON.parse(events.find((e) => e.type === 'stats').data);
  assert.deepEqual(stats.channel_list.map((c) => c.name).filter((n) => n !== 'ticks').sort(), [...NAMES].sort());

  const res = await fetch(`${srv.url}/status`, { signal: AbortSignal.timeout(5_000) });
  assert.match(res.headers.get('content-security-policy'), /default-src 'none'; script-src 'unsafe-inline'/);
  await res.body?.cancel().catch(() => {});

  const page = await newPage(browser, { viewport: { width: 1100, height: 800 } });
  await page.goto(`${srv.url}/status`);
  const shown = await waitFor(() => page.evaluate((names) => {
    const cells = [...document.querySelectorAll('#channel-table tbody td.name')];
    const texts = cells.map((td) => td.textContent);
    return names.every((n) => texts.includes(n)) && {
      texts,
      rows: document.querySelectorAll('#channel-table tbody tr').length,
      elementsInNames: cells.reduce((n, td) => n + td.children.length, 0),
      dataChannel: [...document.querySelectorAll('#channel-table tbody tr')].map((tr) => tr.dataset.channel),
    };
  }, NAMES), 10_000, 'every name in the channel table');
  assert.equal(shown.rows, NAMES.length + 1, 'one row per channel: no row injected');
  assert.equal(shown.elementsInNames, 0, 'a name cell holds text only');
  assert.deepEqual(shown.dataChannel.filter((n) => n !== 'ticks').sort(), [...NAMES].sort());
  // Move the mouse over every row and fire mouseover on everything in the table (an
  // injected onmouseover would run), then give any injected handler its chance to run.
  const box = await page.locator('#channel-table').boundingBox();
  for (let y = box.y + 2; y < box.y + box.height; y += 8) await page.mouse.move(box.x + box.width / 3, y);
  await page.evaluate(() => {
    for (const el of document.querySelectorAll('#channel-table *')) {
      el.dispatchEvent(new MouseEvent('mouseover', { bubbles: true }));
    }
  });
  await page.waitForTimeout(1_500);   // one more stats event re-renders the table
  const after = await page.evaluate(() => ({
    pwned: window.__pwned,
    imgs: document.querySelectorAll('img').length,
    scripts: document.querySelectorAll('script').length,
    svgs: document.querySelectorAll('svg').length,
  }));
  assert.equal(after.pwned, undefined, 'no injected script ran');
  assert.equal(after.imgs, 0, 'no <img> element');
  assert.equal(after.scripts, 1, 'the page\'s own script only');
  assert.equal(after.svgs, 4, 'the four charts only');
  assert.deepEqual(page.errors, []);
  await page.context().close();
  for (const s of streams) s.destroy();
});
