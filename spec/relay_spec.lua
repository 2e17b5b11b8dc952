-- The relay (issue 10, item 5): lua/sse/relay.lua. Most upstreams here are routes of the
-- same app (the relay fetches its own server, as a real one would fetch another); the
-- restart test runs the upstream as a process of its own (test/browser/fixtures/
-- relay_upstream.lua), killed and started again on the same port.
local client = require("support.client")
local process = require("support.process")
local relay = require("sse.relay")
local cjson = require("cjson")
local socket = require("socket")

local gettime = client.gettime

-- ---- a second process (spec/support/process.lua) ----

local function start_process(script, env) return process.start(script, env) end
local function kill(proc, sig) proc:kill(sig) end

-- A plain blocking GET to another process (JSON answer decoded).
local function get_json(url)
  local http = require("socket.http")
  local body, code = http.request(url)
  assert(code == 200, "GET " .. url .. ": " .. tostring(code))
  return cjson.decode(body)
end

describe("relay", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
  end)

  -- An upstream on the app itself: /up/ticks?n=&every= numbered events (id, event, data,
  -- the retry given), counting its open streams and keeping the Last-Event-ID it was sent.
  local function upstream_app()
    local app, logs = client.app({ heartbeat = false })
    local up = { open = 0, served = 0, last_ids = {}, headers = {} }
    app:stream("/up/ticks", function(stream, req)
      up.open, up.served = up.open + 1, up.served + 1
      up.last_ids[#up.last_ids + 1] = req.last_event_id or false
      up.headers[#up.headers + 1] = req.headers
      stream:on_close(function() up.open = up.open - 1 end)
      local from = tonumber(req.last_event_id) or 0
      local n = tonumber(req.query.n) or 1000
      local every = tonumber(req.query.every) or 0.02
      for i = from + 1, n do
        local ev = { id = tostring(i), data = "tick " .. i }
        if i % 3 == 0 then ev.event = "third" end
        if i == from + 1 and req.query.retry then ev.retry = tonumber(req.query.retry) end
        if req.query.reset and i == 5 then ev.id = "" end   -- an id: line that resets the id
        if not stream:send(ev) then return end
        if every > 0 and not stream:sleep(every) then return end
      end
    end, { accept = function(req)
      -- all sent: 204 tells an EventSource (the relay's too) to stop reconnecting
      if tonumber(req.last_event_id) and tonumber(req.last_event_id) >= (tonumber(req.query.n) or 1000) then
        return 204
      end
    end })
    app:get("/up/plain", function() return "not a stream" end)
    app:get("/up/fail", function() return 500, "upstream failure" end)
    app:get("/up/gone", function() return 204 end)
    app:get("/up/json", function() return { no = "stream" } end)
    return app, up, logs
  end

  describe("refusals before any byte", function()
    for _, shared in ipairs({ false, true }) do
      it(("answers 502 with a short text for refused, 500, 204, another type (shared = %s)"):format(tostring(shared)), function()
        local app, up, logs = upstream_app()
        -- a port nothing listens on: bound, then closed
        local s = assert(socket.bind("127.0.0.1", 0))
        local _, dead_port = s:getsockname()
        s:close()
        local cases = {
          { "/r/refused", "http://127.0.0.1:" .. dead_port .. "/x", "could not be reached" },
          { "/r/fail", "/up/fail", "HTTP 500" },
          { "/r/gone", "/up/gone", "HTTP 204" },
          { "/r/plain", "/up/plain", "did not answer with an event stream" },
          { "/r/json", "/up/json", "did not answer with an event stream" },
        }
        for _, case in ipairs(cases) do
          local target = case[2]
          relay.route(app, case[1], function()
            return target:sub(1, 1) == "/" and app.url .. target or target
          end, { shared = shared })
        end
        assert(app:listen())
        for _, case in ipairs(cases) do
          local res = client.request(app, "GET", case[1], { headers = { Accept = "text/event-stream" }, timeout = 5 })
          assert.are.equal(502, res.status, case[1] .. ": " .. res.raw)
          assert.are.equal("text/plain; charset=utf-8", res.headers["content-type"])
          assert.truthy(res.body:find(case[3], 1, true), case[1] .. ": " .. res.body)
          assert.is_true(#res.body < 120, "a short body")
          assert.is_nil(res.body:find("127.0.0.1", 1, true), "the body names no upstream host")
        end
        assert.truthy(client.find_log(logs, "relay /r/refused"), client.show_logs(logs))
        assert.are.equal(0, up.open)
      end)
    end

    it("answers 404 when the upstream function gives no URL, and the options are checked", function()
      local app = client.app({ heartbeat = false })
      relay.route(app, "/maybe/:x", function(req)
        if req.params.x == "none" then return nil end
        return app.url .. "/nowhere"
      end)
      assert(app:listen())
      assert.are.equal(404, client.request(app, "GET", "/maybe/none").status)
      assert.has_error(function() relay.route(app, "/a", 42) end,
        "relay: upstream must be a URL or a function(req) -> url, headers")
      assert.has_error(function() relay.route(app, "/a", "http://x/", { sharde = true }) end,
        "relay: unknown option 'sharde'")
      assert.has_error(function() relay.route(app, "/a", "http://x/", { history = -1 }) end,
        "relay: option 'history' must be a non-negative integer")
      assert.has_error(function() relay.route(app, "/a", "http://x/", { shared = "yes" }) end,
        "relay: option 'shared' must be a boolean")
    end)
  end)

  describe("per client", function()
    it("forwards event, data, id and retry as they arrive, the same bytes a direct client gets", function()
      local app, up = upstream_app()
      relay.route(app, "/r/ticks", function(req) return app.url .. "/up/ticks" .. relay.query(req) end)
      assert(app:listen())
      local direct = client.connect(app, "/up/ticks?n=8&every=0.05&retry=700&reset=1")
      local via = client.connect(app, "/r/ticks?n=8&every=0.05&retry=700&reset=1")
      direct:wait_end(5)
      via:wait_end(5)
      assert.are.equal(8, #via.events)
      for i = 1, 8 do
        local d, v = direct.events[i], via.events[i]
        assert.are.same({ d.event, d.data, d.id }, { v.event, v.data, v.id })
      end
      assert.are.equal("third", via.events[3].event)
      assert.are.equal("tick 3", via.events[3].data)
      assert.are.equal("3", via.events[3].id)
      assert.are.equal("", via.events[5].id, "the reset passed on")
      assert.are.equal("6", via.events[6].id)
      -- the upstream's retry reaches the client with its first event
      assert.truthy(via.body:find("retry: 700\n", 1, true), via.body)
      -- events arrive as the upstream sends them, not at the end
      local spread = via.event_times[8] - via.event_times[1]
      assert.is_true(spread > 0.2, ("events spread over %.3f s"):format(spread))
      -- one upstream request per client (the direct one and the relay's)
      assert.are.equal(2, up.served)
    end)

    it("passes the client's Last-Event-ID upstream (header or query) and the upstream resumes after it", function()
      local app, up = upstream_app()
      relay.route(app, "/r/ticks", function(req) return app.url .. "/up/ticks" .. relay.query(req) end)
      assert(app:listen())
      local a = client.connect(app, "/r/ticks?n=6&every=0", { headers = { ["Last-Event-ID"] = "3" } })
      a:wait_end(5)
      assert.are.same({ "tick 4", "tick 5", "tick 6" }, a:data())
      local b = client.connect(app, "/r/ticks?n=6&every=0&lastEventId=5")
      b:wait_end(5)
      assert.are.same({ "tick 6" }, b:data())
      -- an id no EventSource could hold (a LF, from the query) is not passed on
      local odd = client.connect(app, "/r/ticks?n=2&every=0&lastEventId=a%0Ab")
      odd:wait_end(5)
      assert.are.same({ "tick 1", "tick 2" }, odd:data())
      assert.are.same({ "3", "5", false }, up.last_ids)
    end)

    it("sends the headers the upstream function gives, and the static ones", function()
      local app, up = upstream_app()
      relay.route(app, "/r/ticks", function(req)
        return app.url .. "/up/ticks?n=1", { Authorization = req.headers.authorization }
      end, { headers = { ["X-Relay"] = "yes" } })
      assert(app:listen())
      local c = client.connect(app, "/r/ticks", { headers = { Authorization = "Bearer abc" } })
      c:wait_end(5)
      assert.are.equal("Bearer abc", up.headers[1].authorization)
      assert.are.equal("yes", up.headers[1]["x-relay"])
      assert.are.equal("text/event-stream", up.headers[1].accept)
    end)

    it("cancels the upstream request at once when the client leaves", function()
      local app, up = upstream_app()
      relay.route(app, "/r/ticks", function() return app.url .. "/up/ticks?every=0.05" end)
      assert(app:listen())
      local cs = {}
      for i = 1, 5 do cs[i] = client.connect(app, "/r/ticks") end
      for i = 1, 5 do cs[i]:wait_events(2, 5) end
      assert.are.equal(5, up.open)
      for i = 1, 5 do cs[i]:close() end
      local waited = client.wait(app, function() return up.open == 0 end, 3, "the upstream streams to close")
      assert.is_true(waited < 1, ("closed after %.3f s"):format(waited))
    end)

    it("a HEAD answers the stream's headers (or 502) and keeps no upstream request (per client and shared)", function()
      local app, up = upstream_app()
      relay.route(app, "/r/ticks", function() return app.url .. "/up/ticks" end)
      relay.route(app, "/s/ticks", function() return app.url .. "/up/ticks" end, { shared = true })
      relay.route(app, "/s/fail", function() return app.url .. "/up/fail" end, { shared = true })
      assert(app:listen())
      for _, path in ipairs({ "/r/ticks", "/s/ticks" }) do
        local res = client.request(app, "HEAD", path)
        assert.are.equal(200, res.status)
        assert.are.equal("text/event-stream", res.headers["content-type"])
      end
      assert.are.equal(502, client.request(app, "HEAD", "/s/fail").status)
      client.wait(app, function() return up.open == 0 end, 3, "no upstream stream left")
      assert.are.equal(2, up.served)
    end)

    it("reconnects an upstream that drops mid-stream, from the last id: nothing lost, nothing twice", function()
      local app, logs = client.app({ heartbeat = false })
      local nums = app:channel("nums", { history = 1000 })
      local n = 0
      app:every(0.01, function()
        n = n + 1
        nums:publish({ id = tostring(n), data = tostring(n) })
      end)
      local open = {}
      app:stream("/up/nums", function(stream, req)
        open[stream] = true
        stream:on_close(function() open[stream] = nil end)
        stream:subscribe(nums, req.last_event_id)
      end, { retry = 50 })
      relay.route(app, "/r/nums", function() return app.url .. "/up/nums" end)
      assert(app:listen())
      local c = client.connect(app, "/r/nums")
      for round = 1, 3 do
        c:wait_events(round * 15, 5)
        for s in pairs(open) do s:close() end     -- the upstream drops the relay
      end
      c:wait_events(60, 5)
      local first = tonumber(c.events[1].data)
      for i, ev in ipairs(c.events) do
        assert.are.equal(tostring(first + i - 1), ev.data, "event " .. i .. " of " .. client.show(c.body:sub(-400)))
        assert.are.equal(ev.data, ev.id)
      end
      assert.is_nil(client.find_log(logs, "error"), client.show_logs(logs))
    end)

    it("an upstream process killed and started again on the same port: the client sees every event once", function()
      local t0 = math.floor(gettime() * 1000)
      local env = { T0 = t0, INTERVAL = 20, RETRY = 100 }
      local up = start_process("test/browser/fixtures/relay_upstream.lua", env)
      local app = client.app({ heartbeat = false })
      relay.route(app, "/numbers", up.url .. "/numbers")
      assert(app:listen())
      local c = client.connect(app, "/numbers")
      c:wait_events(10, 5)
      kill(up, "KILL")
      client.run_for(app, 0.3)
      env.PORT = up.port
      up = start_process("test/browser/fixtures/relay_upstream.lua", env)
      local seen = #c.events
      c:wait_events(seen + 30, 10)
      local first = tonumber(c.events[1].data)
      for i, ev in ipairs(c.events) do
        assert.are.equal(tostring(first + i - 1), ev.data, "event " .. i)
      end
      -- the second process was asked to resume after the last id the client had
      local stats = get_json(up.url .. "/stats")
      assert.are.equal(1, stats.streams)
      assert.is_true(tonumber(stats.last_event_ids[1]) >= first + 9, cjson.encode(stats))
      c:close()
      client.wait(app, function() return get_json(up.url .. "/stats").streams == 0 end, 3, "the upstream stream to close")
    end)

    it("gzip for a client that accepts it: each event readable as it arrives (curl --compressed)", function()
      local app = upstream_app()
      relay.route(app, "/r/ticks", function() return app.url .. "/up/ticks?n=6&every=0.3" end)
      assert(app:listen())
      local raw = client.connect(app, "/r/ticks", { headers = { ["Accept-Encoding"] = "gzip" } })
      raw:wait_head(5)
      assert.are.equal("gzip", raw.res.headers["content-encoding"])
      raw:close()
      local cu = client.curl(app, "/r/ticks", { args = "--compressed" })
      local when = {}
      cu:wait_for(function(x)
        local got = #x:events()
        if got > 0 and not when[got] then when[got] = gettime() end
        return got >= 6
      end, 10, "6 events through curl --compressed")
      -- each event was decompressed on its own arrival, about 0.3 s apart
      for k = 2, 6 do
        assert.is_truthy(when[k], "event " .. k .. " seen on its own")
        assert.is_true(when[k] - when[k - 1] > 0.1, ("event %d came %.3f s after %d"):format(k, when[k] - when[k - 1], k - 1))
      end
      assert.are.equal("tick 6", cu:events()[6].data)
    end)
  end)

  describe("shared (fan-in)", function()
    it("50 clients share one upstream request; a late joiner gets the kept history; the last to leave closes it", function()
      local app, up = upstream_app()
      relay.route(app, "/live", function() return app.url .. "/up/ticks?every=0.05" end, { shared = true, history = 100 })
      assert(app:listen())
      local cs = {}
      for i = 1, 50 do cs[i] = client.connect(app, "/live") end
      for i = 1, 50 do cs[i]:wait_events(3, 10) end
      assert.are.equal(1, up.served)
      assert.are.equal(1, up.open)
      -- every client gets the same events with the same (the relay's) ids
      local ref = cs[1]
      client.wait(app, function()
        for i = 2, 50 do if #cs[i].events < #ref.events then return false end end
        return #ref.events >= 5
      end, 5, "every client at 5 events")
      for i = 2, 50 do
        for k = 1, 5 do
          assert.are.equal(ref.events[k].data, cs[i].events[k].data)
          assert.are.equal(ref.events[k].id, cs[i].events[k].id)
        end
      end
      assert.truthy(ref.events[1].id:match("^%d+%-%d+$"), ref.events[1].id)
      -- a late joiner: the kept history first (no gap event), then live ones
      local late = client.connect(app, "/live")
      late:wait_events(#ref.events + 1, 5)
      assert.are.equal(ref.events[1].data, late.events[1].data, "replay from the first kept event")
      for _, ev in ipairs(late.events) do assert.are_not.equal("gap", ev.event) end
      assert.are.equal(1, up.served)
      -- leave one by one: the upstream request stays until the last one goes
      for i = 1, 50 do cs[i]:close() end
      client.run_for(app, 0.2)
      assert.are.equal(1, up.open)
      late:close()
      local waited = client.wait(app, function() return up.open == 0 end, 3, "the shared upstream to close")
      assert.is_true(waited < 1)
      -- a new client starts it again, resuming after the hub's last upstream id
      local again = client.connect(app, "/live")
      again:wait_events(1, 5)
      client.wait(app, function() return up.open == 1 end, 3, "one upstream again")
      assert.are.equal(2, up.served)
      assert.truthy(tonumber(up.last_ids[2]), "the new upstream request resumes after an id")
    end)

    it("a client resuming with a relay id gets what it missed, without a gap, across upstream drops", function()
      local app = client.app({ heartbeat = false })
      local nums = app:channel("nums", { history = 1000 })
      local n = 0
      app:every(0.01, function()
        n = n + 1
        nums:publish({ id = tostring(n), data = tostring(n) })
      end)
      local open = {}
      app:stream("/up/nums", function(stream, req)
        open[stream] = true
        stream:on_close(function() open[stream] = nil end)
        stream:subscribe(nums, req.last_event_id)
      end, { retry = 50 })
      relay.route(app, "/live", function() return app.url .. "/up/nums" end, { shared = true, history = 500 })
      assert(app:listen())
      local keeper = client.connect(app, "/live")   -- keeps the hub running
      local a = client.connect(app, "/live")
      a:wait_events(10, 5)
      local last = a.events[#a.events]
      a:close()
      for s in pairs(open) do s:close() end         -- the upstream drops the hub meanwhile
      client.run_for(app, 0.3)
      local b = client.connect(app, "/live", { headers = { ["Last-Event-ID"] = last.id } })
      b:wait_events(20, 5)
      assert.are.equal(tostring(tonumber(last.data) + 1), b.events[1].data)
      for i = 2, #b.events do
        assert.are.equal(tostring(tonumber(b.events[i - 1].data) + 1), b.events[i].data)
      end
      for _, ev in ipairs(b.events) do assert.are_not.equal("gap", ev.event) end
      keeper:close()
    end)

    it("linger keeps the upstream request a while after the last client left", function()
      local app, up = upstream_app()
      relay.route(app, "/live", function() return app.url .. "/up/ticks?every=0.05" end, { shared = true, linger = 0.5 })
      assert(app:listen())
      local c = client.connect(app, "/live")
      c:wait_events(2, 5)
      c:close()
      client.run_for(app, 0.2)
      assert.are.equal(1, up.open, "still open within linger")
      local d = client.connect(app, "/live")   -- back within linger: the same upstream request
      d:wait_events(#c.events + 1, 5)
      assert.are.equal(1, up.served)
      d:close()
      client.wait(app, function() return up.open == 0 end, 3, "closed after linger")
    end)

    it("clients of different upstream URLs (or headers) get one upstream request each", function()
      local app, up = upstream_app()
      relay.route(app, "/live/:n", function(req)
        return app.url .. "/up/ticks?every=0.05&k=" .. req.params.n, { ["X-User"] = req.query.user }
      end, { shared = true })
      assert(app:listen())
      local cs = {}
      for i, path in ipairs({ "/live/1", "/live/1", "/live/2", "/live/1?user=x", "/live/1?user=x" }) do
        cs[i] = client.connect(app, path)
      end
      for i = 1, #cs do cs[i]:wait_events(2, 5) end
      assert.are.equal(3, up.served)
    end)

    it("an upstream that ends for good ends the clients' streams; their next request gets 502", function()
      local app = client.app({ heartbeat = false })
      local stop = false
      app:stream("/up/once", function(stream)
        for i = 1, 3 do stream:send({ id = tostring(i), data = tostring(i) }) end
      end, { retry = 50, accept = function() if stop then return 204 end end })
      relay.route(app, "/live", function() return app.url .. "/up/once" end, { shared = true })
      assert(app:listen())
      local c = client.connect(app, "/live")
      c:wait_events(3, 5)
      stop = true                                   -- the reconnect gets 204
      c:wait_end(5)
      assert.are.equal(502, client.request(app, "GET", "/live").status)
    end)
  end)
end)
