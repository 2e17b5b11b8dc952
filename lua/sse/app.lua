-- The application facade: options, routes, handlers, streams and the loop, over the C
-- server (sse.core). Routing and response shaping live here because they read best in
-- Lua; every byte of a stream is queued and sent by C.
local core = require("sse.core")
local router = require("sse.router")
local static = require("sse.static")
local presence = require("sse.presence")
local request = require("sse.request")
local cjson = require("cjson")

local M = {}

-- The default of the app option max_channels.
M.MAX_CHANNELS = 10000

local type, pairs, ipairs, tostring, error = type, pairs, ipairs, tostring, error
local getmetatable = getmetatable
local xpcall, traceback, concat = xpcall, debug.traceback, table.concat
local lower = string.lower

local App = {}
App.__index = App
App.__name = "sse.app"

local OPTIONS = {
  host = "string", port = "number", heartbeat = "number|boolean", retry = "number",
  cors = "string|table", max_connections = "number", max_body = "number",
  queue_limit = "number", log = "function|boolean", connection_memory = "number",
  shutdown_timeout = "number", tls = "table", gzip = "boolean",
  request_timeout = "number|boolean", keepalive_timeout = "number|boolean",
  max_connections_per_ip = "number", broker = "string|table", workers = "number|string",
  max_channels = "number|boolean",
  log_level = "string",
}

-- log_level: the most detailed level that is logged (debug is internal detail: what
-- libmicrohttpd and GnuTLS say, connections closed for being late or malformed).
local LOG_LEVELS = { error = 0, warn = 1, info = 2, debug = 3 }

local function check_options(opts, allowed, where)
  for k, v in pairs(opts) do
    local want = allowed[k]
    if not want then
      error(where .. ": unknown option '" .. tostring(k) .. "'", 3)
    end
    if not want:find(type(v), 1, true) then
      error(where .. ": option '" .. k .. "' must be a " .. want:gsub("|", " or "), 3)
    end
  end
end

local function check_seconds(v, name, where)
  if v ~= nil and v ~= false and (type(v) ~= "number" or v <= 0) then
    error(where .. ": option '" .. name .. "' must be a positive number of seconds or false", 3)
  end
end

local function check_retry(v, where)
  if v ~= nil and (math.type(v) ~= "integer" or v < 0) then
    error(where .. ": option 'retry' must be a non-negative integer (milliseconds)", 3)
  end
end

-- Seconds as the C side's milliseconds: a positive number, or false for none.
local function timeout_ms(v, name, default)
  if v == nil then v = default end
  if v == false then return 0 end
  if type(v) ~= "number" or v <= 0 or v > 86400 then
    error("sse.app: option '" .. name .. "' must be a number of seconds (0 to 86400] or false", 3)
  end
  return math.max(1, math.floor(v * 1000 + 0.5))
end

local function has_header(headers, name)
  for k in pairs(headers) do
    if lower(k) == name then
      return true
    end
  end
  return false
end

local function default_log(level, msg)
  io.stderr:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " sse ", level, ": ", msg, "\n")
end

-- The one logging path: everything the facade logs goes through here (log = false
-- silences it; a log function that fails is reported on stderr, never raised).
function App:_log(level, msg)
  local log = self._logger
  if log and (LOG_LEVELS[level] or 0) <= self._log_level then
    local ok, err = pcall(log, level, msg)
    if not ok then
      io.stderr:write("sse: log function failed: ", tostring(err), "\n")
    end
  end
end

-- Header values as the C side takes them: strings, or lists of strings (one header line
-- each). Raises with the header's name for anything else.
local function header_values(headers, where)
  local out = {}
  if headers == nil then return out end
  if type(headers) ~= "table" then
    error(where .. ": headers must be a table", 0)
  end
  for k, v in pairs(headers) do
    if type(k) ~= "string" or not k:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
      error(where .. ": invalid header name " .. ("%q"):format(tostring(k)), 0)
    end
    local t = type(v)
    if t == "string" or t == "number" then
      out[k] = tostring(v)
    elseif t == "table" then
      local list = {}
      for i, item in ipairs(v) do
        local it = type(item)
        if it ~= "string" and it ~= "number" then
          error(where .. ": header '" .. k .. "' lists a " .. it, 0)
        end
        list[i] = tostring(item)
      end
      out[k] = list
    else
      error(where .. ": the value of header '" .. k .. "' is a " .. t, 0)
    end
  end
  return out
end

