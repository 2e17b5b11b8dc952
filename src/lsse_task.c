/* The scheduler of app coroutines: the one place that resumes one, logs its errors with
 * a traceback, and knows what it waits for (its timer, its owner's event, nothing ever
 * again) and how it learns that its owner is gone.
 *
 * A task's waits are its own C functions yielding (lua_yield from stream:sleep or
 * stream:send): the values a resume passes become their results, true when the wait
 * ended, nil, "closed" when its owner went away. A coroutine that yields by itself
 * (coroutine.yield() with no wait set) is given a turn again after the others, by a
 * 0 ms timer. The tasks are stream generators (lsse_stream.c), request handlers
 * (lsse_request.c), spawned functions and timer callbacks (below); nothing here knows
 * what owns them.
 */
#include "lsse.h"

#include <stddef.h>

static void resume(lsse_task *t, int nargs);

static void on_timer(sse_timer *tm)
{
    lsse_task *t = (lsse_task *)((char *)tm - offsetof(lsse_task, timer));
    if (t->start_nargs >= 0) {    /* a spawned task's first turn */
        int n = t->start_nargs;
        t->start_nargs = -1;
        t->started = 1;
        resume(t, n);
        return;
    }
    if (t->wait != WAIT_SLEEP)
        return;
    lua_pushboolean(t->co, 1);
    resume(t, 1);
}

void lsse_task_init(lsse_task *t, lsse_server *b, lua_State *co, const lsse_task_ops *ops)
{
    t->b = b;
    t->co = co;
    t->ops = ops;
    t->wait = WAIT_NONE;
    t->started = t->cancelled = t->told_closed = 0;
    t->start_nargs = -1;
    t->io = NULL;
    t->io_cancel = NULL;
    sse_timer_init(&t->timer, on_timer);
}

static void log_error(lsse_task *t)
{
    lua_State *L = t->b->L;
    const char *msg = lua_tostring(t->co, -1);
    luaL_traceback(L, t->co, msg ? msg : "(error object is not a string)", 0);
    if (t->ops->label)
        lua_pushfstring(L, "%s %s: %s", t->ops->what, t->ops->label(t), lua_tostring(L, -1));
    else
        lua_pushfstring(L, "%s: %s", t->ops->what, lua_tostring(L, -1));
    lsse_log(t->b, SSE_LOG_ERROR, lua_tostring(L, -1));
    lua_pop(L, 2);
}

/* Runs the coroutine until it yields or ends; nargs values are on its stack. */
static void resume(lsse_task *t, int nargs)
{
    int nres;
    t->wait = WAIT_NONE;
    lsse_task *outer = t->b->running;   /* resumes nest: a generator may spawn */
    t->b->running = t;
    int rc = lua_resume(t->co, t->b->L, nargs, &nres);
    t->b->running = outer;
    if (t->ops->resumed)
        t->ops->resumed(t);
    if (rc == LUA_YIELD) {
        lua_pop(t->co, nres);
        if (t->wait == WAIT_NONE && !t->cancelled) {
            /* A bare coroutine.yield(): give the others a turn. */
            t->wait = WAIT_SLEEP;
            sse_timer_start(t->b->loop, &t->timer, 0, 0);
        }
        return;
    }
    if (rc != LUA_OK)
        log_error(t);
    t->wait = WAIT_FOREVER;  /* finished: nothing may resume it again */
    if (t->ops->ended)       /* what the function returned is on t->co's stack */
        t->ops->ended(t, rc == LUA_OK);
    lua_settop(t->co, 0);
}

void lsse_task_start(lsse_task *t, int nargs)
{
    t->started = 1;
    lua_xmove(t->b->L, t->co, nargs + 1);
    resume(t, nargs);
}

int lsse_task_sleep(lua_State *L, lsse_task *t, uint64_t ms)
{
    if (t->cancelled)        /* its owner is gone: no timer may wake it any more */
        return lsse_task_closed(L, t);
    t->wait = WAIT_SLEEP;
    sse_timer_start(t->b->loop, &t->timer, ms, 0);
    return lua_yield(L, 0);
}

int lsse_task_wait(lua_State *L, lsse_task *t, int wait)
{
    t->wait = wait;
    return lua_yield(L, 0);
}

void lsse_task_wake(lsse_task *t, int wait)
{
    if (t->wait != wait)
        return;
    lua_pushboolean(t->co, 1);
    resume(t, 1);
}

