-- Files under a directory, for app:static(prefix, dir).
--
-- `splat` is the part of the request path after the prefix, already percent-decoded, so
-- whatever a client encoded ("%2e%2e", "%2f", "%00") arrives here as the real characters
-- and is checked as such.
--
-- Choices:
--   * Rejected (served as 404, so probing learns nothing): NUL, backslash, an absolute
--     path, and any segment starting with "." -- that covers "." and ".." and also keeps
--     dotfiles (.env, .git/...) private.
--   * "" or a path ending in "/" or naming a directory maps to index.html inside it (no
--     redirect to add the slash: we do not know the URL prefix here).
--   * Symbolic links inside `dir` are followed: the directory's contents are trusted.
--   * Only regular files are served: a FIFO, device or socket answers 403. core.open_file
--     opens without blocking (a FIFO would otherwise wait for a writer and stall every
--     client) and checks the type on the descriptor it then sends.
--   * The body is the opened file, never its contents: C hands the descriptor to
--     libmicrohttpd, which sends it one write buffer at a time as the socket drains, so a
--     large file costs no memory and other clients are served between blocks (a file not
--     in the page cache is still read from disk on the loop, a readahead window at a
--     time). HEAD returns it too: libmicrohttpd then sends the Content-Length of the
--     whole file and no body.
--   * Only GET and HEAD. Validators ETag (strong) and Last-Modified, with 304 for
--     If-None-Match (it wins over If-Modified-Since, RFC 9110 13.2.2) and
--     If-Modified-Since. One byte range (206); a range past the end 416; several ranges,
--     a malformed Range, or an If-Range that no longer matches: the whole file (200), as
--     RFC 9110 14.2 allows -- multipart/byteranges is not worth its cost here.
local core = require("sse.core")

local M = {}

local TYPES = {
  html = "text/html; charset=utf-8",
  htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8",
  js = "text/javascript; charset=utf-8",
  mjs = "text/javascript; charset=utf-8",
  json = "application/json; charset=utf-8",
  map = "application/json; charset=utf-8",
  txt = "text/plain; charset=utf-8",
  svg = "image/svg+xml; charset=utf-8",
  xml = "application/xml; charset=utf-8",
  png = "image/png",
  jpg = "image/jpeg",
  jpeg = "image/jpeg",
  gif = "image/gif",
  webp = "image/webp",
  ico = "image/x-icon",
  wasm = "application/wasm", -- exact type, no parameters: browsers require it to stream-compile
  pdf = "application/pdf",
  woff = "font/woff",
  woff2 = "font/woff2",
}
local DEFAULT_TYPE = "application/octet-stream"

local function plain(status, body, extra)
  local headers = { ["content-type"] = "text/plain; charset=utf-8" }
  for k, v in pairs(extra or {}) do headers[k] = v end
  return status, body, headers
end

local function is_directory(path)
  local f, _, code = core.open_file(path)
  if f then f:close() end
  return code == "EISDIR"
end

-- Safe join of dir and a request's splat: the path, or nil and a reason.
function M.resolve(dir, splat)
  if type(dir) ~= "string" or dir == "" then
    error("sse.static.resolve: dir must be a non-empty string", 2)
  end
  if splat == nil then splat = "" end
  if type(splat) ~= "string" then
    error(("sse.static.resolve: splat must be a string, got %s"):format(type(splat)), 2)
  end
  if splat:find("\0", 1, true) then return nil, "path contains NUL" end
  if splat:find("\\", 1, true) then return nil, "path contains a backslash" end
  if splat:sub(1, 1) == "/" then return nil, "absolute path" end
  for seg in splat:gmatch("[^/]+") do
    if seg:sub(1, 1) == "." then return nil, "path segment starts with '.'" end
  end
  local path = dir:gsub("/+$", "") .. "/" .. splat
  if dir:match("^/+$") then path = "/" .. splat end -- dir "/" would otherwise give "//x"
  if path:sub(-1) == "/" then return path .. "index.html" end
  if is_directory(path) then return path .. "/index.html" end
  return path
end

function M.content_type(path)
  local ext = type(path) == "string" and path:match("%.(%w+)$")
  return ext and TYPES[ext:lower()] or DEFAULT_TYPE
end

-- ---- validators and ranges ----

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6,
                 jul = 7, aug = 8, sep = 9, oct = 10, nov = 11, dec = 12 }

-- Days since 1970-01-01 of a proleptic Gregorian date (os.time would use local time).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
end

