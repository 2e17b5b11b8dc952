-- app:fetch as an HTTP client that must never block or hurt the server (issue 10): every
-- failure is `nil, message, kind` (never a raise, never a stall past the fetch's timeout)
-- while the app keeps serving others; HTTPS with verification; redirects; 200 fetches
-- waiting at once beside a healthy stream; nothing left behind (descriptors, anchors).
--
-- Real servers only: the app itself (also over TLS), a Python upstream of its own process
-- (spec/fixtures/fetch_upstream.py), sockets the spec opens, a healthy client in a process
-- of its own (spec/fixtures/fetch_watch.lua), and for a resolver that never answers a
-- child in a mount namespace of its own (spec/fixtures/fetch_dns_child.lua: needs root and
-- unshare(1), else that case is pending).
--
-- FETCH_GAP_LOG=file appends the load case's worst stream gap and ping times to file.
local socket = require("socket")
local client = require("support.client")

local gettime = socket.gettime
local in_app = client.in_app
local sh = client.sh
local MiB = 1024 * 1024

------------------------------------------------------------------------------------------
-- Helpers: files, processes, descriptors

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function lines_of(path)
  local out = {}
  for l in (read_all(path) or ""):gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

-- This process's id: /proc/self opened by this process itself.
local PID = tonumber(read_all("/proc/self/stat"):match("^(%d+)"))
local function fds() return client.fd_count(PID) end

local function alive(pid)
  local stat = read_all("/proc/" .. pid .. "/stat")
  return stat ~= nil and stat:match("%) (%a)") ~= "Z"
end

-- Polls cond() (without stepping any app) until true or timeout seconds pass.
local function poll(cond, timeout)
  local deadline = gettime() + timeout
  repeat
    local v = cond()
    if v then return v end
    socket.sleep(0.01)
  until gettime() > deadline
  return cond()
end

local procs = {}

-- Starts `cmd` in the background (stdout to out, stderr to err); returns its pid.
local function spawn(cmd, out, err)
  local p = io.popen(("( exec %s ) </dev/null >%s 2>%s & echo $!"):format(cmd, out, err or "/dev/null"))
  local pid = tonumber(p:read("l"))
  p:close()
  assert(pid, "could not start: " .. cmd)
  procs[#procs + 1] = pid
  return pid
end

local function kill(pid)
  if not alive(pid) then return end
  os.execute("kill -TERM " .. pid .. " 2>/dev/null")
  if not poll(function() return not alive(pid) end, 3) then
    os.execute("kill -KILL " .. pid .. " 2>/dev/null")
  end
end

-- The server's anchors (its coroutines, callbacks, streams: what keeps Lua values alive
-- for C) that are in use: the entries of its anchors table that are not free-list links.
local function anchors(app)
  local t = debug.getuservalue(app._core, 1)
  local n = 0
  for _, v in pairs(t) do
    if type(v) ~= "number" then n = n + 1 end
  end
  return n
end

-- A port nobody listens on (bound, then closed).
local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return port
end

-- Runs fn in an app coroutine; while it waits, pings the app every `every` seconds (each
-- a fresh connection, GET /ping). Returns the seconds fn took, its results packed, and
-- the pings: { seconds, status } each.
local function while_pinging(app, fn, timeout, every)
  local out, took
  local t0 = gettime()
  app:spawn(function()
    local o = table.pack(fn())
    took, out = gettime() - t0, o
  end)
  local pings = {}
  local deadline = t0 + (timeout or 10)
  local next_ping = t0 + (every or 0.05)
  while not out and gettime() < deadline do
    if gettime() >= next_ping then
      local p0 = gettime()
      local res = client.request(app, "GET", "/ping")
      pings[#pings + 1] = { gettime() - p0, res.status }
      next_ping = gettime() + (every or 0.05)
    else
      client.step(app)
    end
  end
  assert(out, ("the app coroutine did not return within %.1f s"):format(timeout or 10))
  return took, out, pings
end

local function assert_pings_ok(pings, limit)
  for i, p in ipairs(pings) do
    assert.are.equal(200, p[2], "ping " .. i)
    assert.is_true(p[1] < (limit or 0.5), ("ping %d took %.3f s"):format(i, p[1]))
  end
end

-- The logs of the apps of the current case: after each case none may hold an error (a
-- coroutine that raised, a failing handler).
local app_logs = {}

-- An app with the routes most cases use (not listening yet).
local function new_app(opts)
  local o = { heartbeat = false }
  for k, v in pairs(opts or {}) do o[k] = v end
  local app, logs = client.app(o)
  app_logs[#app_logs + 1] = logs
  app:get("/ping", function() return "pong" end)
  app:get("/json", function() return 200, { hello = "world" } end)
  app:stream("/silent", function() app:sleep(60) end)
  return app, logs
end

------------------------------------------------------------------------------------------

describe("app:fetch never blocks or hurts the server", function()
  local tmp, upstream, up_log

  setup(function()
    tmp = client.tmpdir()
    up_log = tmp .. "/upstream.log"
    local port_file = tmp .. "/upstream.port"
    spawn(("python3 spec/fixtures/fetch_upstream.py %s"):format(port_file), up_log, tmp .. "/upstream.err")
    local port = poll(function() return tonumber(read_all(port_file) or "") end, 10)
    assert(port, "the Python upstream did not start: " .. (read_all(tmp .. "/upstream.err") or ""))
    upstream = "http://127.0.0.1:" .. port
  end)

  teardown(function()
    for _, pid in ipairs(procs) do kill(pid) end
    procs = {}
    client.rmdir(tmp)
  end)

  after_each(function()
    client.cleanup()
    local logs = app_logs
    app_logs = {}
    for _, l in ipairs(logs) do
      for _, e in ipairs(l) do
        assert.are_not.equal("error", e.level, "logged: " .. e.message)
      end
    end
  end)

  -- The "big <id> sent <n> of <total>" line of the upstream for id, once it is there.
  local function big_sent(id)
    for _, l in ipairs(lines_of(up_log)) do
      local got, sent = l:match("^big (%S+) sent (%d+) of %d+$")
      if got == id then return tonumber(sent) end
    end
  end

  describe("failures are nil, message, kind, bounded by the timeout", function()
    it("DNS: a name under .invalid gives 'dns' (bounded by the timeout where no resolver answers)", function()
      local app = new_app()
      assert(app:listen())
      local took, out = while_pinging(app, function()
        return app:fetch("http://nonexistent.invalid/", { timeout = 2 })
      end, 5)
      assert.is_nil(out[1])
      assert.is_string(out[2])
      assert.is_true(out[3] == "dns" or out[3] == "timeout", tostring(out[3]) .. ": " .. tostring(out[2]))
      if out[3] == "dns" then assert.truthy(out[2]:find("nonexistent.invalid", 1, true), out[2]) end
      assert.is_true(took < 3, ("took %.2f s"):format(took))
    end)

    it("connection refused: 'connect', at once", function()
      local app = new_app()
      assert(app:listen())
      local took, out = while_pinging(app, function()
        return app:fetch("http://127.0.0.1:" .. free_port() .. "/", { timeout = 5 })
      end)
      assert.are.same({ n = 3, nil, out[2], "connect" }, out)
      assert.truthy(out[2]:find("onnect", 1, true), out[2])
      assert.is_true(took < 1, ("took %.2f s"):format(took))
    end)

    it("timeout: an upstream that accepts and never answers, timeout = 0.5; the app serves meanwhile", function()
      local app = new_app()
      assert(app:listen())
      local mute = assert(socket.bind("127.0.0.1", 0))   -- the kernel accepts; nobody reads
      local _, port = mute:getsockname()
      local took, out, pings = while_pinging(app, function()
        return app:fetch("http://127.0.0.1:" .. port .. "/", { timeout = 0.5 })
      end, 5)
      mute:close()
      assert.is_nil(out[1])
      assert.are.equal("timeout", out[3], tostring(out[2]))
      assert.truthy(out[2]:find("timed out", 1, true), out[2])
      assert.is_true(took >= 0.45 and took < 1.5, ("took %.2f s"):format(took))
      assert.is_true(#pings >= 3, "pinged while the fetch waited: " .. #pings)
      assert_pings_ok(pings)
    end)

    it("timeout: a body that keeps dripping is cut at the timeout too", function()
      local app = new_app()
      assert(app:listen())
      local took, out, pings = while_pinging(app, function()
        return app:fetch(upstream .. "/drip", { timeout = 0.5 })
      end, 5)
      assert.is_nil(out[1])
      assert.are.equal("timeout", out[3], tostring(out[2]))
      assert.is_true(took >= 0.45 and took < 1.5, ("took %.2f s"):format(took))
      assert_pings_ok(pings)
    end)

    it("a resolver that never answers: the timeout bounds the lookup, and no loop turn waits for it", function()
      -- Root and unshare(1) make a mount namespace where /etc/resolv.conf names a UDP
      -- socket that reads nothing; the child measures its own loop (fetch_dns_child.lua).
      local probe = sh("unshare -m --propagation private true && echo unshare-ok")
      if not probe:find("unshare-ok", 1, true) then
        pending("needs root and unshare(1): " .. probe)
        return
      end
      local line
      for _ = 1, 5 do
        local ns = ("127.53.%d.%d"):format(math.random(1, 254), math.random(1, 254))
        local conf, script = tmp .. "/resolv.conf", tmp .. "/dns_child.sh"
        client.write_file(conf, ("nameserver %s\noptions timeout:3 attempts:1\n"):format(ns))
        client.write_file(script, table.concat({
          "mount --bind " .. conf .. " /etc/resolv.conf || exit 1",
          "export LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/lib/?.so;;'",
          "exec lua5.4 spec/fixtures/fetch_dns_child.lua " .. ns, "" }, "\n"))
        line = sh("timeout 60 unshare -m --propagation private sh " .. script)
        if not line:find("^bind%-failed") then break end
      end
      local cases = {}
      for case, took, worst, what in line:gmatch("(%a+) ([%d.]+) ([%d.]+) ([^\n]*)") do
        cases[case] = { took = tonumber(took), worst = tonumber(worst), what = what }
      end
      local function check(case, max_took, what)
        local c = cases[case]
        assert.is_table(c, "no line for " .. case .. " in:\n" .. line)
        assert.truthy(c.what:find(what), ("%s: %s"):format(case, c.what))
        assert.is_true(c.took < max_took, ("%s took %.2f s:\n%s"):format(case, c.took, line))
        assert.is_true(c.worst < 0.3, ("%s: a loop turn took %.2f s:\n%s"):format(case, c.worst, line))
      end
      check("timeout", 1.5, "^nil|Resolving timed out after 50%d milliseconds|timeout$")
      check("cancel", 1, "^nil|closed|nil$")
      check("free", 1, "^collected|nil|nil$")
    end)

    describe("TLS", function()
      local cert, key, other_cert, other_key
      setup(function()
        cert, key = tmp .. "/cert.pem", tmp .. "/key.pem"
        other_cert, other_key = tmp .. "/other.pem", tmp .. "/other-key.pem"
        local out = sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s -days 1 " ..
          "-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"):format(key, cert))
        assert(io.open(cert), out)
        out = sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s -days 1 " ..
          "-subj /CN=other.test -addext subjectAltName=DNS:other.test"):format(other_key, other_cert))
        assert(io.open(other_cert), out)
      end)

      local function tls_app(c, k)
        local app = new_app({ tls = { cert = c or cert, key = k or key } })
        app:get("/hi", function() return "hello over tls" end)
        app:stream("/ev", function(stream) for i = 1, 3 do stream:send("s" .. i) end end)
        assert(app:listen())
        assert.truthy(app.url:find("^https://"))
        return app
      end

      it("https to the app's own TLS server: ca_file verifies it, insecure skips it, a stream works", function()
        local app = tls_app()
        local res, err = in_app(app, function() return app:fetch(app.url .. "/hi", { ca_file = cert, timeout = 5 }) end)
        assert.is_table(res, tostring(err))
        assert.are.equal(200, res.status)
        assert.are.equal("hello over tls", res.body)
        -- by name: the certificate's subjectAltName has DNS:localhost too
        res, err = in_app(app, function()
          return app:fetch(("https://localhost:%d/hi"):format(app.port), { ca_file = cert, timeout = 5 })
        end)
        assert.is_table(res, tostring(err))
        assert.are.equal("hello over tls", res.body)
        res, err = in_app(app, function() return app:fetch(app.url .. "/hi", { insecure = true, timeout = 5 }) end)
        assert.is_table(res, tostring(err))
        assert.are.equal("hello over tls", res.body)
        local body = in_app(app, function()
          local r = assert(app:fetch(app.url .. "/ev", { ca_file = cert, stream = true, timeout = 5 }))
          local parts = {}
          for piece in r.read, r do parts[#parts + 1] = piece end
          return table.concat(parts)
        end)
        assert.truthy(body:find("data: s3\n\n", 1, true), body)
      end)

      it("an untrusted certificate, a wrong CA, a name that does not match, a missing ca_file: 'tls'", function()
        local app = tls_app()
        local mismatch = tls_app(other_cert, other_key)   -- certifies other.test only
        local cases = {
          { app.url .. "/hi", {}, "certificate" },                            -- self-signed, system CAs
          { app.url .. "/hi", { ca_file = other_cert }, "certificate" },      -- another CA
          { mismatch.url .. "/hi", { ca_file = other_cert }, "127.0.0.1" },   -- right CA, wrong name
          { app.url .. "/hi", { ca_file = tmp .. "/none.pem" }, "none.pem" },
        }
        for i, c in ipairs(cases) do
          c[2].timeout = 5
          local out
          app:spawn(function() out = table.pack(app:fetch(c[1], c[2])) end)
          client.wait(app, function() mismatch:step(0) return out ~= nil end, 8, "TLS case " .. i)
          assert.is_nil(out[1], "case " .. i)
          assert.are.equal("tls", out[3], ("case %d: %s"):format(i, tostring(out[2])))
          assert.truthy(out[2]:find(c[3], 1, true), ("case %d: %s"):format(i, out[2]))
        end
      end)

      it("https to a plain-HTTP port is 'tls'; plain http to a TLS port is 'http'", function()
        local plain = new_app()
        assert(plain:listen())
        local r, msg, kind = in_app(plain, function()
          return plain:fetch(("https://127.0.0.1:%d/ping"):format(plain.port), { timeout = 5 })
        end)
        assert.is_nil(r)
        assert.are.equal("tls", kind, tostring(msg))
        local app = tls_app()
        r, msg, kind = in_app(app, function()
          return app:fetch(("http://127.0.0.1:%d/hi"):format(app.port), { timeout = 5 })
        end)
        assert.is_nil(r)
        assert.are.equal("http", kind, tostring(msg))
      end)
    end)

    it("other broken upstreams: a truncated body, a reply that is not HTTP, an empty reply: 'http'", function()
      local app = new_app()
      assert(app:listen())
      for _, path in ipairs({ "/truncated", "/garbage", "/empty" }) do
        local r, msg, kind = in_app(app, function() return app:fetch(upstream .. path, { timeout = 5 }) end)
        assert.is_nil(r, path)
        assert.is_string(msg, path)
        assert.are.equal("http", kind, path .. ": " .. tostring(msg))
      end
    end)

    it("headers past the limits (one 300 KB line; 4 lines of 90 KB): 'response headers too large'", function()
      local app = new_app()
      assert(app:listen())
      for _, q in ipairs({ "n=1&size=300000", "n=4&size=90000" }) do
        local r, msg, kind = in_app(app, function() return app:fetch(upstream .. "/hugeheader?" .. q, { timeout = 5 }) end)
        assert.is_nil(r, q)
        assert.are.equal("response headers too large", msg, q)
        assert.are.equal("too_large", kind, q)
      end
      -- below both limits it is a response
      local res = in_app(app, function() return app:fetch(upstream .. "/hugeheader?n=2&size=50000", { timeout = 5 }) end)
      assert.are.equal(200, res.status)
      assert.are.equal(50000, #res.headers["x-huge-1"])
    end)
  end)

  describe("size", function()
    it("50 MB with max_size = 1 MiB: 'response too large' long before the body could have come, without buffering it", function()
      local app = new_app()
      assert(app:listen())
      collectgarbage()
      local rss0 = client.rss_kb()
      -- paced: 64 KiB every 2 ms, so all of it would take more than 1.6 s
      local took, out, pings = while_pinging(app, function()
        return app:fetch(upstream .. "/big?bytes=52428800&pace_ms=2&id=paced", { max_size = MiB, timeout = 30 })
      end, 10, 0.02)
      assert.are.same({ n = 3, nil, "response too large", "too_large" }, out)
      assert.is_true(took < 1, ("took %.2f s"):format(took))
      assert_pings_ok(pings)
      local rss1 = client.rss_kb()
      assert.is_true(rss1 - rss0 < 16 * 1024, ("RSS grew by %d KB"):format(rss1 - rss0))
      local sent = poll(function() return big_sent("paced") end, 5)
      assert.is_number(sent, "the upstream's count")
      assert.is_true(sent < 16 * MiB, "the upstream could send " .. sent .. " bytes")
      -- unpaced, close-delimited: the same, as fast as loopback goes
      local r, msg, kind = in_app(app, function()
        return app:fetch(upstream .. "/big?bytes=52428800&id=fast", { max_size = MiB, timeout = 30 })
      end)
      assert.are.same({ nil, "response too large", "too_large" }, { r, msg, kind })
      -- with a Content-Length past max_size: refused before any body is read
      r, msg, kind = in_app(app, function()
        return app:fetch(upstream .. "/big?bytes=52428800&length=1&id=length", { max_size = MiB, timeout = 30 })
      end)
      assert.are.same({ nil, "response too large", "too_large" }, { r, msg, kind })
      assert.is_true(poll(function() return big_sent("length") end, 5) < 16 * MiB)
      -- exactly max_size is fine
      local res = in_app(app, function() return app:fetch(upstream .. "/big?bytes=1048576&id=exact", { max_size = MiB }) end)
      assert.are.equal(MiB, #res.body)
      collectgarbage()
      assert.is_true(client.rss_kb() - rss0 < 24 * 1024, ("RSS grew by %d KB"):format(client.rss_kb() - rss0))
    end)

    it("stream = true: no max_size by default (20 MB read as it comes, memory stays flat)", function()
      local app = new_app()
      assert(app:listen())
      collectgarbage()
      local rss0 = client.rss_kb()
      local total, pieces, biggest = in_app(app, function()
        local res = assert(app:fetch(upstream .. "/big?bytes=20971520&id=s20", { stream = true, timeout = 30 }))
        local n, k, big = 0, 0, 0
        while true do
          local piece, err, kind = res:read()
          if not piece then assert(err == nil, tostring(err) .. " " .. tostring(kind)) break end
          n, k, big = n + #piece, k + 1, math.max(big, #piece)
          if k % 50 == 0 then collectgarbage("step") end
        end
        return n, k, big
      end, 20)
      assert.are.equal(20 * MiB, total)
      assert.is_true(pieces > 10, "pieces: " .. pieces)
      assert.is_true(client.rss_kb() - rss0 < 24 * 1024, ("RSS grew by %d KB (largest piece %d)"):format(client.rss_kb() - rss0, biggest))
    end)

    it("stream = true with max_size caps the whole body: pieces up to it, then nil, 'response too large', 'too_large'", function()
      local app = new_app()
      assert(app:listen())
      local got, err, kind, status = in_app(app, function()
        local res = assert(app:fetch(upstream .. "/big?bytes=52428800&pace_ms=1&id=scap", { stream = true, max_size = MiB, timeout = 30 }))
        local n = 0
        while true do
          local piece, e, k = res:read()
          if not piece then return n, e, k, res.status end
          n = n + #piece
        end
      end, 10)
      assert.are.equal(200, status)
      assert.is_true(got <= MiB, "read " .. got)
      assert.is_true(got > 0, "read nothing")
      assert.are.equal("response too large", err)
      assert.are.equal("too_large", kind)
      -- a Content-Length past max_size: no response object at all
      local r, msg, k = in_app(app, function()
        return app:fetch(upstream .. "/big?bytes=52428800&length=1&id=slen", { stream = true, max_size = MiB, timeout = 30 })
      end)
      assert.are.same({ nil, "response too large", "too_large" }, { r, msg, k })
    end)

    it("stream = true, a reader that does not read: cut at 16 MiB unread, then 'response too large'", function()
      local app = new_app()
      assert(app:listen())
      local res
      app:spawn(function() res = assert(app:fetch(upstream .. "/big?bytes=52428800&id=unread", { stream = true, timeout = 30 })) end)
      client.wait(app, function() return res ~= nil end, 5, "the head")
      client.wait(app, function() return big_sent("unread") ~= nil end, 10, "the upstream to be cut off")
      assert.is_true(big_sent("unread") < 32 * MiB, "sent " .. big_sent("unread"))
      local buffered, err, kind = in_app(app, function()
        local first = res:read()
        return #first, select(2, res:read())
      end)
      assert.is_true(buffered >= 15 * MiB and buffered <= 17 * MiB, "buffered " .. buffered)
      assert.are.equal("response too large", err)
      assert.are.equal("too_large", kind)
    end)
  end)

  describe("redirects", function()
    local function redirect_app()
      local app = new_app()
      app:get("/r302", function() return 302, "moved", { Location = "/json" } end)
      app:get("/chain", function(req)
        local n = tonumber(req.query.n)
        if n > 0 then return 302, "", { Location = "/chain?n=" .. (n - 1) } end
        return 200, "landed"
      end)
      app:get("/loop", function() return 302, "", { Location = "/loop" } end)
      assert(app:listen())
      return app
    end

    it("are off by default: a 302 is a response with its Location header", function()
      local app = redirect_app()
      local res = in_app(app, function() return app:fetch(app.url .. "/r302") end)
      assert.are.equal(302, res.status)
      assert.are.equal("/json", res.headers["location"])
      assert.are.equal("moved", res.body)
    end)

    it("with redirects = true are followed to the final response; a loop ends as 'http' at once", function()
      local app = redirect_app()
      local res = in_app(app, function() return app:fetch(app.url .. "/r302", { redirects = true }) end)
      assert.are.equal(200, res.status)
      assert.are.equal("application/json", res.headers["content-type"])
      assert.is_nil(res.headers["location"])
      res = in_app(app, function() return app:fetch(app.url .. "/chain?n=5", { redirects = true }) end)
      assert.are.equal(200, res.status)
      assert.are.equal("landed", res.body)
      local t0 = gettime()
      local r, msg, kind = in_app(app, function() return app:fetch(app.url .. "/loop", { redirects = true, timeout = 5 }) end)
      assert.is_nil(r)
      assert.are.equal("http", kind, tostring(msg))
      assert.truthy(msg:lower():find("redirect", 1, true), msg)
      assert.is_true(gettime() - t0 < 2)
      -- and a stream follows them too
      local body = in_app(app, function()
        local s = assert(app:fetch(app.url .. "/chain?n=2", { redirects = true, stream = true, timeout = 5 }))
        return s.status, s:read()
      end)
      assert.are.equal(200, body)
    end)
  end)

  describe("under load", function()
    it("200 fetches waiting 2 s on a slow upstream: the healthy stream keeps its 100 ms, /ping answers at once, all get 200, no descriptor is left", function()
      local app = new_app()
      app:stream("/tick", function(stream)
        local i = 0
        while true do
          i = i + 1
          if not stream:send(tostring(i)) then return end
          if not app:sleep(0.1) then return end
        end
      end)
      assert(app:listen())
      local watch_out = tmp .. "/watch.out"
      os.remove(watch_out)
      spawn(("lua5.4 spec/fixtures/fetch_watch.lua %d /tick %s"):format(app.port, watch_out), "/dev/null", tmp .. "/watch.err")
      client.wait(app, function() return #lines_of(watch_out) >= 3 end, 10, "the healthy client's first events")
      -- one fetch first: libcurl's multi handle (and its wake-up socket pair) exists from then on
      assert.are.equal(200, in_app(app, function() return app:fetch(upstream .. "/delay?ms=0") end).status)
      client.run_for(app, 0.1)
      collectgarbage()
      local base_fds, base_anchors = fds(), anchors(app)
      local N, statuses, done_at = 200, {}, {}
      local t0 = gettime()
      for i = 1, N do
        app:spawn(function()
          local res, err, kind = app:fetch(upstream .. "/delay?ms=2000", { timeout = 30 })
          statuses[i] = res and res.status or (tostring(err) .. " " .. tostring(kind))
          done_at[i] = gettime() - t0
        end)
      end
      local pings = {}
      local ndone = function() local n = 0 for _ in pairs(statuses) do n = n + 1 end return n end
      local next_ping = t0 + 0.2
      local in_flight_fds = 0   -- the most descriptors seen while all 200 waited
      while ndone() < N and gettime() < t0 + 20 do
        if gettime() >= next_ping then
          local p0 = gettime()
          local res = client.request(app, "GET", "/ping")
          pings[#pings + 1] = gettime() - p0
          assert.are.equal(200, res.status)
          next_ping = gettime() + 0.1
          in_flight_fds = math.max(in_flight_fds, ndone() == 0 and fds() or 0)
        else
          client.step(app)
        end
      end
      local t_end = gettime()
      assert.are.equal(N, ndone(), "fetches done")
      local first, last = math.huge, 0
      for i = 1, N do
        assert.are.equal(200, statuses[i], "fetch " .. i)
        first, last = math.min(first, done_at[i]), math.max(last, done_at[i])
      end
      assert.is_true(first >= 1.9, ("a fetch ended after %.2f s, before the upstream answered"):format(first))
      assert.is_true(last < 8, ("the last fetch ended after %.2f s: they did not overlap"):format(last))
      -- (a few either way: a ping's connection, the upstream closing one)
      assert.is_true(in_flight_fds >= base_fds + N - 5, ("at most %d descriptors while in flight, %d before"):format(in_flight_fds, base_fds))
      client.run_for(app, 0.3)
      -- the healthy stream, as its own process saw it
      local times = {}
      for _, l in ipairs(lines_of(watch_out)) do
        local t = tonumber(l)
        if t and t >= t0 - 0.15 and t <= t_end + 0.15 then times[#times + 1] = t end
      end
      local worst = 0
      for i = 2, #times do worst = math.max(worst, times[i] - times[i - 1]) end
      table.sort(pings)
      local median = pings[(#pings + 1) // 2]
      local log = os.getenv("FETCH_GAP_LOG")
      if log then
        local f = io.open(log, "a")
        f:write(("worst gap %.3f s over %d events; %d pings, median %.4f s, max %.4f s; fetches %.2f..%.2f s\n")
          :format(worst, #times, #pings, median, pings[#pings], first, last))
        f:close()
      end
      assert.is_true(#times >= 15, "events of the healthy stream during the fetches: " .. #times)
      assert.is_true(worst < 0.15, ("the healthy stream stalled: a gap of %.3f s"):format(worst))
      assert.is_true(#pings >= 8, "pings: " .. #pings)
      assert.is_true(median < 0.02, ("median ping %.4f s"):format(median))
      assert.is_true(pings[#pings] < 0.2, ("slowest ping %.4f s"):format(pings[#pings]))
      client.wait(app, function() return fds() <= base_fds end, 10,
        "descriptors back to " .. base_fds, function() return "now " .. fds() end)
      collectgarbage()
      collectgarbage()
      assert.are.equal(base_anchors, anchors(app))
    end)
  end)

  describe("leaks", function()
    it("550 fetches (own server kept alive, upstream, cancelled with their client, streamed and closed or dropped): descriptors and anchors back to baseline", function()
      local app = new_app({ keepalive_timeout = 1 })
      local relayed = {}
      app:stream("/relay", function(stream)
        stream:send("start")
        local r = { app:fetch(upstream .. "/delay?ms=2500", { timeout = 30 }) }
        relayed[#relayed + 1] = r   -- not in one statement: the index would be taken before the wait
      end)
      assert(app:listen())
      assert.are.equal(200, in_app(app, function() return app:fetch(upstream .. "/delay?ms=0") end).status)
      collectgarbage()
      client.run_for(app, 0.1)
      local base_fds, base_anchors = fds(), anchors(app)
      collectgarbage()
      local rss0 = client.rss_kb()
      local count = { ok = 0 }
      local function batch(n, width, fn)
        local started, finished = 0, 0
        local function worker()
          while started < n do
            started = started + 1
            fn(started)
            finished = finished + 1
          end
        end
        for _ = 1, width do app:spawn(worker) end
        client.wait(app, function() return finished == n end, 30, ("%d of %d fetches"):format(finished, n))
      end
      -- 200 to the app itself: keep-alive connections, which libcurl caches
      batch(200, 40, function()
        local res = assert(app:fetch(app.url .. "/json", { timeout = 10 }))
        assert(res.status == 200)
        count.ok = count.ok + 1
      end)
      -- 200 to the upstream, which closes each connection
      batch(200, 40, function()
        local res = assert(app:fetch(upstream .. "/delay?ms=0", { timeout = 10 }))
        assert(res.status == 200)
        count.ok = count.ok + 1
      end)
      -- 50 streamed: one piece read, then half closed, half dropped
      batch(50, 25, function(i)
        local res = assert(app:fetch(upstream .. "/drip", { stream = true, timeout = 10 }))
        assert(res:read())
        if i % 2 == 0 then res:close() end
        count.ok = count.ok + 1
      end)
      collectgarbage()
      collectgarbage()
      assert.are.equal(450, count.ok)
      -- 100 generators waiting on the upstream; 60 lose their client meanwhile
      local clients = {}
      for i = 1, 100 do clients[i] = client.connect(app, "/relay") end
      client.wait(app, function()
        for _, c in ipairs(clients) do if #c.events < 1 then return false end end
        return true
      end, 10, "100 relays started")
      for i = 1, 60 do clients[i]:close() end
      client.wait(app, function() return #relayed >= 60 end, 5, "60 relays cancelled", function() return ("%d relays ended"):format(#relayed) end)
      client.wait(app, function() return #relayed == 100 end, 10, "40 relays answered")
      local closed, answered = 0, 0
      for _, r in ipairs(relayed) do
        if r[1] == nil and r[2] == "closed" then closed = closed + 1
        elseif r[1] and r[1].status == 200 then answered = answered + 1 end
      end
      assert.are.same({ 60, 40 }, { closed, answered })
      for i = 61, 100 do clients[i]:close() end
      -- what libcurl keeps alive is closed once it has been idle a while
      client.wait(app, function() collectgarbage() return fds() <= base_fds end, 15,
        "descriptors back to " .. base_fds, function() return "now " .. fds() end)
      collectgarbage()
      collectgarbage()
      assert.are.equal(base_anchors, anchors(app))
      assert.is_true(client.rss_kb() - rss0 < 32 * 1024, ("RSS grew by %d KB"):format(client.rss_kb() - rss0))
      -- and it still works
      assert.are.equal(200, in_app(app, function() return app:fetch(app.url .. "/json") end).status)
    end)
  end)
end)
