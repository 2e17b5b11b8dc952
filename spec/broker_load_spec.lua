-- Channels on Redis under load (issue 11): 3 app processes (spec/fixtures/broker_app.lua)
-- on one redis-server, 1,000 subscribers spread over them, 1,000 events published from
-- the processes in turn, 3 batches in flight at a time. Every subscriber's stream is read
-- as a browser would (chunked HTTP, then sse.parser) and checked event by event: exactly
-- 1,000 events, ids strictly increasing, each with the data its publish was given (the
-- ids the publishes answered), no gap event, nothing after the last one.
--
-- The 1,000 subscribers are raw sockets of this process, read without blocking in turns
-- (no select: its FD_SETSIZE is 1024). Nothing here measures time: the deadlines are
-- only there so that a broken run ends.
local socket = require("socket")
local sse = require("sse")
local cjson = require("cjson")
local client = require("support.client")
local process = require("support.process")
local redis = require("support.redis")

local FIXTURE = "spec/fixtures/broker_app.lua"
local PROCS, SUBS = 3, 1000
local BATCHES, BATCH = 20, 50            -- 1,000 events
local EVENTS = BATCHES * BATCH
local CH = "load"

local gettime = socket.gettime

local function open_files()
  local f = io.open("/proc/self/limits")
  if not f then return nil end
  local soft = f:read("a"):match("Max open files%s+(%d+)")
  f:close()
  return tonumber(soft)
end

------------------------------------------------------------------------------------------
-- Subscribers: one request each, read in turns; every event is checked as it arrives.

local expected = {}      -- id -> data, from the publishes' answers
local problems = {}      -- the first failures seen, for the message
local nproblems = 0

