/* The binding of sse_channel: the channel class (server:channel, publish), subscribing
 * a subscriber to a channel (for stream:subscribe, in lsse_stream.c), and channel streams
 * (app:stream(path, channel)). Channels belong to the server object (freed after its
 * last stream); a channel userdata keeps the server userdata alive through its user
 * value. Nothing here knows a generator stream: only subscribers (sse_subscriber).
 *
 * With a broker (the app option, sse_broker.c) every channel lives in Redis: a publish
 * waits for Redis (an app coroutine yields until its reply), and a resume waits until
 * the channel's history has been read (a waiter, subscribed by the ready hook). */
#include "lsse.h"
#include "sse_broker.h"
#include "sse_redis.h"
#include "sse_stream.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* A subscription with a resume, made once its channel's history is in. */
typedef struct lsse_waiter {
    sse_channel        *ch;
    sse_subscriber     *sb;
    char               *last;        /* NULL: no last event id, the newest `first` instead */
    size_t              len;
    unsigned            first;
    struct lsse_waiter *next;
} lsse_waiter;

typedef struct lsse_channel {
    sse_channel *ch;
    lsse_server *b;
} lsse_channel;

static lsse_channel *check_channel(lua_State *L, int idx)
{
    lsse_channel *c = luaL_checkudata(L, idx, CHANNEL_MT);
    if (!c->b->loop)
        luaL_error(L, "attempt to use a channel of a closed app");
    return c;
}

/* server:channel(name, history) -> a new channel (the facade keeps one per name). */
int lsse_server_channel(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    const char *name = luaL_checkstring(L, 2);
    lua_Integer history = luaL_optinteger(L, 3, 100);
    luaL_argcheck(L, history >= 0 && history <= 1000000, 3, "history must be 0 to 1000000");
    if (b->nchannels == b->channels_cap) {
        unsigned ncap = b->channels_cap ? b->channels_cap * 2 : 8;
        sse_channel **a = realloc(b->channels, ncap * sizeof *a);
        if (!a)
            return luaL_error(L, "out of memory");
        b->channels = a;
        b->channels_cap = ncap;
    }
    lsse_channel *c = lua_newuserdatauv(L, sizeof *c, 1);
    c->b = b;
    c->ch = sse_channel_new(name, (unsigned)history, &b->ids);
    if (!c->ch)
        return luaL_error(L, "out of memory");
    b->channels[b->nchannels++] = c->ch;
    if (b->broker && sse_broker_attach(b->broker, c->ch) != 0)
        return luaL_error(L, "out of memory");
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, CHANNEL_MT);
    return 1;
}

void lsse_channel_stats(lua_State *L, lsse_server *b, int t)
{
    lua_Integer subscribers = 0, publishes = 0;
    lua_createtable(L, (int)b->nchannels, 0);
    for (unsigned i = 0; i < b->nchannels; i++) {
        sse_channel *ch = b->channels[i];
        lua_createtable(L, 0, 4);
        lua_pushstring(L, sse_channel_name(ch));
        lua_setfield(L, -2, "name");
        lua_pushinteger(L, sse_channel_subscribers(ch));
        lua_setfield(L, -2, "subscribers");
        lua_pushinteger(L, (lua_Integer)sse_channel_published(ch));
        lua_setfield(L, -2, "publishes");
        lua_pushinteger(L, sse_channel_history(ch));
        lua_setfield(L, -2, "history");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
        subscribers += sse_channel_subscribers(ch);
        publishes += (lua_Integer)sse_channel_published(ch);
    }
    lua_setfield(L, t, "channel_list");
    lua_pushinteger(L, b->nchannels);
    lua_setfield(L, t, "channels");
    lua_pushinteger(L, subscribers);
    lua_setfield(L, t, "subscribers");
    lua_pushinteger(L, publishes);
    lua_setfield(L, t, "publishes");
}

