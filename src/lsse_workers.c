/* The binding of sse_workers: core.workers_start (fork, wait until they listen) and
 * :supervise(), core.worker_ready, core.reserve_port (the parent holds the shared
 * port), core.cpus. The facade (app:run with workers = N) is
 * what uses them; each worker runs the app's loop in its own process. */
#include "lsse.h"
#include "sse_server.h"
#include "sse_workers.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define RESERVATION_MT "sse.reservation"

typedef struct reservation {
    int fd;
    int port;
} reservation;

/* core.reserve_port(host, port) -> reservation | nil, err */
static int reserve_port(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    lua_Integer port = luaL_checkinteger(L, 2);
    luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port must be between 0 and 65535");
    reservation *r = lua_newuserdatauv(L, sizeof *r, 0);
    r->fd = -1;
    luaL_setmetatable(L, RESERVATION_MT);
    char err[256];
    if (sse_port_reserve(host, (int)port, &r->fd, &r->port, err, sizeof err) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int reservation_close(lua_State *L)
{
    reservation *r = luaL_checkudata(L, 1, RESERVATION_MT);
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
    return 0;
}

static int reservation_get(lua_State *L)
{
    reservation *r = luaL_checkudata(L, 1, RESERVATION_MT);
    if (strcmp(luaL_checkstring(L, 2), "port") == 0)
        lua_pushinteger(L, r->port);
    else
        lua_pushnil(L);
    return 1;
}

/* A supervision, from core.workers_start to :supervise(). Its options table (run, log,
 * started) is its user value, pushed for the duration of each call into C that may
 * call back (opts is its index then). */
#define WORKERS_MT "sse.workers"

typedef struct supervision {
    sse_workers *w;
    lua_State   *L;
    int          opts;
} supervision;

static int run_worker(void *ud, unsigned index)
{
    supervision *s = ud;
    lua_State *L = s->L;
    lua_getfield(L, s->opts, "run");
    lua_pushinteger(L, index);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        fprintf(stderr, "sse: worker %u: %s\n", index, lua_tostring(L, -1));
        return 1;
    }
    return lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
}

static void call_hook(supervision *s, const char *name, int nargs)
{
    lua_State *L = s->L;
    lua_getfield(L, s->opts, name);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1 + nargs);
        return;
    }
    lua_insert(L, -1 - nargs);
    if (lua_pcall(L, nargs, 0, 0) != LUA_OK) {
        fprintf(stderr, "sse: workers: %s: %s\n", name, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

static void log_hook(void *ud, int level, const char *msg)
{
    supervision *s = ud;
    static const char *names[] = { "error", "warn", "info", "debug" };   /* sse_log.h */
    lua_pushstring(s->L, level >= 0 && level <= 3 ? names[level] : "info");
    lua_pushstring(s->L, msg);
    call_hook(s, "log", 2);
}

static void started_hook(void *ud, unsigned index, pid_t pid)
{
    supervision *s = ud;
    lua_pushinteger(s->L, index);
    lua_pushinteger(s->L, pid);
    call_hook(s, "started", 2);
}

/* core.workers_start{ n, drain (seconds), run = fn(index) -> exit status, log = fn(level,
 * msg), started = fn(index, pid) } -> supervision | nil, err: returns in the parent once
 * every worker has called core.worker_ready() (it listens). */
static int workers_start(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_getfield(L, 1, "n");
    lua_Integer n = luaL_checkinteger(L, -1);
    lua_getfield(L, 1, "drain");
    lua_Number drain = luaL_optnumber(L, -1, 5);
    lua_getfield(L, 1, "run");
    luaL_checktype(L, -1, LUA_TFUNCTION);
    lua_settop(L, 1);
    luaL_argcheck(L, n >= 1 && n <= 1024, 1, "n must be 1 to 1024");
    supervision *s = lua_newuserdatauv(L, sizeof *s, 1);
    s->w = NULL;
    s->L = L;
    s->opts = 1;
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, 2, 1);
    luaL_setmetatable(L, WORKERS_MT);
    sse_workers_config cfg = {
        .n = (unsigned)n,
        .drain_ms = drain > 0 ? (unsigned)(drain * 1000) : 0,
        .run = run_worker,
        .log = log_hook,
        .started = started_hook,
        .ud = s,
    };
    int err;
    s->w = sse_workers_start(&cfg, &err);
    if (!s->w) {
        lua_pushnil(L);
        lua_pushstring(L, err == -ECHILD ? "a worker ended before it listened (see the log)"
                          : err == -ETIMEDOUT ? "the workers did not listen within 10 s"
                          : strerror(-err));
        return 2;
    }
    return 1;
}

/* supervision:supervise(): until SIGTERM/SIGINT, then every worker is stopped. true. */
static int workers_supervise(lua_State *L)
{
    supervision *s = luaL_checkudata(L, 1, WORKERS_MT);
    if (!s->w)
        return luaL_error(L, "workers: already supervised");
    lua_settop(L, 1);
    lua_getiuservalue(L, 1, 1);
    s->L = L;
    s->opts = 2;
    sse_workers *w = s->w;
    s->w = NULL;
    sse_workers_supervise(w);
    lua_pushboolean(L, 1);
    return 1;
}

static int worker_ready(lua_State *L)
{
    sse_workers_ready();
    return 0;
}

static int cpus(lua_State *L)
{
    lua_pushinteger(L, sse_workers_cpus());
    return 1;
}

void lsse_open_workers(lua_State *L)
{
    static const luaL_Reg methods[] = { { "close", reservation_close }, { NULL, NULL } };
    static const luaL_Reg meta[] = {
        { "__index", reservation_get },
        { "__gc", reservation_close },
        { NULL, NULL },
    };
    lsse_class(L, RESERVATION_MT, methods, meta);
    static const luaL_Reg wmethods[] = { { "supervise", workers_supervise }, { NULL, NULL } };
    static const luaL_Reg wmeta[] = { { NULL, NULL } };
    lsse_class(L, WORKERS_MT, wmethods, wmeta);
    lua_pushcfunction(L, workers_start);
    lua_setfield(L, -2, "workers_start");
    lua_pushcfunction(L, worker_ready);
    lua_setfield(L, -2, "worker_ready");
    lua_pushcfunction(L, reserve_port);
    lua_setfield(L, -2, "reserve_port");
    lua_pushcfunction(L, cpus);
    lua_setfield(L, -2, "cpus");
}
