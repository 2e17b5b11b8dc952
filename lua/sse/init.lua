-- lua-sse: Server-Sent Events for Lua 5.4 on libmicrohttpd.
--   local sse = require("sse")
--   sse.encode(ev), sse.comment(text), sse.parser(), sse.app(opts), sse.cookie(...)
-- The event encoder and parser are C (sse.core); the app facade is sse.app.
local core = require("sse.core")

local M = {
  encode = core.encode,
  comment = core.comment,
  parser = core.parser,
  version = core.version,
  cookie = require("sse.request").cookie,
}

function M.app(opts)
  return require("sse.app").new(opts)
end

return M
