/* The scheduler of app coroutines: the one place that resumes one, logs its errors with
 * a traceback, and knows what it waits for (its timer, its owner's event, nothing ever
 * again) and how it learns that its owner is gone.
 *
 * A task's waits are its own C functions yielding (lua_yield from stream:sleep or
 * stream:send): the values a resume passes become their results, true when the wait
 * ended, nil, "closed" when its owner went away. A coroutine that yields by itself
 * (coroutine.yield() with no wait set) is given a turn again after the others, by a
 * 0 ms timer. Today the tasks are stream generators; nothing here knows streams.
 */
#include "lsse.h"

#include <stddef.h>

static void resume(lsse_task *t, int nargs);

static void on_timer(sse_timer *tm)
{
    lsse_task *t = (lsse_task *)((char *)tm - offsetof(lsse_task, timer));
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
    sse_timer_init(&t->timer, on_timer);
}

static void log_error(lsse_task *t)
{
    lua_State *L = t->b->L;
    const char *msg = lua_tostring(t->co, -1);
    luaL_traceback(L, t->co, msg ? msg : "(error object is not a string)", 0);
    lua_pushfstring(L, "%s %s: %s", t->ops->what, t->ops->label ? t->ops->label(t) : "",
                    lua_tostring(L, -1));
    lsse_log(t->b, SSE_LOG_ERROR, lua_tostring(L, -1));
    lua_pop(L, 2);
}

/* Runs the coroutine until it yields or ends; nargs values are on its stack. */
static void resume(lsse_task *t, int nargs)
{
    int nres;
    t->wait = WAIT_NONE;
    int rc = lua_resume(t->co, t->b->L, nargs, &nres);
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
    lua_settop(t->co, 0);
    t->wait = WAIT_FOREVER;  /* finished: nothing may resume it again */
    if (t->ops->ended)
        t->ops->ended(t, rc == LUA_OK);
}

void lsse_task_start(lsse_task *t, int nargs)
{
    t->started = 1;
    lua_xmove(t->b->L, t->co, nargs + 1);
    resume(t, nargs);
}

int lsse_task_sleep(lua_State *L, lsse_task *t, uint64_t ms)
{
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

void lsse_task_tell_closed(lsse_task *t)
{
    if (t->wait != WAIT_SLEEP && t->wait != WAIT_DRAIN)
        return;
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
