// The chat example (examples/chat/) in real browsers: two pages see each other's messages
// and presence; a page whose connection is cut reconnects with Last-Event-ID and shows the
// messages it missed exactly once; a history too short shows a gap notice; bad input is 400.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startLua, launchBrowser, newPage, cleanup, waitFor } from './lib.mjs';

const CHAT = 'examples/chat/server.lua';
// A browser waits `retry` ms before it reconnects: the window in which the tests publish
// what a cut page must get back.
const RETRY = 1000;

let srv;
let browser;

before(async () => {
  srv = await startLua(CHAT, { RETRY: String(RETRY) });
  browser = await launchBrowser();
});
after(cleanup);

async function post(path, body, url = srv.url) {
  const res = await fetch(url + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, type: res.headers.get('content-type'), text, json };
}

const say = (room, user, text, url) => post(`/rooms/${room}/messages`, { user, text }, url);

// What a page shows, read from the DOM: per room, who is online and the log lines.
function view(page) {
  return page.evaluate(() => Object.fromEntries([...document.querySelectorAll('.room')].map((s) => [
    s.dataset.room, {
      online: [...s.querySelectorAll('.online li')].map((li) => li.textContent),
      messages: [...s.querySelectorAll('.log .msg')].map((li) => ({
        id: li.dataset.id,
        user: li.querySelector('.user').textContent,
        text: li.querySelector('.text').textContent,
        elements: li.querySelectorAll('*').length,
      })),
      system: [...s.querySelectorAll('.log .sys')].map((li) => li.textContent),
      notices: [...s.querySelectorAll('.log .notice')].map((li) => li.textContent),
    }])));
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

const state = (page) => page.locator('#state').textContent();

async function open(url, beforeGoto) {
  const page = await newPage(browser);
  if (beforeGoto) beforeGoto(page);
  await page.goto(url);
  return page;
}

test('two pages in one room see each other\'s messages and presence', { timeout: 60_000 }, async () => {
  // ann joins through the form, bob through a link with ?user=&topics=
  const ann = await open(`${srv.url}/`);
  await ann.fill('#user', 'ann');
  await ann.fill('#topics', 'lobby');
  await ann.click('#join button');
  await waitFor(async () => (await state(ann)) === 'connected as ann', 5_000, 'ann connected');
  await until(ann, (v) => v.lobby?.online.includes('ann'), 'ann sees herself online');

  const bob = await open(`${srv.url}/?user=bob&topics=lobby`);
  await until(bob, (v) => v.lobby?.online.join() === 'ann,bob', 'bob sees ann and himself online');
  await until(ann, (v) => v.lobby.online.join() === 'ann,bob' && v.lobby.system.includes('bob joined'),
    'ann sees bob join');

  // Each posts through the page's form; the other sees it, as text (no HTML injection).
  await ann.fill('#text', 'hello from ann');
  await ann.click('#post button');
  const tricky = '<b>bold</b> & <img src=x onerror="window.pwned=1"> "quotes"\nsecond line';
  await bob.fill('#text', tricky.replace('\n', ' '));   // an <input> has no newline
  await bob.click('#post button');
  const ok = (v) => v.lobby.messages.length === 2;
  const seenByBob = await until(bob, ok, 'bob sees both messages');
  const seenByAnn = await until(ann, ok, 'ann sees both messages');
  for (const v of [seenByAnn, seenByBob]) {
    assert.deepEqual(v.lobby.messages.map((m) => [m.user, m.text]),
      [['ann', 'hello from ann'], ['bob', tricky.replace('\n', ' ')]]);
    assert.ok(v.lobby.messages.every((m) => m.elements === 2), 'a message is two text spans, nothing more');
    // app-assigned ids are "<epoch>-<n>": the same epoch, increasing n
    const seq = (id) => id.split('-').map(Number);
    const [e0, n0] = seq(v.lobby.messages[0].id), [e1, n1] = seq(v.lobby.messages[1].id);
    assert.ok(e0 === e1 && n0 < n1, `ids increase: ${v.lobby.messages[0].id}, ${v.lobby.messages[1].id}`);
  }
  assert.equal(await ann.evaluate(() => window.pwned), undefined);
  assert.equal(await bob.evaluate(() => window.pwned), undefined);
  assert.equal(await bob.inputValue('#text'), '', 'the form is cleared after a 201');

  // A message posted over HTTP (with a newline) reaches both pages as is.
  const r = await say('lobby', 'carol', 'multi\nline');
  assert.equal(r.status, 201, r.text);
  await until(ann, (v) => v.lobby.messages.some((m) => m.id === r.json.id && m.text === 'multi\nline'),
    'ann sees the HTTP message');

  // The server knows who is online.
  const users = await fetch(`${srv.url}/rooms/lobby/users`).then((x) => x.json());
  assert.deepEqual(users, { room: 'lobby', online: { ann: 1, bob: 1 } });

  // bob closes his window: ann sees him leave, at once.
  await bob.context().close();
  await until(ann, (v) => v.lobby.online.join() === 'ann' && v.lobby.system.includes('bob left'),
    'ann sees bob leave', 5_000);
  assert.deepEqual(ann.errors, []);
  await ann.context().close();
});

test('a page cut off server-side gets back exactly the messages it missed', { timeout: 60_000 }, async () => {
  const subscribes = [];   // the page's requests to the stream, with when and their headers
  const page = await open(`${srv.url}/?user=dave&topics=news,random`, (p) => p.on('request', async (req) => {
    if (req.url().includes('/sse/subscribe')) {
      const entry = { at: Date.now() };
      subscribes.push(entry);
      entry.headers = await req.allHeaders();
    }
  }));
  await waitFor(async () => (await state(page)) === 'connected as dave', 5_000, 'dave connected');
  await until(page, (v) => v.news?.online.includes('dave') && v.random?.online.includes('dave'), 'dave online');

  const before = [];
  for (const [room, text] of [['news', 'one'], ['random', 'two'], ['news', 'three']]) {
    const r = await say(room, 'eve', text);
    assert.equal(r.status, 201, r.text);
    before.push(r.json.id);
  }
  await until(page, (v) => v.news.messages.length === 2 && v.random.messages.length === 1, 'live messages');

  // Cut the connection, then publish at once: the browser is waiting `retry` ms to come back.
  const kick = await post('/admin/kick?user=dave', '');
  assert.equal(kick.status, 200, kick.text);
  assert.deepEqual(kick.json, { kicked: 1 });
  const missed = [];
  for (const [room, text] of [['random', 'four'], ['news', 'five'], ['random', 'six'], ['news', 'seven']]) {
    const r = await say(room, 'eve', text);
    assert.equal(r.status, 201, r.text);
    missed.push({ room, text, id: r.json.id });
  }
  const publishedAt = Date.now();

  const v = await until(page, (w) => w.news.messages.length >= 4 && w.random.messages.length >= 3,
    'the missed messages after the reconnect');
  await new Promise((r) => setTimeout(r, 300));   // anything extra (a duplicate) would show by now
  const after = await view(page);

  // It reconnected once, with the id of the last message it had, after they were published.
  assert.equal(subscribes.length, 2, `stream requests: ${JSON.stringify(subscribes)}`);
  assert.equal(subscribes[1].headers['last-event-id'], before.at(-1));
  assert.ok(subscribes[1].at >= publishedAt, 'the page reconnected before the messages were published');

  // Every message exactly once, in order, in its own room.
  const ids = (room) => after[room].messages.map((m) => m.id);
  const want = (room, earlier) => [...earlier, ...missed.filter((m) => m.room === room).map((m) => m.id)];
  assert.deepEqual(ids('news'), want('news', [before[0], before[2]]));
  assert.deepEqual(ids('random'), want('random', [before[1]]));
  assert.deepEqual(after.news.messages.map((m) => m.text), ['one', 'three', 'five', 'seven']);
  assert.deepEqual(after.random.messages.map((m) => m.text), ['two', 'four', 'six']);
  assert.deepEqual(v.news.notices, [], 'no gap: the history kept everything');
  // The server sent nothing twice (the page would have logged a duplicate it dropped).
  assert.deepEqual(page.logs.filter((l) => l.includes('duplicate')), []);
  // Back online, in both rooms.
  assert.match(await state(page), /^connected as dave$/);
  assert.ok(after.news.online.includes('dave') && after.random.online.includes('dave'));
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('a page that missed more than the history keeps is told about the gap', { timeout: 60_000 }, async () => {
  const small = await startLua(CHAT, { RETRY: String(RETRY), HISTORY: '2' });
  const page = await open(`${small.url}/?user=fay&topics=lobby`);
  await waitFor(async () => (await state(page)) === 'connected as fay', 5_000, 'fay connected');
  const first = await say('lobby', 'gus', 'before', small.url);
  await until(page, (v) => v.lobby.messages.length === 1, 'the first message');

  assert.deepEqual((await post('/admin/kick?user=fay', '', small.url)).json, { kicked: 1 });
  const missed = [];
  for (const text of ['m1', 'm2', 'm3', 'm4']) missed.push((await say('lobby', 'gus', text, small.url)).json.id);

  const v = await until(page, (w) => w.lobby.messages.length >= 3 && w.lobby.notices.length === 1,
    'the gap notice and the kept messages');
  assert.match(v.lobby.notices[0], /no longer kept/);
  // After the notice, what the room still keeps (its last 2 events: fay's own leave, m1
  // and m2 are gone); nothing twice.
  const ids = v.lobby.messages.map((m) => m.id);
  assert.equal(ids[0], first.json.id);
  assert.deepEqual(ids.slice(1), missed.slice(-2));
  await page.context().close();
  await small.stop();
});

test('bad requests get 400 with a clear message', { timeout: 30_000 }, async () => {
  const long = (n) => 'x'.repeat(n);
  const cases = [
    ['not JSON', 'hello', /JSON object/],
    ['a JSON array', '[1,2]', /JSON object/],
    ['a JSON string', '"hi"', /JSON object/],
    ['null', 'null', /JSON object/],
    ['no user', { text: 'hi' }, /'user'/],
    ['user not a string', { user: 42, text: 'hi' }, /'user'/],
    ['user empty', { user: '', text: 'hi' }, /'user'/],
    ['user too long', { user: long(33), text: 'hi' }, /'user'/],
    ['user with a space', { user: 'a b', text: 'hi' }, /'user'/],
    ['user with a newline', { user: 'a\nb', text: 'hi' }, /'user'/],
    ['no text', { user: 'ann' }, /'text'/],
    ['text not a string', { user: 'ann', text: ['hi'] }, /'text'/],
    ['text null', { user: 'ann', text: null }, /'text'/],
    ['text empty', { user: 'ann', text: '' }, /'text'.*1 to 2000/],
    ['text too long', { user: 'ann', text: long(2001) }, /'text'.*1 to 2000/],
  ];
  for (const [what, body, message] of cases) {
    const r = await post('/rooms/lobby/messages', body);
    assert.equal(r.status, 400, `${what}: ${r.status} ${r.text}`);
    assert.match(r.type, /^application\/json/, what);
    assert.match(r.json?.error ?? '', message, `${what}: ${r.text}`);
  }
  // the limits themselves are fine (2000 characters, not bytes)
  assert.equal((await say('lobby', long(32), long(2000))).status, 201);
  assert.equal((await say('lobby', 'ann', 'é'.repeat(2000))).status, 201);
  const r = await say('lobby', 'ann', 'ok');
  assert.equal(r.status, 201);
  assert.match(r.json.id, /^\d+-\d+$/);

  const badRoom = await say('no%20spaces', 'ann', 'hi');
  assert.equal(badRoom.status, 400);
  assert.match(badRoom.json.error, /room/);

  // the stream refuses bad names and topic lists before it starts
  const subscribe = [
    ['?topics=lobby', /'user'/],
    [`?user=${long(33)}&topics=lobby`, /'user'/],
    ['?user=ann', /'topics'/],
    ['?user=ann&topics=', /'topics'/],
    ['?user=ann&topics=a,,b', /'topics'/],
    ['?user=ann&topics=a%20b', /'topics'/],
    [`?user=ann&topics=${Array.from({ length: 11 }, (_, i) => `r${i}`).join(',')}`, /at most 10/],
  ];
  for (const [query, message] of subscribe) {
    const res = await fetch(`${srv.url}/sse/subscribe${query}`, { signal: AbortSignal.timeout(5_000) });
    const text = await res.text();
    assert.equal(res.status, 400, `${query}: ${res.status} ${text}`);
    assert.match(JSON.parse(text).error, message, query);
  }
  const kick = await post('/admin/kick', '');
  assert.equal(kick.status, 400);
  assert.match(kick.json.error, /'user'/);
});
