-- sse.encode and sse.comment: the exact bytes of each event, the errors that name the
-- offending field, and for every data case what a browser's EventSource would report
-- (checked by feeding the bytes to sse.parser, which implements the same WHATWG rules).
local sse = require("sse")
local cjson = require("cjson")

-- Bytes made readable in a failure message.
local function show(s)
  return (s:gsub("\r", "\\r"):gsub("\n", "\\n"):gsub("%z", "\\0"))
end

-- The one change the protocol makes to data: CRLF and lone CR arrive as LF.
local function as_browser_sees(s)
  return (s:gsub("\r\n", "\n"):gsub("\r", "\n"))
end

local function parse(bytes)
  local p = sse.parser()
  return p:feed(bytes), p
end

-- name, event, the exact bytes, and the data text a client must receive
-- (nil when the event carries no data).
local cases = {
  { "plain string", "hello", "data: hello\n\n", "hello" },
  { "string in a table", { data = "hello" }, "data: hello\n\n", "hello" },
  { "LF", "a\nb", "data: a\ndata: b\n\n", "a\nb" },
  { "CRLF", "a\r\nb", "data: a\ndata: b\n\n", "a\nb" },
  { "lone CR", "a\rb", "data: a\ndata: b\n\n", "a\nb" },
  { "CR CR is two line breaks", "a\r\rb", "data: a\ndata: \ndata: b\n\n", "a\n\nb" },
  { "LF CR is two line breaks", "a\n\rb", "data: a\ndata: \ndata: b\n\n", "a\n\nb" },
  { "mixed line breaks", "1\r2\n3\r\n4", "data: 1\ndata: 2\ndata: 3\ndata: 4\n\n", "1\n2\n3\n4" },
  { "trailing LF", "abc\n", "data: abc\ndata: \n\n", "abc\n" },
  { "trailing CRLF", "abc\r\n", "data: abc\ndata: \n\n", "abc\n" },
  { "trailing CR", "abc\r", "data: abc\ndata: \n\n", "abc\n" },
  { "two trailing LFs", "abc\n\n", "data: abc\ndata: \ndata: \n\n", "abc\n\n" },
  { "leading LF", "\nabc", "data: \ndata: abc\n\n", "\nabc" },
  { "only a LF", "\n", "data: \ndata: \n\n", "\n" },
  { "empty string", "", "data: \n\n", "" },
  { "leading space (an LLM token)", " the", "data:  the\n\n", " the" },
  { "leading spaces on every line", "  a\n b", "data:   a\ndata:  b\n\n", "  a\n b" },
  { "only spaces", "   ", "data:    \n\n", "   " },
  { "tab", "\tx", "data: \tx\n\n", "\tx" },
  { "looks like a comment", ": x", "data: : x\n\n", ": x" },
  { "looks like fields", "id: 5\nevent: x\n\nretry: 1",
    "data: id: 5\ndata: event: x\ndata: \ndata: retry: 1\n\n", "id: 5\nevent: x\n\nretry: 1" },
  { "NUL byte", "a\0b", "data: a\0b\n\n", "a\0b" },
  { "unicode", "h\u{e9}llo \u{2713} \u{1F600}", "data: h\u{e9}llo \u{2713} \u{1F600}\n\n",
    "h\u{e9}llo \u{2713} \u{1F600}" },
  { "unicode line separator is not a line break", "a\u{2028}b", "data: a\u{2028}b\n\n", "a\u{2028}b" },
  { "BOM inside data", "\u{FEFF}x", "data: \u{FEFF}x\n\n", "\u{FEFF}x" },
  { "integer", { data = 42 }, "data: 42\n\n", "42" },
  { "negative integer", { data = -7 }, "data: -7\n\n", "-7" },
  { "largest integer", { data = math.maxinteger }, "data: 9223372036854775807\n\n",
    "9223372036854775807" },
  { "float", { data = 1.5 }, "data: 1.5\n\n", "1.5" },
  { "float with an integer value", { data = 3.0 }, "data: 3.0\n\n", "3.0" },
  { "large float", { data = 1e100 }, "data: 1e+100\n\n", "1e+100" },
  { "true", { data = true }, "data: true\n\n", "true" },
  { "false", { data = false }, "data: false\n\n", "false" },
  { "JSON object", { data = { a = 1 } }, 'data: {"a":1}\n\n', '{"a":1}' },
  { "JSON array", { data = { 1, 2, 3 } }, "data: [1,2,3]\n\n", "[1,2,3]" },
  { "JSON string with a newline stays one line", { data = { s = "a\nb" } },
    'data: {"s":"a\\nb"}\n\n', '{"s":"a\\nb"}' },
  { "empty table", { data = {} }, "data: {}\n\n", "{}" },
  { "event name", { data = "x", event = "update" }, "event: update\ndata: x\n\n", "x" },
  { "numeric event name", { data = "x", event = 3 }, "event: 3\ndata: x\n\n", "x" },
  { "id", { data = "x", id = "42" }, "id: 42\ndata: x\n\n", "x" },
  { "numeric id", { data = "x", id = 42 }, "id: 42\ndata: x\n\n", "x" },
  { "float id", { data = "x", id = 1.5 }, "id: 1.5\ndata: x\n\n", "x" },
  { "empty id (resets the client's last id)", { data = "x", id = "" }, "id: \ndata: x\n\n", "x" },
  { "retry", { data = "x", retry = 5000 }, "retry: 5000\ndata: x\n\n", "x" },
  { "retry as an integral float", { retry = 3000.0 }, "retry: 3000\n\n" },
  { "retry 0", { retry = 0 }, "retry: 0\n\n" },
  { "comment with data", { data = "x", comment = "hi" }, ": hi\ndata: x\n\n", "x" },
  { "multi-line comment", { comment = "a\r\nb\rc\n" }, ": a\n: b\n: c\n:\n\n" },
  { "empty comment", { comment = "" }, ":\n\n" },
  { "every field, in wire order",
    { data = "a\nb", event = "e", id = "7", retry = 3, comment = "c" },
    ": c\nevent: e\nid: 7\nretry: 3\ndata: a\ndata: b\n\n", "a\nb" },
  { "several converted fields at once", { data = { x = 1 }, id = 5, event = 6 },
    'event: 6\nid: 5\ndata: {"x":1}\n\n', '{"x":1}' },
  { "id and event without data", { id = "9", event = "e" }, "event: e\nid: 9\n\n" },
}

