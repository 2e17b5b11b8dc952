-- bench/report.lua RESULTS_TSV RUNS LIGHT_RUNS: the Markdown table of bench/run.sh.
-- Each input line is "workload <TAB> server <TAB> loadgen's JSON object" (or {"na":true},
-- or {"error":"..."} when there was nothing to measure). With several runs of a cell the
-- table shows the run whose headline figure is the median, so a row's figures all come
-- from one run, and the headline's spread over the runs beside it.
local path, runs, light_runs = arg[1], tonumber(arg[2]) or 1, tonumber(arg[3]) or 1

-- loadgen's objects are flat: "key":number|true|false|null|"string"
local function parse(json)
  local t = {}
  for k, v in json:gmatch('"([%w_]+)":("?[^,}"]*"?)') do
    if v:sub(1, 1) == '"' then
      t[k] = v:sub(2, -2)
    elseif v == "true" or v == "false" then
      t[k] = v == "true"
    elseif v ~= "null" then
      t[k] = tonumber(v)
    end
  end
  return t
end

-- The figure a workload is about, and whether more is better.
local function headline(r)
  if r.mode == "fanout" and (r.rate or 0) > 0 then
    return r.p99_ms, false, "p99"
  elseif r.mode == "fanout" then
    return r.deliveries_per_s, true, "rate"
  elseif r.mode == "idle" then
    return r.bytes_per_conn, false, "memory"
  elseif r.mode == "count" then
    return r.events_per_s, true, "rate"
  end
end

