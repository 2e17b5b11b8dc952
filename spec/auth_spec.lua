-- examples/auth.lua as a user runs it: started as its own process on a free port and
-- driven with curl (cookie jars, Last-Event-ID, ?token=), the way a person would try it.
-- Session cookie: 401 without it, login, a stream with it, logout ends open streams, and
-- a reconnect after logout gets 204. Scoped tokens: 401 missing or unknown, 403 for
-- another topic or once expired (TOKEN_TTL is set short for that), a stream with a valid one.
local socket = require("socket")
local cjson = require("cjson")
local sse = require("sse")

local sh = require("support.client").sh

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

local running, tmpfiles = {}, {}

local function tmpname()
  local t = os.tmpname()
  tmpfiles[#tmpfiles + 1] = t
  return t
end

-- Starts examples/auth.lua with env vars; returns its base URL once it printed it.
local function start(env)
  local out = tmpname()
  local vars = "PORT=0"
  for k, v in pairs(env or {}) do vars = vars .. " " .. k .. "=" .. v end
  local cmd = ("LUA_PATH=%q LUA_CPATH=%q %s stdbuf -oL lua5.4 examples/auth.lua > %s 2>&1 & echo $!")
    :format(package.path, package.cpath, vars, out)
  local pid = assert(tonumber(sh(cmd)))
  running[#running + 1] = pid
  local deadline = socket.gettime() + 5
  while socket.gettime() < deadline do
    local url = slurp(out):match("(http://127%.0%.0%.1:%d+)")
    if url then return url end
    socket.sleep(0.02)
  end
  error("examples/auth.lua printed no URL: " .. slurp(out))
end

local function stop_all()
  for _, pid in ipairs(running) do os.execute("kill " .. pid .. " 2>/dev/null") end
  for _, t in ipairs(tmpfiles) do os.remove(t) end
  running, tmpfiles = {}, {}
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- One request with curl. opts: method, headers (list of "Name: value"), data (body),
-- json (a table sent as JSON), jar (cookie jar file: read and written), cookie (a
-- "name=value" sent as is). Returns { status, headers (lower-case), body, raw }.
local function http(url, opts)
  opts = opts or {}
  local args = { "curl -si --max-time 5" }
  if opts.method then args[#args + 1] = "-X " .. opts.method end
  for _, h in ipairs(opts.headers or {}) do args[#args + 1] = "-H " .. q(h) end
  if opts.json then
    args[#args + 1] = "-H 'Content-Type: application/json' --data-binary " .. q(cjson.encode(opts.json))
  elseif opts.data then
    args[#args + 1] = "--data-binary " .. q(opts.data)
  end
  if opts.jar then args[#args + 1] = ("-b %s -c %s"):format(opts.jar, opts.jar) end
  if opts.cookie then args[#args + 1] = "-b " .. q(opts.cookie) end
  args[#args + 1] = q(url)
  local raw = sh(table.concat(args, " "))
  local head, body = raw:match("^(.-)\r\n\r\n(.*)$")
  assert(head, "no HTTP response from curl: " .. raw)
  local res = { status = tonumber(head:match("^HTTP/1%.1 (%d+)")), headers = {}, body = body, raw = raw }
  for name, value in head:gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do
    res.headers[name:lower()] = value
  end
  return res
end

-- Reads a stream for `seconds` with curl -N; returns the events (as a browser would
-- dispatch them) and the raw body.
local function stream(url, seconds, opts)
  opts = opts or {}
  local args = { ("curl -sN --max-time %s"):format(seconds) }
  for _, h in ipairs(opts.headers or {}) do args[#args + 1] = "-H " .. q(h) end
  if opts.jar then args[#args + 1] = "-b " .. opts.jar end
  args[#args + 1] = q(url)
  local body = sh(table.concat(args, " "))
  return sse.parser():feed(body), body
end

local function sid_of(res)
  return (res.headers["set-cookie"] or ""):match("^sid=([^;]*)")
end

local function login(url, jar)
  local res = http(url .. "/login", { json = { user = "demo", password = "demo" }, jar = jar })
  assert.are.equal(200, res.status, res.raw)
  return res
end

describe("examples/auth.lua", function()
  after_each(stop_all)

  describe("session cookie", function()
    it("refuses /events without a session, with 401 and a clear message, before any stream", function()
      local url = start()
      local res = http(url .. "/events")
      assert.are.equal(401, res.status, res.raw)
      assert.truthy(res.body:find("not logged in", 1, true), res.raw)
      assert.are_not.equal("text/event-stream", res.headers["content-type"])
      res = http(url .. "/events", { cookie = "sid=0123456789abcdef0123456789abcdef" })
      assert.are.equal(401, res.status, "an unknown session id: " .. res.raw)
      res = http(url .. "/me")
      assert.are.equal(401, res.status, res.raw)
    end)

    it("refuses a wrong password and sets no cookie", function()
      local url = start()
      local res = http(url .. "/login", { json = { user = "demo", password = "nope" } })
      assert.are.equal(401, res.status, res.raw)
      assert.is_nil(res.headers["set-cookie"], res.raw)
      res = http(url .. "/login", { data = "user=root&password=demo" })
      assert.are.equal(401, res.status, res.raw)
      res = http(url .. "/login", { json = { user = "demo" } })
      assert.are.equal(401, res.status, "no password: " .. res.raw)
    end)

    it("logs in with JSON or a form: an HttpOnly, SameSite=Lax cookie with a random id", function()
      local url = start()
      local jar = tmpname()
      local res = login(url, jar)
      local cookie = res.headers["set-cookie"]
      assert.truthy(cookie:find("HttpOnly", 1, true), cookie)
      assert.truthy(cookie:find("SameSite=Lax", 1, true), cookie)
      assert.truthy(cookie:find("Path=/", 1, true), cookie)
      local sid1 = sid_of(res)
      assert.truthy(sid1 and sid1:match("^%x+$") and #sid1 >= 32, cookie)
      assert.are.equal("demo", cjson.decode(res.body).user)
      assert.are.equal("demo", cjson.decode(http(url .. "/me", { jar = jar }).body).user)
      -- a plain HTML form post (urlencoded) is sent back to the page
      res = http(url .. "/login", { data = "user=demo&password=demo" })
      assert.are.equal(303, res.status, res.raw)
      assert.are.equal("/", res.headers.location)
      local sid2 = sid_of(res)
      assert.truthy(sid2 and #sid2 >= 32, res.raw)
      assert.are_not.equal(sid1, sid2)
    end)

    it("streams the logged-in user's events, several per second, each with an id", function()
      local url = start({ INTERVAL = 0.1 })
      local jar = tmpname()
      login(url, jar)
      local events, body = stream(url .. "/events", 0.8, { jar = jar })
      assert.is_true(#events >= 4 and #events <= 10, body)
      for i, ev in ipairs(events) do
        assert.are.equal("tick", ev.event)
        assert.are.equal(tostring(i), ev.id)
        local d = cjson.decode(ev.data)
        assert.are.equal("demo", d.user)
        assert.are.equal(i, d.n)
      end
      -- a reconnect while logged in resumes after Last-Event-ID
      events, body = stream(url .. "/events", 0.3, { jar = jar, headers = { "Last-Event-ID: 41" } })
      assert.is_true(#events >= 1, body)
      assert.are.equal("42", events[1].id, body)
    end)

    it("logout ends open streams, and the browser's reconnect gets 204 so it stops", function()
      local url = start({ INTERVAL = 0.05 })
      local jar = tmpname()
      login(url, jar)
      -- an open stream (curl in the background, raw chunks, exit code at the end)
      local out = tmpname()
      os.execute(("(curl -sN --raw --max-time 5 -b %s %s > %s 2>/dev/null; echo \"rc=$?\" >> %s) &")
        :format(jar, q(url .. "/events"), out, out))
      local deadline = socket.gettime() + 3
      while not slurp(out):find("id: 2\n", 1, true) and socket.gettime() < deadline do socket.sleep(0.02) end
      assert.truthy(slurp(out):find("id: 2\n", 1, true), "stream did not start: " .. slurp(out))
      local keep = tmpname()   -- the browser still has the old cookie when it reconnects
      assert(os.execute(("cp %s %s"):format(jar, keep)))

      local t0 = socket.gettime()
      local res = http(url .. "/logout", { method = "POST", jar = jar })
      assert.are.equal(200, res.status, res.raw)
      assert.truthy(res.headers["set-cookie"]:find("Max-Age=0", 1, true), res.raw)
      -- the open stream ends cleanly at once (final chunk), well before curl's 5 s
      deadline = socket.gettime() + 3
      while not slurp(out):find("rc=", 1, true) and socket.gettime() < deadline do socket.sleep(0.02) end
      local raw = slurp(out)
      assert.truthy(raw:find("rc=0", 1, true), "stream still open after logout: " .. raw)
      assert.truthy(raw:find("\r\n0\r\n\r\nrc=0"), "no clean final chunk: " .. raw)
      assert.is_true(socket.gettime() - t0 < 2, "stream took too long to end")

      -- EventSource reconnects with the old cookie and Last-Event-ID: 204, stop for good
      local last = raw:match(".*id: (%d+)\n")
      res = http(url .. "/events", { jar = keep, headers = { "Last-Event-ID: " .. last } })
      assert.are.equal(204, res.status, res.raw)
      assert.are.equal("", res.body)
      -- the query-parameter form of a resume is a reconnect too
      res = http(url .. "/events?lastEventId=" .. last, { jar = keep })
      assert.are.equal(204, res.status, res.raw)
      -- a first request (no Last-Event-ID) with the revoked cookie is told to log in
      res = http(url .. "/events", { jar = keep })
      assert.are.equal(401, res.status, res.raw)
      res = http(url .. "/me", { jar = keep })
      assert.are.equal(401, res.status, res.raw)
    end)
  end)

  describe("scoped token", function()
    local function token(url, jar, topic)
      local res = http(url .. "/tokens", { json = { topic = topic }, jar = jar })
      assert.are.equal(201, res.status, res.raw)
      local t = cjson.decode(res.body)
      assert.truthy(t.token:match("^%x+$") and #t.token >= 32, res.body)
      assert.are.equal("/feed/" .. topic .. "?token=" .. t.token, t.url)
      return t.token
    end

    it("is issued only to a logged-in user, for a valid topic", function()
      local url = start()
      local res = http(url .. "/tokens", { json = { topic = "news" } })
      assert.are.equal(401, res.status, res.raw)
      local jar = tmpname()
      login(url, jar)
      token(url, jar, "news")
      res = http(url .. "/tokens", { data = "topic=sports", jar = jar })
      assert.are.equal(201, res.status, "form body: " .. res.raw)
      res = http(url .. "/tokens", { json = { topic = "../x" }, jar = jar })
      assert.are.equal(400, res.status, res.raw)
    end)

    it("401 when missing or unknown, 403 for another topic; a valid token streams its topic", function()
      local url = start({ INTERVAL = 0.1 })
      local jar = tmpname()
      login(url, jar)
      local tok = token(url, jar, "news")

      local res = http(url .. "/feed/news")
      assert.are.equal(401, res.status, res.raw)
      assert.truthy(res.body:find("token", 1, true), res.raw)
      res = http(url .. "/feed/news?token=")
      assert.are.equal(401, res.status, res.raw)
      res = http(url .. "/feed/news?token=" .. ("0"):rep(32))
      assert.are.equal(401, res.status, res.raw)
      res = http(url .. "/feed/sports?token=" .. tok)
      assert.are.equal(403, res.status, res.raw)
      assert.truthy(res.body:find("/feed/news only", 1, true), res.raw)

      -- no cookie needed: the token alone opens its topic
      local events, body = stream(url .. "/feed/news?token=" .. tok, 0.6)
      assert.is_true(#events >= 3, body)
      for i, ev in ipairs(events) do
        assert.are.equal("item", ev.event)
        assert.are.equal(tostring(i), ev.id)
        local d = cjson.decode(ev.data)
        assert.are.same({ "news", "demo", i }, { d.topic, d.user, d.n })
      end
    end)

    it("403 once expired; a stream opened in time outlives its token", function()
      local url = start({ TOKEN_TTL = 1, INTERVAL = 0.05 })
      local jar = tmpname()
      login(url, jar)
      local early = token(url, jar, "news")
      local late = token(url, jar, "news")
      local out = tmpname()
      local t0 = socket.gettime()
      os.execute(("curl -sN --max-time 2 %s > %s 2>/dev/null &"):format(q(url .. "/feed/news?token=" .. early), out))
      socket.sleep(1.3)
      local res = http(url .. "/feed/news?token=" .. late)
      assert.are.equal(403, res.status, res.raw)
      assert.truthy(res.body:find("expired", 1, true), res.raw)
      res = http(url .. "/feed/news?token=" .. early)
      assert.are.equal(403, res.status, "a new connection with the early token: " .. res.raw)
      -- the stream opened before expiry kept going past it
      local deadline = t0 + 4
      while socket.gettime() < deadline and not slurp(out):find("n\":30", 1, true) do socket.sleep(0.05) end
      local events = sse.parser():feed(slurp(out))
      assert.is_true(#events >= 30, "stream stopped at the token's expiry: " .. slurp(out))
    end)

    it("logout revokes the session's tokens: a reconnect gets 204, a new connection 401", function()
      local url = start({ INTERVAL = 0.05 })
      local jar = tmpname()
      login(url, jar)
      local tok = token(url, jar, "news")
      local out = tmpname()
      os.execute(("(curl -sN --raw --max-time 5 %s > %s 2>/dev/null; echo \"rc=$?\" >> %s) &")
        :format(q(url .. "/feed/news?token=" .. tok), out, out))
      local deadline = socket.gettime() + 3
      while not slurp(out):find("id: 2\n", 1, true) and socket.gettime() < deadline do socket.sleep(0.02) end
      assert.truthy(slurp(out):find("id: 2\n", 1, true), slurp(out))
      assert.are.equal(200, http(url .. "/logout", { method = "POST", jar = jar }).status)
      deadline = socket.gettime() + 3
      while not slurp(out):find("rc=", 1, true) and socket.gettime() < deadline do socket.sleep(0.02) end
      assert.truthy(slurp(out):find("\r\n0\r\n\r\nrc=0"), "feed still open after logout: " .. slurp(out))
      local res = http(url .. "/feed/news?token=" .. tok, { headers = { "Last-Event-ID: 2" } })
      assert.are.equal(204, res.status, res.raw)
      res = http(url .. "/feed/news?token=" .. tok)
      assert.are.equal(401, res.status, res.raw)
    end)
  end)

  it("serves a page with a login form and an EventSource", function()
    local url = start()
    local res = http(url .. "/")
    assert.are.equal(200, res.status)
    assert.truthy(res.headers["content-type"]:find("text/html", 1, true))
    assert.truthy(res.body:find('action="/login"', 1, true), res.body)
    assert.truthy(res.body:find("new EventSource(", 1, true), res.body)
  end)
end)
