// Cross-origin EventSource in Chromium against sse.app's `cors` option. A page served by
// one instance of fixtures/cors.lua (its own port, so its own origin) opens a stream on
// another instance:
//   - cors = { origins = {<page origin>}, credentials = true }: a credentialed POST sets a
//     cookie on the stream server, `new EventSource(url, { withCredentials: true })`
//     receives events, the cookie reaches the server on the first request and on every
//     reconnect (with Last-Event-ID), and the exact origin is echoed with
//     Access-Control-Allow-Credentials;
//   - a page from an origin not in the list gets no CORS headers: onerror, no message;
//   - cors = "*" works cross-origin without credentials, and the browser refuses it with
//     credentials (the spec forbids "*" there).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startLua, launchBrowser, newPage, cleanup, waitFor, sleep } from './lib.mjs';

const FIXTURE = 'test/browser/fixtures/cors.lua';

let pages;     // serves the page (no CORS); its origin is the allowed one
let other;     // serves the same page from an origin that is not allowed
let browser;

before(async () => {
  [pages, other, browser] = await Promise.all([startLua(FIXTURE), startLua(FIXTURE), launchBrowser()]);
});
after(cleanup);

const origin = (srv) => new URL(srv.url).origin;

// Opens the fixture page from `from` against the stream `streamUrl`; collects the
// responses of the stream URL (headers) as they arrive.
async function openPage(from, streamUrl, { creds = false, login } = {}) {
  const page = await newPage(browser);
  page.streamResponses = [];
  page.on('response', (r) => {
    if (r.url().startsWith(streamUrl)) page.streamResponses.push({ status: r.status(), headers: r.headers() });
  });
  const q = new URLSearchParams({ stream: streamUrl, creds: creds ? '1' : '0' });
  if (login) q.set('login', login);
  await page.goto(`${from.url}/?${q}`);
  return page;
}

const result = (page) => page.evaluate(() => window.result);

async function until(page, srv, pred, what, ms = 8_000) {
  let last;
  try {
    return await waitFor(async () => { last = await result(page); return pred(last) && last; }, ms, what, 25);
  } catch (e) {
    e.message += `\nresult: ${JSON.stringify(last)}\npage logs: ${page.logs.join(' | ')}` +
      `\nserver output:\n${srv.output()}`;
    throw e;
  }
}

async function seen(srv, path) {
  const res = await fetch(`${srv.url}/seen`, { signal: AbortSignal.timeout(5_000) });
  return (await res.json()).requests.filter((r) => r.path === path);
}

// An EventSource that fails CORS: onerror with readyState CLOSED (no reconnect), no
// message, and none arrives later either.
async function expectRefused(page, srv, what) {
  const r = await until(page, srv, (x) => x.errors.length > 0, `${what}: onerror`);
  assert.equal(r.errors[0].readyState, 2, `${what}: CLOSED after the error: ${JSON.stringify(r)}`);
  await sleep(600);   // well past the fixture's retry (200 ms): nothing is retried
  const later = await result(page);
  assert.equal(later.messages.length, 0, `${what}: messages arrived: ${JSON.stringify(later)}`);
  assert.equal(later.opens, 0, `${what}: onopen fired`);
  assert.equal(later.errors.length, 1, `${what}: more errors (a reconnect?): ${JSON.stringify(later)}`);
}

