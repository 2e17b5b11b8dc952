-- app:fetch (issue 10, part 3, first step): outbound HTTP from an app coroutine on
-- libcurl's multi interface, driven by the app's loop: nothing else waits meanwhile.
local client = require("support.client")
local cjson = require("cjson")

local in_app = client.in_app

describe("app:fetch", function()
  after_each(function() client.cleanup() end)

  local function app_with_routes()
    local app = client.app({ heartbeat = false })
    app:get("/json", function() return 201, { hello = "world" }, { ["X-Two"] = { "a", "b" } } end)
    app:post("/echo", function(req) return 200, req.body, { ["Content-Type"] = req.headers["content-type"] } end)
    app:get("/big", function() return string.rep("x", 100000) end)
    app:stream("/silent", function() app:sleep(60) end)   -- a head, then nothing
    app:get("/ping", function() return "pong" end)
    assert(app:listen())
    return app
  end

  it("gets a response from the app's own server: status, lower-case headers, body", function()
    local app = app_with_routes()
    local res, err = in_app(app, function() return app:fetch(app.url .. "/json") end)
    assert.is_table(res, tostring(err))
    assert.are.equal(201, res.status)
    assert.are.equal("application/json", res.headers["content-type"])
    assert.are.equal("a, b", res.headers["x-two"])
    assert.are.same({ hello = "world" }, cjson.decode(res.body))
  end)

  it("sends a method, headers and a body; a table body as JSON", function()
    local app = app_with_routes()
    local res = in_app(app, function()
      return app:fetch(app.url .. "/echo", { method = "POST", body = { n = 1 } })
    end)
    assert.are.equal(200, res.status)
    assert.are.equal("application/json", res.headers["content-type"])
    assert.are.same({ n = 1 }, cjson.decode(res.body))
    local res2 = in_app(app, function()
      return app:fetch(app.url .. "/echo", { method = "POST", body = "plain", headers = { ["Content-Type"] = "text/x-a" } })
    end)
    assert.are.equal("plain", res2.body)
    assert.are.equal("text/x-a", res2.headers["content-type"])
  end)

  it("an HTTP error status is a response; failures are nil, message, kind", function()
    local app = app_with_routes()
    local res = in_app(app, function() return app:fetch(app.url .. "/nope") end)
    assert.are.equal(404, res.status)
    -- a port nobody listens on
    local s = require("socket").bind("127.0.0.1", 0)
    local _, port = s:getsockname()
    s:close()
    local r, msg, kind = in_app(app, function() return app:fetch("http://127.0.0.1:" .. port .. "/") end)
    assert.is_nil(r)
    assert.is_string(msg)
    assert.are.equal("connect", kind)
    r, msg, kind = in_app(app, function() return app:fetch(app.url .. "/silent", { timeout = 0.3 }) end)
    assert.is_nil(r)
    assert.are.equal("timeout", kind, tostring(msg))
    r, msg, kind = in_app(app, function() return app:fetch(app.url .. "/big", { max_size = 1000 }) end)
    assert.is_nil(r)
    assert.are.equal("response too large", msg)
    assert.are.equal("too_large", kind)
  end)

  it("does not block: while a fetch waits, the server answers others at once", function()
    local app = app_with_routes()
    local done
    app:spawn(function() done = { app:fetch(app.url .. "/silent", { timeout = 1 }) } end)
    client.run_for(app, 0.1)
    local t0 = client.gettime()
    assert.are.equal(200, client.request(app, "GET", "/ping").status)
    assert.is_true(client.gettime() - t0 < 0.25, "a request waited for the fetch")
    assert.is_nil(done)
    client.wait(app, function() return done ~= nil end, 3, "the fetch to time out")
    assert.are.equal("timeout", done[3])
  end)

  it("stream = true returns at the head; res:read() gives the body as it arrives, then nil", function()
    local app = app_with_routes()
    app:stream("/three", function(stream)
      for i = 1, 3 do stream:send("e" .. i) app:sleep(0.1) end
    end)
    local pieces, times, res = {}, {}, nil
    local t0 = client.gettime()
    app:spawn(function()
      res = app:fetch(app.url .. "/three", { stream = true })
      times.head = client.gettime() - t0
      while true do
        local piece, err = res:read()
        if not piece then pieces.ended = err or true break end
        pieces[#pieces + 1] = piece
        times[#pieces] = client.gettime() - t0
      end
    end)
    client.wait(app, function() return pieces.ended end, 5, "the streamed body to end")
    assert.are.equal(true, pieces.ended)
    assert.are.equal(200, res.status)
    assert.are.equal("text/event-stream", res.headers["content-type"])
    local body = table.concat(pieces)
    for i = 1, 3 do assert.truthy(body:find("data: e" .. i .. "\n\n", 1, true), body) end
    assert.is_true(#pieces >= 2, "the body came in one piece")
    assert.is_true(times.head < 0.15 and times[1] < 0.2, "the head or first piece waited for the end")
  end)

  it("res:close() and dropping the response stop the transfer: the upstream stream closes", function()
    local app = app_with_routes()
    local closed = 0
    app:stream("/forever", function(stream)
      stream:on_close(function() closed = closed + 1 end)
      while stream:send("x") do app:sleep(0.02) end
    end)
    app:spawn(function()
      local res = app:fetch(app.url .. "/forever", { stream = true })
      assert(res:read())
      res:close()
      assert.are.same({ nil, "closed" }, { res:read() })
      local res2 = app:fetch(app.url .. "/forever", { stream = true })
      assert(res2:read())
      res2 = nil   -- luacheck: ignore (dropped on purpose: the collector ends the transfer)
      collectgarbage()
      collectgarbage()
    end)
    client.wait(app, function() return closed == 2 end, 5, "both upstream streams to close")
  end)

  it("raises outside an app coroutine and for bad options", function()
    local app = app_with_routes()
    assert.has_error(function() app:fetch(app.url .. "/json") end,
      "app:fetch: not in an app coroutine (a handler, a before hook, a stream's generator or accept, a timer callback, a function given to app:spawn): nothing here can wait on the loop")
    assert.has_error(function() app:fetch(42) end, "app:fetch: url must be a string")
    assert.has_error(function() app:fetch("http://x/", { tiemout = 1 }) end, "app:fetch: unknown option 'tiemout'")
  end)

  it("a generator whose client leaves while it fetches stops waiting: nil, 'closed'", function()
    local app = app_with_routes()
    local result
    app:stream("/relay", function(stream)
      stream:send("start")
      result = { app:fetch(app.url .. "/silent", { timeout = 30 }) }
    end)
    local c = client.connect(app, "/relay")
    c:wait_events(1)
    client.run_for(app, 0.1)
    c:close()
    client.wait(app, function() return result ~= nil end, 3, "the fetch to be cancelled")
    assert.are.same({ nil, "closed" }, result)
  end)
end)
