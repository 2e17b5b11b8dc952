/* The binding of sse_server, streams and timers to Lua.
 *
 * Lua runs only from the hooks of sse_server and sse_loop, all of them inside step()
 * on the thread that called it, each under pcall: an error in user code is logged and
 * contained. Each stream's generator is a coroutine driven from here: stream:send and
 * stream:sleep yield (lua_yield, so the values a resume passes become their results).
 *
 * Ownership: a userdata (server, stream, timer) holds its C object; while the C side
 * may still call back (stream open, timer armed) the userdata is anchored (lsse_anchor:
 * in a table of the server's, not the registry, so a dropped app is collected), and
 * released in exactly one place (stream_closed, timer fired or cancelled). A timer keeps
 * its server userdata alive as a user value, so using it after the app is gone is safe.
 */
#include "lsse.h"
#include "sse_server.h"
#include "sse_channel.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TIMER_MT  "sse.timer"
#define MAX_HEADERS 64

typedef struct lsse_timer {
    sse_timer    t;
    lsse_server *b;
    int          self_ref;   /* anchored while armed; the callback is user value 1 */
} lsse_timer;

static const char *level_names[] = { "error", "warn", "info", "debug" };

/* ---- anchors ---- */

/* Registry: a weak-valued table, server -> its anchors table. The server userdata holds
 * the table strongly (its user value), so this lookup never keeps anything alive. */
static const char anchors_key = 'a';

static void push_anchors(lua_State *L, lsse_server *b)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_rawgetp(L, -1, b);
    lua_remove(L, -2);
}

int lsse_anchor(lua_State *L, lsse_server *b)
{
    push_anchors(L, b);
    if (!lua_istable(L, -1)) {    /* the server is being collected */
        lua_pop(L, 2);
        return LUA_NOREF;
    }
    lua_insert(L, -2);
    int ref = luaL_ref(L, -2);
    lua_pop(L, 1);
    return ref;
}

void lsse_unanchor(lua_State *L, lsse_server *b, int *ref)
{
    if (*ref == LUA_NOREF)
        return;
    push_anchors(L, b);
    if (lua_istable(L, -1))
        luaL_unref(L, -1, *ref);
    lua_pop(L, 1);
    *ref = LUA_NOREF;
}

void lsse_push_anchored(lua_State *L, lsse_server *b, int ref)
{
    push_anchors(L, b);
    if (lua_istable(L, -1) && ref != LUA_NOREF)
        lua_rawgeti(L, -1, ref);
    else
        lua_pushnil(L);
    lua_remove(L, -2);
}

/* ---- error handling and logging ---- */

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg)
        msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void log_msg(lsse_server *b, int level, const char *msg)
{
    if (b->log_ref == LUA_NOREF || b->finalizing || !b->L)
        return;
    lua_State *L = b->L;
    lsse_push_anchored(L, b, b->log_ref);
    lua_pushstring(L, level_names[level < 0 || level > 3 ? 0 : level]);
    lua_pushstring(L, msg);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        fprintf(stderr, "sse: log function failed: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

static void hook_log(void *ud, int level, const char *msg)
{
    log_msg(ud, level, msg);
}

/* Calls the function below it with nargs under a traceback handler; logs failures
 * with `what`. Leaves nothing on the stack; returns 1 on success. */
static int protected_call(lsse_server *b, lua_State *L, int nargs, const char *what)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, 0, base);
    lua_remove(L, base);
    if (rc != LUA_OK) {
        lua_pushfstring(L, "%s: %s", what, lua_tostring(L, -1));
        log_msg(b, SSE_LOG_ERROR, lua_tostring(L, -1));
        lua_pop(L, 2);
        return 0;
    }
    return 1;
}

/* ---- streams ---- */

static lsse_stream *check_stream(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, STREAM_MT);
}

static int stream_is_open(const lsse_stream *s)
{
    return s->st && sse_stream_open(s->st);
}

/* What a generator gets from a stream call once the stream is closed: nil, "closed"
 * the first time; a later call never returns, so a loop that ignores the result
 * (`while true do stream:send(x) end`) ends instead of spinning. */
