-- What a handler finds on `req` besides the fields C fills in: req:json(), req.cookies,
-- and sse.cookie(name, value, attributes) to build a Set-Cookie value.
local cjson = require("cjson")

local M = {}

-- An error that answers the request with a status (req:json() raising 400): the facade's
-- handler call recognises it and answers it instead of logging a 500.
local Refusal = {}
Refusal.__index = Refusal
Refusal.__tostring = function(r) return r.status .. " " .. r.message end

function M.refuse(status, message)
  error(setmetatable({ status = status, message = message }, Refusal), 0)
end

function M.is_refusal(e)
  return getmetatable(e) == Refusal
end

-- "a=1; b=2" -> { a = "1", b = "2" } (the first of a repeated name; quotes around a value
-- dropped, as RFC 6265 allows; nothing decoded).
local function parse_cookies(header)
  local out = {}
  for pair in (header or ""):gmatch("[^;]+") do
    local name, value = pair:match("^%s*([^=%s]+)%s*=%s*(.-)%s*$")
    if name and out[name] == nil then
      out[name] = value:match('^"(.*)"$') or value
    end
  end
  return out
end

local Request = {}

-- req:json() -> the decoded body. Raises a refusal answered with 400 (and a message that
-- says why) when the body is missing, is not JSON, or comes with a Content-Type other
-- than application/json (a JSON subtype, "+json", is accepted).
function Request:json()
  local ctype = (self.headers["content-type"] or ""):match("^%s*([^;%s]+)") or ""
  ctype = ctype:lower()
  if ctype ~= "application/json" and not ctype:find("^application/[%w.%-]+%+json$") then
    M.refuse(400, "expected a JSON body (Content-Type: application/json), got "
      .. (ctype ~= "" and ctype or "no Content-Type"))
  end
  if self.body == nil or self.body == "" then
    M.refuse(400, "expected a JSON body, got an empty one")
  end
  local ok, value = pcall(cjson.decode, self.body)
  if not ok then
    M.refuse(400, "the body is not valid JSON: " .. tostring(value):gsub("^.-: ", ""))
  end
  return value
end

local meta = {
  __index = function(req, k)
    if k == "cookies" then
      local c = parse_cookies(req.headers.cookie)
      rawset(req, "cookies", c)
      return c
    end
    return Request[k]
  end,
}

function M.wrap(req)
  return setmetatable(req, meta)
end

local SAME_SITE = { strict = "Strict", lax = "Lax", none = "None" }

-- sse.cookie(name, value [, { path, domain, max_age, expires, http_only, secure,
-- same_site }]) -> the value of a Set-Cookie header. Names must be tokens and values
-- cookie-octets (no space, quote, comma, semicolon or backslash): anything else raises.
function M.cookie(name, value, attrs)
  if type(name) ~= "string" or not name:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
    error("sse.cookie: invalid cookie name " .. ("%q"):format(tostring(name)), 2)
  end
  value = tostring(value or "")
  if value:find("[%c%s\",;\\\127]") then
    error("sse.cookie: the value of '" .. name .. "' has a character a cookie cannot carry "
      .. "(space, quote, comma, semicolon, backslash or a control character)", 2)
  end
  local parts = { name .. "=" .. value }
  attrs = attrs or {}
  for k in pairs(attrs) do
    if not ({ path = 1, domain = 1, max_age = 1, expires = 1, http_only = 1, secure = 1, same_site = 1 })[k] then
      error("sse.cookie: unknown attribute '" .. tostring(k) .. "'", 2)
    end
  end
  if attrs.path then parts[#parts + 1] = "Path=" .. attrs.path end
  if attrs.domain then parts[#parts + 1] = "Domain=" .. attrs.domain end
  if attrs.max_age then
    if math.type(attrs.max_age) ~= "integer" then
      error("sse.cookie: max_age must be an integer number of seconds", 2)
    end
    parts[#parts + 1] = "Max-Age=" .. attrs.max_age
  end
  if attrs.expires then
    local t = attrs.expires
    parts[#parts + 1] = "Expires=" .. (type(t) == "number" and os.date("!%a, %d %b %Y %H:%M:%S GMT", t) or t)
  end
  local same_site = attrs.same_site and SAME_SITE[tostring(attrs.same_site):lower()]
  if attrs.same_site and not same_site then
    error("sse.cookie: same_site must be \"Strict\", \"Lax\" or \"None\"", 2)
  end
  if same_site == "None" and not attrs.secure then
    error("sse.cookie: same_site = \"None\" needs secure = true (browsers refuse it otherwise)", 2)
  end
  if attrs.secure then parts[#parts + 1] = "Secure" end
  if attrs.http_only then parts[#parts + 1] = "HttpOnly" end
  if same_site then parts[#parts + 1] = "SameSite=" .. same_site end
  for _, p in ipairs(parts) do
    if p:find("[%c;]", #(p:match("^[^=]*=") or "") + 1) and p ~= parts[1] then
      error("sse.cookie: an attribute contains a control character or ';'", 2)
    end
  end
  return table.concat(parts, "; ")
end

return M
