// The relay end to end (lua/sse/relay.lua through examples/proxy.lua):
//   (a) Chromium's EventSource through the proxy (per client, and shared = true) while the
//       upstream, a separate lua5.4 process (fixtures/relay_upstream.lua: numbered events
//       on a channel with history), is killed and started again on the same port: the page
//       sees every event exactly once, in order, and never an error (the relay reconnects,
//       the page's connection stays up);
//   (b) leaks: 1,000 clients that connect and leave, in batches of 50: the upstream's open
//       streams, the proxy's descriptors and its RSS come back to their baseline.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { readdirSync, readFileSync } from 'node:fs';
import { startLua, launchBrowser, newPage, cleanup, waitFor, sleep } from './lib.mjs';

const UPSTREAM = 'test/browser/fixtures/relay_upstream.lua';
const INTERVAL = 50;                       // ms between upstream events
const T0 = String(Date.now());             // the same numbering for every upstream process
const UP_ENV = { T0, INTERVAL: String(INTERVAL), RETRY: '200' };

let up;
let browser;

before(async () => {
  [up, browser] = await Promise.all([startLua(UPSTREAM, UP_ENV), launchBrowser()]);
});
after(cleanup);

const getJSON = async (url) => {
  const res = await fetch(url, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200, `${url}: ${res.status}`);
  return res.json();
};
const upStats = () => getJSON(`${up.url}/stats`);

const proxy = (env = {}) => startLua('examples/proxy.lua', { UPSTREAM: up.url, ...env });

// Kills the upstream (SIGKILL: no clean end of its streams) and starts it again on its port.
async function restartUpstream(downMs) {
  const port = up.port;
  up.proc.kill('SIGKILL');                // SIGTERM would end the streams cleanly: be rude
  const old = up;
  await waitFor(() => old.exited(), 5_000, 'the upstream killed');
  await sleep(downMs);
  up = await startLua(UPSTREAM, { ...UP_ENV, PORT: String(port) });
  assert.equal(up.port, port, 'the upstream came back on the same port');
}

// A page on the proxy's origin (served by Playwright, not by the proxy) whose EventSource
// reads /numbers through the proxy and records what it gets.
async function openPage(px) {
  const page = await newPage(browser);
  await page.route(`${px.url}/page`, (route) => route.fulfill({
    contentType: 'text/html',
    body: `<!doctype html><meta charset="utf-8"><script>
      window.got = []; window.errors = 0; window.opens = 0;
      const es = new EventSource('/numbers');
      es.onopen = () => { window.opens++; };
      es.onerror = () => { window.errors++; };
      es.onmessage = (e) => { window.got.push([e.data, e.lastEventId]); };
    </script>`,
  }));
  await page.goto(`${px.url}/page`);
  return page;
}

function assertConsecutive(got, what) {
  const first = Number(got[0][0]);
  for (let i = 0; i < got.length; i++) {
    if (Number(got[i][0]) !== first + i) {
      assert.fail(`${what}: event ${i} is ${got[i][0]}, expected ${first + i} ` +
        `(around: ${JSON.stringify(got.slice(Math.max(0, i - 3), i + 3))})`);
    }
  }
}

