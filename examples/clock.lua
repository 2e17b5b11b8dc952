-- The classic demo: the server's time, every second, to every connected client.
--   lua5.4 examples/clock.lua        then open the printed URL
-- Every client gets the same tick from one timer; CORS is open ("*") so a page served
-- from anywhere can listen to /clock.
local sse = require("sse")

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
  cors = "*",
})

local clients = {}   -- stream -> true

app:stream("/clock", function(stream)
  clients[stream] = true
  stream:on_close(function() clients[stream] = nil end)
  stream:send({ event = "tick", id = os.time(), data = os.date("!%Y-%m-%dT%H:%M:%SZ") })
  -- Nothing else to do here: the timer below sends to every client. Keep the stream
  -- open until the client leaves.
  while stream:sleep(3600) do end
end)

app:every(1, function()
  local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
  for stream in pairs(clients) do
    stream:send({ event = "tick", id = os.time(), data = now })
  end
end)

local page = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lua-sse clock</title>
<style>
  body { font: 16px system-ui, sans-serif; margin: 3em auto; max-width: 32em; text-align: center; }
  #time { font: 600 2.6em ui-monospace, monospace; margin: .6em 0; }
  #state { color: #777; }
</style></head>
<body>
  <h1>lua-sse clock</h1>
  <div id="time">--:--:--</div>
  <div id="state">connecting…</div>
  <script>
    const time = document.getElementById("time"), state = document.getElementById("state");
    const es = new EventSource("/clock");
    es.addEventListener("tick", (e) => {
      time.textContent = new Date(e.data).toLocaleTimeString();
      state.textContent = "live, event id " + e.lastEventId;
    });
    es.onopen = () => { state.textContent = "connected"; };
    es.onerror = () => { state.textContent = "reconnecting…"; };
  </script>
</body></html>
]]

app:get("/", function()
  return 200, page, { ["Content-Type"] = "text/html; charset=utf-8" }
end)

assert(app:listen())
print("clock: open " .. app.url .. "/  (stream: " .. app.url .. "/clock)")
app:run()
