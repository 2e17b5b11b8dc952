-- New subscribers starting from the recent past (issue 12, item 4): first = "newest" |
-- "oldest" | N for subscribers without a Last-Event-ID; with one, replay as always.
local client = require("support.client")

describe("channel option first", function()
  after_each(function() client.cleanup() end)

  local function setup()
    local app = client.app({ heartbeat = false })
    local ch = app:channel("temps", { history = 5 })
    app:stream("/newest", ch, { first = "newest" })
    app:stream("/oldest", ch, { first = "oldest" })
    app:stream("/three", ch, { first = 3 })
    app:stream("/plain", ch)
    app:stream("/gen", function(stream, req)
      stream:subscribe(ch, nil, { first = tonumber(req.query.n) or req.query.n })
    end)
    assert(app:listen())
    local ids = {}
    for i = 1, 8 do ids[i] = ch:publish("t" .. i) end
    return app, ch, ids
  end

  it("a subscriber without an id gets the newest, all kept, or the last N events, then live ones", function()
    local app, ch = setup()
    local cases = { ["/newest"] = { "t8" }, ["/oldest"] = { "t4", "t5", "t6", "t7", "t8" },
                    ["/three"] = { "t6", "t7", "t8" }, ["/plain"] = {},
                    ["/gen?n=newest"] = { "t8" }, ["/gen?n=2"] = { "t7", "t8" }, ["/gen?n=50"] = { "t4", "t5", "t6", "t7", "t8" } }
    local conns = {}
    for path in pairs(cases) do conns[path] = client.connect(app, path) end
    for path, want in pairs(cases) do
      local c = conns[path]
      c:wait_head()
      if #want > 0 then c:wait_events(#want) end
    end
    ch:publish("live")
    for path, want in pairs(cases) do
      local c = conns[path]
      c:wait_events(#want + 1)
      local expect = { table.unpack(want) }
      expect[#expect + 1] = "live"
      assert.are.same(expect, c:data(), path)
    end
  end)

  it("with a Last-Event-ID the replay is as always, first does not apply", function()
    local app, _, ids = setup()
    local c = client.connect(app, "/newest", { headers = { ["Last-Event-ID"] = ids[5] } })
    c:wait_events(3)
    assert.are.same({ "t6", "t7", "t8" }, c:data())
  end)

  it("bad values raise when the route is defined", function()
    local app = client.app()
    local ch = app:channel("x")
    assert.has_error(function() app:stream("/a", ch, { first = "latest" }) end)
    assert.has_error(function() app:stream("/b", ch, { first = -1 }) end)
    assert.has_error(function() app:stream("/c", function() end, { first = 1 }) end)
  end)
end)