for (const shared of [false, true]) {
  test(`(a) Chromium through the proxy${shared ? ' (shared)' : ''}: the upstream killed and restarted, every event once, in order`,
    { timeout: 60_000 }, async () => {
      const px = await proxy(shared ? { SHARED: '1' } : {});
      const page = await openPage(px);
      const count = () => page.evaluate(() => window.got.length);
      await waitFor(async () => (await count()) >= 20, 10_000, 'the first 20 events');

      const before = await count();
      await restartUpstream(700);
      // events published while the upstream was down come from its rebuilt history
      await waitFor(async () => (await count()) >= before + 40, 15_000, '40 more events after the restart');

      const { got, errors, opens } = await page.evaluate(() => ({
        got: window.got, errors: window.errors, opens: window.opens,
      }));
      assertConsecutive(got, 'the page');
      assert.equal(errors, 0, 'the page never saw its connection fail');
      assert.equal(opens, 1, 'one connection for the whole test');
      if (shared) {
        for (const [, id] of got) assert.match(id, /^\d+-\d+$/, 'shared: the proxy\'s ids');
      } else {
        for (const [data, id] of got) assert.equal(id, data, 'per client: the upstream\'s ids');
      }
      // the restarted upstream was asked to resume after an id the relay had
      const stats = await upStats();
      assert.equal(stats.streams, 1, JSON.stringify(stats));
      assert.match(String(stats.last_event_ids[0]), /^\d+$/, JSON.stringify(stats));
      assert.ok(Number(stats.last_event_ids[0]) >= Number(got[0][0]) + before - 1, JSON.stringify(stats));
      assert.deepEqual(page.errors, []);

      await page.context().close();
      await waitFor(async () => (await upStats()).streams === 0, 5_000, 'the upstream stream closed');
      await px.stop();
    });
}

// ---- leaks ----

const fdCount = (pid) => readdirSync(`/proc/${pid}/fd`).length;
const rssKb = (pid) => Number(/VmRSS:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);

// One client: GET /numbers on its own connection, read until its first event, then leave
// (the socket destroyed, as a closed tab does).
function oneClient(px) {
  return new Promise((resolve, reject) => {
    const req = request(`${px.url}/numbers`, { agent: false, headers: { Accept: 'text/event-stream' } }, (res) => {
      if (res.statusCode !== 200) { req.destroy(); reject(new Error(`status ${res.statusCode}`)); return; }
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (s) => {
        buf += s;
        if (buf.includes('\ndata: ') || buf.startsWith('data: ')) { req.destroy(); resolve(); }
      });
      res.on('error', () => {});
    });
    req.on('error', (e) => { if (!req.destroyed) reject(e); });
    req.setTimeout(10_000, () => { req.destroy(); reject(new Error('no event within 10 s')); });
    req.end();
  });
}

for (const shared of [false, true]) {
  test(`(b) 1,000 clients come and go${shared ? ' (shared)' : ''}: upstream streams, proxy fds and RSS back to baseline`,
    { timeout: 180_000 }, async (t) => {
      const px = await proxy(shared ? { SHARED: '1' } : {});
      const pid = px.proc.pid;
      const settle = async (what) => {
        await waitFor(async () => (await upStats()).streams === 0, 10_000, `${what}: upstream streams back to 0`);
        // the proxy has noticed every client leave once its descriptor count stops moving
        let last = -1;
        await waitFor(() => { const n = fdCount(pid); const same = n === last; last = n; return same; },
          5_000, `${what}: the proxy's descriptors settle`, 200);
      };
      // warm-up batch: libcurl's and the allocator's first allocations are not a leak
      await Promise.all(Array.from({ length: 50 }, () => oneClient(px)));
      await settle('after the warm-up');
      const fd0 = fdCount(pid);
      const rss0 = rssKb(pid);
      const served0 = (await upStats()).served;

      for (let batch = 0; batch < 19; batch++) {
        await Promise.all(Array.from({ length: 50 }, () => oneClient(px)));
      }
      await settle('after 1,000 clients');
      const fd1 = fdCount(pid);
      const rss1 = rssKb(pid);
      const served = (await upStats()).served - served0;
      t.diagnostic(`proxy fds ${fd0} -> ${fd1}, RSS ${rss0} -> ${rss1} KB, ${served} upstream requests for 950 clients`);
      assert.ok(fd1 <= fd0 + 2, `proxy descriptors: ${fd0} before, ${fd1} after`);
      assert.ok(rss1 - rss0 < 30_000, `proxy RSS grew ${rss1 - rss0} KB (${rss0} -> ${rss1})`);
      if (shared) {
        // batches share: far fewer upstream requests than clients
        assert.ok(served <= 19 * 5, `shared: ${served} upstream requests for 950 clients`);
      } else {
        assert.equal(served, 950, 'one upstream request per client');
      }
      await px.stop();
    });
}