-- Seconds since the epoch of an HTTP-date, or nil. Recipients must accept all three
-- formats (RFC 9110 5.6.7): IMF-fixdate, RFC 850 and asctime.
function M.parse_http_date(s)
  if type(s) ~= "string" then return nil end
  local d, mon, y, hh, mm, ss = s:match("^%s*%a+, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
  if not d then
    d, mon, y, hh, mm, ss = s:match("^%s*%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
    if y then
      y = tonumber(y)
      y = y < 70 and 2000 + y or 1900 + y
    end
  end
  if not d then
    mon, d, hh, mm, ss, y = s:match("^%s*%a%a%a (%a%a%a) ([ %d]%d) (%d%d):(%d%d):(%d%d) (%d%d%d%d)%s*$")
  end
  local m = mon and MONTHS[mon:lower()]
  if not m then return nil end
  d, y, hh, mm, ss = tonumber(d), tonumber(y), tonumber(hh), tonumber(mm), tonumber(ss)
  if d < 1 or d > 31 or hh > 23 or mm > 59 or ss > 60 then return nil end
  return ((days_from_civil(y, m, d) * 24 + hh) * 60 + mm) * 60 + ss
end

-- If-None-Match uses the weak comparison (RFC 9110 13.1.2): W/ prefixes are ignored.
local function none_match(header, etag)
  if header:match("^%s*%*%s*$") then return true end
  local want = etag:gsub("^W/", "")
  for tag in header:gmatch('"[^"]*"') do
    if tag == want then return true end
  end
  return false
end

-- If-Range: the range applies only to the representation the client has (a strong
-- ETag compared strongly, or exactly the Last-Modified date).
local function if_range_holds(value, file)
  if value == nil then return true end
  value = value:match("^%s*(.-)%s*$")
  if value:sub(1, 1) == '"' then return value == file.etag end
  if value:sub(1, 2) == "W/" then return false end
  return M.parse_http_date(value) == file.mtime
end

-- The single range a Range header asks of a file of `size` bytes: offset, length; or
-- "unsatisfiable"; or nil when the header is to be ignored (malformed, another unit,
-- several ranges).
function M.byte_range(header, size)
  local spec = type(header) == "string" and header:match("^%s*[Bb][Yy][Tt][Ee][Ss]=(.-)%s*$")
  if not spec or spec:find(",", 1, true) then return nil end
  local first, last = spec:match("^(%d*)%-(%d*)$")
  if not first or (first == "" and last == "") then return nil end
  if first == "" then               -- the last N bytes
    local n = tonumber(last)
    if n == 0 or size == 0 then return "unsatisfiable" end
    n = math.min(n, size)
    return size - n, n
  end
  local a, b = tonumber(first), tonumber(last)
  if b and b < a then return nil end -- invalid range-spec: ignored (RFC 9110 14.1.1)
  if a >= size then return "unsatisfiable" end
  if not b or b >= size then b = size - 1 end
  return a, b - a + 1
end

-- ---- serving ----

-- open_file's codes -> the status a client gets
local OPEN_STATUS = {
  ENOENT = 404, ENOTDIR = 404, EISDIR = 404, ELOOP = 404, ENAMETOOLONG = 404,
  EACCES = 403, EPERM = 403, ENOTREG = 403, ENXIO = 403,
}
local STATUS_TEXT = { [403] = "forbidden", [404] = "not found" }

-- status, body, headers for a GET or HEAD of `splat` under `dir`; `headers` are the
-- request's (lower-case names) for conditional and range requests. The body of a 200,
-- 206 or 304 (HEAD included) is an sse.file, for the server to send from its descriptor.
function M.serve(dir, splat, method, headers)
  method = method or "GET"
  headers = headers or {}
  if method ~= "GET" and method ~= "HEAD" then
    return plain(405, "method not allowed", { allow = "GET, HEAD" })
  end
  local path = M.resolve(dir, splat)
  if not path then return plain(404, "not found") end
  local f, _, code = core.open_file(path)
  if not f then
    local status = OPEN_STATUS[code]
    if not status then return plain(500, "internal server error") end
    return plain(status, STATUS_TEXT[status])
  end
  local out = {
    etag = f.etag,
    ["last-modified"] = f.last_modified,
  }
  local inm = headers["if-none-match"]
  local since = not inm and M.parse_http_date(headers["if-modified-since"])
  if inm and none_match(inm, f.etag) or since and since >= f.mtime then
    -- The file as the body of a 304: libmicrohttpd sends no body for that status but
    -- a Content-Length; with the file it is the 200's length, as RFC 9110 8.6 wants
    -- (an empty body would announce 0).
    return 304, f, out
  end
  out["content-type"] = M.content_type(path)
  out["accept-ranges"] = "bytes"
  local range = headers.range
  if method == "GET" and range and if_range_holds(headers["if-range"], f) then
    local offset, length = M.byte_range(range, f.size)
    if offset == "unsatisfiable" then
      local size = f.size
      f:close()
      return plain(416, "range not satisfiable", { ["content-range"] = "bytes */" .. size })
    elseif offset then
      out["content-range"] = ("bytes %d-%d/%d"):format(offset, offset + length - 1, f.size)
      return 206, f:range(offset, length), out
    end
  end
  return 200, f, out
end

return M