test('credentials: the allowed origin is echoed, the cookie reaches the server on every (re)connect',
  { timeout: 30_000 }, async () => {
    const streams = await startLua(FIXTURE, { CORS: origin(pages), CREDENTIALS: '1' });
    const page = await openPage(pages, `${streams.url}/events`, { creds: true, login: `${streams.url}/login` });

    // the cross-origin credentialed POST got its answer and stored the cookie
    const r0 = await until(page, streams, (x) => x.login, 'login answered');
    assert.equal(r0.login.status, 200, JSON.stringify(r0.login));
    const session = r0.login.body.session;
    assert.match(session, /^[0-9a-f]{16}$/);

    // the stream sends 3 events and ends; the browser reconnects with Last-Event-ID: 3
    // (and again at 6): 9 events over three connections
    const r = await until(page, streams, (x) => x.messages.length >= 9, '9 events over 3 connections');
    assert.deepEqual(r.messages.slice(0, 9).map((m) => m.data.n), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(r.messages.slice(0, 9).map((m) => m.id), ['1', '2', '3', '4', '5', '6', '7', '8', '9']);
    for (const m of r.messages) {
      assert.equal(m.data.cookie, session, `the cookie reached the server: ${JSON.stringify(m)}`);
      assert.equal(m.data.origin, origin(pages));
      assert.equal(m.origin, origin(streams), 'MessageEvent.origin is the stream\'s origin');
    }
    assert.equal(r.messages[3].data.last_event_id, '3', 'the reconnect carried Last-Event-ID');
    assert.equal(r.messages[6].data.last_event_id, '6');
    assert.ok(r.opens >= 3, `one open per connection: ${r.opens}`);

    // headers as the browser saw them: the exact origin, credentials allowed, Vary: Origin
    await waitFor(() => page.streamResponses.length >= 3, 5_000, 'the three responses (page.on(\'response\'))');
    for (const res of page.streamResponses) {
      assert.equal(res.status, 200);
      assert.equal(res.headers['access-control-allow-origin'], origin(pages));
      assert.equal(res.headers['access-control-allow-credentials'], 'true');
      assert.match(res.headers.vary || '', /\bOrigin\b/i);
      assert.match(res.headers['content-type'], /^text\/event-stream/);
    }
    // and as the server saw them
    const reqs = await seen(streams, '/events');
    assert.ok(reqs.length >= 3);
    for (const q of reqs) {
      assert.equal(q.origin, origin(pages));
      assert.equal(q.cookie, `sse_session=${session}`);
    }
    assert.deepEqual(reqs.slice(0, 3).map((q) => q.last_event_id), [false, '3', '6']);
    await page.evaluate(() => window.es.close());
    await page.context().close();
  });

test('an origin not in the list gets no CORS headers: EventSource errors and receives nothing',
  { timeout: 30_000 }, async () => {
    const streams = await startLua(FIXTURE, { CORS: origin(pages), CREDENTIALS: '1' });
    // the same page, served from `other` (another port: another origin)
    assert.notEqual(origin(other), origin(pages));
    const page = await openPage(other, `${streams.url}/events`, { creds: true });
    await expectRefused(page, streams, 'disallowed origin');
    // what the server answered that origin (asked directly): no CORS header at all
    const res = await fetch(`${streams.url}/events`, {
      headers: { Origin: origin(other) }, signal: AbortSignal.timeout(5_000),
    });
    assert.equal(res.headers.get('access-control-allow-origin'), null);
    assert.equal(res.headers.get('access-control-allow-credentials'), null);
    await res.body.cancel();
    // while the allowed one gets them on a preflight too
    const pre = await fetch(`${streams.url}/events`, {
      method: 'OPTIONS',
      headers: { Origin: origin(pages), 'Access-Control-Request-Method': 'GET',
        'Access-Control-Request-Headers': 'last-event-id' },
      signal: AbortSignal.timeout(5_000),
    });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get('access-control-allow-origin'), origin(pages));
    assert.equal(pre.headers.get('access-control-allow-credentials'), 'true');
    assert.match(pre.headers.get('access-control-allow-headers') || '', /last-event-id/i);
    const preOther = await fetch(`${streams.url}/events`, {
      method: 'OPTIONS',
      headers: { Origin: origin(other), 'Access-Control-Request-Method': 'GET' },
      signal: AbortSignal.timeout(5_000),
    });
    assert.equal(preOther.headers.get('access-control-allow-origin'), null);
    await page.context().close();
  });

test('cors = "*": any page receives the stream without credentials; with them the browser refuses it',
  { timeout: 30_000 }, async () => {
    const streams = await startLua(FIXTURE, { CORS: '*' });
    const page = await openPage(pages, `${streams.url}/events`);
    const r = await until(page, streams, (x) => x.messages.length >= 6, '6 events over 2 connections');
    assert.deepEqual(r.messages.slice(0, 6).map((m) => m.data.n), [1, 2, 3, 4, 5, 6]);
    assert.equal(r.messages[0].data.cookie, false, 'no credentials: no cookie');
    assert.equal(r.messages[3].data.last_event_id, '3');
    await waitFor(() => page.streamResponses.length >= 2, 5_000, 'the two responses');
    for (const res of page.streamResponses) {
      assert.equal(res.headers['access-control-allow-origin'], '*');
      assert.equal(res.headers['access-control-allow-credentials'], undefined);
    }
    await page.evaluate(() => window.es.close());
    await page.context().close();

    // withCredentials against "*": the spec makes the browser fail it
    const strict = await openPage(other, `${streams.url}/events`, { creds: true });
    await expectRefused(strict, streams, '"*" with credentials');
    await strict.context().close();
  });
