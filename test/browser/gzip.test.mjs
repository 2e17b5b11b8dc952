// gzip streams (sse.app{ gzip = true }) seen by real clients. The point of a compressed
// stream is that it still streams: every event must be readable the moment it is sent
// (a sync flush per batch), not when the compressor's buffer fills or the next event
// comes. fixtures/gzip.lua sends one event every 300 ms and records each send time, so
// each arrival is checked against the send of the NEXT event:
//   (a) Chromium's EventSource (it sends Accept-Encoding: gzip; the response says
//       Content-Encoding: gzip);
//   (b) a channel fanned out to several pages and fetch readers, gzip and plain mixed,
//       with bursts, large and odd data, and a replaying late joiner: all get the same events;
//   (c) curl --compressed -N, spawned from Node, stdout lines timestamped;
// and the raw bytes: an incremental gunzip yields each event as it arrives, and the whole
// body is one valid gzip member (header, CRC and length trailer) once the stream ends.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { request } from 'node:http';
import { createGunzip, gunzipSync } from 'node:zlib';
import { startLua, launchBrowser, newPage, cleanup, waitFor, withTimeout, readSSE } from './lib.mjs';

const FIXTURE = 'test/browser/fixtures/gzip.lua';
const EVERY = 0.3;     // seconds between events
const N = 8;

let srv;
let browser;

before(async () => {
  [srv, browser] = await Promise.all([startLua(FIXTURE), launchBrowser()]);
});
after(cleanup);

async function getJSON(path) {
  const res = await fetch(srv.url + path, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200, `${path}: ${res.status}`);
  return res.json();
}

async function sentTimes(tag) {
  return getJSON(`/sent/${tag}`);
}

// Each event k arrived (at[k], ms since the epoch) before event k+1 was sent, and soon
// after it was sent. A compressor that held bytes back would deliver event k only with
// event k+1 (or later).
function assertStreamed(arrivals, sent, what) {
  assert.equal(arrivals.length, sent.length, `${what}: ${arrivals.length} arrivals for ${sent.length} sends`);
  const table = arrivals.map((at, i) => `#${i + 1} sent ${sent[i]} arrived +${at - sent[i]} ms`).join('\n');
  for (let i = 0; i < sent.length; i++) {
    const latency = arrivals[i] - sent[i];
    assert.ok(latency > -50, `${what}: event ${i + 1} arrived before it was sent?\n${table}`);
    assert.ok(latency < 200, `${what}: event ${i + 1} took ${latency} ms (sent every ${EVERY * 1000} ms)\n${table}`);
    if (i + 1 < sent.length) {
      assert.ok(arrivals[i] < sent[i + 1],
        `${what}: event ${i + 1} arrived only after event ${i + 2} was sent: buffered\n${table}`);
    }
  }
}

test('(a) Chromium EventSource on a gzip stream gets each event before the next is sent',
  { timeout: 30_000 }, async () => {
    const page = await newPage(browser);
    const seen = [];
    page.on('response', async (r) => {
      if (new URL(r.url()).pathname === '/ticks') {
        seen.push({ status: r.status(), headers: r.headers(), request: await r.request().allHeaders() });
      }
    });
    const stream = `/ticks?n=${N}&every=${EVERY}&tag=chromium`;
    await page.goto(`${srv.url}/?stream=${encodeURIComponent(stream)}`);
    const r = await waitFor(async () => {
      const x = await page.evaluate(() => window.result);
      return x.done && x;
    }, 10_000, 'the done event', 50).catch(async (e) => {
      e.message += `\npage: ${JSON.stringify(await page.evaluate(() => window.result))}\n${srv.output()}`;
      throw e;
    });
    assert.deepEqual(r.messages.map((m) => JSON.parse(m.data).n), Array.from({ length: N }, (_, i) => i + 1));
    assert.deepEqual(r.messages.map((m) => m.id), Array.from({ length: N }, (_, i) => String(i + 1)));
    assert.equal(r.errors, 0);
    assert.equal(r.opens, 1);

    assert.equal(seen.length, 1, JSON.stringify(seen));
    assert.match(seen[0].request['accept-encoding'] || '', /\bgzip\b/);
    assert.equal(seen[0].headers['content-encoding'], 'gzip');
    assert.match(seen[0].headers.vary || '', /Accept-Encoding/i);
    assert.match(seen[0].headers['content-type'], /^text\/event-stream/);

    const sent = await sentTimes('chromium');
    assert.match(sent.accept_encoding, /\bgzip\b/);
    assertStreamed(r.messages.map((m) => m.at), sent.times, 'Chromium');
    await page.context().close();
  });