-- event, then the message the error must contain
local errors = {
  { { data = "x", event = "a\nb" }, "sse.encode: field 'event' must not contain CR or LF" },
  { { data = "x", event = "a\rb" }, "sse.encode: field 'event' must not contain CR or LF" },
  { { data = "x", event = "a\r\n" }, "sse.encode: field 'event' must not contain CR or LF" },
  { { data = "x", id = "1\n" }, "sse.encode: field 'id' must not contain CR, LF or NUL" },
  { { data = "x", id = "\r1" }, "sse.encode: field 'id' must not contain CR, LF or NUL" },
  { { data = "x", id = "1\0" }, "sse.encode: field 'id' must not contain CR, LF or NUL" },
  { { data = "x", id = "1\ndata: injected" }, "sse.encode: field 'id' must not contain CR, LF or NUL" },
  { { event = true }, "sse.encode: field 'event' must be a string or a number" },
  { { id = {} }, "sse.encode: field 'id' must be a string or a number" },
  { { retry = -1 }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { retry = 1.5 }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { retry = "10" }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { retry = math.huge }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { retry = 0 / 0 }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { retry = true }, "sse.encode: field 'retry' must be a non-negative integer" },
  { { comment = 5 }, "sse.encode: field 'comment' must be a string" },
  { { data = print }, "sse.encode: field 'data' must be a string, number, boolean or table" },
  { { data = { f = print } }, "sse.encode: field 'data': " },
  { { evnet = "x", data = "y" }, "sse.encode: unknown field 'evnet'" },
  { { Data = "x" }, "sse.encode: unknown field 'Data'" },
  { { "x" }, "sse.encode: unknown field [1]" },
}

