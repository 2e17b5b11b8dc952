-- App processes for the specs: a Lua script run with this checkout's modules, its URL
-- read from what it prints (the first http://host:port), stopped by PID.
--
--   local process = require("support.process")
--   local p = process.start("spec/fixtures/broker_app.lua", { BROKER = url })
--   p.url, p.port, p.pid; p:log() (stderr), p:output() (both); p:kill("KILL"); p:stop();
--   process.stop_all()
--   local remote = p:app()   -- for support.client: client.connect(remote, "/events")
local socket = require("socket")

local M = {}

local procs = {}

-- Put before a command: it runs with no descriptor beyond 0-2 that this process had
-- open. A child holding a copy of a client socket of the test would keep that
-- connection open after the test closes it (LuaSocket's sockets are not close-on-exec).
M.CLOSER = [[bash -c 'for fd in /proc/$$/fd/*; do n=${fd##*/}; ]]
  .. [[[ "$n" -gt 2 ] && eval "exec $n>&-"; done; exec "$@"' spec-child]]

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function alive(pid)
  return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true
end

local Proc = {}
Proc.__index = Proc

-- env: extra environment variables. The process gets PORT=0 unless env.PORT is set.
function M.start(script, env)
  local p = io.popen("mktemp -d")
  local dir = p:read("l")
  p:close()
  local vars = { "LUA_PATH='lua/?.lua;lua/?/init.lua;;'", "LUA_CPATH='build/lib/?.so;;'" }
  env = env or {}
  if env.PORT == nil then vars[#vars + 1] = "PORT=0" end
  for k, v in pairs(env) do vars[#vars + 1] = ("%s='%s'"):format(k, tostring(v)) end
  local cmd = ("%s env %s stdbuf -oL lua5.4 %s </dev/null >%s/out 2>%s/err & echo $!")
    :format(M.CLOSER, table.concat(vars, " "), script, dir, dir)
  p = io.popen(cmd)
  local pid = tonumber(p:read("l"))
  p:close()
  local self = setmetatable({ pid = pid, dir = dir, script = script, env = env }, Proc)
  procs[#procs + 1] = self
  local deadline = socket.gettime() + 10
  while true do
    local out = read_all(dir .. "/out") or ""
    local url = out:match("(https?://[%w%.%-]+:%d+)")
    if url then
      self.url = url
      self.port = tonumber(url:match(":(%d+)$"))
      return self
    end
    if not alive(pid) or socket.gettime() > deadline then
      error(("%s did not start:\n%s"):format(script, read_all(dir .. "/err") or ""), 2)
    end
    socket.sleep(0.02)
  end
end

function Proc:log() return read_all(self.dir .. "/err") or "" end
function Proc:output() return (read_all(self.dir .. "/out") or "") .. (read_all(self.dir .. "/err") or "") end
function Proc:alive() return self.pid ~= nil and alive(self.pid) end

-- Sends a signal ("TERM", "KILL") and waits (at most 10 s) for the process to end.
function Proc:kill(sig)
  if not self.pid then return end
  os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", self.pid))
  local deadline = socket.gettime() + 10
  while alive(self.pid) and socket.gettime() < deadline do socket.sleep(0.02) end
  if alive(self.pid) then os.execute("kill -KILL " .. self.pid .. " 2>/dev/null") end
  self.pid = nil
end

function Proc:stop()
  self:kill("TERM")
  if self.dir then os.execute("rm -rf " .. self.dir) self.dir = nil end
end

-- Something support.client can connect to and "step" (the process runs by itself).
-- app: an in-process app to step while waiting (else the wait just sleeps).
function Proc:app(app)
  return {
    port = self.port,
    step = function(_, t)
      if app then app:step(t) else socket.sleep(t or 0.005) end
    end,
  }
end

function M.stop_all()
  for _, p in ipairs(procs) do p:stop() end
  procs = {}
end

return M
