-- Protecting a stream. EventSource cannot send an Authorization header, so a stream is
-- protected in one of two ways, both shown here:
--
--   (a) a session cookie, for a page served by this same server:
--         POST /login   {user, password} (JSON or a form)  sets an HttpOnly cookie
--         GET  /events  the logged-in user's stream; 401 without a valid session
--         POST /logout  revokes the session and ends its open streams
--   (b) a scoped ?token=, for a URL handed to something that has no cookie (another
--       origin, a native client, a proxy you do not trust with the session):
--         POST /tokens  {topic} (needs the cookie): a short-lived token for that topic only
--         GET  /feed/:topic?token=...  401 when the token is missing or unknown,
--                                      403 when it is for another topic or has expired
--
-- Every check runs in app:before, so a refused client gets a plain HTTP answer and no
-- stream (and no coroutine) is ever started for it.
--
-- Ending a client for good. When a stream ends, EventSource reconnects by itself after
-- the retry delay and sends `Last-Event-ID` (the last id it received). After a logout the
-- session is gone, so that reconnect must be refused — and refused with 204, not 401:
-- the HTML spec names 204 No Content as the way to tell EventSource "stop reconnecting".
-- (Any non-200 answer stops a browser's EventSource, but a logout is not an error: 204
-- keeps it out of error logs and alerting, and is what reconnecting clients and
-- polyfills are written to honour.) A request without Last-Event-ID is a first attempt,
-- and gets the 401 that says "log in first".
--
--   lua5.4 examples/auth.lua         then open the printed URL; log in as demo / demo
--   curl -si -c jar -d user=demo -d password=demo http://127.0.0.1:8080/login
--   curl -sN -b jar http://127.0.0.1:8080/events
--
-- Environment: HOST, PORT (0 picks a free port), SESSION_TTL and TOKEN_TTL (seconds,
-- default 3600 and 60), INTERVAL (seconds between events, default 0.25).
local sse = require("sse")
local cjson = require("cjson")

local SESSION_TTL = tonumber(os.getenv("SESSION_TTL")) or 3600
local TOKEN_TTL = tonumber(os.getenv("TOKEN_TTL")) or 60
local INTERVAL = tonumber(os.getenv("INTERVAL")) or 0.25

-- The one demo account: user "demo", password "demo". A real server checks a password
-- hash from its user store here (and rate-limits attempts).
local USERS = { demo = "demo" }

local app = sse.app({
  host = os.getenv("HOST") or "127.0.0.1",
  port = tonumber(os.getenv("PORT")) or 8080,
  retry = 1000,   -- EventSource reconnects 1 s after a stream ends
})

-- ---------------------------------------------------------------------------------------
-- Sessions and tokens: random ids from the kernel, kept in memory with an expiry.

local urandom = assert(io.open("/dev/urandom", "rb"))

