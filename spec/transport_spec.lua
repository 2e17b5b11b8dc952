-- Transport: gzip that still streams, NDJSON, TLS, and the limits (max_connections,
-- max_body, oversized headers, malformed requests, unknown methods, queue_limit), each
-- answered clearly while a healthy stream alongside keeps receiving its events on time.
local client = require("support.client")
local cjson = require("cjson")

local gettime = client.gettime

local sh = require("support.client").sh

-- A stream that sends one event every `every` seconds, stamped with the send time; and
-- a check that its client got them on time (each within `slack` of being sent).
local function healthy(app, every)
  app:stream("/healthy", function(stream)
    for i = 1, 1000 do
      stream:send({ data = ("%d %.6f"):format(i, gettime()) })
      stream:sleep(every)
    end
  end)
end

local function assert_on_time(c, slack)
  assert.is_true(#c.events >= 2, c:describe())
  for i, ev in ipairs(c.events) do
    local sent = tonumber(ev.data:match(" (%S+)$"))
    local late = c.event_times[i] - sent
    assert.is_true(late < slack, ("event %d arrived %.3f s after it was sent"):format(i, late))
  end
end

-- The raw bytes of a request made with curl (headers kept out), for gzip checks.
local function raw_file()
  return os.tmpname()
end

describe("transport", function()
  after_each(function() client.cleanup() end)

  describe("gzip", function()
    it("compresses a stream for clients that accept it, and every event arrives before the next is sent", function()
      local app = client.app({ gzip = true, heartbeat = false })
      app:stream("/ev", function(stream)
        for i = 1, 4 do
          stream:send({ data = { n = i, text = "a JSON event that compresses" } })
          stream:sleep(0.3)
        end
      end)
      assert(app:listen())
      local cu = client.curl(app, "/ev", { args = "--compressed -i" })
      cu:wait_for(function(c) return select(2, c.content:gsub("\ndata: ", "")) >= 4 end, 5, "4 events")
      assert.truthy(cu.content:find("Content-Encoding: gzip", 1, true), cu.content)
      assert.truthy(cu.content:find("Vary: Accept-Encoding", 1, true), cu.content)
      -- each event was readable within 0.25 s of being sent, 0.3 s apart
      local seen = {}
      for _, snap in ipairs(cu.snapshots) do
        for n in snap.content:gmatch('"n":(%d)') do
          seen[tonumber(n)] = seen[tonumber(n)] or snap.t
        end
      end
      for i = 2, 4 do
        assert.truthy(seen[i] and seen[i - 1], "event " .. i)
        assert.is_true(seen[i] - seen[i - 1] > 0.2, "events arrived together: not streamed")
      end
    end)

    it("sends identity to clients that do not accept gzip (or refuse it with q=0)", function()
      local app = client.app({ gzip = true })
      app:stream("/ev", function(stream) stream:send("plain") end)
      assert(app:listen())
      for _, ae in ipairs({ false, "identity", "gzip;q=0" }) do
        local c = client.connect(app, "/ev", { headers = { ["Accept-Encoding"] = ae or nil } })
        c:wait_end(2)
        assert.is_nil(c.res.headers["content-encoding"])
        assert.are.equal("Accept-Encoding", c.res.headers["vary"])
        assert.are.same({ "plain" }, c:data())
      end
    end)

    it("makes one valid gzip member from own sends and shared channel events, ending with the trailer", function()
      local app = client.app({ heartbeat = false })
      local ch = app:channel("c")
      app:stream("/mix", function(stream)
        stream:subscribe(ch)
        stream:send({ data = "own 1" })
        stream:sleep(0.05)
        stream:send({ data = "own 2", event = "x" })
        app:after(0.3, function() stream:close() end)
      end, { gzip = true })
      assert(app:listen())
      local gz = raw_file()
      local plain = client.connect(app, "/mix", { headers = { ["Accept-Encoding"] = "identity" } })
      local cu = client.curl(app, "/mix", { args = "-H 'Accept-Encoding: gzip' -o " .. gz })
      client.wait(app, function() return ch.subscribers == 2 end, 3, "two subscribers")
      -- small events go through the stream's compressor, large ones (>= 1 KiB) are
      -- spliced in as their compressed twins: mix both, with own sends between
      for i = 1, 20 do
        local size = i % 3 == 0 and 400 * i or i
        ch:publish({ data = ("shared event %d: %s"):format(i, string.rep("abc", size)) })
        client.step(app, 0.005)
      end
      plain:wait_end(3)
      client.wait(app, function() return not cu:running() end, 3, "curl to finish")
      assert.are.equal("", sh("gzip -t " .. gz), "not a valid, complete gzip file")
      local unzipped = sh("zcat " .. gz)
      -- same events as the uncompressed client, shared ones included, in a valid stream
      local events = require("sse").parser():feed(unzipped)
      assert.are.equal(22, #events)
      local got, want = {}, {}
      for i, ev in ipairs(events) do got[i] = ev.data end
      for i, ev in ipairs(plain.events) do want[i] = ev.data end
      table.sort(got) table.sort(want)
      assert.are.same(want, got)
      os.remove(gz)
    end)

    it("compresses small channel events well (they share one compressor per stream)", function()
      local app = client.app({ gzip = true, heartbeat = false })
      local ch = app:channel("prices", { history = 0 })
      app:stream("/prices", ch)
      assert(app:listen())
      local gz, plain = raw_file(), raw_file()
      local a = client.curl(app, "/prices", { args = "-H 'Accept-Encoding: gzip' -o " .. gz, max_time = 3 })
      local b = client.curl(app, "/prices", { args = "-o " .. plain, max_time = 3 })
      client.wait(app, function() return ch.subscribers == 2 end, 3, "two subscribers")
      for i = 1, 200 do
        ch:publish({ event = "price", data = { symbol = "ACME", price = 100 + i % 7 } })
        client.step(app, 0.002)
      end
      app:stop()
      client.wait(app, function() return not a:running() and not b:running() end, 3, "curl to finish")
      local zsize = #io.open(gz, "rb"):read("a")
      local psize = #io.open(plain, "rb"):read("a")
      assert.are.equal("", sh("gzip -t " .. gz))
      assert.are.equal(sh("cat " .. plain), sh("zcat " .. gz))
      assert.is_true(zsize < psize / 2, ("gzip %d bytes, plain %d"):format(zsize, psize))
      os.remove(gz) os.remove(plain)
    end)

    it("negotiates gzip whatever the order of Accept-Encoding", function()
      local app = client.app({ gzip = true })
      app:stream("/ev", function(stream) stream:send("x") end)
      assert(app:listen())
      local cases = { ["*;q=0, gzip"] = "gzip", ["gzip, *;q=0"] = "gzip", ["*"] = "gzip",
                      ["identity, *;q=0"] = false, ["br, gzip;q=0"] = false }
      for ae, want in pairs(cases) do
        local c = client.connect(app, "/ev", { headers = { ["Accept-Encoding"] = ae } })
        c:wait_head(2)
        assert.are.equal(want or nil, c.res.headers["content-encoding"], ae)
        c:close()
      end
      local head = client.request(app, "HEAD", "/ev", { headers = { ["Accept-Encoding"] = "gzip" } })
      assert.are.equal("gzip", head.headers["content-encoding"])
      assert.are.equal("Accept-Encoding", head.headers["vary"])
    end)
  end)

  describe("NDJSON", function()
    it("streams one JSON object per line from generators, application/x-ndjson", function()
      local app = client.app({ heartbeat = false })
      app:stream("/nd", function(stream)
        stream:send({ data = { token = " hi" } })
        stream:send({ data = "line\nbreak \"quoted\"", event = "e", id = 7 })
        stream:send({ data = 42 })
      end, { format = "ndjson" })
      assert(app:listen())
      local c = client.connect(app, "/nd", { accept = "application/x-ndjson" })
      c:wait_end(2)
      assert.are.equal("application/x-ndjson", c.res.headers["content-type"])
      local lines = {}
      for line in c.body:gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
      assert.are.equal(3, #lines, c.body)
      assert.are.same({ data = { token = " hi" } }, cjson.decode(lines[1]))
      assert.are.same({ data = 'line\nbreak "quoted"', event = "e", id = "7" }, cjson.decode(lines[2]))
      assert.are.same({ data = 42 }, cjson.decode(lines[3]))
    end)

    it("carries channel events with their ids, and heartbeats are blank lines", function()
      local app = client.app()
      local ch = app:channel("c")
      local first = ch:publish({ data = { n = 1 } })
      app:stream("/nd", ch, { format = "ndjson", heartbeat = 0.1 })
      assert(app:listen())
      local c = client.connect(app, "/nd?lastEventId=" .. first:gsub("%d+$", "0"))
      c:wait_for(function(x) return x.body:find('"n":1', 1, true) end, 2)
      local second = ch:publish("two")
      c:wait_for(function(x) return x.body:find('"two"', 1, true) end, 2)
      c:wait_for(function(x) return x.body:find("}\n\n", 1, true) end, 2, "a blank heartbeat line")
      local objs = {}
      for line in c.body:gmatch("([^\n]+)") do objs[#objs + 1] = cjson.decode(line) end
      assert.are.same({ id = first, data = { n = 1 } }, objs[1])
      assert.are.same({ id = second, data = "two" }, objs[2])
    end)
  end)

  describe("TLS", function()
    local dir, cert, key
    setup(function()
      dir = client.tmpdir()
      cert, key = dir .. "/cert.pem", dir .. "/key.pem"
      local out = sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s -days 1 " ..
        "-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"):format(key, cert))
      assert(io.open(cert), out)
    end)
    teardown(function() client.rmdir(dir) end)

    it("serves HTTPS streams that curl --cacert verifies, and sees hang-ups", function()
      local app = client.app({ tls = { cert = cert, key = key }, heartbeat = false })
      local closed_at
      app:stream("/ev", function(stream)
        stream:on_close(function() closed_at = gettime() end)
        for i = 1, 3 do stream:send("secure " .. i) end
        stream:sleep(30)
      end)
      assert(app:listen())
      assert.truthy(app.url:find("^https://127%.0%.0%.1:"))
      local cu = client.curl(app, "/ev", { args = "--cacert " .. cert, max_time = 2 })
      cu:wait_for(function(c) return c.content:find("secure 3", 1, true) end, 3, "3 events over TLS")
      cu:kill()
      local killed = gettime()
      client.wait(app, function() return closed_at ~= nil end, 2, "on_close after the client left")
      assert.is_true(closed_at - killed < 1)
    end)

    it("ends TLS streams cleanly on stop", function()
      local app = client.app({ tls = { cert = cert, key = key }, heartbeat = false })
      app:stream("/ev", function(stream) stream:send("x") stream:sleep(30) end)
      assert(app:listen())
      local cu = client.curl(app, "/ev", { args = "--cacert " .. cert .. " -w '\\nexit-ok'" })
      cu:wait_for(function(c) return c.content:find("data: x", 1, true) end, 3)
      app:stop()
      cu:wait_for(function(c) return not c:running() end, 3, "curl to end")
      assert.truthy(cu:read():find("exit-ok", 1, true), "curl saw an error: " .. cu.content)
    end)

    it("reports a missing or bad certificate from listen", function()
      local ok, err, code = client.app({ tls = { cert = dir .. "/none.pem", key = key } }):listen()
      assert.is_nil(ok)
      assert.truthy(err:find("none.pem", 1, true), err)
      assert.are.equal("ENOENT", code)
      ok, err = client.app({ tls = { cert = key, key = cert } }):listen()
      assert.is_nil(ok)
      assert.truthy(err:find("TLS", 1, true), err)
      assert.has_error(function() client.app({ tls = { cert = cert } }) end)
    end)
  end)

  describe("limits, with a healthy stream alongside", function()
    it("queues clients past max_connections in the backlog while existing streams flow", function()
      local app = client.app({ max_connections = 2, heartbeat = false })
      healthy(app, 0.1)
      app:stream("/hold", function(stream) stream:sleep(30) end)
      assert(app:listen())
      local h = client.connect(app, "/healthy")
      local hold = client.connect(app, "/hold")
      hold:wait_head(2)
      local waiting = client.connect(app, "/hold")
      client.run_for(app, 0.5)
      assert.is_nil(waiting.res, "a third client was served past max_connections")
      hold:close()
      waiting:wait_head(2)   -- served once a slot is free
      assert_on_time(h, 0.08)
    end)

    it("answers 413 to a body past max_body", function()
      local app = client.app({ max_body = 1000, heartbeat = false })
      healthy(app, 0.1)
      app:post("/in", function(req) return tostring(#req.body) end)
      assert(app:listen())
      local h = client.connect(app, "/healthy")
      local res = client.request(app, "POST", "/in", { body = string.rep("x", 5000) })
      assert.are.equal(413, res.status)
      assert.are.equal("1000", client.request(app, "POST", "/in", { body = string.rep("x", 1000) }).body)
      client.run_for(app, 0.3)
      assert_on_time(h, 0.08)
    end)

    it("answers 431 to oversized headers and 400 to malformed ones", function()
      local app = client.app({ heartbeat = false })
      healthy(app, 0.1)
      app:get("/x", function() return "ok" end)
      assert(app:listen())
      local h = client.connect(app, "/healthy")
      local big = client.request(app, "GET", "/x", { headers = { ["X-Big"] = string.rep("a", 40000) } })
      assert.are.equal(431, big.status)
      local sock = require("socket").tcp()
      assert(sock:connect("127.0.0.1", app.port))
      sock:send("GET /x HTTP/1.1\r\nHost: a\r\nNot a header line\r\n\r\n")
      sock:settimeout(0)
      local got = ""
      client.wait(app, function()
        local d, _, partial = sock:receive(4096)
        got = got .. (d or partial or "")
        return got:find("\r\n\r\n", 1, true) ~= nil
      end, 2, "an answer to a malformed request")
      sock:close()
      assert.truthy(got:find("^HTTP/1%.1 400"), got)
      client.run_for(app, 0.2)
      assert_on_time(h, 0.08)
    end)

    it("takes a stream request with 8 KB of headers under the default options", function()
      local app = client.app({ heartbeat = false })
      local bus = app:channel("big")
      app:stream("/s", bus)
      assert(app:listen())
      local headers = {
        Cookie = "session=" .. string.rep("c", 6000),
        ["X-Trace"] = string.rep("t", 2000),
        ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
      }
      local c = client.connect(app, "/s", { headers = headers })
      c:wait_head(2)
      assert.are.equal(200, c.res.status)
      -- The stream then idles (its send buffer is handed back to the kernel) and still
      -- takes events, in order, after that.
      client.run_for(app, 0.1)
      for i = 1, 3 do bus:publish({ data = "e" .. i }) end
      client.wait(app, function() c:pump(); return #c.events == 3 end, 2, "3 events")
      assert.are.same({ "e1", "e2", "e3" }, { c.events[1].data, c.events[2].data, c.events[3].data })
      local again = client.connect(app, "/s", { headers = { Cookie = string.rep("z", 40000) } })
      again:wait_head(2)
      assert.are.equal(431, again.res.status)
    end)

    it("sends an HTTP/1.0 client its stream unchunked, ended by closing", function()
      local app = client.app({ heartbeat = false })
      app:stream("/n", function(stream)
        for i = 1, 200 do stream:send(string.rep("x", 100) .. i) end
      end)
      assert(app:listen())
      local c = client.connect(app, "/n", { version = "1.0" })
      client.wait(app, function() c:pump(); return c.closed end, 5, "the stream to end")
      assert.are.equal(200, c.res.status)
      assert.is_nil(c.res.headers["transfer-encoding"])
      assert.are.equal(200, #c.events)
      assert.are.equal(string.rep("x", 100) .. "200", c.events[200].data)
    end)

    it("answers 405 with Allow for a known path, 501 for a method no route uses", function()
      local app = client.app({ heartbeat = false })
      healthy(app, 0.1)
      app:get("/x", function() return "ok" end)
      app:route("PURGE", "/cache", function() return "purged" end)
      assert(app:listen())
      local h = client.connect(app, "/healthy")
      local r = client.request(app, "DELETE", "/x")
      assert.are.equal(405, r.status)
      assert.are.equal("GET, HEAD", r.headers["allow"])
      assert.are.equal(501, client.request(app, "FROB", "/x").status)
      assert.are.equal(405, client.request(app, "PURGE", "/x").status)   -- a method we use
      assert.are.equal(404, client.request(app, "PURGE", "/nowhere").status)
      assert.are.equal("purged", client.request(app, "PURGE", "/cache").body)
      client.run_for(app, 0.2)
      assert_on_time(h, 0.08)
    end)

    it("drops a client past queue_limit and logs it, while the healthy stream flows", function()
      local app, logs = client.app({ queue_limit = 64 * 1024, heartbeat = false })
      healthy(app, 0.1)
      local ch = app:channel("big", { history = 0 })
      app:stream("/big", ch)
      assert(app:listen())
      local h = client.connect(app, "/healthy")
      client.connect(app, "/big", { read = false, rcvbuf = 4096 })
      client.wait(app, function() return ch.subscribers == 1 end)
      local chunk = string.rep("y", 16000)
      client.wait(app, function()
        ch:publish(chunk)
        return ch.subscribers == 0
      end, 10, "the slow client dropped")
      assert.truthy(client.find_log(logs, "dropped slow client", "queue_limit 65536"), client.show_logs(logs))
      client.run_for(app, 0.3)
      assert_on_time(h, 0.08)
    end)
  end)
end)
