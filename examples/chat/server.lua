-- A chat: rooms are channels, presence is published to them, and a page that loses its
-- connection gets back exactly the messages it missed.
--   lua5.4 examples/chat/server.lua        then open the printed URL (in two windows)
--
--   GET  /sse/subscribe?user=ann&topics=lobby,dev   the rooms' events (EventSource)
--   POST /rooms/:room/messages   {"user": "ann", "text": "hi"}  -> 201 {"id": "42"}
--   GET  /rooms/:room/users      who is online: {"room": "lobby", "online": {"ann": 1}}
--   POST /admin/kick?user=ann    closes ann's open streams (her pages reconnect)
--
-- Events on the stream: chat messages (the default "message" type, with an id), "join"
-- and "leave" (with an id), "presence" (sent to this client only, no id: who is online in
-- a room right now), and "gap" when messages the client missed are no longer kept.
-- Environment: PORT, HOST, RETRY (ms before a browser reconnects), HISTORY (messages
-- kept per room for replay), REDIS (e.g. redis://127.0.0.1:6379: rooms, history and
-- who is online live in Redis, shared by every process), WORKERS (processes on one port;
-- more than 1 needs REDIS).
--   REDIS=redis://127.0.0.1:6379 WORKERS=2 lua5.4 examples/chat/server.lua
local sse = require("sse")

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
  retry = math.tointeger(tonumber(os.getenv("RETRY"))) or 500,  -- reconnect fast
  broker = os.getenv("REDIS"),
  workers = math.tointeger(tonumber(os.getenv("WORKERS"))),
})
local HISTORY = math.tointeger(tonumber(os.getenv("HISTORY"))) or 100
local MAX_TOPICS, MAX_TEXT = 10, 2000

-- ---- validation ----

local function valid_name(s)
  return type(s) == "string" and #s >= 1 and #s <= 32 and s:find("^[A-Za-z0-9_%-]+$") ~= nil
end

local NAME_RULE = "1 to 32 letters, digits, '_' or '-'"

-- user and rooms of a subscription, or nil and why not.
local function parse_subscription(query)
  if not valid_name(query.user) then
    return nil, "query parameter 'user' must be " .. NAME_RULE
  end
  local rooms, seen = {}, {}
  for room in ((query.topics or "") .. ","):gmatch("([^,]*),") do
    if not valid_name(room) then
      return nil, "query parameter 'topics' must be a comma-separated list of room names, each "
        .. NAME_RULE
    end
    if not seen[room] then
      seen[room] = true
      rooms[#rooms + 1] = room
    end
  end
  if #rooms > MAX_TOPICS then
    return nil, "query parameter 'topics' may name at most " .. MAX_TOPICS .. " rooms"
  end
  return query.user, rooms
end

-- {user, text} from a request's JSON body (req:json()), or nil and why not.
local function parse_message(req)
  local ok, msg = pcall(req.json, req)   -- a refusal (bad JSON, no body) is ours to word
  if not ok or type(msg) ~= "table" or msg[1] ~= nil then
    return nil, 'the body must be a JSON object {"user": ..., "text": ...}'
  end
  if not valid_name(msg.user) then
    return nil, "field 'user' must be a string of " .. NAME_RULE
  end
  local text = msg.text
  if type(text) ~= "string" then
    return nil, "field 'text' must be a string"
  end
  local len = utf8.len(text)
  if not len then
    return nil, "field 'text' must be valid UTF-8"
  end
  if len < 1 or len > MAX_TEXT then
    return nil, "field 'text' must have 1 to " .. MAX_TEXT .. " characters"
  end
  return msg.user, text
end

local function bad_request(message)
  return 400, { error = message }
end

-- ---- rooms and presence ----

-- A room is its channel: app:channel gives the same one while it exists, and frees a room
-- nobody is in and nothing holds (so names posted to once do not pile up). Without REDIS a
-- room whose history holds messages stays until max_channels needs its place; with REDIS
-- the history is in Redis, and the room is read from there when it is used again.
local function room(name)
  return app:channel(name, { history = HISTORY })
end

local streams = {}    -- stream -> true, for the moderation endpoint

-- Who is online is the rooms' presence (stream:join): every process's, with REDIS. A
-- "join" is published when a user's first stream joins, a "leave" when the last leaves.
local function join(stream)
  for _, name in ipairs(stream.rooms) do
    local ch = room(name)
    local before = ch:presence() or {}
    stream:join(ch, stream.user, 1)
    if not before[stream.user] then
      ch:publish({ event = "join", data = { room = name, user = stream.user } })
    end
  end
end

local function leave(stream)
  -- from on_close, which cannot wait (publishing to Redis does): in a coroutine of its own
  app:spawn(function()
    for _, name in ipairs(stream.rooms) do
      local ch = room(name)
      stream:leave(ch)
      local now = ch:presence()
      if now and not now[stream.user] then
        ch:publish({ event = "leave", data = { room = name, user = stream.user } })
      end
    end
  end)
end

-- ---- routes ----

app:before(function(req)
  if req.path == "/sse/subscribe" then
    local user, err = parse_subscription(req.query)
    if not user then
      return bad_request(err)
    end
  end
end)

app:stream("/sse/subscribe", function(stream, req)
  stream.user, stream.rooms = parse_subscription(req.query)
  -- Resume every room from the one id the browser sends back (ids are app-wide).
  for _, name in ipairs(stream.rooms) do
    stream:subscribe(room(name), req.last_event_id)
  end
  -- The replay goes out when the generator yields: let it go first, so that the presence
  -- snapshots below come after every older join and leave and are what the page keeps.
  if not stream:sleep(0) then
    return
  end
  join(stream)
  streams[stream] = true
  stream:on_close(function()
    streams[stream] = nil
    leave(stream)
  end)
  for _, name in ipairs(stream.rooms) do
    stream:send({ event = "presence", data = { room = name, online = room(name):presence() or {} } })
  end
  -- Returning keeps the stream open: it is subscribed.
end)

app:post("/rooms/:room/messages", function(req)
  local name = req.params.room
  if not valid_name(name) then
    return bad_request("room names are " .. NAME_RULE)
  end
  local user, text = parse_message(req)
  if not user then
    return bad_request(text)
  end
  local id, err = room(name):publish({ data = { room = name, user = user, text = text,
                                                time = os.date("!%Y-%m-%dT%H:%M:%SZ") } })
  if not id then
    return 503, { error = err }   -- Redis is away; the page may try again
  end
  return 201, { id = id }
end)

app:get("/rooms/:room/users", function(req)
  local name = req.params.room
  if not valid_name(name) then
    return bad_request("room names are " .. NAME_RULE)
  end
  local online, err = room(name):presence()
  if not online then
    return 503, { error = err }
  end
  return { room = name, online = online }
end)

app:post("/admin/kick", function(req)
  local user = req.query.user
  if not valid_name(user) then
    return bad_request("query parameter 'user' must be " .. NAME_RULE)
  end
  local kicked = 0
  for stream in pairs(streams) do
    if stream.user == user then
      stream:close()
      kicked = kicked + 1
    end
  end
  return { kicked = kicked }
end)

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local page = assert(io.open(here .. "/index.html", "rb")):read("a")

app:get("/", function()
  return 200, page, { ["Content-Type"] = "text/html; charset=utf-8" }
end)

assert(app:listen())
print("chat: open " .. app.url .. "/")
app:run()
