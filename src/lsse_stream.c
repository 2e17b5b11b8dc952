/* The stream class, and a stream's life in the binding: started by the dispatch of a
 * request (lsse_stream_start), its generator run as a task (lsse_task.c) from the ready
 * hook, woken when the client catches up, told when the stream ends, its on_close
 * callbacks run, then released.
 *
 * stream:send, stream:comment and stream:write queue bytes at once; from the generator
 * they also wait (yield) while the client is behind. stream:sleep waits for a timer.
 * stream:subscribe and stream:unsubscribe work on the stream's subscriber (its channel
 * subscriptions); the channel side of a subscribe is lsse_channel_subscribe.
 * Once the stream has ended the object is inert (s->st = NULL): calls answer nil, "closed".
 */
#include "lsse.h"
#include "sse_stream.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static lsse_stream *check_stream(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, STREAM_MT);
}

static int stream_is_open(const lsse_stream *s)
{
    return s->st && sse_stream_open(s->st);
}

/* Replays of this turn's subscriptions go out before anything sent directly, so a
 * client sees history first, then what the generator says next. */
static void flush_replay(lsse_stream *s)
{
    if (sse_subscriber_has_pending(&s->sub))
        sse_subscriber_flush(&s->sub);
}

/* ---- methods ---- */

/* After queueing: the generator itself waits while the client is behind. */
static int sent(lua_State *L, lsse_stream *s, int rc)
{
    if (rc == -ENOMEM)
        return luaL_error(L, "stream:send: out of memory");
    if (rc != 0)
        return lsse_task_closed(L, &s->gen);
    if (lsse_task_is(&s->gen, L) && sse_stream_pending(s->st) > s->b->high_water) {
        sse_stream_want_drain(s->st, s->b->high_water / 2);
        return lsse_task_wait(L, &s->gen, WAIT_DRAIN);
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
        return lsse_task_closed(L, &s->gen);
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
        return lsse_task_closed(L, &s->gen);
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
        return lsse_task_closed(L, &s->gen);
    flush_replay(s);
    return sent(L, s, sse_stream_write(s->st, p, len));
}

static int stream_sleep(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    lua_Number secs = luaL_checknumber(L, 2);
    luaL_argcheck(L, secs >= 0 && secs < 1e9, 2, "seconds must be between 0 and 1e9");
    if (!lsse_task_is(&s->gen, L))
        return luaL_error(L, "stream:sleep must be called from the stream's own generator");
    if (!stream_is_open(s))
        return lsse_task_closed(L, &s->gen);
    return lsse_task_sleep(L, &s->gen, (uint64_t)llround(secs * 1000.0));
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

/* stream:subscribe(ch [, last_event_id [, { first = ... }]]) -> replayed, missed
 * Without the argument (or nil) the request's last event id is used; false: no replay.
 * first ("newest", "oldest", a count): what a subscriber without an id gets of the past. */
static int stream_subscribe(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    sse_channel *ch = lsse_check_channel(L, 2);
    if (!stream_is_open(s)) {
        lua_pushnil(L);
        lua_pushliteral(L, "closed");
        return 2;
    }
    unsigned first = 0;
    if (!lua_isnoneornil(L, 4)) {
        luaL_checktype(L, 4, LUA_TTABLE);
        lua_getfield(L, 4, "first");
        first = lsse_check_first(L, -1);
    }
    lua_settop(L, 3);
    if (lua_isnil(L, 3)) {
        lua_getiuservalue(L, 1, UV_REQ);
        lua_getfield(L, -1, "last_event_id");
        lua_replace(L, 3);
        lua_settop(L, 3);
    }
    size_t len = 0;
    const char *last = NULL;
    if (lua_toboolean(L, 3))
        last = luaL_checklstring(L, 3, &len);
    unsigned n;
    int missed;
    int rc = lsse_channel_subscribe(L, s->b, ch, &s->sub, last, len, first, &n, &missed);
    if (rc < 0)
        return luaL_error(L, "stream:subscribe: out of memory");
    if (rc == 1) {          /* already subscribed: nothing new to replay */
        n = 0;
        missed = 0;
    }
    /* The generator's own subscriptions replay when it yields (so several merge in
     * order); from anywhere else, now. */
    if (!lsse_task_is(&s->gen, L))
        sse_subscriber_flush(&s->sub);
    lua_pushinteger(L, n);
    lua_pushboolean(L, missed);
    return 2;
}

/* stream:unsubscribe(ch) -> whether it was subscribed */
static int stream_unsubscribe(lua_State *L)
{
    lsse_stream *s = check_stream(L, 1);
    sse_channel *ch = lsse_check_channel(L, 2);
    if (!s->st) {
        lua_pushboolean(L, 0);
        return 1;
    }
    int rc = sse_unsubscribe(&s->sub, ch);
    /* A stream kept open only for its channels ends with its last subscription. */
    if (rc == 0 && !s->sub.subs && lsse_task_finished(&s->gen))
        sse_stream_close(s->st);
    lua_pushboolean(L, rc == 0);
    return 1;
}

/* Computed fields (closed, req, peer), then the user's own (stream.user = name). */
static int stream_get(lua_State *L)
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
    lua_getiuservalue(L, 1, UV_FIELDS);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

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

/* ---- the generator, a task ---- */

static lsse_stream *of_task(lsse_task *t)
{
    return (lsse_stream *)((char *)t - offsetof(lsse_stream, gen));
}

static const char *gen_label(lsse_task *t)
{
    lsse_stream *s = of_task(t);
    return s->st ? sse_stream_peer(s->st) : "";
}

/* Subscriptions made in this turn replay now, merged in publish order. */
static void gen_resumed(lsse_task *t)
{
    lsse_stream *s = of_task(t);
    if (s->st)
        flush_replay(s);
}

/* A subscriber stays open for its channels after its generator returns. */
static void gen_ended(lsse_task *t, int ok)
{
    lsse_stream *s = of_task(t);
    if (s->st && (!ok || !s->sub.subs))
        sse_stream_close(s->st);
}

static const lsse_task_ops gen_ops = {
    .what = "stream",
    .label = gen_label,
    .resumed = gen_resumed,
    .ended = gen_ended,
};

/* ---- life ---- */

void lsse_stream_start(lua_State *L, lsse_server *b, sse_request *r, int fn, int req,
                       const sse_stream_opts *so, int format, long long retry)
{
    lsse_stream *s = lua_newuserdatauv(L, sizeof *s, UV_COUNT);
    memset(s, 0, sizeof *s);
    s->kind = STREAM_LUA;
    s->b = b;
    s->self_ref = LUA_NOREF;
    lsse_task_init(&s->gen, b, lua_newthread(L), &gen_ops);
    lua_setiuservalue(L, -2, UV_CO);
    lua_pushvalue(L, req);
    lua_setiuservalue(L, -2, UV_REQ);
    lua_pushvalue(L, fn);
    lua_setiuservalue(L, -2, UV_FN);
    lua_newtable(L);
    lua_setiuservalue(L, -2, UV_ONCLOSE);
    lua_newtable(L);
    lua_setiuservalue(L, -2, UV_FIELDS);
    lsse_push_server(L, b);            /* s->b stays valid as long as the stream exists */
    lua_setiuservalue(L, -2, UV_SERVER);
    luaL_setmetatable(L, STREAM_MT);

    s->sub.format = format;
    s->st = sse_request_stream(r, so);
    if (!s->st) {
        luaL_error(L, "could not start the stream");
        return;
    }
    s->sub.sink = lsse_stream_sink(s->st);
    sse_stream_set_ud(s->st, s);
    lua_pushvalue(L, -1);
    s->self_ref = lsse_anchor(L, b);
    lsse_write_first(s->st, format, retry);
}

/* The first ready: the generator starts as fn(stream, req). Later: the client caught up. */
void lsse_stream_ready(void *ud, sse_stream *st)
{
    lsse_server *b = ud;
    lua_State *L = b->L;
    if (b->finalizing || *(int *)sse_stream_ud(st) != STREAM_LUA)
        return;
    lsse_stream *s = sse_stream_ud(st);
    if (s->gen.started) {
        lsse_task_wake(&s->gen, WAIT_DRAIN);
        return;
    }
    lsse_push_anchored(L, b, s->self_ref);
    lua_getiuservalue(L, -1, UV_FN);   /* fn */
    lua_pushvalue(L, -2);               /* stream */
    lua_getiuservalue(L, -3, UV_REQ);   /* req */
    lua_pushnil(L);
    lua_setiuservalue(L, -5, UV_FN);
    lua_remove(L, -4);
    lsse_task_start(&s->gen, 2);
}

static void run_on_close(lsse_server *b, lua_State *L, int self)
{
    lua_getiuservalue(L, self, UV_ONCLOSE);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, self + 1, i);
        lua_pushvalue(L, self);
        lsse_pcall(b, L, 1, "stream on_close");
    }
    lua_settop(L, self);
}

