// app:status_page(path) in headless Chromium: one self-contained page (nothing loaded from
// anywhere but its own origin: the page and its stream) whose figures follow the load Node
// puts on the server — streams opened with plain HTTP requests, events published at a
// rate — and fall back when the load goes; a slow client's drop shows; the stream's
// sampling timer stops once no page watches (the fixture counts its ticks).
// Fixture: test/browser/fixtures/status.lua.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { startLua, launchBrowser, newPage, cleanup, waitFor, readSSE, sleep } from './lib.mjs';

const N = 24;                          // streams of load
const ODD = '<i>odd</i> & "name"';     // a channel name that must show as text
const QUEUE_LIMIT = 131072;

let srv;
let browser;

before(async () => {
  srv = await startLua('test/browser/fixtures/status.lua', { QUEUE_LIMIT: String(QUEUE_LIMIT) });
  browser = await launchBrowser();
});
after(cleanup);

// What the page shows, from the DOM: the raw value behind each figure (data-value), the
// charts' state, the channel table.
function view(page) {
  return page.evaluate(() => {
    const num = (id) => {
      const v = document.getElementById(id).dataset.value;
      return v === undefined || v === '' ? null : Number(v);
    };
    const chart = (key) => {
      const svg = document.getElementById('chart-' + key);
      return { points: Number(svg.dataset.points || 0), max: Number(svg.dataset.max || 0),
        last: svg.dataset.last === undefined || svg.dataset.last === '' ? null : Number(svg.dataset.last),
        path: svg.querySelector('.line')?.getAttribute('d') || '' };
    };
    return {
      state: document.getElementById('state').textContent,
      connections: num('connections'), streams: num('streams'), eps: num('eps'), bps: num('bps'),
      subscribers: num('subscribers'), channels: num('channels'), pps: num('pps'),
      dropped: num('dropped'), droppedBad: document.getElementById('dropped').classList.contains('bad'),
      uptime: num('uptime'), uptimeText: document.getElementById('uptime').textContent,
      worker: document.getElementById('worker').hidden ? null : document.getElementById('worker').textContent,
      streamsSub: document.getElementById('streams-sub').textContent,
      epsText: document.getElementById('eps').textContent,
      charts: { connections: chart('connections'), streams: chart('streams'), eps: chart('eps'), bps: chart('bps') },
      table: [...document.querySelectorAll('#channel-table tbody tr')].map((tr) => ({
        name: tr.querySelector('.name').textContent,
        elements: tr.querySelector('.name').children.length,
        subscribers: Number(tr.querySelector('.subs').dataset.value),
        rate: tr.querySelector('.rate').dataset.value === '' ? null : Number(tr.querySelector('.rate').dataset.value),
        publishes: Number(tr.querySelector('.publishes').dataset.value),
      })),
    };
  });
}

// Waits until pred(view) holds; the failure message shows the page as it was.
async function until(page, pred, what, ms = 10_000) {
  let last;
  try {
    return await waitFor(async () => { last = await view(page); return pred(last) && last; }, ms, what, 50);
  } catch (e) {
    e.message += `\npage: ${JSON.stringify(last)}\nlogs: ${page.logs.join(' | ')}\nerrors: ${page.errors.join(' | ')}` +
      `\nserver output:\n${srv.output()}`;
    throw e;
  }
}

const row = (v, name) => v.table.find((r) => r.name === name);

// Opens a status page, recording every request it makes.
async function openStatus() {
  const page = await newPage(browser, { viewport: { width: 1100, height: 800 } });
  page.requests = [];
  page.on('request', (r) => page.requests.push(r.url()));
  await page.goto(`${srv.url}/status`);
  return page;
}

// n streams of channel `name` as plain HTTP requests; resolves once every one has its head.
async function openStreams(n, name) {
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const streams = await Promise.all(Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const req = http.get(`${srv.url}/ch/${name}`, { agent, headers: { accept: 'text/event-stream' } }, (res) => {
      const s = { req, res, bytes: 0 };
      res.on('data', (b) => { s.bytes += b.length; });
      res.on('error', () => {});
      if (res.statusCode !== 200) reject(new Error(`stream: ${res.statusCode}`));
      else resolve(s);
    });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error('stream head: timeout')));
  })));
  return { streams, close: () => { for (const s of streams) s.req.destroy(); agent.destroy(); } };
}

