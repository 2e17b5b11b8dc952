-- app:eventsource (issue 10, part 4, first step): the EventSource processing model in Lua,
-- against the app's own server: events as they come, reconnect with Last-Event-ID after
-- the server's retry, stop for good on 204, another status, or another Content-Type.
local client = require("support.client")
local socket = require("socket")

local in_app = client.in_app

-- A raw HTTP server on loopback (luasocket), polled while the app steps: connection n is
-- answered by script[n](head), which returns the bytes to send (nil: close at once without
-- answering) and whether to keep the connection open after them.
local function raw_server(script)
  local srv = assert(socket.bind("127.0.0.1", 0))
  srv:settimeout(0)
  local _, port = srv:getsockname()
  local s = { port = tonumber(port), url = "http://127.0.0.1:" .. port, heads = {}, conns = {} }
  local pending = {}
  function s.poll()
    local c = srv:accept()
    if c then c:settimeout(0) pending[#pending + 1] = { sock = c, buf = "" } end
    for i = #pending, 1, -1 do
      local p = pending[i]
      local data, err, partial = p.sock:receive(4096)
      p.buf = p.buf .. (data or partial or "")
      if p.buf:find("\r\n\r\n", 1, true) then
        table.remove(pending, i)
        s.heads[#s.heads + 1] = p.buf
        local answer, keep = script[#s.heads](p.buf)
        if answer then p.sock:send(answer) end
        if keep then s.conns[#s.conns + 1] = p.sock else p.sock:close() end
      elseif err and err ~= "timeout" then
        table.remove(pending, i)
        p.sock:close()
      end
    end
  end
  function s.close()
    srv:close()
    for _, c in ipairs(s.conns) do c:close() end
    for _, p in ipairs(pending) do p.sock:close() end
  end
  return s
end

-- in_app, polling a raw server between steps.
local function in_app_with(app, srv, fn, timeout)
  local out
  app:spawn(function() out = table.pack(fn()) end)
  client.wait(app, function() srv.poll() return out ~= nil end, timeout or 5, "the app coroutine")
  return table.unpack(out, 1, out.n)
end

-- test/servers/oddframes.mjs in the background: { url, pid, count(route) }.
local node_servers = {}
local function node_server()
  local h = assert(io.popen("exec 2>/dev/null; node test/servers/oddframes.mjs 0 & echo pid $!"))
  local srv = {}
  for _ = 1, 2 do
    local line = h:read("l")
    if not line then break end
    srv.pid = srv.pid or tonumber(line:match("^pid (%d+)"))
    srv.url = srv.url or line:match("^(http://127%.0%.0%.1:%d+)")
  end
  h:close()
  assert(srv.pid and srv.url, "test/servers/oddframes.mjs did not start")
  node_servers[#node_servers + 1] = srv
  function srv.count(route)
    local http = require("socket.http")
    local body = assert(http.request(srv.url .. "/count?route=" .. route))
    return tonumber(body:match('"count":(%d+)'))
  end
  return srv
end

local function stop_node_servers()
  for _, srv in ipairs(node_servers) do os.execute("kill " .. srv.pid .. " 2>/dev/null") end
  node_servers = {}
end

-- Resident memory of this process now, KB (VmRSS).
local function rss_kb() return client.rss_kb() end

local SSE_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

describe("app:eventsource", function()
  after_each(function()
    client.cleanup()
    stop_node_servers()
  end)

  it("gets every event, reconnects after the server's retry with Last-Event-ID, stops on 204", function()
    local app = client.app({ heartbeat = false })
    local requests = {}
    app:stream("/ticks", function(stream, req)
      local from = tonumber(req.last_event_id) or 0
      for i = from + 1, from + 2 do
        stream:send({ id = tostring(i), data = "tick " .. i, retry = 150 })
      end
    end, { accept = function(req)
      requests[#requests + 1] = { at = client.gettime(), last = req.last_event_id }
      if tonumber(req.last_event_id or "0") >= 4 then return 204 end
    end })
    assert(app:listen())
    local got, err = in_app(app, function()
      local src = app:eventsource(app.url .. "/ticks")
      local evs = {}
      for ev in src:events() do evs[#evs + 1] = ev end
      local _, why = src:next()
      return evs, why, src.status
    end)
    assert.are.equal(4, #got)
    for i = 1, 4 do
      assert.are.equal("tick " .. i, got[i].data)
      assert.are.equal(tostring(i), got[i].id)
      assert.are.equal("message", got[i].event)
    end
    assert.truthy(err:find("204", 1, true), err)
    assert.are.equal(3, #requests)
    assert.is_nil(requests[1].last)
    assert.are.equal("2", requests[2].last)
    assert.are.equal("4", requests[3].last)
    -- after the server's retry (150 ms, with up to 10 % less jitter)
    assert.is_true(requests[2].at - requests[1].at >= 0.13, "reconnected too soon")
  end)

  it("stops for good on another status or Content-Type, and without reconnect when told", function()
    local app = client.app({ heartbeat = false })
    app:get("/plain", function() return "not a stream" end)
    app:get("/boom", function() return 500, "no" end)
    local calls = 0
    app:stream("/once", function(stream) calls = calls + 1 stream:send("only") end)
    assert(app:listen())
    local r = { in_app(app, function()
      local a = app:eventsource(app.url .. "/plain")
      local b = app:eventsource(app.url .. "/boom")
      local c = app:eventsource(app.url .. "/once", { reconnect = false })
      local _, ea = a:next()
      local _, eb = b:next()
      local ev = c:next()
      local none, ec = c:next()
      return ea, eb, ev and ev.data, none, ec, a.status
    end) }
    assert.truthy(r[1]:find("Content-Type text/plain", 1, true), r[1])
    assert.truthy(r[2]:find("HTTP 500", 1, true), r[2])
    assert.are.equal("only", r[3])
    assert.is_nil(r[4])
    assert.is_string(r[5])
    assert.are.equal("closed", r[6])
    assert.are.equal(1, calls)
  end)

  it("connect() waits for the open, before any event, and sets http_status", function()
    local app = client.app({ heartbeat = false })
    local release = false
    app:stream("/slow", function(stream)
      while not release do stream:sleep(0.01) end
      stream:send("late")
    end)
    assert(app:listen())
    local ok, err, status, http_status, data, status_before = in_app(app, function()
      local src = app:eventsource(app.url .. "/slow")
      local before = src.http_status
      local ok, err = src:connect()
      local st, hs = src.status, src.http_status
      release = true
      local ev = src:next()
      -- open already: true at once
      assert(src:connect() == true)
      src:close()
      return ok, err, st, hs, ev and ev.data, before
    end)
    assert.is_true(ok, err)
    assert.are.equal("open", status)
    assert.are.equal(200, http_status)
    assert.is_nil(status_before)
    assert.are.equal("late", data)
  end)

  it("connect() fails with next()'s error on 204 / 500 / another type, closed for good", function()
    local app = client.app({ heartbeat = false })
    app:get("/plain", function() return "not a stream" end)
    app:get("/boom", function() return 500, "no" end)
    app:stream("/gone", function() end, { accept = function() return 204 end })
    assert(app:listen())
    local r = { in_app(app, function()
      local out = {}
      for _, path in ipairs({ "/gone", "/boom", "/plain" }) do
        local src = app:eventsource(app.url .. path)
        local ok, err = src:connect()
        local none, err2 = src:next()
        local ok3, err3 = src:connect()
        out[#out + 1] = { ok = ok, err = err, status = src.status, http = src.http_status,
                          none = none, err2 = err2, ok3 = ok3, err3 = err3 }
      end
      return out
    end) }
    local out = r[1]
    local want = { { 204, "204" }, { 500, "HTTP 500" }, { 200, "Content-Type text/plain" } }
    for i, w in ipairs(want) do
      local o = out[i]
      assert.is_nil(o.ok)
      assert.truthy(o.err:find(w[2], 1, true), o.err)
      assert.are.equal("closed", o.status)
      assert.are.equal(w[1], o.http)
      assert.is_nil(o.none)
      assert.are.equal(o.err, o.err2)
      assert.is_nil(o.ok3)
      assert.are.equal(o.err, o.err3)
    end
  end)

  it("connect() returns nil, err on a failed attempt; the source is still usable", function()
    local app = client.app({ heartbeat = false })
    local srv = raw_server({
      function() return nil end,                                   -- dropped, no answer
      function() return SSE_HEAD .. "id: 1\ndata: second try\n\n", true end,
    })
    local r = { in_app_with(app, srv, function()
      local src = app:eventsource(srv.url .. "/x", { retry = 50 })
      local ok, err = src:connect()
      local status, http = src.status, src.http_status
      local ev = src:next()                                        -- reconnects
      local http2 = src.http_status
      src:close()
      return ok, err, status, http, ev and ev.data, http2
    end) }
    srv.close()
    assert.is_nil(r[1])
    assert.is_string(r[2])
    assert.are_not.equal("closed", r[3])
    assert.is_nil(r[4])
    assert.are.equal("second try", r[5])
    assert.are.equal(200, r[6])
    assert.are.equal(2, #srv.heads)
  end)

  it("connect() is true at once while events are queued", function()
    local app = client.app({ heartbeat = false })
    app:stream("/two", function(stream)
      stream:send("a") stream:send("b")
      stream:sleep(5)
    end)
    assert(app:listen())
    local a, ok, b = in_app(app, function()
      local src = app:eventsource(app.url .. "/two")
      local a = src:next()
      -- "b" came in the same piece or will come; once queued, connect() is immediate
      local ok = src:connect()
      local b = src:next()
      src:close()
      return a.data, ok, b.data
    end)
    assert.are.equal("a", a)
    assert.is_true(ok)
    assert.are.equal("b", b)
  end)

  it("reconnects after the server's retry (300 ms, with jitter) with Last-Event-ID; nothing after a 204", function()
    local app = client.app({ heartbeat = false })
    local requests = {}
    app:stream("/drop", function(stream)
      local n = #requests
      stream:send({ id = "ev" .. n, data = "n" .. n, retry = 300 })
      -- the stream ends here: the client reconnects
    end, { accept = function(req)
      requests[#requests + 1] = { at = client.gettime(), last = req.headers["last-event-id"] }
      if #requests > 3 then return 204 end
    end })
    assert(app:listen())
    local got, err, status = in_app(app, function()
      local src = app:eventsource(app.url .. "/drop")
      local evs = {}
      for ev in src:events() do evs[#evs + 1] = ev.data .. "/" .. ev.id end
      local _, why = src:next()
      return evs, why, src.status
    end, 15)
    assert.same({ "n1/ev1", "n2/ev2", "n3/ev3" }, got)
    assert.truthy(err:find("204", 1, true), err)
    assert.are.equal("closed", status)
    assert.are.equal(4, #requests)
    assert.is_nil(requests[1].last)
    for i = 2, 4 do
      assert.are.equal("ev" .. (i - 1), requests[i].last)
      local gap = requests[i].at - requests[i - 1].at
      -- 300 ms less 10 % jitter at worst; a generous upper bound for a noisy machine
      assert.is_true(gap >= 0.25, ("request %d came %.3f s after the one before"):format(i, gap))
      assert.is_true(gap <= 1.5, ("request %d came %.3f s after the one before"):format(i, gap))
    end
    -- after the 204: no request over five times the retry
    client.run_for(app, 1.5)
    assert.are.equal(4, #requests)
  end)

  it("after a drop mid-event (Node server): the complete events, then a reconnect with Last-Event-ID", function()
    local app = client.app({ heartbeat = false })
    local node = node_server()
    local got = in_app(app, function()
      local src = app:eventsource(node.url .. "/odd/drop_mid_line", { retry = 100 })
      local evs = {}
      for _ = 1, 4 do
        local ev = src:next()
        evs[#evs + 1] = ev.data .. "/" .. ev.id
      end
      src:close()
      return evs
    end, 10)
    -- "data: c" was cut before its line end: never dispatched
    assert.same({ "a/9", "b/9", "a/9", "b/9" }, got)
    assert.are.equal(2, node.count("odd/drop_mid_line"))
  end)

  it("a 10 MB upstream line: nil, 'line longer than 1048576 bytes', at once, memory bounded, no reconnect", function()
    local app = client.app({ heartbeat = false })
    local node = node_server()
    collectgarbage()
    local before, most = rss_kb(), 0
    local out
    app:spawn(function()
      local src = app:eventsource(node.url .. "/longline?bytes=10000000", { retry = 50 })
      local ev, err = src:next()
      out = { ev = ev, err = err, status = src.status }
    end)
    client.wait(app, function()
      local kb = rss_kb()
      if kb > most then most = kb end
      return out ~= nil
    end, 10, "the error")
    assert.is_nil(out.ev)
    assert.are.equal("line longer than 1048576 bytes", out.err)
    assert.are.equal("closed", out.status)
    -- the line would hold 10 MB unbounded; with the bound the parser holds at most 2 MiB
    -- and the unread response what arrived between two reads
    assert.is_true(most - before < 8 * 1024, ("RSS grew by %d KB"):format(most - before))
    client.run_for(app, 0.5)       -- ten times the retry: it closed for good
    assert.are.equal(1, node.count("longline"))
  end)

  it("an event's data past max_event ends the source after the events before it", function()
    local app = client.app({ heartbeat = false })
    local calls = 0
    app:stream("/big", function(stream)
      calls = calls + 1
      stream:send({ id = "1", data = "small" })
      stream:send(("abcdefghi\n"):rep(200))      -- 200 data lines: 1999 bytes of data
      stream:send("never seen")
      stream:sleep(5)
    end)
    assert(app:listen())
    local r = { in_app(app, function()
      local src = app:eventsource(app.url .. "/big", { max_event = 1000, retry = 50 })
      local first = src:next()
      local none, err = src:next()
      local ok, err2 = src:connect()
      return first.data, none, err, src.status, ok, err2, src.last_event_id
    end) }
    assert.are.equal("small", r[1])
    assert.is_nil(r[2])
    assert.are.equal("event data longer than 1000 bytes", r[3])
    assert.are.equal("closed", r[4])
    assert.is_nil(r[5])
    assert.are.equal(r[3], r[6])
    assert.are.equal("1", r[7])
    client.run_for(app, 0.3)
    assert.are.equal(1, calls)
  end)

  it("a line past max_line: the events before it, then the error", function()
    local app = client.app({ heartbeat = false })
    app:stream("/long", function(stream)
      stream:send("one")
      stream:send("two")
      stream:send(("x"):rep(200))
      stream:sleep(5)
    end)
    assert(app:listen())
    local r = { in_app(app, function()
      local src = app:eventsource(app.url .. "/long", { max_line = 100 })
      local a = src:next()
      local b = src:next()
      local none, err = src:next()
      return a.data, b.data, none, err
    end) }
    assert.same({ "one", "two" }, { r[1], r[2] })
    assert.is_nil(r[3])
    assert.are.equal("line longer than 100 bytes", r[4])
  end)

  it("sends Accept, Cache-Control and the program's headers (its own Accept, in any case, replaces ours)", function()
    local app = client.app({ heartbeat = false })
    local seen = {}
    app:stream("/h", function(stream, req)
      seen[#seen + 1] = req.headers
      stream:send("x")
      stream:sleep(5)
    end)
    assert(app:listen())
    in_app(app, function()
      for _, h in ipairs({ { ["X-Token"] = "t" }, { accept = "text/event-stream, */*" } }) do
        local src = app:eventsource(app.url .. "/h", { headers = h, last_event_id = "5" })
        src:next()
        src:close()
      end
    end)
    assert.are.equal("text/event-stream", seen[1].accept)
    assert.are.equal("no-cache", seen[1]["cache-control"])
    assert.are.equal("t", seen[1]["x-token"])
    assert.are.equal("5", seen[1]["last-event-id"])
    assert.are.equal("text/event-stream, */*", seen[2].accept)
  end)

  it("follows a redirect, as browsers do", function()
    local app = client.app({ heartbeat = false })
    app:get("/old", function() return 302, "", { Location = "/new" } end)
    app:stream("/new", function(stream) stream:send("moved") stream:sleep(5) end)
    assert(app:listen())
    local data, status = in_app(app, function()
      local src = app:eventsource(app.url .. "/old")
      local ev = src:next()
      src:close()
      return ev and ev.data, src.http_status
    end)
    assert.are.equal("moved", data)
    assert.are.equal(200, status)
  end)

  it("close() drops the events not yet taken", function()
    local app = client.app({ heartbeat = false })
    app:stream("/three", function(stream)
      stream:send("a") stream:send("b") stream:send("c")
      stream:sleep(5)
    end)
    assert(app:listen())
    local r = { in_app(app, function()
      local src = app:eventsource(app.url .. "/three")
      local a = src:next()
      src:close()
      local none, err = src:next()
      return a.data, none, err, src.status
    end) }
    assert.are.equal("a", r[1])
    assert.is_nil(r[2])
    assert.are.equal("closed by the program", r[3])
    assert.are.equal("closed", r[4])
  end)

  it("keeps the last event id across connections, as browsers do (an empty id: resets it)", function()
    local app = client.app({ heartbeat = false })
    local bodies = {
      "retry: 50\nid: 1\ndata: a\n\n",
      "data: b\n\nid: 2\n\n",
      "data: c\n\nid\ndata: d\n\n",
      "data: e\n\n",
    }
    local script = {}
    for i, body in ipairs(bodies) do script[i] = function() return SSE_HEAD .. body end end
    script[#bodies + 1] = function() return "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n" end
    local srv = raw_server(script)
    local got = in_app_with(app, srv, function()
      local src = app:eventsource(srv.url .. "/ids")
      local evs = {}
      for ev in src:events() do evs[#evs + 1] = ev.data .. "/" .. ev.id end
      return evs
    end, 10)
    srv.close()
    assert.same({ "a/1", "b/1", "c/2", "d/", "e/" }, got)
    local sent = {}
    for i, head in ipairs(srv.heads) do sent[i] = head:match("[Ll]ast%-[Ee]vent%-[Ii][Dd]: ([^\r]*)") or "-" end
    assert.same({ "-", "1", "2", "-", "-" }, sent)
  end)

  it("refuses bad max_line, max_event and last_event_id", function()
    local app = client.app()
    assert.has_error(function() app:eventsource("http://x/", { max_line = 0 }) end,
      "app:eventsource: option 'max_line' must be a positive integer (bytes)")
    assert.has_error(function() app:eventsource("http://x/", { max_event = 2.5 }) end,
      "app:eventsource: option 'max_event' must be a positive integer (bytes)")
    assert.has_error(function() app:eventsource("http://x/", { last_event_id = "a\nb" }) end,
      "app:eventsource: option 'last_event_id' must not contain CR, LF or NUL")
  end)

  it("raises outside an app coroutine and for bad options", function()
    local app = client.app()
    assert.has_error(function() app:eventsource(42) end, "app:eventsource: url must be a string")
    assert.has_error(function() app:eventsource("http://x/", { retyr = 1 }) end,
      "app:eventsource: unknown option 'retyr'")
    local src = app:eventsource("http://127.0.0.1:1/")
    assert.has_error(function() src:next() end)
  end)
end)