void lsse_free_channels(lsse_server *b)
{
    sse_broker_free(b->broker);    /* first: it points at the channels */
    b->broker = NULL;
    while (b->waiters) {
        lsse_waiter *w = b->waiters;
        b->waiters = w->next;
        free(w->last);
        free(w);
    }
    for (unsigned i = 0; i < b->nchannels; i++)
        sse_channel_free(b->channels[i]);
    free(b->channels);
    b->channels = NULL;
    b->nchannels = b->channels_cap = 0;
}

/* ---- publishing through the broker ---- */

static void on_broker_published(void *ud, const char *id, size_t len, const char *err)
{
    lsse_task *t = ud;
    t->io = NULL;
    if (err) {
        lua_pushnil(t->co);
        lua_pushstring(t->co, err);
        lsse_task_deliver(t, WAIT_IO, 2);
    } else {
        lua_pushlstring(t->co, id, len);
        lsse_task_deliver(t, WAIT_IO, 1);
    }
}

static void cancel_publish(void *io)
{
    lsse_task *t = io;
    if (t->b->broker)
        sse_broker_forget(t->b->broker, t);
}

/* With a broker: waits (yields) until Redis has stored the event: its id, or nil, err
 * when Redis cannot be reached (never raises for that). */
static int broker_publish(lua_State *L, lsse_channel *c, const sse_event *ev)
{
    lsse_task *t = lsse_task_current(c->b, L);
    if (!t)
        return luaL_error(L, "channel:publish: with a broker, a publish waits for Redis: call it "
                             "from an app coroutine (a handler, a before hook, a stream's generator "
                             "or accept, a timer callback, a function given to app:spawn)");
    int rc = sse_broker_publish(c->b->broker, c->ch, ev, on_broker_published, t);
    if (rc == -ENOTCONN) {
        lua_pushnil(L);
        lua_pushliteral(L, "redis unavailable");
        return 2;
    }
    if (rc != 0)
        return luaL_error(L, "channel:publish: out of memory");
    t->io = t;
    t->io_cancel = cancel_publish;
    return lsse_task_wait(L, t, WAIT_IO);
}

/* ch:publish(ev) -> id  (with a broker: id | nil, err, waiting for Redis) */
static int channel_publish(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    sse_event ev;
    lsse_check_event(L, 2, "channel:publish", &ev);
    if (c->b->broker)
        return broker_publish(L, c, &ev);
    uint64_t seq = sse_channel_publish(c->ch, &ev);
    if (!seq)
        return luaL_error(L, "channel:publish: out of memory");
    if (ev.id)
        lua_pushlstring(L, ev.id, ev.id_len);
    else
        lua_pushfstring(L, "%I-%I", (lua_Integer)c->b->ids.epoch, (lua_Integer)seq);
    return 1;
}

/* Computed fields: subscribers, name, history. */
static int channel_get(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "subscribers") == 0)
        lua_pushinteger(L, sse_channel_subscribers(c->ch));
    else if (strcmp(k, "name") == 0)
        lua_pushstring(L, sse_channel_name(c->ch));
    else if (strcmp(k, "history") == 0)
        lua_pushinteger(L, sse_channel_history(c->ch));
    else
        lua_pushnil(L);
    return 1;
}

static int channel_tostring(lua_State *L)
{
    lsse_channel *c = luaL_checkudata(L, 1, CHANNEL_MT);
    lua_pushfstring(L, "sse.channel (%s)", c->b->loop ? sse_channel_name(c->ch) : "closed");
    return 1;
}

/* The event a client gets first when events after its id are no longer kept:
 *   event: gap
 *   data: {"channel":"<name>","last_event_id":"<id>"}
 * It has no id, so the client's last event id stays as it was. */