static int closed_result(lua_State *L, lsse_stream *s)
{
    if (L == s->co) {
        if (s->told_closed) {
            s->wait = WAIT_FOREVER;
            return lua_yield(L, 0);
        }
        s->told_closed = 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

static void resume_generator(lsse_stream *s, int nargs);

/* Replays of this turn's subscriptions go out before anything sent directly, so a
 * client sees history first, then what the generator says next. */
static void flush_replay(lsse_stream *s)
{
    if (sse_subscriber_has_pending(&s->sub))
        sse_subscriber_flush(&s->sub);
}

static void stream_wait_drain(lsse_stream *s)
{
    s->wait = WAIT_DRAIN;
    sse_stream_want_drain(s->st, s->b->high_water / 2);
}

/* After queueing: the generator itself waits while the client is behind. */
static int sent(lua_State *L, lsse_stream *s, int rc)
{
    if (rc == -ENOMEM)
        return luaL_error(L, "stream:send: out of memory");
    if (rc != 0)
        return closed_result(L, s);
    if (L == s->co && sse_stream_pending(s->st) > s->b->high_water) {
        stream_wait_drain(s);
        return lua_yield(L, 0);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int stream_send(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    sse_event ev;
    lsse_check_event(L, 2, "stream:send", &ev);
    if (!stream_is_open(s))
        return closed_result(L, s);
    flush_replay(s);
    int nd = s->sub.format == SSE_FORMAT_NDJSON;
    size_t n = nd ? sse_frame_ndjson_size(&ev) : sse_frame_size(&ev);
    char *p = sse_stream_reserve(s->st, n);
    if (!p)
        return sent(L, s, -ENOMEM);
    if (nd)
        sse_frame_ndjson_write(&ev, p);
    else
        sse_frame_write(&ev, p);
    return sent(L, s, sse_stream_commit(s->st, n));
}

static int stream_comment(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    size_t len;
    const char *text = luaL_optlstring(L, 2, "", &len);
    if (!stream_is_open(s))
        return closed_result(L, s);
    flush_replay(s);
    if (s->sub.format == SSE_FORMAT_NDJSON)   /* NDJSON has no comments: a blank line */
        return sent(L, s, sse_stream_write(s->st, "\n", 1));
    size_t n = sse_frame_comment_size(text, len);
    char *p = sse_stream_reserve(s->st, n);
    if (!p)
        return sent(L, s, -ENOMEM);
    sse_frame_comment_write(text, len, p);
    return sent(L, s, sse_stream_commit(s->st, n));
}

/* Raw bytes, already framed (used by the facade for formats other than SSE). */
static int stream_write(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    size_t len;
    const char *p = luaL_checklstring(L, 2, &len);
    if (!stream_is_open(s))
        return closed_result(L, s);
    flush_replay(s);
    return sent(L, s, sse_stream_write(s->st, p, len));
}

static void on_sleep_done(sse_timer *t)
{
    lsse_stream *s = (lsse_stream *)((char *)t - offsetof(lsse_stream, sleep));
    if (s->wait != WAIT_SLEEP)
        return;
    lua_pushboolean(s->co, 1);
    resume_generator(s, 1);
}

static int stream_sleep(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    lua_Number secs = luaL_checknumber(L, 2);
    luaL_argcheck(L, secs >= 0 && secs < 1e9, 2, "seconds must be between 0 and 1e9");
    if (L != s->co)
        return luaL_error(L, "stream:sleep must be called from the stream's own generator");
    if (!stream_is_open(s))
        return closed_result(L, s);
    s->wait = WAIT_SLEEP;
    sse_timer_start(s->b->loop, &s->sleep, (uint64_t)llround(secs * 1000.0), 0);
    return lua_yield(L, 0);
}

static int stream_close(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    if (s->st)
        sse_stream_close(s->st);
    return 0;
}

static int stream_on_close(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!s->st) {
        /* Already closed: run it now rather than never. */
        lua_pushvalue(L, 2);
        lua_pushvalue(L, 1);
        lua_call(L, 1, 0);
        return 0;
    }
    lua_getiuservalue(L, 1, UV_ONCLOSE);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    return 0;
}

static int stream_pending(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    lua_pushinteger(L, s->st ? (lua_Integer)sse_stream_pending(s->st) : 0);
    return 1;
}

static int stream_index(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    const char *k = lua_tostring(L, 2);
    if (k && strcmp(k, "closed") == 0) {
        lua_pushboolean(L, !stream_is_open(s));
        return 1;
    }
    if (k && strcmp(k, "req") == 0) {
        lua_getiuservalue(L, 1, UV_REQ);
        return 1;
    }
    if (k && strcmp(k, "peer") == 0) {
        if (s->st)
            lua_pushstring(L, sse_stream_peer(s->st));
        else
            lua_pushnil(L);
        return 1;
    }
    luaL_getmetatable(L, STREAM_MT);
    lua_getfield(L, -1, "methods");
    lua_pushvalue(L, 2);
    if (lua_rawget(L, -2) != LUA_TNIL)
        return 1;
    lua_getiuservalue(L, 1, UV_FIELDS);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

/* Users may keep their own fields on a stream (stream.user = name). */
static int stream_newindex(lua_State *L)
{
    check_stream(L, 1);
    const char *k = lua_tostring(L, 2);
    if (k && (strcmp(k, "closed") == 0 || strcmp(k, "req") == 0 || strcmp(k, "peer") == 0))
        return luaL_error(L, "stream.%s is read-only", k);
    lua_getiuservalue(L, 1, UV_FIELDS);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

static int stream_tostring(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    lua_pushfstring(L, "sse.stream (%s)", s->st ? sse_stream_peer(s->st) : "closed");
    return 1;
}

/* Runs the generator until it yields or ends. nargs values are on s->co's stack. */
static void resume_generator(lsse_stream *s, int nargs)
{
    lsse_server *b = s->b;
    lua_State *L = b->L;
    lua_State *co = s->co;
    int nres;
    s->wait = WAIT_NONE;
    int rc = lua_resume(co, L, nargs, &nres);
    /* Subscriptions made in this turn replay now, merged in publish order. */
    if (s->st)
        flush_replay(s);
    if (rc == LUA_YIELD) {
        lua_pop(co, nres);
        if (s->wait == WAIT_NONE && s->st) {
            /* A bare coroutine.yield() in a generator: give the others a turn. */
            s->wait = WAIT_SLEEP;
            sse_timer_start(b->loop, &s->sleep, 0, 0);
        }
        return;
    }
    if (rc != LUA_OK) {
        const char *msg = lua_tostring(co, -1);
        luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
        lua_pushfstring(L, "stream %s: %s", s->st ? sse_stream_peer(s->st) : "",
                        lua_tostring(L, -1));
        log_msg(b, SSE_LOG_ERROR, lua_tostring(L, -1));
        lua_pop(L, 2);
    }
    lua_settop(co, 0);
    s->wait = WAIT_FOREVER;  /* finished: nothing may resume it again */
    /* A subscriber stays open for its channels after its generator returns. */
    if (s->st && (rc != LUA_OK || !s->sub.subs))
        sse_stream_close(s->st);
}

/* Pushes the stream userdata anchored for st. */
static lsse_stream *push_stream(lsse_server *b, sse_stream *st)
{
    lsse_stream *s = sse_stream_ud(st);
    lsse_push_anchored(b->L, b, s->self_ref);
    return s;
}

static void hook_stream_ready(void *ud, sse_stream *st)
{
    lsse_server *b = ud;
    lua_State *L = b->L;
    if (b->finalizing || *(int *)sse_stream_ud(st) != STREAM_LUA)
        return;
    lsse_stream *s = push_stream(b, st);
    if (!s->started) {
        s->started = 1;
        lua_getiuservalue(L, -1, UV_FN);   /* fn */
        lua_pushvalue(L, -2);               /* stream */
        lua_getiuservalue(L, -3, UV_REQ);   /* req */
        lua_xmove(L, s->co, 3);
        lua_pushnil(L);
        lua_setiuservalue(L, -2, UV_FN);
        lua_pop(L, 1);
        /* The function and its two arguments. */
        resume_generator(s, 2);
        return;
    }
    lua_pop(L, 1);
    if (s->wait == WAIT_DRAIN) {
        lua_pushboolean(s->co, 1);
        resume_generator(s, 1);
    }
}

static void hook_stream_closed(void *ud, sse_stream *st)
{
    lsse_server *b = ud;
    if (*(int *)sse_stream_ud(st) == STREAM_CHANNEL) {
        lsse_substream *c = sse_stream_ud(st);
        sse_subscriber_clear(&c->sub);
        sse_stream_release(st);
        free(c);
        return;
    }
    lsse_stream *s = sse_stream_ud(st);
    lua_State *L = b->L;
    s->st = NULL;
    sse_subscriber_clear(&s->sub);
    sse_timer_stop(b->loop, &s->sleep);
    sse_stream_release(st);
    if (b->finalizing) {
        lsse_unanchor(L, b, &s->self_ref);
        return;
    }
    lsse_push_anchored(L, b, s->self_ref);
    int self = lua_gettop(L);
    lua_getiuservalue(L, self, UV_ONCLOSE);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, self + 1, i);
        lua_pushvalue(L, self);
        protected_call(b, L, 1, "stream on_close");
    }
    lua_settop(L, self);
    /* A generator waiting in sleep or send learns that the stream is gone. */
    if (s->wait == WAIT_SLEEP || s->wait == WAIT_DRAIN) {
        s->told_closed = 1;
        lua_pushnil(s->co);
        lua_pushliteral(s->co, "closed");
        resume_generator(s, 2);
    }
    lua_pop(L, 1);
    lsse_unanchor(L, b, &s->self_ref);
}

/* ---- requests ---- */

/* Query parameters: req.query has the first value of each name (what most code wants),
 * req.query_all every value, in order: ?a=1&a=2 gives query.a = "1", query_all.a = {"1","2"}. */
struct query_ctx { lua_State *L; int query, all; };

static void set_query(void *ud, const char *key, const char *value, size_t len)
{
    struct query_ctx *q = ud;
    lua_State *L = q->L;
    if (lua_getfield(L, q->query, key) == LUA_TNIL) {
        lua_pushlstring(L, value, len);
        lua_setfield(L, q->query, key);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, q->all, key) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, q->all, key);
    }
    lua_pushlstring(L, value, len);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    lua_pop(L, 1);
}

static void set_header(void *ud, const char *key, const char *value, size_t len)
{
    lua_State *L = ud;
    size_t klen = strlen(key);
    luaL_Buffer buf;
    char *p = luaL_buffinitsize(L, &buf, klen);
    for (size_t i = 0; i < klen; i++)
        p[i] = (char)((key[i] >= 'A' && key[i] <= 'Z') ? key[i] + 32 : key[i]);
    luaL_pushresultsize(&buf, klen);
    /* Repeated headers are joined with ", " as RFC 9110 allows for lists. */
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TSTRING) {
        lua_pushliteral(L, ", ");
        lua_pushlstring(L, value, len);
        lua_concat(L, 3);
    } else {
        lua_pop(L, 1);
        lua_pushlstring(L, value, len);
    }
    lua_rawset(L, -3);
}

