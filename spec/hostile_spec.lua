-- Hostile clients (issue 8): each case attacks a server running as a separate process
-- (spec/fixtures/hostile_app.lua) over raw sockets, so every byte is ours, while a healthy
-- client in a process of its own reads the /tick stream (one event every 50 ms). Each case
-- asserts (a) what the attacker gets (a status line, or that the connection is closed),
-- (b) that the healthy stream kept its pace, (c) that the server's CPU over one second is
-- under 10 % of a core while the hostile connections sit idle or open, and (d) that its
-- descriptor count returns to where it was once they are gone.
--
-- HOSTILE_TREE=/path/to/checkout selects the tree whose lua/ and build/lib/ the server
-- loads (default: this one), e.g. to show that the cases fail on an older commit:
--   HOSTILE_TREE=/tmp/landed busted --lua=lua5.4 spec/hostile_spec.lua
-- HOSTILE_MARGIN=seconds changes the healthy stream's allowed lateness (below);
-- HOSTILE_GAP_LOG=file appends each check's worst gap to that file.
local socket = require("socket")
local client = require("support.client")   -- fd_count, rss_kb

local gettime = socket.gettime

local TREE = os.getenv("HOSTILE_TREE") or "."
local FIXTURE = "spec/fixtures/hostile_app.lua"
local PERIOD = 0.05             -- /tick's period
-- How late an event of the healthy stream may be beyond its period. The issue asks for
-- 50 ms, and that held over 10 runs of this spec on the 2-core test machine (worst gap
-- 97 ms, i.e. 47 ms late) while two fuzzers kept both cores busy beside the server, the
-- healthy client and the spec. Once, with yet another test suite running too, a 160 ms
-- gap showed (on two streams at the same moment): on a busier machine widen it with
-- HOSTILE_MARGIN.
local MARGIN = tonumber(os.getenv("HOSTILE_MARGIN")) or 0.05
local CPU_MAX = 0.10            -- fraction of one core
local CLK_TCK = 100             -- USER_HZ, the unit of utime/stime in /proc/PID/stat

------------------------------------------------------------------------------------------
-- Small helpers

local function show(s, max)
  s = tostring(s)
  max = max or 600
  if #s > max then s = s:sub(1, max) .. ("... [%d more bytes]"):format(#s - max) end
  return (s:gsub("\r", "\\r"):gsub("\n", "\\n"):gsub("%z", "\\0"))
end

local fd_count, rss_kb = client.fd_count, client.rss_kb
local read_all, wait_until, alive, cpu_ticks =
  client.read_file, client.wait_until, client.alive, client.cpu_ticks