test('(b) a gzip channel fans out the same events to pages and fetch readers, gzip and plain',
  { timeout: 60_000 }, async () => {
    // three browser pages (gzip), two fetch readers asking for gzip, one asking for none
    const pages = [];
    const responses = [];
    for (let i = 0; i < 3; i++) {
      const page = await newPage(browser);
      page.on('response', (r) => {
        if (new URL(r.url()).pathname === '/news') responses.push(r.headers());
      });
      await page.goto(`${srv.url}/?stream=${encodeURIComponent('/news')}`);
      pages.push(page);
    }
    const readers = [];
    const open = (encoding, lastEventId) => fetch(`${srv.url}/news`, {
      headers: { 'Accept-Encoding': encoding, ...(lastEventId ? { 'Last-Event-ID': lastEventId } : {}) },
      signal: AbortSignal.timeout(30_000),
    });
    for (const enc of ['gzip', 'gzip', 'identity']) {
      const res = await open(enc);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-encoding'), enc === 'gzip' ? 'gzip' : null, enc);
      assert.match(res.headers.get('vary') || '', /Accept-Encoding/i);
      readers.push({ enc, done: readSSE(res, { timeout: 25_000, stopWhen: (ev) => ev.data === 'END' }) });
    }
    await waitFor(async () => (await getJSON('/subscribers')).news === 6, 5_000, '6 subscribers');
    await waitFor(() => responses.length === 3, 5_000, 'the pages\' /news responses');
    for (const h of responses) assert.equal(h['content-encoding'], 'gzip');

    // what is published: bursts in one loop turn, spaced rounds, large and odd data
    const big = 'lorem ipsum dolor sit amet '.repeat(2_000);          // 54 KB, compresses well
    let seed = 7;
    const noise = Array.from({ length: 6_000 }, () => {                // compresses badly
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return String.fromCharCode(33 + (seed % 90));
    }).join('');
    const rounds = [
      [{ data: 'first' }],
      Array.from({ length: 20 }, (_, i) => ({ data: `burst ${i}` })),
      [{ data: big }, { data: 'after big' }],
      [{ data: 'two\nlines' }, { data: '' }, { data: ' leading space' }, { data: 'héllo wörld ✓ 🎉' }],
      [{ data: noise }],
      [{ event: 'message', data: JSON.stringify({ nested: { a: [1, 2, 3] } }) }],
      Array.from({ length: 50 }, (_, i) => ({ data: `x${i}`.repeat(i + 1) })),
    ];
    const expected = [];
    const ids = [];
    for (const round of rounds) {
      const res = await fetch(`${srv.url}/publish`, {
        method: 'POST', body: JSON.stringify(round), signal: AbortSignal.timeout(5_000),
      });
      assert.equal(res.status, 201);
      ids.push(...(await res.json()).ids);
      expected.push(...round.map((e) => e.data));
      await new Promise((r) => setTimeout(r, 50));
    }

    // a late joiner asking for gzip, resuming after the 10th event: replay, then live
    const lateRes = await open('gzip', ids[9]);
    assert.equal(lateRes.headers.get('content-encoding'), 'gzip');
    const late = readSSE(lateRes, { timeout: 25_000, stopWhen: (ev) => ev.data === 'END' });
    await waitFor(async () => (await getJSON('/subscribers')).news === 7, 5_000, '7 subscribers');
    const res = await fetch(`${srv.url}/publish`, {
      method: 'POST', body: JSON.stringify([{ data: 'last live' }, { data: 'END' }]),
      signal: AbortSignal.timeout(5_000),
    });
    ids.push(...(await res.json()).ids);
    expected.push('last live', 'END');

    const strip = (events) => events.map((e) => [e.data, e.id]);
    const want = expected.map((d, i) => [d, ids[i]]);
    for (const r of readers) {
      const got = await r.done;
      sameEvents(strip(got.events), want, `fetch reader (${r.enc})`);
    }
    sameEvents(strip((await late).events), want.slice(10), 'late joiner (gzip, replay after the 10th)');
    for (const [i, page] of pages.entries()) {
      const r = await waitFor(async () => {
        const x = await page.evaluate(() => window.result);
        return x.messages.length >= want.length && x;
      }, 10_000, `page ${i}: ${want.length} messages`, 50);
      sameEvents(r.messages.map((m) => [m.data, m.id]), want, `page ${i}`);
      assert.equal(r.errors, 0, `page ${i}: no error (no reconnect)`);
      await page.context().close();
    }
  });

