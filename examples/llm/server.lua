-- LLM-style token streaming, the way hosted chat APIs do it (OpenAI's chat completions
-- wire format): POST a JSON body, get the answer back as Server-Sent Events, one
-- `data: {chunk}` per token, then `data: [DONE]`.
--   lua5.4 examples/llm/server.lua          then open the printed URL
--   curl -N http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \
--        -d '{"model":"lua-sse-demo","messages":[{"role":"user","content":"Hi"}],"stream":true}'
-- There is no model here: the tokens come from a small deterministic generator (the
-- prompt echoed back plus some canned text), with a delay per token (TOKEN_DELAY seconds,
-- default 0.05) so you can watch them arrive. Any client of a hosted LLM API that lets
-- you set the base URL (http://127.0.0.1:8080/v1) can talk to it.
--
-- As a gateway: UPSTREAM=http://host:port (or a base URL ending in /v1, e.g.
-- https://api.openai.com/v1) forwards POST /v1/chat/completions there instead: the body and
-- the request's Authorization, Content-Type and OpenAI-* headers go upstream
-- (UPSTREAM_API_KEY, if set, is sent as the bearer token instead of the client's); a
-- streamed answer is relayed event by event as it arrives, a whole one (stream: false)
-- answered whole, an upstream error passed through with its status and body, an upstream
-- that cannot be reached answered 502 (504 past UPSTREAM_TIMEOUT seconds, default 300, for
-- a whole answer). A client that stops reading ends the upstream request at once.
--   UPSTREAM=http://127.0.0.1:8080 PORT=8081 lua5.4 examples/llm/server.lua
local sse = require("sse")
local cjson = require("cjson")

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
})
local TOKEN_DELAY = tonumber(os.getenv("TOKEN_DELAY")) or 0.05
local DEFAULT_MODEL = "lua-sse-demo"
local ENDPOINT = "/v1/chat/completions"
local UPSTREAM = os.getenv("UPSTREAM")
if UPSTREAM == "" then UPSTREAM = nil end

-- ---- the "model" ----

local CANNED = "This answer is streamed by lua-sse one token at a time, the way hosted"
  .. " LLM APIs stream theirs: every token is a `data:` line holding a JSON chunk, and"
  .. " the stream ends with `data: [DONE]`.\n\nTokens keep their leading spaces, so the"
  .. " text reads right when the chunks are joined. Nothing is buffered: each chunk"
  .. " leaves the server the moment it is sent."

-- The whole reply to a prompt: deterministic, so tests know what to expect.
local function reply_for(prompt)
  return ('You said: "%s".\n\n%s'):format(prompt, CANNED)
end

