-- Channels on Redis (issue 11): app processes sharing one broker, against a real
-- redis-server started here on a free port. Every client check reads the bytes a browser
-- would: events in order, ids, the gap event.
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")
local cjson = require("cjson")

local FIXTURE = "spec/fixtures/broker_app.lua"

local function publish(p, ch, body, n)
  local remote = p:app()
  local path = "/publish/" .. ch .. (n and ("/" .. n) or "")
  return client.request(remote, "POST", path, { body = body, timeout = 10 })
end

local function subscribe(p, ch, last_id)
  local headers = last_id and { ["Last-Event-ID"] = last_id } or nil
  local c = client.connect(p:app(), "/events/" .. ch, { headers = headers })
  c:wait_head(5)
  return c
end

-- The data of c's events that are not comments or gaps.
local function data(c)
  local out = {}
  for _, ev in ipairs(c.events) do
    if ev.event ~= "gap" then out[#out + 1] = ev.data end
  end
  return out
end

local function gaps(c)
  local n = 0
  for _, ev in ipairs(c.events) do if ev.event == "gap" then n = n + 1 end end
  return n
end

describe("channels on a broker (Redis)", function()
  if not redis.available() then
    pending(redis.MISSING)
    return
  end

  local r
  before_each(function() r = redis.start({ aof = true }) end)
  after_each(function()
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  local function app_process(env)
    env = env or {}
    env.BROKER = env.BROKER or r.url
    return process.start(FIXTURE, env)
  end

  it("a publish on one process reaches every subscriber on both, once each, in id order", function()
    local a, b = app_process(), app_process()
    local subs = { subscribe(a, "news"), subscribe(a, "news"), subscribe(b, "news"), subscribe(b, "news") }
    -- publishes alternate between the processes
    for i = 1, 20 do
      local res = publish(i % 2 == 0 and a or b, "news", "e", nil)
      assert.are.equal(200, res.status, res.body)
    end
    local remote = a:app()
    client.wait(remote, function()
      for _, c in ipairs(subs) do if #c.events < 20 then return false end end
      return true
    end, 10, "20 events at every subscriber", function() return subs[3]:describe() end)
    local ids = {}
    for _, ev in ipairs(subs[1].events) do ids[#ids + 1] = ev.id end
    for _, c in ipairs(subs) do
      local mine = {}
      for _, ev in ipairs(c.events) do mine[#mine + 1] = ev.id end
      assert.are.same(ids, mine, "every subscriber got the same ids in the same order")
    end
    -- ids are "<epoch>-<seq>" with one epoch and increasing numbers
    local epoch, last = nil, 0
    for _, id in ipairs(ids) do
      local e, n = id:match("^(%d+)%-(%d+)$")
      assert.truthy(e, id)
      epoch = epoch or e
      assert.are.equal(epoch, e)
      assert.is_true(tonumber(n) > last, "ids increase: " .. table.concat(ids, ", "))
      last = tonumber(n)
    end
    client.run_for(remote, 0.3)
    for _, c in ipairs(subs) do assert.are.equal(20, #c.events, "no duplicate arrived later") end
  end)

  it("a client that moves to another process with its Last-Event-ID gets exactly what it missed, then live events", function()
    local a, b = app_process(), app_process()
    local c = subscribe(a, "room")
    local res = publish(a, "room", "m", 5)
    assert.are.equal(200, res.status)
    client.wait(a:app(), function() return #c.events >= 5 end, 5, "5 events on A")
    local last = c.events[3].id
    c:close()
    local c2 = subscribe(b, "room", last)
    client.wait(b:app(), function() return #c2.events >= 2 end, 5, "the replay on B")
    assert.are.same({ "m-4", "m-5" }, data(c2))
    assert.are.equal(0, gaps(c2))
    publish(a, "room", "live")
    client.wait(b:app(), function() return #c2.events >= 3 end, 5, "the live event on B")
    assert.are.same({ "m-4", "m-5", "live" }, data(c2))
  end)

  it("history and ids survive a restart of every app process", function()
    local a = app_process()
    local res = publish(a, "log", "x", 4)
    local ids = cjson.decode(res.body).ids
    a:stop()
    local a2 = app_process()
    local c = subscribe(a2, "log", ids[2])
    client.wait(a2:app(), function() return #c.events >= 2 end, 5, "the replay after the restart")
    assert.are.same({ "x-3", "x-4" }, data(c))
    assert.are.same({ ids[3], ids[4] }, { c.events[1].id, c.events[2].id })
    assert.are.equal(0, gaps(c))
    -- the sequence goes on from where it was
    local id5 = publish(a2, "log", "y").body
    assert.is_true(tonumber(id5:match("%-(%d+)$")) > tonumber(ids[4]:match("%-(%d+)$")))
  end)

  it("Redis down: publishes fail with an error, streams stay open, and what was kept is recovered after", function()
    local a, b = app_process(), app_process()
    local ca, cb = subscribe(a, "feed"), subscribe(b, "feed")
    publish(a, "feed", "before")
    client.wait(a:app(), function() return #ca.events >= 1 and #cb.events >= 1 end, 5, "the first event")
    r:kill()
    local res = publish(a, "feed", "during")
    assert.are.equal(503, res.status)
    assert.truthy(res.body:find("redis", 1, true), res.body)
    -- the server keeps serving, streams stay open
    assert.are.equal(200, client.request(a:app(), "GET", "/subscribers/feed").status)
    assert.is_false(ca.closed)
    r:restart()   -- with its append-only file: the data is back
    local ok
    client.wait(a:app(), function()
      ok = publish(b, "feed", "after")
      return ok.status == 200
    end, 15, "a publish to succeed again", function() return ok and ok.body or "" end)
    client.wait(a:app(), function() return #ca.events >= 2 and #cb.events >= 2 end, 10,
      "the event published after the outage on both", function() return ca:describe() end)
    assert.are.same({ "before", "after" }, data(ca))
    assert.are.same({ "before", "after" }, data(cb))
    assert.are.equal(0, gaps(ca))
    assert.truthy(a:log():find("redis: unavailable", 1, true), a:log())
    assert.truthy(a:log():find("redis: connected", 1, true), a:log())
  end)

  it("Redis losing its data (FLUSHALL): live subscribers and a later resume get the gap event", function()
    local a = app_process()
    local c = subscribe(a, "ticks")
    local res = publish(a, "ticks", "t", 3)
    local ids = cjson.decode(res.body).ids
    client.wait(a:app(), function() return #c.events >= 3 end, 5, "3 events")
    assert.are.equal("OK", r:cli("FLUSHALL"))
    local after
    client.wait(a:app(), function()
      after = publish(a, "ticks", "new")
      return after.status == 200
    end, 10, "a publish after the flush")
    client.wait(a:app(), function() return gaps(c) >= 1 and #data(c) >= 4 end, 10,
      "the gap and the new event", function() return c:describe() end)
    assert.are.same({ "t-1", "t-2", "t-3", "new" }, data(c))
    -- a client resuming with an id from before the flush is told it missed events
    local c2 = subscribe(a, "ticks", ids[2])
    client.wait(a:app(), function() return gaps(c2) >= 1 end, 5, "the gap on resume", function() return c2:describe() end)
    assert.are.equal("gap", c2.events[1].event)
  end)

  it("a dropped pub/sub connection loses nothing: the process reads what it missed from the stream", function()
    local a, b = app_process(), app_process()
    local cb = subscribe(b, "q")
    publish(a, "q", "one")
    client.wait(b:app(), function() return #cb.events >= 1 end, 5, "the first event")
    -- kill B's subscriber connection (and A's); publish while they reconnect
    r:cli("CLIENT", "KILL", "TYPE", "pubsub")
    publish(a, "q", "p", 5)
    client.wait(b:app(), function() return #cb.events >= 6 end, 10, "every event at B",
      function() return cb:describe() end)
    assert.are.same({ "one", "p-1", "p-2", "p-3", "p-4", "p-5" }, data(cb))
  end)
end)
