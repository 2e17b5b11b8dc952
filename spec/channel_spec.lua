-- Channels over real sockets: fan-out, replay after Last-Event-ID with no duplicate and no
-- gap at the seam, the gap signal, slow subscribers dropped without slowing the others.
local client = require("support.client")
local cjson = require("cjson")

-- The ids the app assigned ("<epoch>-<n>"), as their sequence numbers n; ids the
-- publisher gave stay as they are.
local function ids(c)
  local out = {}
  for i, ev in ipairs(c.events) do out[i] = ev.id:match("^%d+%-(%d+)$") or ev.id end
  return out
end

-- The id the app assigned (or would assign) to its n-th publish, from one it did assign.
local function nth_id(some_id, n)
  return (some_id:gsub("%d+$", tostring(n)))
end

local function data_of(c)
  return c:data()
end

describe("sse.app channels", function()
  after_each(function() client.cleanup() end)

  describe("app:channel and publish", function()
    it("returns the same channel for the same name, with its name and subscriber count", function()
      local app = client.app()
      local a = app:channel("news")
      assert.are.equal(a, app:channel("news"))
      assert.are_not.equal(a, app:channel("sports"))
      assert.are.equal("news", a.name)
      assert.are.equal(0, a.subscribers)
      assert.are.equal(100, a.history)
      assert.has_error(function() app:channel("news", { history = 5 }) end)
      assert.has_error(function() app:channel("x", { histroy = 5 }) end)
      assert.has_error(function() app:channel("") end)
    end)

    it("assigns ids that increase across the whole app, and keeps given ids", function()
      local app = client.app()
      local a, b = app:channel("a"), app:channel("b")
      local first = a:publish("x")
      local epoch = first:match("^(%d+)%-1$")
      assert.truthy(epoch, "ids are <epoch>-<n>: " .. first)
      assert.are.equal(epoch .. "-2", b:publish("y"))
      assert.are.equal(epoch .. "-3", a:publish({ data = "z" }))
      assert.are.equal("mine", a:publish({ id = "mine", data = "w" }))
      assert.are.equal(epoch .. "-5", b:publish("v"))
    end)

    it("rejects invalid events like sse.encode", function()
      local app = client.app()
      local a = app:channel("a")
      assert.has_error(function() a:publish({ id = "a\nb", data = "x" }) end,
        "channel:publish: field 'id' must not contain CR, LF or NUL")
      assert.has_error(function() a:publish({ evnet = "x" }) end)
    end)
  end)

  describe("fan-out", function()
    it("delivers every publish to every subscriber, and the stream stays open", function()
      local app = client.app()
      local ch = app:channel("news")
      app:stream("/news", ch)
      assert(app:listen())
      local clients = {}
      for i = 1, 300 do clients[i] = client.connect(app, "/news") end
      client.wait(app, function() return ch.subscribers == 300 end, 5, "300 subscribers")
      for i = 1, 5 do ch:publish({ event = "n", data = "item " .. i }) end
      client.wait(app, function()
        for _, c in ipairs(clients) do if #c.events < 5 then return false end end
        return true
      end, 5, "5 events at each of 300 subscribers")
      for _, c in ipairs(clients) do
        assert.are.same({ "item 1", "item 2", "item 3", "item 4", "item 5" }, data_of(c))
        assert.are.same({ "1", "2", "3", "4", "5" }, ids(c))
        assert.are.equal("n", c.events[1].event)
        assert.is_false(c.terminal)
      end
      -- leaving subscribers are counted out at once
      for i = 1, 100 do clients[i]:close() end
      client.wait(app, function() return ch.subscribers == 200 end, 2, "200 subscribers left")
    end)

    it("a fan-out sent in slices, with publishes between the slices, delivers every event in order", function()
      -- 600 subscribers: each batch of resumes goes out in slices of 256 with a loop turn
      -- between them, and the publishes here land between slices.
      local app = client.app({ heartbeat = false })
      local ch = app:channel("wide")
      app:stream("/wide", ch)
      assert(app:listen())
      local clients = {}
      for i = 1, 600 do clients[i] = client.connect(app, "/wide") end
      client.wait(app, function() return ch.subscribers == 600 end, 10, "600 subscribers")
      local n = 0
      for _ = 1, 20 do
        for _ = 1, 3 do
          n = n + 1
          ch:publish({ data = "e" .. n })
        end
        client.step(app, 0)
      end
      client.wait(app, function()
        for _, c in ipairs(clients) do if #c.events < n then return false end end
        return true
      end, 20, n .. " events at each of 600 subscribers")
      local want = {}
      for i = 1, n do want[i] = "e" .. i end
      for _, c in ipairs(clients) do assert.are.same(want, data_of(c)) end
    end)

    it("a generator may subscribe, send directly, and the response stays open after it returns", function()
      local app = client.app()
      local ch = app:channel("room")
      app:stream("/room", function(stream)
        local replayed, missed = stream:subscribe(ch)
        stream:send({ event = "welcome", data = tostring(replayed) .. " " .. tostring(missed) })
      end)
      assert(app:listen())
      local c = client.connect(app, "/room")
      c:wait_events(1)
      assert.are.equal("welcome", c.events[1].event)
      assert.are.equal("0 false", c.events[1].data)
      ch:publish("later")
      c:wait_events(2)
      assert.are.equal("later", c.events[2].data)
      assert.is_false(c.terminal)
    end)

    it("unsubscribe stops delivery; the last one ends a stream whose generator returned", function()
      local app = client.app()
      local a, b = app:channel("a"), app:channel("b")
      local streams = {}
      app:stream("/ab", function(stream)
        stream:subscribe(a)
        stream:subscribe(b)
        streams[#streams + 1] = stream
      end)
      assert(app:listen())
      local c = client.connect(app, "/ab")
      client.wait(app, function() return a.subscribers == 1 and b.subscribers == 1 end)
      assert.is_true(streams[1]:unsubscribe(a))
      assert.is_false(streams[1]:unsubscribe(a))
      a:publish("not for you")
      b:publish("for you")
      c:wait_events(1)
      client.run_for(app, 0.1)
      assert.are.same({ "for you" }, data_of(c))
      streams[1]:unsubscribe(b)
      c:wait_end(2)
    end)

    it("stream:close() on a subscriber ends it cleanly and unsubscribes it", function()
      local app = client.app()
      local ch = app:channel("a")
      local closed = false
      app:stream("/a", function(stream)
        stream:subscribe(ch)
        stream:on_close(function() closed = true end)
        app:after(0.05, function() stream:close() end)
      end)
      assert(app:listen())
      local c = client.connect(app, "/a")
      c:wait_end(2)
      client.wait(app, function() return closed and ch.subscribers == 0 end, 2, "on_close and unsubscribe")
      local sub, err
      app:stream("/late", function(stream)
        stream:close()
        sub, err = stream:subscribe(ch)
      end)
      client.connect(app, "/late"):wait_end(2)
      assert.is_nil(sub)
      assert.are.equal("closed", err)
    end)
  end)

  describe("replay", function()
    local function setup(history)
      local app = client.app()
      local ch = app:channel("news", { history = history })
      app:stream("/news", ch)
      assert(app:listen())
      return app, ch
    end

    it("after Last-Event-ID sends the kept events after it in order, then live ones, each once", function()
      local app, ch = setup(100)
      local sent = {}
      for i = 1, 5 do sent[i] = ch:publish("e" .. i) end
      local c = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = sent[2] } })
      c:wait_events(3)
      assert.are.same({ "e3", "e4", "e5" }, data_of(c))
      ch:publish("e6")
      c:wait_events(4)
      client.run_for(app, 0.05)
      assert.are.same({ "e3", "e4", "e5", "e6" }, data_of(c))
      assert.are.same({ "3", "4", "5", "6" }, ids(c))
    end)

    it("takes the id from the lastEventId or last_event_id query parameter too", function()
      local app, ch = setup(100)
      local sent = {}
      for i = 1, 4 do sent[i] = ch:publish("e" .. i) end
      local q1 = client.connect(app, "/news?lastEventId=" .. sent[3])
      local q2 = client.connect(app, "/news?last_event_id=" .. sent[1])
      q1:wait_events(1)
      q2:wait_events(3)
      assert.are.same({ "e4" }, data_of(q1))
      assert.are.same({ "e2", "e3", "e4" }, data_of(q2))
    end)

    it("a fresh client (no id) gets only new events", function()
      local app, ch = setup(100)
      ch:publish("old")
      local c = client.connect(app, "/news")
      client.wait(app, function() return ch.subscribers == 1 end)
      ch:publish("new")
      c:wait_events(1)
      client.run_for(app, 0.05)
      assert.are.same({ "new" }, data_of(c))
    end)

    it("has no duplicate and no gap at the seam when events are published during the replay turn", function()
      local app = client.app()
      local ch = app:channel("room")
      local sent = {}
      for i = 1, 3 do sent[i] = ch:publish("old" .. i) end
      app:stream("/room", function(stream, req)
        stream:subscribe(ch, req.last_event_id)
        -- published after subscribing, before the replay went out
        ch:publish("joined")
        stream:sleep(0.01)
        ch:publish("after sleep")
      end)
      assert(app:listen())
      local c = client.connect(app, "/room", { headers = { ["Last-Event-ID"] = sent[1] } })
      c:wait_events(4)
      client.run_for(app, 0.05)
      assert.are.same({ "old2", "old3", "joined", "after sleep" }, data_of(c))
      assert.are.same({ "2", "3", "4", "5" }, ids(c))
    end)

    -- regression: events to replay were read from the history at the flush, so a publish
    -- in the same turn could push one out of a short history, lost with no gap signal
    it("keeps the events to replay even when publishes in the same turn overflow the history", function()
      local app = client.app()
      local ch = app:channel("c", { history = 2 })
      local sent = {}
      for i = 1, 3 do sent[i] = ch:publish("e" .. i) end
      local said
      app:stream("/s", function(stream, req)
        said = { stream:subscribe(ch, req.last_event_id) }
        ch:publish("same turn")
      end)
      assert(app:listen())
      local c = client.connect(app, "/s", { headers = { ["Last-Event-ID"] = sent[1] } })
      c:wait_events(3)
      client.run_for(app, 0.05)
      assert.are.same({ 2, false }, said)
      assert.are.same({ "e2", "e3", "same turn" }, c:data())
    end)

    it("sends the replay before what the generator sends directly after subscribing", function()
      local app = client.app()
      local ch = app:channel("c")
      local first = ch:publish("old")
      app:stream("/s", function(stream, req)
        stream:subscribe(ch, req.last_event_id)
        stream:send({ event = "snapshot", data = "now" })
      end)
      assert(app:listen())
      local c = client.connect(app, "/s", { headers = { ["Last-Event-ID"] = nth_id(first, 0) } })
      c:wait_events(2)
      assert.are.same({ "old", "now" }, c:data())
    end)

    it("one id resumes several channels, merged in publish order", function()
      local app = client.app()
      local a, b = app:channel("a"), app:channel("b")
      app:stream("/ab", function(stream, req)
        stream:subscribe(a, req.last_event_id)
        stream:subscribe(b, req.last_event_id)
      end)
      local first = a:publish("a1") b:publish("b2") b:publish("b3") a:publish("a4") b:publish("b5")
      assert(app:listen())
      local c = client.connect(app, "/ab", { headers = { ["Last-Event-ID"] = first } })
      c:wait_events(4)
      a:publish("a6")
      c:wait_events(5)
      client.run_for(app, 0.05)
      assert.are.same({ "b2", "b3", "a4", "b5", "a6" }, data_of(c))
      -- the client's last event id is the newest it has: resuming from it repeats nothing
      local again = client.connect(app, "/ab", { headers = { ["Last-Event-ID"] = c.events[#c.events].id } })
      client.run_for(app, 0.1)
      b:publish("b7")
      again:wait_events(1)
      client.run_for(app, 0.05)
      assert.are.same({ "b7" }, data_of(again))
    end)

    it("resumes after an id the publisher gave", function()
      local app, ch = setup(100)
      ch:publish({ id = "alpha", data = "1" })
      ch:publish({ id = "beta", data = "2" })
      ch:publish({ data = "3" })
      local c = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = "alpha" } })
      c:wait_events(2)
      client.run_for(app, 0.05)
      assert.are.same({ "2", "3" }, data_of(c))
      assert.are.same({ "beta", "3" }, ids(c))
    end)

    it("signals a gap with a 'gap' event when missed events are no longer kept", function()
      local app, ch = setup(3)
      local sent = {}
      for i = 1, 6 do sent[i] = ch:publish("e" .. i) end
      local c = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = sent[1] } })
      c:wait_events(4)
      local gap = c.events[1]
      assert.are.equal("gap", gap.event)
      assert.are.same({ channel = "news", last_event_id = sent[1] }, cjson.decode(gap.data))
      assert.are.equal("", gap.id, "the gap event must not change the last event id")
      assert.are.same({ "e4", "e5", "e6" }, { c.events[2].data, c.events[3].data, c.events[4].data })
      -- nothing missed: no gap event
      local ok = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = sent[4] } })
      ok:wait_events(2)
      client.run_for(app, 0.05)
      assert.are.same({ "e5", "e6" }, data_of(ok))
    end)

    it("signals a gap for an id it does not know, then sends what it keeps", function()
      local app, ch = setup(10)
      ch:publish("e1")
      ch:publish("e2")
      local c = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = "no-such-id" } })
      c:wait_events(3)
      assert.are.equal("gap", c.events[1].event)
      assert.are.same({ "e1", "e2" }, { c.events[2].data, c.events[3].data })
    end)

    -- issue 8, defect 11: ids were a count from 1 per process, so after a restart a client
    -- resuming with id 2 of the previous run got the new run's events after its "2"
    it("signals a gap for an id from before a restart, even with nothing kept or missed since", function()
      local old = client.app()
      local och = old:channel("news")
      local old_ids = {}
      for i = 1, 3 do old_ids[i] = och:publish("before " .. i) end
      old:stop()
      local app, ch = setup(100)   -- the restarted server: the same channel, new events
      for i = 1, 3 do ch:publish("after " .. i) end
      local c = client.connect(app, "/news", { headers = { ["Last-Event-ID"] = old_ids[2] } })
      c:wait_events(4)
      assert.are.equal("gap", c.events[1].event)
      assert.are.same({ channel = "news", last_event_id = old_ids[2] }, cjson.decode(c.events[1].data))
      assert.are.same({ "after 1", "after 2", "after 3" },
        { c.events[2].data, c.events[3].data, c.events[4].data })
      -- and with an empty history, the gap event alone
      local app2, ch2 = setup(100)
      local d = client.connect(app2, "/news", { headers = { ["Last-Event-ID"] = old_ids[3] } })
      client.wait(app2, function() return ch2.subscribers == 1 end)
      d:wait_events(1)
      assert.are.equal("gap", d.events[1].event)
    end)

    it("stream:subscribe returns how many events it replays and whether some were missed", function()
      local app = client.app()
      local ch = app:channel("c", { history = 2 })
      local sent = {}
      for i = 1, 4 do sent[i] = ch:publish("e" .. i) end
      local got = {}
      app:stream("/c", function(stream, req)
        got[#got + 1] = { stream:subscribe(ch, req.query.from or false) }
      end)
      assert(app:listen())
      client.connect(app, "/c?from=" .. sent[3]):wait_events(1)
      client.connect(app, "/c?from=" .. sent[1]):wait_events(3)
      client.connect(app, "/c")
      client.wait(app, function() return #got == 3 end)
      assert.are.same({ 1, false }, got[1])
      assert.are.same({ 2, true }, got[2])
      assert.are.same({ 0, false }, got[3])
    end)
  end)

  describe("publisher backpressure", function()
    it("answers every publish, holding some back past 8 ahead of the sends, and loses nothing", function()
      local app = client.app({ heartbeat = false })
      local ch = app:channel("bus", { history = 0 })
      app:stream("/sub", ch)
      app:post("/pub", function(req)
        ch:publish(req.body)
        return 204
      end)
      assert(app:listen())
      local subs = {}
      for i = 1, 20 do subs[i] = client.connect(app, "/sub") end
      client.wait(app, function() return ch.subscribers == 20 end, 3, "20 subscribers")
      -- 40 publishes in flight at once: more than the 8 allowed ahead of a batch
      local pubs = {}
      for i = 1, 40 do
        pubs[i] = client.connect(app, "/pub", { method = "POST", body = "e" .. i, accept = false,
                                                headers = { Connection = "close" } })
      end
      client.wait(app, function()
        for _, p in ipairs(pubs) do
          if not (p.res and p.res.status) then return false end
        end
        for _, c in ipairs(subs) do
          if #c.events < 40 then return false end
        end
        return true
      end, 5, "all publishes answered and delivered")
      local want = {}
      for i = 1, 40 do want[i] = "e" .. i end
      for _, p in ipairs(pubs) do assert.are.equal(204, p.res.status) end
      -- each subscriber gets every event once; order follows publish order
      for _, c in ipairs(subs) do
        local got = c:data()
        local sorted = {}
        for i, d in ipairs(got) do sorted[i] = d end
        table.sort(sorted, function(a, b) return tonumber(a:sub(2)) < tonumber(b:sub(2)) end)
        assert.are.same(want, sorted)
        assert.are.same(got, subs[1]:data())
      end
    end)
  end)

  describe("slow subscribers", function()
    it("are dropped past queue_limit, logged with address and pending bytes; others get everything", function()
      local app, logs = client.app({ queue_limit = 64 * 1024 })
      local ch = app:channel("firehose", { history = 0 })
      app:stream("/f", ch)
      assert(app:listen())
      client.connect(app, "/f", { read = false, rcvbuf = 4096 })   -- a slow one
      local fast = client.connect(app, "/f", { discard = true })
      client.wait(app, function() return ch.subscribers == 2 end)
      local payload = string.rep("x", 4000)
      -- 6 MB in all: more than loopback's socket buffers (up to 4 MB) plus the limit
      local n = 1500
      local last_id
      for i = 1, n do
        last_id = ch:publish({ data = payload })
        -- 16 KB a turn, under the limit, and the fast subscriber takes each turn's bytes
        -- before the next (on a loaded machine one step(0) may not be enough to send them)
        if i % 4 == 0 then
          client.wait(app, function() return fast.bytes >= i * #payload end,
            5, "the fast subscriber to keep up")
        end
      end
      client.wait(app, function() return ch.subscribers == 1 end, 5, "the slow subscriber dropped")
      local entry = client.find_log(logs, "dropped slow client", "127.0.0.1:", "bytes pending")
      assert.truthy(entry, client.show_logs(logs))
      assert.are.equal("warn", entry.level)
      local expected = n * (#payload + #"data: \n\n" + #"id: \n" + #last_id) + 1000
      client.wait(app, function() return fast.bytes >= n * #payload end, 10, "the fast subscriber to get all")
      assert.is_true(fast.bytes < expected + 20000)
    end)
  end)
end)
