/* The server object: options, listen, step, shutdown, signals.
 *
 * Lua runs only from the hooks of sse_server and sse_loop, all of them inside step()
 * (or close) on the thread that called it, each under lsse_pcall: an error in user
 * code is logged and contained. Requests: lsse_request.c. Ownership of every binding
 * object: lsse.h.
 */
#include "lsse.h"
#include "sse_server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void hook_log(void *ud, int level, const char *msg)
{
    lsse_log(ud, level, msg);
}

static const sse_server_hooks hooks = {
    .admit = lsse_admit_hook,
    .request = lsse_request_hook,
    .request_gone = lsse_request_gone,
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
 *              max_channels (0 or absent: no limit),
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
        .conn_memory = opt_size(L, 1, "connection_memory", 32 << 10),
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
    b->max_channels = (unsigned)opt_size(L, 1, "max_channels", 0);
    b->ids.epoch = sse_ids_epoch();
    b->created_us = sse_loop_now_us();
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
    lua_getfield(L, 1, "broker");
    lsse_open_broker(L, b, lua_gettop(L));
    lua_pop(L, 1);
    lua_remove(L, 2); /* the host string, copied by sse_server_new */
    return 1;
}

static int server_listen(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    const char *cert = luaL_optstring(L, 2, NULL);
    const char *key = luaL_optstring(L, 3, NULL);
    const char *priorities = luaL_optstring(L, 4, NULL);
    char err[512];
    b->L = L;
    int rc = sse_server_listen(b->srv, cert, key, priorities, err, sizeof err);
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

/* The longest the next poll may wait (microseconds, -1: no limit) for the timers, MHD
 * and pending work, and at most `timeout`. */
static int64_t wait_limit(lsse_server *b, int64_t timeout)
{
    int ms = sse_loop_next_timeout(b->loop);
    if (ms >= 0 && (timeout < 0 || (int64_t)ms * 1000 < timeout))
        timeout = (int64_t)ms * 1000;
    int64_t t = sse_server_timeout(b->srv);
    if (t >= 0 && (timeout < 0 || t < timeout))
        timeout = t;
    return timeout;
}

/* server:step(timeout_seconds): one turn; a negative or nil timeout waits for activity. */
static int server_step(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Number secs = luaL_optnumber(L, 2, -1);
    int64_t timeout = secs < 0 ? -1 : secs > 86400 ? 86400000000LL : (int64_t)llround(secs * 1e6);
    b->L = L;
    int rc = sse_loop_poll(b->loop, wait_limit(b, timeout));
    sse_server_run(b->srv);
    if (rc < 0)
        return luaL_error(L, "epoll_wait: %s", strerror(-rc));
    return 0;
}

static void set_count(lua_State *L, const char *name, uint64_t v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, name);
}

/* server:stats() -> { connections, streams, streams_started, events_sent, heartbeats,
 * bytes_sent, dropped_slow, requests, channels, subscribers, publishes, channels_evicted,
 * channels_refused, channel_list } */
static int server_stats(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    sse_server_counts c;
    sse_server_counts_get(b->srv, &c);
    lua_createtable(L, 0, 12);
    set_count(L, "connections", sse_server_connections(b->srv));
    set_count(L, "streams", c.streams.live);
    set_count(L, "streams_started", c.streams.started);
    set_count(L, "events_sent", c.streams.events);
    set_count(L, "heartbeats", c.streams.heartbeats);
    set_count(L, "bytes_sent", c.streams.bytes);
    set_count(L, "dropped_slow", c.streams.dropped_slow);
    set_count(L, "requests", c.requests);
    lua_pushnumber(L, (lua_Number)(sse_loop_now_us() - b->created_us) / 1e6);
    lua_setfield(L, -2, "uptime");
    lsse_channel_stats(L, b, lua_gettop(L));
    return 1;
}

/* server:pollfd() -> the descriptor a host loop waits on (readable: call step(0)). */
static int server_pollfd(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_pushinteger(L, sse_loop_fd(b->loop));
    return 1;
}

/* server:timeout() -> seconds the host loop may wait before step(0), or nil: no limit. */
static int server_timeout(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    int64_t t = wait_limit(b, -1);
    if (t < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, (lua_Number)t / 1e6);
    return 1;
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

/* server:forked(port): in a worker process, before anything runs on the loop: an epoll
 * instance of its own, and the next listen on the parent's port, shared with the other
 * workers. */
static int server_forked(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    int rc = sse_loop_forked(b->loop);
    if (rc)
        return luaL_error(L, "epoll: %s", strerror(-rc));
    sse_server_share_port(b->srv, (int)port);
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
        { "forked", server_forked },
        { "pollfd", server_pollfd },
        { "stats", server_stats },
        { "timeout", server_timeout },
        { "redis", lsse_server_redis },
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
    lsse_open_request(L);
    lsse_open_http(L);
    lsse_open_stream(L);
    lsse_open_timer(L);
    lsse_open_channel(L);
    lsse_open_anchors(L);
    lua_pushcfunction(L, server_new);
    lua_setfield(L, -2, "server");
}