local cells, workloads, servers, seen = {}, {}, {}, {}
for line in io.lines(path) do
  local w, s, json = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
  if w then
    if not seen[w] then seen[w] = true; workloads[#workloads + 1] = w end
    if not seen["s:" .. s] then seen["s:" .. s] = true; servers[#servers + 1] = s end
    cells[w] = cells[w] or {}
    cells[w][s] = cells[w][s] or {}
    table.insert(cells[w][s], parse(json))
  end
end

-- The median run of a cell (by headline), and the headline's spread over the runs.
local function pick(list)
  local measured = {}
  for _, r in ipairs(list) do
    if headline(r) then measured[#measured + 1] = r end
  end
  if #measured == 0 then return list[1] end
  local _, higher = headline(measured[1])
  table.sort(measured, function(a, b)
    local x, y = headline(a), headline(b)
    if higher then return x > y end
    return x < y
  end)
  local m = measured[(#measured + 1) // 2]
  if #measured > 1 then
    local lo, hi = headline(measured[1]), headline(measured[#measured])
    local mid = headline(m)
    if mid > 0 then m.spread = math.abs(hi - lo) / mid end
  end
  m.runs = #list
  return m
end

local function thousands(n)
  local s = string.format("%.0f", n)
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (out:gsub("^,", ""))
end

local function ms(v)
  if not v then return "" end
  return string.format(v < 10 and "%.2f" or "%.1f", v)
end

-- a / b to two places, or "" when either is missing (or b is 0).
local function over(a, b)
  if not a or not b or b == 0 then return "" end
  return string.format("%.2f", a / b)
end

local function ratio(r, ref)
  if not ref then return "" end
  return over(headline(r), headline(ref))
end

-- What went wrong in a run, in words (empty when nothing did).
local function problems(r)
  local p = {}
  if r.error then p[#p + 1] = r.error end
  if (r.conn_failed or 0) > 0 then p[#p + 1] = thousands(r.conn_failed) .. " connections refused or unanswered" end
  if (r.sub_ended or 0) > 0 then p[#p + 1] = thousands(r.sub_ended) .. " streams ended early by the server" end
  if (r.pub_errors or 0) > 0 then p[#p + 1] = thousands(r.pub_errors) .. " publishes failed" end
  if (r.short_or_broken or 0) > 0 then p[#p + 1] = thousands(r.short_or_broken) .. " streams short or broken" end
  if r.mode == "fanout" and r.delivered and r.expected and r.delivered < r.expected then
    p[#p + 1] = thousands(r.expected - r.delivered) .. " deliveries missing"
  end
  if r.mode == "count" and r.received and r.expected and r.received < r.expected then
    p[#p + 1] = thousands(r.expected - r.received) .. " events missing"
  end
  if r.server_died then p[#p + 1] = "the server died" end
  if r.ok == false and #p == 0 then p[#p + 1] = "loadgen reported a failure" end
  return table.concat(p, "; ")
end

-- The best value(r) among the other servers of a workload (the highest when higher), to
-- set lua-sse against: its headline, and its CPU per million deliveries.
local function best_peer(picked, value, higher)
  local best
  for s, r in pairs(picked) do
    local v = not r.na and not r.error and value(r)
    if s ~= "lua-sse" and v and v > 0 then
      if not best or (higher and v > best) or (not higher and v < best) then best = v end
    end
  end
  return best
end

local function cpu_per_M(r) return r.server_cpu_s_per_M end

print("| workload | server | delivered | events/s | p50 ms | p99 ms | server CPU-s per M | memory"
  .. " | vs Go | vs Nchan | p99 vs Nchan | vs best peer: headline / CPU | spread |")
print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
local failures = {}
for _, w in ipairs(workloads) do
  local picked = {}
  for _, s in ipairs(servers) do
    if cells[w][s] then picked[s] = pick(cells[w][s]) end
  end
  local go, nchan = picked["go-nethttp"], picked["nchan"]
  for _, s in ipairs(servers) do
    local r = picked[s]
    if r and r.na then
      print(string.format("| %s | %s | n/a | | | | | | | | | | |", w, s))
    elseif r then
      local got, want, rate, memory = "", "", "", ""
      if r.mode == "fanout" then
        got, want, rate = r.delivered, r.expected, r.deliveries_per_s
      elseif r.mode == "idle" then
        got, want = r.connected, r.conns
      elseif r.mode == "count" then
        got, want, rate = r.received, r.expected, r.events_per_s
      end
      if r.mode == "idle" and r.bytes_per_conn then
        memory = string.format("%.1f KB/conn", r.bytes_per_conn / 1024)
      elseif r.server_rss_kb then
        memory = string.format("%.0f MB RSS", r.server_rss_kb / 1024)
      end
      local what = problems(r)
      local delivered = r.error and "failed" or (thousands(got or 0) .. "/" .. thousands(want or 0))
      if what ~= "" then
        failures[#failures + 1] = string.format("- %s, %s: %s", w, s, what)
        delivered = delivered .. " ✗"
      end
      local h, _, which = headline(r)
      local function bold(kind, text)
        if which == kind and text ~= "" then return "**" .. text .. "**" end
        return text
      end
      local p99_nchan, vs_best = "", ""
      if s == "lua-sse" and r.mode == "fanout" and nchan and not nchan.na then
        p99_nchan = over(r.p99_ms, nchan.p99_ms)
      end
      if s == "lua-sse" and h then
        local _, higher = headline(r)
        vs_best = over(h, best_peer(picked, headline, higher))
        local cpu = best_peer(picked, cpu_per_M, false)
        if r.server_cpu_s_per_M and cpu and r.mode ~= "idle" then
          vs_best = vs_best .. " / " .. over(r.server_cpu_s_per_M, cpu)
        end
      end
      local label = s
      if s == "go-nethttp" then label = "go-nethttp (all cores)" end
      if s == "lua-sse" then label = "lua-sse (default options)" end
      print(string.format("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |",
        w, label, delivered,
        bold("rate", rate and rate ~= "" and thousands(rate) or ""),
        ms(r.p50_ms), bold("p99", ms(r.p99_ms)),
        r.server_cpu_s_per_M and string.format("%.2f", r.server_cpu_s_per_M) or "",
        bold("memory", memory),
        (s ~= "go-nethttp" and h) and ratio(r, go) or "",
        (s ~= "nchan" and h) and ratio(r, nchan) or "",
        p99_nchan, vs_best,
        r.spread and string.format("±%.0f%%", r.spread * 50) or ""))
    end
  end
end

print()
if runs > 1 then
  print(string.format("Each cell is the median of %d runs by its headline figure (bold), every figure from" ..
    " that one run; light: %s.", runs, light_runs > 1 and light_runs .. " runs" or "one run"))
else
  print(string.format("Each cell is one run%s.", light_runs > 1 and ("; light: " .. light_runs .. " runs") or ""))
end
print()
print([[
- **headline** (bold): events/s for fanout-1k, fanout-10k, burst and count (more is better); bytes
  of server memory per idle connection for idle-10k and p99 latency for light (less is better).
- **vs Go**, **vs Nchan**: this row's headline divided by Go's or Nchan's for the same workload.
  Above 1 is better for events/s, below 1 is better for memory and latency.
- **p99 vs Nchan** (lua-sse): its p99 over Nchan's. fanout-1k, fanout-10k and burst publish as
  fast as the server accepts (rate 0), so their p99 is the latency **under saturation**.
- **vs best peer** (lua-sse): its headline over the best other server's in this run (the
  highest events/s, the least memory or light p99), then its CPU per million deliveries over
  the least of the others'. lua-sse runs with its default options (only `heartbeat = false`).
- **spread**: half the range of the headline over the runs, relative to the median.
- **delivered**: deliveries (fanout), streams answered (idle) or events read (count) over
  what was expected; ✗ marks a run where something failed (listed below).
- **events/s**: fan-out deliveries per second from the first publish to the last delivery
  (count: events per second over the run). Latency: publish sent -> event received.
- **server CPU-s per M**: the server process's CPU seconds (all its threads) per million
  deliveries or events; nginx's figures are its single worker's.
- **memory**: the server's RSS at the end of the run, or for idle-10k its RSS growth per
  connection.]])
if #failures > 0 then
  print()
  print("Failures:")
  print()
  for _, f in ipairs(failures) do print(f) end
end
print([[

The servers (bench/servers/, each on the contract of bench/README.md):

- **lua-sse**: this project, one thread (`lua-sse.lua`); a client more than `queue_limit`
  (1 MiB) behind is dropped.
- **nchan**: Nchan in nginx, one worker process (the master only waits); `/sub` is an
  EventSource subscriber, `/pub` a publisher. No `/count`: Nchan serves channels, not
  per-request streams (n/a).
- **openresty**: nginx + ngx_lua (LuaJIT), one worker, handlers as OpenResty users write
  them: `/count` with `ngx.print` + `ngx.flush(true)` per event; `/sub` waits on an
  `ngx.semaphore` that `/pub` posts, then sends what it missed in one flush.
- **go-nethttp**: Go net/http, a goroutine and a 64-event channel per subscriber, one flush
  per batch of queued events. A full channel blocks the publisher (backpressure), so Go
  paces publishes to its slowest subscriber. GOMAXPROCS default: **Go may use both
  cores**, the others one.
- **node-http**: Node's http module, broadcast over a Set of responses ignoring
  backpressure (slow subscribers buffer in memory); `/count` waits for 'drain'. One
  JavaScript thread (libuv and GC threads count in its CPU).
- **lua-http**: lua-http on cqueues (Lua 5.2, the version Debian packages all its
  dependencies for), one thread; subscribers wait on a cqueues condition.]])
