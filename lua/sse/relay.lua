-- The relay: a stream route whose events come from another SSE server (the upstream),
-- read with app:eventsource. See docs/relay.md.
--
--   local relay = require("sse.relay")
--   relay.route(app, "/news", "http://127.0.0.1:9000/news")            -- one upstream
--                                                                      -- request per client
--   relay.route(app, "/live", "http://127.0.0.1:9000/live", { shared = true })   -- fan-in
--   relay.route(app, "/*", function(req)                               -- computed per request
--     return "http://10.0.0.7:9000/" .. req.params.splat .. relay.query(req),
--            { Authorization = req.headers.authorization }
--   end)
--
-- Per client (the default): the route's accept opens the client's own upstream request
-- (with the client's Last-Event-ID) and answers 502 when the upstream cannot be reached or
-- does not answer 200 text/event-stream; the generator then forwards every event (event,
-- data, id, retry) as it arrives. A drop of the upstream is reconnected by the eventsource
-- (Last-Event-ID, the upstream's retry); a client that leaves cancels its upstream request
-- at once.
--
-- shared = true: the clients of one upstream (same URL, same headers) share one upstream
-- request. One app coroutine (a "hub") reads it and publishes each event to a channel; each
-- client is a subscriber of that channel, with the channel's replay. The upstream request
-- is closed when the last client leaves (after `linger` seconds).
local M = {}

local type, pairs, ipairs, tostring, error = type, pairs, ipairs, tostring, error
local concat, sort = table.concat, table.sort
local tointeger = math.tointeger

-- The eventsource's reconnection delay before the upstream sends a retry: of its own: a
-- retry the upstream sends that differs from it is forwarded to the clients.
local DEFAULT_RETRY = 3000

local OPTIONS = {
  shared = "boolean", gzip = "boolean", heartbeat = "number|boolean", retry = "number",
  headers = "table", history = "number", linger = "number", timeout = "number",
  accept = "function", max_retry = "number", max_line = "number", max_event = "number",
}

local function check_options(opts)
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then error("relay: unknown option '" .. tostring(k) .. "'", 3) end
    if not want:find(type(v), 1, true) then
      error("relay: option '" .. k .. "' must be a " .. want:gsub("|", " or "), 3)
    end
  end
  local h = opts.history
  if h ~= nil and (tointeger(h) == nil or h < 0) then
    error("relay: option 'history' must be a non-negative integer", 3)
  end
  for _, name in ipairs({ "max_line", "max_event" }) do
    local v = opts[name]
    if v ~= nil and (tointeger(v) == nil or v < 1) then
      error("relay: option '" .. name .. "' must be a positive integer (bytes)", 3)
    end
  end
  for _, name in ipairs({ "linger", "timeout", "max_retry" }) do
    local v = opts[name]
    if v ~= nil and (v < 0 or v ~= v) then
      error("relay: option '" .. name .. "' must be a non-negative number", 3)
    end
  end
end

-- ---- helpers ----

local function escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- The request's query string, rebuilt from req.query_all ("" or "?a=1&b=x%20y"), names in
-- sorted order, each name's values in their order. The Last-Event-ID parameters are left
-- out: the relay passes the client's last event id upstream itself (as the header).
function M.query(req)
  local all = req.query_all or {}
  local names = {}
  for name in pairs(all) do
    if name ~= "lastEventId" and name ~= "last_event_id" then names[#names + 1] = name end
  end
  if #names == 0 then return "" end
  sort(names)
  local parts = {}
  for _, name in ipairs(names) do
    for _, v in ipairs(all[name]) do parts[#parts + 1] = escape(name) .. "=" .. escape(v) end
  end
  return "?" .. concat(parts, "&")
end

-- The request's path (percent-encoded again: req.path arrives decoded) and query string:
-- what to append to an upstream base URL to reach the same resource there.
function M.target(req)
  local path = req.path:gsub("[^%w%-%._~/:@!$&'()*+,;=]", function(c)
    return ("%%%02X"):format(c:byte())
  end)
  return path .. M.query(req)
end

-- url, headers for this request; or nil when the upstream function gave no URL.
local function resolve(upstream, static_headers, req)
  local url, headers
  if type(upstream) == "function" then
    url, headers = upstream(req)
    if url == nil then return nil end
    if type(url) ~= "string" then
      error("relay: the upstream function returned a " .. type(url) .. ", not a URL", 0)
    end
    if headers ~= nil and type(headers) ~= "table" then
      error("relay: the upstream function returned headers that are not a table", 0)
    end
  else
    url = upstream
  end
  local h = {}
  for k, v in pairs(static_headers or {}) do h[k] = tostring(v) end
  for k, v in pairs(headers or {}) do h[k] = tostring(v) end
  return url, h
end

-- The client's last event id as it can go upstream: one with CR, LF or NUL (only a
-- ?lastEventId= can carry them; no browser sends one) is no id at all.
local function last_event_id(req)
  local id = req.last_event_id
  if id and id:find("[\r\n%z]") then return nil end
  return id
end

local function log(app, level, msg)
  if app._log then app:_log(level, msg) end
end

local function plain(status, text)
  return status, text .. "\n", { ["Content-Type"] = "text/plain; charset=utf-8" }
end

-- The answer to a client whose upstream could not be opened. The detail (it may name an
-- internal host) goes to the log; the client hears the upstream's status when there was one.
local function bad_gateway(app, req, url, src, err)
  log(app, "warn", ("relay %s -> %s: %s"):format(req.path, url, tostring(err)))
  local status = src and src.http_status
  if status == 200 then     -- a 200 that was not text/event-stream
    return plain(502, "bad gateway: the upstream did not answer with an event stream")
  elseif status then
    return plain(502, "bad gateway: the upstream answered HTTP " .. status)
  end
  return plain(502, "bad gateway: the upstream could not be reached")
end

-- An upstream event as the client gets it. `last` is the id the client has in force: an id
-- is written only when it changes, so the client's last event id is always the upstream's.
local function outgoing(ev, last)
  local out = { data = ev.data }
  if ev.event ~= "message" then out.event = ev.event end
  if ev.id ~= last then out.id = ev.id end
  return out
end

-- ---- per client ----

local function per_client(app, pattern, upstream, opts)
  local function accept(req)
    if opts.accept then
      local a, b, c = opts.accept(req)
      if a ~= nil then return a, b, c end
    end
    local url, headers = resolve(upstream, opts.headers, req)
    if not url then return plain(404, "not found") end
    local src = app:eventsource(url, {
      headers = headers, last_event_id = last_event_id(req), max_retry = opts.max_retry,
      max_line = opts.max_line, max_event = opts.max_event,
    })
    local ok, err = src:connect()
    if not ok then
      src:close()
      return bad_gateway(app, req, url, src, err)
    end
    if req.method == "HEAD" then   -- the headers of a stream, and no upstream kept open
      src:close()
      return
    end
    req.upstream = src
  end

  local function forward(stream, req)
    local src = req.upstream
    req.upstream = nil
    local last, retry = last_event_id(req) or "", DEFAULT_RETRY
    while true do
      local ev, err = src:next()
      if not ev then
        if not stream.closed then
          log(app, "info", ("relay %s -> %s: the upstream ended: %s"):format(req.path, src.url, tostring(err)))
        end
        break
      end
      local out = outgoing(ev, last)
      last = ev.id
      local r = tointeger(src.retry)
      if r and r ~= retry then out.retry, retry = r, r end
      if not stream:send(out) then break end
    end
    src:close()   -- the client left (or the upstream ended): the upstream request ends now
  end

  app:stream(pattern, forward, {
    gzip = opts.gzip ~= false, heartbeat = opts.heartbeat, retry = opts.retry, accept = accept,
  })
end

-- ---- shared: one upstream request per (URL, headers), fanned out through a channel ----

-- The app's id epoch, learnt from the first id a hub's channel hands out ("<epoch>-<n>").
local function epoch_of(id)
  return id and id:match("^(%d+)%-%d+$")
end

local function hub_key(url, headers)
  local names = {}
  for k in pairs(headers) do names[#names + 1] = k end
  sort(names)
  local parts = { url }
  for _, k in ipairs(names) do parts[#parts + 1] = k:lower() .. ": " .. headers[k] end
  return concat(parts, "\n")
end

local function shared(app, pattern, upstream, opts)
  local hubs = {}          -- key -> hub (kept for the app's life, like the channels)
  local nhubs = 0
  local history = opts.history or 100
  local linger = opts.linger or 0
  local timeout = opts.timeout or 10

  local function new_hub(url, headers)
    nhubs = nhubs + 1
    local hub = {
      url = url, headers = headers,
      ch = app:channel(("sse.relay %s #%d"):format(pattern, nhubs), { history = history }),
      streams = {}, clients = 0,
      run = nil,           -- the upstream request being read: { src, done, ok, err }
      last_event_id = "",  -- the upstream's, carried into the next run's request
      retry = nil,         -- the upstream's retry:, when it differs from the default
      ids = {}, published = 0, epoch = nil,   -- the ids of the last history + 1 publishes
    }
    return hub
  end

  -- The Last-Event-ID that replays to a new client everything the channel keeps, without a
  -- gap: the id of the newest event pushed out of the history, or "<epoch>-0" while none
  -- was. false (no replay) when nothing was published yet or history is 0.
  local function fresh_from(hub)
    if history == 0 or hub.published == 0 then return false end
    local n = hub.published
    if n <= history then return hub.epoch .. "-0" end
    return hub.ids[(n - history) % (history + 1)]
  end

  local function close_streams(hub)
    local list = {}
    for s in pairs(hub.streams) do list[#list + 1] = s end
    for _, s in ipairs(list) do s:close() end
  end

  local function stop(hub)
    local run = hub.run
    hub.run = nil
    if run then run.src:close() end
  end

  -- One upstream request, read until it ends for good or the hub stops it.
  local function pump(hub, run)
    local src = run.src
    local ok, err = src:connect()
    run.done, run.ok, run.err = true, ok, err
    if not ok then
      src:close()
      if hub.run == run then hub.run = nil end
      log(app, "warn", ("relay %s -> %s: %s"):format(pattern, hub.url, tostring(err)))
      return
    end
    -- The clients that waited for this connection join in this turn. One that left before
    -- its stream started never joins and so never leaves: a hub nobody joined stops.
    app:after(math.max(linger, 1), function()
      if hub.run == run and hub.clients == 0 then stop(hub) end
    end)
    while true do
      local ev, why = src:next()
      if not ev then err = why break end
      if hub.run ~= run then break end
      -- Events go out with the channel's ids ("<epoch>-<n>"): those are what a client's
      -- Last-Event-ID resumes from. The upstream's id is the hub's, for its reconnects.
      local out = outgoing(ev, ev.id)
      hub.last_event_id = src.last_event_id
      local id = hub.ch:publish(out)
      hub.published = hub.published + 1
      hub.ids[hub.published % (history + 1)] = id
      hub.epoch = hub.epoch or epoch_of(id)
      local r = tointeger(src.retry)
      if r and r ~= (hub.retry or DEFAULT_RETRY) then
        hub.retry = r
        for s in pairs(hub.streams) do s:send({ retry = r }) end
      end
    end
    src:close()
    if hub.run == run then
      -- The upstream ended for good (204, an error status on a reconnect...): the clients'
      -- streams end too; they reconnect and their accept tries the upstream again.
      hub.run = nil
      log(app, "info", ("relay %s -> %s: the upstream ended: %s"):format(pattern, hub.url, tostring(err)))
      close_streams(hub)
    end
  end

  local function start(hub)
    local run = {
      src = app:eventsource(hub.url, {
        headers = hub.headers, max_retry = opts.max_retry,
        max_line = opts.max_line, max_event = opts.max_event,
        last_event_id = hub.last_event_id ~= "" and hub.last_event_id or nil,
      }),
      done = false,
    }
    hub.run = run
    app:spawn(function()
      local ok, err = xpcall(pump, debug.traceback, hub, run)
      if not ok then
        -- never a hub that looks alive and reads nothing: its clients reconnect
        log(app, "error", ("relay %s -> %s: %s"):format(pattern, hub.url, tostring(err)))
        run.done = true
        run.src:close()
        if hub.run == run then
          hub.run = nil
          close_streams(hub)
        end
      end
    end)
    return run
  end

  local function accept(req)
    if opts.accept then
      local a, b, c = opts.accept(req)
      if a ~= nil then return a, b, c end
    end
    local url, headers = resolve(upstream, opts.headers, req)
    if not url then return plain(404, "not found") end
    if req.method == "HEAD" then
      -- no stream follows (so no client would ever leave the hub): ask once, on the side
      local src = app:eventsource(url, { headers = headers })
      local ok, err = src:connect()
      src:close()
      if not ok then return bad_gateway(app, req, url, src, err) end
      return
    end
    local key = hub_key(url, headers)
    local hub = hubs[key]
    if not hub then
      hub = new_hub(url, headers)
      hubs[key] = hub
    end
    local run = hub.run or start(hub)
    if not run.done then
      -- Waits for the hub's first connection (several clients may be waiting on it).
      local deadline = timeout
      while not run.done and deadline > 0 do
        -- the client left: answer anything but a stream (it is gone anyway)
        if not app:sleep(0.01) then return plain(503, "the client left") end
        deadline = deadline - 0.01
      end
      if not run.done then
        log(app, "warn", ("relay %s -> %s: no answer within %g s"):format(req.path, url, timeout))
        return plain(504, "gateway timeout: the upstream did not answer")
      end
    end
    if not run.ok then return bad_gateway(app, req, url, run.src, run.err) end
    req.hub = hub
  end

  local function join(stream, req)
    local hub = req.hub
    req.hub = nil
    if not hub.run then start(hub) end   -- stopped meanwhile (its last client left)
    hub.streams[stream] = true
    hub.clients = hub.clients + 1
    stream:on_close(function()
      hub.streams[stream] = nil
      hub.clients = hub.clients - 1
      if hub.clients > 0 then return end
      if linger == 0 then
        stop(hub)
      else
        app:after(linger, function() if hub.clients == 0 then stop(hub) end end)
      end
    end)
    if hub.retry then stream:send({ retry = hub.retry }) end
    local from = req.last_event_id
    if from == nil then from = fresh_from(hub) end
    stream:subscribe(hub.ch, from)
  end

  app:stream(pattern, join, {
    gzip = opts.gzip ~= false, heartbeat = opts.heartbeat, retry = opts.retry, accept = accept,
  })
  return hubs
end

-- relay.route(app, pattern, upstream, opts) -> app
-- upstream: a URL, or function(req) -> url[, headers] (nil: 404).
-- opts: shared (false), gzip (true), heartbeat, retry (sent when a client's stream opens),
-- headers (sent upstream), accept (runs first; a status answers instead), max_retry (the
-- upstream's reconnection delay cap, ms), max_line and max_event (the eventsource's bounds,
-- bytes); shared only: history (100), linger (0 s), timeout (10 s for the first connection).
function M.route(app, pattern, upstream, opts)
  if type(upstream) ~= "string" and type(upstream) ~= "function" then
    error("relay: upstream must be a URL or a function(req) -> url, headers", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("relay: options must be a table", 2) end
  check_options(opts)
  if opts.shared then
    shared(app, pattern, upstream, opts)
  else
    per_client(app, pattern, upstream, opts)
  end
  return app
end

return M
