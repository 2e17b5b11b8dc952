-- luacheck (Debian: lua-check): `luacheck .` from the top of the tree; .ci/run runs it.
std = "lua54"
max_line_length = 120
include_files = { "lua/**/*.lua", "spec/**/*.lua", "examples/**/*.lua", "bench/**/*.lua",
  "test/browser/fixtures/*.lua", "*.rockspec", ".luacheckrc" }
exclude_files = { "bench/.build" }
files["spec"] = { std = "+busted", max_line_length = false }   -- long expected messages
files["bench/servers/openresty_sse.lua"] = { globals = { "ngx" } }
files["*.rockspec"] = { std = "+rockspec", globals = { "rockspec_format", "package", "version", "source",
  "description", "dependencies", "external_dependencies", "build", "test_dependencies", "test" } }
