-- lua-sse hosted inside a cqueues program: one coroutine of the controller waits on the
-- app's descriptor (app:pollfd) with app:timeout() as its deadline, then runs a turn.
--   lua5.4 examples/embed/cqueues.lua      then: curl -N http://127.0.0.1:8080/tick
-- The host's own work here: a cqueues coroutine that counts every 250 ms, reported by
-- /host. Ctrl-C (SIGINT) or SIGTERM stops the app cleanly, then the host.
local cqueues = require("cqueues")
local sse = require("sse")

local app = sse.app({ port = tonumber(os.getenv("PORT")) or 8080, heartbeat = false })
local ticks = 0

app:stream("/tick", function(stream)
  for i = 1, math.huge do
    if not stream:send({ data = tostring(i) }) then return end
    app:sleep(0.1)
  end
end)
app:get("/host", function() return { host_ticks = ticks } end)

assert(app:listen())
app:catch_signals()
print("cqueues host: " .. app.url .. "/tick")
io.stdout:flush()

-- What cqueues.poll waits on: anything with pollfd(), events() and timeout().
local waitable = {
  pollfd = function() return app:pollfd() end,
  events = function() return "r" end,
  timeout = function() return app:timeout() end,
}

local cq = cqueues.new()
cq:wrap(function()
  while app.listening do
    cqueues.poll(waitable)
    app:step(0)
  end
end)
cq:wrap(function()
  while app.listening do
    cqueues.sleep(0.25)
    ticks = ticks + 1
  end
end)
assert(cq:loop())
print("cqueues host: stopped")
