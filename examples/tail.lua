-- Prints the events of a Server-Sent Events stream as they arrive, like `curl -N` but as
-- a browser's EventSource would see them (reconnects with Last-Event-ID, honours retry:,
-- stops on 204).
--   lua5.4 examples/tail.lua http://127.0.0.1:8080/events [max_events]
-- A plain script: no routes, no port; the app's loop only drives the client.
local sse = require("sse")

local url, max = arg[1], tonumber(arg[2])
if not url then
  io.stderr:write("usage: lua5.4 examples/tail.lua URL [max_events]\n")
  os.exit(2)
end

local app = sse.app({ log = false })
local done, failure = false, nil

app:spawn(function()
  local src = app:eventsource(url)
  local n = 0
  while true do
    local ev, err = src:next()
    if not ev then failure = err break end
    n = n + 1
    io.write(("%s\tid=%s\t%s\n"):format(ev.event, ev.id, ev.data))
    io.stdout:flush()
    if max and n >= max then src:close() break end
  end
  done = true
end)

while not done do app:step(1) end
if failure and not max then
  io.stderr:write("tail: ", failure, "\n")
  os.exit(1)
end