test('(c) curl --compressed -N gets each event before the next is sent', { timeout: 30_000 }, async () => {
  const url = `${srv.url}/ticks?n=${N}&every=${EVERY}&tag=curl`;
  // -i: the response head comes first on stdout, then the decompressed body
  const curl = spawn('curl', ['--compressed', '-siN', '--max-time', '15', url],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const arrivals = [];
  let all = '';
  let buf = '';
  let err = '';
  curl.stderr.setEncoding('utf8');
  curl.stderr.on('data', (s) => { err += s; });
  curl.stdout.setEncoding('utf8');
  curl.stdout.on('data', (s) => {
    const now = Date.now();
    all += s;
    buf += s;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.startsWith('data: {')) arrivals.push({ n: JSON.parse(line.slice(6)).n, at: now });
    }
  });
  const exit = await withTimeout(new Promise((res) => curl.once('exit', (code, signal) => res({ code, signal }))),
    20_000, 'curl').catch((e) => { curl.kill('SIGKILL'); throw e; });
  assert.deepEqual(exit, { code: 0, signal: null }, `curl: ${err}\n${all}`);
  const head = all.slice(0, all.indexOf('\r\n\r\n'));
  assert.match(head, /^content-encoding: gzip\r?$/im, head);
  assert.match(all, new RegExp(`event: done\\ndata: ${N}\\n\\n$`), 'the whole stream, decompressed');
  assert.deepEqual(arrivals.map((a) => a.n), Array.from({ length: N }, (_, i) => i + 1));
  const sent = await sentTimes('curl');
  assert.match(sent.accept_encoding, /\bgzip\b/);
  assertStreamed(arrivals.map((a) => a.at), sent.times, 'curl --compressed');
});

// Equal strings, or a failure showing where they first differ (not two 10 KB strings).
function sameText(got, want, what) {
  if (got === want) return;
  let i = 0;
  while (i < got.length && got[i] === want[i]) i++;
  const at = (s) => JSON.stringify(s.slice(Math.max(0, i - 40), i + 60));
  assert.fail(`${what}: differs at byte ${i} of ${got.length} (want ${want.length}):\n  got  ${at(got)}\n  want ${at(want)}`);
}

// The same [data, id] lists, or a failure naming the first event that differs (shortened).
function sameEvents(got, want, what) {
  const short = (e) => e && JSON.stringify([e[0].length > 80 ? `${e[0].slice(0, 60)}… (${e[0].length} chars)` : e[0], e[1]]);
  for (let i = 0; i < Math.max(got.length, want.length); i++) {
    if (!got[i] || !want[i] || got[i][0] !== want[i][0] || got[i][1] !== want[i][1]) {
      assert.fail(`${what}: event ${i} of ${got.length} (want ${want.length}): got ${short(got[i])}, want ${short(want[i])}`);
    }
  }
}

