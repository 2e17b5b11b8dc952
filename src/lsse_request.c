/* Requests in the binding: the req table, responses, and the request hooks.
 *
 * A complete request runs the app's dispatch function (the facade: routes, before hooks,
 * the handler or a stream's accept) as an app coroutine, a handler task. Most return at
 * once and are answered inside the request hook. One that waits (app:fetch, app:sleep,
 * an eventsource) has its request deferred (sse_request_defer: the connection is
 * suspended) and is answered when the coroutine returns; if the client hangs up
 * meanwhile, the task is told it is closed (its waits return nil, "closed", its fetches
 * are cancelled) and whatever it returns is dropped.
 *
 * What dispatch returns is  status, body, headers  (a response), or  fn, req, opts  (a
 * generator stream, lsse_stream.c), or  channel, req, opts  (lsse_channel.c).
 */
#include "lsse.h"
#include "sse_server.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#define MAX_HEADERS 64
#define HANDLER_MT "sse.handler"

/* ---- the req table ---- */

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

/* Runs handler(b, r) protected, when the facade gave the function at ref (admit or
 * dispatch) and the server is not being collected. */
static void call_request_hook(lsse_server *b, sse_request *r, int ref, lua_CFunction handler)
{
    lua_State *L = b->L;
    if (b->finalizing || ref == LUA_NOREF)
        return;
    lua_pushcfunction(L, handler);
    lua_pushlightuserdata(L, b);
    lua_pushlightuserdata(L, r);
    lsse_pcall(b, L, 2, "request");
}

void lsse_admit_hook(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    call_request_hook(b, r, b->admit_ref, handle_admit);
}

/* A stream's opts = { headers = {...}, heartbeat = seconds or false, retry = ms,
 * format = "sse" | "ndjson", gzip = bool }, at idx, into *so (its headers into h), *format
 * and *retry. Leaves the values so points into on the stack (above idx). */
static void check_stream_opts(lua_State *L, int idx, sse_header *h, sse_stream_opts *so,
                              int *format, lua_Integer *retry)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    int top = lua_gettop(L);
    lua_getfield(L, idx, "headers");
    size_t nh = check_headers(L, top + 1, h);
    lua_getfield(L, idx, "heartbeat");
    lua_Number hb = lua_toboolean(L, top + 2) ? luaL_checknumber(L, top + 2) : 0;
    lua_getfield(L, idx, "retry");
    *retry = lua_isnil(L, top + 3) ? -1 : luaL_checkinteger(L, top + 3);
    lua_getfield(L, idx, "format");
    *format = lua_isnil(L, top + 4) ? SSE_FORMAT_SSE
            : strcmp(luaL_checkstring(L, top + 4), "ndjson") == 0 ? SSE_FORMAT_NDJSON
            : SSE_FORMAT_SSE;
    lua_getfield(L, idx, "gzip");
    *so = (sse_stream_opts){
        .headers = h,
        .nheaders = nh,
        .heartbeat_ms = hb > 0 ? (unsigned)llround(hb * 1000.0) : 0,
        .heartbeat = *format == SSE_FORMAT_NDJSON ? "\n" : ":\n\n",
        .gzip = lua_toboolean(L, top + 5),
    };
}

/* Answers r with dispatch's values at 1..3 (a response, or a stream to start). */
static void answer(lua_State *L, lsse_server *b, sse_request *r)
{
    if (lua_type(L, 1) == LUA_TNUMBER) {
        respond(L, b, r);
        return;
    }
    sse_header h[MAX_HEADERS];
    sse_stream_opts so;
    int format;
    lua_Integer retry;
    check_stream_opts(L, 3, h, &so, &format, &retry);
    lua_settop(L, 3);   /* the header strings stay anchored by the opts table */
    if (lua_type(L, 1) != LUA_TFUNCTION) {   /* a channel */
        lua_getfield(L, 2, "last_event_id");
        size_t len = 0;
        const char *last = lua_tolstring(L, -1, &len);
        lua_getfield(L, 3, "first");
        unsigned first = lsse_check_first(L, -1);
        lsse_channel_stream(L, r, 1, &so, format, retry, last, len, first);
        return;
    }
    lsse_stream_start(L, b, r, 1, 2, &so, format, retry);
}

