-- A real redis-server for the broker specs: started on a free loopback port, in a
-- directory of its own (for its append-only file), stopped by PID.
--
--   local redis = require("support.redis")
--   if not redis.available() then pending(redis.MISSING) return end
--   local r = redis.start{ aof = true }    -- r.port, r.url, r:cli("PING"), r:stop(), r:restart()
local socket = require("socket")

local M = {}

M.MISSING = "redis-server is not installed: the broker specs were SKIPPED (scripts/setup.sh with SSE_SETUP_TEST=1 installs it)"

local servers = {}

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok and 0 or code
end

function M.available()
  return sh("command -v redis-server >/dev/null && echo yes"):match("yes") ~= nil
end

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local Server = {}
Server.__index = Server

local function ping(port)
  local c = socket.tcp4()
  c:settimeout(0.2)
  if not c:connect("127.0.0.1", port) then c:close() return false end
  c:send("PING\r\n")
  local line = c:receive("*l")
  c:close()
  return line == "+PONG"
end

function Server:_spawn()
  local args = ("--port %d --bind 127.0.0.1 --dir %s --save '' --appendonly %s --daemonize no "
    .. "--logfile %s/redis.log --protected-mode no"):format(self.port, self.dir, self.aof and "yes" or "no", self.dir)
  if self.aof then args = args .. " --appendfsync always" end
  local out = sh(("%s redis-server %s </dev/null >/dev/null 2>&1 & echo $!"):format(
    require("support.process").CLOSER, args))
  self.pid = tonumber(out:match("(%d+)%s*$"))
  assert(self.pid, "could not start redis-server: " .. out)
  local deadline = socket.gettime() + 10
  while not ping(self.port) do
    assert(socket.gettime() < deadline, "redis-server did not accept connections in 10 s: "
      .. sh("cat " .. self.dir .. "/redis.log"))
    socket.sleep(0.02)
  end
end

-- opts.aof: persist every write (appendfsync always), so a restart keeps the data.
function M.start(opts)
  opts = opts or {}
  local dir = sh("mktemp -d"):gsub("%s+$", "")
  local s = setmetatable({ port = free_port(), dir = dir, aof = opts.aof or false }, Server)
  s.url = ("redis://127.0.0.1:%d"):format(s.port)
  s:_spawn()
  servers[#servers + 1] = s
  return s
end

-- Runs redis-cli against it: the output, trailing newline removed.
function Server:cli(...)
  local words = {}
  for i, w in ipairs({ ... }) do words[i] = "'" .. tostring(w):gsub("'", "'\\''") .. "'" end
  return (sh(("redis-cli -p %d %s"):format(self.port, table.concat(words, " "))):gsub("%s+$", ""))
end

-- Kills it at once (SIGKILL: as a crash), and waits until the port is closed.
function Server:kill()
  if not self.pid then return end
  sh("kill -9 " .. self.pid)
  local deadline = socket.gettime() + 5
  while ping(self.port) and socket.gettime() < deadline do socket.sleep(0.02) end
  sh(("while kill -0 %d 2>/dev/null; do sleep 0.02; done"):format(self.pid))
  self.pid = nil
end

function Server:restart()
  self:kill()
  self:_spawn()
end

function Server:stop()
  self:kill()
  if self.dir then sh("rm -rf " .. self.dir) self.dir = nil end
end

function M.stop_all()
  for _, s in ipairs(servers) do s:stop() end
  servers = {}
end

return M