-- What libmicrohttpd cannot send, found when a route is defined rather than on every
-- request to it.
local function check_static_headers(headers, where)
  for k, v in pairs(headers) do
    for _, item in ipairs(type(v) == "table" and v or { v }) do
      if item == "" then
        error(where .. ": the value of header '" .. k .. "' is empty", 3)
      elseif item:find("[\r\n%z]") then
        error(where .. ": the value of header '" .. k .. "' contains CR, LF or NUL", 3)
      end
    end
  end
end

-- CORS as the spec and browsers want it: "*" for public streams, or an allow-list
-- whose matching Origin is echoed exactly (required when credentials are on).
local function compile_cors(cors)
  if cors == nil or cors == "*" then
    return cors
  end
  if type(cors) ~= "table" or type(cors.origins) ~= "table" then
    error("sse.app: option 'cors' must be \"*\" or { origins = {...}, credentials = true }", 3)
  end
  local set = {}
  for _, o in ipairs(cors.origins) do
    set[o] = true
  end
  return { origins = set, credentials = cors.credentials and true or false }
end

-- broker = "redis://[:password@]host[:port][/db]" or { url = ..., prefix = "sse",
-- check_interval = seconds }: the options of core.server's broker.
local function broker_options(b)
  if b == nil then return nil end
  if type(b) == "string" then b = { url = b } end
  check_options(b, { url = "string", prefix = "string", check_interval = "number",
                     presence_ttl = "number" }, "sse.app: broker")
  if b.presence_ttl ~= nil and (b.presence_ttl < 1 or b.presence_ttl > 86400) then
    error("sse.app: broker option 'presence_ttl' must be a number of seconds from 1 to 86400", 3)
  end
  local url = b.url or "redis://127.0.0.1:6379"
  local rest = url:match("^redis://(.*)$")
  if not rest then
    error("sse.app: broker url must look like redis://host:port/db, not " .. ("%q"):format(url), 3)
  end
  local userinfo, hostport = rest:match("^(.-)@(.*)$")
  hostport = hostport or rest
  local password = userinfo and (userinfo:match(":(.*)$") or userinfo) or nil
  local host, after = hostport:match("^%[([^%]]+)%](.*)$")
  if not host then host, after = hostport:match("^([^:/]*)(.*)$") end
  local port = after:match("^:(%d+)")
  local db = after:gsub("^:%d+", ""):match("^/(%d*)$")
  if after:gsub("^:%d+", "") ~= "" and not db then
    error("sse.app: broker url must look like redis://host:port/db, not " .. ("%q"):format(url), 3)
  end
  if b.check_interval ~= nil and (b.check_interval <= 0 or b.check_interval > 86400) then
    error("sse.app: broker option 'check_interval' must be a number of seconds (0 to 86400]", 3)
  end
  return {
    host = host ~= "" and host or "127.0.0.1",
    port = tonumber(port) or 6379,
    db = tonumber(db) or 0,
    password = password ~= "" and password or nil,
    prefix = b.prefix or "sse",
    check_ms = b.check_interval and math.max(1, math.floor(b.check_interval * 1000 + 0.5)) or nil,
    presence_ttl = b.presence_ttl or 30,   -- for lua/sse/presence.lua (C does not read it)
  }
end

