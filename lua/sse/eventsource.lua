-- app:eventsource(url, opts): the browser's EventSource for Lua, on app:fetch (stream =
-- true), the C parser and app:sleep. Its methods wait, so they run in an app coroutine
-- (a stream's generator, a function given to app:spawn).
--
-- The WHATWG processing model (docs/eventsource.md): events are dispatched as the parser
-- completes them; the last event id lives across connections (each connection's parser
-- starts with it); after a drop the source reconnects, sending Last-Event-ID, after the
-- retry delay (the server's `retry:` replaces it), with jitter, doubling on repeated
-- failures up to max_retry; it stops for good on 204, on any other status than 200, on a
-- Content-Type other than text/event-stream, or on a line or an event's data over its
-- bound (max_line, max_event). A source with a method other than GET or a body (an LLM
-- API) does not reconnect. One coroutine at a time may wait in a source's methods.
local core = require("sse.core")

local M = {}

local EventSource = {}
EventSource.__index = EventSource
EventSource.__name = "sse.eventsource"

local OPTIONS = {
  headers = "table", last_event_id = "string", method = "string", body = "string|table",
  reconnect = "boolean", retry = "number", max_retry = "number", timeout = "number",
  max_line = "number", max_event = "number",
}

local MAX_LINE, MAX_EVENT = 1 << 20, 16 << 20

local random, min, floor = math.random, math.min, math.floor

function M.new(app, url, opts)
  if type(url) ~= "string" then
    error("app:eventsource: url must be a string", 3)
  end
  opts = opts or {}
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then error("app:eventsource: unknown option '" .. tostring(k) .. "'", 3) end
    if not want:find(type(v), 1, true) then
      error("app:eventsource: option '" .. k .. "' must be a " .. want:gsub("|", " or "), 3)
    end
  end
  for _, k in ipairs({ "max_line", "max_event" }) do
    local v = opts[k]
    if v ~= nil and (math.type(v) ~= "integer" or v < 1) then
      error("app:eventsource: option '" .. k .. "' must be a positive integer (bytes)", 3)
    end
  end
  if opts.last_event_id and opts.last_event_id:find("[\r\n%z]") then
    error("app:eventsource: option 'last_event_id' must not contain CR, LF or NUL", 3)
  end
  local once = (opts.method and opts.method:upper() ~= "GET") or opts.body ~= nil
  return setmetatable({
    url = url,
    status = "connecting",
    last_event_id = opts.last_event_id or "",
    retry = opts.retry or 3000,
    _app = app,
    _opts = opts,
    _reconnect = opts.reconnect ~= false and not once,
    _max_retry = opts.max_retry or 30000,
    _failures = 0,          -- connection attempts in a row that gave no event
    _wait = false,          -- the reconnection delay is due before the next attempt
    _queue = {}, _head = 1,
    _res = nil, _parser = nil,
    _err = nil,
    http_status = nil,      -- the status of the latest attempt's response (nil: none)
  }, EventSource)
end

-- Accept and Cache-Control unless the program gave its own (any case), the program's
-- headers, and Last-Event-ID when the source has one (it wins over the program's).
local function request_headers(self)
  local h, given = {}, {}
  for k, v in pairs(self._opts.headers or {}) do
    local lk = k:lower()
    if lk ~= "last-event-id" or self.last_event_id == "" then
      h[k], given[lk] = v, true
    end
  end
  if not given.accept then h.Accept = "text/event-stream" end
  if not given["cache-control"] then h["Cache-Control"] = "no-cache" end
  if self.last_event_id ~= "" then h["Last-Event-ID"] = self.last_event_id end
  return h
end

local function close_for_good(self, err)
  self.status = "closed"
  self._err = err
  if self._res then self._res:close() self._res = nil end
end

-- Waits the reconnection delay: retry, doubled per failure in a row, capped, with up to
-- 20 % jitter (so that many clients of a restarted server do not all come back at once).
local function wait_to_reconnect(self)
  local delay = min(self.retry * 2 ^ self._failures, self._max_retry)
  delay = delay * (0.9 + 0.2 * random())
  self.status = "connecting"
  return self._app:sleep(floor(delay) / 1000)
end

-- One connection attempt: true, or false to try again later, or nil when closed for good.
local function connect(self)
  local o = self._opts
  self.status = "connecting"
  local res, err = self._app:fetch(self.url, {
    stream = true, headers = request_headers(self), method = o.method, body = o.body,
    timeout = o.timeout, redirects = true,    -- as a browser's fetch does (at most 10)
  })
  if self.status == "closed" then        -- closed by the program meanwhile
    if res then res:close() end
    return nil
  end
  if not res then
    self.http_status = nil
    if not self._reconnect then close_for_good(self, err) return nil end
    self._err = err
    return false
  end
  self.http_status = res.status
  if res.status == 204 then
    res:close()
    close_for_good(self, "the server answered 204: no more events")
    return nil
  end
  if res.status ~= 200 then
    res:close()
    close_for_good(self, "the server answered HTTP " .. res.status)
    return nil
  end
  local ctype = (res.headers["content-type"] or ""):match("^%s*([^;%s]+)") or ""
  if ctype:lower() ~= "text/event-stream" then
    res:close()
    close_for_good(self, "the server answered Content-Type " .. (ctype ~= "" and ctype or "(none)") ..
      ", not text/event-stream")
    return nil
  end
  -- A new parser per connection, starting with the last event id the source has: events
  -- with no id: line report it, as a reconnected browser's do.
  local parser = core.parser({
    max_line = o.max_line or MAX_LINE, max_event = o.max_event or MAX_EVENT,
    last_event_id = self.last_event_id,
  })
  self._res, self._parser, self.status, self._err = res, parser, "open", nil
  return true
end

-- The next connection attempt, after the reconnection delay when one is due: true (open),
-- false (failed, the source will try again), nil (closed for good).
local function attempt(self)
  if self._wait then
    self._wait = false
    if not wait_to_reconnect(self) then close_for_good(self, "closed") return nil end
    if self.status == "closed" then return nil end
  end
  local ok = connect(self)
  if ok == false then
    self._failures = self._failures + 1
    self._wait = true
  end
  return ok
end

-- Takes the events this piece completes; the parser keeps what is unfinished. A line or
-- an event's data over its bound ends the source for good (after the events before it).
local function feed(self, piece)
  local p = self._parser
  local evs, err = p:feed(piece)
  for _, ev in ipairs(evs) do
    self._queue[#self._queue + 1] = ev
  end
  -- at every blank line, even one that dispatches nothing ("id: 5" then a blank line)
  self.last_event_id = p.last_event_id
  if p.retry then self.retry = p.retry end
  if err then close_for_good(self, err) end
end

-- src:next() -> { event, data, id } | nil, err: waits for the next event; nil once the
-- source has ended for good (err says why).
function EventSource:next()
  while true do
    local q = self._queue
    if self._head <= #q then
      local ev = q[self._head]
      q[self._head] = nil
      self._head = self._head + 1
      if self._head > #q then self._queue, self._head = {}, 1 end
      self._failures = 0
      return ev
    end
    if self.status == "closed" then return nil, self._err end
    if not self._res then
      attempt(self)
    else
      local piece, err = self._res:read()
      if piece then
        feed(self, piece)
      elseif self.status ~= "closed" then
        self._res = nil
        if not self._reconnect then
          close_for_good(self, err or "the stream ended")
        else
          self.status, self._wait = "connecting", true
        end
      end
    end
  end
end

-- src:connect() -> true | nil, err: waits until the source is open, or until its current
-- connection attempt failed (err as next() would give it). True at once when the source is
-- open or has events queued. After a failure the source is still usable (next() reconnects)
-- unless it closed for good (src.status == "closed": 204, another status, another
-- Content-Type, a source that does not reconnect).
function EventSource:connect()
  while true do
    if self._head <= #self._queue or (self.status == "open" and self._res) then return true end
    if self.status == "closed" then return nil, self._err end
    local ok = attempt(self)
    if ok then return true end
    if ok == false then return nil, self._err end
  end
end

-- for ev in src:events() do ... end
function EventSource:events()
  return function() return (self:next()) end
end

-- src:close(): ends the source for good; events not yet taken are dropped (a closed
-- EventSource dispatches nothing more).
function EventSource:close()
  if self.status ~= "closed" then close_for_good(self, "closed by the program") end
  self._queue, self._head = {}, 1
end

return M