static sse_chunk *gap_event(lua_State *L, int format, const char *channel,
                            const char *last_id, size_t len)
{
    int top = lua_gettop(L);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "gap");
    lua_setfield(L, -2, "event");
    lua_createtable(L, 0, 2);
    lua_pushstring(L, channel);
    lua_setfield(L, -2, "channel");
    lua_pushlstring(L, last_id, len);
    lua_setfield(L, -2, "last_event_id");
    lua_setfield(L, -2, "data");
    sse_event ev;
    lsse_check_event(L, top + 1, "stream:subscribe", &ev);
    int nd = format == SSE_FORMAT_NDJSON;
    sse_chunk *c = sse_chunk_new(nd ? sse_frame_ndjson_size(&ev) : sse_frame_size(&ev));
    if (c)
        c->len = nd ? sse_frame_ndjson_write(&ev, c->data) : sse_frame_write(&ev, c->data);
    lua_settop(L, top);
    return c;
}

unsigned lsse_check_first(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return 0;
    if (lua_type(L, idx) == LUA_TSTRING) {
        const char *s = lua_tostring(L, idx);
        if (strcmp(s, "newest") == 0)
            return 1;
        if (strcmp(s, "oldest") == 0)
            return UINT_MAX;
        luaL_error(L, "first must be \"newest\", \"oldest\" or a count of events");
    }
    lua_Integer n = luaL_checkinteger(L, idx);
    luaL_argcheck(L, n >= 0, idx, "first must be a count of events");
    return n > (lua_Integer)UINT_MAX ? UINT_MAX : (unsigned)n;
}

sse_channel *lsse_check_channel(lua_State *L, int idx)
{
    return check_channel(L, idx)->ch;
}

/* A subscription whose replay waits for ch's history: 2, 1 if sb is subscribed to ch
 * already, -ENOMEM. */
static int wait_for_history(lsse_server *b, sse_channel *ch, sse_subscriber *sb,
                            const char *last, size_t len, unsigned first)
{
    lsse_waiter *w = calloc(1, sizeof *w);
    if (!w || (last && !(w->last = malloc(len + 1)))) {
        free(w);
        return -ENOMEM;
    }
    int rc = sse_subscribe_unresolved(sb, ch);
    if (rc != 0) {
        free(w->last);
        free(w);
        return rc;
    }
    if (last) {
        memcpy(w->last, last, len);
        w->last[len] = '\0';
    }
    w->len = len;
    w->first = first;
    w->ch = ch;
    w->sb = sb;
    w->next = b->waiters;
    b->waiters = w;
    return 2;
}

/* The replay of a subscription with last: its resume point and, when events after it
 * are gone, the gap event first. */
static int resume(lua_State *L, sse_channel *ch, sse_subscriber *sb, const char *last,
                  size_t len, unsigned first, uint64_t *after, sse_chunk **gap, unsigned *n,
                  int *missed)
{
    if (!last) {               /* no id: the newest `first` kept events */
        *after = sse_channel_newest_after(ch, first, n);
        *missed = 0;
        *gap = NULL;
        return 0;
    }
    *n = sse_channel_resume_point(ch, last, len, after, missed);
    *gap = *missed ? gap_event(L, sb->format, sse_channel_name(ch), last, len) : NULL;
    return *missed && !*gap ? -ENOMEM : 0;
}

int lsse_channel_subscribe(lua_State *L, lsse_server *b, sse_channel *ch, sse_subscriber *sb,
                           const char *last, size_t len, unsigned first, unsigned *n,
                           int *missed)
{
    int replay = last != NULL || first > 0;
    if (replay && b->broker && !sse_broker_ready(b->broker, ch)) {
        *n = 0;
        *missed = 0;
        return wait_for_history(b, ch, sb, last, len, first);
    }
    uint64_t after = 0;
    sse_chunk *gap = NULL;
    *n = 0;
    *missed = 0;
    if (replay && resume(L, ch, sb, last, len, first, &after, &gap, n, missed) != 0)
        return -ENOMEM;
    int rc = sse_subscribe(sb, ch, replay, after, gap);
    sse_chunk_unref(gap);
    return rc;
}

