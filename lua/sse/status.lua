-- The status page (app:status_page(path)): one self-contained HTML page at `path` (inline
-- CSS and JS; it loads nothing from anywhere else) fed by a stream of its own at
-- `path .. "/events"` carrying app:stats() once a second.
--
-- What a viewer costs: one timer per app samples the figures once a second, computes the
-- rates from the counters' deltas and encodes them to JSON once; each open page then gets
-- that text as one `stats` event (a copy into its queue, no Lua per viewer but the send).
-- The timer starts with the first page and stops at the first tick that finds no page
-- open (so a reload keeps the last minute of samples, which a page that opens gets first
-- as one `history` event). The page's own stream is one stream among the others: it adds
-- one event a second per open page to the figures.
--
-- Events (no ids: a page that reconnects just takes the current figures again):
--   history  [[t, connections, streams, events/s, bytes/s], ...]  the last minute, oldest first
--   stats    { uptime, worker, viewers, connections, streams, subscribers,
--              channels, events_sent, bytes_sent, heartbeats, dropped_slow, publishes,
--              requests, streams_started, rate = { events, bytes, publishes } (per second,
--              over the last tick; absent until there has been one),
--              channel_list = [{ name, subscribers, publishes, history, rate }] (the
--              MAX_CHANNELS with the most subscribers) }
local cjson = require("cjson")

local M = {}

local HISTORY = 60        -- samples kept (one a second): the charts' minute
local MAX_CHANNELS = 100  -- channels listed in a sample, most subscribers first

local floor, sort, concat = math.floor, table.sort, table.concat

local function round(x, places)
  local m = 10 ^ places
  return floor(x * m + 0.5) / m
end

-- The figures now, as the stats event's table; rates (this process's, per second, over
-- the last tick) from state.rate and state.channel_rate when there has been a tick.
local function payload(app, state, st)
  local chans = {}
  for i, c in ipairs(st.channel_list) do
    chans[i] = { name = c.name, subscribers = c.subscribers, publishes = c.publishes,
                 history = c.history, rate = state.channel_rate[c.name] }
  end
  sort(chans, function(a, b)
    if a.subscribers ~= b.subscribers then return a.subscribers > b.subscribers end
    return a.name < b.name
  end)
  for i = #chans, MAX_CHANNELS + 1, -1 do chans[i] = nil end
  return {
    uptime = round(st.uptime, 3), worker = app.worker,
    viewers = state.count,
    connections = st.connections, streams = st.streams, subscribers = st.subscribers,
    channels = st.channels, events_sent = st.events_sent, bytes_sent = st.bytes_sent,
    heartbeats = st.heartbeats, dropped_slow = st.dropped_slow, publishes = st.publishes,
    requests = st.requests, streams_started = st.streams_started,
    rate = state.rate, channel_list = chans,
  }
end