/* One header of the table being walked: raises with the reason when MHD could not send it. */
static void check_header(lua_State *L, const char *name, int vidx, sse_header *h, size_t *n)
{
    if (lua_type(L, vidx) != LUA_TSTRING)
        luaL_error(L, "headers: the value of '%s' must be a string or a list of strings", name);
    const char *value = lua_tostring(L, vidx);
    if (strpbrk(value, "\r\n") || lua_rawlen(L, vidx) != strlen(value))
        luaL_error(L, "headers: the value of '%s' contains CR, LF or NUL", name);
    if (!*value)   /* libmicrohttpd 0.9.75 refuses to send an empty value */
        luaL_error(L, "headers: the value of '%s' is empty", name);
    if (*n == MAX_HEADERS)
        luaL_error(L, "headers: more than %d", MAX_HEADERS);
    h[*n].name = name;
    h[*n].value = value;   /* anchored by the table (strings only, no conversion) */
    (*n)++;
}

/* Reads a { name = value | { value, ... } } table at idx into h: a list sends the header
 * once per value (two Set-Cookie). Names must be tokens; values strings without CR, LF
 * or NUL. Returns the count. */
static size_t check_headers(lua_State *L, int idx, sse_header *h)
{
    size_t n = 0;
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "headers: names must be strings");
        const char *name = lua_tostring(L, -2);
        if (!*name || strpbrk(name, "\r\n: \t") || lua_rawlen(L, -2) != strlen(name))
            luaL_error(L, "headers: invalid header name '%s'", name);
        if (lua_type(L, -1) == LUA_TTABLE) {
            lua_Integer count = (lua_Integer)lua_rawlen(L, -1);
            for (lua_Integer i = 1; i <= count; i++) {
                lua_rawgeti(L, -1, i);
                check_header(L, name, lua_gettop(L), h, &n);
                lua_pop(L, 1);
            }
        } else {
            check_header(L, name, lua_gettop(L), h, &n);
        }
        lua_pop(L, 1);
    }
    return n;
}

