-- The HTTP side of sse.app over real sockets: routing, requests, responses, hooks, static
-- files, errors, listen/run/stop. The app runs in this process; the specs step it while a
-- raw HTTP/1.1 client (spec/support/client.lua) reads the bytes it sends.
local cjson = require("cjson")
local client = require("support.client")

local request = client.request

describe("sse.app HTTP server", function()
  after_each(function() client.cleanup() end)

  describe("listen", function()
    it("binds a free port on loopback and reports it in app.port and app.url", function()
      local app = client.app()
      assert.is_true(app:listen())
      assert.is_number(app.port)
      assert.is_true(app.port > 0)
      assert.are.equal("http://127.0.0.1:" .. app.port, app.url)
    end)

    it("returns nil and a message when the port is taken", function()
      local first = client.app()
      assert(first:listen())
      local second = client.app { port = first.port }
      local ok, err = second:listen()
      assert.is_nil(ok)
      assert.is_string(err)
    end)
  end)

  describe("routing", function()
    local app
    before_each(function()
      app = client.app()
      app:get("/hello", function() return "hello" end)
      app:post("/submit", function() return "submitted" end)
      app:get("/users/:id", function(req) return "user " .. req.params.id end)
      app:get("/users/me", function() return "me" end)  -- registered after the pattern: still wins
      app:get("/users/:id/posts/:post", function(req)
        return { id = req.params.id, post = req.params.post }
      end)
      app:get("/files/*", function(req) return req.params.splat end)
      app:route("PATCH", "/things/:id", function(req) return "patched " .. req.params.id end)
      app:put("/things/:id", function(req) return "put " .. req.params.id end)
      app:delete("/things/:id", function(req) return "deleted " .. req.params.id end)
      assert(app:listen())
    end)

    it("answers a known route", function()
      local res = request(app, "GET", "/hello")
      assert.are.equal(200, res.status)
      assert.are.equal("hello", res.body)
    end)

    it("answers 404 for an unknown path", function()
      local res = request(app, "GET", "/nope")
      assert.are.equal(404, res.status)
      res = request(app, "GET", "/hello/extra")
      assert.are.equal(404, res.status)
    end)

    it("answers 405 with an Allow header for a known path with another method", function()
      local res = request(app, "POST", "/hello")
      assert.are.equal(405, res.status)
      assert.is_string(res.headers.allow, "405 without an Allow header")
      assert.truthy(res.headers.allow:find("GET", 1, true), "Allow: " .. res.headers.allow)
      assert.falsy(res.headers.allow:find("POST", 1, true), "Allow: " .. res.headers.allow)

      res = request(app, "GET", "/submit")
      assert.are.equal(405, res.status)
      assert.truthy((res.headers.allow or ""):find("POST", 1, true))
    end)

    it("captures :name segments into req.params", function()
      assert.are.equal("user 42", request(app, "GET", "/users/42").body)
      local res = request(app, "GET", "/users/7/posts/abc")
      assert.are.equal(200, res.status)
      assert.are.same({ id = "7", post = "abc" }, cjson.decode(res.body))
    end)

    it("prefers a static route over a patterned one, whatever the order they were added", function()
      assert.are.equal("me", request(app, "GET", "/users/me").body)
      assert.are.equal("user you", request(app, "GET", "/users/you").body)
    end)

    it("captures the rest of the path into req.params.splat with a trailing *", function()
      local res = request(app, "GET", "/files/a/b/c.txt")
      assert.are.equal(200, res.status)
      assert.are.equal("a/b/c.txt", res.body)
    end)

    it("routes put, delete and any method through app:route", function()
      assert.are.equal("put 1", request(app, "PUT", "/things/1").body)
      assert.are.equal("deleted 2", request(app, "DELETE", "/things/2").body)
      assert.are.equal("patched 3", request(app, "PATCH", "/things/3").body)
      local res = request(app, "POST", "/things/4")
      assert.are.equal(405, res.status)
      for _, m in ipairs { "PUT", "DELETE", "PATCH" } do
        assert.truthy((res.headers.allow or ""):find(m, 1, true), "Allow lacks " .. m .. ": " .. tostring(res.headers.allow))
      end
    end)

    it("answers 405 for a stream route asked with another method", function()
      local app2 = client.app()
      app2:stream("/events", function(stream) stream:send("x") end)
      assert(app2:listen())
      local res = request(app2, "POST", "/events")
      assert.are.equal(405, res.status)
      assert.truthy((res.headers.allow or ""):find("GET", 1, true))
    end)
  end)

  describe("requests", function()
    local app, seen
    before_each(function()
      seen = nil
      app = client.app { max_body = 1024 }
      local function capture(req)
        seen = req
        return "ok"
      end
      app:get("/capture", capture)
      app:post("/capture", capture)
      app:post("/echo", function(req) return req.body end)
      assert(app:listen())
    end)

    it("gives the request body to the handler as req.body", function()
      local res = request(app, "POST", "/echo", { body = "hello body\r\nsecond line" })
      assert.are.equal(200, res.status)
      assert.are.equal("hello body\r\nsecond line", res.body)
    end)

    it("leaves req.body nil when there is none", function()
      request(app, "GET", "/capture")
      assert.is_table(seen)
      assert.is_nil(seen.body)
    end)

    it("answers 413 to a body larger than max_body", function()
      local res = request(app, "POST", "/echo", { body = string.rep("x", 4096) })
      assert.are.equal(413, res.status)
      -- and the server still works
      assert.are.equal("small", request(app, "POST", "/echo", { body = "small" }).body)
    end)

    it("sets method and path, and decodes the query (+ is a space, as forms send it)", function()
      request(app, "GET", "/capture?a=1&b=hello%20world&c=x+y&d=%2B%26%3D&e=")
      assert.are.equal("GET", seen.method)
      assert.are.equal("/capture", seen.path)
      assert.are.equal("1", seen.query.a)
      assert.are.equal("hello world", seen.query.b)
      assert.are.equal("x y", seen.query.c)
      assert.are.equal("+&=", seen.query.d)
      assert.are.equal("", seen.query.e)
    end)

    it("gives an empty query table when there is no query", function()
      request(app, "GET", "/capture")
      assert.are.same({}, seen.query)
    end)

    it("lower-cases header names in req.headers", function()
      request(app, "GET", "/capture", { headers = { ["X-Custom-Thing"] = "Some Value" } })
      assert.are.equal("Some Value", seen.headers["x-custom-thing"])
      assert.is_nil(seen.headers["X-Custom-Thing"])
      assert.are.equal("lua-sse-spec", seen.headers["user-agent"])
    end)

    it("sets req.remote_addr to the client's address", function()
      request(app, "GET", "/capture")
      assert.is_string(seen.remote_addr)
      assert.truthy(seen.remote_addr:find("^127%.0%.0%.1"), "remote_addr: " .. seen.remote_addr)
    end)

    it("takes req.last_event_id from the Last-Event-ID header", function()
      request(app, "GET", "/capture", { headers = { ["Last-Event-ID"] = "42" } })
      assert.are.equal("42", seen.last_event_id)
    end)

    it("takes req.last_event_id from the lastEventId or last_event_id query parameter", function()
      request(app, "GET", "/capture?lastEventId=7")
      assert.are.equal("7", seen.last_event_id)
      request(app, "GET", "/capture?last_event_id=8")
      assert.are.equal("8", seen.last_event_id)
    end)

    it("prefers the Last-Event-ID header over the query parameter", function()
      request(app, "GET", "/capture?lastEventId=7", { headers = { ["Last-Event-ID"] = "9" } })
      assert.are.equal("9", seen.last_event_id)
    end)

    it("leaves req.last_event_id nil without header or parameter", function()
      request(app, "GET", "/capture")
      assert.is_nil(seen.last_event_id)
    end)
  end)

  describe("handler results", function()
    local app
    before_each(function()
      app = client.app()
      app:get("/string", function() return "just a body" end)
      app:get("/status", function() return 201, "created" end)
      app:get("/headers", function()
        return 202, "<p>hi</p>", { ["content-type"] = "text/html; charset=utf-8", ["X-Extra"] = "yes" }
      end)
      app:get("/mixed-case", function() return 200, "{}", { ["Content-Type"] = "application/x-thing" } end)
      app:get("/json", function() return { ok = true, list = { 1, 2, 3 }, name = "sse" } end)
      app:get("/json-status", function() return 400, { error = "bad" } end)
      app:get("/nobody", function() return 204 end)
      app:get("/nil-body", function() return 200, nil end)
      assert(app:listen())
    end)

    it("sends a string body as text/plain; charset=utf-8 with status 200", function()
      local res = request(app, "GET", "/string")
      assert.are.equal(200, res.status)
      assert.are.equal("just a body", res.body)
      assert.are.equal("text/plain; charset=utf-8", res.headers["content-type"])
    end)

    it("uses the status of `return status, body`", function()
      local res = request(app, "GET", "/status")
      assert.are.equal(201, res.status)
      assert.are.equal("created", res.body)
    end)

    it("sends the headers of `return status, body, headers`, content-type included", function()
      local res = request(app, "GET", "/headers")
      assert.are.equal(202, res.status)
      assert.are.equal("<p>hi</p>", res.body)
      assert.are.equal("text/html; charset=utf-8", res.headers["content-type"])
      assert.are.equal("yes", res.headers["x-extra"])
      assert.are.equal(1, client.header_count(res, "content-type"))
    end)

    it("does not add a second Content-Type when the handler gives one in any case", function()
      local res = request(app, "GET", "/mixed-case")
      assert.are.equal(1, client.header_count(res, "content-type"))
      assert.are.equal("application/x-thing", res.headers["content-type"])
    end)

    it("sends a table body as JSON", function()
      local res = request(app, "GET", "/json")
      assert.are.equal(200, res.status)
      assert.truthy(res.headers["content-type"]:find("^application/json"), res.headers["content-type"])
      assert.are.same({ ok = true, list = { 1, 2, 3 }, name = "sse" }, cjson.decode(res.body))

      res = request(app, "GET", "/json-status")
      assert.are.equal(400, res.status)
      assert.are.same({ error = "bad" }, cjson.decode(res.body))
    end)

    it("sends no content for a nil body", function()
      local res = request(app, "GET", "/nobody")
      assert.are.equal(204, res.status)
      assert.are.equal("", res.body)

      res = request(app, "GET", "/nil-body")
      assert.are.equal(200, res.status)
      assert.are.equal("", res.body)
      assert.is_true(res.headers["content-length"] == "0" or res.chunked,
        "a 200 with no body must say so (Content-Length: 0):\n" .. client.show(res.raw))
    end)
  end)

  describe("errors", function()
    it("answers 500 to a handler error, logs it with a traceback and keeps serving", function()
      local app, logs = client.app()
      app:get("/boom", function() error("kaboom-7431") end)
      app:get("/ok", function() return "still here" end)
      assert(app:listen())

      local res = request(app, "GET", "/boom")
      assert.are.equal(500, res.status)
      assert.falsy(res.body:find("kaboom-7431", 1, true), "the error text must not leak to the client")
      local entry = client.find_log(logs, "kaboom-7431")
      assert.is_truthy(entry, "error not logged; log was:\n" .. client.show_logs(logs))
      assert.truthy(entry.message:find("traceback", 1, true), "no traceback in: " .. entry.message)

      res = request(app, "GET", "/ok")
      assert.are.equal(200, res.status)
      assert.are.equal("still here", res.body)
    end)

    it("answers 500 to an error value that is not a string", function()
      local app, logs = client.app()
      app:get("/boom", function() error({ code = 1 }) end)
      assert(app:listen())
      assert.are.equal(500, request(app, "GET", "/boom").status)
      assert.is_true(#logs > 0)
    end)

    it("answers 500 to a handler returning something it cannot send", function()
      local app = client.app()
      app:get("/bad", function() return 200, function() end end)
      app:get("/ok", function() return "ok" end)
      assert(app:listen())
      assert.are.equal(500, request(app, "GET", "/bad").status)
      assert.are.equal(200, request(app, "GET", "/ok").status)
    end)
  end)

  describe("app:before", function()
    local app, calls
    before_each(function()
      calls = 0
      app = client.app()
      app:before(function(req)
        if req.headers.authorization ~= "Bearer good" then return 401, "no" end
      end)
      app:get("/private", function()
        calls = calls + 1
        return "secret"
      end)
      app:stream("/events", function(stream)
        calls = calls + 1
        stream:send("hi")
      end)
      assert(app:listen())
    end)

    it("short-circuits the request when it returns a status and body", function()
      local res = request(app, "GET", "/private")
      assert.are.equal(401, res.status)
      assert.are.equal("no", res.body)
      assert.are.equal(0, calls)
    end)

    it("continues to the route when it returns nothing", function()
      local res = request(app, "GET", "/private", { headers = { Authorization = "Bearer good" } })
      assert.are.equal(200, res.status)
      assert.are.equal("secret", res.body)
      assert.are.equal(1, calls)
    end)

    it("guards stream routes too", function()
      local res = request(app, "GET", "/events")
      assert.are.equal(401, res.status)
      assert.are.equal(0, calls)
    end)

    it("can send headers with its answer", function()
      local app2 = client.app()
      app2:before(function() return 429, "slow down", { ["Retry-After"] = "3" } end)
      app2:get("/x", function() return "x" end)
      assert(app2:listen())
      local res = request(app2, "GET", "/x")
      assert.are.equal(429, res.status)
      assert.are.equal("slow down", res.body)
      assert.are.equal("3", res.headers["retry-after"])
    end)
  end)

  describe("app:static", function()
    local app, root
    before_each(function()
      root = client.tmpdir()
      os.execute("mkdir -p " .. client.shell_quote(root .. "/public/sub"))
      client.write_file(root .. "/secret.txt", "TOP-SECRET")
      client.write_file(root .. "/public/hello.txt", "hello file\n")
      client.write_file(root .. "/public/page.html", "<h1>page</h1>")
      client.write_file(root .. "/public/style.css", "body{}")
      client.write_file(root .. "/public/app.js", "console.log(1)")
      client.write_file(root .. "/public/data.json", "{\"a\":1}")
      client.write_file(root .. "/public/sub/deep.txt", "deep")
      app = client.app()
      app:static("/assets", root .. "/public")
      assert(app:listen())
    end)
    after_each(function() client.rmdir(root) end)

    it("serves a file with its content", function()
      local res = request(app, "GET", "/assets/hello.txt")
      assert.are.equal(200, res.status)
      assert.are.equal("hello file\n", res.body)
      assert.truthy(res.headers["content-type"]:find("^text/plain"), res.headers["content-type"])
      assert.are.equal("deep", request(app, "GET", "/assets/sub/deep.txt").body)
    end)

    it("sets the content type by extension", function()
      local cases = {
        ["page.html"] = "^text/html",
        ["style.css"] = "^text/css",
        ["app.js"] = "javascript",
        ["data.json"] = "^application/json",
      }
      for name, pattern in pairs(cases) do
        local res = request(app, "GET", "/assets/" .. name)
        assert.are.equal(200, res.status, name)
        assert.truthy((res.headers["content-type"] or ""):find(pattern),
          name .. " served as " .. tostring(res.headers["content-type"]))
      end
    end)

    it("answers 404 for a missing file", function()
      assert.are.equal(404, request(app, "GET", "/assets/missing.txt").status)
    end)

    it("answers 404 to paths that try to escape the directory", function()
      for _, path in ipairs {
        "/assets/../secret.txt",
        "/assets/sub/../../secret.txt",
        "/assets/%2e%2e/secret.txt",
        "/assets/..%2fsecret.txt",
        "/assets/%2E%2E%2Fsecret.txt",
      } do
        local res = request(app, "GET", path)
        assert.are.equal(404, res.status, path)
        assert.falsy(res.body:find("TOP-SECRET", 1, true), "leaked the secret through " .. path)
      end
    end)
  end)

  describe("CORS", function()
    it("adds Access-Control-Allow-Origin: * with cors = '*'", function()
      local app = client.app { cors = "*" }
      app:get("/x", function() return "x" end)
      assert(app:listen())
      local res = request(app, "GET", "/x", { headers = { Origin = "http://example.com" } })
      assert.are.equal(200, res.status)
      assert.are.equal("*", res.headers["access-control-allow-origin"])
    end)

    it("sends no CORS headers by default", function()
      local app = client.app()
      app:get("/x", function() return "x" end)
      assert(app:listen())
      local res = request(app, "GET", "/x", { headers = { Origin = "http://example.com" } })
      assert.is_nil(res.headers["access-control-allow-origin"])
    end)

    it("echoes an allowed origin with credentials and refuses others", function()
      local app = client.app { cors = { origins = { "http://good.example" }, credentials = true } }
      app:get("/x", function() return "x" end)
      assert(app:listen())
      local res = request(app, "GET", "/x", { headers = { Origin = "http://good.example" } })
      assert.are.equal("http://good.example", res.headers["access-control-allow-origin"])
      assert.are.equal("true", res.headers["access-control-allow-credentials"])

      res = request(app, "GET", "/x", { headers = { Origin = "http://evil.example" } })
      assert.is_nil(res.headers["access-control-allow-origin"])
    end)

    it("answers a preflight OPTIONS request", function()
      local app = client.app { cors = { origins = { "http://good.example" }, credentials = true } }
      app:post("/x", function() return "x" end)
      assert(app:listen())
      local res = request(app, "OPTIONS", "/x", { headers = {
        Origin = "http://good.example",
        ["Access-Control-Request-Method"] = "POST",
      } })
      assert.is_true(res.status == 204 or res.status == 200, "preflight status " .. res.status)
      assert.are.equal("http://good.example", res.headers["access-control-allow-origin"])
      assert.truthy((res.headers["access-control-allow-methods"] or ""):find("POST", 1, true))
    end)
  end)

  describe("timers", function()
    it("app:after runs once, app:every repeats, timer:cancel stops it", function()
      local app = client.app()
      assert(app:listen())
      local once, ticks, cancelled_ran = 0, 0, false
      app:after(0.05, function() once = once + 1 end)
      local every
      every = app:every(0.03, function()
        ticks = ticks + 1
        if ticks == 3 then every:cancel() end
      end)
      local never = app:after(0.1, function() cancelled_ran = true end)
      never:cancel()
      client.wait(app, function() return ticks >= 3 and once >= 1 end, 2, "the timers to fire")
      client.run_for(app, 0.3)
      assert.are.equal(1, once)
      assert.are.equal(3, ticks)
      assert.is_false(cancelled_ran)
    end)

    it("contains an error raised in a timer and logs it", function()
      local app, logs = client.app()
      assert(app:listen())
      local after = false
      app:after(0.01, function() error("timer-oops-55") end)
      app:after(0.05, function() after = true end)
      client.wait(app, function() return after end, 2, "the second timer")
      assert.truthy(client.find_log(logs, "timer-oops-55"), client.show_logs(logs))
    end)

    -- As browsers do with setTimeout: a runaway after(0) chain costs ~1 % of a core, not 100 %.
    it("after(0) re-armed from its own callback: the first 5 levels run in the next turns, deeper ones wait at least 4 ms", function()
      local app = client.app()
      assert(app:listen())
      local fired, times = 0, {}
      local function again()
        fired = fired + 1
        times[fired] = client.gettime()
        app:after(0, again)
      end
      app:after(0, again)
      client.wait(app, function() return fired >= 30 end, 5, "30 levels of the chain")
      -- the loop's clock is in milliseconds: each deeper level is at least 3 ms after the last
      for i = 8, 30 do
        assert.is_true(times[i] - times[i - 1] >= 0.003, ("level %d came %.4f s after level %d")
          :format(i, times[i] - times[i - 1], i - 1))
      end
      local t0, n0 = client.gettime(), fired
      client.run_for(app, 0.5)
      local rate = (fired - n0) / (client.gettime() - t0)
      assert.is_true(rate <= 260, ("%.0f callbacks per second"):format(rate))
      -- an after(0) armed outside a timer callback is not delayed
      local done
      app:after(0, function() done = client.gettime() end)
      local t1 = client.gettime()
      client.wait(app, function() return done end, 2, "a fresh after(0)")
      assert.is_true(done - t1 < 0.5)
    end)
  end)

  describe("stop and run", function()
    it("app:stop stops accepting connections; timers keep working with app:step", function()
      local app = client.app()
      app:get("/x", function() return "x" end)
      assert(app:listen())
      local port = app.port
      assert.are.equal(200, request(app, "GET", "/x").status)
      app:stop()
      app:step(0)
      local fired = false
      app:after(0.02, function() fired = true end)
      client.wait(app, function() return fired end, 2, "a timer after stop")
      local socket = require("socket")
      local s = socket.tcp4()
      s:settimeout(1)
      local ok, err = s:connect("127.0.0.1", port)
      s:close()
      assert.is_nil(ok, "still accepting connections after stop")
      assert.are.equal("connection refused", err)
    end)

    -- app:run blocks, so it runs in a child process that a timeout bounds, with this
    -- process's module paths (busted's lpath/cpath are not in the environment).
    local function run_child(script, signal)
      local file = os.tmpname()
      client.write_file(file, script)
      -- --foreground: timeout passes a signal it gets to the child only; without it, it
      -- also signals its whole process group, and that second SIGTERM could reach the
      -- child after app:run had returned and restored the default action (exit 143).
      local lua = ("LUA_PATH=%s LUA_CPATH=%s timeout --foreground 10 lua5.4 %s"):format(
        client.shell_quote(package.path), client.shell_quote(package.cpath), client.shell_quote(file))
      local cmd
      if signal then
        -- Signal only once the child's loop runs (it writes the marker from a timer inside
        -- app:run): before that the default action would kill it. Bounded: 10 s at most.
        local marker = os.tmpname()
        os.remove(marker)
        lua = "SSE_READY=" .. client.shell_quote(marker) .. " " .. lua
        cmd = ("%s & pid=$!; for i in $(seq 200); do [ -e %s ] && break; sleep 0.05; done; rm -f %s; kill -%s $pid; wait $pid; echo \"exit=$?\""):format(
          lua, client.shell_quote(marker), client.shell_quote(marker), signal)
      else
        cmd = ("%s; echo \"exit=$?\""):format(lua)
      end
      local t0 = client.gettime()
      local p = assert(io.popen(cmd .. " 2>&1"))
      local out = p:read("a")
      p:close()
      os.remove(file)
      return out, client.gettime() - t0
    end

    it("app:run serves until app:stop() and returns", function()
      local out, elapsed = run_child([[
        local sse = require("sse")
        local app = sse.app { port = 0, log = false }
        app:after(0.2, function() app:stop() end)
        app:run()
        print("run returned")
      ]])
      assert.truthy(out:find("run returned", 1, true), out)
      assert.truthy(out:find("exit=0", 1, true), out)
      assert.is_true(elapsed < 5, ("took %.1f s"):format(elapsed))
    end)

    it("app:run returns on SIGTERM and on SIGINT", function()
      for _, sig in ipairs { "TERM", "INT" } do
        local out = run_child([[
          local sse = require("sse")
          local app = sse.app { port = 0, log = false }
          app:after(0, function() io.open(os.getenv("SSE_READY"), "w"):close() end)
          app:run()
          print("run returned")
        ]], sig)
        assert.truthy(out:find("run returned", 1, true), "SIG" .. sig .. ": " .. out)
        assert.truthy(out:find("exit=0", 1, true), "SIG" .. sig .. ": " .. out)
      end
    end)
  end)
end)