void lsse_channel_stream(lua_State *L, sse_request *r, int ch, const sse_stream_opts *so,
                         int format, long long retry, const char *last_id, size_t len,
                         unsigned first)
{
    lsse_channel *c = check_channel(L, ch);
    lsse_substream *s = calloc(1, sizeof *s);
    if (!s) {
        luaL_error(L, "out of memory");
        return;
    }
    s->kind = STREAM_CHANNEL;
    s->sub.format = format;
    sse_stream *st = sse_request_stream(r, so);
    if (!st) {
        free(s);
        luaL_error(L, "could not start the stream");
        return;
    }
    s->sub.sink = lsse_stream_sink(st);
    sse_stream_set_ud(st, s);
    lsse_write_first(st, format, retry);
    /* From here s belongs to the stream (freed by stream_closed), so a failure just
     * ends the stream cleanly. */
    unsigned n;
    int missed;
    if (lsse_channel_subscribe(L, c->b, c->ch, &s->sub, last_id, len, first, &n, &missed) < 0)
        sse_stream_close(st);
    sse_subscriber_flush(&s->sub);
}

void lsse_channel_stream_closed(lsse_server *b, sse_stream *st)
{
    lsse_substream *s = sse_stream_ud(st);
    sse_subscriber_clear(&s->sub);
    lsse_channel_unwait(b, &s->sub);
    sse_stream_release(st);
    free(s);
}

/* ---- other Redis commands of the app (server:redis) ---- */

/* A reply inside a reply as one Lua value: strings, integers, lists (nested), false
 * for a nil element (so a list keeps its length), an error element as its message. */
static void push_value(lua_State *L, const redisReply *r)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushinteger(L, (lua_Integer)r->integer);
        break;
    case REDIS_REPLY_ARRAY:
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_value(L, r->element[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    case REDIS_REPLY_ERROR:       /* inside an array: its message */
        lua_pushlstring(L, r->str, r->len);
        break;
    default:
        lua_pushboolean(L, 0);    /* nil inside a list: false keeps the list's length */
    }
}

static void on_redis_reply(void *ud, const redisReply *r, const char *err)
{
    lsse_task *t = ud;
    if (!t)
        return;                   /* its task went away */
    t->io = NULL;
    lua_State *co = t->co;
    if (err || !r) {
        lua_pushnil(co);
        lua_pushstring(co, err ? err : "no reply");
        lsse_task_deliver(t, WAIT_IO, 2);
    } else if (r->type == REDIS_REPLY_ERROR) {
        lua_pushnil(co);
        lua_pushlstring(co, r->str, r->len);
        lsse_task_deliver(t, WAIT_IO, 2);
    } else if (r->type == REDIS_REPLY_NIL) {
        lua_pushnil(co);
        lsse_task_deliver(t, WAIT_IO, 1);
    } else {
        push_value(co, r);
        lsse_task_deliver(t, WAIT_IO, 1);
    }
}

/* A command's reply that nobody waits for any more: sse_redis still calls back, so
 * the callback is pointed at nothing (the task may be gone by then). */
typedef struct redis_wait {
    lsse_task *t;
} redis_wait;

static void on_redis_wait(void *ud, const redisReply *r, const char *err)
{
    redis_wait *w = ud;
    on_redis_reply(w->t, r, err);
    free(w);
}

static void cancel_redis(void *io)
{
    redis_wait *w = io;
    w->t = NULL;
}

/* server:redis(arg, ...) -> reply | nil, err: one command on the broker's Redis,
 * waiting (yielding) for the reply in an app coroutine. */