/* Pushes the req table: method, path, remote_addr, headers, query, query_all. */
static void push_request(lua_State *L, sse_request *r)
{
    lua_createtable(L, 0, 10);
    lua_pushstring(L, sse_request_method(r));
    lua_setfield(L, -2, "method");
    lua_pushstring(L, sse_request_path(r));
    lua_setfield(L, -2, "path");
    lua_pushstring(L, sse_request_peer(r));
    lua_setfield(L, -2, "remote_addr");
    lua_newtable(L);
    sse_request_headers(r, set_header, L);
    lua_setfield(L, -2, "headers");
    lua_newtable(L);
    lua_newtable(L);
    struct query_ctx q = { L, lua_gettop(L) - 1, lua_gettop(L) };
    sse_request_query(r, set_query, &q);
    lua_setfield(L, -3, "query_all");
    lua_setfield(L, -2, "query");
}

/* A complete response from the values at 1..3 (status, body, headers). */
static void respond(lua_State *L, lsse_server *b, sse_request *r)
{
    sse_header h[MAX_HEADERS];
    int status = (int)luaL_checkinteger(L, 1);
    if (luaL_testudata(L, 2, FILE_MT)) {   /* sent from its descriptor by MHD */
        lsse_respond_file(L, r, status, h, check_headers(L, 3, h), 2);
        return;
    }
    size_t len = 0;
    const char *body = lua_isnil(L, 2) ? NULL : luaL_checklstring(L, 2, &len);
    size_t nh = check_headers(L, 3, h);
    if (sse_request_respond(r, status, h, nh, body, len) != 0)
        luaL_error(L, "%s %s: libmicrohttpd refused the response (status %d)",
                   sse_request_method(r), sse_request_path(r), status);
}

