-- Channels made from client input (issue 18, part 6): a chat room per name a client
-- chooses. A channel nothing uses any more (no handle in the script, no subscriber, no
-- history kept) is freed, so 100,000 room names do not grow the server for ever; one that
-- keeps history stays until max_channels makes room; a room made again never resumes a
-- client silently past what it missed.
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")
local socket = require("socket")

-- The value of a metric without labels in Prometheus text.
local function metric(text, name)
  return tonumber(text:match("\n" .. name .. " (%d+)\n") or text:match("^" .. name .. " (%d+)\n"))
end

-- Runs the shell command (curl with a URL glob: one request per name, on one kept-alive
-- connection each) and counts the statuses it printed, one per line.
local function statuses(cmd)
  local counts = {}
  for code in client.sh(cmd):gmatch("(%d%d%d)\n") do counts[code] = (counts[code] or 0) + 1 end
  return counts
end

describe("channel lifetime", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  it("100,000 room names from clients: RSS after 100k stays within a few MB of after 10k, "
    .. "and the channel count returns to the rooms in use", function()
    local p = process.start("spec/fixtures/lifetime_app.lua")
    local remote = p:app()
    local base = "http://127.0.0.1:" .. p.port
    -- Three rooms in use all along: they must survive every sweep and keep working.
    local stays = {}
    for i = 1, 3 do
      stays[i] = client.connect(remote, "/stay/keep" .. i)
      stays[i]:wait_head()
    end
    -- A batch is 10,000 new names: 2,000 rooms visited (a stream subscribes, joins the
    -- room's presence, gets one event, leaves) and 8,000 rooms posted to while empty. Two
    -- curls at once, each on one kept-alive connection.
    local function batch(b)
      local counts = statuses(("(curl -s -o /dev/null -w '%%{http_code}\\n' '%s/rooms/b%d-v[1-2000]/visit?user=u&info=i' &"
        .. " curl -s -o /dev/null -w '%%{http_code}\\n' -X POST -d hi '%s/rooms/b%d-s[1-8000]/say' & wait)")
        :format(base, b, base, b))
      assert.are.same({ ["200"] = 10000 }, counts, "batch " .. b)
    end
    local t0 = socket.gettime()
    batch(1)
    local rss10k = client.rss_kb(p.pid)
    for b = 2, 10 do batch(b) end
    local rss100k = client.rss_kb(p.pid)
    local took = socket.gettime() - t0
    print(("\n  100k room names in %.1f s: RSS %d KB after 10k, %d KB after 100k (%+d KB)")
      :format(took, rss10k, rss100k, rss100k - rss10k))
    -- Every name is gone once its request is: what is left is allocator and Lua-heap
    -- slack (the collector lets the heap reach twice its live size before a cycle), 0.1 to
    -- 0.3 MB measured here. Before channels were freed the same run grew by 48 MB (about
    -- 0.5 KB a name, every name kept): 8 MB leaves room for noise and still fails that.
    assert.is_true(rss100k - rss10k < 8 * 1024,
      ("RSS grew by %d KB between 10k and 100k names"):format(rss100k - rss10k))
    -- A handle the script dropped is freed once Lua's collector reclaims it, at its own
    -- pace (a few of a batch can wait there for a while on an idle server): the count
    -- is read after a full collection.
    assert.are.equal(204, client.request(remote, "POST", "/collect").status)
    local text = client.request(remote, "GET", "/metrics").body
    local channels = metric(text, "sse_channels")
    assert.are.equal(3, channels, text)
    assert.are.equal(0, metric(text, "sse_channels_refused_total"))
    -- The rooms in use still work.
    local res = client.request(remote, "POST", "/stay/keep2", { body = "still here" })
    assert.are.equal("1\n", res.body)
    stays[2]:wait_events(1)
    assert.are.equal("still here", stays[2]:data()[1])
  end)

  it("keeps an idle room that has history until max_channels: then the one unused longest "
    .. "is freed (counted, logged) and resuming from it gets the gap; all in use: 503", function()
    local app, logs = client.app({ heartbeat = false, max_channels = 4 })
    local function room(name) return app:channel(name, { history = 10 }) end
    app:stream("/logs/:room", function(stream, req) stream:subscribe(room(req.params.room)) end)
    app:post("/logs/:room", function(req) return 200, room(req.params.room):publish(req.body) end)
    assert(app:listen())
    -- Rooms become idle in this order (each found idle by the sweep of app:stats once its
    -- handles are collected): a, b, c, d.
    local ids = {}
    for _, name in ipairs({ "a", "b", "c", "d" }) do
      ids[name] = client.request(app, "POST", "/logs/" .. name, { body = name .. "1" }).body
      client.request(app, "POST", "/logs/" .. name, { body = name .. "2" })
      collectgarbage()
      app:stats()
    end
    local st = app:stats()
    assert.are.equal(4, st.channels)   -- idle, but what they keep is what a client would lose
    assert.are.equal(0, st.channels_evicted)
    -- One more room: "a", unused longest, goes with its history.
    assert.are.equal(200, client.request(app, "POST", "/logs/e", { body = "e1" }).status)
    st = app:stats()
    assert.are.equal(4, st.channels)
    assert.are.equal(1, st.channels_evicted)
    assert.truthy(client.find_log(logs, "max_channels (4) reached", "freed with its history"))
    local names = {}
    for _, c in ipairs(st.channel_list) do names[#names + 1] = c.name end
    table.sort(names)
    assert.are.same({ "b", "c", "d", "e" }, names)
    -- A client of "a" resuming from its first event is told it missed something (a2 is
    -- gone); one of "b" resumes exactly.
    local ca = client.connect(app, "/logs/a", { headers = { ["Last-Event-ID"] = ids.a } })
    local cb = client.connect(app, "/logs/b", { headers = { ["Last-Event-ID"] = ids.b } })
    ca:wait_events(1)
    cb:wait_events(1)
    assert.are.equal("gap", ca.events[1].event)
    assert.are.equal(1, #ca.events)
    assert.are.same({ "b2" }, cb:data())
    ca:close()
    cb:close()
    client.wait(app, function() return app:stats().subscribers == 0 end, 3, "both clients gone")
    -- Every channel in use (held by the script): a new one is refused.
    local held = {}  -- luacheck: ignore (held only to keep the channels in use)
    for i = 1, 4 do held[i] = app:channel("held" .. i) end
    local res = client.request(app, "POST", "/logs/f", { body = "f1" })
    assert.are.equal(503, res.status)
    assert.truthy(res.body:find("too many channels", 1, true), res.body)
    local ok, err = pcall(app.channel, app, "held5")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("max_channels 4", 1, true), tostring(err))
    assert.are.equal(2, app:stats().channels_refused)
    assert.truthy(client.find_log(logs, "every channel is in use", "refused"))
    held = nil  -- luacheck: ignore (let them go)
    collectgarbage()
    assert.are.equal(200, client.request(app, "POST", "/logs/f", { body = "f1" }).status)
  end)

  it("a room freed and made again: a client resuming from before the events it missed gets "
    .. "the gap, one that missed nothing does not", function()
    local app = client.app({ heartbeat = false })
    local function room(name) return app:channel(name, { history = 0 }) end
    app:stream("/rooms/:room", function(stream, req) stream:subscribe(room(req.params.room)) end)
    app:post("/rooms/:room", function(req) return 200, room(req.params.room):publish(req.body) end)
    assert(app:listen())
    local function freed()
      client.wait(app, function() collectgarbage() return app:stats().channels == 0 end, 3, "the room freed")
    end
    local c1 = client.connect(app, "/rooms/x")
    c1:wait_head()
    local id1 = client.request(app, "POST", "/rooms/x", { body = "one" }).body
    c1:wait_events(1)
    c1:close()
    freed()
    -- Posted to while nobody is in it: made, published to (kept nowhere), freed again.
    local id2 = client.request(app, "POST", "/rooms/x", { body = "two" }).body
    freed()
    local missed = client.connect(app, "/rooms/x", { headers = { ["Last-Event-ID"] = id1 } })
    missed:wait_events(1)
    assert.are.equal("gap", missed.events[1].event)
    assert.truthy(missed.events[1].data:find(id1, 1, true))
    local fine = client.connect(app, "/rooms/x", { headers = { ["Last-Event-ID"] = id2 } })
    fine:wait_head()
    client.request(app, "POST", "/rooms/x", { body = "three" })
    fine:wait_events(1)
    assert.are.same({ "three" }, fine:data())
  end)

  it("what the script holds, or a subscriber uses, is never freed; fields set on a channel "
    .. "last as long as it does, whichever handle set them", function()
    local app = client.app({ heartbeat = false })
    local news = app:channel("news")
    news.topic = "the news"
    app:stream("/news", news)
    -- A generator that subscribes and returns: the stream holds the room, the script
    -- nothing (`handles` sees whether the handle it used is collected).
    local handles = setmetatable({}, { __mode = "k" })
    app:stream("/rooms/:room", function(stream, req)
      local ch = app:channel(req.params.room, { history = 0 })
      handles[ch] = true
      ch.opened_by = req.query.user
      stream:subscribe(ch, false)
    end)
    assert(app:listen())
    local a = client.connect(app, "/rooms/lobby?user=ann")
    client.wait(app, function() return app:stats().subscribers == 1 end, 3, "the subscription")
    for _ = 1, 3 do collectgarbage() end
    assert.is_nil(next(handles))
    local st = app:stats()
    assert.are.equal(2, st.channels)
    assert.are.equal(news, app:channel("news"))
    assert.are.equal("the news", app:channel("news").topic)
    local lobby = app:channel("lobby", { history = 0 })
    assert.are.equal("ann", lobby.opened_by)
    assert.are.equal(1, lobby.subscribers)
    lobby:publish("hello")
    a:wait_events(1)
    assert.are.same({ "hello" }, a:data())
    lobby = nil  -- luacheck: ignore (let it go)
    a:close()
    client.wait(app, function() collectgarbage() return app:stats().channels == 1 end, 3, "the lobby freed")
    assert.is_nil(app:channel("lobby").opened_by)   -- a new channel
    assert.has_error(function() app:channel("news").name = "x" end, "channel.name is read-only")
  end)

  it("with a broker, a freed channel unsubscribes from Redis and a resume is answered "
    .. "from Redis's history when it is made again", function()
    if not redis.available() then pending(redis.MISSING) return end
    local r = redis.start()
    local app = client.app({ heartbeat = false, broker = r.url })
    local function room(name) return app:channel(name, { history = 10 }) end
    app:stream("/rooms/:room", function(stream, req) stream:subscribe(room(req.params.room)) end)
    app:post("/rooms/:room", function(req) return 200, assert(room(req.params.room):publish(req.body)) end)
    assert(app:listen())
    local function topics() return r:cli("PUBSUB", "CHANNELS", "sse:t:*") end
    local c = client.connect(app, "/rooms/r1")
    c:wait_head()
    client.wait(app, function() return topics() == "sse:t:r1" end, 5, "the topic subscribed")
    local id1 = client.request(app, "POST", "/rooms/r1", { body = "one" }).body
    c:wait_events(1)
    c:close()
    client.wait(app, function()
      collectgarbage()
      return app:stats().channels == 0 and topics() == ""
    end, 5, "the channel freed and its topic unsubscribed")
    client.request(app, "POST", "/rooms/r1", { body = "two" })
    client.wait(app, function() collectgarbage() return app:stats().channels == 0 and topics() == "" end,
      5, "freed again")
    local back = client.connect(app, "/rooms/r1", { headers = { ["Last-Event-ID"] = id1 } })
    back:wait_events(1)
    assert.are.same({ "two" }, back:data())
    assert.are.equal("sse:t:r1", topics())
  end)
end)
