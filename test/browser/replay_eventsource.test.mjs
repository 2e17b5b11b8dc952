// Channel replay seen by a second, independent client: the `eventsource` npm package in
// Node (the WHATWG EventSource written on fetch). A client that comes back with the last
// event id it had gets exactly what it missed, in publish order, then live events; one id
// resumes several channels; an id older than the kept history gets a `gap` event first.
// The fixture (fixtures/replay.lua) keeps HISTORY events per channel.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { EventSource } from 'eventsource';
import { startLua, cleanup, waitFor, sleep } from './lib.mjs';

const HISTORY = 4;
let srv;

before(async () => { srv = await startLua('test/browser/fixtures/replay.lua', { HISTORY: String(HISTORY) }); });
after(cleanup);

async function publish(channel, data) {
  const res = await fetch(`${srv.url}/publish/${channel}`, {
    method: 'POST', body: data, signal: AbortSignal.timeout(5_000),
  });
  assert.equal(res.status, 201);
  const { id } = await res.json();
  assert.match(id, /^\d+-\d+$/);   // app-assigned ids: "<epoch>-<n>"
  return id;
}

async function subscribers(channel) {
  const res = await fetch(`${srv.url}/subscribers/${channel}`, { signal: AbortSignal.timeout(5_000) });
  return (await res.json()).subscribers;
}

const clients = new Set();
after(() => { for (const c of clients) c.close(); });

// Opens an EventSource on `path`. On a first connection the package sends no
// Last-Event-ID (like a browser), so `lastEventId` goes in as the header through a
// custom fetch; the package's own header wins on its reconnects. Records message and gap
// events as { type, data, id }, and the Last-Event-ID of every request it makes.
function listen(path, { lastEventId } = {}) {
  const events = [];
  const requests = [];
  const es = new EventSource(srv.url + path, {
    fetch: (url, init) => {
      const headers = { ...(lastEventId === undefined ? {} : { 'Last-Event-ID': lastEventId }), ...init.headers };
      requests.push(headers['Last-Event-ID'] ?? null);
      return fetch(url, { ...init, headers });
    },
  });
  const record = (e) => events.push({ type: e.type, data: e.data, id: e.lastEventId });
  es.addEventListener('message', record);
  es.addEventListener('gap', record);
  const client = {
    es, events, requests,
    close() { es.close(); clients.delete(client); },
    // resolves once `n` events arrived; then checks that no more come for `quiet` ms
    async expect(n, what, quiet = 150) {
      await waitFor(() => events.length >= n, 5_000, `${what}: ${n} events (have ${JSON.stringify(events)})`);
      await sleep(quiet);
      assert.equal(events.length, n, `${what}: more events than expected: ${JSON.stringify(events)}`);
      return events;
    },
  };
  clients.add(client);
  return client;
}

const opened = (c) => waitFor(() => c.es.readyState === EventSource.OPEN, 5_000, 'connection open');
const gone = (channel, n = 0) => waitFor(async () => (await subscribers(channel)) === n, 5_000,
  `${channel}: ${n} subscribers`);
const msgs = (events) => events.map((e) => [e.type, e.data, e.id]);

test('a client resumes one channel: the missed events in order, once, then live ones', { timeout: 30_000 }, async () => {
  const c1 = listen('/fixed');
  await opened(c1);
  await gone('fixed', 1);
  const a1 = await publish('fixed', 'a1');
  const a2 = await publish('fixed', 'a2');
  const seq = (id) => id.split('-').map(Number);   // [epoch, n]
  assert.ok(seq(a2)[0] === seq(a1)[0] && seq(a2)[1] > seq(a1)[1], `ids increase: ${a1}, ${a2}`);
  assert.deepEqual(msgs(await c1.expect(2, 'live')), [['message', 'a1', a1], ['message', 'a2', a2]]);
  c1.close();
  await gone('fixed');

  const a3 = await publish('fixed', 'a3');
  const a4 = await publish('fixed', 'a4');

  // Last-Event-ID as a header
  const c2 = listen('/fixed', { lastEventId: a2 });
  assert.deepEqual(msgs(await c2.expect(2, 'replay')), [['message', 'a3', a3], ['message', 'a4', a4]]);
  await gone('fixed', 1);
  const a5 = await publish('fixed', 'a5');
  assert.deepEqual(msgs(await c2.expect(3, 'replay then live')).at(-1), ['message', 'a5', a5]);

  // ... or as the lastEventId query parameter (a page that stored the id)
  const c3 = listen(`/fixed?lastEventId=${a3}`);
  assert.deepEqual(msgs(await c3.expect(2, 'replay from the query')),
    [['message', 'a4', a4], ['message', 'a5', a5]]);

  // the newest id: nothing to replay, no gap; no id at all: live events only
  const c4 = listen('/fixed', { lastEventId: a5 });
  const c5 = listen('/fixed');
  await gone('fixed', 4);
  await c4.expect(0, 'nothing after the newest id');
  await c5.expect(0, 'a fresh client gets no replay');
  const a6 = await publish('fixed', 'a6');
  const live = [['message', 'a6', a6]];
  assert.deepEqual(msgs(await c2.expect(4, 'c2 live')).slice(3), live);
  assert.deepEqual(msgs(await c3.expect(3, 'c3 live')).slice(2), live);
  assert.deepEqual(msgs(await c4.expect(1, 'c4 live')), live);
  assert.deepEqual(msgs(await c5.expect(1, 'c5 live')), live);
  for (const c of [c2, c3, c4, c5]) c.close();
  await gone('fixed');
});