int lsse_task_closed(lua_State *L, lsse_task *t)
{
    if (L == t->co) {
        if (t->told_closed)
            return lsse_task_wait(L, t, WAIT_FOREVER);
        t->told_closed = 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

void lsse_task_cancel(lsse_task *t)
{
    t->cancelled = 1;
    sse_timer_stop(t->b->loop, &t->timer);
}

void lsse_task_deliver(lsse_task *t, int wait, int nargs)
{
    if (t->wait != wait) {
        lua_pop(t->co, nargs);
        return;
    }
    resume(t, nargs);
}

void lsse_task_tell_closed(lsse_task *t)
{
    if (t->wait == WAIT_IO && t->io) {
        t->io_cancel(t->io);      /* its request is of no use to anyone now */
        t->io = NULL;
    } else if (t->wait != WAIT_SLEEP && t->wait != WAIT_DRAIN) {
        return;
    }
    t->told_closed = 1;
    lua_pushnil(t->co);
    lua_pushliteral(t->co, "closed");
    resume(t, 2);
}

int lsse_task_finished(const lsse_task *t)
{
    return t->wait == WAIT_FOREVER && lua_status(t->co) == LUA_OK;
}

int lsse_task_is(const lsse_task *t, lua_State *L)
{
    return L == t->co;
}

lsse_task *lsse_task_current(lsse_server *b, lua_State *L)
{
    return b->running && b->running->co == L ? b->running : NULL;
}

/* ---- app:spawn and app:sleep ---- */

#define SPAWNED_MT "sse.spawned"

/* A spawned coroutine: its userdata (user values: the coroutine, the server) is anchored
 * until the function returns or raises. */
typedef struct lsse_spawned {
    lsse_task task;
    int       self_ref;
} lsse_spawned;

static void spawned_ended(lsse_task *t, int ok)
{
    lsse_spawned *s = (lsse_spawned *)((char *)t - offsetof(lsse_spawned, task));
    lsse_unanchor(t->b->L, t->b, &s->self_ref);
}

static const lsse_task_ops spawned_ops = { .what = "spawn", .ended = spawned_ended };
static const lsse_task_ops timer_ops = { .what = "timer", .ended = spawned_ended };

/* A new anchored task on L's state; fn and its nargs arguments are moved into it. */
static lsse_spawned *new_spawned(lua_State *L, lsse_server *b, int nargs, const lsse_task_ops *ops)
{
    lsse_spawned *s = lua_newuserdatauv(L, sizeof *s, 2);
    lua_State *co = lua_newthread(L);
    lua_setiuservalue(L, -2, 1);
    lsse_push_server(L, b);
    lua_setiuservalue(L, -2, 2);
    luaL_setmetatable(L, SPAWNED_MT);
    lsse_task_init(&s->task, b, co, ops);
    s->self_ref = lsse_anchor(L, b);        /* pops the userdata: anchored now */
    lua_xmove(L, co, nargs + 1);            /* fn and its arguments */
    return s;
}

int lsse_server_spawn(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 2;
    lsse_spawned *s = new_spawned(L, b, nargs, &spawned_ops);
    /* Not at once: the caller (a handler, a generator...) goes on first, and the
     * coroutine starts from the loop, in the next turn. */
    s->task.start_nargs = nargs;
    if (sse_timer_start(b->loop, &s->task.timer, 0, 0) != 0)
        return luaL_error(L, "app:spawn: out of memory");
    return 0;
}

void lsse_task_run_timer(lsse_server *b, int nargs)
{
    lsse_spawned *s = new_spawned(b->L, b, nargs, &timer_ops);
    s->task.started = 1;
    resume(&s->task, nargs);
}

int lsse_server_sleep(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    lua_Number secs = luaL_checknumber(L, 2);
    luaL_argcheck(L, secs >= 0 && secs < 1e9, 2, "seconds must be between 0 and 1e9");
    lsse_task *t = lsse_task_current(b, L);
    if (!t)
        return luaL_error(L, "app:sleep: not in an app coroutine " LSSE_APP_COROUTINES
                             ": nothing here can wait on the loop");
    return lsse_task_sleep(L, t, (uint64_t)(secs * 1000.0 + 0.5));
}

void lsse_open_task(lua_State *L)
{
    static const luaL_Reg none[] = { { NULL, NULL } };
    lsse_class(L, SPAWNED_MT, none, none);
}
