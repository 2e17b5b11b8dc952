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

local SSE_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

describe("app:eventsource", function()
  after_each(function() client.cleanup() end)

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

  it("raises outside an app coroutine and for bad options", function()
    local app = client.app()
    assert.has_error(function() app:eventsource(42) end, "app:eventsource: url must be a string")
    assert.has_error(function() app:eventsource("http://x/", { retyr = 1 }) end,
      "app:eventsource: unknown option 'retyr'")
    local src = app:eventsource("http://127.0.0.1:1/")
    assert.has_error(function() src:next() end)
  end)
end)
