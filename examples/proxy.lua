-- An SSE proxy: every GET is relayed to the same path (and query) on UPSTREAM, event by
-- event, gzip for clients that accept it; a client's Last-Event-ID goes upstream, a drop of
-- the upstream is reconnected transparently, an upstream that cannot answer gives 502.
--   UPSTREAM=http://127.0.0.1:9000 lua5.4 examples/proxy.lua     then curl -N the printed URL
-- SHARED=1: the clients of one upstream URL share one upstream connection (fan-in, with
-- replay of the last HISTORY events, default 100). PORT (8080), HOST (127.0.0.1).
local sse = require("sse")
local relay = require("sse.relay")

local UPSTREAM = (os.getenv("UPSTREAM") or ""):gsub("/+$", "")
if not UPSTREAM:match("^https?://") then
  io.stderr:write("usage: UPSTREAM=http://host:port lua5.4 examples/proxy.lua\n")
  os.exit(2)
end

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
})

relay.route(app, "/*", function(req)
  -- the client's credentials go along (a cookie, a bearer token), if it sent any
  return UPSTREAM .. relay.target(req),
    { Cookie = req.headers.cookie, Authorization = req.headers.authorization }
end, { shared = os.getenv("SHARED") == "1", history = tonumber(os.getenv("HISTORY")) })

assert(app:listen())
print("proxy: " .. app.url .. "/ -> " .. UPSTREAM .. "/")
app:run()
