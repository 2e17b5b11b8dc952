-- The smallest complete lua-sse program: open the printed URL in a browser, or
--   curl -N http://127.0.0.1:8080/events
local sse = require("sse")
local app = sse.app({ port = tonumber(os.getenv("PORT")) or 8080 })

app:stream("/events", function(stream)
  for i = 1, 10 do
    stream:send({ event = "greeting", data = "hello " .. i })
    stream:sleep(1)
  end
end)

assert(app:listen())
print("hello: " .. app.url .. "/events")
app:run()
