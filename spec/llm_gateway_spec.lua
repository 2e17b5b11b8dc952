-- The LLM example as a gateway (issue 10, item 6): examples/llm/server.lua with
-- UPSTREAM=http://host:port forwards POST /v1/chat/completions to an OpenAI-compatible
-- upstream. The upstream is the project's own LLM example running as another lua5.4
-- process (or, where the test must see what arrives upstream, an app in this process); the
-- gateway is a process too. Both start on port 0 and are read their printed URL.
local client = require("support.client")
local process = require("support.process")
local cjson = require("cjson")

local gettime = client.gettime
-- ---- processes (spec/support/process.lua) ----

local function start_process(script, env) return process.start(script, env) end
local function stop(proc) proc:kill("KILL") end
local function output(proc) return proc:output() end
-- What client.connect and client.wait need of an "app": a port, and a step (here: wait a
-- little, or step an in-process upstream app meanwhile).
local function remote(proc, app) return proc:app(app) end

local ENDPOINT = "/v1/chat/completions"
local function body(prompt, extra)
  local t = { model = "test-model", messages = { { role = "user", content = prompt } }, stream = true }
  for k, v in pairs(extra or {}) do t[k] = v end
  return cjson.encode(t)
end

-- POSTs to the endpoint; returns the client (raw bytes, events as parsed).
local function post(target, payload, headers)
  local h = { ["Content-Type"] = "application/json", Connection = "close" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return client.connect(target, ENDPOINT, { method = "POST", body = payload, headers = h })
end

local function whole(target, payload, headers, timeout)
  local c = post(target, payload, headers)
  local res
  client.wait(target, function()
    res = client.parse_response(c.raw, c.closed)
    return res and res.complete
  end, timeout or 10, "the whole answer", function() return c:describe() end)
  c:close()
  return res
end

-- The content pieces of a streamed answer, and what else it says.
local function tokens_of(events)
  local out, finish, done, ids = {}, nil, false, {}
  for _, ev in ipairs(events) do
    if ev.data == "[DONE]" then
      done = true
    else
      local chunk = cjson.decode(ev.data)
      ids[chunk.id] = true
      local choice = chunk.choices and chunk.choices[1]
      if choice then
        if choice.delta.content and choice.delta.content ~= "" then out[#out + 1] = choice.delta.content end
        if choice.finish_reason ~= cjson.null then finish = choice.finish_reason end
      end
    end
  end
  return out, finish, done, ids
end

describe("the LLM gateway", function()
  local up, gw

  before_each(function()
    up = start_process("examples/llm/server.lua", { TOKEN_DELAY = "0.01" })
    gw = start_process("examples/llm/server.lua", { UPSTREAM = up.url })
  end)

  after_each(function()
    client.cleanup()
    process.stop_all()
  end)

  it("relays a streamed completion token for token, as it arrives", function()
    local prompt = "Is the  gateway exact?"
    local direct = post(remote(up), body(prompt))
    local via = post(remote(gw), body(prompt))
    direct:wait_end(15)
    via:wait_end(15)
    assert.are.equal(200, via.res.status)
    assert.truthy(via.res.headers["content-type"]:find("text/event-stream", 1, true))
    local want, want_finish, want_done = tokens_of(direct.events)
    local got, finish, done, ids = tokens_of(via.events)
    assert.is_true(#want > 20)
    assert.are.same(want, got)
    assert.are.equal(want_finish, finish)
    assert.is_true(want_done and done)
    assert.are.equal("[DONE]", via.events[#via.events].data)
    assert.are.equal(#direct.events, #via.events)
    local n = 0
    for _ in pairs(ids) do n = n + 1 end
    assert.are.equal(1, n, "one completion id, the upstream's")
    -- not buffered: the events came spread over the upstream's pace (10 ms a token)
    local spread = via.event_times[#via.event_times] - via.event_times[1]
    assert.is_true(spread > 0.2, ("events spread over %.3f s"):format(spread))
  end)

  it("forwards a whole completion (stream: false), a 400 with its JSON body, and answers 502 when the upstream is gone", function()
    local direct = whole(remote(up), body("whole", { stream = false }))
    local via = whole(remote(gw), body("whole", { stream = false }))
    assert.are.equal(200, via.status)
    assert.are.equal("application/json", via.headers["content-type"])
    local a, b = cjson.decode(direct.body), cjson.decode(via.body)
    assert.are.equal("chat.completion", b.object)
    assert.are.equal(a.choices[1].message.content, b.choices[1].message.content)
    assert.are.same(a.usage, b.usage)

    for _, bad in ipairs({ cjson.encode({ model = "m", stream = true }), cjson.encode({ model = "m" }), "{not json" }) do
      local d = whole(remote(up), bad)
      local v = whole(remote(gw), bad)
      assert.are.equal(400, v.status, bad)
      assert.are.equal(d.body, v.body)
      assert.are.equal("application/json", v.headers["content-type"])
    end

    stop(up)
    for _, payload in ipairs({ body("gone"), body("gone", { stream = false }) }) do
      local v = whole(remote(gw), payload)
      assert.are.equal(502, v.status)
      assert.are.equal("bad_gateway", cjson.decode(v.body).error.code)
    end
  end)

  it("a client that stops reading ends the upstream's generation at once", function()
    stop(up)
    stop(gw)
    up = start_process("examples/llm/server.lua", { TOKEN_DELAY = "0.05" })
    gw = start_process("examples/llm/server.lua", { UPSTREAM = up.url })
    local via = post(remote(gw), body("stop me"))
    via:wait_events(6, 10)
    local at = gettime()
    via:close()
    local line
    client.wait(remote(up), function()
      line = output(up):match("the client left after (%d+) of (%d+) tokens")
      return line ~= nil
    end, 3, "the upstream's generator to notice", function() return output(up) end)
    local sent, total = output(up):match("the client left after (%d+) of (%d+) tokens")
    assert.is_true(tonumber(sent) < tonumber(total) / 2, output(up))
    assert.is_true(gettime() - at < 1.5)
  end)
end)

describe("the LLM gateway's upstream request", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
  end)

  it("carries the body, Authorization and OpenAI headers; the upstream's status and headers come back", function()
    local upapp = client.app({ heartbeat = false })
    local seen = {}
    upapp:post(ENDPOINT, function(req)
      seen[#seen + 1] = { headers = req.headers, body = req.body }
      return 429, { error = { message = "slow down", type = "rate_limit" } },
        { ["Retry-After"] = "7", ["X-Request-Id"] = "req-1", ["X-Ratelimit-Remaining-Requests"] = "0",
          ["X-Internal"] = "secret" }
    end)
    assert(upapp:listen())
    -- a base URL ending in /v1, as hosted APIs document theirs
    local gw = start_process("examples/llm/server.lua", { UPSTREAM = upapp.url .. "/v1" })
    local target = remote(gw, upapp)
    for _, stream in ipairs({ true, false }) do
      local payload = body("who am I", { stream = stream })
      local res = whole(target, payload, { Authorization = "Bearer sk-test", ["OpenAI-Organization"] = "org-1",
        Cookie = "session=private" })
      assert.are.equal(429, res.status)
      assert.are.equal("7", res.headers["retry-after"])
      assert.are.equal("req-1", res.headers["x-request-id"])
      assert.are.equal("0", res.headers["x-ratelimit-remaining-requests"])
      assert.is_nil(res.headers["x-internal"])
      assert.are.equal("slow down", cjson.decode(res.body).error.message)
      local got = seen[#seen]
      assert.are.equal(payload, got.body)
      assert.are.equal("Bearer sk-test", got.headers.authorization)
      assert.are.equal("org-1", got.headers["openai-organization"])
      assert.are.equal("application/json", got.headers["content-type"])
      assert.is_nil(got.headers.cookie, "cookies stay at the gateway")
    end
    assert.are.equal(2, #seen)
  end)

  it("sends UPSTREAM_API_KEY instead of the client's token when set", function()
    local upapp = client.app({ heartbeat = false })
    local auth
    upapp:post(ENDPOINT, function(req) auth = req.headers.authorization return { ok = true } end)
    assert(upapp:listen())
    local gw = start_process("examples/llm/server.lua", { UPSTREAM = upapp.url, UPSTREAM_API_KEY = "sk-gateway" })
    local res = whole(remote(gw, upapp), body("x", { stream = false }), { Authorization = "Bearer sk-client" })
    assert.are.equal(200, res.status)
    assert.are.equal("Bearer sk-gateway", auth)
  end)
end)
