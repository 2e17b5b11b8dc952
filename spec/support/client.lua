-- Test client for the server specs: real TCP sockets (luasocket) against an app running in
-- the busted process. The test drives the app with app:step() while reading the sockets, so
-- every wait here steps the app, reads what arrived and gives up at a deadline with a message
-- showing what was received. Nothing here knows the server's internals: it sees bytes.
--
--   local app, logs = client.app{ heartbeat = false }   -- port 0, log captured into logs
--   app:stream("/events", fn); assert(app:listen())
--   local c = client.connect(app, "/events")           -- raw HTTP/1.1 request
--   c:wait_events(3)  c:wait_end()                     -- c.res, c.body, c.events, c.terminal
--   local res = client.request(app, "GET", "/x")        -- res.status, res.headers, res.body
--   local cu = client.curl(app, "/events")              -- curl -sN in the background
--   after_each(client.cleanup)                          -- sockets, curls, apps, temp files
local socket = require("socket")
local sse = require("sse")

local M = {}

local gettime = socket.gettime
local STEP = 0.005          -- seconds one app:step may block while waiting
M.TIMEOUT = 3               -- default deadline of a wait, seconds

local open_clients = {}     -- clients whose sockets may still be read (pumped on every step)
local apps = {}             -- apps made by M.app, stopped by M.cleanup
local curls = {}            -- background curl processes, killed by M.cleanup
local tmpfiles = {}

