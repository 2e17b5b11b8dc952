-- Request conveniences (issue 12, item 5): req:json(), req.cookies, sse.cookie.
local client = require("support.client")
local sse = require("sse")
local cjson = require("cjson")

describe("request conveniences", function()
  after_each(function() client.cleanup() end)

  it("req:json() decodes a JSON body; a bad body or Content-Type answers 400 saying why", function()
    local app, logs = client.app({ heartbeat = false })
    app:post("/echo", function(req)
      local v = req:json()
      return { got = v }
    end)
    assert(app:listen())
    local function post(body, ctype)
      return client.request(app, "POST", "/echo", { body = body, headers = { ["Content-Type"] = ctype } })
    end
    local ok = post('{"a":[1,2]}', "application/json; charset=utf-8")
    assert.are.equal(200, ok.status, ok.body)
    assert.are.same({ got = { a = { 1, 2 } } }, cjson.decode(ok.body))
    assert.are.equal(200, post('{"x":1}', "application/merge-patch+json").status)
    local bad = post("{not json", "application/json")
    assert.are.equal(400, bad.status)
    assert.truthy(bad.body:find("not valid JSON", 1, true), bad.body)
    local form = post("a=1", "application/x-www-form-urlencoded")
    assert.are.equal(400, form.status)
    assert.truthy(form.body:find("application/x-www-form-urlencoded", 1, true), form.body)
    local empty = post("", "application/json")
    assert.are.equal(400, empty.status)
    assert.is_nil(client.find_log(logs, "error"), client.show_logs(logs))
  end)

  it("req:json() in a before hook or a stream's accept refuses before the stream", function()
    local app = client.app({ heartbeat = false })
    app:stream("/ask", function(stream, req) stream:send(req.question) end, {
      method = "POST",
      accept = function(req) req.question = req:json().q end,
    })
    assert(app:listen())
    local res = client.request(app, "POST", "/ask", { body = "nope", headers = { ["Content-Type"] = "application/json" } })
    assert.are.equal(400, res.status)
    local c = client.connect(app, "/ask", { method = "POST", body = '{"q":"why"}',
      headers = { ["Content-Type"] = "application/json" } })
    c:wait_events(1)
    assert.are.same({ "why" }, c:data())
  end)

  it("req.cookies parses the Cookie header; sse.cookie builds Set-Cookie values", function()
    local app = client.app({ heartbeat = false })
    app:get("/c", function(req)
      return 200, req.cookies, {
        ["Set-Cookie"] = {
          sse.cookie("sid", "abc123", { path = "/", http_only = true, same_site = "Lax", max_age = 3600 }),
          sse.cookie("theme", "dark"),
        },
      }
    end)
    assert(app:listen())
    local res = client.request(app, "GET", "/c", { headers = { Cookie = 'a=1; b="two"; a=3;  sid=xyz' } })
    assert.are.same({ a = "1", b = "two", sid = "xyz" }, cjson.decode(res.body))
    local set = {}
    for _, h in ipairs(res.header_list) do
      if h[1]:lower() == "set-cookie" then set[#set + 1] = h[2] end
    end
    assert.are.same({ "sid=abc123; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax", "theme=dark" }, set)
    assert.are.same({}, cjson.decode(client.request(app, "GET", "/c").body))
    assert.has_error(function() sse.cookie("bad name", "x") end)
    assert.has_error(function() sse.cookie("a", "x;y") end)
    assert.has_error(function() sse.cookie("a", "x", { same_site = "None" }) end)
    assert.has_error(function() sse.cookie("a", "x", { colour = "red" }) end)
    assert.are.equal("a=x; Secure; SameSite=None", sse.cookie("a", "x", { same_site = "none", secure = true }))
    assert.are.equal("a=; Expires=Thu, 01 Jan 1970 00:00:00 GMT", sse.cookie("a", "", { expires = 0 }))
  end)
end)
