-- app:spawn and app:sleep (issue 10, part 2, first step): the app's own coroutines on the
-- loop, and waiting in them without blocking anyone else.
local client = require("support.client")

describe("app coroutines", function()
  after_each(function() client.cleanup() end)

  it("app:spawn runs fn(...) from the next loop turn, and app:sleep waits while others are served", function()
    local app = client.app({ heartbeat = false })
    app:get("/ping", function() return "pong" end)
    assert(app:listen())
    local steps = {}
    app:spawn(function(a, b)
      steps[#steps + 1] = "start " .. a .. b
      local t0 = client.gettime()
      assert.is_true(app:sleep(0.2))
      steps[#steps + 1] = ("slept %.2f"):format(client.gettime() - t0)
    end, "x", "y")
    assert.are.same({}, steps, "spawn returns before fn runs")
    client.wait(app, function() return #steps == 1 end, 2, "the spawned function to start")
    assert.are.equal("start xy", steps[1])
    -- while it sleeps the server answers at once
    local t0 = client.gettime()
    assert.are.equal(200, client.request(app, "GET", "/ping").status)
    assert.is_true(client.gettime() - t0 < 0.15, "a request waited for the sleeping coroutine")
    assert.are.equal(1, #steps)
    client.wait(app, function() return #steps == 2 end, 2, "the sleep to end")
    local slept = tonumber(steps[2]:match("slept ([%d.]+)"))
    assert.is_true(slept >= 0.19, "woke early: " .. steps[2])
  end)

  it("an error in a spawned function is logged with its traceback; others go on", function()
    local app, logs = client.app()
    local done = false
    app:spawn(function() app:sleep(0.01) error("spawn-boom-31") end)
    app:spawn(function() app:sleep(0.02) done = true end)
    client.wait(app, function() return done end, 2, "the second coroutine")
    local entry = client.find_log(logs, "spawn", "spawn-boom-31")
    assert.truthy(entry, client.show_logs(logs))
    assert.truthy(entry.message:find("traceback", 1, true), entry.message)
  end)

  it("app:sleep works in a stream's generator, and answers nil, 'closed' when the client leaves", function()
    local app = client.app({ heartbeat = false })
    local result
    app:stream("/s", function(stream)
      stream:send("a")
      assert(app:sleep(0.05))
      stream:send("b")
      result = { app:sleep(30) }
    end)
    assert(app:listen())
    local c = client.connect(app, "/s")
    c:wait_events(2)
    assert.are.same({ "a", "b" }, c:data())
    c:close()
    client.wait(app, function() return result ~= nil end, 3, "the sleeping generator to hear of the close")
    assert.are.same({ nil, "closed" }, result)
  end)

  it("app:sleep outside an app coroutine raises a clear error; bad arguments raise", function()
    local app = client.app()
    assert.has_error(function() app:sleep(0.01) end,
      "app:sleep: not in an app coroutine (a handler, a before hook, a stream's generator or accept, a timer callback, a function given to app:spawn): nothing here can wait on the loop")
    local co = coroutine.wrap(function() return pcall(app.sleep, app, 0.01) end)
    local ok = co()
    assert.is_false(ok, "a plain coroutine of the user's cannot wait on the loop")
    assert.has_error(function() app:spawn(42) end, "app:spawn: expected a function")
    assert.has_error(function() app:sleep(-1) end)
  end)

  it("timer callbacks run as app coroutines: they may wait, and their errors are logged as timer errors", function()
    local app, logs = client.app()
    local steps = {}
    app:after(0, function(timer)
      steps[#steps + 1] = "fired"
      assert.is_true(app:sleep(0.05))
      steps[#steps + 1] = "waited"
      assert.is_false(timer:active())
    end)
    local n = 0
    local every
    every = app:every(0.01, function() n = n + 1 if n == 3 then every:cancel() error("tick-boom-9") end end)
    client.wait(app, function() return #steps == 2 and n == 3 end, 3, "both timers")
    assert.are.same({ "fired", "waited" }, steps)
    local entry = client.find_log(logs, "timer", "tick-boom-9")
    assert.truthy(entry, client.show_logs(logs))
  end)

  it("a script with no routes does its work under app:run() and stops", function()
    local app = client.app()
    local ticks = 0
    app:spawn(function()
      for _ = 1, 3 do app:sleep(0.01) ticks = ticks + 1 end
      app:stop()
    end)
    assert(app:run())
    assert.are.equal(3, ticks)
  end)
end)
