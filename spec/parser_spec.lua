-- sse.parser: the WHATWG "interpreting an event stream" rules, as a browser's
-- EventSource applies them. Every case is fed whole, a byte at a time and in every
-- split into two feeds, and must give the same events and the same final state.
local sse = require("sse")

local function show(s)
  return (s:gsub("\r", "\\r"):gsub("\n", "\\n"):gsub("%z", "\\0"))
end

local function ev(data, event, id)
  return { data = data, event = event or "message", id = id or "" }
end

-- name, input, expected events, expected p.retry, expected p.last_event_id
local cases = {
  { "LF line ends", "data: a\n\n", { ev("a") } },
  { "CRLF line ends", "data: a\r\n\r\n", { ev("a") } },
  { "lone CR line ends", "data: a\r\r", { ev("a") } },
  { "mixed line ends", "data: a\rdata: b\r\ndata: c\n\r\n", { ev("a\nb\nc") } },
  { "CRLF is one line end", "data: a\r\ndata: b\n\n", { ev("a\nb") } },
  { "LF CR is two line ends", "data: a\n\rdata: b\n\n", { ev("a"), ev("b") } },
  { "no space after the colon", "data:a\n\n", { ev("a") } },
  { "only one leading space stripped", "data:  a\n\n", { ev(" a") } },
  { "a tab is not stripped", "data:\ta\n\n", { ev("\ta") } },
  { "empty data line", "data:\n\n", { ev("") } },
  { "field with no colon", "data\n\n", { ev("") } },
  { "data lines joined with LF", "data: a\ndata: b\n\n", { ev("a\nb") } },
  { "data \"a\\n\"", "data: a\ndata: \n\n", { ev("a\n") } },
  { "colon in the value", "data: a: b\n\n", { ev("a: b") } },
  { "NUL in data kept", "data: a\0b\n\n", { ev("a\0b") } },
  { "unicode", "data: caf\u{e9} \u{1F600}\n\n", { ev("caf\u{e9} \u{1F600}") } },
  { "event type, reset after dispatch", "event: ping\ndata: x\n\ndata: y\n\n",
    { ev("x", "ping"), ev("y") } },
  { "empty event type is message", "event:\ndata: x\n\n", { ev("x") } },
  { "event with no data not dispatched", "event: e\n\ndata: x\n\n", { ev("x") } },
  { "id without data updates the last id", "id: 5\n\n", {}, nil, "5" },
  { "id persists across events", "id: 1\ndata: a\n\ndata: b\n\n", { ev("a", nil, "1"), ev("b", nil, "1") },
    nil, "1" },
  { "empty id resets", "id: 1\ndata: a\n\nid:\ndata: b\n\n", { ev("a", nil, "1"), ev("b") }, nil, "" },
  { "id with NUL ignored", "id: 1\n\nid: 2\0x\ndata: a\n\n", { ev("a", nil, "1") }, nil, "1" },
  { "id not in force before its blank line", "id: 1\ndata: a\n\nid: 2\ndata: b\n",
    { ev("a", nil, "1") }, nil, "1" },
  { "retry digits", "retry: 1500\n\n", {}, 1500 },
  { "retry applies at once", "retry: 20\ndata: x", {}, 20 },
  { "retry 12a ignored", "retry: 12a\n\n", {}, nil },
  { "retry negative ignored", "retry: -5\n\n", {}, nil },
  { "retry with two spaces ignored", "retry:  5\n\n", {}, nil },
  { "invalid retry keeps the previous one", "retry: 5\nretry: x\n\n", {}, 5 },
  { "comments ignored", ": hi\n:\ndata: a\n: mid\ndata: b\n\n", { ev("a\nb") } },
  { "unknown fields ignored", "foo: bar\ndata: a\n\n", { ev("a") } },
  { "field names are case-sensitive", "Data: a\n\n", {} },
  { "space before the colon belongs to the name", "data : a\n\n", {} },
  { "blank lines alone dispatch nothing", "\n\r\n\r\n", {} },
  { "trailing event without a blank line not dispatched", "data: a\n\ndata: b\n", { ev("a") } },
  { "trailing line without a line end", "data: a\n\ndata: b", { ev("a") } },
  { "BOM at the start skipped", "\u{FEFF}data: a\n\n", { ev("a") } },
  { "only the first BOM skipped", "\u{FEFF}\u{FEFF}data: a\n\ndata: b\n\n", { ev("b") } },
  { "BOM later is content", "data: a\n\n\u{FEFF}data: b\n\n", { ev("a") } },
  { "partial BOM is content", "\xEF\xBBdata: a\n\ndata: b\n\n", { ev("b") } },
  { "everything together", ": c\nevent: update\nid: 42\nretry: 10\ndata: {\"a\":1}\ndata: x\n\n",
    { ev('{"a":1}\nx', "update", "42") }, 10, "42" },
}

