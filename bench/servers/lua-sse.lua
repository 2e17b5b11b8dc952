-- lua-sse on the benchmark contract (see bench/README.md):
--   GET  /sub        every event published, as an SSE stream
--   POST /pub        the body becomes the data of one event sent to every subscriber; 204
--   GET  /count?n=K  K events "data: <i>" (i = 1..K) on this connection, then the stream ends
-- Usage: lua5.4 bench/servers/lua-sse.lua [port]   (or PORT=...; 0 picks a free port)
-- Prints "ready <port>" once listening.
local sse = require("sse")

local port = tonumber(arg[1] or os.getenv("PORT") or 8080)

local app = sse.app({
  port = port,
  heartbeat = false,           -- no comment lines in the measurements
  max_connections = 1000000,   -- capped by the descriptor limit: as many as the process can hold
  -- libmicrohttpd's per-connection pool: request headers + send buffer. 3 KiB still takes a
  -- browser request with a 1 KB cookie, and an idle subscriber then costs < 9 KiB of RSS
  -- (the pool is most of a connection's memory; the library default is 16 KiB).
  connection_memory = 3072,
  log = function(level, msg)   -- warnings and errors only (dropped slow clients show up here)
    if level ~= "info" then
      io.stderr:write("lua-sse: ", level, ": ", msg, "\n")
    end
  end,
})

-- No history: the benchmark measures live fan-out, not replay.
local bus = app:channel("bench", { history = 0 })
app:stream("/sub", bus)

app:post("/pub", function(req)
  bus:publish({ data = req.body or "" })
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
