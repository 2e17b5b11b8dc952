-- Embedding (issue 12, item 3): an app hosted in a luv or cqueues program through
-- app:pollfd() and app:timeout() keeps its streams' timing while the host does its own
-- work, costs nothing when idle, and stops cleanly on SIGINT; so does a hand-written
-- step loop with app:catch_signals().
local client = require("support.client")
local process = require("support.process")
local cjson = require("cjson")

local function cpu_ticks(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local fields = {}
  for v in f:read("a"):gsub("^.-%) ", ""):gmatch("%S+") do fields[#fields + 1] = v end
  f:close()
  return tonumber(fields[12]) + tonumber(fields[13])   -- utime + stime (fields 14, 15)
end

local function available(module)
  return pcall(require, module)
end

local function check_host(script, signal)
  local p = process.start(script)
  local remote = p:app()
  -- the streams keep their 100 ms period (generous bounds: the machine is shared)
  local c = client.connect(remote, "/tick")
  c:wait_events(10, 10)
  local gaps = {}
  for i = 2, 10 do gaps[#gaps + 1] = c.event_times[i] - c.event_times[i - 1] end
  table.sort(gaps)
  assert.is_true(gaps[#gaps] < 0.5, "largest gap " .. gaps[#gaps])
  assert.is_true(gaps[1] > 0.05, "events came faster than the generator sends them: " .. gaps[1])
  c:close()
  -- the host did its own work meanwhile
  local host = cjson.decode(client.request(remote, "GET", "/host").body).host_ticks
  assert.is_true(host >= 3, "host ticks: " .. host)
  -- idle: no busy polling (a clock tick is 10 ms; 2 s of waiting may cost a few)
  local before = cpu_ticks(p.pid)
  client.run_for(remote, 2)
  local used = cpu_ticks(p.pid) - before
  assert.is_true(used <= 10, "idle for 2 s used " .. used .. " clock ticks of CPU")
  -- a signal ends an open stream cleanly and the host with it
  local s = client.connect(remote, "/tick")
  s:wait_events(2, 5)
  os.execute("kill -" .. (signal or "INT") .. " " .. p.pid)
  s:wait_end(10)
  assert.is_true(s:ended_cleanly(), s:describe())
  client.wait(remote, function() return not p:alive() end, 10, "the host to exit")
  assert.truthy(p:output():find("stopped", 1, true), p:output())
  assert.falsy(p:output():find("interrupted", 1, true), p:output())
end

describe("embedding", function()
  after_each(function()
    client.cleanup()
    process.stop_all()
  end)

  it("in a luv program", function()
    if not available("luv") then pending("lua-luv is not installed (scripts/setup.sh installs it)") return end
    check_host("examples/embed/luv.lua", "INT")
  end)

  it("in a cqueues program", function()
    if not available("cqueues") then pending("lua-cqueues is not installed (scripts/setup.sh installs it)") return end
    check_host("examples/embed/cqueues.lua", "TERM")
  end)

  it("a hand-written step loop with app:catch_signals() stops gracefully on SIGINT", function()
    local p = process.start("spec/fixtures/step_loop.lua")
    local remote = p:app()
    local s = client.connect(remote, "/tick")
    s:wait_events(2, 5)
    os.execute("kill -INT " .. p.pid)
    s:wait_end(10)
    assert.is_true(s:ended_cleanly(), s:describe())
    client.wait(remote, function() return not p:alive() end, 10, "the loop to end")
    assert.truthy(p:output():find("step loop: stopped", 1, true), p:output())
  end)

  it("app:pollfd() is a descriptor and app:timeout() the next deadline", function()
    local app = client.app({ heartbeat = false })
    assert(app:listen())
    assert.is_true(math.type(app:pollfd()) == "integer" and app:pollfd() > 2)
    app:after(5, function() end)
    local t = app:timeout()
    assert.is_true(t ~= nil and t > 4 and t <= 5, tostring(t))
    app:after(0.2, function() end)
    assert.is_true(app:timeout() <= 0.2)
  end)
end)
