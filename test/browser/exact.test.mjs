// Spec exactness in a real browser: every tricky payload sent with stream:send reaches
// Chromium's EventSource exactly as sent — the only change the protocol allows is that
// CRLF and lone CR arrive as LF — with the right event types and last event ids.
// The fixture (fixtures/exact.lua) serves the cases it sends as /cases.json; what the
// browser must see is computed here from them, with the spec's rules written out.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startLua, launchBrowser, newPage, cleanup, withTimeout } from './lib.mjs';

after(cleanup);

// The one change EventSource makes to data: every CRLF and every lone CR becomes LF.
const normalizeLineEnds = (s) => s.replace(/\r\n|\r/g, '\n');

// What the browser dispatches for the cases, in order (WHATWG HTML §9.2.6):
// - an event with no data field dispatches nothing; its id still becomes the last event id;
// - the type is the event field, else "message", and does not carry over to the next event;
// - lastEventId is the last id seen so far on the connection (an empty id resets it);
// - data is the string sent (numbers as their decimal text), line ends normalized to LF;
//   table data is JSON, compared after parsing.
function expectedEvents(cases) {
  const out = [];
  let lastEventId = '';
  for (const c of cases) {
    const ev = c.ev;
    if (ev.id !== undefined) lastEventId = String(ev.id);
    if (ev.data === undefined) continue;
    const e = { name: c.name, type: ev.event === undefined ? 'message' : String(ev.event), lastEventId };
    if (typeof ev.data === 'object') e.json = ev.data;
    else e.data = normalizeLineEnds(String(ev.data));
    out.push(e);
  }
  return out;
}

const show = (s) => JSON.stringify(s.length > 200 ? `${s.slice(0, 100)}…(${s.length})…${s.slice(-100)}` : s);

test('EventSource in Chromium receives every payload exactly', { timeout: 90_000 }, async () => {
  const srv = await startLua('test/browser/fixtures/exact.lua');
  const res = await fetch(`${srv.url}/cases.json`, { signal: AbortSignal.timeout(5_000) });
  assert.equal(res.status, 200);
  const cases = await res.json();
  assert.ok(cases.length >= 40, `only ${cases.length} cases`);
  const expected = expectedEvents(cases);

  const browser = await launchBrowser();
  const page = await newPage(browser);
  await page.goto(`${srv.url}/`);
  await withTimeout(page.waitForFunction(() => window.done === true, null, { timeout: 20_000 }),
    25_000, 'waiting for event: end').catch(async (e) => {
    const got = await page.evaluate(() => window.received.length).catch(() => '?');
    throw new Error(`${e.message}; received ${got} events; page errors: ${page.errors.join('; ')}\n` +
      `server output:\n${srv.output()}`);
  });
  const { received, errors } = await page.evaluate(() => ({ received: window.received, errors: window.errors }));

  assert.equal(errors, 0, 'EventSource reported an error before the end');
  assert.deepEqual(page.errors, [], 'errors in the page');
  const end = received.pop();
  assert.deepEqual({ type: end.type, data: end.data }, { type: 'end', data: String(cases.length) });
  assert.equal(received.length, expected.length,
    `expected ${expected.length} events, got ${received.length}: ` +
    JSON.stringify(received.map((r) => [r.type, r.data.slice(0, 20)])));

  for (let i = 0; i < expected.length; i++) {
    const want = expected[i];
    const got = received[i];
    const where = `event ${i} (${want.name})`;
    assert.equal(got.type, want.type, `${where}: type`);
    assert.equal(got.lastEventId, want.lastEventId, `${where}: lastEventId`);
    if (want.json !== undefined) {
      assert.ok(!got.data.includes('\n'), `${where}: JSON should be one line: ${show(got.data)}`);
      assert.deepEqual(JSON.parse(got.data), want.json, `${where}: JSON data`);
    } else if (got.data !== want.data) {
      assert.fail(`${where}: data ${show(got.data)} !== expected ${show(want.data)}`);
    }
  }

  // A few cases spelled out, so a mistake in the expectations above cannot hide them.
  const byName = Object.fromEntries(expected.map((e, i) => [e.name, received[i]]));
  assert.equal(byName['mixed line ends'].data, 'a\nb\nc\nd');
  assert.equal(byName['two leading spaces'].data, '  two spaces');
  assert.equal(byName['one leading space'].data, ' one space');
  assert.equal(byName['trailing newline'].data, 'x\n');
  assert.equal(byName['two newlines'].data, '\n\n');
  assert.equal(byName['empty string'].data, '');
  assert.equal(byName['emoji and CJK'].data, '😀 ñ 中文');
  assert.equal(byName['custom event'].type, 'custom');
  assert.equal(byName['id with spaces'].lastEventId, '  id with  spaces ');
  assert.equal(byName['after the silent id'].lastEventId, 'silent');
  assert.equal(byName['type not carried over'].type, 'message');
  assert.equal(byName['empty id resets'].lastEventId, '');
  assert.ok(new TextEncoder().encode(byName['long 100 KB'].data).length > 100_000);

  await browser.close();
  const stopped = await srv.stop();
  assert.equal(stopped.killed, false, 'server needed SIGKILL');
});