local function problem(sub, what)
  nproblems = nproblems + 1
  sub.bad = (sub.bad or 0) + 1
  if #problems < 20 then
    problems[#problems + 1] = ("subscriber %d (port %d): %s"):format(sub.n, sub.port, what)
  end
end

local function check_data(sub, id, data)
  local want = expected[id]
  if want == nil then return false end
  if want ~= data then problem(sub, ("event %s: data %q, published as %q"):format(id, data, want)) end
  return true
end

local function on_event(sub, ev)
  if ev.event ~= "message" then
    problem(sub, ("a %q event (%s) after %d events"):format(ev.event, tostring(ev.data), sub.count))
    return
  end
  local seq = tonumber((ev.id or ""):match("^%d+%-(%d+)$"))
  if not seq then
    problem(sub, ("an id not of the form <epoch>-<seq>: %q"):format(tostring(ev.id)))
    return
  end
  if seq <= sub.last_seq then
    problem(sub, ("id %s after %d (a duplicate or out of order) at event %d"):format(ev.id, sub.last_seq, sub.count + 1))
  end
  sub.last_seq = seq
  sub.count = sub.count + 1
  if not check_data(sub, ev.id, ev.data) then
    sub.unchecked[#sub.unchecked + 1] = { ev.id, ev.data }   -- its publish has not answered yet
  end
end

-- Once more ids are known: the events that arrived before their publish answered.
local function recheck(sub)
  if #sub.unchecked == 0 then return end
  local left = {}
  for _, e in ipairs(sub.unchecked) do
    if not check_data(sub, e[1], e[2]) then left[#left + 1] = e end
  end
  sub.unchecked = left
end

local function take(sub, got)
  local buf = sub.buf .. got
  if not sub.status then
    local e = buf:find("\r\n\r\n", 1, true)
    if not e then sub.buf = buf return end
    local head = buf:sub(1, e - 1)
    sub.status = tonumber(head:match("^HTTP/%d%.%d (%d%d%d)"))
    sub.chunked = head:lower():find("\r\ntransfer%-encoding:%s*chunked") ~= nil
    if sub.status ~= 200 then problem(sub, "answered " .. head:match("^[^\r\n]*")) end
    buf = buf:sub(e + 4)
  end
  local body = buf
  sub.buf = ""
  if sub.chunked then
    local parts, pos = {}, 1
    while true do
      local le = buf:find("\r\n", pos, true)
      if not le then break end
      local size = tonumber(buf:sub(pos, le - 1):match("^%x+") or "", 16)
      if not size then
        problem(sub, ("bad chunk framing: %q"):format(buf:sub(pos, pos + 40)))
        pos = #buf + 1
        break
      end
      if size == 0 then               -- the stream ended: it should not
        problem(sub, "the stream ended (terminal chunk) after " .. sub.count .. " events")
        pos = #buf + 1
        break
      end
      if #buf < le + 3 + size then break end
      parts[#parts + 1] = buf:sub(le + 2, le + 1 + size)
      pos = le + 4 + size
    end
    sub.buf = buf:sub(pos)
    body = table.concat(parts)
  end
  if #body > 0 then
    for _, ev in ipairs(sub.parser:feed(body)) do on_event(sub, ev) end
  end
end

local function subscribe(n, port)
  local s = assert(socket.tcp4())
  s:settimeout(10)
  local ok, err = s:connect("127.0.0.1", port)
  assert(ok, ("subscriber %d: connect to %d: %s"):format(n, port, tostring(err)))
  assert(s:send(("GET /events/%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n")
    :format(CH, port)))
  s:settimeout(0)
  return { n = n, sock = s, port = port, buf = "", parser = sse.parser(), count = 0, last_seq = 0,
           unchecked = {} }
end

-- Reads what each open subscriber has; returns the bytes read.
local function pump(subs)
  local total = 0
  for _, sub in ipairs(subs) do
    if not sub.closed then
      for _ = 1, 8 do
        local data, err, partial = sub.sock:receive(65536)
        local got = data or partial
        if got and #got > 0 then
          total = total + #got
          take(sub, got)
        end
        if err == "timeout" then break end
        if err then
          sub.closed = true
          problem(sub, ("the connection closed (%s) after %d events"):format(err, sub.count))
          break
        end
      end
    end
  end
  return total
end

------------------------------------------------------------------------------------------
-- Publishes: POST /publish/load/50 without blocking, read while the subscribers are.

local function post(port, path, body)
  local s = assert(socket.tcp4())
  s:settimeout(10)
  assert(s:connect("127.0.0.1", port))
  assert(s:send(("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
    :format(path, port, #body, body)))
  s:settimeout(0)
  return { sock = s, raw = "", body = body, port = port }
end

-- The response once it is complete, else nil.
local function poll(req)
  if req.res then return req.res end
  local data, err, partial = req.sock:receive(65536)
  req.raw = req.raw .. (data or partial or "")
  local res = client.parse_response(req.raw, err == "closed")
  if res and res.complete then
    req.sock:close()
    req.res = res
    return res
  end
  if err and err ~= "timeout" then
    req.sock:close()
    req.res = { status = 0, body = "connection " .. err .. ": " .. req.raw }
    return req.res
  end
end

------------------------------------------------------------------------------------------

describe("channels on a broker under load", function()
  if not redis.available() then
    pending(redis.MISSING)
    return
  end

  local subs = {}
  after_each(function()
    for _, sub in ipairs(subs) do sub.sock:close() end
    subs = {}
    client.cleanup()
    process.stop_all()
    redis.stop_all()
  end)

  -- history: each channel's (the fixture's HISTORY).
  local function load_run(history)
    expected, problems, nproblems = {}, {}, 0
    -- 1,000 sockets here: raise the soft descriptor limit to the hard one if it is lower
    -- (sse's server does that when it listens; an app of this process that listens once).
    local need = SUBS + 64
    if (open_files() or 0) < need then
      local app = client.app({ heartbeat = false })
      assert(app:listen())
      app:stop()
    end
    local limit = open_files()
    if limit and limit < need then
      pending(("the descriptor limit is %d (hard limit included), %d sockets are needed"):format(limit, need))
      return
    end

    local r = redis.start()
    local procs = {}
    for i = 1, PROCS do procs[i] = process.start(FIXTURE, { BROKER = r.url, HISTORY = history }) end
    -- each process starts using the channel (reads its history) before anyone subscribes
    for _, p in ipairs(procs) do
      assert.are.equal(200, client.request(p:app(), "GET", "/subscribers/" .. CH, { timeout = 10 }).status)
    end

    -- The subscribers, round robin over the processes, 100 at a time: each wave is in
    -- (every response head read) before the next connects.
    local deadline = gettime() + 60
    for first = 1, SUBS, 100 do
      local wave = {}
      for n = first, math.min(first + 99, SUBS) do
        local sub = subscribe(n, procs[(n - 1) % PROCS + 1].port)
        subs[#subs + 1] = sub
        wave[#wave + 1] = sub
      end
      while true do
        pump(wave)
        local heads = 0
        for _, sub in ipairs(wave) do if sub.status or sub.closed then heads = heads + 1 end end
        if heads == #wave then break end
        assert(gettime() < deadline, ("%d of %d response heads after 60 s"):format(#subs - #wave + heads, SUBS))
        socket.sleep(0.002)
      end
    end
    assert.are.same({}, problems, "the subscriptions")
    local per = {}
    for i, p in ipairs(procs) do
      per[i] = tonumber(client.request(p:app(), "GET", "/subscribers/" .. CH, { timeout = 10 }).body)
    end
    local want_per = {}
    for i = 1, PROCS do want_per[i] = (SUBS - i) // PROCS + 1 end
    assert.are.same(want_per, per, "subscribers on each process")

    -- The publishes: batch b from process (b - 1) % 3 + 1, three batches in flight at a
    -- time (one on each process), the next three once those have answered.
    local answered, all_ids = {}, {}
    deadline = gettime() + 120
    local b = 1
    while b <= BATCHES do
      local inflight = {}
      for k = 0, PROCS - 1 do
        if b + k <= BATCHES then
          local p = procs[(b + k - 1) % PROCS + 1]
          inflight[#inflight + 1] = post(p.port, ("/publish/%s/%d"):format(CH, BATCH), "b" .. (b + k))
        end
      end
      local left = #inflight
      while left > 0 do
        local moved = pump(subs)
        for _, req in ipairs(inflight) do
          if not req.done and poll(req) then
            req.done = true
            left = left - 1
            local res = req.res
            assert.are.equal(200, res.status, "publish " .. req.body .. ": " .. tostring(res.body))
            local ids = cjson.decode(res.body).ids
            assert.are.equal(BATCH, #ids, req.body)
            local last = 0
            for i, id in ipairs(ids) do
              local seq = tonumber(id:match("^%d+%-(%d+)$"))
              assert.is_true(seq ~= nil and seq > last, "a batch's ids increase: " .. res.body)
              last = seq
              assert.is_nil(expected[id], "an id given twice: " .. id)
              expected[id] = req.body .. "-" .. i
              all_ids[#all_ids + 1] = id
            end
            answered[#answered + 1] = req.body
          end
        end
        if moved == 0 then socket.sleep(0.001) end
        assert(gettime() < deadline, "the publishes did not answer in 120 s: " .. #answered .. " batches did")
      end
      for _, sub in ipairs(subs) do recheck(sub) end
      b = b + PROCS
    end
    assert.are.equal(BATCHES, #answered)
    assert.are.equal(EVENTS, #all_ids)

    -- Every subscriber reads to the end.
    local function complete()
      local n = 0
      for _, sub in ipairs(subs) do if sub.count >= EVENTS or sub.closed then n = n + 1 end end
      return n
    end
    while complete() < SUBS and nproblems == 0 do
      if pump(subs) == 0 then socket.sleep(0.002) end
      if gettime() > deadline then break end
    end
    -- and nothing comes after the last event (a duplicate would show as an id out of order)
    local quiet = gettime() + 0.5
    while gettime() < quiet do
      if pump(subs) == 0 then socket.sleep(0.005) end
    end
    for _, sub in ipairs(subs) do recheck(sub) end

    local short, unchecked, deliveries = {}, 0, 0
    for _, sub in ipairs(subs) do
      deliveries = deliveries + sub.count
      if sub.count ~= EVENTS and #short < 10 then
        short[#short + 1] = ("subscriber %d on port %d: %d events"):format(sub.n, sub.port, sub.count)
      end
      unchecked = unchecked + #sub.unchecked
      if #sub.unchecked > 0 and #problems < 20 then
        problems[#problems + 1] = ("subscriber %d: %d events with an id no publish answered, e.g. %s"):format(
          sub.n, #sub.unchecked, sub.unchecked[1][1])
      end
    end
    local logs = {}
    for i, p in ipairs(procs) do logs[#logs + 1] = ("process %d:\n%s"):format(i, p:log()) end
    assert.are.same({}, short, ("deliveries %d of %d\n%s\n%s"):format(deliveries, SUBS * EVENTS,
      table.concat(problems, "\n"), table.concat(logs, "\n")))
    assert.are.same({}, problems, table.concat(logs, "\n"))
    assert.are.equal(0, unchecked)
    assert.are.equal(SUBS * EVENTS, deliveries)
    for _, sub in ipairs(subs) do assert.is_false(sub.closed == true, "subscriber " .. sub.n .. " closed") end
    for i, p in ipairs(procs) do
      assert.is_nil(p:log():find("redis: unavailable", 1, true), "process " .. i .. ": " .. p:log())
    end
  end

  it("3 processes, 1,000 subscribers, 1,000 events: every subscriber gets all of them once, in id order, with their data", function()
    load_run(100)
  end)

  -- A history shorter than what pub/sub has still to bring: a process's own events (from
  -- its publishes' answers) overtake the others' on pub/sub, and the stream it reads to
  -- fill in no longer has them. They are on their way, not lost: no gap, nothing missing.
  it("the same with a history of 1", function()
    load_run(1)
  end)
end)
