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
--     Pure Lua cannot stat, so special files (FIFOs, devices) must not be placed there.
--   * Only GET and HEAD; HEAD gets the same headers and a nil body. No content-length
--     header: the server derives it from the body.
local M = {}

local EPERM, ENOENT, EACCES, ENOTDIR, EISDIR = 1, 2, 13, 20, 21 -- Linux errno values

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

-- io.open succeeds on a directory on Linux; reading it then fails with EISDIR.
local function is_directory(path)
  local f = io.open(path, "rb")
  if not f then return false end
  local ok, _, code = f:read(0)
  f:close()
  return ok == nil and code == EISDIR
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

-- status, body, headers for a GET or HEAD of `splat` under `dir`.
function M.serve(dir, splat, method)
  method = method or "GET"
  if method ~= "GET" and method ~= "HEAD" then
    return plain(405, "method not allowed", { allow = "GET, HEAD" })
  end
  local path = M.resolve(dir, splat)
  if not path then return plain(404, "not found") end
  local f, _, code = io.open(path, "rb")
  if not f then
    if code == EACCES or code == EPERM then return plain(403, "forbidden") end
    if code == ENOENT or code == ENOTDIR then return plain(404, "not found") end
    return plain(500, "internal server error")
  end
  -- HEAD only needs to know the file is readable: read(0) returns nil without an error
  -- code at end of file (an empty file), and nil with one when reading fails.
  local body, _, rcode = f:read(method == "HEAD" and 0 or "a")
  f:close()
  if body == nil and rcode then
    -- a directory named index.html, or a read error
    if rcode == EISDIR then return plain(404, "not found") end
    return plain(500, "internal server error")
  end
  local headers = { ["content-type"] = M.content_type(path) }
  if method == "HEAD" then return 200, nil, headers end
  return 200, body, headers
end

return M