async function publish(name, { count = 1, size, body = 'tick' } = {}) {
  const q = new URLSearchParams({ count: String(count), ...(size ? { size: String(size) } : {}) });
  const res = await fetch(`${srv.url}/ch/${encodeURIComponent(name)}?${q}`, {
    method: 'POST', body, signal: AbortSignal.timeout(5_000),
  });
  assert.equal(res.status, 200, await res.text());
  await res.body?.cancel().catch(() => {});
}

// Publishes `count` events to `name` every `every` ms until stop() (load, not a measurement).
function publisher(name, { count = 2, every = 10 } = {}) {
  let running = true;
  let sent = 0;
  const done = (async () => {
    while (running) {
      await publish(name, { count });
      sent += count;
      await sleep(every);
    }
  })();
  return { stop: async () => { running = false; await done; return sent; } };
}

async function metric(name) {
  const text = await fetch(`${srv.url}/metrics`, { signal: AbortSignal.timeout(5_000) }).then((r) => r.text());
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  assert.ok(m, `${name} in /metrics:\n${text}`);
  return Number(m[1]);
}

test('the page is self-contained and shows the idle server, itself included', { timeout: 30_000 }, async () => {
  const res = await fetch(`${srv.url}/status`, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/html; charset=utf-8/);
  assert.match(res.headers.get('content-security-policy'), /default-src 'none'/);
  const html = await res.text();
  assert.doesNotMatch(html, /<(script|link|img|iframe)[^>]+(src|href)="(?!data:)/i, 'no external asset');

  const page = await openStatus();
  const v = await until(page, (w) => w.state === 'live' && w.streams === 1 && w.uptime > 0, 'the page live');
  // Its own stream is the one stream, and it says so.
  assert.equal(v.streamsSub, 'incl. 1 status page');
  assert.ok(v.connections >= 1);
  assert.equal(v.worker, null, 'no worker badge without workers');
  assert.equal(v.subscribers, 0);
  assert.equal(v.channels, 2);
  // Both channels listed; the odd name as text, not markup.
  assert.deepEqual(v.table.map((r) => [r.name, r.subscribers, r.elements]).sort(),
    [[ODD, 0, 0], ['ticks', 0, 0]]);
  // After a tick the rates come: only the page's own event, about one a second.
  const w = await until(page, (x) => x.eps !== null && x.charts.eps.points >= 1, 'the first rates', 5_000);
  assert.ok(w.eps <= 3, `idle events/s: ${w.eps}`);
  assert.ok(w.bps > 0 && w.bps < 5_000, `idle bytes/s: ${w.bps}`);
  // Two requests, both to this server: the page and its stream (no asset, no favicon).
  assert.deepEqual(page.requests, [`${srv.url}/status`, `${srv.url}/status/events`]);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('the figures follow the load and fall back when it goes', { timeout: 60_000 }, async () => {
  const page = await openStatus();
  await until(page, (v) => v.state === 'live' && v.streams === 1, 'the page live, alone');

  const load = await openStreams(N, 'ticks');
  const a = await until(page, (v) => v.streams >= N + 1 && row(v, 'ticks')?.subscribers === N,
    `${N} more streams, ${N} subscribers of ticks`);
  assert.ok(a.connections >= N + 1, `connections: ${a.connections}`);
  assert.equal(a.subscribers, N);
  assert.equal(a.table[0].name, 'ticks', 'the busiest channel first');
  // the streams chart has drawn the rise
  await until(page, (v) => v.charts.streams.max >= N + 1 && v.charts.streams.last >= N + 1, 'the streams chart');

  const pub = publisher('ticks', { count: 2, every: 10 });
  let b;
  try {
    // Every publish goes to N subscribers: events/s is well above the page's own one.
    b = await until(page, (v) => v.eps > N && v.charts.eps.max > N && v.pps > 0 && row(v, 'ticks').rate > 0 &&
      v.bps > 1_000, 'events/s, bytes/s and publishes/s under load');
  } finally {
    const sent = await pub.stop();
    assert.ok(sent > 0);
  }
  assert.match(b.epsText, /^[\d.]+k?$/, `events/s as shown: ${b.epsText}`);
  assert.ok(b.charts.eps.path.startsWith('M'), 'the events/s chart has a line');
  assert.ok(row(b, 'ticks').publishes > 0);
  // What Node received is what the page counted: every stream got events.
  await waitFor(() => load.streams.every((s) => s.bytes > 100), 5_000, 'every load stream received events');

  // The load goes: streams back to the page's own, events/s back to about one.
  load.close();
  const c = await until(page, (v) => v.streams === 1 && row(v, 'ticks').subscribers === 0 && v.subscribers === 0,
    'streams back to 1');
  assert.ok(c.connections <= 3, `connections after the load: ${c.connections}`);
  await until(page, (v) => v.eps !== null && v.eps <= 3 && row(v, 'ticks').rate === 0 && v.pps === 0,
    'events/s and publishes/s back down');
  // the chart still shows the minute's peak
  const d = await view(page);
  assert.ok(d.charts.streams.max >= N + 1 && d.charts.eps.max > N, JSON.stringify(d.charts));
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('a second page gets the last samples at once; a dropped slow client shows', { timeout: 60_000 }, async () => {
  const first = await openStatus();
  await until(first, (v) => v.state === 'live' && v.charts.streams.points >= 3, 'three samples on the first page');
  // A page that opens now gets the samples so far (a history event) before the figures.
  const res = await fetch(`${srv.url}/status/events`, { signal: AbortSignal.timeout(10_000) });
  const { events } = await readSSE(res, { timeout: 5_000, stopWhen: (e) => e.type === 'stats' });
  assert.deepEqual(events.map((e) => e.type), ['history', 'stats']);
  const history = JSON.parse(events[0].data);
  assert.ok(history.length >= 3 && history.every((p) => p.length === 5), events[0].data);
  assert.equal(JSON.parse(events[1].data).viewers, 2, 'counted while it was open');
  const second = await openStatus();
  await until(second, (v) => v.state === 'live' && v.charts.streams.points >= 3, 'the second page with history',
    1_500);
  await until(first, (v) => v.streamsSub === 'incl. 2 status pages', 'two status pages counted');

  // A client that stops reading: its queue passes queue_limit and it is dropped.
  const slow = net.connect(srv.port, '127.0.0.1');
  slow.on('error', () => {});
  await new Promise((r) => slow.once('connect', r));
  slow.write('GET /ch/bulk HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n');
  slow.pause();
  await until(first, (v) => row(v, 'bulk')?.subscribers === 1, 'the slow subscriber');
  const before = (await view(first)).dropped;
  await waitFor(async () => {
    await publish('bulk', { count: 2, size: 50_000 });
    return (await view(first)).dropped > before;
  }, 20_000, 'the slow client dropped', 10);
  const v = await until(first, (w) => w.dropped === before + 1 && w.droppedBad && row(w, 'bulk').subscribers === 0,
    'the drop shown');
  assert.equal(v.state, 'live', 'the page itself was not dropped');
  slow.destroy();
  assert.deepEqual(first.errors, []);
  assert.deepEqual(second.errors, []);
  await first.context().close();
  await second.context().close();
});

test('the sampling stops once no page watches', { timeout: 30_000 }, async () => {
  const ticks = async () => (await fetch(`${srv.url}/timer-ticks`, { signal: AbortSignal.timeout(5_000) })
    .then((r) => r.json())).ticks;
  const page = await openStatus();
  await until(page, (v) => v.state === 'live' && v.eps !== null, 'a page live with rates');
  const t0 = await ticks();
  await waitFor(async () => (await ticks()) > t0, 3_000, 'the timer ticking while the page is open');
  await page.context().close();
  // The server closes the page's stream at once; the timer's next tick finds nobody and
  // cancels itself: its tick count stands still.
  await waitFor(async () => (await metric('sse_streams')) === 0, 5_000, 'the page\'s stream closed');
  let prev = await ticks();
  await waitFor(async () => {
    await sleep(1_200);   // longer than the timer's period: a running timer ticks in it
    const now = await ticks();
    const still = now === prev;
    prev = now;
    return still;
  }, 8_000, 'the timer stopped');
  // and a new page starts it again
  const again = await openStatus();
  await until(again, (v) => v.state === 'live' && v.eps !== null && v.streams === 1, 'a new page gets rates again');
  await waitFor(async () => (await ticks()) > prev, 3_000, 'the timer ticking again');
  assert.deepEqual(again.errors, []);
  await again.context().close();
});
