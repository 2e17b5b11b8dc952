-- Unit tests for sse.static against a real temporary directory.
-- Run with LUA_PATH="lua/?.lua;lua/?/init.lua;;"
local static = require("sse.static")

local function sh(cmd)
  assert(os.execute(cmd), "command failed: " .. cmd)
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function write(path, content)
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
end

local function is_root()
  local p = io.popen("id -u")
  local uid = p:read("l")
  p:close()
  return uid == "0"
end

describe("sse.static", function()
  local root, dir, outside

  setup(function()
    -- os.tmpname creates a file with a unique name; reuse the name for a directory
    root = os.tmpname()
    os.remove(root)
    sh("mkdir -p " .. quote(root .. "/public/css") .. " " .. quote(root .. "/public/docs")
      .. " " .. quote(root .. "/public/empty") .. " " .. quote(root .. "/public/trap/index.html")
      .. " " .. quote(root .. "/public/.git"))
    dir = root .. "/public"
    write(dir .. "/index.html", "<h1>home</h1>")
    write(dir .. "/css/site.css", "body{}")
    write(dir .. "/docs/index.html", "<h1>docs</h1>")
    write(dir .. "/app.WASM", "\0asm")
    write(dir .. "/zero.txt", "")
    write(dir .. "/%2e%2e", "encoded-looking name")
    write(dir .. "/a b.txt", "space")
    write(dir .. "/.env", "SECRET=1")
    write(dir .. "/.git/config", "[core]")
    write(dir .. "/bin.dat", "\0\1\2\255")
    outside = root .. "/secret.txt"
    write(outside, "outside")
  end)

  teardown(function()
    if root and root:match("^/tmp/") then
      os.execute("chmod -R u+rwx " .. quote(root) .. " 2>/dev/null; rm -rf " .. quote(root))
    end
  end)

  describe("resolve", function()
    it("joins a relative path under dir", function()
      assert.equal(dir .. "/css/site.css", static.resolve(dir, "css/site.css"))
    end)

    it("does not double the slash when dir ends with one", function()
      assert.equal(dir .. "/css/site.css", static.resolve(dir .. "/", "css/site.css"))
    end)

    it("maps an empty path and a trailing slash to index.html", function()
      assert.equal(dir .. "/index.html", static.resolve(dir, ""))
      assert.equal(dir .. "/index.html", static.resolve(dir, nil))
      assert.equal(dir .. "/docs/index.html", static.resolve(dir, "docs/"))
    end)

    it("maps a directory without trailing slash to its index.html", function()
      assert.equal(dir .. "/docs/index.html", static.resolve(dir, "docs"))
    end)

    it("returns a path for a missing file (serve answers 404)", function()
      assert.equal(dir .. "/nope.txt", static.resolve(dir, "nope.txt"))
    end)

    it("rejects '..' escapes in every position", function()
      for _, splat in ipairs({
        "..", "../secret.txt", "css/../../secret.txt", "css/..", "a/../b", "..//secret.txt",
      }) do
        local path, err = static.resolve(dir, splat)
        assert.is_nil(path, splat)
        assert.is_string(err)
      end
    end)

    it("rejects '.' segments and dotfiles", function()
      for _, splat in ipairs({ ".", "./index.html", ".env", ".git/config", "css/.hidden" }) do
        assert.is_nil((static.resolve(dir, splat)), splat)
      end
    end)

    it("rejects absolute paths, backslashes and NUL", function()
      local path, err = static.resolve(dir, "/etc/passwd")
      assert.is_nil(path)
      assert.matches("absolute", err)
      path, err = static.resolve(dir, "..\\secret.txt")
      assert.is_nil(path)
      assert.matches("backslash", err)
      path, err = static.resolve(dir, "css\\site.css")
      assert.is_nil(path)
      path, err = static.resolve(dir, "index.html\0.png")
      assert.is_nil(path)
      assert.matches("NUL", err)
    end)

    it("allows names that merely contain dots or look percent-encoded", function()
      assert.equal(dir .. "/%2e%2e", static.resolve(dir, "%2e%2e"))
      assert.equal(dir .. "/a..b.txt", static.resolve(dir, "a..b.txt"))
      assert.equal(dir .. "/a b.txt", static.resolve(dir, "a b.txt"))
    end)

    it("raises on misuse", function()
      assert.has_error(function() static.resolve(nil, "x") end,
        "sse.static.resolve: dir must be a non-empty string")
      assert.has_error(function() static.resolve("", "x") end,
        "sse.static.resolve: dir must be a non-empty string")
      assert.has_error(function() static.resolve(dir, 5) end,
        "sse.static.resolve: splat must be a string, got number")
    end)
  end)

  describe("content_type", function()
    local cases = {
      ["index.html"] = "text/html; charset=utf-8",
      ["old.htm"] = "text/html; charset=utf-8",
      ["site.css"] = "text/css; charset=utf-8",
      ["app.js"] = "text/javascript; charset=utf-8",
      ["mod.mjs"] = "text/javascript; charset=utf-8",
      ["data.json"] = "application/json; charset=utf-8",
      ["app.js.map"] = "application/json; charset=utf-8",
      ["notes.txt"] = "text/plain; charset=utf-8",
      ["logo.svg"] = "image/svg+xml; charset=utf-8",
      ["feed.xml"] = "application/xml; charset=utf-8",
      ["a.png"] = "image/png",
      ["a.jpg"] = "image/jpeg",
      ["a.jpeg"] = "image/jpeg",
      ["a.gif"] = "image/gif",
      ["a.webp"] = "image/webp",
      ["favicon.ico"] = "image/x-icon",
      ["app.wasm"] = "application/wasm",
      ["doc.pdf"] = "application/pdf",
      ["f.woff"] = "font/woff",
      ["f.woff2"] = "font/woff2",
    }
    for name, ctype in pairs(cases) do
      it("maps " .. name, function()
        assert.equal(ctype, static.content_type("/srv/x/" .. name))
      end)
    end

    it("ignores the case of the extension", function()
      assert.equal("text/html; charset=utf-8", static.content_type("INDEX.HTML"))
      assert.equal("application/wasm", static.content_type("app.WASM"))
    end)

    it("defaults to application/octet-stream", function()
      assert.equal("application/octet-stream", static.content_type("bin.dat"))
      assert.equal("application/octet-stream", static.content_type("Makefile"))
      assert.equal("application/octet-stream", static.content_type("dir.html/file"))
      assert.equal("application/octet-stream", static.content_type("trailing."))
    end)
  end)

  describe("serve", function()
    it("answers 200 with the file and its content type", function()
      local status, body, headers = static.serve(dir, "css/site.css", "GET")
      assert.equal(200, status)
      assert.equal("body{}", body)
      assert.same({ ["content-type"] = "text/css; charset=utf-8" }, headers)
    end)

    it("defaults to GET", function()
      local status, body = static.serve(dir, "css/site.css")
      assert.equal(200, status)
      assert.equal("body{}", body)
    end)

    it("serves binary content byte for byte", function()
      local status, body, headers = static.serve(dir, "bin.dat", "GET")
      assert.equal(200, status)
      assert.equal("\0\1\2\255", body)
      assert.equal("application/octet-stream", headers["content-type"])
    end)

    it("serves an empty file as an empty body", function()
      local status, body = static.serve(dir, "zero.txt", "GET")
      assert.equal(200, status)
      assert.equal("", body)
    end)

    it("serves index.html for the root, a trailing slash and a directory", function()
      for splat, want in pairs({ [""] = "<h1>home</h1>", ["docs/"] = "<h1>docs</h1>",
                                 docs = "<h1>docs</h1>" }) do
        local status, body, headers = static.serve(dir, splat, "GET")
        assert.equal(200, status, splat)
        assert.equal(want, body, splat)
        assert.equal("text/html; charset=utf-8", headers["content-type"])
      end
    end)

    it("answers HEAD with the same headers and a nil body", function()
      local gs, _, gh = static.serve(dir, "css/site.css", "GET")
      local status, body, headers = static.serve(dir, "css/site.css", "HEAD")
      assert.equal(gs, status)
      assert.is_nil(body)
      assert.same(gh, headers)
      status, body = static.serve(dir, "zero.txt", "HEAD")
      assert.equal(200, status)
      assert.is_nil(body)
      assert.equal(404, (static.serve(dir, "nope.txt", "HEAD")))
      assert.equal(404, (static.serve(dir, "empty", "HEAD")))
    end)

    it("answers 404 for a missing file and under a file", function()
      local status, body = static.serve(dir, "nope.txt", "GET")
      assert.equal(404, status)
      assert.equal("not found", body)
      assert.equal(404, (static.serve(dir, "index.html/x", "GET")))
      assert.equal(404, (static.serve(root .. "/no-such-dir", "", "GET")))
    end)

    it("answers 404 for a directory without index.html", function()
      assert.equal(404, (static.serve(dir, "empty", "GET")))
      assert.equal(404, (static.serve(dir, "empty/", "GET")))
    end)

    it("answers 404 when index.html is itself a directory", function()
      local status, body = static.serve(dir, "trap/", "GET")
      assert.equal(404, status)
      assert.equal("not found", body)
      assert.equal(404, (static.serve(dir, "trap/index.html", "GET")))
    end)

    it("answers 404 for escapes, without revealing the file outside", function()
      for _, splat in ipairs({ "../secret.txt", "css/../../secret.txt", "/" .. outside,
                               "..\\secret.txt", "../secret.txt\0", ".env", ".git/config" }) do
        local status, body = static.serve(dir, splat, "GET")
        assert.equal(404, status, splat)
        assert.equal("not found", body)
      end
    end)

    it("serves a file literally named like an encoded escape", function()
      local status, body = static.serve(dir, "%2e%2e", "GET")
      assert.equal(200, status)
      assert.equal("encoded-looking name", body)
      status, body = static.serve(dir, "a b.txt", "GET")
      assert.equal(200, status)
      assert.equal("space", body)
    end)

    it("answers 405 with Allow for other methods", function()
      local status, _, headers = static.serve(dir, "index.html", "POST")
      assert.equal(405, status)
      assert.equal("GET, HEAD", headers.allow)
    end)

    it("answers 403 for an unreadable file", function()
      if is_root() then
        pending("running as root: permissions do not stop reads")
        return
      end
      local path = dir .. "/locked.txt"
      write(path, "locked")
      sh("chmod 000 " .. quote(path))
      local status, body = static.serve(dir, "locked.txt", "GET")
      sh("chmod 644 " .. quote(path))
      assert.equal(403, status)
      assert.equal("forbidden", body)
    end)
  end)
end)
