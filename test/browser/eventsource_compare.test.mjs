// app:eventsource against two reference clients: for every odd framing the Node server
// test/servers/oddframes.mjs sends (CR, CRLF, mixed line ends, a BOM, one byte per write,
// a UTF-8 character cut by a chunk boundary, comments, retry:, an id with NUL, an
// unterminated last event, a drop mid-event, 204, 500, a wrong Content-Type, event names,
// multi-line and empty data), three clients read the same route:
//   (a) app:eventsource in lua5.4 (this checkout's lua/ and build/lib), printing JSON lines;
//   (b) the npm `eventsource` package in this process;
//   (c) headless Chromium's EventSource, on a page of the same server.
// Each is stopped when its first connection ends, so reconnect policies do not matter.
// app:eventsource and Chromium must agree exactly: whether the connection opened, the
// events (type, data, lastEventId) in order, and how it ended ("reconnecting" after a drop,
// "closed" for good). The npm package must agree with them too, except where it departs
// from the WHATWG rules (three ways, each checked as such below, so a fixed release shows):
//   - its MessageEvent.lastEventId is the event's own id: field, "" when the event had
//     none, instead of the last event id in force (which it does keep, and send on
//     reconnect); so its lastEventId is compared only where it is not "";
//   - a CR that is the very last byte of the stream is held as a possible CRLF half and
//     never taken as a line end, so an event whose blank line is that CR is lost;
//   - an id: line in a block with no data (id: 2, then a blank line) does not change the
//     last event id it sends as Last-Event-ID (the spec sets it at every blank line).
// Then the same for whole sequences of connections (test/servers/oddframes.mjs SEQUENCES):
// what is kept across reconnects (the last event id, retry), and the Last-Event-ID sent.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { EventSource } from 'eventsource';
import { ROOT, launchBrowser, newPage, cleanup, waitFor, sleep } from './lib.mjs';
import { start, ROUTES, SEQUENCES } from '../servers/oddframes.mjs';

const WAIT = 15_000;   // per client and route: generous, the machine is shared
let srv;
let browser;
let page;
const NAMES = ['message', ...new Set(Object.values(ROUTES).flatMap((r) => r.names || []))];

before(async () => {
  srv = await start(0);
  browser = await launchBrowser();
  page = await newPage(browser);
  await page.goto(srv.url + '/', { timeout: 10_000 });
});
after(async () => {
  await cleanup();
  if (srv) await srv.close();
});

// (a) The Lua client. It runs with its real reconnect policy; in "first" mode the main loop
// stops it once its first connection has ended (the source is back to "connecting" after
// being open); otherwise it runs until the source closed for good.
const LUA_CLIENT = String.raw`
local cjson = require("cjson")
local sse = require("sse")
local app = sse.app({ log = false })
local function emit(t) io.write(cjson.encode(t), "\n") io.stdout:flush() end
local src = app:eventsource(arg[1])
local opened, done = false, false
app:spawn(function()
  local ok = src:connect()
  opened = ok == true
  emit({ open = opened })
  while true do
    local ev, err = src:next()
    if not ev then
      emit({ ["end"] = "closed", err = err, http_status = src.http_status or cjson.null })
      break
    end
    emit({ type = ev.event, data = ev.data, id = ev.id })
  end
  done = true
end)
local first_only = arg[2] == "first"
while not done do
  app:step(0.01)
  if first_only and opened and src.status == "connecting" then
    emit({ ["end"] = "reconnecting", http_status = src.http_status })
    break
  end
end
`;