-- Word tokens that keep their leading whitespace: "a b\n\nc" -> "a", " b", "\n\nc".
-- Joined, they give back the text (whitespace at the very end excepted; a reply never
-- ends with it).
local function tokenize(text)
  local tokens = {}
  for tok in text:gmatch("%s*%S+") do
    tokens[#tokens + 1] = tok
  end
  return tokens
end

-- ---- the request ----

local function api_error(status, message, param)
  return status, {
    error = { message = message, type = "invalid_request_error", param = param or cjson.null, code = cjson.null },
  }
end

-- A message's content: a string, or (newer clients) an array of parts
-- { type = "text", text = "..." } whose texts are joined. nil if it is neither.
local function text_of(content)
  if type(content) == "string" then return content end
  if type(content) ~= "table" or #content == 0 then return nil end
  local texts = {}
  for i, part in ipairs(content) do
    if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then return nil end
    texts[i] = part.text
  end
  return table.concat(texts)
end

-- Checks an OpenAI-style chat request. Returns the request table, or nil, status, body.
local function parse_request(body)
  if body == nil or body == "" then
    return nil, api_error(400, "the request body must be a JSON object with 'messages'")
  end
  local ok, req = pcall(cjson.decode, body)
  if not ok then
    return nil, api_error(400, "the request body is not valid JSON: " .. tostring(req))
  end
  if type(req) ~= "table" or req[1] ~= nil then
    return nil, api_error(400, "the request body must be a JSON object")
  end
  local messages = req.messages
  if messages == nil or messages == cjson.null then
    return nil, api_error(400, "'messages' is required", "messages")
  end
  if type(messages) ~= "table" or #messages == 0 then
    return nil, api_error(400, "'messages' must be a non-empty array", "messages")
  end
  for i, m in ipairs(messages) do
    local content = type(m) == "table" and text_of(m.content)
    if not content or type(m.role) ~= "string" then
      return nil, api_error(400, ("'messages[%d]' must have a string 'role' and a 'content' that is a"
        .. " string or an array of text parts"):format(i - 1), "messages")
    end
    m.content = content
  end
  if req.model ~= nil and req.model ~= cjson.null and type(req.model) ~= "string" then
    return nil, api_error(400, "'model' must be a string", "model")
  end
  local max = req.max_tokens                -- cjson decodes every number as a float
  if max == cjson.null then max = nil end
  if max ~= nil then
    max = type(max) == "number" and math.tointeger(max) or nil
    if not max or max < 1 then
      return nil, api_error(400, "'max_tokens' must be a positive integer", "max_tokens")
    end
  end
  local prompt = ""
  for _, m in ipairs(messages) do
    if m.role == "user" then prompt = m.content end
  end
  local opts = type(req.stream_options) == "table" and req.stream_options or {}
  return {
    model = type(req.model) == "string" and req.model or DEFAULT_MODEL,
    prompt = prompt,
    stream = req.stream == true,
    max_tokens = max,
    include_usage = opts.include_usage == true,
  }
end

local function completion_id()
  local hex = {}
  for i = 1, 24 do hex[i] = ("%x"):format(math.random(0, 15)) end
  return "chatcmpl-" .. table.concat(hex)
end

-- The tokens of the answer, cut at max_tokens; and why it stopped.
local function answer(chat)
  local tokens = tokenize(reply_for(chat.prompt))
  local finish = "stop"
  if chat.max_tokens and #tokens > chat.max_tokens then
    for i = #tokens, chat.max_tokens + 1, -1 do tokens[i] = nil end
    finish = "length"
  end
  return tokens, finish
end

local function usage(chat, completion_tokens)
  local prompt_tokens = #tokenize(chat.prompt)
  return {
    prompt_tokens = prompt_tokens,
    completion_tokens = completion_tokens,
    total_tokens = prompt_tokens + completion_tokens,
  }
end

-- Validation runs before the stream starts, so a bad request gets a plain 400 with a
-- JSON error instead of a 200 event stream. A request with "stream": false (or none)
-- is answered here too, with the whole completion as one JSON object.
local function check_or_answer(req)
  if req.path ~= ENDPOINT or req.method ~= "POST" then return end
  local chat, status, body = parse_request(req.body)
  if not chat then return status, body end
  req.chat = chat
  if not chat.stream then
    local tokens, finish = answer(chat)
    return 200, {
      id = completion_id(), object = "chat.completion", created = os.time(), model = chat.model,
      choices = { {
        index = 0,
        message = { role = "assistant", content = table.concat(tokens) },
        finish_reason = finish,
      } },
      usage = usage(chat, #tokens),
    }
  end
end

-- ---- the stream ----

local function stream_answer(stream, req)
  local chat = req.chat
  local id, created = completion_id(), os.time()
  local function chunk(delta, finish)
    return {
      id = id, object = "chat.completion.chunk", created = created, model = chat.model,
      choices = { { index = 0, delta = delta, finish_reason = finish or cjson.null } },
    }
  end

  local tokens, finish = answer(chat)
  local function left(sent)
    io.stderr:write(("llm: the client left after %d of %d tokens: generation stopped\n"):format(sent, #tokens))
  end
  -- Hosted APIs open with the role, then send the content a token at a time.
  if not stream:send({ data = chunk({ role = "assistant", content = "" }) }) then return left(0) end
  for i, tok in ipairs(tokens) do
    -- nil: the client went away (closed the tab, pressed stop): stop generating.
    if not stream:sleep(TOKEN_DELAY) then return left(i - 1) end
    if not stream:send({ data = chunk({ content = tok }) }) then return left(i - 1) end
  end
  -- The last chunk: an empty delta (cjson encodes {} as an object) and why it stopped.
  if not stream:send({ data = chunk({}, finish) }) then return end
  if chat.include_usage then
    -- With stream_options.include_usage, one more chunk: no choices, the token counts.
    -- (lua-cjson 2.1 has no empty-array marker: write the empty "choices" array by hand.)
    local last = chunk({})
    last.choices = nil
    last.usage = usage(chat, #tokens)
    local json = cjson.encode(last):gsub("^{", '{"choices":[],', 1)
    stream:send({ data = json })
  end
  stream:send({ data = "[DONE]" })
  -- Returning ends the response: the client sees the end of the body.
end

-- ---- the gateway (UPSTREAM set) ----

local function gateway(base)
  base = base:gsub("/+$", "")
  local target = base:match("/v1$") and base .. "/chat/completions" or base .. ENDPOINT
  local api_key = os.getenv("UPSTREAM_API_KEY")
  local timeout = tonumber(os.getenv("UPSTREAM_TIMEOUT")) or 300

  local function gateway_error(status, message)
    return status, { error = { message = message, type = "upstream_error", param = cjson.null,
      code = status == 504 and "gateway_timeout" or "bad_gateway" } }
  end

  -- What goes upstream: the body as it came, and the headers that say who asks and what.
  local function upstream_headers(req)
    local h = {}
    for name, value in pairs(req.headers) do
      if name == "authorization" or name == "content-type" or name == "accept"
          or name:match("^openai%-") then
        h[name] = value
      end
    end
    if api_key and api_key ~= "" then h.authorization = "Bearer " .. api_key end
    return h
  end

  -- What comes back with an answer or an error: its type, and what tells a client about
  -- the request and its limits.
  local function downstream_headers(headers)
    local h = {}
    for name, value in pairs(headers) do
      if name == "content-type" or name == "retry-after" or name == "x-request-id"
          or name:match("^openai%-") or name:match("^x%-ratelimit%-") then
        h[name] = value
      end
    end
    return h
  end

  local function unreachable(req, err, kind)
    io.stderr:write(("llm gateway: %s %s: %s\n"):format(req.method, target, tostring(err)))
    if kind == "timeout" then return gateway_error(504, "the upstream did not answer in time") end
    return gateway_error(502, "the upstream could not be reached")
  end

  -- Which answer the client asked for: the body's "stream" (anything unreadable goes
  -- upstream as it is, whose error the client then gets).
  local function wants_stream(body)
    local ok, t = pcall(cjson.decode, body or "")
    return ok and type(t) == "table" and t.stream == true
  end

  -- A whole answer (stream: false): forwarded, and answered as the upstream answered.
  app:before(function(req)
    if req.path ~= ENDPOINT or req.method ~= "POST" then return end
    if wants_stream(req.body) then return end    -- the stream route below
    local res, err, kind = app:fetch(target, {
      method = "POST", body = req.body or "", headers = upstream_headers(req), timeout = timeout,
    })
    if not res then return unreachable(req, err, kind) end
    return res.status, res.body, downstream_headers(res.headers)
  end)

  -- A streamed answer: the upstream request is made before the client gets any byte, so
  -- an error status (a 400 for a bad request, a 401 for a bad key, a 429) reaches the
  -- client as that status with its body, not as a 200 stream.
  local function accept(req)
    local res, err, kind = app:fetch(target, {
      stream = true, method = "POST", body = req.body or "", headers = upstream_headers(req),
    })
    if not res then return unreachable(req, err, kind) end
    local ctype = (res.headers["content-type"] or ""):match("^%s*([^;%s]+)") or ""
    if res.status ~= 200 or ctype:lower() ~= "text/event-stream" then
      local parts, size = {}, 0
      while size < 1048576 do
        local piece = res:read()
        if not piece then break end
        parts[#parts + 1] = piece
        size = size + #piece
      end
      res:close()
      return res.status, table.concat(parts), downstream_headers(res.headers)
    end
    req.upstream = res
  end

  -- The events as they arrive: each one re-encoded as it was (event, data, id), so the
  -- client reads the upstream's `data: {chunk}` ... `data: [DONE]` unchanged.
  app:stream(ENDPOINT, function(stream, req)
    -- bounded as app:eventsource bounds its parser: an upstream cannot grow it without end
    local res, parser, id = req.upstream, sse.parser({ max_line = 1 << 20, max_event = 16 << 20 }), ""
    req.upstream = nil
    local function failed(err)
      -- the upstream failed mid-answer: tell the client the way hosted APIs do
      if not stream.closed then
        stream:send({ data = { error = { message = "the upstream stream failed: " .. tostring(err),
          type = "upstream_error" } } })
      end
      res:close()
    end
    while true do
      local piece, err = res:read()
      if not piece then
        if err then return failed(err) end
        break
      end
      local events, bad = parser:feed(piece)
      for _, ev in ipairs(events) do
        local out = { data = ev.data }
        if ev.event ~= "message" then out.event = ev.event end
        if ev.id ~= id then out.id, id = ev.id, ev.id end
        -- nil: the client went away (closed the tab, pressed stop): the upstream request
        -- ends with this generator (res:close), so the model upstream stops generating.
        if not stream:send(out) then res:close() return end
      end
      if bad then return failed(bad) end
    end
    res:close()
  end, { method = "POST", accept = accept })
end

if UPSTREAM then
  gateway(UPSTREAM)
else
  app:before(check_or_answer)
  app:stream(ENDPOINT, stream_answer, { method = "POST" })
end

-- ---- the page ----

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local function read_page()
  local f = assert(io.open(here .. "/index.html", "rb"))
  local html = f:read("a")
  f:close()
  return html
end
read_page()   -- fail at start, not at the first request, if the page is missing

app:get("/", function()
  -- Read on every request, so edits to index.html show on reload.
  return 200, read_page(), { ["Content-Type"] = "text/html; charset=utf-8" }
end)

assert(app:listen())
print("llm: open " .. app.url .. "/  (API: POST " .. app.url .. ENDPOINT .. ")")
app:run()
