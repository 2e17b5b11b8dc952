/* The timer class: server:timer(after, every, fn), behind app:every and app:after. Each
 * call of fn runs as an app coroutine (lsse_task_run_timer), so it may wait.
 * A timer armed from a timer's callback is one level deeper; past SSE_TIMER_NESTING_MAX
 * levels a shorter delay is raised to SSE_TIMER_NESTED_MIN_MS, as browsers do with
 * setTimeout (HTML, "timer initialisation steps"). So after(0) is "next turn" for real
 * uses, while a callback that re-arms itself with 0 for ever (a runaway, or a client
 * that can start one) costs about 1 % of a core instead of all of it (spec/hostile_spec.lua,
 * "every attack in turn": it was the one thing left busy after the attacks).
 * A timer keeps its server userdata alive (user value 2), so t->b is always valid; it is
 * anchored while armed, and released in one place (fired once, or cancelled). */
#include "lsse.h"

#include <math.h>

#define SSE_TIMER_NESTING_MAX 5
#define SSE_TIMER_NESTED_MIN_MS 4

typedef struct lsse_timer {
    sse_timer    t;
    lsse_server *b;
    int          self_ref;   /* anchored while armed; the callback is user value 1 */
    unsigned     nesting;    /* 0: armed outside any timer callback */
} lsse_timer;

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
    /* One-shot: disarmed before the call, so it may be collected once the call ends
     * (a callback still waiting holds the timer as its argument). */
    int once = !sse_timer_active(&t->t);
    unsigned outer = b->timer_nesting;
    b->timer_nesting = t->nesting + 1;
    lsse_task_run_timer(b, 1);
    b->timer_nesting = outer;
    if (once && !sse_timer_active(&t->t))
        release_timer(t, L);
}

/* server:timer(after_seconds, repeat_seconds, fn) -> timer */
int lsse_server_timer(lua_State *L)
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
    t->nesting = b->timer_nesting;
    lua_pushvalue(L, 4);
    lua_setiuservalue(L, -2, 1);
    lua_pushvalue(L, 1);          /* t->b stays valid as long as the timer exists */
    lua_setiuservalue(L, -2, 2);
    luaL_setmetatable(L, TIMER_MT);
    uint64_t rep = (uint64_t)llround(every * 1000.0);
    if (every > 0 && rep == 0)
        rep = 1;
    uint64_t delay = (uint64_t)llround(after * 1000.0);
    if (t->nesting > SSE_TIMER_NESTING_MAX && delay < SSE_TIMER_NESTED_MIN_MS)
        delay = SSE_TIMER_NESTED_MIN_MS;
    if (sse_timer_start(b->loop, &t->t, delay, rep) != 0)
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

void lsse_open_timer(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "cancel", timer_cancel },
        { "active", timer_active },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { NULL, NULL },
    };
    lsse_class(L, TIMER_MT, methods, meta);
}