/* The stream has ended: the object turns inert, its callbacks run, a generator waiting
 * in sleep or send learns that the stream is gone, and it is no longer anchored. */
void lsse_stream_closed(void *ud, sse_stream *st)
{
    lsse_server *b = ud;
    if (*(int *)sse_stream_ud(st) == STREAM_CHANNEL) {
        lsse_channel_stream_closed(b, st);
        return;
    }
    lsse_stream *s = sse_stream_ud(st);
    lua_State *L = b->L;
    s->st = NULL;
    sse_subscriber_clear(&s->sub);
    lsse_channel_unwait(b, &s->sub);
    lsse_task_cancel(&s->gen);
    sse_stream_release(st);
    if (b->finalizing) {
        lsse_unanchor(L, b, &s->self_ref);
        return;
    }
    lsse_push_anchored(L, b, s->self_ref);
    run_on_close(b, L, lua_gettop(L));
    lsse_task_tell_closed(&s->gen);
    lua_pop(L, 1);
    lsse_unanchor(L, b, &s->self_ref);
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

/* A subscriber's sink: the channel's shared chunks go onto its stream's queue, where a
 * client too slow for queue_limit is dropped (-EPIPE). */
static int stream_push(void *ctx, sse_chunk *c)
{
    return sse_stream_push(ctx, c);
}

sse_sink lsse_stream_sink(sse_stream *st)
{
    return (sse_sink){ stream_push, st };
}

void lsse_open_stream(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "send", stream_send },
        { "comment", stream_comment },
        { "write", stream_write },
        { "sleep", stream_sleep },
        { "close", stream_close },
        { "on_close", stream_on_close },
        { "pending", stream_pending },
        { "subscribe", stream_subscribe },
        { "unsubscribe", stream_unsubscribe },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", stream_get },
        { "__newindex", stream_newindex },
        { "__tostring", stream_tostring },
        { NULL, NULL },
    };
    lsse_class(L, STREAM_MT, methods, meta);
}
