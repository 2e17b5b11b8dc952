-- Regression specs for the script-side defects of issue 8: mistakes in user code (or in
-- what a handler returns) must be answered with a clear error or status and hurt nothing
-- else. Each test is named after the defect it pins. The network-side attacks are in
-- hostile_spec.lua.
local client = require("support.client")
local sse = require("sse")

local fd_count, rss_kb = client.fd_count, client.rss_kb

describe("misuse", function()
  after_each(function() client.cleanup() end)

  describe("defect 2: a response libmicrohttpd refuses", function()
    it("a handler returning a 1xx status answers 500 and logs why, on HTTP/1.0 and 1.1", function()
      local app, logs = client.app()
      app:get("/s150", function() return 150, "x" end)
      app:get("/s101", function() return 101 end)
      app:get("/ok", function() return "fine" end)
      assert(app:listen())
      for _, path in ipairs({ "/s150", "/s101" }) do
        for _, version in ipairs({ "1.0", "1.1" }) do
          local c = client.connect(app, path, { version = version, headers = { Connection = "close" },
                                                accept = false })
          c:wait_for(function(x) return x.raw:find("\r\n\r\n", 1, true) end, 3, "an answer")
          assert.truthy(c.raw:match("^HTTP/1%.%d 500 "), path .. " over HTTP/" .. version .. ": " .. c.raw)
        end
      end
      local entry = client.find_log(logs, "handler returned status 150")
      assert.truthy(entry, client.show_logs(logs))
      assert.are.equal("error", entry.level)
      assert.are.equal(200, client.request(app, "GET", "/ok").status)
    end)

    it("app:stream raises at definition for a header libmicrohttpd cannot send", function()
      local app = client.app()
      assert.has_error(function() app:stream("/e", function() end, { headers = { ["X-Empty"] = "" } }) end,
        "app:stream: the value of header 'X-Empty' is empty")
      assert.has_error(function() app:stream("/e", function() end, { headers = { ["X-A"] = "a\r\nb" } }) end,
        "app:stream: the value of header 'X-A' contains CR, LF or NUL")
      assert.has_error(function() app:stream("/e", function() end, { headers = { ["X A"] = "a" } }) end)
    end)

    it("a handler returning an empty or CR/LF header value answers 500 with a log line that says why", function()
      local app, logs = client.app()
      app:get("/empty", function() return 200, "x", { ["X-Empty"] = "" } end)
      app:get("/crlf", function() return 200, "x", { ["X-Bad"] = "a\r\nInjected: yes" } end)
      assert(app:listen())
      local res = client.request(app, "GET", "/empty")
      assert.are.equal(500, res.status)
      assert.truthy(client.find_log(logs, "X-Empty", "empty"), client.show_logs(logs))
      res = client.request(app, "GET", "/crlf")
      assert.are.equal(500, res.status)
      assert.is_nil(res.headers["injected"])
      assert.truthy(client.find_log(logs, "X-Bad", "CR, LF"), client.show_logs(logs))
    end)
  end)

  describe("defect 6: apps and timers are collected", function()
    it("sse.app{} created and dropped 1,000 times leaves descriptors and memory flat", function()
      collectgarbage()
      collectgarbage()
      local fds, rss = fd_count(), rss_kb()
      for i = 1, 1000 do
        local app = sse.app({ port = 0, log = false })
        app:get("/", function() return app.port end)
        app:every(1, function() return app end)   -- an armed timer that leads back to the app
        if i % 100 == 0 then collectgarbage() end
      end
      collectgarbage()
      collectgarbage()
      assert.is_true(fd_count() <= fds + 2, ("descriptors: %d before, %d after"):format(fds, fd_count()))
      assert.is_true(rss_kb() < rss + 8 * 1024, ("RSS: %d KB before, %d KB after"):format(rss, rss_kb()))
    end)

    it("a listening app nobody references is collected: its port is closed", function()
      local port
      do
        local app = sse.app({ port = 0, log = false })
        assert(app:listen())
        port = app.port
      end
      collectgarbage()
      collectgarbage()
      local socket = require("socket")
      local s = socket.tcp()
      s:settimeout(1)
      local ok = s:connect("127.0.0.1", port)
      s:close()
      assert.is_nil(ok, "the port of a collected app still accepts")
    end)

    it("timer:cancel() after the app's core was dropped is harmless", function()
      local timer
      do
        local app = sse.app({ port = 0, log = false })
        timer = app:every(0.01, function() end)
        app._core = nil
      end
      collectgarbage()
      collectgarbage()
      timer:cancel()
      assert.is_false(timer:active())
      timer:cancel()
    end)
  end)

  describe("defect 7: one logging path", function()
    it("log = false: a failing handler still answers 500 and nothing raises", function()
      local app = client.app({ log = false })
      app:get("/boom", function() error("boom") end)
      app:before(function(req) if req.path == "/bad" then return 200, function() end end end)
      app:get("/bad", function() return "never" end)
      app:get("/ok", function() return "ok" end)
      assert(app:listen())
      assert.are.equal(500, client.request(app, "GET", "/boom").status)
      assert.are.equal(500, client.request(app, "GET", "/bad").status)
      assert.are.equal(200, client.request(app, "GET", "/ok").status)
    end)

    it("a bad value returned by app:before is logged and answered 500", function()
      local app, logs = client.app()
      app:before(function() return 200, {}, "not a table" end)
      app:get("/x", function() return "x" end)
      assert(app:listen())
      assert.are.equal(500, client.request(app, "GET", "/x").status)
      assert.truthy(client.find_log(logs, "before", "headers must be a table"), client.show_logs(logs))
    end)
  end)

  describe("defect 14: small API defects", function()
    it("stream:send takes a number or boolean as the data, as { data = x } does", function()
      local app = client.app({ heartbeat = false })
      app:stream("/s", function(stream)
        assert(stream:send(42))
        assert(stream:send(true))
        assert(stream:send(1.5))
      end)
      assert(app:listen())
      local c = client.connect(app, "/s")
      c:wait_end()
      assert.are.same({ "42", "true", "1.5" }, c:data())
    end)

    it("an empty event, and NaN or infinite numbers, raise", function()
      assert.has_error(function() sse.encode({}) end,
        "sse.encode: the event is empty (give data, comment, event, id or retry)")
      assert.has_error(function() sse.encode({ data = 0 / 0 }) end,
        "sse.encode: field 'data' must be a finite number")
      assert.has_error(function() sse.encode(1 / 0) end, "sse.encode: field 'data' must be a finite number")
      assert.has_error(function() sse.encode({ data = "x", id = -1 / 0 }) end,
        "sse.encode: field 'id' must be a finite number")
      assert.are.equal("retry: 5\n\n", sse.encode({ retry = 5 }))
      local app = client.app({ heartbeat = false })
      local err
      app:stream("/s", function(stream)
        local ok, e = pcall(stream.send, stream, {})
        err = not ok and e
        stream:send("after")
      end)
      assert(app:listen())
      local c = client.connect(app, "/s")
      c:wait_end()
      assert.truthy(err and err:find("the event is empty", 1, true), tostring(err))
      assert.are.same({ "after" }, c:data())
      assert.falsy(c.body:find("\n\n\n", 1, true), "no stray blank line: " .. client.show(c.body))
    end)

    it("repeated query parameters: the first in req.query, all of them in req.query_all", function()
      local app = client.app()
      local got
      app:get("/q", function(req) got = req return "ok" end)
      assert(app:listen())
      client.request(app, "GET", "/q?a=1&a=2&b=x&a=3")
      assert.are.equal("1", got.query.a)
      assert.are.same({ "1", "2", "3" }, got.query_all.a)
      assert.are.same({ "x" }, got.query_all.b)
    end)

    it("a header given as a list is sent once per value", function()
      local app = client.app()
      app:get("/c", function() return 200, "x", { ["Set-Cookie"] = { "a=1", "b=2" } } end)
      app:stream("/s", function(stream) stream:send("x") end,
        { headers = { ["X-Multi"] = { "one", "two" } } })
      assert(app:listen())
      local res = client.request(app, "GET", "/c")
      assert.are.equal(200, res.status)
      assert.are.equal(2, client.header_count(res, "set-cookie"), res.raw)
      assert.truthy(res.raw:find("Set-Cookie: a=1\r\n", 1, true), res.raw)
      assert.truthy(res.raw:find("Set-Cookie: b=2\r\n", 1, true), res.raw)
      assert.falsy(res.raw:find("table: 0x", 1, true), res.raw)
      local c = client.connect(app, "/s")
      c:wait_end()
      assert.are.equal(2, client.header_count(c.res, "x-multi"), c.raw)
    end)
  end)
end)