/* admit(req) returns nothing (read the body) or  status, body, headers. */
static int handle_admit(lua_State *L)
{
    lsse_server *b = lua_touserdata(L, 1);
    sse_request *r = lua_touserdata(L, 2);
    lua_settop(L, 0);
    lsse_push_anchored(L, b, b->admit_ref);
    push_request(L, r);
    lua_pushinteger(L, (lua_Integer)sse_request_body_length(r));
    lua_setfield(L, -2, "body_length");
    lua_call(L, 1, 3);
    if (!lua_isnil(L, 1))
        respond(L, b, r);
    return 0;
}

static void hook_admit(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    lua_State *L = b->L;
    if (b->finalizing || b->admit_ref == LUA_NOREF)
        return;
    lua_pushcfunction(L, handle_admit);
    lua_pushlightuserdata(L, b);
    lua_pushlightuserdata(L, r);
    protected_call(b, L, 2, "request");
}

/* dispatch(req) returns  status, body, headers  or  fn, req, opts  (a stream). */
static int handle_request(lua_State *L)
{
    lsse_server *b = lua_touserdata(L, 1);
    sse_request *r = lua_touserdata(L, 2);
    lua_settop(L, 0);
    lsse_push_anchored(L, b, b->dispatch_ref);
    push_request(L, r);
    size_t blen;
    const char *body = sse_request_body(r, &blen);
    if (body) {
        lua_pushlstring(L, body, blen);
        lua_setfield(L, -2, "body");
    }
    lua_call(L, 1, 3);

    if (lua_type(L, 1) == LUA_TNUMBER) {
        respond(L, b, r);
        return 0;
    }

    /* A stream: opts = { headers = {...}, heartbeat = seconds or false, retry = ms,
     * format = "sse" | "ndjson", gzip = bool } */
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "headers");
    sse_header h[MAX_HEADERS];
    size_t nh = check_headers(L, 4, h);
    lua_getfield(L, 3, "heartbeat");
    lua_Number hb = lua_toboolean(L, 5) ? luaL_checknumber(L, 5) : 0;
    lua_getfield(L, 3, "retry");
    lua_Integer retry = lua_isnil(L, 6) ? -1 : luaL_checkinteger(L, 6);
    lua_getfield(L, 3, "format");
    int format = lua_isnil(L, 7) ? SSE_FORMAT_SSE
               : strcmp(luaL_checkstring(L, 7), "ndjson") == 0 ? SSE_FORMAT_NDJSON : SSE_FORMAT_SSE;
    lua_getfield(L, 3, "gzip");
    sse_stream_opts so = {
        .headers = h,
        .nheaders = nh,
        .heartbeat_ms = hb > 0 ? (unsigned)llround(hb * 1000.0) : 0,
        .heartbeat = format == SSE_FORMAT_NDJSON ? "\n" : ":\n\n",
        .gzip = lua_toboolean(L, 8),
    };
    lua_settop(L, 3);

    if (lua_type(L, 1) != LUA_TFUNCTION) {   /* a channel */
        lua_getfield(L, 2, "last_event_id");
        size_t len = 0;
        const char *last = lua_tolstring(L, -1, &len);
        lsse_channel_stream(L, r, 1, &so, format, retry, last, len);
        return 0;
    }

    lsse_stream *s = lua_newuserdatauv(L, sizeof *s, UV_COUNT);
    memset(s, 0, sizeof *s);
    s->kind = STREAM_LUA;
    s->b = b;
    s->self_ref = LUA_NOREF;
    sse_timer_init(&s->sleep, on_sleep_done);
    s->co = lua_newthread(L);
    lua_setiuservalue(L, -2, UV_CO);
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, -2, UV_REQ);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, UV_FN);
    lua_newtable(L);
    lua_setiuservalue(L, -2, UV_ONCLOSE);
    lua_newtable(L);
    lua_setiuservalue(L, -2, UV_FIELDS);
    luaL_setmetatable(L, STREAM_MT);

    s->sub.format = format;
    s->st = sse_request_stream(r, &so);
    if (!s->st)
        return luaL_error(L, "could not start the stream");
    sse_stream_set_ud(s->st, s);
    lua_pushvalue(L, -1);
    s->self_ref = lsse_anchor(L, b);
    lsse_write_first(s->st, format, retry);
    return 0;
}