local function run(input, cuts)
  local p = sse.parser()
  local events = {}
  local at = 0
  for _, cut in ipairs(cuts) do
    for _, e in ipairs(p:feed(input:sub(at + 1, cut))) do
      events[#events + 1] = e
    end
    at = cut
  end
  return events, p
end

local function chunkings(input)
  local n = #input
  local out = { { "whole", { n } } }
  local bytes = {}
  for i = 1, n do bytes[i] = i end
  out[#out + 1] = { "byte by byte", bytes }
  for k = 0, n do
    out[#out + 1] = { "split at " .. k, { k, n } }
  end
  return out
end

describe("sse.parser", function()
  it("starts with no retry and an empty last event id", function()
    local p = sse.parser()
    assert.is_nil(p.retry)
    assert.equal("", p.last_event_id)
    assert.same({}, p:feed(""))
  end)

  for _, c in ipairs(cases) do
    local name, input, want, retry, last_id = c[1], c[2], c[3], c[4], c[5]
    it(name .. ": " .. show(input), function()
      for _, ch in ipairs(chunkings(input)) do
        local events, p = run(input, ch[2])
        assert.same(want, events, ch[1])
        assert.equal(retry, p.retry, ch[1])
        assert.equal(last_id or (want[#want] and want[#want].id) or "", p.last_event_id, ch[1])
      end
    end)
  end

  it("returns each event from the feed that completes it", function()
    local p = sse.parser()
    assert.same({}, p:feed("data: a\n"))
    assert.same({}, p:feed("data: b\r"))
    assert.same({ ev("a\nb") }, p:feed("\n\r"))
    assert.same({ ev("c"), ev("d") }, p:feed("data: c\n\ndata: d\n\ndata: e"))
  end)

  it("treats a CR ending one feed and an LF starting the next as one line end", function()
    local p = sse.parser()
    assert.same({}, p:feed("data: a\r"))
    assert.same({}, p:feed("\ndata: b\r"))
    assert.same({ ev("a\nb") }, p:feed("\n\n"))
  end)

  it("skips a BOM that arrives one byte at a time", function()
    local p = sse.parser()
    for _, b in ipairs({ "\xEF", "\xBB", "\xBF" }) do
      assert.same({}, p:feed(b))
    end
    assert.same({ ev("a") }, p:feed("data: a\n\n"))
  end)

  it("keeps parsers independent", function()
    local p, q = sse.parser(), sse.parser()
    p:feed("id: 1\nretry: 7\ndata: a\n")
    q:feed("id: 2\n\n")
    assert.same({ ev("a", nil, "1") }, p:feed("\n"))
    assert.equal("1", p.last_event_id)
    assert.equal(7, p.retry)
    assert.equal("2", q.last_event_id)
    assert.is_nil(q.retry)
  end)

  it("parses what sse.encode writes, event after event", function()
    local p = sse.parser()
    local stream = sse.encode({ data = "one", id = "1" }) .. sse.comment("ping")
      .. sse.encode({ data = "two\nlines", event = "multi" }) .. sse.encode({ retry = 250 })
    local events = {}
    for i = 1, #stream do
      for _, e in ipairs(p:feed(stream:sub(i, i))) do events[#events + 1] = e end
    end
    assert.same({ ev("one", nil, "1"), ev("two\nlines", "multi", "1") }, events)
    assert.equal(250, p.retry)
  end)

  it("has a named metatable and answers nil for unknown fields", function()
    local p = sse.parser()
    assert.truthy(tostring(p):find("^sse%.parser"))
    assert.is_nil(p.nope)
    assert.is_nil(p[1])
  end)

  it("refuses a feed of something other than bytes", function()
    local p = sse.parser()
    local ok, err = pcall(p.feed, p, nil)
    assert.is_false(ok)
    assert.truthy(err:find("bad argument #2", 1, true), err)
    ok, err = pcall(p.feed, {}, "data: a\n\n")
    assert.is_false(ok)
    assert.truthy(err:find("sse.parser expected", 1, true), err)
  end)
  it("starts with the last_event_id given (a reconnecting EventSource's)", function()
    local p = sse.parser({ last_event_id = "41" })
    assert.equal("41", p.last_event_id)
    assert.same({ ev("a", nil, "41"), ev("b") }, p:feed("data: a\n\nid\ndata: b\n\n"))
    assert.equal("", p.last_event_id)
    assert.has_error(function() sse.parser({ last_event_id = "a\nb" }) end,
      "sse.parser: option 'last_event_id' must not contain CR, LF or NUL")
    assert.has_error(function() sse.parser({ last_event_id = 5 }) end,
      "sse.parser: option 'last_event_id' must be a string")
  end)

  describe("with bounds", function()
    it("starts without bounds; max_line and max_event are read back", function()
      local p = sse.parser()
      assert.is_nil(p.max_line)
      assert.is_nil(p.max_event)
      assert.is_false(p.failed)
      local q = sse.parser({ max_line = 10, max_event = 20 })
      assert.equal(10, q.max_line)
      assert.equal(20, q.max_event)
    end)

    it("a line longer than max_line: the events before it, then the error, in any chunking", function()
      local input = "id: 1\ndata: a\n\ndata: 12345\n\ndata: b\n\n"
      for _, ch in ipairs(chunkings(input)) do
        local p = sse.parser({ max_line = 10 })
        local events, err, at = {}, nil, 0
        for _, cut in ipairs(ch[2]) do
          local evs, e = p:feed(input:sub(at + 1, cut))
          for _, x in ipairs(evs) do events[#events + 1] = x end
          err = err or e
          at = cut
        end
        assert.same({ ev("a", nil, "1") }, events, ch[1])
        assert.equal("line longer than 10 bytes", err, ch[1])
        assert.is_true(p.failed, ch[1])
        assert.equal("1", p.last_event_id, ch[1])
      end
    end)

    it("fails as soon as max_line bytes of a line are in, without its line end", function()
      local p = sse.parser({ max_line = 1000 })
      local evs, err = p:feed(("x"):rep(1000))
      assert.same({}, evs)
      assert.is_nil(err)
      evs, err = p:feed("x")
      assert.same({}, evs)
      assert.equal("line longer than 1000 bytes", err)
      -- final: every later feed fails the same way and dispatches nothing
      evs, err = p:feed("\n\ndata: a\n\n")
      assert.same({}, evs)
      assert.equal("line longer than 1000 bytes", err)
    end)

    it("an event's data longer than max_event fails at the data line that passes it", function()
      local p = sse.parser({ max_event = 8 })
      local evs, err = p:feed("data: 1234\ndata: 567\n\n")        -- "1234\n567": 8 bytes
      assert.same({ ev("1234\n567") }, evs)
      assert.is_nil(err)
      evs, err = p:feed("data: 1234\ndata: 5678\n")
      assert.same({}, evs)
      assert.equal("event data longer than 8 bytes", err)
    end)

    it("10 MB of one line in 64 KiB feeds fails at 1 MiB and holds no more", function()
      local p = sse.parser({ max_line = 1048576 })
      local chunk = ("x"):rep(65536)
      local fed, err = 0, nil
      collectgarbage()
      local before = collectgarbage("count")
      p:feed("data: ")
      while fed < 10e6 and not err do
        local _
        _, err = p:feed(chunk)
        fed = fed + #chunk
      end
      assert.equal("line longer than 1048576 bytes", err)
      assert.is_true(fed <= 1048576 + 65536, "failed only after " .. fed .. " bytes")
      assert.is_true(collectgarbage("count") - before < 4096, "Lua memory grew")
    end)

    it("refuses bad options", function()
      assert.has_error(function() sse.parser({ max_line = 0 }) end,
        "sse.parser: option 'max_line' must be a positive integer (bytes)")
      assert.has_error(function() sse.parser({ max_event = 1.5 }) end,
        "sse.parser: option 'max_event' must be a positive integer (bytes)")
      assert.has_error(function() sse.parser({ max_lines = 5 }) end,
        "sse.parser: unknown option 'max_lines'")
      assert.has_error(function() sse.parser(5) end)
    end)
  end)
end)