// GET with node:http (which never decompresses): resolves { headers, chunks: [{ at, buf }] }
// once the response ends.
function rawGet(path, headers) {
  return withTimeout(new Promise((resolve, reject) => {
    const req = request(`${srv.url}${path}`, { headers }, (res) => {
      const chunks = [];
      res.on('data', (buf) => chunks.push({ at: Date.now(), buf }));
      res.on('end', () => resolve({ headers: res.headers, chunks }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  }), 15_000, `GET ${path}`);
}

test('the raw gzip bytes: each event decodes on arrival, and the body is one valid gzip member',
  { timeout: 30_000 }, async () => {
    const n = 6;
    const every = 0.15;
    // the same generator, plain, gives the exact bytes the gzip body must decode to
    const plain = await rawGet(`/plain?n=${n}&every=0.01&tag=plain`, { 'Accept-Encoding': 'gzip' });
    assert.equal(plain.headers['content-encoding'], undefined, 'gzip = false on the route wins');
    const text = Buffer.concat(plain.chunks.map((c) => c.buf)).toString('utf8');
    assert.match(text, /^retry: 500\n\n/);

    // incremental gunzip as bytes arrive: event k is complete when its bytes came in
    const gunzip = createGunzip();
    const decoded = [];
    gunzip.on('data', (b) => decoded.push(b));
    const gz = await rawGet(`/ticks?n=${n}&every=${every}&tag=raw`, { 'Accept-Encoding': 'gzip' });
    assert.equal(gz.headers['content-encoding'], 'gzip');
    assert.match(gz.headers.vary || '', /Accept-Encoding/i);
    const whole = Buffer.concat(gz.chunks.map((c) => c.buf));
    // one valid member: gunzipSync checks the header, the CRC-32 and the length trailer
    sameText(gunzipSync(whole).toString('utf8'), text, 'gunzip of the whole body');
    assert.ok(whole.length < Buffer.byteLength(text) * 2, 'sync flushes stay small');

    // feed the chunks one by one (as they arrived) and see which events each completes
    const sent = await sentTimes('raw');
    const arrivals = [];
    let out = '';
    for (const c of gz.chunks) {
      await new Promise((r) => gunzip.write(c.buf, r));
      await new Promise((r) => setImmediate(r));
      out = Buffer.concat(decoded).toString('utf8');
      const complete = (out.match(/^data: \{"n":\d+\}\n\n/gm) || []).length;
      while (arrivals.length < complete) arrivals.push(c.at);
    }
    gunzip.end();
    sameText(out, text, 'incremental gunzip');
    const table = arrivals.map((at, i) => `#${i + 1} +${at - sent.times[i]} ms`).join(', ');
    for (let i = 0; i + 1 < n; i++) {
      assert.ok(arrivals[i] < sent.times[i + 1], `event ${i + 1} decodable only after event ${i + 2} was sent: ${table}`);
    }
  });

test('a gzip channel stream mixing shared and own events, ended by the server, is one valid gzip member',
  { timeout: 30_000 }, async () => {
    const before = (await getJSON('/subscribers')).news;
    const reply = rawGet('/news-direct', { 'Accept-Encoding': 'gzip' });
    await waitFor(async () => (await getJSON('/subscribers')).news === before + 1, 5_000, 'subscribed');
    const items = [{ data: 'a' }, { data: 'b'.repeat(10_000) }, { data: 'c\nd' }, { data: '' }];
    const res = await fetch(`${srv.url}/publish-mixed`, {
      method: 'POST', body: JSON.stringify(items), signal: AbortSignal.timeout(5_000),
    });
    const { ids } = await res.json();
    const closed = await (await fetch(`${srv.url}/close-news`, { method: 'POST', signal: AbortSignal.timeout(5_000) })).json();
    assert.equal(closed.closed, 1);
    const gz = await reply;
    assert.equal(gz.headers['content-encoding'], 'gzip');
    // gunzipSync checks the member's CRC-32 and length: shared chunks are spliced in as
    // precompressed blocks, so this is where a wrong CRC combination would show
    const text = gunzipSync(Buffer.concat(gz.chunks.map((c) => c.buf))).toString('utf8');
    let want = 'retry: 500\n\ndata: {"direct":0}\n\n';
    items.forEach((it, i) => {
      want += `id: ${ids[i]}\n` + it.data.split('\n').map((l) => `data: ${l}\n`).join('') + '\n';
      want += `data: {"direct":${i + 1}}\n\n`;
    });
    sameText(text, want, 'the decompressed body');
  });