void lsse_write_first(sse_stream *st, int format, long long retry)
{
    if (format == SSE_FORMAT_NDJSON)
        return;
    char first[48];
    int n = retry >= 0 ? snprintf(first, sizeof first, "retry: %lld\n\n", retry)
                       : snprintf(first, sizeof first, ":ok\n\n");
    sse_stream_write(st, first, (size_t)n);
}

static void hook_request(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    lua_State *L = b->L;
    if (b->finalizing || b->dispatch_ref == LUA_NOREF)
        return;
    lua_pushcfunction(L, handle_request);
    lua_pushlightuserdata(L, b);
    lua_pushlightuserdata(L, r);
    protected_call(b, L, 2, "request");
}

static const sse_server_hooks hooks = {
    .admit = hook_admit,
    .request = hook_request,
    .stream_ready = hook_stream_ready,
    .stream_closed = hook_stream_closed,
    .log = hook_log,
};

/* ---- timers ---- */

static void release_timer(lsse_timer *t, lua_State *L)
{
    lsse_unanchor(L, t->b, &t->self_ref);
}

static void on_timer(sse_timer *st)
{
    lsse_timer *t = (lsse_timer *)st;
    lsse_server *b = t->b;
    lua_State *L = b->L;
    lsse_push_anchored(L, b, t->self_ref);
    lua_getiuservalue(L, -1, 1);
    lua_insert(L, -2);
    /* One-shot: disarmed before the call, so it may be collected once the call ends. */
    int once = !sse_timer_active(&t->t);
    protected_call(b, L, 1, "timer");
    if (once && !sse_timer_active(&t->t))
        release_timer(t, L);
}

lsse_server *lsse_check_server(lua_State *L, int idx)
{
    lsse_server *b = luaL_checkudata(L, idx, SERVER_MT);
    if (!b->loop)
        luaL_error(L, "attempt to use a closed server");
    return b;
}

/* server:timer(after_seconds, repeat_seconds, fn) -> timer */
static int server_timer(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Number after = luaL_checknumber(L, 2);
    lua_Number every = luaL_checknumber(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    luaL_argcheck(L, after >= 0 && after < 1e9, 2, "seconds must be between 0 and 1e9");
    luaL_argcheck(L, every >= 0 && every < 1e9, 3, "seconds must be between 0 and 1e9");
    lsse_timer *t = lua_newuserdatauv(L, sizeof *t, 2);
    sse_timer_init(&t->t, on_timer);
    t->b = b;
    t->self_ref = LUA_NOREF;
    lua_pushvalue(L, 4);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 1);          /* t->b stays valid as long as the timer exists */
    lua_setiuservalue(L, -2, 2);
    luaL_setmetatable(L, TIMER_MT);
    uint64_t rep = (uint64_t)llround(every * 1000.0);
    if (every > 0 && rep == 0)
        rep = 1;
    if (sse_timer_start(b->loop, &t->t, (uint64_t)llround(after * 1000.0), rep) != 0)
        return luaL_error(L, "out of memory");
    lua_pushvalue(L, -1);
    t->self_ref = lsse_anchor(L, b);
    return 1;
}

static int timer_cancel(lua_State *L)
{
    lsse_timer *t = luaL_checkudata(L, 1, TIMER_MT);
    if (t->b->loop)               /* else the app is closed: the timer went with it */
        sse_timer_stop(t->b->loop, &t->t);
    release_timer(t, L);
    return 0;
}

static int timer_active(lua_State *L)
{
    lsse_timer *t = luaL_checkudata(L, 1, TIMER_MT);
    lua_pushboolean(L, sse_timer_active(&t->t));
    return 1;
}

/* ---- the server object ---- */