test('one Last-Event-ID resumes two channels, merged in publish order', { timeout: 30_000 }, async () => {
  const c1 = listen('/sub?channels=x,y');
  await opened(c1);
  await gone('y', 1);
  const x1 = await publish('x', 'x1');
  const y1 = await publish('y', 'y1');
  assert.deepEqual(msgs(await c1.expect(2, 'live')), [['message', 'x1', x1], ['message', 'y1', y1]]);
  c1.close();
  await gone('x');
  await gone('y');

  // interleaved publishes while away, y first
  const missed = [];
  for (const [ch, data] of [['y', 'y2'], ['x', 'x2'], ['x', 'x3'], ['y', 'y3']]) {
    missed.push(['message', data, await publish(ch, data)]);
  }
  const c2 = listen('/sub?channels=x,y', { lastEventId: y1 });
  assert.deepEqual(msgs(await c2.expect(4, 'replay of both')), missed);
  await gone('x', 1);
  const y4 = await publish('y', 'y4');
  const x4 = await publish('x', 'x4');
  assert.deepEqual(msgs(await c2.expect(6, 'then live')).slice(4),
    [['message', 'y4', y4], ['message', 'x4', x4]]);
  c2.close();
  await gone('x');
  await gone('y');
});

test('the client reconnects by itself after the server closes, and misses nothing', { timeout: 30_000 }, async () => {
  const c = listen('/sub?channels=r');
  await opened(c);
  await gone('r', 1);
  const r1 = await publish('r', 'r1');
  await c.expect(1, 'live');

  const closed = await fetch(`${srv.url}/close`, { method: 'POST' }).then((x) => x.json());
  assert.equal(closed.closed, 1);
  // published at once: the client is waiting retry (200 ms) to come back
  const r2 = await publish('r', 'r2');
  const r3 = await publish('r', 'r3');
  assert.deepEqual(msgs(await c.expect(3, 'after the reconnect')),
    [['message', 'r1', r1], ['message', 'r2', r2], ['message', 'r3', r3]]);
  assert.deepEqual(c.requests, [null, r1], 'the reconnect sent Last-Event-ID');
  const r4 = await publish('r', 'r4');
  assert.deepEqual(msgs(await c.expect(4, 'live again')).at(-1), ['message', 'r4', r4]);
  c.close();
});

test('an id older than the kept history gets a gap event first, then what is kept', { timeout: 30_000 }, async () => {
  const g1 = await publish('g', 'g1');
  const kept = [];
  for (let i = 2; i <= 2 + HISTORY; i++) kept.push(['message', `g${i}`, await publish('g', `g${i}`)]);
  // g2 is gone too now: history keeps the last HISTORY events
  const gone2 = kept.shift();

  const c = listen('/sub?channels=g', { lastEventId: g1 });
  const events = await c.expect(1 + HISTORY, 'gap then kept');
  assert.equal(events[0].type, 'gap');
  assert.deepEqual(JSON.parse(events[0].data), { channel: 'g', last_event_id: g1 });
  assert.deepEqual(msgs(events.slice(1)), kept);
  c.close();

  // right at the edge: the id of the last event dropped; nothing after it is missing
  const edge = listen('/sub?channels=g', { lastEventId: gone2[2] });
  assert.deepEqual(msgs(await edge.expect(HISTORY, 'no gap at the edge')), kept);
  edge.close();

  // an id this server never gave: the client cannot know what it missed
  const odd = listen('/sub?channels=g', { lastEventId: 'not-an-id' });
  await waitFor(() => odd.events.length >= 1, 5_000, 'an event for an unknown id');
  assert.equal(odd.events[0].type, 'gap');
  assert.deepEqual(JSON.parse(odd.events[0].data), { channel: 'g', last_event_id: 'not-an-id' });
  odd.close();

  // two channels, one of them short of history: a gap for that one only, then all kept
  // events of both in publish order
  const c2 = listen('/sub?channels=h,g', { lastEventId: g1 });
  const both = await c2.expect(1 + HISTORY, 'gap for g only');
  assert.deepEqual(JSON.parse(both[0].data), { channel: 'g', last_event_id: g1 });
  assert.deepEqual(msgs(both.slice(1)), kept);
  c2.close();
});
