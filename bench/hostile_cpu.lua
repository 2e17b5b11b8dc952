-- CPU of a lua-sse server with N hostile connections open against none (a measurement,
-- not a test). Starts spec/fixtures/hostile_app.lua as its own process, measures its CPU
-- (utime + stime from /proc) over SECONDS with no client but one healthy /tick stream, then
-- opens N connections of each attack, keeps them open, and measures again.
--
--   lua5.4 bench/hostile_cpu.lua [N] [SECONDS] [TREE]
--
-- TREE (default: this checkout) is where lua/ and build/lib/ are taken from, so the
-- landed tree can be measured side by side (git worktree add /tmp/landed <commit>, build
-- it there). Attacks:
--   chunk-line   a chunked body whose chunk-size line (leading zeros) is longer than the
--                read buffer (libmicrohttpd 0.9.75 alone keeps its timeout at 0 for good)
--   slowloris    one header byte sent, then nothing
--   stalled-post POST /nope with Content-Length: 1 MiB and no body
local socket = require("socket")

local N = tonumber(arg[1]) or 100
local SECONDS = tonumber(arg[2]) or 3
local here = debug.getinfo(1, "S").source:sub(2):match("(.*)/bench/") or "."
local TREE = arg[3] or here

local function sh(cmd)
  local p = io.popen(cmd)
  local out = p:read("a")
  p:close()
  return out
end

local dir = sh("mktemp -d"):gsub("%s+$", "")
local env = ("env LUA_PATH='%s/lua/?.lua;%s/lua/?/init.lua;;' LUA_CPATH='%s/build/lib/?.so;;'")
  :format(TREE, TREE, TREE)
local pid = tonumber(sh(("( exec %s lua5.4 %s/spec/fixtures/hostile_app.lua %s/port ) </dev/null " ..
  ">/dev/null 2>%s/log & echo $!"):format(env, here, dir, dir)))

local port
for _ = 1, 100 do
  local f = io.open(dir .. "/port")
  if f then port = tonumber(f:read("a")) f:close() end
  if port then break end
  socket.sleep(0.05)
end
assert(port, "the server did not start: " .. sh("cat " .. dir .. "/log"))

local function cpu_ticks()
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local stat = f:read("a")
  f:close()
  local fields = {}
  for x in stat:match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
  return tonumber(fields[12]) + tonumber(fields[13])   -- utime, stime (fields 14, 15)
end
local HZ = tonumber(sh("getconf CLK_TCK")) or 100

local function connect()
  local c = assert(socket.tcp())
  c:settimeout(2)
  assert(c:connect("127.0.0.1", port))
  c:settimeout(0)
  return c
end

-- Percent of one core the server used over SECONDS.
local function measure()
  local t0, c0 = socket.gettime(), cpu_ticks()
  socket.sleep(SECONDS)
  return 100 * (cpu_ticks() - c0) / HZ / (socket.gettime() - t0)
end

local healthy = connect()
healthy:send("GET /tick HTTP/1.1\r\nHost: x\r\n\r\n")

local attacks = {
  ["chunk-line"] = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" ..
    string.rep("0", 40000),
  ["slowloris"] = "G",
  ["stalled-post"] = "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n",
}

io.write(("server pid %d, %d connections per attack, %g s per measurement, tree %s\n")
  :format(pid, N, SECONDS, TREE))
io.write(("%-14s %8s\n"):format("attack", "CPU %"))
io.write(("%-14s %8.1f\n"):format("none", measure()))
for _, name in ipairs({ "chunk-line", "slowloris", "stalled-post" }) do
  local conns = {}
  for i = 1, N do
    local c = connect()
    c:send(attacks[name])
    conns[i] = c
  end
  socket.sleep(0.3)   -- let the server take them in
  io.write(("%-14s %8.1f\n"):format(name, measure()))
  for _, c in ipairs(conns) do c:close() end
  socket.sleep(0.5)
end
healthy:close()
os.execute("kill " .. pid)
os.execute("rm -rf " .. dir)
