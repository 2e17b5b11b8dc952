-- Streams over real sockets: what a client sees on the wire (headers, chunks, timing) and the
-- events a browser would dispatch from it (sse.parser on the decoded body). The app runs in
-- this process; clients are non-blocking sockets read between app:step calls, and curl -N.
local client = require("support.client")

local gettime = client.gettime

-- Every client has all its events and the terminal chunk.
local function all_done(clients, n)
  for _, c in ipairs(clients) do
    if #c.events < n or not c.terminal then return false end
  end
  return true
end

local function summary(clients, n)
  local done, partial, nothing = 0, {}, 0
  for i, c in ipairs(clients) do
    if #c.events >= n and c.terminal then
      done = done + 1
    elseif c.bytes == 0 then
      nothing = nothing + 1
    elseif #partial < 3 then
      partial[#partial + 1] = ("#%d: %s"):format(i, c:describe())
    end
  end
  return ("%d of %d done, %d received nothing\n%s"):format(done, #clients, nothing, table.concat(partial, "\n"))
end

local function dropped_in_log(logs)
  return client.find_log(logs, "drop") or client.find_log(logs, "queue") or client.find_log(logs, "slow")
end

describe("sse.app streams", function()
  after_each(function() client.cleanup() end)

  describe("response head", function()
    it("is 200 text/event-stream, no-cache, X-Accel-Buffering: no, chunked, sent at once", function()
      local app = client.app()
      app:stream("/events", function(stream) stream:sleep(5) end)
      assert(app:listen())
      local c = client.connect(app, "/events")
      local res = c:wait_head(1)
      assert.are.equal(200, res.status)
      assert.truthy((res.headers["content-type"] or ""):find("^text/event%-stream"), res.headers["content-type"])
      assert.truthy((res.headers["cache-control"] or ""):find("no-cache", 1, true), res.headers["cache-control"])
      assert.are.equal("no", res.headers["x-accel-buffering"])
      assert.is_true(res.chunked, "an HTTP/1.1 stream must be chunked")
      assert.is_nil(res.headers["content-length"])
    end)

    it("adds the headers given in the stream options", function()
      local app = client.app()
      app:stream("/events", function(stream) stream:sleep(5) end,
        { headers = { ["X-Stream-Name"] = "news", ["X-Other"] = "1" } })
      assert(app:listen())
      local res = client.connect(app, "/events"):wait_head(1)
      assert.are.equal("news", res.headers["x-stream-name"])
      assert.are.equal("1", res.headers["x-other"])
      assert.truthy(res.headers["content-type"]:find("^text/event%-stream"))
    end)

    it("sends retry: N at open from the app's retry option", function()
      local app = client.app { retry = 3000 }
      app:stream("/events", function(stream) stream:sleep(5) end)
      assert(app:listen())
      local c = client.connect(app, "/events")
      c:wait_for(function() return c.parser.retry ~= nil end, 1, "a retry field before any event")
      assert.are.equal(3000, c.parser.retry)
      assert.truthy(c.body:find("retry: 3000\n", 1, true), client.show(c.body))
    end)

    it("lets the stream's retry option override the app's", function()
      local app = client.app { retry = 3000 }
      app:stream("/events", function(stream)
        stream:sleep(5)
      end, { retry = 1500 })
      assert(app:listen())
      local c = client.connect(app, "/events")
      c:wait_for(function() return c.parser.retry ~= nil end, 1, "a retry field before any event")
      assert.are.equal(1500, c.parser.retry)
      assert.falsy(c.body:find("retry: 3000", 1, true))
    end)

    it("sends no retry field without the option", function()
      local app = client.app()
      app:stream("/events", function(stream) stream:send("x") end)
      assert(app:listen())
      local c = client.connect(app, "/events")
      c:wait_end()
      assert.is_nil(c.parser.retry)
      assert.falsy(c.body:find("retry:", 1, true))
    end)
  end)

  describe("delivery", function()
    it("delivers each event at once, not after the generator's next sleep", function()
      local app = client.app { heartbeat = false }
      app:stream("/slow", function(stream)
        for i = 1, 3 do
          stream:send({ id = i, data = "tick " .. i })
          stream:sleep(0.5)
        end
      end)
      assert(app:listen())
      local c = client.connect(app, "/slow")
      local t0 = c.opened_at
      c:wait_events(3, 3)
      for k = 1, 3 do
        local at = c.event_times[k] - t0
        -- event k is sent at (k-1)*0.5 s, followed by a 0.5 s sleep
        assert.is_true(at < (k - 1) * 0.5 + 0.25,
          ("event %d arrived after %.3f s: held back until the sleep ended"):format(k, at))
        assert.is_true(at > (k - 1) * 0.5 - 0.1,
          ("event %d arrived after %.3f s: before its sleep"):format(k, at))
      end
      assert.are.same({ "tick 1", "tick 2", "tick 3" }, c:data())
      c:wait_end(2)
    end)

    it("ends a finite stream with the terminal chunk once fn returns, all events delivered", function()
      local app = client.app()
      local closes = 0
      local st
      app:stream("/finite", function(stream)
        st = stream
        stream:on_close(function() closes = closes + 1 end)
        stream:send({ event = "greeting", data = "hello" })
        stream:send({ id = "2", data = "multi\nline" })
        stream:send("third")
        stream:send({ data = { n = 1 } })
      end)
      assert(app:listen())
      local c = client.connect(app, "/finite")
      c:wait_end()
      local ev = c.events
      assert.are.equal(4, #ev)
      assert.are.equal("greeting", ev[1].event)
      assert.are.equal("hello", ev[1].data)
      assert.are.equal("message", ev[2].event)
      assert.are.equal("multi\nline", ev[2].data)
      assert.are.equal("2", ev[2].id)
      assert.are.equal("third", ev[3].data)
      assert.are.equal("2", ev[3].id)
      assert.are.equal('{"n":1}', ev[4].data)
      assert.are.equal("\n\n", c.body:sub(-2), "the body must end on a complete event")
      client.wait(app, function() return closes > 0 end, 1, "on_close after the end")
      client.run_for(app, 0.05)
      assert.are.equal(1, closes)
      assert.is_true(st.closed)
    end)

    it("gives an empty stream (fn returns at once) a clean end", function()
      local app = client.app()
      app:stream("/empty", function() end)
      assert(app:listen())
      local c = client.connect(app, "/empty")
      c:wait_end()
      assert.are.equal(200, c.res.status)
      assert.are.equal(0, #c.events)
    end)

    it("keeps the leading spaces of data (LLM tokens) through a POST stream with a body", function()
      local app = client.app()
      app:stream("/complete", function(stream, req)
        for word in req.body:gmatch("%S+") do stream:send(" " .. word) end
      end, { method = "POST" })
      assert(app:listen())
      local c = client.connect(app, "/complete", { method = "POST", body = "the quick fox" })
      c:wait_end()
      assert.are.same({ " the", " quick", " fox" }, c:data())
      assert.are.equal(405, client.request(app, "GET", "/complete").status)
    end)

    it("passes req to fn and as stream.req, with last_event_id from the header", function()
      local app = client.app()
      local same
      app:stream("/resume/:room", function(stream, req)
        same = rawequal(stream.req, req)
        stream:send(("%s after %s"):format(req.params.room, tostring(req.last_event_id)))
      end)
      assert(app:listen())
      local c = client.connect(app, "/resume/lobby", { headers = { ["Last-Event-ID"] = "41" } })
      c:wait_end()
      assert.are.same({ "lobby after 41" }, c:data())
      assert.is_true(same)
      c = client.connect(app, "/resume/hall?lastEventId=12")
      c:wait_end()
      assert.are.same({ "hall after 12" }, c:data())
    end)

    it("stream:close() ends the response cleanly and later sends return nil, 'closed'", function()
      local app = client.app()
      local closed_flag, r1, r2
      app:stream("/closing", function(stream)
        stream:send("only")
        stream:close()
        closed_flag = stream.closed
        r1, r2 = stream:send("after close")
      end)
      assert(app:listen())
      local c = client.connect(app, "/closing")
      c:wait_end()
      assert.are.same({ "only" }, c:data())
      assert.is_true(closed_flag)
      assert.is_nil(r1)
      assert.are.equal("closed", r2)
    end)
  end)

  describe("errors", function()
    it("an error in one generator closes only that stream, logged with a traceback", function()
      local app, logs = client.app { heartbeat = false }
      app:stream("/bad", function(stream)
        stream:send("before")
        stream:sleep(0.1)
        error("gen-boom-4242")
      end)
      app:stream("/good", function(stream)
        for i = 1, 200 do
          if not stream:send("g" .. i) then return end
          stream:sleep(0.03)
        end
      end)
      assert(app:listen())
      local good = client.connect(app, "/good")
      local bad = client.connect(app, "/bad")
      bad:wait_events(1)
      assert.are.same({ "before" }, bad:data())
      -- ended: cleanly (terminal chunk) or by closing the connection
      bad:wait_for(function() return bad.terminal or bad.closed end, 2, "the failed stream to end")
      local entry = client.find_log(logs, "gen-boom-4242")
      assert.is_truthy(entry, "generator error not logged; log was:\n" .. client.show_logs(logs))
      assert.truthy(entry.message:find("traceback", 1, true), "no traceback in: " .. entry.message)
      local n = #good.events
      good:wait_events(n + 5, 2)
      assert.is_false(good.closed)
      -- the route still serves new clients
      local again = client.connect(app, "/bad")
      again:wait_events(1)
    end)
  end)

  -- issue 10, part 7: a stream route could not answer 404 or 401 once it was matched
  describe("accept: refusing before the first byte", function()
    it("answers what accept returns and starts no stream; nil starts it with what accept left in req", function()
      local app = client.app { heartbeat = false }
      local rooms = { lobby = true }
      local started = 0
      app:stream("/rooms/:room", function(stream, req)
        started = started + 1
        stream:send(req.room_title)
      end, {
        accept = function(req)
          if not rooms[req.params.room] then
            return 404, { error = "no such room" }
          end
          req.room_title = "Room " .. req.params.room
        end,
      })
      local ch = app:channel("news")
      app:stream("/news", ch, {
        accept = function(req) if req.query.token ~= "ok" then return 401, "token?\n" end end,
      })
      assert(app:listen())
      local res = client.request(app, "GET", "/rooms/nope")
      assert.are.equal(404, res.status)
      assert.are.equal("application/json", res.headers["content-type"])
      assert.are.equal(0, started)
      local head = client.request(app, "HEAD", "/rooms/nope")
      assert.are.equal(404, head.status)
      local c = client.connect(app, "/rooms/lobby")
      c:wait_end()
      assert.are.equal(200, c.res.status)
      assert.are.same({ "Room lobby" }, c:data())
      assert.are.equal(401, client.request(app, "GET", "/news").status)
      local sub = client.connect(app, "/news?token=ok")
      client.wait(app, function() return ch.subscribers == 1 end)
      ch:publish("hello")
      sub:wait_events(1)
      assert.are.same({ "hello" }, sub:data())
    end)

    it("an error in accept answers 500, logged, and the route keeps serving", function()
      local app, logs = client.app { heartbeat = false }
      local calls = 0
      app:stream("/s", function(stream) stream:send("ok") end, {
        accept = function()
          calls = calls + 1
          if calls == 1 then error("accept-boom-77") end
        end,
      })
      assert(app:listen())
      assert.are.equal(500, client.request(app, "GET", "/s").status)
      assert.truthy(client.find_log(logs, "accept-boom-77"), client.show_logs(logs))
      local c = client.connect(app, "/s")
      c:wait_end()
      assert.are.same({ "ok" }, c:data())
      assert.has_error(function() app:stream("/x", function() end, { accept = 5 }) end)
    end)
  end)

  describe("client disconnects", function()
    it("runs on_close within 1 s when the client leaves during a long sleep", function()
      local app = client.app { heartbeat = false }
      local st, closed_at, on_close_arg
      app:stream("/sleepy", function(stream)
        st = stream
        stream:on_close(function(s)
          closed_at = gettime()
          on_close_arg = s
        end)
        stream:send("hello")
        stream:sleep(10)
      end)
      assert(app:listen())
      local c = client.connect(app, "/sleepy")
      c:wait_events(1)
      local left_at = gettime()
      c:close()
      client.wait(app, function() return closed_at ~= nil end, 2, "on_close after the client left")
      assert.is_true(closed_at - left_at < 1, ("on_close ran %.2f s after the client left"):format(closed_at - left_at))
      assert.is_true(st.closed)
      assert.are.equal(st, on_close_arg)
      local ok, err = st:send("too late")
      assert.is_nil(ok)
      assert.are.equal("closed", err)
      ok, err = st:comment("too late")
      assert.is_nil(ok)
      assert.are.equal("closed", err)
    end)

    it("wakes a sleeping generator with nil, 'closed' when its client leaves", function()
      local app = client.app { heartbeat = false }
      local result
      app:stream("/sleepy", function(stream)
        stream:send("hello")
        result = table.pack(stream:sleep(10))
      end)
      assert(app:listen())
      local c = client.connect(app, "/sleepy")
      c:wait_events(1)
      c:close()
      client.wait(app, function() return result ~= nil end, 1, "stream:sleep to return after the client left")
      assert.is_nil(result[1])
      assert.are.equal("closed", result[2])
    end)

    it("returns nil, 'closed' from send once a finished stream has ended", function()
      local app = client.app()
      local st
      app:stream("/short", function(stream)
        st = stream
        stream:send("one")
      end)
      assert(app:listen())
      local c = client.connect(app, "/short")
      c:wait_end()
      client.wait(app, function() return st.closed end, 1, "stream.closed")
      local ok, err = st:send("later")
      assert.is_nil(ok)
      assert.are.equal("closed", err)
    end)
  end)

  describe("sending from outside the stream's coroutine", function()
    local app, streams
    before_each(function()
      app = client.app { heartbeat = false }
      streams = {}
      app:stream("/feed", function(stream)
        streams[#streams + 1] = stream
        stream:sleep(30)
      end)
      app:post("/notify", function(req)
        local n = 0
        for _, s in ipairs(streams) do
          if s:send({ event = "note", data = req.body }) then n = n + 1 end
        end
        return 200, tostring(n)
      end)
      app:post("/kick", function()
        for _, s in ipairs(streams) do s:close() end
        return 204
      end)
      app:stream("/relay", function(stream, req)
        stream:send("relaying")
        local ok = streams[1]:send("relayed: " .. req.query.msg)
        stream:send(tostring(ok))
      end)
      assert(app:listen())
    end)

    it("queues from a timer without yielding; the client receives it", function()
      local c = client.connect(app, "/feed")
      client.wait(app, function() return #streams == 1 end, 1, "the stream to start")
      local result
      app:after(0.05, function() result = table.pack(streams[1]:send("from timer")) end)
      c:wait_events(1)
      assert.are.same({ "from timer" }, c:data())
      assert.are.equal(true, result[1])
    end)

    it("queues from a route handler; the client receives it", function()
      local c = client.connect(app, "/feed")
      local c2 = client.connect(app, "/feed")
      client.wait(app, function() return #streams == 2 end, 1, "the streams to start")
      local res = client.request(app, "POST", "/notify", { body = "ping" })
      assert.are.equal("2", res.body)
      c:wait_events(1)
      c2:wait_events(1)
      assert.are.equal("note", c.events[1].event)
      assert.are.equal("ping", c.events[1].data)
      assert.are.equal("ping", c2.events[1].data)
    end)

    it("queues from another stream's coroutine", function()
      local c = client.connect(app, "/feed")
      client.wait(app, function() return #streams == 1 end, 1, "the stream to start")
      local relay = client.connect(app, "/relay?msg=hi")
      relay:wait_end()
      assert.are.same({ "relaying", "true" }, relay:data())
      c:wait_events(1)
      assert.are.same({ "relayed: hi" }, c:data())
    end)

    it("closes a stream from a route handler with a clean end", function()
      local c = client.connect(app, "/feed")
      client.wait(app, function() return #streams == 1 end, 1, "the stream to start")
      assert.are.equal("1", client.request(app, "POST", "/notify", { body = "bye" }).body)
      assert.are.equal(204, client.request(app, "POST", "/kick").status)
      c:wait_end()
      assert.are.same({ "bye" }, c:data())
    end)

    it("app:every feeds a stream until timer:cancel()", function()
      local c = client.connect(app, "/feed")
      client.wait(app, function() return #streams == 1 end, 1, "the stream to start")
      local ticks = 0
      local timer
      timer = app:every(0.03, function()
        ticks = ticks + 1
        streams[1]:send("tick " .. ticks)
        if ticks == 3 then timer:cancel() end
      end)
      c:wait_events(3)
      client.run_for(app, 0.3)
      assert.are.equal(3, ticks)
      assert.are.same({ "tick 1", "tick 2", "tick 3" }, c:data())
    end)
  end)

  describe("comments and heartbeats", function()
    it("stream:comment sends ': ' lines that dispatch no event", function()
      local app = client.app { heartbeat = false }
      app:stream("/c", function(stream)
        assert(stream:comment("hello there"))
        stream:send("x")
      end)
      assert(app:listen())
      local c = client.connect(app, "/c")
      c:wait_end()
      assert.truthy(c.body:find(": hello there\n", 1, true), client.show(c.body))
      assert.are.same({ "x" }, c:data())
    end)

    it("sends ':' heartbeats on an idle stream every `heartbeat` seconds", function()
      local app = client.app { heartbeat = 0.2 }
      app:stream("/idle", function(stream) stream:sleep(10) end)
      assert(app:listen())
      local c = client.connect(app, "/idle")
      c:wait_head(1)
      local first = #c:comments()
      local waited = c:wait_for(function() return #c:comments() >= first + 3 end, 1.5, "3 heartbeats")
      assert.is_true(waited > 0.4, ("3 heartbeats in %.2f s with heartbeat = 0.2"):format(waited))
      assert.are.equal(0, #c.events)
    end)

    it("takes the heartbeat from the stream options", function()
      local app = client.app { heartbeat = false }
      app:stream("/idle", function(stream) stream:sleep(10) end, { heartbeat = 0.2 })
      assert(app:listen())
      local c = client.connect(app, "/idle")
      c:wait_head(1)
      local first = #c:comments()
      c:wait_for(function() return #c:comments() >= first + 2 end, 1.5, "2 heartbeats")
    end)

    it("sends no heartbeats with heartbeat = false", function()
      local app = client.app { heartbeat = false }
      app:stream("/idle", function(stream) stream:sleep(10) end)
      assert(app:listen())
      local c = client.connect(app, "/idle")
      c:wait_head(1)
      client.run_for(app, 0.1)
      local first = #c:comments()
      client.run_for(app, 0.7)
      assert.are.equal(first, #c:comments(), client.show(c.body))
    end)

    it("sends no heartbeats on a stream that is not idle", function()
      local app = client.app { heartbeat = 0.2 }
      app:stream("/busy", function(stream)
        for i = 1, 20 do
          stream:send("e" .. i)
          stream:sleep(0.05)
        end
      end)
      assert(app:listen())
      local c = client.connect(app, "/busy")
      c:wait_events(1)
      local first = #c:comments()
      c:wait_end(3)
      assert.are.equal(first, #c:comments(), client.show(c.body))
      assert.are.equal(20, #c.events)
    end)
  end)

  describe("many clients", function()
    it("serves 200 concurrent streams, each receiving all its events", function()
      local app = client.app { heartbeat = false }
      local open, max_open, go = 0, 0, false
      app:stream("/many", function(stream, req)
        open = open + 1
        if open > max_open then max_open = open end
        stream:on_close(function() open = open - 1 end)
        stream:send({ data = "hello " .. req.query.n })
        while not go do
          if not stream:sleep(0.05) then return end
        end
        for i = 1, 5 do
          stream:send({ id = i, data = req.query.n .. ":" .. i })
          stream:sleep(0.02)
        end
      end)
      assert(app:listen())
      local clients = {}
      for n = 1, 200 do
        clients[n] = client.connect(app, "/many?n=" .. n)
        if n % 10 == 0 then client.step(app, 0) end
      end
      client.wait(app, function()
        for _, c in ipairs(clients) do if #c.events < 1 then return false end end
        return true
      end, 10, "all 200 clients to open", function() return summary(clients, 1) end)
      assert.are.equal(200, max_open)
      go = true
      client.wait(app, function() return all_done(clients, 6) end, 10, "all 200 streams to finish",
        function() return summary(clients, 6) end)
      for n, c in ipairs(clients) do
        local want = { "hello " .. n }
        for i = 1, 5 do want[#want + 1] = n .. ":" .. i end
        assert.are.same(want, c:data())
        assert.are.equal("5", c.events[6].id)
      end
      client.wait(app, function() return open == 0 end, 2, "every on_close")
    end)
  end)

  describe("app:stop()", function()
    it("ends every open stream with the terminal chunk after its queued events, and runs on_close", function()
      local app = client.app { heartbeat = false }
      local streams, closes = {}, 0
      app:stream("/long", function(stream)
        streams[#streams + 1] = stream
        stream:on_close(function() closes = closes + 1 end)
        stream:send("hi")
        stream:sleep(30)
      end)
      assert(app:listen())
      local clients = {}
      for i = 1, 3 do clients[i] = client.connect(app, "/long") end
      client.wait(app, function()
        return #streams == 3 and #clients[1].events == 1 and #clients[2].events == 1 and #clients[3].events == 1
      end, 2, "3 streams open", function() return summary(clients, 1) end)
      for _, s in ipairs(streams) do s:send("last words") end
      local t0 = gettime()
      app:stop()
      client.wait(app, function() return all_done(clients, 2) end, 3, "every stream to end cleanly",
        function() return summary(clients, 2) end)
      assert.is_true(gettime() - t0 < 2, "shutdown took too long")
      for _, c in ipairs(clients) do
        assert.are.same({ "hi", "last words" }, c:data())
        c:wait_closed(1)
      end
      client.wait(app, function() return closes == 3 end, 1, "on_close for every stream")
      for _, s in ipairs(streams) do assert.is_true(s.closed) end
    end)
  end)

  describe("slow clients", function()
    it("drops a client past queue_limit when sends come from outside its coroutine; others keep going", function()
      local app, logs = client.app { queue_limit = 65536, heartbeat = false }
      local streams, closed = {}, {}
      app:stream("/feed", function(stream, req)
        local who = req.query.who
        streams[who] = stream
        stream:on_close(function() closed[who] = gettime() end)
        while stream:sleep(1) do end
      end)
      assert(app:listen())
      client.connect(app, "/feed?who=slow", { read = false, rcvbuf = 4096 })
      local fast = client.connect(app, "/feed?who=fast")
      client.wait(app, function() return streams.slow and streams.fast end, 2, "both streams to start")
      local big = string.rep("x", 32768)
      local slow_result, ticks = nil, 0
      local timer = app:every(0.005, function()
        ticks = ticks + 1
        streams.fast:send({ data = "tick " .. ticks })
        if slow_result == nil then
          for _ = 1, 4 do
            local ok, err = streams.slow:send(big)
            if not ok then
              slow_result = err
              break
            end
          end
        end
      end)
      client.wait(app, function() return closed.slow ~= nil end, 5, "the slow client to be dropped",
        function() return client.show_logs(logs) end)
      assert.truthy(dropped_in_log(logs), "the drop was not logged:\n" .. client.show_logs(logs))
      client.wait(app, function() return slow_result ~= nil end, 1, "a send to the dropped stream to fail")
      assert.are.equal("closed", slow_result)
      local n = #fast.events
      fast:wait_events(n + 10, 2)
      timer:cancel()
      assert.is_nil(closed.fast)
      assert.is_false(streams.fast.closed)
      assert.are.equal("tick 1", fast.events[1].data)
    end)

    it("holds back a generator's own sends (yields) instead of dropping its client", function()
      local app, logs = client.app { queue_limit = 65536, heartbeat = false }
      local sent, finished, failed, st = 0, false, nil, nil
      local count, size = 200, 32768
      app:stream("/gen", function(stream)
        st = stream
        local big = string.rep("y", size)
        for i = 1, count do
          local ok, err = stream:send(big)
          if not ok then
            failed = err
            return
          end
          sent = i
        end
        finished = true
      end)
      assert(app:listen())
      local c = client.connect(app, "/gen", { read = false, rcvbuf = 4096, discard = true })
      client.run_for(app, 1)
      assert.is_true(sent < count, "the generator sent everything to a client that reads nothing")
      assert.is_nil(failed)
      assert.is_false(st.closed)
      assert.is_nil(dropped_in_log(logs), client.show_logs(logs))
      c:start_reading()
      client.wait(app, function() return finished and c:ended_cleanly() end, 10,
        "the generator to finish once the client reads",
        function() return ("sent %d, failed %s, %d bytes read"):format(sent, tostring(failed), c.bytes) end)
      assert.are.equal(count, sent)
      assert.is_true(c.bytes > count * size, ("only %d bytes arrived"):format(c.bytes))
    end)
  end)

  describe("with curl -N", function()
    it("sees events one by one as they are sent", function()
      local app = client.app { heartbeat = false }
      app:stream("/curl", function(stream)
        for i = 1, 3 do
          stream:send({ data = "curl " .. i })
          if i < 3 then stream:sleep(0.4) end
        end
      end)
      assert(app:listen())
      local cu = client.curl(app, "/curl")
      local seen_at = {}
      cu:wait_for(function()
        local n = #cu:events()
        for k = #seen_at + 1, n do seen_at[k] = gettime() end
        return n >= 3
      end, 5, "3 events in curl's output")
      assert.are.same({ "curl 1", "curl 2", "curl 3" },
        (function()
          local out = {}
          for i, ev in ipairs(cu:events()) do out[i] = ev.data end
          return out
        end)())
      for k = 2, 3 do
        local gap = seen_at[k] - seen_at[k - 1]
        assert.is_true(gap > 0.25, ("curl saw event %d only %.3f s after event %d"):format(k, gap, k - 1))
      end
      client.wait(app, function() return not cu:running() end, 3, "curl to exit at the end of the stream")
    end)
  end)
end)