function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("sse.app: options must be a table", 2)
  end
  check_options(opts, OPTIONS, "sse.app")
  check_seconds(opts.heartbeat, "heartbeat", "sse.app")
  check_retry(opts.retry, "sse.app")
  if opts.log_level ~= nil and not LOG_LEVELS[opts.log_level] then
    error("sse.app: option 'log_level' must be \"error\", \"warn\", \"info\" or \"debug\", not "
      .. ("%q"):format(opts.log_level), 2)
  end
  if opts.tls ~= nil then
    check_options(opts.tls, { cert = "string", key = "string", priorities = "string" }, "sse.app: tls")
    if not opts.tls.cert or not opts.tls.key then
      error("sse.app: option 'tls' needs both cert and key (paths to PEM files)", 2)
    end
  end
  local broker = broker_options(opts.broker)
  local workers = opts.workers
  if workers == "auto" then
    workers = core.cpus()
  elseif workers ~= nil and (math.type(workers) ~= "integer" or workers < 1 or workers > 1024) then
    error("sse.app: option 'workers' must be an integer from 1 to 1024 or \"auto\"", 2)
  end
  local self = setmetatable({
    host = opts.host or "127.0.0.1",
    _port = opts.port or 8080,
    _workers = workers or 1,
    _broker = broker ~= nil,
    _broker_prefix = broker and broker.prefix,
    _presence_ttl = broker and broker.presence_ttl or 30,
    _routes = router.new(),
    _before = {},
    -- name -> channel, weakly: a channel the script no longer holds, that nobody
    -- subscribes to and that keeps no history is freed (src/lsse_channel.c)
    _channels = setmetatable({}, { __mode = "v" }),
    _methods = {},       -- methods some route uses: others, if not standard, get 501
    _heartbeat = opts.heartbeat == nil and 15 or opts.heartbeat,
    _retry = opts.retry,
    _cors = compile_cors(opts.cors),
    _shutdown_timeout = opts.shutdown_timeout or 5,
    _tls = opts.tls,
    _log_level = LOG_LEVELS[opts.log_level or "info"],
    _gzip = opts.gzip or false,
    _stopping = false,
    _in_step = false,
  }, App)
  local log = opts.log
  if log == nil or log == true then
    log = default_log
  end
  self._logger = log or nil
  if opts.max_connections_per_ip ~= nil and (math.type(opts.max_connections_per_ip) ~= "integer"
      or opts.max_connections_per_ip < 1) then
    error("sse.app: option 'max_connections_per_ip' must be a positive integer", 2)
  end
  local max_channels = opts.max_channels
  if max_channels == nil then max_channels = M.MAX_CHANNELS end
  if max_channels ~= false and (math.type(max_channels) ~= "integer" or max_channels < 1) then
    error("sse.app: option 'max_channels' must be a positive integer or false", 2)
  end
  self._max_channels = max_channels or nil
  self._core = core.server({
    host = self.host,
    port = opts.port or 8080,
    max_connections = opts.max_connections,
    max_body = opts.max_body,
    queue_limit = opts.queue_limit,
    connection_memory = opts.connection_memory,
    request_timeout_ms = timeout_ms(opts.request_timeout, "request_timeout", 30),
    keepalive_timeout_ms = timeout_ms(opts.keepalive_timeout, "keepalive_timeout", 5),
    max_connections_per_ip = opts.max_connections_per_ip,
    max_channels = max_channels or nil,
    broker = broker,
    dispatch = function(req)
      return self:_dispatch(req)
    end,
    admit = function(req)
      return self:_admit(req)
    end,
    -- libmicrohttpd's own messages come as "debug": logged only with log_level = "debug".
    log = function(level, msg) self:_log(level, msg) end,
  })
  return self
end

-- ---- routes ----

function App:route(method, pattern, handler)
  if type(method) ~= "string" then
    error("app:route: method must be a string", 2)
  end
  if type(handler) ~= "function" then
    error("app:route: handler must be a function", 2)
  end
  method = method:upper()
  self._routes:add(method, pattern, { handler = handler, method = method })
  self._methods[method] = true
  return self
end

function App:get(pattern, handler) return self:route("GET", pattern, handler) end
function App:post(pattern, handler) return self:route("POST", pattern, handler) end
function App:put(pattern, handler) return self:route("PUT", pattern, handler) end
function App:delete(pattern, handler) return self:route("DELETE", pattern, handler) end