-- One second's sample: the rates from the counters' deltas since the previous one, kept
-- in the history, sent to every open page.
local function tick(app, state)
  local st = app:stats()
  local prev = state.prev
  local dt = prev and st.uptime - prev.uptime or 0
  if dt > 0 then
    state.rate = {
      events = round((st.events_sent - prev.events_sent) / dt, 1),
      bytes = round((st.bytes_sent - prev.bytes_sent) / dt, 0),
      publishes = round((st.publishes - prev.publishes) / dt, 1),
    }
    local rates = {}
    for _, c in ipairs(st.channel_list) do
      local before = prev.channels[c.name]
      if before then rates[c.name] = round((c.publishes - before) / dt, 1) end
    end
    state.channel_rate = rates
  end
  local channels = {}
  for _, c in ipairs(st.channel_list) do channels[c.name] = c.publishes end
  state.prev = { uptime = st.uptime, events_sent = st.events_sent, bytes_sent = st.bytes_sent,
                 publishes = st.publishes, channels = channels }
  if state.rate then
    local h = state.history
    h[#h + 1] = { round(st.uptime, 3), st.connections, st.streams, state.rate.events, state.rate.bytes }
    if #h > HISTORY then table.remove(h, 1) end
  end
  return st
end

local function start(app, state)
  tick(app, state)   -- the counters' starting point: the first rates come a second later
  state.timer = app:every(1, function(timer)
    if state.count == 0 then   -- nobody watches: stop, forget
      timer:cancel()
      state.timer, state.prev, state.rate = nil, nil, nil
      state.channel_rate, state.history = {}, {}
      return
    end
    local data = cjson.encode(payload(app, state, tick(app, state)))
    for stream in pairs(state.viewers) do
      stream:send({ event = "stats", data = data })
    end
  end)
end

local PAGE = [==[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>lua-sse status</title>
<link rel="icon" href="data:,">
<style>
:root {
  --bg: #f5f6f8; --card: #ffffff; --fg: #1b2130; --muted: #687086; --line: #e2e5eb;
  --c-connections: #2f6fde; --c-streams: #0f9b72; --c-eps: #d46b08; --c-bps: #8a4fd8;
  --ok: #1e9b55; --warn: #c98a00; --bad: #d03b3b; --bar: rgba(47, 111, 222, .14);
  color-scheme: light;
}
:root[data-theme=dark] {
  --bg: #0f1218; --card: #171b23; --fg: #e6e9ef; --muted: #8d95a8; --line: #262c37;
  --c-connections: #6ea0ff; --c-streams: #34d39e; --c-eps: #ffa24d; --c-bps: #b68cff;
  --ok: #3ecf7a; --warn: #f0b429; --bad: #ff6b6b; --bar: rgba(110, 160, 255, .16);
  color-scheme: dark;
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body {
  margin: 0; padding: 24px clamp(12px, 4vw, 40px) 32px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Ubuntu, sans-serif;
}
.num, .value, td.n, dd { font-variant-numeric: tabular-nums; }
header { display: flex; flex-wrap: wrap; align-items: baseline; justify-content: space-between; gap: 8px 24px;
  margin-bottom: 20px; }
h1 { display: inline; margin: 0; font-size: 22px; font-weight: 650; letter-spacing: -.01em; }
h1 span { color: var(--muted); font-weight: 400; }
#where { color: var(--muted); margin-left: 10px; font-size: 13px; }
.meta { display: flex; gap: 14px; align-items: center; color: var(--muted); font-size: 13px; }
.meta b { color: var(--fg); font-weight: 600; }
.pill { display: inline-flex; align-items: center; gap: 6px; padding: 2px 10px; border-radius: 999px;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); font-size: 12px; }
#state::before { content: ""; width: 8px; height: 8px; border-radius: 50%; background: var(--warn); }
#state.live::before { background: var(--ok); box-shadow: 0 0 0 3px color-mix(in srgb, var(--ok) 25%, transparent); }
#state.down::before { background: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(210px, 1fr)); gap: 14px; }
.card, .panel { background: var(--card); border: 1px solid var(--line); border-radius: 10px; }
.card { padding: 14px 16px 10px; min-width: 0; }
.card h2, .panel h2 { margin: 0; font-size: 12px; font-weight: 600; color: var(--muted);
  text-transform: uppercase; letter-spacing: .06em; }
.card .value { font-size: 30px; font-weight: 650; line-height: 1.15; margin-top: 4px; color: var(--c); }
.card .sub { color: var(--muted); font-size: 12px; min-height: 1.45em; display: flex;
  justify-content: space-between; gap: 8px; }
.card svg { display: block; width: 100%; height: 64px; margin-top: 6px; overflow: visible; }
.card .line { fill: none; stroke: var(--c); stroke-width: 1.75; stroke-linejoin: round; stroke-linecap: round; }
.card .area { fill: var(--c); opacity: .12; stroke: none; }
:root[data-theme=dark] .card .area { opacity: .2; }
.card .base { stroke: var(--line); stroke-width: 1; }
.card .dot { fill: var(--c); }
.card[data-key=connections] { --c: var(--c-connections); }
.card[data-key=streams] { --c: var(--c-streams); }
.card[data-key=eps] { --c: var(--c-eps); }
.card[data-key=bps] { --c: var(--c-bps); }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 0;
  margin: 14px 0; padding: 4px 0; }
.figures div { padding: 8px 16px; border-left: 1px solid var(--line); }
.figures div:first-child { border-left: 0; }
dt { color: var(--muted); font-size: 12px; }
dd { margin: 0; font-size: 18px; font-weight: 600; }
dd.bad { color: var(--bad); }
.panel { padding: 14px 16px; }
.panel h2 span { text-transform: none; letter-spacing: 0; font-weight: 400; }
table { width: 100%; border-collapse: collapse; margin-top: 8px; }
th { text-align: left; font-weight: 500; color: var(--muted); font-size: 12px; padding: 6px 10px;
  border-bottom: 1px solid var(--line); }
td { padding: 6px 10px; border-bottom: 1px solid var(--line); }
tr:last-child td { border-bottom: 0; }
th.n, td.n { text-align: right; white-space: nowrap; }
td.name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  overflow-wrap: anywhere; }
td.subs { position: relative; width: 28%; }
td.subs .bar { position: absolute; left: 0; top: 5px; bottom: 5px; background: var(--bar); border-radius: 3px; }
td.subs span:last-child { position: relative; }
.none { color: var(--muted); margin: 10px 0 2px; }
footer { color: var(--muted); font-size: 12px; margin-top: 16px; }
</style>
</head>
<body>
<header>
  <div><h1>lua-sse <span>status</span></h1><span id="where"></span></div>
  <div class="meta">
    <span id="state" class="pill">connecting</span>
    <span id="worker" class="pill" hidden></span>
    <span>up <b id="uptime">–</b></span>
  </div>
</header>
<section class="cards">
  <article class="card" data-key="connections"><h2>Connections</h2><div class="value" id="connections">–</div>
    <div class="sub"><span id="connections-sub"></span><span id="connections-peak"></span></div>
    <svg id="chart-connections" aria-hidden="true"></svg></article>
  <article class="card" data-key="streams"><h2>Streams</h2><div class="value" id="streams">–</div>
    <div class="sub"><span id="streams-sub"></span><span id="streams-peak"></span></div>
    <svg id="chart-streams" aria-hidden="true"></svg></article>
  <article class="card" data-key="eps"><h2>Events / s</h2><div class="value" id="eps">–</div>
    <div class="sub"><span id="eps-sub"></span><span id="eps-peak"></span></div>
    <svg id="chart-eps" aria-hidden="true"></svg></article>
  <article class="card" data-key="bps"><h2>Bytes / s</h2><div class="value" id="bps">–</div>
    <div class="sub"><span id="bps-sub"></span><span id="bps-peak"></span></div>
    <svg id="chart-bps" aria-hidden="true"></svg></article>
</section>
<dl class="figures panel">
  <div><dt>Subscribers</dt><dd id="subscribers">–</dd></div>
  <div><dt>Channels</dt><dd id="channels">–</dd></div>
  <div><dt>Publishes / s</dt><dd id="pps">–</dd></div>
  <div><dt>Dropped clients</dt><dd id="dropped">–</dd></div>
  <div><dt>Streams started</dt><dd id="started">–</dd></div>
  <div><dt>Heartbeats</dt><dd id="heartbeats">–</dd></div>
</dl>
<section class="panel">
  <h2>Channels <span id="channel-count"></span></h2>
  <table id="channel-table" hidden>
    <thead><tr><th>channel</th><th class="n">subscribers</th><th class="n">publishes / s</th>
      <th class="n">publishes</th><th class="n">history</th></tr></thead>
    <tbody></tbody>
  </table>
  <p class="none" id="no-channels">No channels.</p>
</section>
<footer>This process's figures (app:stats()), once a second; the charts show the last minute.
  This page's own stream is counted among the streams.</footer>
<script>
(() => {
  'use strict';
  const EVENTS = __EVENTS__;
  const WINDOW = 60;        // seconds the charts show
  const root = document.documentElement;
  const params = new URLSearchParams(location.search);
  const dark = matchMedia('(prefers-color-scheme: dark)');
  const theme = () => { root.dataset.theme = params.get('theme') || (dark.matches ? 'dark' : 'light'); };
  theme();
  dark.addEventListener('change', theme);

  const $ = (id) => document.getElementById(id);
  $('where').textContent = location.host;
  const nf = new Intl.NumberFormat('en');
  const count = (v) => nf.format(v);
  const si = (v) => {
    const a = Math.abs(v);
    for (const [d, p] of [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) {
      if (a >= d) { const x = v / d; return [Math.abs(x) < 10 ? x.toFixed(1) : String(Math.round(x)), p]; }
    }
    return [a < 10 && v % 1 ? v.toFixed(1) : String(Math.round(v)), ''];
  };
  const rate = (v) => si(v).join('');
  const bytes = (v) => { const [x, p] = si(v); return `${x} ${p}B`; };
  const bps = (v) => bytes(v) + '/s';
  const two = (n) => String(n).padStart(2, '0');
  const duration = (s) => {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
    if (d) return `${d}d ${h}h ${two(m)}m`;
    if (h) return `${h}h ${two(m)}m ${two(x)}s`;
    if (m) return `${m}m ${two(x)}s`;
    return `${x}s`;
  };
  const set = (id, v, fmt) => {
    const el = $(id);
    el.dataset.value = v == null ? '' : String(v);
    el.textContent = v == null ? '–' : fmt(v);
    return el;
  };

  // The charts: one point a second, [t, connections, streams, events/s, bytes/s].
  let points = [];
  const CHARTS = [['connections', 1, count], ['streams', 2, count], ['eps', 3, rate], ['bps', 4, bps]];
  const ceiling = (v) => {
    if (!(v > 0)) return 1;
    const e = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * e) return m * e;
    return 10 * e;
  };
  const SVG = 'http://www.w3.org/2000/svg';
  for (const [key] of CHARTS) {
    $('chart-' + key).append(...['line', 'path', 'path', 'circle'].map((tag, n) => {
      const el = document.createElementNS(SVG, tag);
      el.setAttribute('class', ['base', 'area', 'line', 'dot'][n]);
      return el;
    }));
  }
  function draw(key, i, fmt) {
    const svg = $('chart-' + key);
    const W = svg.clientWidth || 300, H = svg.clientHeight || 64;
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const now = points.length ? points[points.length - 1][0] : 0, t0 = now - WINDOW;
    const shown = points.filter((p) => p[0] >= t0 && p[i] != null);
    const max = shown.reduce((m, p) => Math.max(m, p[i]), 0), top = ceiling(max);
    const x = (t) => ((t - t0) / WINDOW * (W - 4)).toFixed(1);
    const y = (v) => (H - 1 - v / top * (H - 6)).toFixed(1);
    let line = '', area = '', seg = [], prev;
    const flush = () => {
      if (!seg.length) return;
      line += 'M' + seg.map((p) => p.join(',')).join('L');
      area += `M${seg[0][0]},${H}L` + seg.map((p) => p.join(',')).join('L') + `L${seg[seg.length - 1][0]},${H}Z`;
      seg = [];
    };
    for (const p of shown) {
      if (prev && p[0] - prev[0] > 2.5) flush();   // a gap (a reconnect): no line across it
      seg.push([x(p[0]), y(p[i])]);
      prev = p;
    }
    flush();
    svg.querySelector('.line').setAttribute('d', line);
    svg.querySelector('.area').setAttribute('d', area);
    const base = svg.querySelector('.base');
    for (const [a, v] of [['x1', 0], ['x2', W], ['y1', H - 0.5], ['y2', H - 0.5]]) base.setAttribute(a, v);
    const dot = svg.querySelector('.dot');
    if (prev) { dot.setAttribute('cx', x(prev[0])); dot.setAttribute('cy', y(prev[i])); dot.setAttribute('r', 2.5); }
    else dot.setAttribute('r', 0);
    svg.dataset.points = String(shown.length);
    svg.dataset.max = String(max);
    svg.dataset.last = prev ? String(prev[i]) : '';
    $(key + '-peak').textContent = shown.length > 1 ? `peak ${fmt(max)}` : '';
  }
  const drawAll = () => { for (const [key, i, fmt] of CHARTS) draw(key, i, fmt); };
  addEventListener('resize', drawAll);

  function channels(list, total) {
    list = Array.isArray(list) ? list : [];
    const body = $('channel-table').tBodies[0];
    const most = list.reduce((m, c) => Math.max(m, c.subscribers), 0);
    const rows = list.map((c) => {
      const tr = document.createElement('tr');
      tr.dataset.channel = c.name;
      const cell = (cls, text, value) => {
        const td = tr.insertCell();
        td.className = cls;
        if (value !== undefined) td.dataset.value = value == null ? '' : String(value);
        td.textContent = text;
        return td;
      };
      cell('name', c.name);
      const subs = cell('n subs', '', c.subscribers);
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = most ? `${(c.subscribers / most * 100).toFixed(1)}%` : '0';
      const n = document.createElement('span');
      n.textContent = count(c.subscribers);
      subs.append(bar, n);
      cell('n rate', c.rate == null ? '–' : rate(c.rate), c.rate);
      cell('n publishes', count(c.publishes), c.publishes);
      cell('n history', count(c.history), c.history);
      return tr;
    });
    body.replaceChildren(...rows);
    $('channel-table').hidden = !rows.length;
    $('no-channels').hidden = rows.length > 0;
    $('channel-count').textContent =
      !total ? '' : total > rows.length ? `${rows.length} of ${count(total)}` : count(total);
  }

  let last = null, lastAt = 0;
  function stats(s) {
    if (last && s.uptime < last.uptime) points = [];   // another process (a restart): start over
    last = s;
    lastAt = Date.now();
    const r = s.rate || {};
    if (r.events != null && !(points.length && points[points.length - 1][0] >= s.uptime)) {
      points.push([s.uptime, s.connections, s.streams, r.events, r.bytes]);
    }
    while (points.length && points[0][0] < s.uptime - WINDOW - 5) points.shift();
    set('connections', s.connections, count);
    set('streams', s.streams, count);
    set('eps', r.events, rate);
    set('bps', r.bytes, bps);
    $('connections-sub').textContent = `${count(s.requests)} requests`;
    $('streams-sub').textContent = s.viewers ? `incl. ${s.viewers} status page${s.viewers === 1 ? '' : 's'}` : '';
    $('eps-sub').textContent = `${count(s.events_sent)} sent`;
    $('bps-sub').textContent = `${bytes(s.bytes_sent)} sent`;
    set('subscribers', s.subscribers, count);
    set('channels', s.channels, count);
    set('pps', r.publishes, rate);
    set('dropped', s.dropped_slow, count).classList.toggle('bad', s.dropped_slow > 0);
    set('started', s.streams_started, count);
    set('heartbeats', s.heartbeats, count);
    set('uptime', s.uptime, duration);
    const w = $('worker');
    w.hidden = s.worker == null;
    w.textContent = s.worker == null ? '' : `worker ${s.worker}`;
    w.dataset.value = s.worker == null ? '' : String(s.worker);
    channels(s.channel_list, s.channels);
    document.title = `${count(s.streams)} streams · lua-sse status`;
    drawAll();
  }

  const state = (text, cls) => { const el = $('state'); el.textContent = text; el.className = 'pill ' + cls; };
  const es = new EventSource(EVENTS);
  es.onopen = () => state('live', 'live');
  es.onerror = () => state(es.readyState === EventSource.CLOSED ? 'stream closed' : 'reconnecting', 'down');
  es.addEventListener('history', (e) => {
    points = JSON.parse(e.data);
    drawAll();
  });
  es.addEventListener('stats', (e) => {
    stats(JSON.parse(e.data));
    if (es.readyState === EventSource.OPEN) state('live', 'live');
  });
  setInterval(() => {
    if (es.readyState === EventSource.OPEN && lastAt && Date.now() - lastAt > 3500) state('stale', 'down');
  }, 1000);
})();
</script>
</body>
</html>
]==]

