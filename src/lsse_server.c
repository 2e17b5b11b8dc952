/* The server object and request dispatch.
 *
 * Lua runs only from the hooks of sse_server and sse_loop, all of them inside step()
 * (or close) on the thread that called it, each under lsse_pcall: an error in user
 * code is logged and contained. A request goes to the app's admit function (before its
 * body is read) and its dispatch function, whose answer is a response (status, body,
 * headers), a generator stream (lsse_stream.c) or a channel stream (lsse_channel.c).
 * Ownership of every binding object: lsse.h.
 */
#include "lsse.h"
#include "sse_server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADERS 64

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

static void hook_admit(void *ud, sse_request *r)
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

/* dispatch(req) returns  status, body, headers  or  fn, req, opts  (a generator stream)
 * or  channel, req, opts  (a channel stream). */
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
        lsse_channel_stream(L, r, 1, &so, format, retry, last, len);
        return 0;
    }
    lsse_stream_start(L, b, r, 1, 2, &so, format, retry);
    return 0;
}

static void hook_request(void *ud, sse_request *r)
{
    lsse_server *b = ud;
    call_request_hook(b, r, b->dispatch_ref, handle_request);
}

static void hook_log(void *ud, int level, const char *msg)
{
    lsse_log(ud, level, msg);
}

static const sse_server_hooks hooks = {
    .admit = hook_admit,
    .request = hook_request,
    .stream_ready = lsse_stream_ready,
    .stream_closed = lsse_stream_closed,
    .log = hook_log,
};

/* ---- the server object ---- */

lsse_server *lsse_check_server(lua_State *L, int idx)
{
    lsse_server *b = luaL_checkudata(L, idx, SERVER_MT);
    if (!b->loop)
        luaL_error(L, "attempt to use a closed server");
    return b;
}

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
    b->self_ref = b->dispatch_ref = b->admit_ref = b->log_ref = b->signal_ref = LUA_NOREF;
    lsse_new_anchors(L, b);
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
    lsse_pcall(b, b->L, 1, "signal");
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

/* Computed fields: port (while listening), listening, connections. */
static int server_get(lua_State *L)
{
    lsse_server *b = luaL_checkudata(L, 1, SERVER_MT);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "port") == 0 && b->srv && sse_server_listening(b->srv))
        lua_pushinteger(L, sse_server_port(b->srv));
    else if (strcmp(k, "listening") == 0)
        lua_pushboolean(L, b->srv && sse_server_listening(b->srv));
    else if (strcmp(k, "connections") == 0)
        lua_pushinteger(L, b->srv ? sse_server_connections(b->srv) : 0);
    else
        lua_pushnil(L);
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
    lsse_free_fetches(b);
    sse_loop_free(b->loop);
    b->loop = NULL;
    /* The anchors table goes with the userdata: nothing to release one by one. */
    b->self_ref = b->dispatch_ref = b->admit_ref = b->log_ref = b->signal_ref = LUA_NOREF;
    return 0;
}

void lsse_open_server(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "listen", server_listen },
        { "step", server_step },
        { "shutdown", server_shutdown },
        { "timer", lsse_server_timer },
        { "spawn", lsse_server_spawn },
        { "sleep", lsse_server_sleep },
        { "fetch", lsse_server_fetch },
        { "catch_signals", server_catch_signals },
        { "channel", lsse_server_channel },
        { "close", server_gc },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", server_get },
        { "__gc", server_gc },
        { "__close", server_gc },
        { NULL, NULL },
    };
    lsse_class(L, SERVER_MT, methods, meta);
    lsse_open_task(L);
    lsse_open_http(L);
    lsse_open_stream(L);
    lsse_open_timer(L);
    lsse_open_channel(L);
    lsse_open_anchors(L);
    lua_pushcfunction(L, server_new);
    lua_setfield(L, -2, "server");
}
