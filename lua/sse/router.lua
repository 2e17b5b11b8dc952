-- Route table for the app facade: (method, pattern) -> value.
--
-- Patterns are "/"-separated segments:
--   literal   matches the same text exactly (case-sensitive);
--   :name     matches one non-empty segment, captured into params.name;
--   *         only as the whole last segment: matches the rest of the path, captured
--             into params.splat without its leading "/" (may be "").
--
-- Choices (the contract leaves them open):
--   * "/static/*" matches "/static/" (splat "") and "/static/a/b" (splat "a/b") but not
--     "/static": the route is for what is under the prefix; the app can add "/static" itself.
--   * A trailing slash is significant: "/a" and "/a/" are different routes and paths.
--   * All-literal routes live in a hash, so matching them is one lookup. Patterned routes are
--     tried in order of specificity: segment by segment, literal beats :name beats *, so
--     "/users/me" beats "/users/:id" and "/a/:x/c" beats "/a/:x/*".
--   * Specificity is per method: a GET pattern still answers GET "/users/me" when only a
--     POST "/users/me" exists.
--   * HEAD uses an explicit HEAD route matching the path if there is one, else the GET route.
--   * Two patterns that differ only in parameter names ("/a/:x" and "/a/:y") would match
--     the same paths with no way to choose, so adding the second one raises.
--   * Paths arrive percent-decoded, so a decoded "%2F" splits segments like "/" does.
local M = {}

-- match() runs on every request
local error, ipairs, pairs, type, setmetatable = error, ipairs, pairs, type, setmetatable
local concat, insert, sort = table.concat, table.insert, table.sort

local Router = {}
Router.__index = Router
Router.__name = "sse.router"

local LITERAL, PARAM, SPLAT = 0, 1, 2 -- also the rank: lower is more specific

