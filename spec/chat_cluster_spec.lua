-- examples/chat/ as a cluster (issue 11): two worker processes behind one port on Redis,
-- with presence; and what a user sees when Redis goes away and comes back.
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")
local cjson = require("cjson")

describe("examples/chat/server.lua with REDIS and WORKERS=2", function()
  if not redis.available() then
    pending(redis.MISSING)
    return
  end
  after_each(function()
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  it("users spread over both workers see each other's messages and presence; Redis away: 503, streams stay", function()
    local r = redis.start({ aof = true })
    local chat = process.start("examples/chat/server.lua", { REDIS = r.url, WORKERS = 2 })
    local remote = chat:app()
    local users, pages = {}, {}
    for i = 1, 12 do
      users[i] = "u" .. i
      pages[i] = client.connect(remote, "/sse/subscribe?user=" .. users[i] .. "&topics=lobby")
      pages[i]:wait_head(5)
    end
    -- both workers took streams (the kernel spreads connections by address): each has
    -- more sockets than its listener and its two Redis connections
    local workers = {}
    for pid in client.sh("pgrep -P " .. chat.pid):gmatch("%d+") do workers[#workers + 1] = pid end
    assert.are.equal(2, #workers)
    for _, pid in ipairs(workers) do
      local sockets = tonumber(client.sh("ls -l /proc/" .. pid .. "/fd | grep -c socket:"))
      assert.is_true(sockets > 3, "worker " .. pid .. " has " .. sockets .. " sockets")
    end
    local function users_online()
      local res = client.request(remote, "GET", "/rooms/lobby/users")
      assert.are.equal(200, res.status, res.body)
      local online = cjson.decode(res.body).online
      local n = 0
      for _ in pairs(online) do n = n + 1 end
      return n, online
    end
    client.wait(remote, function() return users_online() == 12 end, 10,
      "all 12 users online, whichever worker answers", function() return select(2, users_online()) and cjson.encode(select(2, users_online())) end)
    for _ = 1, 10 do assert.are.equal(12, (users_online())) end   -- asked of both workers
    local res = client.request(remote, "POST", "/rooms/lobby/messages",
      { body = cjson.encode({ user = "u1", text = "hello all" }), headers = { ["Content-Type"] = "application/json" } })
    assert.are.equal(201, res.status, res.body)
    local function got(c, text)
      for _, ev in ipairs(c.events) do
        if ev.event == "message" and ev.data:find(text, 1, true) then return true end
      end
    end
    client.wait(remote, function()
      for _, c in ipairs(pages) do if not got(c, "hello all") then return false end end
      return true
    end, 10, "the message on every page")
    -- Redis goes away: posting fails with 503, the pages stay connected
    r:kill()
    res = client.request(remote, "POST", "/rooms/lobby/messages",
      { body = cjson.encode({ user = "u2", text = "lost?" }), headers = { ["Content-Type"] = "application/json" } })
    assert.are.equal(503, res.status, res.body)
    for _, c in ipairs(pages) do assert.is_false(c.closed) end
    r:restart()
    client.wait(remote, function()
      res = client.request(remote, "POST", "/rooms/lobby/messages",
        { body = cjson.encode({ user = "u2", text = "back again" }), headers = { ["Content-Type"] = "application/json" } })
      return res.status == 201
    end, 15, "posting to work again")
    client.wait(remote, function()
      for _, c in ipairs(pages) do if not got(c, "back again") then return false end end
      return true
    end, 10, "the message after the outage on every page")
  end)
end)