async function runLua(url, mode = 'first') {
  const proc = spawn('lua5.4', ['-', url, mode], {
    cwd: ROOT,
    env: {
      ...process.env,
      LUA_PATH: `${ROOT}/lua/?.lua;${ROOT}/lua/?/init.lua;;`,
      LUA_CPATH: `${ROOT}/build/lib/?.so;;`,
    },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  let exited = false;
  proc.stdout.setEncoding('utf8');
  proc.stderr.setEncoding('utf8');
  proc.stdout.on('data', (s) => { out += s; });
  proc.stderr.on('data', (s) => { err += s; });
  proc.once('exit', () => { exited = true; });
  proc.stdin.end(LUA_CLIENT);
  try {
    await waitFor(() => exited, WAIT, `lua client on ${url} (output: ${out}${err})`);
  } finally {
    if (!exited) proc.kill('SIGKILL');
  }
  const r = { opened: null, events: [], end: null, detail: null };
  for (const line of out.split('\n').filter(Boolean)) {
    const j = JSON.parse(line);
    if ('open' in j) r.opened = j.open;
    else if ('end' in j) { r.end = j.end; r.detail = j; }
    else r.events.push({ type: j.type, data: j.data, id: j.id });
  }
  assert.ok(r.end, `lua client on ${url} did not end properly:\n${out}\n${err}`);
  return r;
}

// (b) The npm package.
async function runNpm(url, mode = 'first') {
  const r = { opened: false, events: [], end: null };
  const es = new EventSource(url);
  for (const n of NAMES) {
    es.addEventListener(n, (e) => { if (!r.end) r.events.push({ type: e.type, data: e.data, id: e.lastEventId }); });
  }
  es.onopen = () => { r.opened = true; };
  es.onerror = () => {
    if (r.end) return;
    if (mode !== 'first' && es.readyState !== EventSource.CLOSED) return;   // it reconnects
    r.end = es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting';
    es.close();
  };
  try {
    await waitFor(() => r.end, WAIT, `npm eventsource on ${url}`);
  } finally {
    es.close();
  }
  return r;
}

// (c) Chromium, on a page of the same server.
async function runChromium(url, key, mode = 'first') {
  await page.evaluate(({ url, names, key, mode }) => {
    const r = { opened: false, events: [], end: null };
    (window.__runs ||= {})[key] = r;
    const es = new EventSource(url);
    for (const n of names) {
      es.addEventListener(n, (e) => { if (!r.end) r.events.push({ type: e.type, data: e.data, id: e.lastEventId }); });
    }
    es.onopen = () => { r.opened = true; };
    es.onerror = () => {
      if (r.end) return;
      if (mode !== 'first' && es.readyState !== EventSource.CLOSED) return;   // it reconnects
      r.end = es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting';
      es.close();
    };
  }, { url, names: NAMES, key, mode });
  return waitFor(async () => {
    const r = await page.evaluate((key) => window.__runs[key], key);
    return r.end ? r : null;
  }, WAIT, `chromium on ${url}`, 25);
}

async function requestLog(route, key) {
  const q = `route=${encodeURIComponent(route)}${key ? `&key=${encodeURIComponent(key)}` : ''}`;
  const res = await fetch(`${srv.url}/count?${q}`, { signal: AbortSignal.timeout(5_000) });
  return res.json();
}
const requests = async (route) => (await requestLog(route)).count;

const view = (r) => ({ opened: r.opened, events: r.events, end: r.end });

// The npm package's view, compared with Chromium's: lastEventId only where it gave one
// (see the top of this file).
function npmAgrees(npm, chromium) {
  const ev = npm.events.map((e, i) => ({
    ...e, id: e.id === '' && chromium.events[i] ? chromium.events[i].id : e.id,
  }));
  return { ...view(npm), events: ev };
}
// Where the npm package is known to differ: what it gives instead, from Chromium's events.
const NPM_DEVIATIONS = {
  cr_at_end: (events) => events.slice(0, -1),   // the final CR is not a line end for it
};
// ... and the Last-Event-ID headers it sends, from Chromium's.
const NPM_HEADER_DEVIATIONS = {
  ids: (log) => log.map((id, i) => (i === 2 ? '1' : id)),   // "id: 2" alone was not taken
};

// What a browser must dispatch, written out by hand for the routes where getting it wrong
// is easiest (all three clients must also agree with each other on every route).
const m = (data, id = '', type = 'message') => ({ type, data, id });
const EXPECT = {
  lf: { events: [m('a'), m('b', '1')] },
  crlf: { events: [m('a'), m('b\nc', '1')] },
  cr: { events: [m('a'), m('b\nc', '1')] },
  cr_at_end: { events: [m('a'), m('b')] },
  mixed: { events: [m('a\nb\nc'), m('d', '', 'x'), m('e\nf'), m('g'), m('h')] },
  bom: { events: [m('a'), m('c')] },
  bom_split: { events: [m('a')] },
  bom_twice: { events: [m('b')] },
  one_byte_writes: { events: [m('h\u00e9\n\u{1F600}', '7', 'ping'), m('z', '7'), m('y')] },
  utf8_split: { events: [m('caf\u00e9 \u2713 \u{1F600}'), m('x', '', '\u2713')] },
  comments: { events: [m('a\nb')] },
  retry: { events: [m('a'), m('b'), m('c')] },
  id_nul: { events: [m('a', '1'), m('b', '1'), m('c', '3'), m('d'), m('e', ' 5 '), m('f', '6')] },
  unterminated: { events: [m('a')] },
  unterminated_no_eol: { events: [m('a', '1')] },
  drop_mid_event: { events: [m('a')] },
  drop_mid_line: { events: [m('a', '9'), m('b', '9')] },
  names: {
    events: [m('1', '', 'ping'), m('2', '', 'update'), m('3'), m('4'), m('5'), m('6', '', 'two words'),
      m('7', '', 'update')],
  },
  multiline: { events: [m('line1\nline2\n\n two spaces\n\ttab'), m('a\n'), m('no space\nx:y: z')] },
  empty: { events: [m(''), m(''), m(''), m('\n'), m('end')] },
  fields: { events: [m(''), m('d')] },
};
const FATAL = new Set(['status204', 'status500', 'wrong_type', 'no_type']);

for (const name of Object.keys(ROUTES)) {
  test(`odd framing "${name}": app:eventsource, npm eventsource and Chromium dispatch the same`, { timeout: 60_000 }, async () => {
    const route = `odd/${name}`;
    const url = `${srv.url}/${route}`;
    const before = await requests(route);
    const [lua, npm, chromium] = await Promise.all([
      runLua(url), runNpm(url), runChromium(url, name),
    ]);
    const show = () => JSON.stringify({ lua: view(lua), npm: view(npm), chromium: view(chromium), lua_end: lua.detail })
      .replace(/},{/g, '},\n{');
    assert.deepEqual(view(lua), view(chromium), `lua vs chromium on ${name}: ${show()}`);
    const want = NPM_DEVIATIONS[name]
      ? { ...view(chromium), events: NPM_DEVIATIONS[name](chromium.events) } : view(chromium);
    assert.deepEqual(npmAgrees(npm, want), want, `npm vs chromium on ${name}: ${show()}`);
    if (FATAL.has(name)) {
      assert.deepEqual(view(chromium), { opened: false, events: [], end: 'closed' }, show());
      assert.match(lua.detail.err, name === 'status204' ? /204/ : name === 'status500' ? /HTTP 500/ : /Content-Type/);
    } else {
      assert.equal(chromium.opened, true, show());
      assert.equal(chromium.end, 'reconnecting', show());
    }
    if (EXPECT[name]) assert.deepEqual(chromium.events, EXPECT[name].events, show());
    // one request per client: none of them reconnected before it was stopped
    assert.equal(await requests(route) - before, 3, `requests to ${route}`);
  });
}

for (const name of Object.keys(SEQUENCES)) {
  test(`connection sequence "${name}": the three keep the same across reconnects and send the same Last-Event-ID`, { timeout: 60_000 }, async () => {
    const route = `seq/${name}`;
    const url = (who) => `${srv.url}/${route}?key=${who}`;
    const [lua, npm, chromium] = await Promise.all([
      runLua(url('lua'), 'all'), runNpm(url('npm'), 'all'), runChromium(url('chromium'), `seq-${name}`, 'all'),
    ]);
    const show = () => JSON.stringify({ lua: view(lua), npm: view(npm), chromium: view(chromium) });
    assert.deepEqual(view(lua), view(chromium), `lua vs chromium: ${show()}`);
    assert.deepEqual(npmAgrees(npm, chromium), view(chromium), `npm vs chromium: ${show()}`);
    assert.equal(chromium.end, 'closed');
    // every body, then the 204, and nothing after it (over ten times the last retry)
    await sleep(500);
    const logs = {};
    for (const who of ['lua', 'npm', 'chromium']) {
      logs[who] = (await requestLog(route, who)).requests.map((r) => r.lastEventId);
      assert.equal(logs[who].length, SEQUENCES[name].length + 1, `${who}: ${JSON.stringify(logs)}`);
    }
    assert.deepEqual(logs.lua, logs.chromium, JSON.stringify(logs));
    const npmWant = NPM_HEADER_DEVIATIONS[name] ? NPM_HEADER_DEVIATIONS[name](logs.chromium) : logs.chromium;
    assert.deepEqual(logs.npm, npmWant, JSON.stringify(logs));
    // the retry in force is kept across connections: 200 ms from the first one until the
    // third sets 50 (generous bounds: only that no client hurried)
    if (name === 'retry') {
      for (const who of ['lua', 'npm', 'chromium']) {
        const at = (await requestLog(route, who)).requests.map((r) => r.at);
        assert.ok(at[1] - at[0] >= 150 && at[2] - at[1] >= 150, `${who}: requests at ${at.map((t) => t - at[0])} ms`);
      }
    }
    if (name === 'ids') {
      assert.deepEqual(chromium.events.map((e) => [e.data, e.id]),
        [['a', '1'], ['b', '1'], ['c', '2'], ['d', ''], ['e', '']]);
      assert.deepEqual(logs.chromium, [null, '1', '2', null, null]);
    }
  });
}