local HEADERS = {
  ["Content-Type"] = "text/html; charset=utf-8",
  ["Cache-Control"] = "no-store",
  ["X-Content-Type-Options"] = "nosniff",
  ["Referrer-Policy"] = "no-referrer",
  -- nothing but this page's own inline code and its stream
  ["Content-Security-Policy"] = concat({ "default-src 'none'", "script-src 'unsafe-inline'",
    "style-src 'unsafe-inline'", "img-src data:", "connect-src 'self'", "base-uri 'none'",
    "form-action 'none'" }, "; "),
}

-- Mounts the page at path and its stream at path .. "/events" ("/status" gives
-- "/status/events"; "/" gives "/events"). Returns the app.
function M.mount(app, path)
  local base = path:gsub("/+$", "")
  local events = base .. "/events"
  -- The page finds its stream relative to itself, so it works behind a proxy's prefix too.
  local last = path:match("([^/]*)$")
  local relative = (last == "" and "" or last .. "/") .. "events"
  local page = PAGE:gsub("__EVENTS__", function() return cjson.encode(relative) end)

  local state = { viewers = {}, count = 0, timer = nil, prev = nil, rate = nil,
                  channel_rate = {}, history = {} }

  app:get(path, function()
    return 200, page, HEADERS
  end)

  app:stream(events, function(stream)
    state.viewers[stream] = true
    state.count = state.count + 1
    stream:on_close(function()
      if state.viewers[stream] then
        state.viewers[stream] = nil
        state.count = state.count - 1
      end
    end)
    if not state.timer then start(app, state) end
    if #state.history > 0 then
      stream:send({ event = "history", data = cjson.encode(state.history) })
    end
    stream:send({ event = "stats", data = cjson.encode(payload(app, state, app:stats())) })
    while stream:sleep(3600) do end   -- the timer sends; this keeps the response open
  end, { retry = 1000 })
  return app
end

return M
