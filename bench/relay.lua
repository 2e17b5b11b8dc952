-- The relay on the benchmark contract (bench/README.md), in front of an upstream that
-- implements it (bench/servers/lua-sse.lua): bench/relay.sh runs loadgen against both.
--   GET  /sub    relayed from UPSTREAM/sub (sse.relay): one upstream request per client,
--                or with SHARED=1 one for all of them (fan-in through a channel)
--   POST /pub    forwarded to UPSTREAM/pub (a handler that waits on app:fetch, so the
--                publisher is answered once the upstream has taken the event)
-- (No /count: a relayed stream that ends is reconnected, as EventSource does.)
-- Usage: UPSTREAM=http://127.0.0.1:P [SHARED=1] lua5.4 bench/relay.lua [port]
-- Prints "ready <port>" once listening.
local sse = require("sse")
local relay = require("sse.relay")

local UPSTREAM = assert(os.getenv("UPSTREAM"), "UPSTREAM=http://host:port")
local SHARED = os.getenv("SHARED") == "1"
local port = tonumber(arg[1] or os.getenv("PORT") or 8081)

local app = sse.app({
  port = port,
  heartbeat = false,
  max_connections = 1000000,
  connection_memory = 3072,    -- as the upstream bench server: a fair per-stream cost
  log = function(level, msg)
    if level ~= "info" then io.stderr:write("relay: ", level, ": ", msg, "\n") end
  end,
})

-- gzip off: loadgen does not ask for it, and the upstream sends plain text too
relay.route(app, "/sub", UPSTREAM .. "/sub", { shared = SHARED, gzip = false, history = 0 })

app:post("/pub", function(req)
  local res, err = app:fetch(UPSTREAM .. "/pub", { method = "POST", body = req.body or "" })
  if not res then return 502, err end
  return res.status
end)

assert(app:listen())
io.stdout:write("ready ", app.port, "\n")
io.stdout:flush()
app:run()
