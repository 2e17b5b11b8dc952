-- lua-sse on the benchmark contract (see bench/README.md):
--   GET  /sub        every event published, as an SSE stream
--   POST /pub        the body becomes the data of one event sent to every subscriber; 204
--   GET  /count?n=K  K events "data: <i>" (i = 1..K) on this connection, then the stream ends
-- Usage: lua5.4 bench/servers/lua-sse.lua [port]   (or PORT=...; 0 picks a free port)
-- Prints "ready <port>" once listening.
-- BROKER=redis://host:port puts the channel in Redis (docs/broker.md): /pub then waits
-- for Redis before its 204 (503 when Redis is unavailable). WORKERS=N (needs BROKER)
-- runs N worker processes on the port; the one started only supervises them, so the
-- work is its children's (bench/broker.sh measures them). Without either: one process,
-- the channel in memory. HISTORY=N keeps N events per channel (default 0, the contract).
local sse = require("sse")

local port = tonumber(arg[1] or os.getenv("PORT") or 8080)
local broker = os.getenv("BROKER")
if broker == "" then broker = nil end
local workers = tonumber(os.getenv("WORKERS") or "")
local history = tonumber(os.getenv("HISTORY") or "") or 0

local app = sse.app({
  port = port,
  heartbeat = false,           -- no comment lines in the measurements
  max_connections = 1000000,   -- capped by the descriptor limit: as many as the process can hold
  -- Otherwise the defaults (connection_memory among them): users run the defaults.
  broker = broker,
  workers = workers,
  log = function(level, msg)   -- warnings and errors only (dropped slow clients show up here)
    if level ~= "info" then
      io.stderr:write("lua-sse: ", level, ": ", msg, "\n")
    end
  end,
})

-- No history (unless HISTORY): the benchmark measures live fan-out, not replay.
local bus = app:channel("bench", { history = history })
app:stream("/sub", bus)

app:post("/pub", function(req)
  -- in memory this returns at once; with a broker it waits for Redis (nil, err when down)
  local id, err = bus:publish({ data = req.body or "" })
  if not id then return 503, tostring(err) end
  return 204
end)

app:stream("/count", function(stream, req)
  local n = math.tointeger(tonumber(req.query.n)) or 0
  for i = 1, n do
    -- send yields while the client is behind, so a slow reader never grows the queue.
    if not stream:send(tostring(i)) then
      return
    end
  end
end)

assert(app:listen())
io.stdout:write("ready ", app.port, "\n")
io.stdout:flush()
app:run()