/* ---- handler tasks: dispatch as an app coroutine ---- */

/* Anchored (self_ref) while the request is deferred; user values: the coroutine and
 * the server. */
typedef struct lsse_handler {
    lsse_task    task;
    sse_request *r;          /* NULL once answered, or once its client is gone */
    int          self_ref;
    int          done;       /* the coroutine has returned or raised */
} lsse_handler;

#define handler_of(t) ((lsse_handler *)((char *)(t) - offsetof(lsse_handler, task)))

/* answer() under lsse_pcall: b, r, then dispatch's values. */
static int answer_values(lua_State *L)
{
    lsse_server *b = lua_touserdata(L, 1);
    sse_request *r = lua_touserdata(L, 2);
    lua_remove(L, 1);
    lua_remove(L, 1);
    lua_settop(L, 3);
    answer(L, b, r);
    return 0;
}

/* dispatch has returned (its values on the coroutine's stack) or raised (logged by the
 * scheduler): answer, with 500 when that fails or is impossible. */
static void handler_ended(lsse_task *t, int ok)
{
    lsse_handler *h = handler_of(t);
    lsse_server *b = t->b;
    sse_request *r = h->r;
    h->done = 1;
    h->r = NULL;
    if (r && !b->finalizing) {
        lua_State *L = b->L;
        if (ok) {
            int n = lua_gettop(t->co);
            lua_pushcfunction(L, answer_values);
            lua_pushlightuserdata(L, b);
            lua_pushlightuserdata(L, r);
            lua_xmove(t->co, L, n);
            lsse_pcall(b, L, 2 + n, "request");
        }
        if (!sse_request_answered(r)) {
            static const sse_header plain = { "Content-Type", "text/plain; charset=utf-8" };
            static const char body[] = "internal server error\n";
            sse_request_respond(r, 500, &plain, 1, body, sizeof body - 1);
        }
    }
    lsse_unanchor(b->L, b, &h->self_ref);
}

static const lsse_task_ops handler_ops = { .what = "request", .ended = handler_ended };

/* dispatch(req) as a handler task; if it waits, the request is deferred. */
static int handle_request(lua_State *L)
{
    lsse_server *b = lua_touserdata(L, 1);
    sse_request *r = lua_touserdata(L, 2);
    lua_settop(L, 0);
    lsse_handler *h = lua_newuserdatauv(L, sizeof *h, 2);
    lua_State *co = lua_newthread(L);
    lua_setiuservalue(L, 1, 1);
    lsse_push_server(L, b);
    lua_setiuservalue(L, 1, 2);
    luaL_setmetatable(L, HANDLER_MT);
    lsse_task_init(&h->task, b, co, &handler_ops);
    h->r = r;
    h->self_ref = LUA_NOREF;
    h->done = 0;
    lsse_push_anchored(L, b, b->dispatch_ref);
    push_request(L, r);
    size_t blen;
    const char *body = sse_request_body(r, &blen);
    if (body) {
        lua_pushlstring(L, body, blen);
        lua_setfield(L, -2, "body");
    }
    lsse_task_start(&h->task, 1);    /* answered inside, unless it waits */
    if (h->done)
        return 0;
    if (sse_request_defer(r, h) != 0) {
        h->r = NULL;                 /* sse_server answers 500 */
        return 0;
    }
    lua_settop(L, 1);
    h->self_ref = lsse_anchor(L, b);
    return 0;
}

void lsse_request_hook(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    call_request_hook(b, r, b->dispatch_ref, handle_request);
}

void lsse_request_gone(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    lsse_handler *h = sse_request_ud(r);
    if (!h || h->r != r)
        return;
    h->r = NULL;
    lsse_task_cancel(&h->task);
    if (!b->finalizing)
        lsse_task_tell_closed(&h->task);   /* its waits end: nil, "closed" */
}

void lsse_open_request(lua_State *L)
{
    static const luaL_Reg none[] = { { NULL, NULL } };
    lsse_class(L, HANDLER_MT, none, none);
}
