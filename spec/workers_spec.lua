-- workers = N (issue 11): N processes share the port (SO_REUSEPORT), supervised by the
-- parent: both take connections, a killed worker is replaced, SIGTERM drains them all.
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")

local FIXTURE = "spec/fixtures/workers_app.lua"

-- "<worker> <pid>" of the worker that answers a new connection.
local function who(p)
  local res = client.request(p:app(), "GET", "/who")
  assert.are.equal(200, res.status, res.body)
  local w, pid = res.body:match("^(%d+) (%d+)$")
  return tonumber(w), tonumber(pid)
end

local function alive(pid)
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

-- Asks until both workers have answered (the kernel spreads connections by their
-- addresses: a few dozen new connections reach both).
local function both(p)
  local seen, pids = {}, {}
  for _ = 1, 200 do
    local w, pid = who(p)
    seen[w], pids[w] = true, pid
    if seen[1] and seen[2] then return pids end
  end
  error("200 connections reached only worker " .. tostring(next(seen)))
end

describe("workers", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  it("two workers both take connections; a killed one is restarted; each runs generators", function()
    local p = process.start(FIXTURE, { WORKERS = 2 })
    local pids = both(p)
    assert.are_not.equal(pids[1], pids[2])
    -- a generator route in every worker
    local seen = {}
    for _ = 1, 200 do
      local c = client.connect(p:app(), "/tick")
      c:wait_events(2, 5)
      seen[c.events[1].data:match("^(%d+)")] = true
      c:close()
      if seen["1"] and seen["2"] then break end
    end
    assert.truthy(seen["1"] and seen["2"], "generator streams from both workers")
    -- kill worker 1: the parent starts another in its place
    os.execute("kill -9 " .. pids[1])
    local again
    client.wait(p:app(), function()
      local ok, w, pid = pcall(who, p)
      if ok and w == 1 and pid ~= pids[1] then again = pid end
      return again ~= nil
    end, 10, "a new worker 1")
    assert.is_false(alive(pids[1]))
    assert.is_true(alive(pids[2]), "worker 2 was not disturbed")
    assert.truthy(p:log():find("worker 1 (pid " .. pids[1] .. ") was killed by signal 9", 1, true), p:log())
  end)

  it("SIGTERM to the parent drains every worker: open streams end cleanly, every process exits", function()
    local p = process.start(FIXTURE, { WORKERS = 2 })
    local pids = both(p)
    local streams = {}
    for i = 1, 10 do
      streams[i] = client.connect(p:app(), "/tick")
      streams[i]:wait_events(1, 5)
    end
    local parent = p.pid
    os.execute("kill -TERM " .. parent)
    for _, c in ipairs(streams) do
      c:wait_end(10)
      assert.is_true(c:ended_cleanly(), c:describe())
    end
    client.wait(p:app(), function() return not alive(parent) and not alive(pids[1]) and not alive(pids[2]) end,
      10, "the parent and both workers to exit")
    p.pid = nil
  end)

  it("workers > 1 with a channel and no broker raises at listen", function()
    local sse = require("sse")
    local app = sse.app({ port = 0, workers = 2, log = false })
    app:channel("news")
    assert.has_error(function() app:listen() end,
      "app:listen: with workers > 1 channels need a broker (app option broker): each worker process would have channels of its own")
    assert.has_error(function() sse.app({ workers = 0 }) end)
    assert.has_error(function() sse.app({ workers = "many" }) end)
  end)

  it("with a broker, a publish on one worker reaches subscribers on both", function()
    if not redis.available() then pending(redis.MISSING) return end
    local r = redis.start()
    local p = process.start(FIXTURE, { WORKERS = 2, BROKER = r.url })
    both(p)
    -- subscribers until both workers have some (each /who tells which one a new connection reaches)
    local subs = {}
    for i = 1, 40 do
      subs[i] = client.connect(p:app(), "/events/room")
      subs[i]:wait_head(5)
    end
    local res = client.request(p:app(), "POST", "/publish/room", { body = "hello" })
    assert.are.equal(200, res.status, res.body)
    client.wait(p:app(), function()
      for _, c in ipairs(subs) do if #c.events < 1 then return false end end
      return true
    end, 10, "the event at all 40 subscribers")
    for _, c in ipairs(subs) do assert.are.same({ "hello" }, c:data()) end
  end)
end)