local function split(path)
  local segs = {}
  for seg in (path:sub(2) .. "/"):gmatch("([^/]*)/") do
    segs[#segs + 1] = seg
  end
  return segs
end

-- Parse a pattern into { kind, text } segments and a shape key in which parameter names are
-- blanked out (two patterns with the same shape match exactly the same paths).
local function parse(pattern)
  local function bad(why)
    error(("sse.router: bad pattern %q: %s"):format(pattern, why), 4)
  end
  if type(pattern) ~= "string" then
    error(("sse.router: pattern must be a string, got %s"):format(type(pattern)), 3)
  end
  if pattern:sub(1, 1) ~= "/" then bad("must start with '/'") end
  if pattern:find("\0", 1, true) then bad("must not contain NUL") end
  local raw = split(pattern)
  local segs, shape, names = {}, {}, {}
  for i, text in ipairs(raw) do
    if text == "" and i < #raw then bad("empty segment") end
    if text == "*" then
      if i < #raw then bad("'*' only as the whole last segment") end
      segs[i], shape[i] = { SPLAT }, "*"
    elseif text:find("*", 1, true) then
      bad("'*' only as the whole last segment")
    elseif text:sub(1, 1) == ":" then
      local name = text:sub(2)
      if not name:match("^[%a_][%w_]*$") then
        bad(("parameter name %q is not an identifier"):format(name))
      end
      if names[name] or (name == "splat" and raw[#raw] == "*") then
        bad(("duplicate parameter '%s'"):format(name))
      end
      names[name] = true
      segs[i], shape[i] = { PARAM, name }, ":"
    else
      segs[i], shape[i] = { LITERAL, text }, text
    end
  end
  return segs, "/" .. concat(shape, "/")
end

local function is_static(segs)
  for _, seg in ipairs(segs) do
    if seg[1] ~= LITERAL then return false end
  end
  return true
end

-- Lexicographic by segment rank; equal ranks keep insertion order so the result is stable.
local function more_specific(a, b)
  local n = math.max(#a.segs, #b.segs)
  for i = 1, n do
    local ra, rb = a.segs[i], b.segs[i]
    if not ra then return true end   -- shorter first; such pairs never match the same path
    if not rb then return false end
    if ra[1] ~= rb[1] then return ra[1] < rb[1] end
  end
  return a.order < b.order
end

-- Returns the params table when route `segs` matches `path` (split into `psegs`), else nil.
local function try(segs, path, psegs)
  local n = #segs
  local last = segs[n]
  if last[1] == SPLAT then
    if #psegs < n then return nil end
  elseif #psegs ~= n then
    return nil
  end
  local params = {}
  for i = 1, n do
    local seg, text = segs[i], psegs[i]
    local kind = seg[1]
    if kind == LITERAL then
      if text ~= seg[2] then return nil end
    elseif kind == PARAM then
      if text == "" then return nil end
      params[seg[2]] = text
    else -- SPLAT: everything after the first n-1 segments and their slashes
      local skip = 1 -- the leading "/"
      for j = 1, n - 1 do skip = skip + #psegs[j] + 1 end
      params.splat = path:sub(skip + 1)
    end
  end
  return params
end

local function check_method(fn, method)
  if type(method) ~= "string" or not method:match("^%u[%u_%-]*$") then
    error(("sse.router: %s: method must be an uppercase string like \"GET\", got %s")
      :format(fn, type(method) == "string" and ("%q"):format(method) or type(method)), 3)
  end
end

function M.new()
  return setmetatable({
    static = {},   -- path -> { method -> value }
    patterns = {}, -- { method, pattern, segs, value, order }, most specific first
    shapes = {},   -- method .. " " .. shape -> pattern already added
    count = 0,
  }, Router)
end

function Router:add(method, pattern, value)
  check_method("add", method)
  local segs, shape = parse(pattern)
  if value == nil then error("sse.router: add: value must not be nil", 2) end
  local key = method .. " " .. shape
  local prev = self.shapes[key]
  if prev then
    if prev == pattern then
      error(("sse.router: duplicate route %s %s"):format(method, pattern), 2)
    end
    error(("sse.router: route %s %s conflicts with %s %s (same paths)")
      :format(method, pattern, method, prev), 2)
  end
  self.shapes[key] = pattern
  self.count = self.count + 1
  if is_static(segs) then
    local byp = self.static[pattern]
    if not byp then byp = {}; self.static[pattern] = byp end
    byp[method] = value
  else
    -- insert in place (sorting after every add would make adding n routes O(n^2 log n))
    local route = { method = method, pattern = pattern, segs = segs, value = value,
                    order = self.count }
    local list, at = self.patterns, #self.patterns + 1
    for i, other in ipairs(list) do
      if more_specific(route, other) then at = i; break end
    end
    insert(list, at, route)
  end
end

-- Best route for exactly this method, or nil. `psegs` is split lazily (static hits skip it).
local function find(self, method, path, psegs)
  local byp = self.static[path]
  if byp and byp[method] ~= nil then return byp[method], {}, psegs end
  psegs = psegs or split(path)
  for _, route in ipairs(self.patterns) do
    if route.method == method then
      local params = try(route.segs, path, psegs)
      if params then return route.value, params, psegs end
    end
  end
  return nil, nil, psegs
end

-- Sorted methods with a route matching `path`, or nil when there is none (404).
local function allowed_methods(self, path, psegs)
  local set = {}
  for method in pairs(self.static[path] or {}) do set[method] = true end
  for _, route in ipairs(self.patterns) do
    if not set[route.method] and try(route.segs, path, psegs) then set[route.method] = true end
  end
  if set.GET then set.HEAD = true end -- HEAD is answered by the GET route
  local list = {}
  for method in pairs(set) do list[#list + 1] = method end
  if #list == 0 then return nil end
  sort(list)
  return list
end

-- Returns value, params when a route matches; else nil, nil, allowed (see allowed_methods).
function Router:match(method, path)
  check_method("match", method)
  if type(path) ~= "string" then
    error(("sse.router: match: path must be a string, got %s"):format(type(path)), 2)
  end
  if path:sub(1, 1) ~= "/" then return nil, nil, nil end -- e.g. "OPTIONS *"
  local value, params, psegs = find(self, method, path, nil)
  if value == nil and method == "HEAD" then
    value, params, psegs = find(self, "GET", path, psegs)
  end
  if value ~= nil then return value, params end
  return nil, nil, allowed_methods(self, path, psegs)
end

return M
