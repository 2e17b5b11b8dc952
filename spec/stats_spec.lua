-- Figures (issue 12, item 1): app:stats() counts what the server does, and app:metrics()
-- serves them in the Prometheus text format, checked by Prometheus's own promtool.
local client = require("support.client")

describe("app:stats and app:metrics", function()
  after_each(function() client.cleanup() end)

  it("counts connections, streams, subscribers, events, bytes, publishes, drops and requests", function()
    local app = client.app({ heartbeat = false, queue_limit = 16384 })
    local news = app:channel("news")
    app:stream("/news", news)
    app:stream("/gen", function(stream)
      for i = 1, 3 do stream:send("g" .. i) end
      app:sleep(30)   -- stays open
    end)
    app:get("/ping", function() return "pong" end)
    assert(app:listen())
    local s0 = app:stats()
    assert.are.equal(0, s0.streams)
    assert.are.equal(1, s0.channels)
    assert.is_true(s0.uptime >= 0)
    local a, b = client.connect(app, "/news"), client.connect(app, "/news")
    local g = client.connect(app, "/gen")
    client.wait(app, function() return app:stats().subscribers == 2 end, 3, "two subscribers")
    assert.are.equal(3, app:stats().streams)
    for i = 1, 5 do news:publish("n" .. i) end
    a:wait_events(5)
    b:wait_events(5)
    g:wait_events(3)
    assert.are.equal(200, client.request(app, "GET", "/ping").status)
    local st = app:stats()
    assert.are.equal(5, st.publishes)
    assert.are.same({ { name = "news", subscribers = 2, publishes = 5, history = 100 } }, st.channel_list)
    -- 5 events to 2 subscribers, 3 from the generator, and each stream's first ":ok"
    assert.are.equal(5 * 2 + 3 + 3, st.events_sent)
    assert.is_true(st.bytes_sent >= #a.body + #b.body, st.bytes_sent)
    assert.is_true(st.requests >= 4)
    assert.is_true(st.connections >= 3)
    -- a client that stops reading is dropped and counted
    local slow = client.connect(app, "/news", { read = false, rcvbuf = 4096 })
    client.wait(app, function() return app:stats().subscribers == 3 end, 3, "the slow subscriber")
    local big = ("x"):rep(4000)
    client.wait(app, function()
      news:publish(big)
      return app:stats().dropped_slow >= 1
    end, 10, "the slow client to be dropped")
    slow:close()
    a:close(); b:close(); g:close()
    client.wait(app, function() return app:stats().streams == 0 end, 3, "every stream closed")
  end)

  it("heartbeats are counted apart from events", function()
    local app = client.app({ heartbeat = 0.1 })
    app:stream("/s", function(stream) stream:send("x") app:sleep(5) end)
    assert(app:listen())
    local c = client.connect(app, "/s")
    c:wait_events(1)
    client.wait(app, function() return app:stats().heartbeats >= 3 end, 3, "three heartbeats")
    assert.are.equal(2, app:stats().events_sent)   -- the first ":ok" and "x"
  end)

  it("app:metrics serves valid Prometheus text (promtool check metrics)", function()
    local app = client.app({ heartbeat = false })
    local ch = app:channel('odd "name"\\x')
    app:stream("/s", ch)
    app:metrics("/metrics")
    assert(app:listen())
    local c = client.connect(app, "/s")
    c:wait_head()
    ch:publish("x")
    c:wait_events(1)
    local res = client.request(app, "GET", "/metrics")
    assert.are.equal(200, res.status)
    assert.truthy(res.headers["content-type"]:find("text/plain; version=0.0.4", 1, true))
    assert.truthy(res.body:find("\nsse_streams 1\n", 1, true), res.body)
    assert.truthy(res.body:find('sse_channel_publishes_total{channel="odd \\"name\\"\\\\x"} 1', 1, true), res.body)
    assert.truthy(res.body:find("# TYPE sse_events_sent_total counter", 1, true))
    if not client.sh("command -v promtool"):match("promtool") then
      pending("promtool is not installed (Debian's prometheus package; scripts/setup.sh installs it)")
      return
    end
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(res.body)
    f:close()
    local out = client.sh("promtool check metrics < " .. path .. "; echo status=$?")
    os.remove(path)
    assert.truthy(out:find("status=0", 1, true), out)
  end)

  -- Issue 18, part 5: names clients choose (rooms, presence keys and info) reach the
  -- figures; the text stays valid for Prometheus and every name reads back as it was.
  it("channel names and presence from clients (quotes, newlines, braces, HTML, invalid "
    .. "UTF-8) keep app:metrics valid, each name read back by a Prometheus text parser", function()
    local app = client.app({ heartbeat = false })
    app:stream("/rooms/:room", function(stream, req)
      local ch = app:channel(req.params.room)
      stream:subscribe(ch, false)
      stream:join(ch, req.query.user, { info = req.query.info })
    end)
    app:metrics("/metrics")
    assert(app:listen())
    local names = {
      'a"b', "x\ny", "{}", "<img src=x onerror=alert(1)>", "back\\slash", "日本語 ✓",
      "bad\xff\xfe-utf8", "cr\rhere", '"} 1\nfake_metric{x="y"} 2', "# HELP sse_streams lies",
      "\\\"\\n",
    }
    local function pct(s)
      return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
    end
    local clients = {}  -- luacheck: ignore (kept open while the page is checked)
    for i, name in ipairs(names) do
      clients[i] = client.connect(app, ("/rooms/%s?user=%s&info=%s"):format(pct(name), pct(name), pct(name)))
    end
    client.wait(app, function() return app:stats().subscribers == #names end, 5, "every room subscribed")
    for _, name in ipairs(names) do   -- the names arrived as they were sent
      assert.are.equal(1, app:channel(name).subscribers, name)
      assert.are.same({ [name] = { info = name } }, app:channel(name):presence())
    end
    local res = client.request(app, "GET", "/metrics")
    assert.are.equal(200, res.status)
    -- A small parser of the text format's samples: name{label="value",...} number, with
    -- \\ \" \n the only escapes in a value.
    local function parse(text)
      local samples = {}
      for line in text:gmatch("[^\n]+") do
        if line:sub(1, 1) ~= "#" then
          local metric, rest = line:match("^([%a_:][%w_:]*)(.*)$")
          assert(metric, "not a sample line: " .. line)
          local labels, i = {}, 1
          if rest:sub(1, 1) == "{" then
            i = 2
            while rest:sub(i, i) ~= "}" do
              local lname = rest:match("^([%a_][%w_]*)=\"", i)
              assert(lname, "bad label in: " .. line)
              i = i + #lname + 2
              local value = {}
              while true do
                local c = rest:sub(i, i)
                assert(c ~= "", "unterminated label value in: " .. line)
                if c == "\\" then
                  local e = rest:sub(i + 1, i + 1)
                  value[#value + 1] = assert(({ ["\\"] = "\\", ['"'] = '"', n = "\n" })[e], "bad escape in: " .. line)
                  i = i + 2
                elseif c == '"' then
                  i = i + 1
                  break
                else
                  value[#value + 1] = c
                  i = i + 1
                end
              end
              labels[lname] = table.concat(value)
              if rest:sub(i, i) == "," then i = i + 1 end
            end
            i = i + 1
          end
          local number = rest:sub(i):match("^ (%-?[%d%.e+]+)$")
          assert(number, "bad value in: " .. line)
          samples[#samples + 1] = { metric = metric, labels = labels, value = tonumber(number) }
        end
      end
      return samples
    end
    local seen = {}
    for _, sample in ipairs(parse(res.body)) do
      assert.is_true(sample.metric:find("^sse_") ~= nil, sample.metric)
      if sample.metric == "sse_channel_subscribers" then
        seen[sample.labels.channel] = sample.value
      end
    end
    for _, name in ipairs(names) do
      -- Prometheus takes UTF-8 only: an invalid byte reads back as U+FFFD
      local want = name:gsub("[\xfe\xff]", "\u{FFFD}")
      assert.are.equal(1, seen[want], want)
    end
    assert.are.equal(#names, (function() local n = 0 for _ in pairs(seen) do n = n + 1 end return n end)())
    if not client.sh("command -v promtool"):match("promtool") then
      pending("promtool is not installed (Debian's prometheus package; scripts/setup.sh installs it)")
      return
    end
    local path = os.tmpname()
    client.write_file(path, res.body)
    local out = client.sh("promtool check metrics < " .. path .. "; echo status=$?")
    os.remove(path)
    assert.truthy(out:find("status=0", 1, true), out .. "\n" .. res.body)
  end)
end)
