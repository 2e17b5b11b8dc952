-- The examples run as they are: each is started as its own process (as a user would run
-- it, on a free port) and checked with curl, the way a person would try it.
local socket = require("socket")

local sh = require("support.client").sh

local running = {}

-- Starts examples/<name>.lua with env vars; returns its base URL once it printed it.
local function start(name, env)
  local out = os.tmpname()
  local vars = "PORT=0"
  for k, v in pairs(env or {}) do vars = vars .. " " .. k .. "=" .. v end
  local cmd = ("LUA_PATH=%q LUA_CPATH=%q %s stdbuf -oL lua5.4 examples/%s.lua > %s 2>&1 & echo $!")
    :format(package.path, package.cpath, vars, name, out)
  local pid = assert(tonumber(sh(cmd)))
  running[#running + 1] = { pid = pid, out = out }
  local deadline = socket.gettime() + 5
  while socket.gettime() < deadline do
    local f = io.open(out)
    local text = f and f:read("a") or ""
    if f then f:close() end
    local url = text:match("(http://127%.0%.0%.1:%d+)")
    if url then return url, pid end
    socket.sleep(0.02)
  end
  error("examples/" .. name .. ".lua printed no URL: " .. sh("cat " .. out))
end

local function alive(pid)
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

local function stop_all()
  for _, p in ipairs(running) do
    os.execute("kill " .. p.pid .. " 2>/dev/null")
    os.remove(p.out)
  end
  running = {}
end

describe("examples", function()
  after_each(stop_all)

  it("hello.lua streams greetings one per second", function()
    local url = start("hello")
    local t0 = socket.gettime()
    local body = sh(("curl -sN --max-time 1.6 %s/events"):format(url))
    assert.truthy(body:find("event: greeting\ndata: hello 1\n\n", 1, true), body)
    assert.truthy(body:find("data: hello 2\n\n", 1, true), body)
    assert.falsy(body:find("hello 4", 1, true), "sent faster than one per second: " .. body)
    assert.is_true(socket.gettime() - t0 >= 1.5)
  end)

  it("tail.lua prints the events of another example's stream as EventSource sees them", function()
    local url = start("hello")
    local out = sh(("LUA_PATH=%q LUA_CPATH=%q timeout 10 lua5.4 examples/tail.lua %s/events 2")
      :format(package.path, package.cpath, url))
    assert.truthy(out:find("greeting\tid=\thello 1\n", 1, true), out)
    assert.truthy(out:find("greeting\tid=\thello 2\n", 1, true), out)
  end)

  it("clock.lua ticks every second to every client, with CORS *, and serves its page", function()
    local url, pid = start("clock")
    local a = os.tmpname()
    -- two clients at once get the same ticks
    os.execute(("curl -sN -i --max-time 2.5 %s/clock > %s &"):format(url, a))
    local body = sh(("curl -sN --max-time 2.5 %s/clock"):format(url))
    socket.sleep(0.2)
    local ticks = select(2, body:gsub("event: tick\n", ""))
    assert.is_true(ticks >= 2 and ticks <= 4, body)
    local f = io.open(a); local other = f:read("a"); f:close(); os.remove(a)
    assert.truthy(other:find("Access-Control-Allow-Origin: *", 1, true), other)
    assert.truthy(other:find("Content-Type: text/event-stream", 1, true), other)
    assert.is_true(select(2, other:gsub("event: tick\n", "")) >= 2, other)
    local page = sh(("curl -s %s/"):format(url))
    assert.truthy(page:find('new EventSource("/clock")', 1, true), page)
    -- Ctrl-C / SIGTERM stops it cleanly
    os.execute("kill -TERM " .. pid)
    local deadline = socket.gettime() + 5
    while alive(pid) and socket.gettime() < deadline do socket.sleep(0.05) end
    assert.is_false(alive(pid), "clock.lua still running after SIGTERM")
  end)

  it("counter.lua counts, ends cleanly, and tells a reconnecting client to stop", function()
    local url = start("counter", { COUNT_TO = 5, COUNT_DELAY = 0.05 })
    local raw = sh(("curl -sN --raw --max-time 5 %s/count"):format(url))
    for i = 1, 5 do
      assert.truthy(raw:find(("id: %d\ndata: %d\n\n"):format(i, i), 1, true), raw)
    end
    assert.truthy(raw:find("event: done\ndata: counted to 5\n\n", 1, true), raw)
    assert.truthy(raw:find("\r\n0\r\n\r\n$"), "no clean final chunk: " .. raw)
    -- a browser reconnects after the end with the last id: 204 makes it stop for good
    local head = sh(("curl -si -H 'Last-Event-ID: 5' %s/count"):format(url))
    assert.truthy(head:find("^HTTP/1.1 204"), head)
    -- resuming in the middle continues after the given id
    local rest = sh(("curl -sN --max-time 5 -H 'Last-Event-ID: 3' %s/count"):format(url))
    assert.falsy(rest:find("data: 3\n", 1, true), rest)
    assert.truthy(rest:find("id: 4\ndata: 4\n\n", 1, true), rest)
    local page = sh(("curl -s %s/"):format(url))
    assert.truthy(page:find("es.close()", 1, true), page)
  end)
end)