static size_t opt_size(lua_State *L, int idx, const char *field, size_t dflt)
{
    lua_getfield(L, idx, field);
    size_t v = dflt;
    if (!lua_isnil(L, -1)) {
        lua_Integer i = luaL_checkinteger(L, -1);
        if (i < 0)
            luaL_error(L, "option '%s' must not be negative", field);
        v = (size_t)i;
    }
    lua_pop(L, 1);
    return v;
}

static int ref_function(lua_State *L, lsse_server *b, int idx, const char *field)
{
    lua_getfield(L, idx, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return LUA_NOREF;
    }
    luaL_checktype(L, -1, LUA_TFUNCTION);
    return lsse_anchor(L, b);
}

/* core.server{ host, port, max_connections, max_body, queue_limit, connection_memory,
 *              request_timeout_ms, keepalive_timeout_ms, max_connections_per_ip,
 *              dispatch = fn(req), admit = fn(req), log = fn(level, msg) } */
static int server_new(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "host");
    const char *host = luaL_optstring(L, -1, "127.0.0.1");
    sse_server_config cfg = {
        .host = host,
        .port = (int)opt_size(L, 1, "port", 8080),
        .max_connections = (unsigned)opt_size(L, 1, "max_connections", 0),
        .max_body = opt_size(L, 1, "max_body", 1 << 20),
        .queue_limit = opt_size(L, 1, "queue_limit", 1 << 20),
        .conn_memory = opt_size(L, 1, "connection_memory", 16 << 10),
        .request_timeout_ms = (unsigned)opt_size(L, 1, "request_timeout_ms", 30000),
        .keepalive_timeout_ms = (unsigned)opt_size(L, 1, "keepalive_timeout_ms", 5000),
        .max_per_ip = (unsigned)opt_size(L, 1, "max_connections_per_ip", 0),
        .hooks = &hooks,
    };
    if (cfg.port > 65535)
        return luaL_error(L, "option 'port' must be between 0 and 65535");
    if (cfg.conn_memory < 2048)
        return luaL_error(L, "option 'connection_memory' must be at least 2048");
    lsse_server *b = lua_newuserdatauv(L, sizeof *b, 1);
    memset(b, 0, sizeof *b);
    b->dispatch_ref = b->admit_ref = b->log_ref = b->signal_ref = LUA_NOREF;
    lua_newtable(L);                       /* its anchors */
    lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_pushvalue(L, -2);
    lua_rawsetp(L, -2, b);
    lua_pop(L, 1);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, SERVER_MT);
    b->ids.epoch = sse_ids_epoch();
    b->high_water = cfg.queue_limit / 2 < (64 << 10) ? cfg.queue_limit / 2 : (64 << 10);
    cfg.ud = b;
    b->loop = sse_loop_new();
    if (!b->loop)
        return luaL_error(L, "epoll: %s", strerror(errno));
    b->srv = sse_server_new(b->loop, &cfg);
    if (!b->srv)
        return luaL_error(L, "out of memory");
    b->dispatch_ref = ref_function(L, b, 1, "dispatch");
    b->admit_ref = ref_function(L, b, 1, "admit");
    b->log_ref = ref_function(L, b, 1, "log");
    lua_remove(L, 2); /* the host string, copied by sse_server_new */
    return 1;
}