describe("sse.encode", function()
  for _, c in ipairs(cases) do
    local name, ev, want, text = c[1], c[2], c[3], c[4]

    it("encodes " .. name, function()
      local got = sse.encode(ev)
      assert.equal(show(want), show(got))
    end)

    it("reaches a client intact: " .. name, function()
      local events, p = parse(sse.encode(ev))
      if text == nil then
        assert.same({}, events)
      else
        local id = type(ev) == "table" and ev.id ~= nil and tostring(ev.id) or ""
        local event = type(ev) == "table" and ev.event ~= nil and tostring(ev.event) or "message"
        assert.equal(1, #events)
        assert.equal(show(as_browser_sees(text)), show(events[1].data))
        assert.equal(event, events[1].event)
        assert.equal(id, events[1].id)
      end
      if type(ev) == "table" and ev.retry then
        assert.equal(math.tointeger(ev.retry), p.retry)
      end
    end)
  end

  it("round-trips a table through JSON", function()
    local value = { name = "caf\u{e9}", list = { 1, 2.5, "three" }, nested = { ok = true } }
    local events = parse(sse.encode({ data = value }))
    assert.same(value, cjson.decode(events[1].data))
  end)

  it("sends an id without data, which updates the client's last event id but dispatches nothing", function()
    local p = sse.parser()
    assert.same({}, p:feed(sse.encode({ id = "5" })))
    assert.equal("5", p.last_event_id)
    local events = p:feed(sse.encode("next"))
    assert.equal("5", events[1].id)
  end)

  it("does not change the table it encodes", function()
    local ev = { data = 42, id = 7, event = 1.5 }
    sse.encode(ev)
    assert.equal(math.type(42), math.type(ev.data))
    assert.equal(7, ev.id)
    assert.equal(1.5, ev.event)
  end)

  it("keeps converted fields valid while the garbage collector runs", function()
    -- Fresh numbers and tables each time: their texts exist only as new strings, which
    -- an aggressive collector would free if the encoder did not keep them on the stack.
    collectgarbage("incremental", 1, 1000)
    local ok, err = pcall(function()
      for i = 1, 2000 do
        local got = sse.encode({ data = { n = i }, id = i * 3, event = i + 0.5 })
        local want = ("event: %s\nid: %d\ndata: {\"n\":%d}\n\n"):format(tostring(i + 0.5), i * 3, i)
        if got ~= want then
          error(("iteration %d: %s"):format(i, show(got)))
        end
      end
    end)
    collectgarbage("incremental", 200, 100)
    assert(ok, err)
  end)

  for n, c in ipairs(errors) do
    local ev, message = c[1], c[2]
    it(("refuses case %d: %s"):format(n, message), function()
      local ok, err = pcall(sse.encode, ev)
      assert.is_false(ok)
      assert.is_string(err)
      assert.truthy(err:find(message, 1, true), ("error %q does not contain %q"):format(err, message))
    end)
  end

  -- issue 8, defect 14: a number or boolean is the data, as it is in { data = x }
  it("takes a number or boolean as the data, and refuses other non-tables", function()
    assert.are.equal("data: 5\n\n", sse.encode(5))
    assert.are.equal("data: true\n\n", sse.encode(true))
    for _, v in ipairs({ print, coroutine.create(print) }) do
      local ok, err = pcall(sse.encode, v)
      assert.is_false(ok)
      assert.truthy(err:find("bad argument #1", 1, true), err)
      assert.truthy(err:find("string, number, boolean or table expected", 1, true), err)
    end
    local ok, err = pcall(sse.encode)
    assert.is_false(ok)
    assert.truthy(err:find("bad argument #1", 1, true), err)
  end)

  it("encodes long data with many mixed line breaks", function()
    local breaks = { "\n", "\r\n", "\r" }
    local parts = {}
    for i = 1, 3000 do
      parts[#parts + 1] = (" "):rep(i % 3) .. "line " .. i
      parts[#parts + 1] = breaks[i % 3 + 1]
    end
    local text = table.concat(parts)
    local got = sse.encode(text)
    local _, lines = got:gsub("data: ", "")
    assert.equal(3001, lines)
    local events = parse(got)
    assert.equal(as_browser_sees(text), events[1].data)
  end)
end)

describe("sse.comment", function()
  local comments = {
    { "ping", ": ping\n\n" },
    { "", ":\n\n" },
    { " x", ":  x\n\n" },
    { "a\nb", ": a\n: b\n\n" },
    { "a\r\nb", ": a\n: b\n\n" },
    { "a\rb", ": a\n: b\n\n" },
    { "a\n", ": a\n:\n\n" },
  }
  for _, c in ipairs(comments) do
    it("writes " .. show(c[1] == "" and "an empty comment" or c[1]), function()
      assert.equal(show(c[2]), show(sse.comment(c[1])))
    end)
    it("is ignored by a client: " .. show(c[1]), function()
      local events, p = parse(sse.comment(c[1]) .. sse.encode("after"))
      assert.equal(1, #events)
      assert.equal("after", events[1].data)
      assert.equal("", p.last_event_id)
    end)
  end

  it("writes a bare heartbeat without text", function()
    assert.equal(":\n\n", sse.comment())
  end)

  it("needs a string when given text", function()
    local ok, err = pcall(sse.comment, {})
    assert.is_false(ok)
    assert.truthy(err:find("bad argument #1", 1, true), err)
  end)
end)
