-- Presence: who is in a channel. stream:join(ch, key [, info]) announces a stream until
-- it closes or stream:leave(ch); ch:presence() lists { [key] = info } of every process.
--
-- Each process keeps its own members (a key may be joined by several of its streams: two
-- tabs of one user count once, and leave when the last one goes). Without a broker that
-- is the whole answer. With one, each process writes its members of a channel to a Redis
-- hash of its own, "<prefix>:pp:<channel>:<process>", whose TTL (the broker option
-- presence_ttl, 30 s) it refreshes every third of it, and lists its process in the set
-- "<prefix>:pp:<channel>": presence() reads every live process's hash (one script), so a
-- crashed process's members expire with its hash (at most TTL seconds later), and the set
-- forgets it.
--
-- ch:presence_events(true): joins and leaves (a key new to, or gone from, this process's
-- members of the channel) are published to the channel as `join` / `leave` events with
-- data { key = ..., info = ... }.
local core = require("sse.core")
local cjson = require("cjson")

local M = {}


-- The app a channel belongs to (channels are made by app:channel, which registers them).
local owner = setmetatable({}, { __mode = "k" })

-- The script that lists a channel's members in every live process: the set of
-- processes, each one's hash (a process whose hash has expired is dropped from the set).
local LIST = [[
local out = {}
for _, proc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', KEYS[1] .. ':' .. proc)
  if #h == 0 then
    redis.call('SREM', KEYS[1], proc)
  else
    for i = 1, #h do out[#out + 1] = h[i] end
  end
end
return out
]]

local function process_id()
  local f = io.open("/proc/self/stat")
  local pid = f and f:read("a"):match("^(%d+)") or tostring(math.random(1, 1e9))
  if f then f:close() end
  return ("%d-%s-%d"):format(os.time(), pid, math.random(1, 1e9))
end

-- The presence state of an app: one per app, made on first use.
local function state(app)
  local st = app._presence
  if not st then
    st = { channels = {}, proc = nil, refresh = nil }
    app._presence = st
  end
  return st
end

local function members_of(st, name)
  local m = st.channels[name]
  if not m then
    m = { keys = {}, streams = setmetatable({}, { __mode = "k" }) }
    st.channels[name] = m
  end
  return m
end

local function redis_keys(app, st, name)
  st.proc = st.proc or process_id()
  local set = app._broker_prefix .. ":pp:" .. name
  return set, set .. ":" .. st.proc
end

-- Writes every member of this process to Redis again (the TTL starts over).
local function refresh(app, st)
  for name, m in pairs(st.channels) do
    if next(m.keys) then
      local set, hash = redis_keys(app, st, name)
      local args = {}
      for key, entry in pairs(m.keys) do
        args[#args + 1] = key
        args[#args + 1] = entry.json
      end
      app._core:redis("HSET", hash, table.unpack(args))
      app._core:redis("EXPIRE", hash, tostring(app._presence_ttl))
      app._core:redis("SADD", set, st.proc)
      app._core:redis("EXPIRE", set, tostring(app._presence_ttl * 4))
    end
  end
end

local function start_refresh(app, st)
  if st.refresh or not app._broker then return end
  st.refresh = app:every(app._presence_ttl / 3, function() refresh(app, st) end)
end

local function announce(app, ch, kind, key, info)
  if not ch._presence_events then return end
  local ev = { event = kind, data = { key = key, info = info } }
  if app._broker then
    app:spawn(function()
      local ok, err = ch:publish(ev)
      if not ok then app:_log("warn", "presence: " .. kind .. " event for '" .. ch.name .. "': " .. tostring(err)) end
    end)
  else
    ch:publish(ev)
  end
end

local function leave(app, st, stream, ch)
  local m = st.channels[ch.name]
  local key = m and m.streams[stream]
  if key == nil then return false end
  m.streams[stream] = nil
  local entry = m.keys[key]
  entry.count = entry.count - 1
  if entry.count == 0 then
    m.keys[key] = nil
    -- nothing is kept of a channel without members (its name came from a client, maybe)
    if next(m.keys) == nil then st.channels[ch.name] = nil end
    if app._broker then
      local _, hash = redis_keys(app, st, ch.name)
      app:spawn(function() app._core:redis("HDEL", hash, key) end)
    end
    announce(app, ch, "leave", key, entry.info)
  end
  return true
end

-- stream:join(ch, key [, info]) -> true | nil, err
local function join(app, stream, ch, key, info)
  if type(key) ~= "string" or key == "" then
    error("stream:join: key must be a non-empty string", 3)
  end
  if stream.closed then return nil, "closed" end
  local st = state(app)
  leave(app, st, stream, ch)   -- a stream joined already joins again (as another key)
  local m = members_of(st, ch.name)
  local json = cjson.encode(info == nil and cjson.null or info)
  local entry = m.keys[key]
  local new = entry == nil
  if new then
    entry = { count = 0 }
    m.keys[key] = entry
  end
  entry.count, entry.info, entry.json = entry.count + 1, info, json
  m.streams[stream] = key
  stream:on_close(function() leave(app, st, stream, ch) end)
  if app._broker then
    start_refresh(app, st)
    local set, hash = redis_keys(app, st, ch.name)
    local ok, err = app._core:redis("HSET", hash, key, json)
    if ok then
      app._core:redis("EXPIRE", hash, tostring(app._presence_ttl))
      app._core:redis("SADD", set, st.proc)
      app._core:redis("EXPIRE", set, tostring(app._presence_ttl * 4))
    end
    if not ok then
      -- counted here all the same: the next refresh writes it once Redis is back
      app:_log("warn", "presence: join '" .. key .. "' in '" .. ch.name .. "': " .. tostring(err))
    end
  end
  if new then announce(app, ch, "join", key, info) end
  return true
end

-- ch:presence() -> { [key] = info } | nil, err
local function presence(app, ch)
  local st = state(app)
  if not app._broker then
    local out = {}
    local m = st.channels[ch.name]
    for key, entry in pairs(m and m.keys or {}) do
      if entry.info == nil then out[key] = true else out[key] = entry.info end
    end
    return out
  end
  local set = redis_keys(app, st, ch.name)
  local list, err = app._core:redis("EVAL", LIST, "1", set)
  if not list then return nil, err end
  local out = {}
  for i = 1, #list - 1, 2 do
    local ok, v = pcall(cjson.decode, list[i + 1])
    if ok then
      if v == cjson.null then out[list[i]] = true else out[list[i]] = v end
    end
  end
  return out
end

local function app_of(ch, where)
  local app = owner[ch]
  if not app then error(where .. ": expected a channel made by app:channel", 3) end
  return app
end

-- Adds the methods to the stream and channel classes (once per process).
local function install()
  local streams, channels = core.methods("sse.stream"), core.methods("sse.channel")
  if streams.join then return end
  streams.join = function(stream, ch, key, info)
    return join(app_of(ch, "stream:join"), stream, ch, key, info)
  end
  streams.leave = function(stream, ch)
    local app = app_of(ch, "stream:leave")
    return leave(app, state(app), stream, ch)
  end
  channels.presence = function(ch)
    return presence(app_of(ch, "ch:presence"), ch)
  end
  -- a field of the channel: it lasts as long as the channel (not the handle)
  channels.presence_events = function(ch, on)
    app_of(ch, "ch:presence_events")
    ch._presence_events = on ~= false or nil
    return ch
  end
end

-- app:channel made ch: its presence is the app's.
function M.channel(app, ch)
  install()
  owner[ch] = app
end

return M
