-- app:eventsource (issue 10, part 4, first step): the EventSource processing model in Lua,
-- against the app's own server: events as they come, reconnect with Last-Event-ID after
-- the server's retry, stop for good on 204, another status, or another Content-Type.
local client = require("support.client")

local in_app = client.in_app

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

  it("raises outside an app coroutine and for bad options", function()
    local app = client.app()
    assert.has_error(function() app:eventsource(42) end, "app:eventsource: url must be a string")
    assert.has_error(function() app:eventsource("http://x/", { retyr = 1 }) end,
      "app:eventsource: unknown option 'retyr'")
    local src = app:eventsource("http://127.0.0.1:1/")
    assert.has_error(function() src:next() end)
  end)
end)
