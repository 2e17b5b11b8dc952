rockspec_format = "3.0"
package = "lua-sse"
version = "0.2.0-1"
source = {
   url = "git+https://github.com/lua-sse/lua-sse.git",
   tag = "v0.2.0",
}
description = {
   summary = "Server-Sent Events for Lua 5.4 on libmicrohttpd",
   detailed = [[
Serve Server-Sent Events from Lua scripts: routes, generator functions that send and
sleep, timers and pub/sub channels, with a C core on libmicrohttpd that streams every
event to clients the moment it is sent.
]],
   homepage = "https://github.com/lua-sse/lua-sse",
   license = "MIT",
}
dependencies = {
   "lua >= 5.4",
   "lua-cjson",
}
external_dependencies = {
   MHD = {
      header = "microhttpd.h",
      library = "microhttpd",
   },
   CURL = {
      -- no header check: Debian keeps curl.h under a multiarch directory luarocks does
      -- not search; CMakeLists.txt finds it with CURL_INCDIR as a hint.
      library = "curl",
   },
   HIREDIS = {
      header = "hiredis/hiredis.h",
      library = "hiredis",
   },
   ZLIB = {
      header = "zlib.h",
      library = "z",
   },
}
build = {
   -- CMakeLists.txt holds the one list of sources.
   type = "cmake",
   variables = {
      CMAKE_BUILD_TYPE = "RelWithDebInfo",
      SSE_TESTS = "OFF",
      LUA_INCDIR = "$(LUA_INCDIR)",
      LUA_LIBDIR = "$(LIBDIR)",
      LUA_DIR = "$(LUADIR)",
      MHD_INCDIR = "$(MHD_INCDIR)",
      MHD_LIBDIR = "$(MHD_LIBDIR)",
      CURL_INCDIR = "$(CURL_INCDIR)",
      CURL_LIBDIR = "$(CURL_LIBDIR)",
      HIREDIS_INCDIR = "$(HIREDIS_INCDIR)",
      HIREDIS_LIBDIR = "$(HIREDIS_LIBDIR)",
   },
}
test_dependencies = {
   "busted",
   "luasocket",
}
test = {
   type = "busted",
   flags = { "--lua=lua5.4" },
}