static int server_listen(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    const char *cert = luaL_optstring(L, 2, NULL);
    const char *key = luaL_optstring(L, 3, NULL);
    char err[512];
    b->L = L;
    int rc = sse_server_listen(b->srv, cert, key, err, sizeof err);
    if (rc) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        lua_pushstring(L, rc == -EADDRINUSE ? "EADDRINUSE" : rc == -EACCES ? "EACCES"
                          : rc == -EADDRNOTAVAIL ? "EADDRNOTAVAIL" : rc == -EINVAL ? "EINVAL"
                          : rc == -ENOTSUP ? "ENOTSUP" : "EIO");
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* server:step(timeout_seconds): one turn; a negative or nil timeout waits for activity. */
static int server_step(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Number secs = luaL_optnumber(L, 2, -1);
    int64_t timeout = secs < 0 ? -1 : secs > 86400 ? 86400000000LL : (int64_t)llround(secs * 1e6);
    b->L = L;
    int ms = sse_loop_next_timeout(b->loop);
    if (ms >= 0 && (timeout < 0 || (int64_t)ms * 1000 < timeout))
        timeout = (int64_t)ms * 1000;
    int64_t t = sse_server_timeout(b->srv);
    if (t >= 0 && (timeout < 0 || t < timeout))
        timeout = t;
    int rc = sse_loop_poll(b->loop, timeout);
    sse_server_run(b->srv);
    if (rc < 0)
        return luaL_error(L, "epoll_wait: %s", strerror(-rc));
    return 0;
}

static int server_shutdown(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Number secs = luaL_optnumber(L, 2, 5);
    b->L = L;
    sse_server_shutdown(b->srv, secs <= 0 ? 0 : (unsigned)llround(secs * 1000.0));
    return 0;
}

static void on_signal(void *ud, int signo)
{
    lsse_server *b = ud;
    if (b->signal_ref == LUA_NOREF)
        return;
    lsse_push_anchored(b->L, b, b->signal_ref);
    lua_pushinteger(b->L, signo);
    protected_call(b, b->L, 1, "signal");
}

/* server:catch_signals(fn | nil): SIGINT/SIGTERM call fn(signo) instead of killing. */
static int server_catch_signals(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lsse_unanchor(L, b, &b->signal_ref);
    if (lua_isnoneornil(L, 2)) {
        sse_loop_catch_signals(b->loop, 0, NULL, NULL);
        return 0;
    }
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    b->signal_ref = lsse_anchor(L, b);
    int rc = sse_loop_catch_signals(b->loop, 1, on_signal, b);
    if (rc)
        return luaL_error(L, "signalfd: %s", strerror(-rc));
    return 0;
}

static int server_index(lua_State *L)
{
    lsse_server *b = luaL_checkudata(L, 1, SERVER_MT);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "port") == 0 && b->srv && sse_server_listening(b->srv)) {
        lua_pushinteger(L, sse_server_port(b->srv));
        return 1;
    }
    if (strcmp(k, "listening") == 0) {
        lua_pushboolean(L, b->srv && sse_server_listening(b->srv));
        return 1;
    }
    if (strcmp(k, "connections") == 0) {
        lua_pushinteger(L, b->srv ? sse_server_connections(b->srv) : 0);
        return 1;
    }
    luaL_getmetatable(L, SERVER_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, k);
    return 1;
}

static int server_gc(lua_State *L)
{
    lsse_server *b = luaL_checkudata(L, 1, SERVER_MT);
    if (!b->loop)
        return 0;
    b->L = L;
    b->finalizing = 1;
    sse_server_free(b->srv);
    b->srv = NULL;
    lsse_free_channels(b);
    sse_loop_free(b->loop);
    b->loop = NULL;
    /* The anchors table goes with the userdata: nothing to release one by one. */
    b->dispatch_ref = b->admit_ref = b->log_ref = b->signal_ref = LUA_NOREF;
    return 0;
}

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                      const luaL_Reg *meta)
{
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "methods");
    lua_pop(L, 1);
}

void lsse_open_server(lua_State *L)
{
    static const luaL_Reg server_methods[] = {
        { "listen", server_listen },
        { "step", server_step },
        { "shutdown", server_shutdown },
        { "timer", server_timer },
        { "catch_signals", server_catch_signals },
        { "channel", lsse_server_channel },
        { "close", server_gc },
        { NULL, NULL },
    };
    static const luaL_Reg server_meta[] = {
        { "__index", server_index },
        { "__gc", server_gc },
        { "__close", server_gc },
        { NULL, NULL },
    };
    static const luaL_Reg stream_methods[] = {
        { "send", stream_send },
        { "comment", stream_comment },
        { "write", stream_write },
        { "sleep", stream_sleep },
        { "close", stream_close },
        { "on_close", stream_on_close },
        { "pending", stream_pending },
        { "subscribe", lsse_stream_subscribe },
        { "unsubscribe", lsse_stream_unsubscribe },
        { NULL, NULL },
    };
    static const luaL_Reg stream_meta[] = {
        { "__index", stream_index },
        { "__newindex", stream_newindex },
        { "__tostring", stream_tostring },
        { NULL, NULL },
    };
    static const luaL_Reg timer_methods[] = {
        { "cancel", timer_cancel },
        { "active", timer_active },
        { NULL, NULL },
    };
    static const luaL_Reg timer_meta[] = {
        { NULL, NULL },
    };
    new_class(L, SERVER_MT, server_methods, server_meta);
    new_class(L, STREAM_MT, stream_methods, stream_meta);
    new_class(L, TIMER_MT, timer_methods, timer_meta);
    luaL_getmetatable(L, TIMER_MT);
    lua_getfield(L, -1, "methods");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);                       /* server -> anchors, weak values */
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lsse_open_channel(L);
    lua_pushcfunction(L, server_new);
    lua_setfield(L, -2, "server");
}
