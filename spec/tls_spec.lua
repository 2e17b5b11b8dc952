-- TLS hardening (issue 18): a server run over TLS as a separate process
-- (spec/fixtures/tls_app.lua), attacked over raw TCP sockets and probed with real TLS
-- clients (openssl s_client, gnutls-cli, curl). Each case checks what a client sees (the
-- connection closed, a handshake refused or completed, a stream's events on time) and, where
-- it matters, the server's CPU and descriptors.
--
-- TLS_TREE=/path/to/checkout selects the tree whose lua/ and build/lib/ the server loads
-- (default: this one), e.g. to show that the cases fail on an older commit.
local socket = require("socket")
local client = require("support.client")   -- fd_count, tmpdir

local gettime = socket.gettime

local TREE = os.getenv("TLS_TREE") or "."
local FIXTURE = "spec/fixtures/tls_app.lua"
local PERIOD = 0.05          -- /tick's period
local LATE = 0.25            -- how late a healthy event may be beyond it (shared machine)
local CPU_MAX = 0.10         -- fraction of one core
local CLK_TCK = 100          -- USER_HZ, the unit of utime/stime in /proc/PID/stat

------------------------------------------------------------------------------------------
-- Small helpers

local fd_count, sh = client.fd_count, client.sh
local read_all, wait_until, alive, cpu_ticks =
  client.read_file, client.wait_until, client.alive, client.cpu_ticks

local function have(tool)
  return os.execute("command -v " .. tool .. " >/dev/null 2>&1") == true
end

-- The server's share of one core while `during` runs (it must take at least `min` s).
local function cpu_share(pid, during)
  local c0, t0 = cpu_ticks(pid), gettime()
  during()
  return (cpu_ticks(pid) - c0) / CLK_TCK / (gettime() - t0)
end

------------------------------------------------------------------------------------------
-- The server and the healthy client

local pids = {}

local function spawn(cmd, err)
  local p = io.popen(("( exec %s ) </dev/null >/dev/null 2>%s & echo $!"):format(cmd, err))
  local pid = tonumber(p:read("l"))
  p:close()
  assert(pid, "could not start: " .. cmd)
  pids[#pids + 1] = pid
  return pid
end

local function kill(pid)
  if not alive(pid) then return end
  os.execute("kill -TERM " .. pid .. " 2>/dev/null")
  if not wait_until(function() return not alive(pid) end, 3) then
    os.execute("kill -KILL " .. pid .. " 2>/dev/null")
  end
end

local Server = {}
Server.__index = Server

-- The fixture over TLS with the key pair in `dir` and sse.app options `opts`
-- ({ name = value }; cert, key and priorities go into its tls table).
local function start_server(dir, opts)
  local so = TREE .. "/build/lib/sse/core.so"
  assert(io.open(so), "no " .. so .. ": build that tree first")
  local sdir = client.tmpdir()
  local args = { "cert=" .. dir .. "/cert.pem", "key=" .. dir .. "/key.pem" }
  for k, v in pairs(opts or {}) do args[#args + 1] = ("'%s=%s'"):format(k, tostring(v)) end
  -- The _5_4 names: lua5.4 prefers them, and busted's own (this tree's) would be inherited.
  local env = ("env LUA_PATH_5_4='%s/lua/?.lua;%s/lua/?/init.lua;;' LUA_CPATH_5_4='%s/build/lib/?.so;;'")
    :format(TREE, TREE, TREE)
  local self = setmetatable({ dir = sdir, log_path = sdir .. "/stderr" }, Server)
  self.pid = spawn(("%s lua5.4 %s %s/port %s"):format(env, FIXTURE, sdir, table.concat(args, " ")),
    self.log_path)
  local port = wait_until(function()
    local s = read_all(sdir .. "/port")
    return s and tonumber(s:match("%d+")) or (not alive(self.pid) and -1)
  end, 10)
  assert(port and port > 0, "the server did not start:\n" .. (read_all(self.log_path) or ""))
  self.port = port
  return self
end

function Server:log() return read_all(self.log_path) or "" end

-- Log lines that contain `text` (plain).
function Server:lines(text)
  local found = {}
  for line in self:log():gmatch("([^\n]*)\n") do
    if line:find(text, 1, true) then found[#found + 1] = line end
  end
  return found
end

function Server:stop() kill(self.pid) end

-- curl reading /tick over TLS, each event's arrival time in a file.
local function watch(srv)
  local out = srv.dir .. "/tick"
  local w = { out = out }
  w.pid = spawn(("sh -c 'exec curl -skN https://127.0.0.1:%d/tick | lua5.4 %s stamp %s'")
    :format(srv.port, FIXTURE, out), srv.dir .. "/watch.err")
  function w.times()
    local t, closed = {}, nil
    for line in (read_all(out) or ""):gmatch("([^\n]*)\n") do
      if line:find("^closed") then closed = line else t[#t + 1] = tonumber(line) end
    end
    return t, closed
  end
  -- The longest wait between two events since `from` (the one still running counts).
  function w.worst_gap(from)
    local times, closed = w.times()
    local prev, worst, n = nil, 0, 0
    for _, t in ipairs(times) do
      if t >= from then
        n = n + 1
        if prev and t - prev > worst then worst = t - prev end
      end
      prev = t
    end
    if prev and gettime() - prev > worst then worst = gettime() - prev end
    return worst, ("%d events in %.2f s, worst gap %.3f s%s"):format(n, gettime() - from, worst,
      closed and ("; stream " .. closed) or "")
  end
  assert(wait_until(function() return #w.times() >= 3 end, 5),
    "the healthy TLS client got no events: " .. (read_all(srv.dir .. "/watch.err") or ""))
  return w
end

------------------------------------------------------------------------------------------
-- Raw TCP connections

local open_conns = {}

local function connect(port)
  local s = socket.tcp()
  s:settimeout(3)
  assert(s:connect("127.0.0.1", port))
  s:settimeout(0)
  local c = { s = s, closed = false }
  open_conns[#open_conns + 1] = c
  return c
end

-- Reads what has arrived; notes when the server has closed.
local function pump(c)
  while not c.closed do
    local _, err = c.s:receive(65536)
    if err == "timeout" then return end
    if err then
      c.closed = err
      c.closed_at = gettime()
    end
  end
end

local function wait_closed(list, timeout)
  return wait_until(function()
    local all = true
    for _, c in ipairs(list) do
      pump(c)
      all = all and c.closed
    end
    return all
  end, timeout, 0.02)
end

local function close_all()
  for _, c in ipairs(open_conns) do c.s:close() end
  open_conns = {}
end

-- The first 51 bytes of a ClientHello whose record announces 512: the server has read a
-- record header and part of a handshake message, and waits for the rest.
local HALF_HELLO = "\22\3\1\2\0" .. "\1\0\1\252\3\3" .. ("\42"):rep(40)

------------------------------------------------------------------------------------------
-- TLS clients

-- openssl s_client with `args`, fed `script`: a shell command list whose output is the
-- client's stdin (printf/sleep: "R" on a line of its own asks for a renegotiation).
local function s_client(port, args, script)
  return sh(("( %s ) | timeout 6 openssl s_client -connect 127.0.0.1:%d -msg %s")
    :format(script or "true", port, args))
end

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

local GET_OK = [[printf 'GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'; sleep 1]]

------------------------------------------------------------------------------------------

describe("TLS", function()
  local dir

  setup(function()
    assert(have("openssl"), "openssl is needed")
    -- 500 sockets of our own: raise this process's descriptor limit if it is low.
    local pid = read_all("/proc/self/stat"):match("^(%d+)")
    local soft = tonumber((sh("ulimit -Sn"):match("%d+")))
    if soft and soft < 1200 then sh(("prlimit --pid %s --nofile=4096:4096"):format(pid)) end
    dir = client.tmpdir()
    local out = sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes " ..
      "-keyout %s/key.pem -out %s/cert.pem -days 1 -subj /CN=localhost"):format(dir, dir))
    assert(io.open(dir .. "/cert.pem"), out)
  end)

  teardown(function()
    close_all()
    for _, pid in ipairs(pids) do kill(pid) end
    client.rmdir(dir)
  end)

  describe("with request_timeout = 1", function()
    local srv
    setup(function() srv = start_server(dir, { request_timeout = 1, log_level = "debug" }) end)
    teardown(function() srv:stop() end)
    after_each(close_all)

    it("closes a TCP client that sends nothing at request_timeout", function()
      local t0 = gettime()
      local c = connect(srv.port)
      assert.is_truthy(wait_closed({ c }, 5), "still open after 5 s")
      local after = c.closed_at - t0
      assert.is_true(after > 0.8 and after < 3, ("closed after %.2f s"):format(after))
    end)

    it("closes a client that sent half a ClientHello at request_timeout, idle meanwhile", function()
      local t0 = gettime()
      local c = connect(srv.port)
      assert(c.s:send(HALF_HELLO))
      socket.sleep(0.1)    -- the server has read it by now
      local share = cpu_share(srv.pid, function()
        wait_until(function() pump(c) return c.closed or gettime() - t0 > 0.85 end, 1)
      end)
      assert.is_falsy(c.closed, "closed before request_timeout")
      assert.is_true(share < CPU_MAX,
        ("the server used %.0f %% of a core while the handshake waited"):format(share * 100))
      assert.is_truthy(wait_closed({ c }, 5), "still open after 5 s")
      local after = c.closed_at - t0
      assert.is_true(after > 0.8 and after < 3, ("closed after %.2f s"):format(after))
    end)

    it("refuses TLS 1.0 and 1.1 and serves TLS 1.2 and 1.3 (openssl s_client)", function()
      for _, v in ipairs({ "tls1", "tls1_1" }) do
        local out, code = s_client(srv.port, "-" .. v .. " -cipher DEFAULT@SECLEVEL=0", GET_OK)
        assert.are.equal(1, count(out, ">>> [^\n]*ClientHello"), v .. ": no ClientHello sent:\n" .. out)
        assert.are.equal(0, count(out, "<<< [^\n]*ServerHello\n"), v .. " was accepted:\n" .. out)
        assert.is_falsy(out:find("HTTP/1.1 200", 1, true), v .. " was served")
        assert.are_not.equal(0, code)
      end
      for _, v in ipairs({ "tls1_2", "tls1_3" }) do
        local out = s_client(srv.port, "-" .. v, GET_OK)
        assert.is_truthy(out:find("HTTP/1.1 200 OK", 1, true), v .. " not served:\n" .. out)
        assert.is_truthy(out:find("\nok\r?\n"), v .. ": no body:\n" .. out)
      end
    end)

    it("refuses TLS 1.0 and 1.1 and serves TLS 1.2 and 1.3 (gnutls-cli)", function()
      if not have("gnutls-cli") then
        pending("gnutls-cli is not installed (package gnutls-bin)")
        return
      end
      for _, v in ipairs({ "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3" }) do
        local out = sh(("timeout 6 gnutls-cli --insecure --priority NORMAL:-VERS-ALL:+VERS-%s " ..
          "-p %d 127.0.0.1 </dev/null"):format(v, srv.port))
        local done = out:find("Handshake was completed", 1, true) ~= nil
        assert.are.equal(v == "TLS1.2" or v == "TLS1.3", done, v .. ":\n" .. out)
      end
    end)

    it("never renegotiates: a TLS 1.2 client's renegotiation gets no second ServerHello", function()
      -- On a kept-alive connection the server reads the new ClientHello and closes.
      local out = s_client(srv.port, "-tls1_2",
        [[printf 'GET /ok HTTP/1.1\r\nHost: x\r\n\r\n'; sleep 0.5; printf 'R\n'; sleep 1.5]])
      assert.is_truthy(out:find("\nok\r?\n"), "no answer before the renegotiation:\n" .. out)
      assert.is_truthy(out:find("RENEGOTIATING", 1, true), "s_client did not renegotiate:\n" .. out)
      assert.are.equal(2, count(out, ">>> [^\n]*ClientHello"), out)
      assert.are.equal(1, count(out, "<<< [^\n]*ServerHello\n"), "renegotiated:\n" .. out)
      -- On a stream the server does not read while it sends: the ClientHello is never
      -- answered (s_client gives up on the events that keep coming), and the handshake is
      -- never done again.
      local w = watch(srv)
      local t0 = gettime()
      out = s_client(srv.port, "-tls1_2",
        [[printf 'GET /tick HTTP/1.1\r\nHost: x\r\n\r\n'; sleep 0.5; printf 'R\n'; sleep 1.5]])
      assert.is_truthy(out:find("RENEGOTIATING", 1, true), "s_client did not renegotiate:\n" .. out)
      assert.are.equal(2, count(out, ">>> [^\n]*ClientHello"), out)
      assert.are.equal(1, count(out, "<<< [^\n]*ServerHello\n"), "renegotiated:\n" .. out)
      local worst, what = w.worst_gap(t0)
      assert.is_true(worst < PERIOD + LATE, "the healthy stream stalled: " .. what)
      kill(w.pid)
    end)

    it("logs one debug line for plain HTTP on the TLS port and closes it at once", function()
      local c = connect(srv.port)
      local port = select(2, c.s:getsockname())
      local t0 = gettime()
      assert(c.s:send("GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
      assert.is_truthy(wait_closed({ c }, 3), "still open after 3 s")
      assert.is_true(c.closed_at - t0 < 0.5, ("closed after %.2f s"):format(c.closed_at - t0))
      local lines
      wait_until(function()
        lines = srv:lines(":" .. port .. ":")
        return #lines > 0
      end, 2)
      assert.are.equal(1, #lines, "log:\n" .. srv:log())
      assert.truthy(lines[1]:find("^debug: .*plain HTTP on the TLS port"), lines[1])
    end)
  end)

  it("keeps a healthy stream on time and the CPU low with 500 half ClientHellos, then closes them", function()
    local srv = start_server(dir, { request_timeout = 4 })
    finally(function() close_all() srv:stop() end)
    local w = watch(srv)
    local base_fds = fd_count(srv.pid)
    local t0 = gettime()
    local list = {}
    for i = 1, 500 do
      local c = connect(srv.port)
      c.s:send(HALF_HELLO)
      list[i] = c
    end
    socket.sleep(0.2)
    local share = cpu_share(srv.pid, function()
      wait_until(function() return gettime() - t0 > 2.5 end, 3, 0.05)
    end)
    local worst, what = w.worst_gap(t0)
    for _, c in ipairs(list) do pump(c) end
    for _, c in ipairs(list) do assert.is_falsy(c.closed, "closed before request_timeout") end
    assert.is_true(share < CPU_MAX,
      ("the server used %.0f %% of a core with 500 handshakes waiting"):format(share * 100))
    assert.is_true(worst < PERIOD + LATE, "the healthy stream stalled: " .. what)
    assert.is_truthy(wait_closed(list, 10), "not all closed 10 s after request_timeout")
    local last = 0
    for _, c in ipairs(list) do last = math.max(last, c.closed_at - t0) end
    assert.is_true(last < 4 + 3, ("the last closed after %.2f s"):format(last))
    close_all()
    assert.is_truthy(wait_until(function() return fd_count(srv.pid) <= base_fds end, 3, 0.05),
      ("the server holds %d descriptors, %d before"):format(fd_count(srv.pid), base_fds))
    worst, what = w.worst_gap(t0)
    assert.is_true(worst < PERIOD + LATE, "the healthy stream stalled: " .. what)
    kill(w.pid)
  end)

  it("stops cleanly (SIGTERM) with handshakes parked", function()
    local srv = start_server(dir, { request_timeout = 30, log_level = "debug" })
    finally(function() close_all() srv:stop() end)
    local list = {}
    for i = 1, 5 do
      list[i] = connect(srv.port)
      list[i].s:send(HALF_HELLO)
    end
    socket.sleep(0.3)
    os.execute("kill -TERM " .. srv.pid)
    assert.is_truthy(wait_until(function() return not alive(srv.pid) end, 5), "still running")
    assert.is_truthy(wait_closed(list, 2), "connections left open")
    -- libmicrohttpd aborts ("Fatal error in GNU libmicrohttpd") if stopped with a
    -- connection suspended; and the server closing them is not worth a line.
    assert.are.equal("", srv:log())
  end)

  it("logs no debug line by default (log_level = \"info\")", function()
    local srv = start_server(dir, {})
    finally(function() close_all() srv:stop() end)
    local c = connect(srv.port)
    assert(c.s:send("GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert.is_truthy(wait_closed({ c }, 3), "still open after 3 s")
    -- A request the server does serve, so the log would have the line by now.
    local out = sh(("curl -sk https://127.0.0.1:%d/ok"):format(srv.port))
    assert.are.equal("ok\n", out)
    assert.are.equal("", srv:log())
  end)

  it("takes tls.priorities: TLS 1.3 only refuses 1.2", function()
    local srv = start_server(dir, { priorities = "NORMAL:-VERS-ALL:+VERS-TLS1.3" })
    finally(function() srv:stop() end)
    local out = s_client(srv.port, "-tls1_2", GET_OK)
    assert.are.equal(0, count(out, "<<< [^\n]*ServerHello\n"), "TLS 1.2 was accepted:\n" .. out)
    out = s_client(srv.port, "-tls1_3", GET_OK)
    assert.is_truthy(out:find("HTTP/1.1 200 OK", 1, true), "TLS 1.3 not served:\n" .. out)
  end)

  it("reports a priority string GnuTLS refuses from listen, and a bad log_level at once", function()
    local app = client.app({ tls = { cert = dir .. "/cert.pem", key = dir .. "/key.pem",
      priorities = "NORMAL:+NO-SUCH-THING" } })
    local ok, err, code = app:listen()
    assert.is_nil(ok)
    assert.truthy(err:find("priority", 1, true), err)
    assert.truthy(err:find("NO-SUCH-THING", 1, true), err)
    assert.are.equal("EINVAL", code)
    assert.has_error(function() client.app({ tls = { cert = "a", key = "b", priorities = 1 } }) end)
    local e = select(2, pcall(client.app, { log_level = "verbose" }))
    assert.truthy(tostring(e):find("log_level", 1, true), tostring(e))
    assert.truthy(tostring(e):find('"debug"', 1, true), tostring(e))
  end)
end)