int lsse_server_redis(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    if (!b->broker)
        return luaL_error(L, "redis: the app has no broker");
    lsse_task *t = lsse_task_current(b, L);
    if (!t)
        return luaL_error(L, "redis: not in an app coroutine " LSSE_APP_COROUTINES);
    int argc = lua_gettop(L) - 1;
    luaL_argcheck(L, argc >= 1 && argc <= 64, 2, "1 to 64 arguments");
    const char *argv[64];
    size_t lens[64];
    for (int i = 0; i < argc; i++)
        argv[i] = luaL_checklstring(L, i + 2, &lens[i]);
    redis_wait *w = malloc(sizeof *w);
    if (!w)
        return luaL_error(L, "redis: out of memory");
    w->t = t;
    if (sse_redis_command(sse_broker_redis(b->broker), on_redis_wait, w, argc, argv, lens) != 0) {
        free(w);
        lua_pushnil(L);
        lua_pushliteral(L, "redis unavailable");
        return 2;
    }
    t->io = w;
    t->io_cancel = cancel_redis;
    return lsse_task_wait(L, t, WAIT_IO);
}

/* ---- waiting for a channel's history (a broker) ---- */

void lsse_channel_unwait(lsse_server *b, sse_subscriber *sb)
{
    for (lsse_waiter **link = &b->waiters; *link;) {
        lsse_waiter *w = *link;
        if (w->sb == sb) {
            *link = w->next;
            free(w->last);
            free(w);
        } else {
            link = &w->next;
        }
    }
}

static int subscribe_waiter(lua_State *L)
{
    lsse_waiter *w = lua_touserdata(L, 2);
    uint64_t after;
    sse_chunk *gap = NULL;
    unsigned n;
    int missed;
    if (resume(L, w->ch, w->sb, w->last, w->len, w->first, &after, &gap, &n, &missed) == 0 &&
        sse_subscriber_resolve(w->sb, w->ch, after, gap) == 0)
        sse_subscriber_flush(w->sb);
    sse_chunk_unref(gap);
    return 0;
}

/* The broker's ready hook: ch's history is in, so the resumes waiting for it are made. */
static void on_channel_ready(void *ud, sse_channel *ch)
{
    lsse_server *b = ud;
    lsse_waiter *ready = NULL;
    for (lsse_waiter **link = &b->waiters; *link;) {
        lsse_waiter *w = *link;
        if (w->ch == ch) {
            *link = w->next;
            w->next = ready;
            ready = w;
        } else {
            link = &w->next;
        }
    }
    while (ready) {
        lsse_waiter *w = ready;
        ready = w->next;
        if (!b->finalizing) {
            lua_pushcfunction(b->L, subscribe_waiter);
            lua_pushlightuserdata(b->L, b);
            lua_pushlightuserdata(b->L, w);
            lsse_pcall(b, b->L, 2, "channel");
        }
        free(w->last);
        free(w);
    }
}

static void on_broker_log(void *ud, int level, const char *msg)
{
    lsse_log(ud, level, msg);
}

/* broker = { host, port, db, password, prefix, check_ms } */
void lsse_open_broker(lua_State *L, lsse_server *b, int idx)
{
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "host");
    lua_getfield(L, idx, "port");
    lua_getfield(L, idx, "db");
    lua_getfield(L, idx, "password");
    lua_getfield(L, idx, "prefix");
    lua_getfield(L, idx, "check_ms");
    int top = lua_gettop(L);
    sse_broker_config cfg = {
        .host = luaL_optstring(L, top - 5, "127.0.0.1"),
        .port = (int)luaL_optinteger(L, top - 4, 6379),
        .db = (int)luaL_optinteger(L, top - 3, 0),
        .password = luaL_optstring(L, top - 2, NULL),
        .prefix = luaL_optstring(L, top - 1, "sse"),
        .check_ms = (unsigned)luaL_optinteger(L, top, 0),
    };
    sse_broker_hooks hooks = { .log = on_broker_log, .ready = on_channel_ready, .ud = b };
    char err[256];
    b->broker = sse_broker_new(b->loop, &cfg, &b->ids, &hooks, err, sizeof err);
    lua_settop(L, top - 6);
    if (!b->broker)
        luaL_error(L, "broker: %s", err);
}

void lsse_open_channel(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "publish", channel_publish },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", channel_get },
        { "__tostring", channel_tostring },
        { NULL, NULL },
    };
    lsse_class(L, CHANNEL_MT, methods, meta);
}
