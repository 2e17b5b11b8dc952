-- lua-sse hosted inside a luv (libuv) program: the app's loop is one descriptor in libuv's
-- (app:pollfd) and one libuv timer (app:timeout); no polling, no thread.
--   lua5.4 examples/embed/luv.lua      then: curl -N http://127.0.0.1:8080/tick
-- The host's own work here: a libuv timer that counts every 250 ms and a /host route
-- that reports it. Ctrl-C (SIGINT) or SIGTERM stops the app cleanly, then the host.
local uv = require("luv")
local sse = require("sse")

local app = sse.app({ port = tonumber(os.getenv("PORT")) or 8080, heartbeat = false })
local ticks = 0   -- the host's work, done by libuv

app:stream("/tick", function(stream)
  for i = 1, math.huge do
    if not stream:send({ data = tostring(i) }) then return end
    app:sleep(0.1)
  end
end)
app:get("/host", function() return { host_ticks = ticks } end)

assert(app:listen())
app:catch_signals()
print("luv host: " .. app.url .. "/tick")
io.stdout:flush()

local poll = uv.new_poll(app:pollfd())
local wake = uv.new_timer()
local work = uv.new_timer()

-- One turn of the app, then libuv waits again: on the descriptor, or until app:timeout().
local function drive()
  app:step(0)
  if not app.listening then       -- stopped by a signal: the host goes too
    poll:stop()
    wake:stop()
    work:stop()
    poll:close()
    wake:close()
    work:close()
    return
  end
  wake:stop()
  local t = app:timeout()
  if t then wake:start(math.ceil(t * 1000), 0, drive) end
end

poll:start("r", drive)
work:start(250, 250, function() ticks = ticks + 1 end)
drive()
uv.run()
print("luv host: stopped")
