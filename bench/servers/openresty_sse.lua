-- OpenResty-style handlers (nginx + ngx_lua, LuaJIT) for the benchmark contract, loaded by
-- openresty.sh from its content_by_lua blocks. What OpenResty users hand-write:
--   /count  ngx.print + ngx.flush(true) per event
--   /sub    one worker holds the events of the last RING publishes in a Lua table; each
--           subscriber sleeps on an ngx.semaphore that /pub posts once per waiter, then
--           prints everything it has not sent and flushes once.
-- A semaphore rather than polling ngx.shared with ngx.sleep: polling puts up to one sleep
-- interval into every latency and wakes every subscriber 1/interval times a second even
-- when nothing is published. A Lua table suffices as nginx runs one worker (nginx-lib.sh).
local semaphore = require("ngx.semaphore")

local M = {}
local RING = 16384           -- a subscriber further behind than this is dropped (~1.5 MB)
local ring, seq = {}, 0      -- ring[i % RING]: the frame of publish number i
local wake = semaphore.new(0)

local function sse_head()
  ngx.header.content_type = "text/event-stream"
  ngx.header.cache_control = "no-cache"
end

function M.pub()
  ngx.req.read_body()
  seq = seq + 1
  ring[seq % RING] = "data: " .. (ngx.req.get_body_data() or "") .. "\n\n"
  local waiting = -wake:count()   -- a negative count is the number of waiting threads
  if waiting > 0 then
    wake:post(waiting)
  end
  return ngx.exit(204)
end

function M.sub()
  -- notice a client that leaves while its subscriber sleeps
  ngx.on_abort(function() ngx.exit(499) end)
  sse_head()
  ngx.send_headers()
  ngx.flush(true)
  local last, batch = seq, {}
  while true do
    if last == seq then
      wake:wait(3600)
    elseif seq - last > RING then
      ngx.log(ngx.WARN, "dropped slow subscriber: ", seq - last, " events behind")
      return ngx.exit(ngx.OK)
    else
      local n = 0
      for i = last + 1, seq do
        n = n + 1
        batch[n] = ring[i % RING]
      end
      for i = n + 1, #batch do batch[i] = nil end
      last = seq
      ngx.print(batch)              -- one buffer for the whole batch
      if not ngx.flush(true) then   -- waits until the socket took it all
        return
      end
    end
  end
end

function M.count()
  local n = tonumber(ngx.var.arg_n) or 0
  sse_head()
  for i = 1, n do
    ngx.print("data: ", i, "\n\n")
    if not ngx.flush(true) then
      return
    end
  end
end

return M