function App:before(fn)
  if type(fn) ~= "function" then
    error("app:before: expected a function", 2)
  end
  self._before[#self._before + 1] = fn
  return self
end

function App:static(prefix, dir)
  if type(prefix) ~= "string" or prefix:sub(1, 1) ~= "/" then
    error("app:static: prefix must be a path starting with '/'", 2)
  end
  if type(dir) ~= "string" then
    error("app:static: dir must be a string", 2)
  end
  prefix = prefix:gsub("/+$", "")
  self._routes:add("GET", prefix .. "/*", {
    method = "GET",
    handler = function(req)
      return static.serve(dir, req.params.splat, req.method, req.headers)
    end,
  })
  return self
end

local function is_channel(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__name == "sse.channel"
end

-- ---- channels ----

-- Same name, same channel. history: how many recent events are kept for replay. A
-- channel nothing uses any more is freed (see src/lsse_channel.c); past max_channels, when
-- every channel is in use, this raises a refusal: a handler's client gets 503.
function App:channel(name, opts)
  if type(name) ~= "string" or name == "" or name:find("\0", 1, true) then
    error("app:channel: name must be a non-empty string without NUL bytes", 2)
  end
  opts = opts or {}
  check_options(opts, { history = "number" }, "app:channel")
  local history = opts.history
  if history ~= nil and (math.type(history) ~= "integer" or history < 0 or history > 1000000) then
    error("app:channel: option 'history' must be an integer from 0 to 1000000", 2)
  end
  local ch = self._channels[name]
  if not ch and self._workers > 1 and not self._broker and self._reservation then
    error("app:channel: with workers > 1 channels need a broker (app option broker): each "
      .. "worker process would have channels of its own", 2)
  end
  if not ch then
    local err
    ch, err = self._core:channel(name, history or 100)
    if not ch then
      request.refuse(503, "too many channels (" .. err .. " " .. self._max_channels
        .. " reached, all in use)\n")
    end
    presence.channel(self, ch)
    self._channels[name] = ch
  end
  if history ~= nil and history ~= ch.history then
    error("app:channel: channel '" .. name .. "' exists with history " .. ch.history, 2)
  end
  return ch
end

local STREAM_OPTIONS = {
  method = "string", format = "string", retry = "number", heartbeat = "number|boolean",
  headers = "table", gzip = "boolean", accept = "function", first = "string|number",
}

function App:stream(pattern, source, opts)
  opts = opts or {}
  check_options(opts, STREAM_OPTIONS, "app:stream")
  check_seconds(opts.heartbeat, "heartbeat", "app:stream")
  check_retry(opts.retry, "app:stream")
  -- A channel is served by C alone (no coroutine, no Lua object per client).
  if not is_channel(source) and type(source) ~= "function" then
    error("app:stream: source must be a function(stream, req) or a channel", 2)
  end
  local first = opts.first
  if first ~= nil and first ~= "newest" and first ~= "oldest" and
     (math.type(first) ~= "integer" or first < 0) then
    error("app:stream: option 'first' must be \"newest\", \"oldest\" or a count of events", 2)
  end
  if first ~= nil and not is_channel(source) then
    error("app:stream: option 'first' is for channel routes (a generator passes it to stream:subscribe)", 2)
  end
  if opts.format ~= nil and opts.format ~= "sse" and opts.format ~= "ndjson" then
    error("app:stream: option 'format' must be \"sse\" or \"ndjson\"", 2)
  end
  local ok, headers = pcall(header_values, opts.headers, "app:stream")
  if not ok then
    error(headers, 2)
  end
  check_static_headers(headers, "app:stream")
  if opts.format == "ndjson" and not has_header(headers, "content-type") then
    headers["Content-Type"] = "application/x-ndjson"
  end
  local heartbeat = opts.heartbeat
  if heartbeat == nil then
    heartbeat = self._heartbeat
  end
  local method = (opts.method or "GET"):upper()
  self._methods[method] = true
  self._routes:add(method, pattern, {
    method = method,
    stream = source,
    heartbeat = heartbeat,
    retry = opts.format ~= "ndjson" and (opts.retry or self._retry) or nil,
    headers = headers,
    format = opts.format,
    gzip = opts.gzip,
    accept = opts.accept,
    first = opts.first,
  })
  return self
end

-- ---- timers ----

function App:every(seconds, fn)
  if type(seconds) ~= "number" or seconds <= 0 then
    error("app:every: seconds must be a positive number", 2)
  end
  if type(fn) ~= "function" then
    error("app:every: expected a function", 2)
  end
  return self._core:timer(seconds, seconds, fn)
end

function App:after(seconds, fn)
  if type(seconds) ~= "number" or seconds < 0 then
    error("app:after: seconds must be a non-negative number", 2)
  end
  if type(fn) ~= "function" then
    error("app:after: expected a function", 2)
  end
  return self._core:timer(seconds, 0, fn)
end

-- ---- app coroutines ----

-- Runs fn(...) as a coroutine on the loop, from the next loop turn: it may wait
-- (app:sleep; and what later waits on the network). An error is logged with its
-- traceback. A script with no routes at all can do its work this way under app:run().
function App:spawn(fn, ...)
  if type(fn) ~= "function" then
    error("app:spawn: expected a function", 2)
  end
  self._core:spawn(fn, ...)
end

-- The current app coroutine (a stream's generator, a spawned function) waits `seconds`
-- while the loop serves everything else. Returns true, or nil, "closed" when the stream
-- of a generator closed meanwhile. Raises anywhere else.
function App:sleep(seconds)
  if type(seconds) ~= "number" or seconds < 0 or seconds ~= seconds then
    error("app:sleep: seconds must be a non-negative number", 2)
  end
  return self._core:sleep(seconds)
end

local FETCH_OPTIONS = {
  method = "string", headers = "table", body = "string|table", timeout = "number",
  max_size = "number", insecure = "boolean", ca_file = "string", redirects = "boolean",
  stream = "boolean",
}

-- An HTTP request from the current app coroutine, which waits (the loop serves everything
-- else meanwhile): res = { status, headers (lower-case names), body }, or nil, message,
-- kind ("timeout", "dns", "connect", "tls", "too_large", "http", "other"). An HTTP error
-- status is a response, not a failure. A table body is sent as JSON.
function App:fetch(url, opts)
  if type(url) ~= "string" then
    error("app:fetch: url must be a string", 2)
  end
  opts = opts or {}
  check_options(opts, FETCH_OPTIONS, "app:fetch")
  if type(opts.body) == "table" then
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.body = cjson.encode(opts.body)
    o.headers = {}
    for k, v in pairs(opts.headers or {}) do o.headers[k] = v end
    if not has_header(o.headers, "content-type") then
      o.headers["Content-Type"] = "application/json"
    end
    opts = o
  end
  return self._core:fetch(url, opts)
end

-- An SSE client (the browser's EventSource, for Lua): see lua/sse/eventsource.lua.
function App:eventsource(url, opts)
  return require("sse.eventsource").new(self, url, opts)
end

-- A stream route relaying another SSE server's events (lua/sse/relay.lua, docs/relay.md).
function App:relay(pattern, upstream, opts)
  return require("sse.relay").route(self, pattern, upstream, opts)
end

-- ---- requests ----

local function add_cors(self, req, headers)
  local cors = self._cors
  if cors == "*" then
    headers["Access-Control-Allow-Origin"] = "*"
  elseif cors then
    local origin = req.headers.origin
    if origin and cors.origins[origin] then
      headers["Access-Control-Allow-Origin"] = origin
      if cors.credentials then
        headers["Access-Control-Allow-Credentials"] = "true"
      end
    end
    headers["Vary"] = "Origin"
  end
  return headers
end

local function is_file(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__name == "sse.file"
end

-- Shapes what a handler returned (body | status, body | status, body, headers) into
-- status, body (a string, an sse.file or nil), headers.
local function response(self, req, a, b, c)
  local status, body, headers
  if math.type(a) == "integer" then
    status, body, headers = a, b, c
  else
    status, body, headers = nil, a, nil
  end
  local out = header_values(headers, "handler returned headers")
  local btype = type(body)
  if btype == "table" then
    body = cjson.encode(body)
    if not has_header(out, "content-type") then
      out["Content-Type"] = "application/json"
    end
  elseif btype == "string" or btype == "number" then
    body = tostring(body)
    if not has_header(out, "content-type") then
      out["Content-Type"] = "text/plain; charset=utf-8"
    end
  elseif body ~= nil and not (btype == "userdata" and is_file(body)) then
    -- (a file is passed on untouched: C sends it from its descriptor, never as a string)
    error("handler returned a " .. btype .. " body", 0)
  end
  status = status or (body == nil and 204 or 200)
  if status < 200 or status > 999 then
    -- 1xx are the protocol's own (100 Continue, 101 upgrades), never a handler's answer
    error("handler returned status " .. status .. " (a response status is 200 to 999)", 0)
  end
  return status, body, add_cors(self, req, out)
end

local function plain(self, req, status, text, headers)
  headers = headers or {}
  headers["Content-Type"] = "text/plain; charset=utf-8"
  return status, text, add_cors(self, req, headers)
end

local function preflight(self, req)
  local headers = add_cors(self, req, {})
  headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
  local asked = req.headers["access-control-request-headers"]
  if asked then
    headers["Access-Control-Allow-Headers"] = asked
  end
  headers["Access-Control-Max-Age"] = "86400"
  return 204, nil, headers
end

-- Does Accept-Encoding allow gzip? An explicit "gzip" (with q > 0) decides; else "*".
-- ("gzip", "gzip;q=0.5", "*" yes; "gzip;q=0", "*;q=0, identity" no)
local function accepts_gzip(header)
  if not header then
    return false
  end
  local star
  for item in header:lower():gmatch("[^,]+") do
    local coding, params = item:match("^%s*([%w%*%-]+)%s*(.*)$")
    local q = tonumber(params and params:match("q%s*=%s*([%d%.]+)") or "1") or 0
    if coding == "gzip" then
      return q > 0
    elseif coding == "*" then
      star = q > 0
    end
  end
  return star or false
end

local function stream_headers(self, req, route)
  local headers = {}
  for k, v in pairs(route.headers) do
    headers[k] = v
  end
  return add_cors(self, req, headers)
end

-- The message handler of user code: a refusal (req:json()'s 400) stays as it is, any
-- other error gets its traceback.
local function on_error(e)
  if request.is_refusal(e) then return e end
  return traceback(e)
end

-- Runs a user function on req: true and what it returned, or false and the answer to
-- send instead (its refusal, or 500 for an error, which is logged).
local function call_user(self, req, what, fn)
  local ok, a, b, c = xpcall(fn, on_error, req)
  if ok then
    return true, a, b, c
  end
  if request.is_refusal(a) then
    return false, plain(self, req, a.status, a.message .. "\n")
  end
  self:_log("error", req.method .. " " .. req.path .. ": " .. what .. ": " .. tostring(a))
  return false, plain(self, req, 500, "internal server error\n")
end

-- A handler's values as a response, or 500 (logged) when they are not one.
local function user_response(self, req, what, a, b, c)
  local good, status, body, headers = pcall(response, self, req, a, b, c)
  if not good then
    self:_log("error", req.method .. " " .. req.path .. ": " .. what .. ": " .. tostring(status))
    return plain(self, req, 500, "internal server error\n")
  end
  return status, body, headers
end

-- Methods a server is expected to know (RFC 9110): 404/405 for these; another method
-- that no route uses is one this server does not implement at all: 501.
local STANDARD_METHODS = {
  GET = true, HEAD = true, POST = true, PUT = true, DELETE = true, PATCH = true,
  OPTIONS = true, CONNECT = true, TRACE = true,
}

-- Methods whose routes take no request body: such a request announcing one is refused
-- (413) before any of it is read.
local BODYLESS = { GET = true, HEAD = true, DELETE = true, OPTIONS = true, TRACE = true }

-- The route for req, or nil and the answer when there is none: 501 for a method no route
-- uses (unless standard), 405 with Allow, 404.
function App:_find(req)
  local route, params, allowed = self._routes:match(req.method, req.path)
  if route then
    return route, params
  end
  if not STANDARD_METHODS[req.method] and not self._methods[req.method] then
    return nil, plain(self, req, 501, "method not implemented\n")
  end
  if allowed and #allowed > 0 then
    return nil, plain(self, req, 405, "method not allowed\n", { Allow = concat(allowed, ", ") })
  end
  return nil, plain(self, req, 404, "not found\n")
end

-- Called by C when a request announces a body, before any of it is read: answering now
-- (no route, a route that takes no body) means the body is never read at all.
function App:_admit(req)
  if self._cors and req.method == "OPTIONS" then
    return nil
  end
  local route, status, body, headers = self:_find(req)
  if not route then
    return status, body, headers
  end
  if BODYLESS[route.method] then
    return plain(self, req, 413, "this route takes no request body\n")
  end
  return nil
end

-- Called by C for every complete request. Returns status, body, headers, or
-- fn, req, opts to start a stream.
function App:_dispatch(req)
  local q = req.query
  request.wrap(req)   -- req:json(), req.cookies
  req.last_event_id = req.headers["last-event-id"] or q.lastEventId or q.last_event_id
  if self._cors and req.method == "OPTIONS" and req.headers["access-control-request-method"] then
    return preflight(self, req)
  end
  local route, params, body, headers = self:_find(req)
  if not route then
    return params, body, headers   -- the status, body, headers of the refusal
  end
  req.params = params
  for _, fn in ipairs(self._before) do
    local ok, a, b, c = call_user(self, req, "before", fn)
    if not ok then
      return a, b, c
    end
    if a ~= nil then
      return user_response(self, req, "before", a, b, c)
    end
  end
  -- A stream may refuse before its first byte (404 for an unknown room, 401, 502 from a
  -- relay): once the generator runs, the client already has its 200.
  if route.accept then
    local ok, a, b, c = call_user(self, req, "accept", route.accept)
    if not ok then
      return a, b, c
    end
    if a ~= nil then
      return user_response(self, req, "accept", a, b, c)
    end
  end
  if route.stream then
    headers = stream_headers(self, req, route)
    local gzip = route.gzip
    if gzip == nil then
      gzip = self._gzip
    end
    if gzip then
      headers["Vary"] = headers["Vary"] and headers["Vary"] .. ", Accept-Encoding" or "Accept-Encoding"
      gzip = accepts_gzip(req.headers["accept-encoding"])
      if gzip then
        headers["Content-Encoding"] = "gzip"
      end
    end
    if req.method == "HEAD" then   -- the headers a GET would get, no stream
      headers["Content-Type"] = headers["Content-Type"] or "text/event-stream"
      headers["Cache-Control"] = headers["Cache-Control"] or "no-cache"
      return 200, nil, headers
    end
    return route.stream, req, {
      headers = headers,
      heartbeat = route.heartbeat,
      retry = route.retry,
      format = route.format,
      gzip = gzip,
      first = route.first,
    }
  end
  local ok, a, b, c = call_user(self, req, "handler", route.handler)
  if not ok then
    return a, b, c
  end
  return user_response(self, req, "handler", a, b, c)
end

-- ---- the loop ----

local function read_file(path, what)
  local f, err, code = io.open(path, "rb")
  if not f then
    return nil, "tls " .. what .. ": " .. err, code == 2 and "ENOENT" or "EACCES"
  end
  local text = f:read("a")
  f:close()
  return text
end

local run_worker

-- Workers: the parent reserves the port (SO_REUSEPORT, not listening) and starts the
-- workers, each listening on it from its own process (sse_workers.c); listen returns once
-- they all do, so the URL it gives is served. run() then supervises them.
local function start_workers(self)
  if next(self._channels) and not self._broker then
    error("app:listen: with workers > 1 channels need a broker (app option broker): each "
      .. "worker process would have channels of its own", 3)
  end
  local r, why = core.reserve_port(self.host, self._port)
  if not r then
    return nil, why, why:find("in use", 1, true) and "EADDRINUSE" or "EIO"
  end
  self._reservation = r
  self.port = r.port
  local host = self.host:find(":", 1, true) and "[" .. self.host .. "]" or self.host
  self.url = (self._tls and "https://" or "http://") .. host .. ":" .. self.port
  local sup, err = core.workers_start({
    n = self._workers,
    drain = self._shutdown_timeout,
    run = function(index) return run_worker(self, index) end,
    log = function(level, msg) self:_log(level, msg) end,
  })
  if not sup then
    r:close()
    self._reservation = nil
    return nil, err, "EWORKERS"
  end
  self._supervisor = sup
  return true
end

function App:listen()
  if self._workers > 1 then
    return start_workers(self)
  end
  local cert, key, err, code
  if self._tls then
    cert, err, code = read_file(self._tls.cert, "cert")
    if not cert then return nil, err, code end
    key, err, code = read_file(self._tls.key, "key")
    if not key then return nil, err, code end
  end
  local ok
  ok, err, code = self._core:listen(cert, key, self._tls and self._tls.priorities)
  if not ok then
    return nil, err, code
  end
  self.port = self._core.port
  local host = self.host:find(":", 1, true) and "[" .. self.host .. "]" or self.host
  self.url = (self._tls and "https://" or "http://") .. host .. ":" .. self.port
  self._stopping = false
  self.listening = true
  return true
end

local function shutdown(self)
  self._stopping = false
  self._core:shutdown(self._shutdown_timeout)
  self.listening = false
  if self._signals then          -- app:catch_signals: the app is done with them
    self._core:catch_signals(nil)
    self._signals = false
  end
end

-- ---- figures ----

-- app:stats() -> { connections, streams, subscribers, channels, events_sent, bytes_sent,
-- dropped_slow, publishes, uptime, requests, heartbeats, streams_started, worker,
-- channel_list = { { name, subscribers, publishes, history }, ... } }: this process's.
function App:stats()
  local t = self._core:stats()
  t.worker = self.worker
  return t
end

local METRICS = {
  -- name, type, help, field of app:stats()
  { "sse_connections", "gauge", "Open TCP connections.", "connections" },
  { "sse_streams", "gauge", "Open event streams.", "streams" },
  { "sse_subscribers", "gauge", "Channel subscriptions of open streams.", "subscribers" },
  { "sse_channels", "gauge", "Channels in memory (in use, or idle keeping their history).", "channels" },
  { "sse_channels_evicted_total", "counter",
    "Idle channels freed with their history to stay within max_channels.", "channels_evicted" },
  { "sse_channels_refused_total", "counter",
    "New channels refused: max_channels reached with every channel in use.", "channels_refused" },
  { "sse_streams_started_total", "counter", "Event streams started.", "streams_started" },
  { "sse_events_sent_total", "counter", "Events (and comments) queued to streams, not heartbeats.",
    "events_sent" },
  { "sse_heartbeats_total", "counter", "Heartbeat comments sent to idle streams.", "heartbeats" },
  { "sse_sent_bytes_total", "counter", "Stream body bytes handed to the network (after gzip).", "bytes_sent" },
  { "sse_dropped_slow_total", "counter", "Clients dropped for falling past queue_limit.", "dropped_slow" },
  { "sse_publishes_total", "counter", "Events delivered to channels.", "publishes" },
  { "sse_requests_total", "counter", "Requests answered (responses and streams).", "requests" },
  { "sse_uptime_seconds", "gauge", "Seconds since the app was created.", "uptime" },
}

-- A label value: valid UTF-8 (Prometheus refuses anything else: an invalid byte of a
-- name becomes U+FFFD), with backslash, double quote and newline escaped.
local function label(v)
  v = tostring(v)
  if not utf8.len(v) then
    local out, i = {}, 1
    while true do
      local ok, bad = utf8.len(v, i)
      if ok then
        out[#out + 1] = v:sub(i)
        break
      end
      out[#out + 1] = v:sub(i, bad - 1)
      out[#out + 1] = "\u{FFFD}"
      i = bad + 1
    end
    v = concat(out)
  end
  return (v:gsub("[\\\n\"]", { ["\\"] = "\\\\", ["\n"] = "\\n", ['"'] = '\\"' }))
end

-- The figures in the Prometheus text exposition format (version 0.0.4).
function App:_metrics_text()
  local st = self:stats()
  local out = {}
  local worker = st.worker and ('{worker="' .. st.worker .. '"}') or ""
  for _, m in ipairs(METRICS) do
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n%s%s %s"):format(m[1], m[3], m[1], m[2], m[1], worker,
      math.type(st[m[4]]) == "integer" and st[m[4]] or ("%.3f"):format(st[m[4]]))
  end
  out[#out + 1] = "# HELP sse_channel_subscribers Subscribers of a channel.\n# TYPE sse_channel_subscribers gauge"
  for _, ch in ipairs(st.channel_list) do
    out[#out + 1] = ('sse_channel_subscribers{channel="%s"} %d'):format(label(ch.name), ch.subscribers)
  end
  out[#out + 1] = "# HELP sse_channel_publishes_total Events delivered to a channel.\n"
    .. "# TYPE sse_channel_publishes_total counter"
  for _, ch in ipairs(st.channel_list) do
    out[#out + 1] = ('sse_channel_publishes_total{channel="%s"} %d'):format(label(ch.name), ch.publishes)
  end
  return concat(out, "\n") .. "\n"
end

-- app:metrics(path): GET path answers the figures for Prometheus (this process's; with
-- workers each worker answers for itself, labelled worker="N").
function App:metrics(path)
  if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
    error("app:metrics: path must start with '/'", 2)
  end
  return self:get(path, function()
    return 200, self:_metrics_text(), { ["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8" }
  end)
end

-- app:status_page(path): a live page of these figures at path, fed by its own stream at
-- path .. "/events" (lua/sse/status.lua).
function App:status_page(path)
  if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
    error("app:status_page: path must start with '/'", 2)
  end
  return require("sse.status").mount(self, path)
end

-- ---- embedding in another event loop ----

-- The one descriptor a host loop waits on: readable when the app has work (then call
-- app:step(0)); with app:timeout(), the longest the host may wait before calling it.
function App:pollfd()
  return self._core:pollfd()
end

function App:timeout()
  if self._stopping then return 0 end
  return self._core:timeout()
end

-- For a loop of your own (app:run does this itself): SIGINT and SIGTERM no longer kill the
-- process or raise "interrupted!" in the middle of a turn; they stop the app gracefully
-- (streams end cleanly) at the end of the current step, after which app.listening is
-- false. The signals are delivered through app:pollfd(), so a host loop wakes for them.
function App:catch_signals()
  self._core:catch_signals(function() self._stopping = true end)
  self._signals = true
  return self
end

function App:step(timeout)
  if self._in_step then
    error("app:step: called from inside the loop", 2)
  end
  self._in_step = true
  local ok, err = pcall(self._core.step, self._core, timeout or 0)
  self._in_step = false
  if not ok then
    error(err, 0)
  end
  if self._stopping and self._core.listening then
    shutdown(self)
  end
end

-- A worker's life: its own loop on the shared port, its log lines marked with its index.
function run_worker(self, index)
  self.worker = index
  self._reservation:close()
  self._workers = 1              -- from here on a single-process app
  local log = self._logger
  if log then
    self._logger = function(level, msg) log(level, "worker " .. index .. ": " .. msg) end
  end
  self._core:forked(self.port)
  local ok, err = self:listen()
  if not ok then
    self:_log("error", "cannot listen: " .. tostring(err))
    return 1
  end
  core.worker_ready()
  self:run()
  return 0
end

function App:run()
  if self._workers > 1 then
    if not self._supervisor then
      local ok, err, code = self:listen()
      if not ok then return nil, err, code end
    end
    local sup = self._supervisor
    self._supervisor = nil
    sup:supervise()
    self._reservation:close()
    return true
  end
  if not self._core.listening then
    local ok, err, code = self:listen()
    if not ok then
      return nil, err, code
    end
  end
  self._core:catch_signals(function()
    self._stopping = true
  end)
  while not self._stopping do
    self._in_step = true
    local ok, err = pcall(self._core.step, self._core, -1)
    self._in_step = false
    if not ok then
      self._core:catch_signals(nil)
      error(err, 0)
    end
  end
  shutdown(self)
  self._core:catch_signals(nil)
  return true
end

-- Stops accepting, ends every stream cleanly and returns once they are done (at most
-- shutdown_timeout seconds). From inside a handler, timer or stream it takes effect
-- when the current loop turn ends.
function App:stop()
  self._stopping = true
  if not self._in_step and self._core.listening then
    shutdown(self)
  end
end

return M
