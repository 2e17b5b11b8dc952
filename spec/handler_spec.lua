-- Handlers that wait (issue 10, item 2): route handlers, before hooks and a stream's
-- accept run as app coroutines; one that waits keeps its connection suspended and is
-- answered when it returns, while the server serves everyone else.
local client = require("support.client")

local function parse_all(c)
  return client.parse_response(c.raw, c.closed)
end

describe("handlers that wait", function()
  after_each(function() client.cleanup() end)

  it("a handler that sleeps is answered when it returns; others are answered meanwhile", function()
    local app = client.app({ heartbeat = false })
    local order = {}
    app:get("/slow", function(req)
      order[#order + 1] = "slow started"
      assert.is_true(app:sleep(0.3))
      order[#order + 1] = "slow returns"
      return 201, { waited = true, q = req.query.q }, { ["X-Waited"] = "yes" }
    end)
    app:get("/ping", function()
      order[#order + 1] = "ping"
      return "pong"
    end)
    assert(app:listen())
    local slow = client.connect(app, "/slow?q=7", { accept = false, headers = { Connection = "close" } })
    client.wait(app, function() return #order == 1 end, 2, "the slow handler to start")
    local ping = client.request(app, "GET", "/ping")
    assert.are.equal(200, ping.status)
    assert.are.same({ "slow started", "ping" }, order)
    local res
    client.wait(app, function()
      res = parse_all(slow)
      return res and res.complete
    end, 3, "the slow answer", function() return slow:describe() end)
    assert.are.same({ "slow started", "ping", "slow returns" }, order)
    assert.are.equal(201, res.status)
    assert.are.equal("yes", res.headers["x-waited"])
    assert.are.equal("application/json", res.headers["content-type"])
    assert.are.same({ waited = true, q = "7" }, require("cjson").decode(res.body))
  end)

  it("a handler may fetch from its own server (no deadlock) and read the request body", function()
    local app = client.app({ heartbeat = false })
    app:get("/inner", function() return "inner says hi" end)
    app:post("/outer", function(req)
      local res, err = app:fetch(app.url .. "/inner")
      if not res then return 502, err end
      return req.body .. " / " .. res.body
    end)
    assert(app:listen())
    local c = client.connect(app, "/outer", { method = "POST", body = "posted", accept = false,
      headers = { Connection = "close" } })
    local res
    client.wait(app, function()
      res = parse_all(c)
      return res and res.complete
    end, 5, "the outer answer", function() return c:describe() end)
    assert.are.equal(200, res.status)
    assert.are.equal("posted / inner says hi", res.body)
  end)

  it("before hooks may wait, then refuse or let the request through", function()
    local app = client.app({ heartbeat = false })
    app:before(function(req)
      assert(app:sleep(0.05))
      if req.headers.authorization ~= "Bearer ok" then
        return 401, "who are you?\n"
      end
      req.user = "ok-user"
    end)
    app:get("/me", function(req) return "hello " .. req.user end)
    assert(app:listen())
    local no = client.request(app, "GET", "/me")
    assert.are.equal(401, no.status)
    assert.are.equal("who are you?\n", no.body)
    local yes = client.request(app, "GET", "/me", { headers = { Authorization = "Bearer ok" } })
    assert.are.equal(200, yes.status)
    assert.are.equal("hello ok-user", yes.body)
  end)

  it("a stream's accept may wait, refuse with a status before any byte, or pass values to the generator", function()
    local app = client.app({ heartbeat = false })
    local rooms = { lobby = true }
    app:stream("/rooms/:room", function(stream, req)
      stream:send({ event = "joined", data = req.room_title })
    end, {
      accept = function(req)
        assert(app:sleep(0.05))          -- e.g. a lookup in another service
        if not rooms[req.params.room] then
          return 404, "no such room\n"
        end
        req.room_title = "Room " .. req.params.room
      end,
    })
    assert(app:listen())
    local missing = client.request(app, "GET", "/rooms/nowhere")
    assert.are.equal(404, missing.status)
    assert.are.equal("no such room\n", missing.body)
    local c = client.connect(app, "/rooms/lobby")
    c:wait_events(1)
    assert.are.equal(200, c.res.status)
    assert.are.equal("text/event-stream", c.res.headers["content-type"])
    assert.are.equal("joined", c.events[1].event)
    assert.are.equal("Room lobby", c.events[1].data)
  end)

  it("a client that leaves while its handler waits: the wait ends with nil, 'closed', its fetch is cancelled, nothing leaks", function()
    local app, logs = client.app({ heartbeat = false })
    local upstream_open, upstream_closed = 0, 0
    app:stream("/upstream", function(stream)
      upstream_open = upstream_open + 1
      stream:on_close(function() upstream_closed = upstream_closed + 1 end)
      stream:send("first")
      app:sleep(60)
    end)
    local results
    app:get("/sleeper", function()
      results.sleep = { app:sleep(30) }
      return "never seen"
    end)
    app:get("/fetcher", function()
      local res = assert(app:fetch(app.url .. "/upstream", { stream = true }))
      local piece, err
      repeat piece, err = res:read() until not piece
      results.read = { piece, err }
      return "never seen either"
    end)
    app:get("/warm", function() return assert(app:fetch(app.url .. "/ping")).status end)
    app:get("/ping", function() return "pong" end)
    assert(app:listen())
    -- the HTTP client's own descriptors (made on first use) belong in the baseline
    assert.are.equal(200, client.request(app, "GET", "/warm").status)
    client.run_for(app, 0.05)
    local fds = client.fd_count()
    for _ = 1, 3 do
      results = {}
      local a = client.connect(app, "/sleeper", { accept = false })
      local b = client.connect(app, "/fetcher", { accept = false })
      client.wait(app, function() return upstream_open > upstream_closed end, 3, "the fetch to reach upstream")
      client.run_for(app, 0.05)
      a:close()
      b:close()
      client.wait(app, function() return results.sleep and results.read end, 3,
        "both handlers to hear that their clients left")
      assert.are.same({ nil, "closed" }, results.sleep)
      assert.are.same({ nil, "closed" }, results.read)
      client.wait(app, function() return upstream_closed == upstream_open end, 3, "the upstream stream to close")
    end
    client.wait(app, function() return client.fd_count() <= fds end, 3,
      "descriptors back to their baseline", function() return "fds " .. client.fd_count() .. " vs " .. fds end)
    assert.is_nil(client.find_log(logs, "error"), client.show_logs(logs))
  end)

  it("errors after a wait give 500 and are logged; a bad value after a wait too", function()
    local app, logs = client.app({ heartbeat = false })
    app:get("/boom", function()
      app:sleep(0.01)
      error("handler-boom-77")
    end)
    app:get("/bad", function()
      app:sleep(0.01)
      return 200, function() end
    end)
    app:get("/nested", function()
      -- a plain coroutine of the user's cannot wait on the loop: a clear error, 500
      local co = coroutine.wrap(function() return app:sleep(0.01) end)
      return co()
    end)
    assert(app:listen())
    assert.are.equal(500, client.request(app, "GET", "/boom").status)
    local entry = client.find_log(logs, "GET /boom", "handler", "handler-boom-77")
    assert.truthy(entry, client.show_logs(logs))
    assert.are.equal(500, client.request(app, "GET", "/bad").status)
    assert.truthy(client.find_log(logs, "GET /bad", "body"), client.show_logs(logs))
    assert.are.equal(500, client.request(app, "GET", "/nested").status)
    assert.truthy(client.find_log(logs, "GET /nested", "not in an app coroutine"), client.show_logs(logs))
    -- the server is fine afterwards
    app:get("/ok", function() return "ok" end)
    assert.are.equal(200, client.request(app, "GET", "/ok").status)
  end)

  it("many waiting handlers at once are all answered, and a kept-alive connection is reused after one", function()
    local app = client.app({ heartbeat = false })
    app:get("/wait/:n", function(req)
      app:sleep(0.05 + (tonumber(req.params.n) % 5) * 0.02)
      return "done " .. req.params.n
    end)
    assert(app:listen())
    local cs = {}
    for i = 1, 100 do
      cs[i] = client.connect(app, "/wait/" .. i, { accept = false, headers = { Connection = "close" } })
    end
    client.wait(app, function()
      for _, c in ipairs(cs) do
        local res = parse_all(c)
        if not (res and res.complete) then return false end
      end
      return true
    end, 10, "100 waiting handlers to answer")
    for i, c in ipairs(cs) do
      local res = parse_all(c)
      assert.are.equal(200, res.status)
      assert.are.equal("done " .. i, res.body)
    end
    -- keep-alive: two requests on one connection, the first answered after a wait
    local c = client.connect(app, "/wait/1", { accept = false })
    client.wait(app, function() return c.raw:find("done 1", 1, true) end, 3, "the first answer")
    assert(c.sock:send(("GET /wait/2 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"):format(app.port)))
    client.wait(app, function() return c.raw:find("done 2", 1, true) end, 3, "the second answer on the same connection",
      function() return c:describe() end)
  end)

  it("shutdown waits for waiting handlers up to shutdown_timeout, then closes the rest", function()
    local app, logs = client.app({ heartbeat = false, shutdown_timeout = 1 })
    app:get("/quick", function() app:sleep(0.1) return "made it" end)
    app:get("/forever", function() app:sleep(60) return "too late" end)
    assert(app:listen())
    local quick = client.connect(app, "/quick", { accept = false })
    local forever = client.connect(app, "/forever", { accept = false })
    client.run_for(app, 0.03)
    local t0 = client.gettime()
    app:stop()
    local took = client.gettime() - t0
    for _ = 1, 20 do quick:pump() forever:pump() end
    client.wait(app, function() quick:pump() forever:pump() return forever.closed end, 3, "the forever client to be closed")
    assert.truthy(quick.raw:find("made it", 1, true), quick:describe())
    assert.falsy(forever.raw:find("too late", 1, true))
    assert.is_true(took < 3, "shutdown took " .. took)
    assert.truthy(client.find_log(logs, "handlers did not return"), client.show_logs(logs))
  end)
end)
