-- lua-http (cqueues) on the benchmark contract (see bench/README.md), on Lua 5.2: the one
-- version for which Debian 12 packages all of lua-http's dependencies (lua-fifo,
-- lua-compat53, lua-lpeg-patterns and lua-basexx stop at 5.2).
--   GET  /sub        every event published, as an SSE stream
--   POST /pub        the body becomes the data of one event sent to every subscriber; 204
--   GET  /count?n=K  K events "data: <i>", then the response ends
-- Usage: lua5.2 lua-http.lua [port]   (or PORT=...; 0 picks a free port). Prints "ready <port>".
--
-- Fan-out: the events of the last RING publishes sit in one Lua table; every subscriber
-- (a cqueues coroutine) waits on one condition that /pub signals, then writes everything
-- it has not sent as one chunk (lua-http flushes each chunk it writes).
local http_server = require("http.server")
local http_headers = require("http.headers")
local condition = require("cqueues.condition")

local RING = 16384           -- a subscriber further behind than this is dropped (~1.5 MB)
local ring, seq = {}, 0      -- ring[i % RING]: the frame of publish number i
local published = condition.new()

local function respond(stream, status, sse)
  local h = http_headers.new()
  h:append(":status", status)
  if sse then
    h:append("content-type", "text/event-stream")
    h:append("cache-control", "no-cache")
  end
  return stream:write_headers(h, not sse)
end

local function sub(stream)
  respond(stream, "200", true)
  local last = seq
  while true do
    if last == seq then
      published:wait()
    elseif seq - last > RING then
      io.stderr:write("lua-http: dropped slow subscriber: ", seq - last, " events behind\n")
      return stream:shutdown()
    else
      local batch = {}
      for i = last + 1, seq do
        batch[#batch + 1] = ring[i % RING]
      end
      last = seq
      if not stream:write_chunk(table.concat(batch), false) then
        return
      end
    end
  end
end

local function pub(stream)
  local body = stream:get_body_as_string() or ""
  seq = seq + 1
  ring[seq % RING] = "data: " .. body .. "\n\n"
  published:signal()   -- wakes every waiting subscriber
  respond(stream, "204", false)
end

local function count(stream, n)
  respond(stream, "200", true)
  for i = 1, n do
    if not stream:write_chunk("data: " .. i .. "\n\n", false) then
      return
    end
  end
  stream:write_chunk("", true)
end

local function onstream(_, stream)
  local req = stream:get_headers()
  local method, path = req:get(":method"), req:get(":path")
  if method == "GET" and path == "/sub" then
    return sub(stream)
  elseif method == "POST" and path == "/pub" then
    return pub(stream)
  elseif method == "GET" and path:match("^/count%?") then
    return count(stream, tonumber(path:match("[?&]n=(%d+)")) or 0)
  end
  respond(stream, "404", false)
end

local server = assert(http_server.listen({
  host = "127.0.0.1",
  port = tonumber(arg[1] or os.getenv("PORT") or 8080),
  onstream = onstream,
  -- a client that left is not an error worth a trace: note it and go on
  onerror = function(_, _, op, err)
    io.stderr:write("lua-http: ", tostring(op), ": ", tostring(err), "\n")
  end,
}))
assert(server:listen())
local _, _, port = server:localname()
io.stdout:write("ready ", port, "\n")
io.stdout:flush()
assert(server:loop())
