-- A finite stream: the numbers 1 to 100, one per second, then the stream ends.
--   lua5.4 examples/counter.lua      then open the printed URL
-- Each client gets its own generator. A browser's EventSource reconnects whenever a
-- stream ends, so the last event says "done" and the page closes its EventSource;
-- a client that reconnects anyway with Last-Event-ID 100 gets 204, which tells
-- EventSource to stop for good.
local sse = require("sse")

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
})
local LAST = tonumber(os.getenv("COUNT_TO")) or 100
local DELAY = tonumber(os.getenv("COUNT_DELAY")) or 1

app:before(function(req)
  -- Resume after the last number seen; nothing left means 204: "stop reconnecting".
  if req.path == "/count" and tonumber(req.last_event_id or "") == LAST then
    return 204
  end
end)

app:stream("/count", function(stream, req)
  local from = (tonumber(req.last_event_id or "") or 0) + 1
  for i = from, LAST do
    if not stream:send({ id = i, data = i }) then return end
    if i < LAST then stream:sleep(DELAY) end
  end
  stream:send({ event = "done", data = "counted to " .. LAST })
end)

local page = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lua-sse counter</title>
<style>
  body { font: 16px system-ui, sans-serif; margin: 2em auto; max-width: 40em; }
  ol { columns: 5; font-family: ui-monospace, monospace; }
  #state { color: #777; }
</style></head>
<body>
  <h1>Counting to LAST</h1>
  <p id="state">connecting…</p>
  <ol id="list"></ol>
  <script>
    const list = document.getElementById("list"), state = document.getElementById("state");
    const es = new EventSource("/count");
    es.onmessage = (e) => {
      const li = document.createElement("li");
      li.textContent = e.data;
      list.appendChild(li);
      state.textContent = "received " + e.data;
    };
    es.addEventListener("done", (e) => {
      es.close();                       // the stream ended on purpose: do not reconnect
      state.textContent = e.data + " — stream closed";
    });
    es.onerror = () => { if (es.readyState !== EventSource.CLOSED) state.textContent = "reconnecting…"; };
  </script>
</body></html>
]]

app:get("/", function()
  return 200, (page:gsub("LAST", tostring(LAST))), { ["Content-Type"] = "text/html; charset=utf-8" }
end)

assert(app:listen())
print("counter: open " .. app.url .. "/  (stream: " .. app.url .. "/count)")
app:run()