-- Bytes made readable in a failure message: CR and LF shown, long text cut in the middle.
local function show(s, max)
  max = max or 1500
  if #s > max then
    s = s:sub(1, max // 2) .. ("\n... [%d bytes cut] ...\n"):format(#s - max) .. s:sub(-max // 2)
  end
  return (s:gsub("\r", "\\r"):gsub("\n", "\\n\n"):gsub("%z", "\\0"))
end
M.show = show

------------------------------------------------------------------------------------------
-- Apps

-- sse.app with port 0, loopback, and a log that is captured instead of printed.
-- Returns app, logs; logs is a list of { level = ..., message = ... }.
function M.app(opts)
  opts = opts or {}
  local logs = {}
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  if o.port == nil then o.port = 0 end
  if o.host == nil then o.host = "127.0.0.1" end
  if o.log == nil then
    o.log = function(level, message)
      logs[#logs + 1] = { level = level, message = tostring(message) }
    end
  end
  local app = sse.app(o)
  apps[#apps + 1] = app
  return app, logs
end

-- The first log entry whose message contains every given plain substring (case-insensitive).
function M.find_log(logs, ...)
  local wanted = { ... }
  for _, entry in ipairs(logs) do
    local msg = entry.message:lower()
    local all = true
    for _, w in ipairs(wanted) do
      if not msg:find(w:lower(), 1, true) then all = false break end
    end
    if all then return entry end
  end
  return nil
end

function M.show_logs(logs)
  local out = {}
  for i, e in ipairs(logs) do out[i] = ("[%s] %s"):format(tostring(e.level), e.message) end
  return #out > 0 and table.concat(out, "\n") or "(no log lines)"
end

------------------------------------------------------------------------------------------
-- HTTP response parsing

local function parse_head(raw)
  local head_end = raw:find("\r\n\r\n", 1, true)
  if not head_end then return nil end
  local head = raw:sub(1, head_end - 1)
  local status_line = head:match("^[^\r\n]*")
  local version, status, reason = status_line:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
  if not version then error("malformed status line: " .. show(status_line), 0) end
  local res = {
    version = version, status = tonumber(status), reason = reason,
    headers = {},       -- lower-case name -> value (repeated headers joined with ", ")
    header_list = {},   -- { name, value } in order, names as sent
    body_start = head_end + 4,
  }
  for line in head:sub(#status_line + 3):gmatch("[^\r\n]+") do
    local name, value = line:match("^([^:%s]+):[ \t]*(.-)[ \t]*$")
    if not name then error("malformed header line: " .. show(line), 0) end
    res.header_list[#res.header_list + 1] = { name, value }
    local key = name:lower()
    res.headers[key] = res.headers[key] and (res.headers[key] .. ", " .. value) or value
  end
  return res
end

-- How many times a header (any case) appears in a response.
function M.header_count(res, name)
  local n = 0
  for _, h in ipairs(res.header_list) do
    if h[1]:lower() == name:lower() then n = n + 1 end
  end
  return n
end

-- Decodes chunks of raw starting at pos. Returns the decoded bytes, the position after the
-- last complete chunk, and whether the terminal chunk (0 CRLF CRLF, no trailers) arrived.
-- Raises on malformed framing.
local function decode_chunks(raw, pos)
  local parts = {}
  while true do
    local line_end = raw:find("\r\n", pos, true)
    if not line_end then break end
    local size_line = raw:sub(pos, line_end - 1)
    local hex = size_line:match("^(%x+)[ \t]*;?.*$")
    if not hex then
      error(("malformed chunk size line %q at byte %d of:\n%s"):format(size_line, pos, show(raw)), 0)
    end
    local size = tonumber(hex, 16)
    if size == 0 then
      -- last-chunk, then (no trailers expected) an empty line
      if #raw >= line_end + 3 then
        if raw:sub(line_end + 2, line_end + 3) ~= "\r\n" then
          error("unexpected trailer after the last chunk:\n" .. show(raw:sub(line_end + 2)), 0)
        end
        return table.concat(parts), line_end + 4, true
      end
      break
    end
    local data_start, data_end = line_end + 2, line_end + 1 + size
    if #raw < data_end + 2 then break end
    if raw:sub(data_end + 1, data_end + 2) ~= "\r\n" then
      error(("chunk of %d bytes not followed by CRLF at byte %d of:\n%s"):format(size, data_end + 1, show(raw)), 0)
    end
    parts[#parts + 1] = raw:sub(data_start, data_end)
    pos = data_end + 3
  end
  return table.concat(parts), pos, false
end
M.decode_chunks = decode_chunks

-- Parses a whole response (as far as it arrived). closed: the peer closed the connection.
-- no_body: the request was HEAD (or the status has no body).
-- Returns nil while the head is incomplete, else a table with status, headers, header_list,
-- chunked, body (decoded so far), terminal (last chunk seen), complete.
function M.parse_response(raw, closed, no_body)
  local res = parse_head(raw)
  if not res then return nil end
  local te = res.headers["transfer-encoding"]
  res.chunked = te ~= nil and te:lower():find("chunked", 1, true) ~= nil
  local s = res.status
  if no_body or s == 204 or s == 304 or (s >= 100 and s < 200) then
    res.body, res.complete = "", true
  elseif res.chunked then
    local body, _, terminal = decode_chunks(raw, res.body_start)
    res.body, res.terminal, res.complete = body, terminal, terminal
  elseif res.headers["content-length"] then
    local len = tonumber(res.headers["content-length"])
    res.body = raw:sub(res.body_start, res.body_start + len - 1)
    res.complete = #res.body == len
  else
    res.body = raw:sub(res.body_start)
    res.complete = closed and true or false
  end
  return res
end

------------------------------------------------------------------------------------------
-- Clients

local Client = {}
Client.__index = Client
Client.__name = "spec.client"

local function build_request(app, method, path, opts)
  local lines = { ("%s %s HTTP/%s"):format(method, path, opts.version or "1.1") }
  local headers = opts.headers or {}
  local has = {}
  for name in pairs(headers) do has[name:lower()] = true end
  if not has.host then lines[#lines + 1] = ("Host: 127.0.0.1:%d"):format(app.port) end
  if not has["user-agent"] then lines[#lines + 1] = "User-Agent: lua-sse-spec" end
  for name, value in pairs(headers) do
    lines[#lines + 1] = ("%s: %s"):format(name, value)
  end
  if opts.body and not has["content-length"] then
    lines[#lines + 1] = ("Content-Length: %d"):format(#opts.body)
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (opts.body or "")
end

local function tcp_connect(app, opts)
  assert(app.port and app.port > 0, "app is not listening (call app:listen() first)")
  local sock = assert(socket.tcp4())
  if opts.rcvbuf then assert(sock:setoption("recv-buffer-size", opts.rcvbuf)) end
  sock:settimeout(2)
  local ok, err = sock:connect("127.0.0.1", app.port)
  if not ok then
    sock:close()
    return nil, err
  end
  return sock
end

-- Opens a connection and sends one raw HTTP/1.1 request. opts: method (default GET),
-- headers (name -> value), body, read (false: the client does not read until c:start_reading()),
-- discard (true: count bytes but keep only the head and the last bytes: for large streams),
-- rcvbuf (SO_RCVBUF before connecting), accept (default "text/event-stream"), version
-- (default "1.1"). Returns a client that collects the raw bytes as the app is stepped.
function M.connect(app, path, opts)
  opts = opts or {}
  local sock, err = tcp_connect(app, opts)
  if not sock then error(("connect to port %s failed: %s"):format(tostring(app.port), tostring(err)), 2) end
  local headers = {}
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local has_accept = false
  for k in pairs(headers) do if k:lower() == "accept" then has_accept = true end end
  if not has_accept and opts.accept ~= false then headers.Accept = opts.accept or "text/event-stream" end
  local request = build_request(app, opts.method or "GET", path,
    { headers = headers, body = opts.body, version = opts.version })
  assert(sock:send(request))
  sock:settimeout(0)
  local c = setmetatable({
    app = app, sock = sock, path = path,
    method = opts.method or "GET",
    raw = "", bytes = 0, tail = "",
    reading = opts.read ~= false,
    discard = opts.discard or false,
    closed = false,          -- the peer closed (EOF or reset)
    close_error = nil,       -- "closed" or the socket error that ended it
    opened_at = gettime(),
    res = nil,               -- parsed head once it arrived
    body = "",               -- decoded body so far
    terminal = false,        -- the terminal chunk 0 CRLF CRLF arrived
    cpos = nil,              -- next undecoded byte of raw (chunked)
    parser = sse.parser(),
    events = {},             -- events a browser would dispatch, in order
    event_times = {},        -- gettime() when each event was read
  }, Client)
  open_clients[c] = true
  return c
end

-- Reads whatever is available now, without stepping the app.
function Client:pump()
  if not self.sock or self.closed or not self.reading then return end
  for _ = 1, 64 do
    local data, err, partial = self.sock:receive(65536)
    local got = data or partial
    if got and #got > 0 then self:_take(got) end
    if err == "timeout" then break end
    if err then
      self.closed, self.close_error = true, err
      open_clients[self] = nil
      break
    end
  end
end

function Client:_take(got)
  self.bytes = self.bytes + #got
  if self.discard and self.res then
    self.tail = (self.tail .. got):sub(-64)
    return
  end
  self.raw = self.raw .. got
  self.tail = self.raw:sub(-64)
  if not self.res then
    self.res = parse_head(self.raw)
    if not self.res then return end
    self.cpos = self.res.body_start
    self.res.chunked = (self.res.headers["transfer-encoding"] or ""):lower():find("chunked", 1, true) ~= nil
    if self.discard then return end
  end
  local new
  if self.res.chunked then
    local decoded, pos, terminal = decode_chunks(self.raw, self.cpos)
    new, self.cpos = decoded, pos
    if terminal then self.terminal = true end
  else
    new = self.raw:sub(self.cpos)
    self.cpos = #self.raw + 1
  end
  if #new > 0 then
    self.body = self.body .. new
    local now = gettime()
    for _, ev in ipairs(self.parser:feed(new)) do
      self.events[#self.events + 1] = ev
      self.event_times[#self.event_times + 1] = now
    end
  end
end

-- In discard mode the terminal chunk is recognised from the last bytes.
function Client:ended_cleanly()
  if self.discard then return self.tail:sub(-7) == "\r\n0\r\n\r\n" or self.tail == "0\r\n\r\n" end
  return self.terminal
end

function Client:start_reading() self.reading = true end

function Client:close()
  if self.sock then self.sock:close() end
  self.sock = nil
  open_clients[self] = nil
end

-- The data of the events received so far, in order.
function Client:data()
  local out = {}
  for i, ev in ipairs(self.events) do out[i] = ev.data end
  return out
end

-- Lines starting with ":" in the body so far (heartbeats and comments).
function Client:comments()
  local out = {}
  for line in self.body:gmatch("[^\r\n]*") do
    if line:sub(1, 1) == ":" then out[#out + 1] = line end
  end
  return out
end

function Client:describe()
  return ("client %s %s: %d bytes received%s%s:\n%s\nevents so far: %d"):format(
    self.method, self.path, self.bytes,
    self.closed and (", connection closed (" .. tostring(self.close_error) .. ")") or "",
    self.terminal and ", terminal chunk seen" or "",
    show(self.raw), #self.events)
end

-- Steps the app and reads every open client until cond(self) is true. cond is a function,
-- or a string that must appear in the raw bytes. Fails with what was received after timeout.
function Client:wait_for(cond, timeout, what)
  local fn = cond
  if type(cond) == "string" then
    what = what or ("raw bytes containing " .. show(cond))
    fn = function(c) return c.raw:find(cond, 1, true) ~= nil end
  end
  return M.wait(self.app, function() return fn(self) end, timeout, what, function() return self:describe() end)
end

function Client:wait_head(timeout)
  self:wait_for(function(c) return c.res ~= nil end, timeout, "the response head")
  return self.res
end

function Client:wait_events(n, timeout)
  self:wait_for(function(c) return #c.events >= n end, timeout, ("%d events"):format(n))
  return self.events
end

-- Waits for the end of the response: the terminal chunk and the server closing the connection.
function Client:wait_end(timeout)
  self:wait_for(function(c) return c:ended_cleanly() end, timeout, "the terminal chunk 0\\r\\n\\r\\n")
  return self
end

function Client:wait_closed(timeout)
  self:wait_for(function(c) return c.closed end, timeout, "the server closing the connection")
  return self
end

------------------------------------------------------------------------------------------
-- Stepping and waiting

-- One turn of the app's loop, then read every open client.
function M.step(app, timeout)
  app:step(timeout or STEP)
  for c in pairs(open_clients) do c:pump() end
end

-- Steps until cond() is true or timeout seconds pass; then fails showing what was seen.
-- Returns the seconds waited.
function M.wait(app, cond, timeout, what, detail)
  timeout = timeout or M.TIMEOUT
  local start = gettime()
  local deadline = start + timeout
  while true do
    if cond() then return gettime() - start end
    if gettime() >= deadline then break end
    M.step(app)
  end
  if cond() then return gettime() - start end
  local msg = ("timed out after %.2f s waiting for %s"):format(timeout, what or "a condition")
  if detail then msg = msg .. "\n" .. detail() end
  error(msg, 2)
end

-- Steps the app for about `seconds`, reading clients meanwhile.
function M.run_for(app, seconds)
  local deadline = gettime() + seconds
  while gettime() < deadline do M.step(app) end
end

------------------------------------------------------------------------------------------
-- Plain requests

-- Sends one request with Connection: close and waits for the whole response.
-- opts: headers, body, timeout. Returns the parsed response: status, headers (lower-case
-- names), header_list, body.
function M.request(app, method, path, opts)
  opts = opts or {}
  local headers = { Connection = "close" }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  local c = M.connect(app, path, { method = method, headers = headers, body = opts.body, accept = false })
  local res
  M.wait(app, function()
    res = M.parse_response(c.raw, c.closed, method == "HEAD")
    return res ~= nil and res.complete
  end, opts.timeout, ("the response to %s %s"):format(method, path), function() return c:describe() end)
  c:close()
  res.raw = c.raw
  return res
end

------------------------------------------------------------------------------------------
-- curl -N in the background

local Curl = {}
Curl.__index = Curl

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Starts `curl -sN url` writing the body to a temporary file. opts: args (extra arguments,
-- a string), max_time (seconds, default 15: curl never outlives a broken test by long).
function M.curl(app, path, opts)
  opts = opts or {}
  local file = os.tmpname()
  tmpfiles[#tmpfiles + 1] = file
  local cmd = ("curl -sN --max-time %d %s %s > %s 2>&1 & echo $!"):format(
    opts.max_time or 15, opts.args or "", shell_quote(app.url .. path), shell_quote(file))
  local p = assert(io.popen(cmd))
  local pid = p:read("*l")
  p:close()
  assert(pid and pid:match("^%d+$"), "could not start curl")
  local cu = setmetatable({ app = app, pid = pid, file = file, content = "",
                            started_at = gettime(), snapshots = {} }, Curl)
  curls[cu] = true
  return cu
end

-- Reads the output file; records (time, content) whenever it grew.
function Curl:read()
  local f = io.open(self.file, "rb")
  local content = f and f:read("a") or ""
  if f then f:close() end
  if content ~= self.content then
    self.content = content
    self.snapshots[#self.snapshots + 1] = { t = gettime(), content = content }
  end
  return content
end

-- The events a browser would dispatch from what curl has written so far.
function Curl:events(content)
  return sse.parser():feed(content or self.content)
end

-- Whether curl still runs (a zombie, never reaped in some containers, counts as exited).
function Curl:running()
  local f = io.open("/proc/" .. self.pid .. "/stat", "r")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

function Curl:wait_for(cond, timeout, what)
  return M.wait(self.app, function() self:read() return cond(self) end, timeout, what,
    function() return ("curl output so far:\n%s"):format(show(self.content)) end)
end

function Curl:kill()
  if curls[self] then
    os.execute("kill " .. self.pid .. " 2>/dev/null")
    curls[self] = nil
  end
end

-- Runs a shell command and returns what it printed (stdout and stderr).
function M.sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return out
end

------------------------------------------------------------------------------------------
-- Cleanup (after_each): close sockets, kill curls, stop apps.

function M.cleanup()
  for c in pairs(open_clients) do c:close() end
  open_clients = {}
  for cu in pairs(curls) do cu:kill() end
  for _, app in ipairs(apps) do
    pcall(app.stop, app)
    for _ = 1, 3 do pcall(app.step, app, 0) end
  end
  apps = {}
  for _, f in ipairs(tmpfiles) do os.remove(f) end
  tmpfiles = {}
end

-- A fresh temporary directory (removed by the caller with M.rmdir).
function M.tmpdir()
  local p = assert(io.popen("mktemp -d"))
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return dir
end

function M.rmdir(dir)
  assert(dir:match("^/tmp/"), "refusing to remove " .. dir)
  os.execute("rm -rf " .. shell_quote(dir))
end

function M.write_file(path, content)
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
end

-- Runs fn in an app coroutine (app:spawn) and steps the app until it returns; gives its
-- results. For what only an app coroutine may do: app:fetch, app:sleep, app:eventsource.
function M.in_app(app, fn, timeout)
  local out
  app:spawn(function() out = table.pack(fn()) end)
  M.wait(app, function() return out ~= nil end, timeout or 5, "the app coroutine")
  return table.unpack(out, 1, out.n)
end

-- Descriptors a process has open (pid: a number, default this process).
function M.fd_count(pid)
  if not pid then   -- "self" in the command would be the shell's: this process's own pid
    local f = assert(io.open("/proc/self/stat"))
    pid = f:read("a"):match("^(%d+)")
    f:close()
  end
  local p = io.popen("ls /proc/" .. tostring(pid) .. "/fd 2>/dev/null | wc -l")
  local n = tonumber(p:read("a"))
  p:close()
  return n
end

-- A process's resident memory in KB (pid: a number, default this process), or nil.
function M.rss_kb(pid)
  local f = io.open("/proc/" .. tostring(pid or "self") .. "/status")
  if not f then return nil end
  local kb = f:read("a"):match("VmRSS:%s*(%d+)")
  f:close()
  return tonumber(kb)
end

-- A whole file's bytes, or nil when it cannot be opened.
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Is the process running (not gone, not a zombie waiting for its parent)?
function M.alive(pid)
  local stat = M.read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("%) (%a)") ~= "Z"
end

-- A process's CPU time so far (user + system) in clock ticks (USER_HZ, 100 per second).
function M.cpu_ticks(pid)
  local stat = assert(M.read_file("/proc/" .. pid .. "/stat"), "process " .. pid .. " is gone")
  local fields = {}
  for f in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = f end
  -- after "pid (comm)": field 3 is fields[1]; utime is field 14, stime field 15
  return tonumber(fields[12]) + tonumber(fields[13])
end

-- Polls cond() every `step` seconds (10 ms) until it returns a true value or `timeout`
-- seconds pass; returns that value, or cond()'s last answer at the deadline. For waits on
-- other processes; a wait on an app of this process steps it instead (M.wait).
function M.wait_until(cond, timeout, step)
  local deadline = gettime() + timeout
  repeat
    local v = cond()
    if v then return v end
    socket.sleep(step or 0.01)
  until gettime() > deadline
  return cond()
end

M.gettime = gettime
M.shell_quote = shell_quote

return M