local function random_id()
  return (urandom:read(16):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local sessions = {}   -- sid -> { sid =, user =, streams = { [stream] = true }, timer = }
local tokens = {}     -- token -> { sid =, user =, topic =, expired = false }

-- Ends a session: forgets it, and closes its open streams (their browsers reconnect with
-- Last-Event-ID, get 204 and stop). Its tokens stop working with it.
local function end_session(sid)
  local s = sessions[sid]
  if not s then return end
  sessions[sid] = nil
  s.timer:cancel()
  for stream in pairs(s.streams) do stream:close() end
end

-- Expiry is a timer per session and per token (millisecond resolution, nothing to sweep).
local function new_session(user)
  local sid = random_id()
  sessions[sid] = {
    sid = sid, user = user, streams = {},
    timer = app:after(SESSION_TTL, function() end_session(sid) end),
  }
  return sid
end

local function new_token(s, topic)
  local tok = random_id()
  local k = { sid = s.sid, user = s.user, topic = topic, expired = false }
  tokens[tok] = k
  app:after(TOKEN_TTL, function() k.expired = true end)
  -- An expired token is kept ten minutes more, so using it answers "expired" (403)
  -- rather than "unknown" (401).
  app:after(TOKEN_TTL + 600, function() tokens[tok] = nil end)
  return tok
end

-- The session of a request's `sid` cookie, if it is valid.
local function session_of(req)
  local sid = req.cookies.sid
  return sid and sessions[sid]
end

-- ---------------------------------------------------------------------------------------
-- Request bodies: JSON or an HTML form.

local function unescape(s)
  return (s:gsub("%+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function form_decode(body)
  local out = {}
  for pair in body:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    out[unescape(k)] = unescape(v)
  end
  return out
end

local function body_fields(req)
  local body = req.body or ""
  local ctype = (req.headers["content-type"] or ""):lower()
  if ctype:find("application/json", 1, true) then
    local ok, t = pcall(cjson.decode, body)
    return ok and type(t) == "table" and t or {}
  end
  return form_decode(body)
end

local function is_form(req)
  return not (req.headers["content-type"] or ""):lower():find("application/json", 1, true)
end

-- ---------------------------------------------------------------------------------------
-- (a) The session cookie.

-- HttpOnly: page scripts cannot read it (an injected script cannot steal it).
-- SameSite=Lax: other sites' pages cannot make the browser send it with a POST, which
-- protects /logout and /tokens from cross-site requests. Behind HTTPS add secure = true.
local function session_cookie(sid, max_age)
  return sse.cookie("sid", sid, { path = "/", http_only = true, same_site = "Lax", max_age = max_age })
end

app:post("/login", function(req)
  local f = body_fields(req)
  local user, password = f.user, f.password
  if type(user) ~= "string" or type(password) ~= "string" or USERS[user] ~= password then
    return 401, { error = "wrong user or password (the demo account is demo / demo)" }
  end
  local old = session_of(req)
  if old then end_session(old.sid) end      -- a new login gets a new id (no fixation)
  local sid = new_session(user)
  local headers = { ["Set-Cookie"] = session_cookie(sid, math.ceil(SESSION_TTL)) }
  if is_form(req) then
    -- A plain HTML form post: back to the page, which now has the cookie.
    headers.Location = "/"
    return 303, "logged in as " .. user .. "\n", headers
  end
  return 200, { user = user, expires_in = SESSION_TTL }, headers
end)

app:post("/logout", function(req)
  local s = session_of(req)
  if s then end_session(s.sid) end
  return 200, { logged_out = s ~= nil }, { ["Set-Cookie"] = session_cookie("", 0) }
end)

app:get("/me", function(req)
  local s = session_of(req)
  if not s then return 401, { error = "not logged in" } end
  return { user = s.user }
end)

-- ---------------------------------------------------------------------------------------
-- (b) Scoped tokens.

app:post("/tokens", function(req)
  local s = session_of(req)
  if not s then return 401, { error = "not logged in: POST /login first" } end
  local topic = body_fields(req).topic
  if type(topic) ~= "string" or not topic:match("^[%w_-]+$") then
    return 400, { error = "topic must be letters, digits, '_' or '-'" }
  end
  local tok = new_token(s, topic)
  return 201, {
    token = tok, topic = topic, expires_in = TOKEN_TTL,
    url = "/feed/" .. topic .. "?token=" .. tok,
  }
end)

-- ---------------------------------------------------------------------------------------
-- The guard: every stream request is checked here, before any stream starts.

-- 401 means "log in first". But a request that carries Last-Event-ID is EventSource
-- reconnecting by itself after its stream ended (logout, session or server gone): its
-- credentials will not come back, so it gets 204, "stop reconnecting", instead.
local function refuse(req, status, message)
  if req.last_event_id and status == 401 then
    return 204
  end
  return status, message .. "\n"
end

app:before(function(req)
  if req.path == "/events" then
    local s = session_of(req)
    if not s then
      return refuse(req, 401, "not logged in: POST /login first, then open /events with the cookie")
    end
    req.session = s          -- the same req reaches the stream function
  elseif req.path:match("^/feed/") then
    local tok = req.query.token
    if not tok or tok == "" then
      return refuse(req, 401, "missing ?token=: get one from POST /tokens")
    end
    local k = tokens[tok]
    if not k then
      return refuse(req, 401, "unknown token")
    end
    local s = sessions[k.sid]
    if not s then
      -- The session that issued the token ended (logout): the token ended with it.
      return refuse(req, 401, "the session that issued this token has ended")
    end
    if k.topic ~= req.params.topic then
      return 403, "this token is for /feed/" .. k.topic .. " only\n"
    end
    if k.expired then
      -- The token only opens a stream: an open stream outlives it, but a connection
      -- (or a reconnect) after it expired needs a fresh token from POST /tokens.
      return 403, "token expired: get a new one from POST /tokens\n"
    end
    req.session = s
  end
end)

-- ---------------------------------------------------------------------------------------
-- The streams. Every event has an id, so a reconnect carries Last-Event-ID: it resumes
-- after it (while the session lives) or gets 204 (once it has ended).

local function serve(stream, req, event, payload)
  local s = req.session
  s.streams[stream] = true
  stream:on_close(function() s.streams[stream] = nil end)
  local n = math.tointeger(tonumber(req.last_event_id or "")) or 0
  while true do
    n = n + 1
    if not stream:send({ event = event, id = n, data = payload(n) }) then return end
    if not stream:sleep(INTERVAL) then return end
  end
end

app:stream("/events", function(stream, req)
  serve(stream, req, "tick", function(n)
    return { user = req.session.user, n = n, time = os.date("!%H:%M:%S") }
  end)
end)

app:stream("/feed/:topic", function(stream, req)
  serve(stream, req, "item", function(n)
    return { topic = req.params.topic, user = req.session.user, n = n }
  end)
end)

-- ---------------------------------------------------------------------------------------
-- The page.

local page = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lua-sse auth</title>
<style>
  body { font: 16px system-ui, sans-serif; margin: 2em auto; max-width: 42em; }
  fieldset { margin: 1em 0; } #log { font: 13px ui-monospace, monospace; height: 16em;
  overflow: auto; background: #f6f6f6; padding: .5em; white-space: pre-wrap; }
  #who { font-weight: 600; }
</style></head>
<body>
  <h1>Protected streams</h1>
  <p>Signed in: <span id="who">nobody</span></p>
  <form id="login" method="post" action="/login">
    <fieldset><legend>Log in (demo / demo)</legend>
      <input name="user" value="demo" autocomplete="username">
      <input name="password" type="password" value="demo" autocomplete="current-password">
      <button>Log in</button>
    </fieldset>
  </form>
  <fieldset><legend>Streams</legend>
    <button id="events">Open /events (cookie)</button>
    <input id="topic" value="news" size="8"> <button id="feed">Open /feed/topic (token)</button>
    <button id="logout">Log out</button>
  </fieldset>
  <div id="log"></div>
  <script>
    const $ = (id) => document.getElementById(id);
    const log = (text) => { $("log").textContent += text + "\n"; $("log").scrollTop = 1e9; };
    const sources = new Set();

    async function whoami() {
      const res = await fetch("/me");
      $("who").textContent = res.ok ? (await res.json()).user : "nobody";
    }

    // The server ends a stream on logout; EventSource reconnects with Last-Event-ID, is
    // answered 204 and closes for good (readyState CLOSED): nothing to do here but say so.
    function watch(url, label, type) {
      const es = new EventSource(url);
      sources.add(es);
      es.onopen = () => log(label + ": open");
      es.addEventListener(type, (e) => log(label + " #" + e.lastEventId + " " + e.data));
      es.onerror = () => {
        if (es.readyState === EventSource.CLOSED) {
          log(label + ": closed by the server (not logged in, logged out, or token refused)");
          sources.delete(es);
        } else {
          log(label + ": reconnecting…");
        }
      };
    }

    $("login").addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = JSON.stringify(Object.fromEntries(new FormData(e.target)));
      const res = await fetch("/login", { method: "POST", body,
        headers: { "Content-Type": "application/json" } });
      log("login: " + res.status + " " + await res.text());
      whoami();
    });
    $("events").onclick = () => watch("/events", "/events", "tick");
    $("feed").onclick = async () => {
      const res = await fetch("/tokens", { method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ topic: $("topic").value }) });
      const t = await res.json();
      if (!res.ok) { log("token: " + res.status + " " + t.error); return; }
      watch(t.url, "/feed/" + t.topic, "item");
    };
    $("logout").onclick = async () => {
      const res = await fetch("/logout", { method: "POST" });
      log("logout: " + res.status + " " + await res.text());
      whoami();
    };
    whoami();
  </script>
</body></html>
]]

app:get("/", function()
  return 200, page, { ["Content-Type"] = "text/html; charset=utf-8" }
end)

assert(app:listen())
print("auth: open " .. app.url .. "/  (log in as demo / demo; stream: " .. app.url .. "/events)")
app:run()