local tmp_dirs = {}
local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p " .. d))
  tmp_dirs[#tmp_dirs + 1] = d
  return d
end

------------------------------------------------------------------------------------------
-- Processes: the server and the healthy client

local procs = {}

local function spawn(cmd, out, err)
  local p = io.popen(("( exec %s ) </dev/null >%s 2>%s & echo $!"):format(cmd, out, err))
  local pid = tonumber(p:read("l"))
  p:close()
  assert(pid, "could not start: " .. cmd)
  procs[#procs + 1] = pid
  return pid
end

local function kill(pid)
  if not alive(pid) then return end
  os.execute("kill -TERM " .. pid .. " 2>/dev/null")
  if not wait_until(function() return not alive(pid) end, 3) then
    os.execute("kill -KILL " .. pid .. " 2>/dev/null")
    wait_until(function() return not alive(pid) end, 2)
  end
end

local Server = {}
Server.__index = Server

-- Starts the fixture with options { name = value } (sse.app options) and, optionally,
-- prefix: a command put before lua5.4 (e.g. "prlimit --nofile=64:64").
local function start_server(opts, prefix)
  local so = TREE .. "/build/lib/sse/core.so"
  assert(io.open(so), "no " .. so .. ": build that tree first (cmake --build " .. TREE .. "/build)")
  local dir = tmpdir()
  local args = {}
  for k, v in pairs(opts or {}) do args[#args + 1] = ("%s=%s"):format(k, tostring(v)) end
  table.sort(args)
  local env = ("env LUA_PATH='%s/lua/?.lua;%s/lua/?/init.lua;;' LUA_CPATH='%s/build/lib/?.so;;'")
    :format(TREE, TREE, TREE)
  local cmd = ("%s %s lua5.4 %s %s/port %s"):format(env, prefix or "", FIXTURE, dir,
    table.concat(args, " "))
  local self = setmetatable({ dir = dir, log_path = dir .. "/stderr", opts = opts or {} }, Server)
  self.pid = spawn(cmd, "/dev/null", self.log_path)
  local port = wait_until(function()
    local s = read_all(dir .. "/port")
    return s and tonumber(s:match("%d+")) or (not alive(self.pid) and -1)
  end, 10)
  assert(port and port > 0, ("the server did not start (%s):\n%s"):format(
    table.concat(args, " "), read_all(self.log_path) or ""))
  self.port = port
  return self
end

-- The log as a list of { level, message }.
function Server:log()
  local entries = {}
  for line in (read_all(self.log_path) or ""):gmatch("([^\n]*)\n") do
    local level, msg = line:match("^(%a+): (.*)$")
    entries[#entries + 1] = { level = level or "?", message = msg or line }
  end
  return entries
end

function Server:show_log()
  local out = {}
  for i, e in ipairs(self:log()) do out[i] = ("[%s] %s"):format(e.level, show(e.message, 300)) end
  return #out > 0 and table.concat(out, "\n") or "(empty log)"
end

-- Log entries (optionally of one level) whose message contains every given string
-- (plain, case-insensitive).
function Server:grep(level, ...)
  local wanted, found = { ... }, {}
  for _, e in ipairs(self:log()) do
    if level == nil or e.level == level then
      local msg, all = e.message:lower(), true
      for _, w in ipairs(wanted) do
        if not msg:find(w:lower(), 1, true) then all = false break end
      end
      if all then found[#found + 1] = e end
    end
  end
  return found
end

function Server:stop()
  kill(self.pid)
end

-- The healthy client: a process reading /tick, one arrival time per event in a file.
local Watcher = {}
Watcher.__index = Watcher

local function watch(srv)
  local out = srv.dir .. "/tick"
  local w = setmetatable({ out = out, srv = srv }, Watcher)
  w.pid = spawn(("lua5.4 %s watch %d %s"):format(FIXTURE, srv.port, out), "/dev/null",
    srv.dir .. "/watch.err")
  return w
end

function Watcher:times()
  local t, closed = {}, nil
  for line in (read_all(self.out) or ""):gmatch("([^\n]*)\n") do
    if line:find("^closed") then
      closed = line
    else
      t[#t + 1] = tonumber(line)
    end
  end
  return t, closed
end

function Watcher:wait_events(n)
  assert(wait_until(function() return #self:times() >= n end, 5),
    "the healthy client got no /tick events: " .. (read_all(self.srv.dir .. "/watch.err") or ""))
end

-- The longest wait the healthy client had for an event between `from` and now (the wait
-- still running at the end counts too), and a description.
function Watcher:worst_gap(from)
  local now = gettime()
  local times, closed = self:times()
  local prev, worst, at = nil, 0, nil
  for _, t in ipairs(times) do
    if t >= from then
      if prev then
        if t - prev > worst then worst, at = t - prev, prev end
      end
    end
    prev = t
  end
  if prev and now - prev > worst then worst, at = now - prev, prev end
  local n = 0
  for _, t in ipairs(times) do if t >= from then n = n + 1 end end
  return worst, ("%d events in %.2f s, worst gap %.3f s at +%.3f s%s"):format(n, now - from,
    worst, (at or from) - from, closed and ("; stream " .. closed) or "")
end

------------------------------------------------------------------------------------------
-- Raw connections

local Conn = {}
Conn.__index = Conn

local open_conns = {}

-- A TCP connection to the server, from `source` (default 127.0.0.1). Raises if the
-- connect fails.
local function connect(srv, source)
  local s = socket.tcp()
  if source then assert(s:bind(source, 0)) end
  s:settimeout(3)
  local ok, err = s:connect("127.0.0.1", srv.port)
  assert(ok, "connect: " .. tostring(err))
  s:settimeout(0)
  local c = setmetatable({ s = s, raw = "", closed = false, srv = srv }, Conn)
  open_conns[#open_conns + 1] = c
  return c
end

-- Sends what the socket takes now, without blocking; returns how many bytes went.
function Conn:send_some(data)
  if self.closed then return 0 end
  local last, err, partial = self.s:send(data)
  if last then return last end
  if err == "closed" then self.closed = true end
  return partial or 0
end

-- Sends everything (waiting for the socket at most `timeout` seconds); false if the
-- peer closed or it did not all go.
function Conn:send(data, timeout)
  local deadline, pos = gettime() + (timeout or 2), 1
  while pos <= #data do
    local n = self:send_some(data:sub(pos))
    pos = pos + n
    if self.closed or gettime() > deadline then return false end
    if pos <= #data then socket.select(nil, { self.s }, 0.05) end
  end
  return true
end

-- Reads what has arrived, without blocking.
function Conn:pump()
  if self.closed then return end
  while true do
    local data, err, partial = self.s:receive(65536)
    data = data or partial
    if data and #data > 0 then self.raw = self.raw .. data end
    if err == "closed" or (err and err ~= "timeout") then
      self.closed = true
      self.close_err = err
      return
    end
    if err == "timeout" then return end
  end
end

function Conn:status()
  return tonumber(self.raw:match("^HTTP/1%.[01] (%d%d%d)"))
end

-- The response so far, if its head (and, with Content-Length, its body) arrived.
function Conn:response()
  local head_end = self.raw:find("\r\n\r\n", 1, true)
  if not head_end then return nil end
  local len = tonumber(self.raw:sub(1, head_end):lower():match("\ncontent%-length: *(%d+)"))
  if len and #self.raw < head_end + 3 + len then return nil end
  return self:status()
end

-- Waits until cond(self) or `timeout`; returns the value of cond.
function Conn:wait(cond, timeout)
  local deadline = gettime() + timeout
  while true do
    self:pump()
    local v = cond(self)
    if v or gettime() > deadline then return v end
    socket.select({ self.s }, nil, 0.02)
  end
end

function Conn:wait_closed(timeout)
  return self:wait(function(c) return c.closed end, timeout)
end

function Conn:wait_response(timeout)
  return self:wait(function(c) return c:response() or (c.closed and (c:status() or "closed")) end,
    timeout)
end

function Conn:describe()
  return ("%s; received: %s"):format(self.closed and ("closed (" .. tostring(self.close_err) .. ")")
    or "open", self.raw == "" and "(nothing)" or show(self.raw))
end

function Conn:close()
  self.s:close()
  self.closed = true
end

-- Pumps every connection of `list` until cond() or timeout.
local function wait_all(list, cond, timeout)
  return wait_until(function()
    for _, c in ipairs(list) do c:pump() end
    return cond()
  end, timeout, 0.02)
end

local function close_all(list)
  for _, c in ipairs(list) do c:close() end
end

local function request(path, extra)
  return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n"):format(path, extra or "")
end

------------------------------------------------------------------------------------------
-- The four checks

local H = {}
H.__index = H

-- A server with `opts`, its healthy client reading /tick, and the baseline taken once
-- the stream flows: descriptors and RSS.
local function harness(opts, prefix)
  local srv = start_server(opts, prefix)
  local w = watch(srv)
  w:wait_events(3)
  local self = setmetatable({ srv = srv, w = w, pid = srv.pid }, H)
  self.base_fds = fd_count(srv.pid)
  self.base_rss = rss_kb(srv.pid)
  self.t0 = gettime()
  return self
end

-- (b) no event of the healthy stream later than PERIOD + MARGIN after the previous one,
-- since the attack began.
local GAP_LOG = os.getenv("HOSTILE_GAP_LOG")   -- a file: each check's worst gap appended

function H:check_healthy()
  local worst, what = self.w:worst_gap(self.t0)
  if GAP_LOG then
    local f = io.open(GAP_LOG, "a")
    f:write(("%.3f %s\n"):format(worst, what))
    f:close()
  end
  assert.is_true(alive(self.pid), "the server died:\n" .. self.srv:show_log())
  assert.is_true(worst <= PERIOD + MARGIN,
    ("the healthy /tick stream stalled: %s (allowed %.3f s)"):format(what, PERIOD + MARGIN))
end

-- (c) the server's CPU over one second (the hostile connections stay as they are; those
-- in `pump_list` are read meanwhile so their answers do not sit in our buffers).
function H:check_cpu(pump_list, tick)
  local c0, t0 = cpu_ticks(self.pid), gettime()
  local deadline = t0 + 1
  while gettime() < deadline do
    if tick then tick() end
    for _, c in ipairs(pump_list or {}) do c:pump() end
    socket.sleep(0.05)
  end
  local share = (cpu_ticks(self.pid) - c0) / CLK_TCK / (gettime() - t0)
  assert.is_true(share < CPU_MAX,
    ("the server used %.0f %% of a core for a second with the hostile connections idle"):format(share * 100))
end

-- (d) descriptors back to the baseline within `timeout` seconds of the hostile
-- connections closing.
function H:check_fds(timeout)
  local n = wait_until(function()
    local k = fd_count(self.pid)
    return k <= self.base_fds and k
  end, timeout or 3, 0.05)
  assert.is_truthy(n, ("the server holds %d descriptors, %d before the attack"):format(
    fd_count(self.pid), self.base_fds))
end

-- The server still answers GET /hello.
function H:check_serving(source)
  local c = connect(self.srv, source)
  c:send(request("/hello", "Connection: close\r\n"))
  local st = c:wait_response(3)
  c:close()
  assert.are.equal(200, st, "GET /hello after the attack: " .. c:describe() .. "\nlog:\n" ..
    self.srv:show_log())
end

function H:check_no_errors()
  for _, e in ipairs(self.srv:log()) do
    assert.is_not.equal("error", e.level, "an error in the log: " .. e.message)
    assert.is_falsy(e.message:lower():find("traceback", 1, true), "a traceback in the log: " .. e.message)
  end
end

local function cleanup()
  close_all(open_conns)
  open_conns = {}
  for _, pid in ipairs(procs) do kill(pid) end
  procs = {}
  for _, d in ipairs(tmp_dirs) do os.execute("rm -rf " .. d) end
  tmp_dirs = {}
end

------------------------------------------------------------------------------------------

describe("hostile clients", function()
  after_each(cleanup)

  describe("with the default options", function()
    local h
    before_each(function() h = harness({}) end)

    -- 40,000 hex digits with no line end. All '1's overflow 64 bits after 16 digits, which
    -- libmicrohttpd 0.9.75 already answers (413); leading zeros never overflow, and that
    -- is the line that fills the read buffer and stays there (the server spun at 100 %
    -- CPU, even after the client left).
    local HUGE_CHUNKS = { ones = ("1"):rep(40000), zeros = ("0"):rep(39999) .. "1" }
    local function chunked_head(path)
      return ("POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"):format(path)
    end

    -- Answered 400 or 413, or closed, within a second of the last byte.
    local function assert_refused_chunk(c, what)
      local t = gettime()
      local ok = c:wait(function(x)
        local st = x:status()
        return x.closed or st == 400 or st == 413
      end, 1)
      assert.is_truthy(ok, ("%s: neither 400/413 nor closed within 1 s: %s"):format(what, c:describe()))
      return gettime() - t
    end

    it("defect 1: a chunk-size line longer than the read buffer is refused (400/413 or closed) within 1 s, on a route and on a missing path", function()
      for _, path in ipairs({ "/upload", "/nope" }) do
        for _, digits in ipairs({ "ones", "zeros" }) do
          local c = connect(h.srv)
          c:send(chunked_head(path))
          c:send(HUGE_CHUNKS[digits], 1)   -- what the server takes; a closed socket stops it
          assert_refused_chunk(c, ("POST %s, 40,000 digits (%s)"):format(path, digits))
          c:close()
        end
      end
      h:check_healthy()
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
      h:check_serving()
    end)

    it("defect 1: 100 connections each stuck in a chunk-size line longer than the read buffer cost no CPU, do not stall a stream, and their descriptors are released", function()
      local conns = {}
      for i = 1, 100 do
        local c = connect(h.srv)
        c:send_some(chunked_head(i % 2 == 0 and "/upload" or "/nope"))
        conns[i] = c
      end
      for _, c in ipairs(conns) do c:send(HUGE_CHUNKS.zeros, 0.2) end
      -- every one of them answered 400/413 or closed within a second
      local done = wait_all(conns, function()
        for _, c in ipairs(conns) do
          local st = c:status()
          if not (c.closed or st == 400 or st == 413) then return false end
        end
        return true
      end, 1.5)
      local stuck = 0
      for _, c in ipairs(conns) do
        if not (c.closed or c:status() == 400 or c:status() == 413) then stuck = stuck + 1 end
      end
      -- the hostile sockets stay open on our side while the server is measured
      h:check_cpu(conns)
      h:check_healthy()
      assert.is_truthy(done, stuck .. " of 100 connections neither answered 400/413 nor closed")
      close_all(conns)
      h:check_fds()
      h:check_serving()
    end)

    it("defect 2: a handler returning 150 or 101 gives HTTP/1.0 and HTTP/1.1 clients a 500, logged once", function()
      for _, status in ipairs({ 150, 101 }) do
        for _, version in ipairs({ "1.0", "1.1" }) do
          local before = #h.srv:grep("error", tostring(status))
          local c = connect(h.srv)
          c:send(("GET /status%d HTTP/%s\r\nHost: x\r\nConnection: close\r\n\r\n"):format(status, version))
          local st = c:wait_response(2)
          assert.are.equal(500, st, ("status %d to HTTP/%s: %s"):format(status, version, c:describe()))
          c:close()
          wait_until(function()
            return #h.srv:grep("error", tostring(status)) - before >= 1
          end, 1)
          socket.sleep(0.05) -- a second line, if one comes, comes with the first
          local n = #h.srv:grep("error", tostring(status)) - before
          assert.are.equal(1, n, ("error lines mentioning %d after HTTP/%s:\n%s"):format(status,
            version, h.srv:show_log()))
        end
      end
      h:check_serving()
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 4: a body is routed first: POST /nope with Content-Length 1 MiB gets 404 before the body is sent", function()
      local c = connect(h.srv)
      c:send("POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
      assert.are.equal(404, c:wait(function(x) return x:status() end, 1), c:describe())
      h:check_cpu({ c })
      c:close()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 4: GET /hello with Content-Length 100000 and no body gets 413 (a GET route takes no body)", function()
      local c = connect(h.srv)
      c:send("GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
      assert.are.equal(413, c:wait(function(x) return x:status() end, 1), c:describe())
      h:check_cpu({ c })
      c:close()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 4: 300 stalled 1 MiB POSTs to a missing path add less than 20 MB to the server's RSS", function()
      local conns = {}
      local part = ("x"):rep(128 * 1024)
      for i = 1, 300 do
        local c = connect(h.srv)
        c:send_some("POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        conns[i] = c
      end
      -- up to 128 KiB of each body (what the sockets take now), then nothing more
      for _, c in ipairs(conns) do c:send_some(part) end
      wait_all(conns, function()
        for _, c in ipairs(conns) do
          if not (c.closed or c:status()) then return false end
        end
        return true
      end, 2)
      h:check_cpu(conns)
      local grew = (rss_kb(h.pid) - h.base_rss) / 1024
      -- Each is refused: a 404, or closed (the server closing with our body bytes unread
      -- resets the connection, which may discard its 404 before we read it).
      local answered, refused = 0, 0
      for _, c in ipairs(conns) do
        if c:status() == 404 then answered = answered + 1 end
        if c:status() == 404 or c.closed then refused = refused + 1 end
      end
      assert.is_true(grew < 20, ("RSS grew by %.1f MB with 300 stalled 1 MiB POSTs open (%d answered 404)")
        :format(grew, answered))
      assert.are.equal(300, refused, ("POSTs to /nope answered 404 or closed (%d answered 404)"):format(answered))
      close_all(conns)
      h:check_fds(5)
      h:check_healthy()
      h:check_serving()
    end)

    it("defect 8: a NUL in the path (%00) gets 400, for static files and for routes", function()
      local c = connect(h.srv)
      c:send(request("/static/hello.txt"))
      assert.are.equal(200, c:wait_response(2), "the file itself: " .. c:describe())
      c:close()
      for _, path in ipairs({ "/static/hello.txt%00.png", "/hello%00/x" }) do
        c = connect(h.srv)
        c:send(request(path, "Connection: close\r\n"))
        assert.are.equal(400, c:wait_response(2), path .. ": " .. c:describe())
        c:close()
      end
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 9: ambiguous framing (Content-Length with chunked, two Content-Lengths, 'Transfer-Encoding :', HTTP/1.1 without Host) gets 400 and the connection closed", function()
      local cases = {
        { "Content-Length and Transfer-Encoding: chunked",
          "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" },
        { "Content-Length: 5 and Content-Length: 6",
          "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" },
        { "'Transfer-Encoding : chunked' (space before the colon)",
          "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" },
        { "HTTP/1.1 without Host", "GET /hello HTTP/1.1\r\nUser-Agent: x\r\n\r\n" },
      }
      for _, case in ipairs(cases) do
        local c = connect(h.srv)
        c:send(case[2])
        local st = c:wait(function(x) return x:status() or (x.closed and "closed") end, 1)
        assert.are.equal(400, st, case[1] .. ": " .. c:describe())
        assert.is_truthy(c:wait_closed(1), case[1] .. ": answered 400 but left open: " .. c:describe())
        c:close()
      end
      local c = connect(h.srv)
      c:send("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")
      local st = c:wait(function(x) return x:status() or (x.closed and "closed") end, 1)
      assert.is_truthy(st == 501 or st == 400, "Transfer-Encoding: gzip: " .. c:describe())
      c:close()
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
      h:check_serving()
    end)

    it("defect 10: malformed methods (get, G@T, GE<tab>T) get 400 or 501 with no error and no traceback in the log", function()
      for _, method in ipairs({ "get", "G@T", "GE\tT" }) do
        local c = connect(h.srv)
        c:send(("%s / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):format(method))
        local st = c:wait(function(x) return x:status() or (x.closed and "closed") end, 1)
        assert.is_truthy(st == 400 or st == 501, show(method) .. ": " .. c:describe())
        c:close()
      end
      h:check_serving()
      h:check_no_errors()
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)
  end)

  describe("zero-delay re-arm", function()
    it("defect 5: a sleep(0) loop, a coroutine.yield() loop and a self re-arming after(0) timer do not starve requests: GET /ok within 500 ms", function()
      local h = harness({})
      local spin1, spin2 = connect(h.srv), connect(h.srv)
      spin1:send(request("/spin-sleep0"))
      spin2:send(request("/spin-yield"))
      assert.are.equal(200, spin1:wait(function(x) return x:status() end, 2), spin1:describe())
      assert.are.equal(200, spin2:wait(function(x) return x:status() end, 2), spin2:describe())
      local r = connect(h.srv)
      r:send(request("/rearm", "Connection: close\r\n"))
      assert.are.equal(200, r:wait_response(3), "/rearm: " .. r:describe())
      for i = 1, 3 do
        local c = connect(h.srv)
        local t = gettime()
        c:send(request("/ok", "Connection: close\r\n"))
        local st = c:wait_response(3)
        local took = gettime() - t
        assert.are.equal(200, st, c:describe())
        assert.is_true(took < 0.5, ("GET /ok #%d took %.3f s with the spinning generators and timer"):format(i, took))
        c:close()
      end
      -- The server is busy by design here (the generators and the timer never wait), so
      -- its CPU is not judged; the healthy stream is.
      h:check_healthy()
      close_all({ spin1, spin2 })
      h:check_fds()
    end)
  end)

  describe("with request_timeout = 1 and keepalive_timeout = 1", function()
    local h
    before_each(function() h = harness({ request_timeout = 1, keepalive_timeout = 1 }) end)

    it("defect 3: a slowloris (one header byte every 300 ms) is closed within request_timeout + 1 s", function()
      local c = connect(h.srv)
      local t0 = gettime()
      local bytes = "GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: " .. ("a"):rep(100)
      local i = 0
      local closed = c:wait(function(x)
        if x.closed then return true end
        local want = math.floor((gettime() - t0) / 0.3) + 1
        while i < want and i < #bytes do
          i = i + 1
          x:send_some(bytes:sub(i, i))
        end
        return x.closed
      end, 2.2)
      assert.is_truthy(closed, ("still open after %.1f s of slowloris: %s"):format(gettime() - t0, c:describe()))
      assert.is_true(gettime() - t0 <= 2.2)
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 3: a connection that sends nothing is closed within request_timeout + 1 s", function()
      local c = connect(h.srv)
      local t0 = gettime()
      assert.is_truthy(c:wait_closed(2.2), ("still open after %.1f s: %s"):format(gettime() - t0, c:describe()))
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 3: an idle keep-alive connection after one complete GET /hello is closed within keepalive_timeout + 1 s", function()
      local c = connect(h.srv)
      c:send(request("/hello"))
      assert.are.equal(200, c:wait_response(2), c:describe())
      local t0 = gettime()
      assert.is_truthy(c:wait_closed(2.2), ("idle keep-alive still open after %.1f s: %s"):format(
        gettime() - t0, c:describe()))
      h:check_cpu()
      h:check_fds()
      h:check_healthy()
    end)

    -- found by the fuzzing helper: the keep-alive deadline was set after plain responses only
    it("defect 3: a connection kept alive after a stream that ended is closed within keepalive_timeout + 1 s", function()
      local c = connect(h.srv)
      c:send(request("/short"))
      assert.is_truthy(c:wait(function(x) return x.raw:find("\r\n0\r\n\r\n", 1, true) end, 2),
        "the stream did not end: " .. c:describe())
      local t0 = gettime()
      assert.is_truthy(c:wait_closed(2.2), ("kept-alive connection still open %.1f s after its stream ended: %s"):format(
        gettime() - t0, c:describe()))
      h:check_fds()
      h:check_healthy()
    end)

    it("defect 3: a /tick stream lasting longer than request_timeout stays open (streams are exempt)", function()
      local c = connect(h.srv)
      c:send(request("/tick"))
      assert.are.equal(200, c:wait(function(x) return x:status() end, 2), c:describe())
      local t0 = gettime()
      local count = function(x) return select(2, x.raw:gsub("\ndata:", "")) end
      c:wait(function(x) return x.closed end, 2.5)
      local n0 = count(c)
      assert.is_false(c.closed, ("the stream was closed after %.1f s: %s"):format(gettime() - t0, c:describe()))
      assert.is_true(n0 >= 30, n0 .. " events in 2.5 s")
      h:check_healthy()
      c:close()
      h:check_fds()
    end)
  end)

  it("defect 3: with max_connections = 20, 30 slowloris sockets from 127.0.0.2 do not lock out a legitimate client once they time out", function()
    local h = harness({ request_timeout = 1, keepalive_timeout = 1, max_connections = 20 })
    local conns = {}
    for i = 1, 30 do conns[i] = connect(h.srv, "127.0.0.2") end
    local bytes = "GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: " .. ("a"):rep(200)
    local t0, sent = gettime(), 0
    local function drip()
      local want = math.floor((gettime() - t0) / 0.3) + 1
      while sent < want and sent < #bytes do
        sent = sent + 1
        for _, c in ipairs(conns) do c:send_some(bytes:sub(sent, sent)) end
      end
    end
    -- the server times the first ones out
    local some_closed = wait_until(function()
      drip()
      for _, c in ipairs(conns) do
        c:pump()
        if c.closed then return true end
      end
    end, 2.5, 0.02)
    assert.is_truthy(some_closed, "no slowloris socket closed within request_timeout + 1.5 s")
    local legit = connect(h.srv)
    legit:send(request("/hello", "Connection: close\r\n"))
    local st = wait_until(function()
      drip()
      for _, c in ipairs(conns) do c:pump() end
      legit:pump()
      return legit:response() or (legit.closed and "closed")
    end, 3, 0.02)
    assert.are.equal(200, st, ("legitimate GET /hello %.1f s after the slowloris began: %s"):format(
      gettime() - t0, legit:describe()))
    h:check_healthy()
    close_all(conns)
    h:check_fds()
  end)

  it("defect 3: max_connections_per_ip = 5 closes the 6th..10th connection from one address at once (or 429), with one warning for the burst", function()
    local h = harness({ max_connections_per_ip = 5 })
    local first = {}
    for i = 1, 5 do first[i] = connect(h.srv, "127.0.0.2") end
    -- let the server accept those five before the burst
    wait_until(function() return fd_count(h.pid) >= h.base_fds + 5 end, 2)
    local extra = {}
    for i = 1, 5 do
      extra[i] = connect(h.srv, "127.0.0.2")
      extra[i]:send_some(request("/hello"))
    end
    local refused = function(c) return c.closed or c:status() == 429 end
    wait_all(extra, function()
      for _, c in ipairs(extra) do if not refused(c) then return false end end
      return true
    end, 1)
    for i, c in ipairs(extra) do
      assert.is_truthy(refused(c), ("connection %d from 127.0.0.2: %s"):format(5 + i, c:describe()))
      assert.is_not.equal(200, c:status(), ("connection %d from 127.0.0.2 was served"):format(5 + i))
    end
    for i, c in ipairs(first) do
      c:send(request("/hello"))
      assert.are.equal(200, c:wait_response(2), ("connection %d from 127.0.0.2: %s"):format(i, c:describe()))
    end
    h:check_serving("127.0.0.1")
    local warnings = h.srv:grep("warn", "127.0.0.2")
    assert.are.equal(1, #warnings, "warnings naming 127.0.0.2 for one burst:\n" .. h.srv:show_log())
    h:check_cpu(first)
    close_all(first)
    close_all(extra)
    h:check_fds()
    h:check_healthy()
  end)

  -- Found while writing bench/churn.sh (not in the issue's list): descriptors held after
  -- the client is gone, on a server with the default options.
  describe("found by the churn benchmark", function()
    local h
    before_each(function() h = harness({}) end)

    it("a connection closed (FIN) after half a request head is released at once, not held in CLOSE-WAIT until request_timeout", function()
      for _ = 1, 20 do
        local c = connect(h.srv)
        c:send("GET /hello HTTP/1.1\r\nHost: x\r\n")
        c:close()
      end
      h:check_fds(2)
      h:check_healthy()
    end)

    -- found by fuzz_request (which runs with no timeouts): the half-closed connection was
    -- looked for on the deadline lists only, and with request_timeout = false it was on none
    it("the same with request_timeout = false: a half request head then FIN is released at once", function()
      local h2 = harness({ request_timeout = false, keepalive_timeout = false })
      for _ = 1, 20 do
        local c = connect(h2.srv)
        c:send("GET /open HTTP/1.1\r\nHo")
        c.s:shutdown("send")
        assert.is_truthy(c:wait_closed(2), "the server did not let it go: " .. c:describe())
        c:close()
      end
      h2:check_fds(2)
      h2:check_healthy()
    end)

    it("a stream (generator or channel) whose client leaves right after the first bytes (reset or clean close) gives its descriptor back while another client holds a keep-alive connection", function()
      -- Another connection open and idle (here kept alive after a GET; a half-sent head or
      -- one that sent nothing does the same) is what keeps the dead streams' descriptors:
      -- without it they are released at once.
      local idle = connect(h.srv)
      idle:send(request("/hello"))
      assert.are.equal(200, idle:wait_response(2), idle:describe())
      h.base_fds = h.base_fds + 1
      for i = 1, 40 do
        local c = connect(h.srv)
        c:send(request(i % 4 < 2 and "/tick" or "/channel"))
        c:wait(function(x) return x.raw:find("\r\n\r\n", 1, true) and #x.raw > x.raw:find("\r\n\r\n", 1, true) + 3 end, 2)
        if i % 2 == 0 then
          c.s:setoption("linger", { on = true, timeout = 0 })   -- close sends a reset
        else
          c.s:shutdown("send")
          c:wait_closed(2)
        end
        c:close()
      end
      -- no other connection is opened meanwhile: /proc only (within keepalive_timeout,
      -- whose default is 5 s, so the idle connection is still there)
      h:check_fds(2)
      h:check_healthy()
      idle:close()
    end)
  end)

  it("defect 13: at the descriptor limit (nofile 64) a burst of 100 connections is logged once and the server serves again once they close", function()
    local h = harness({}, "prlimit --nofile=64:64")
    local conns = {}
    for i = 1, 100 do conns[i] = connect(h.srv) end   -- idle: they only hold descriptors
    local function fd_warnings()
      local n = 0
      for _, e in ipairs(h.srv:log()) do
        local m = e.message:lower()
        if e.level == "warn" and (m:find("descriptor", 1, true) or m:find("emfile", 1, true)
            or m:find("too many open files", 1, true)) then
          n = n + 1
        end
      end
      return n
    end
    assert.is_truthy(wait_until(function() return fd_warnings() >= 1 end, 2),
      "no warning about the descriptor limit:\n" .. h.srv:show_log())
    h:check_cpu(conns)
    h:check_healthy()
    assert.are.equal(1, fd_warnings(), "descriptor-limit warnings for one burst:\n" .. h.srv:show_log())
    close_all(conns)
    h:check_fds(5)
    h:check_serving()
    h:check_healthy()
  end)

  -- Found by trying every attack above one after another on ONE server: afterwards, with
  -- only the healthy stream open, the server kept a core busy. strace showed epoll_wait
  -- with a 0 timeout ~9,000 times a second and perf the Lua timer path, not libmicrohttpd:
  -- MHD's own timeout was never 0. It was the self re-arming after(0) timer that /rearm
  -- starts (defect 5), which never stops; a timer nested past 5 levels now waits at least
  -- 4 ms (src/lsse_timer.c), as browsers do. The loop's last-resort guard (1 ms turns
  -- after a second of MHD asking to run at once) logs a warning when it acts: it must not
  -- be what keeps the CPU low here.
  -- Issue 18 part 2: folded header lines (RFC 9112 5.2) are answered 400 and closed
  -- before libmicrohttpd reads them (its join of such lines is an overlapping memcpy);
  -- the server keeps serving, and a body that merely looks like a fold is a body.
  describe("obsolete line folding", function()
    local h
    before_each(function() h = harness({ log_level = "debug" }) end)

    local FOLD_400 = "^HTTP/1%.1 400 .-obsolete line folding"

    local function assert_fold_refused(c, what)
      assert.is_truthy(c:wait_closed(5), what .. ": not closed: " .. c:describe())
      assert.is_truthy(c.raw:find(FOLD_400), what .. ": " .. c:describe())
    end

    it("a folded line (space or tab, also before the first header) is answered 400 and closed", function()
      for _, head in ipairs({
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",
        "GET /hello HTTP/1.1\r\n Host: x\r\n\r\n",
        "GET /hello HTTP/1.1\nHost: x\nX-A: a\n b\n\n",
      }) do
        local c = connect(h.srv)
        c:send(head)
        assert_fold_refused(c, show(head))
      end
      assert.are.equal(4, #h.srv:grep("debug", "obsolete line folding"), h.srv:show_log())
      h:check_serving()
      h:check_healthy()
    end)

    it("a fold split across writes, on a second kept-alive request, or pipelined after a body", function()
      local c = connect(h.srv)
      c:send("GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n")
      assert.is_falsy(c:wait_closed(0.3), "closed before the fold came")
      c:send("\t b\r\n\r\n")
      assert_fold_refused(c, "split")

      c = connect(h.srv)
      c:send(request("/hello"))
      assert.is_truthy(c:wait(function(x) return x.raw:find("hello\n", 1, true) end, 5), c:describe())
      c:send("GET /hello HTTP/1.1\r\nHost: x\r\nX: 1\r\n 2\r\n\r\n")
      assert.is_truthy(c:wait_closed(5), c:describe())
      assert.is_truthy(c.raw:find("\r\n\r\nhello\nHTTP/1%.1 400 .-obsolete line folding"), c:describe())

      c = connect(h.srv)
      c:send("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        .. "GET /hello HTTP/1.1\r\nHost: x\r\nX: 1\r\n\t2\r\n\r\n")
      assert.is_truthy(c:wait_closed(5), c:describe())
      assert.is_truthy(c.raw:find("HTTP/1%.1 400 .-obsolete line folding"), c:describe())
      h:check_healthy()
    end)

    it("a body that looks like a fold, split from its head, is a body: the connection stays kept alive", function()
      local c = connect(h.srv)
      c:send("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n")
      assert.is_falsy(c:wait_closed(0.2), c:describe())
      c:send("a\r\n b\r\n")
      assert.is_truthy(c:wait(function(x) return x:response() end, 5), c:describe())
      assert.are.equal(200, c:status(), c:describe())
      assert.is_truthy(c.raw:find("\r\n\r\n7\n$"), c:describe())
      c:send(request("/hello"))
      assert.is_truthy(c:wait(function(x) return select(2, x.raw:gsub("HTTP/1%.1 200", "")) == 2 end, 5),
        c:describe())
      assert.is_falsy(c.closed, c:describe())
      assert.are.same({}, h.srv:grep("debug", "folding"))
    end)

    it("TLS on the plain port: closed, one debug line", function()
      local c = connect(h.srv)
      c:send("\22\3\1\0\5\1\0\0\1\3")
      assert.is_truthy(c:wait_closed(5), c:describe())
      assert.are.equal("", c.raw)
      assert.is_truthy(wait_until(function() return #h.srv:grep("debug", "TLS on the plain HTTP port") == 1 end, 5),
        h.srv:show_log())
      h:check_serving()
    end)
  end)

  it("every attack in turn on one server: then idle CPU under 5 % of a core over 2 s, descriptors back, no spin guard", function()
    local h = harness({ request_timeout = 1, keepalive_timeout = 1, max_connections_per_ip = 400 },
      "prlimit --nofile=600:600")
    local held = {}                       -- every hostile connection, closed at the end
    local function open(source)
      local c = connect(h.srv, source)
      held[#held + 1] = c
      return c
    end
    -- defect 1: chunk-size lines longer than the read buffer, on a route and a missing path
    for i = 1, 40 do
      local c = open()
      c:send_some(("POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"):format(
        i % 2 == 0 and "/upload" or "/nope"))
      c:send(i % 3 == 0 and ("1"):rep(40000) or (("0"):rep(39999) .. "1"), 0.2)
    end
    -- defect 2: handlers answering 1xx
    for _, v in ipairs({ "1.0", "1.1" }) do
      open():send_some(("GET /status150 HTTP/%s\r\nHost: x\r\n\r\n"):format(v))
      open():send_some(("GET /status101 HTTP/%s\r\nHost: x\r\n\r\n"):format(v))
    end
    -- defect 4: bodies announced and stalled, routed or not; a GET with a body
    for _ = 1, 50 do
      local c = open()
      c:send_some("POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
      c:send_some(("x"):rep(64 * 1024))
      c = open()
      c:send_some("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
      c:send_some(("x"):rep(64 * 1024))
    end
    open():send_some("GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    -- defects 8, 9, 10: NUL in the path, ambiguous framing, malformed methods
    open():send_some(request("/static/hello.txt%00.png"))
    open():send_some(request("/hello%00/x"))
    open():send_some("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    open():send_some("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    open():send_some("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    open():send_some("GET /hello HTTP/1.1\r\nUser-Agent: x\r\n\r\n")
    open():send_some("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    for _, m in ipairs({ "get", "G@T", "GE\tT" }) do
      open():send_some(("%s / HTTP/1.1\r\nHost: x\r\n\r\n"):format(m))
    end
    -- obsolete line folding (issue 18)
    open():send_some("GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n")
    open():send_some("GET /hello HTTP/1.1\r\nHost: x\r\n\tX-B: c\r\n\r\n")
    -- defect 5: zero-delay loops in generators and a self re-arming timer
    open():send_some(request("/spin-sleep0"))
    open():send_some(request("/spin-yield"))
    open():send_some(request("/rearm"))
    -- defect 3: slowloris heads, connections that send nothing, kept-alive idle ones
    -- (after a GET, after a stream that ended)
    local slow = {}
    for i = 1, 30 do
      slow[i] = open(i % 2 == 0 and "127.0.0.2" or nil)
      slow[i]:send_some("GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    end
    for _ = 1, 20 do open() end
    for _ = 1, 10 do open():send_some(request("/hello")) end
    for _ = 1, 5 do open():send_some(request("/short")) end
    -- churn: half a head then FIN (kept open) or reset; streams left after their first bytes
    for i = 1, 20 do
      local c = open()
      c:send_some("GET /hello HTTP/1.1\r\nHost: x\r\nX-Half: y")
      if i % 2 == 0 then
        c.s:shutdown("send")
      else
        c.s:setoption("linger", { on = true, timeout = 0 })
        c:close()
      end
    end
    for i = 1, 20 do
      local c = open()
      c:send_some(request(i % 2 == 0 and "/tick" or "/channel"))
      if i % 2 == 0 then c.s:setoption("linger", { on = true, timeout = 0 }) end
    end
    -- defects 3 and 13: a burst over the per-address limit, which also takes the process
    -- past its descriptor limit (600)
    for _ = 1, 410 do
      open("127.0.0.3"):send_some(request("/hello"))
    end
    -- let it all play out for 2 s (past request_timeout) while the slowloris heads drip
    local t0, drip, sent = gettime(), "\r\nX-Slow-2: " .. ("b"):rep(20), 0
    wait_until(function()
      for _, c in ipairs(held) do c:pump() end
      local want = math.floor((gettime() - t0) / 0.3)
      while sent < want and sent < #drip do
        sent = sent + 1
        for _, c in ipairs(slow) do c:send_some(drip:sub(sent, sent)) end
      end
      return gettime() - t0 > 2
    end, 3, 0.05)
    h:check_healthy()
    close_all(held)
    h:check_fds(5)
    h:check_healthy()
    -- idle again: under 5 % of a core over 2 s, from a second after the last close
    local c0, tc = cpu_ticks(h.pid), gettime()
    wait_until(function() return gettime() - tc >= 2 end, 3, 0.1)
    local share = (cpu_ticks(h.pid) - c0) / CLK_TCK / (gettime() - tc)
    assert.is_true(share < 0.05, ("the server used %.1f %% of a core over 2 s with only the healthy stream open"):format(share * 100))
    assert.are.same({}, h.srv:grep("warn", "run at once"), "the loop's spin guard acted:\n" .. h.srv:show_log())
    h:check_serving()
    h:check_healthy()
  end)
end)
