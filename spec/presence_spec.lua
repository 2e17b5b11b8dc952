-- Presence (issue 11): stream:join / stream:leave / ch:presence, in memory and across
-- processes on a broker (a real redis-server), including the expiry of a killed
-- process's members.
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")
local cjson = require("cjson")

describe("presence", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  it("in memory: join, a key joined twice counts once, leave and close remove, events", function()
    local app = client.app({ heartbeat = false })
    local room = app:channel("room"):presence_events(true)
    app:stream("/join/:key", function(stream, req)
      stream:subscribe(room, false)
      assert.is_true(stream:join(room, req.params.key, { name = req.params.key:upper() }))
      if req.query.leave then
        app:sleep(0.05)
        assert.is_true(stream:leave(room))
        assert.is_false(stream:leave(room))
      end
    end)
    assert(app:listen())
    local watcher = client.connect(app, "/join/watch")
    client.wait(app, function() return room:presence().watch end, 3, "the watcher to join")
    local a1 = client.connect(app, "/join/ann")
    local a2 = client.connect(app, "/join/ann")
    client.connect(app, "/join/bob?leave=1")
    client.wait(app, function()
      local p = room:presence()
      return p.ann and p.watch and not p.bob
    end, 3, "ann and watch present, bob gone")
    assert.are.same({ ann = { name = "ANN" }, watch = { name = "WATCH" } }, room:presence())
    a1:close()
    client.run_for(app, 0.1)
    assert.truthy(room:presence().ann, "ann still has a stream")
    a2:close()
    client.wait(app, function() return room:presence().ann == nil end, 3, "ann to leave")
    -- the watcher saw join/leave events for ann and bob, ann's once each
    local kinds = {}
    for _, ev in ipairs(watcher.events) do
      if ev.event == "join" or ev.event == "leave" then
        kinds[#kinds + 1] = ev.event .. " " .. cjson.decode(ev.data).key
      end
    end
    table.sort(kinds)
    assert.are.same({ "join ann", "join bob", "join watch", "leave ann", "leave bob" }, kinds)
  end)

  it("with a broker: members of every process, and a killed process's members expire", function()
    if not redis.available() then pending(redis.MISSING) return end
    local r = redis.start()
    local env = { BROKER = r.url, PRESENCE_TTL = 2 }
    local a, b = process.start("spec/fixtures/broker_app.lua", env), process.start("spec/fixtures/broker_app.lua", env)
    local ca = client.connect(a:app(), "/join/lobby/ann?info=Ann")
    local cb = client.connect(b:app(), "/join/lobby/bob?info=Bob")
    local members
    local function presence(p)
      local res = client.request(p:app(), "GET", "/presence/lobby")
      assert.are.equal(200, res.status, res.body)
      return cjson.decode(res.body)
    end
    client.wait(a:app(), function()
      members = presence(a)
      return members.ann and members.bob
    end, 5, "both members seen from A")
    assert.are.same({ ann = { name = "Ann" }, bob = { name = "Bob" } }, members)
    assert.are.same(members, presence(b))
    -- a leave reaches the other process at once
    ca:close()
    client.wait(b:app(), function() return presence(b).ann == nil end, 5, "ann gone, seen from B")
    -- a killed process's members expire (presence_ttl 2 s)
    b:kill("KILL")
    client.wait(a:app(), function() return presence(a).bob == nil end, 10, "bob to expire")
    assert.are.same({}, presence(a))
    cb:close()
  end)
end)
