/* The binding of sse_channel: the channel class (server:channel, publish), subscribing
 * a subscriber to a channel (for stream:subscribe, in lsse_stream.c), and channel streams
 * (app:stream(path, channel)). Channels belong to the server object: each has a record
 * here, freed once nothing uses it (below, "the channels of an app and their lifetime"),
 * or with the server; a channel userdata is a handle on a record and keeps the server
 * userdata alive through its user value. Nothing here knows a generator stream: only
 * subscribers (sse_subscriber).
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

/* ---- the channels of an app and their lifetime ----
 *
 * Names come from clients (a chat room per name), so an app must not keep every channel
 * it ever made. Each channel has a record here, found by name, which owns the
 * sse_channel. A channel userdata is a handle on a record (one per app:channel name
 * while the script holds it: the facade caches them weakly). A record is freed once
 * nothing uses it: no handle (the script holds none, in any variable, route or
 * closure), no subscriber (streams, and resumes waiting for a broker), and, without a
 * broker, no history: kept events are what a reconnecting client would lose, so such a
 * channel stays, idle, until max_channels makes room (below). With a broker the history
 * is in Redis and the channel is freed like any other (its topic unsubscribed).
 *
 * When a record becomes unused (its last handle is collected, its last subscriber
 * leaves) it is only noted: that happens in a finalizer or inside sse_channel's calls.
 * The next sweep (before a channel is made, before the figures are read) frees what is
 * still unused then.
 *
 * max_channels bounds the records. Making one more first sweeps, then runs a full
 * collection, so that handles the script dropped count no more (at most once per
 * max_channels / 16 channels made or refused: its cost is spread over them); then frees the idle channel unused longest with its history (counted in
 * channels_evicted); and when every channel is in use, refuses (nil, "max_channels",
 * counted in channels_refused, logged once per 10 s).
 *
 * A channel made again after being freed must not resume a client silently past what it
 * missed: the newest sequence number each freed channel was given is kept in a small
 * table by its name's hash, and a new channel of that name counts everything up to it
 * as gone, so a resume from before it gets the gap event (a collision of two names only
 * adds a gap). */

#define FREED_SLOTS 1024
#define BURST_LOG_US 10000000

typedef struct lsse_chan {
    sse_channel      *ch;
    lsse_server      *b;
    size_t            len;         /* of the name */
    uint32_t          hash;
    unsigned          handles;     /* channel userdata on it */
    unsigned          index;       /* in chans->all */
    int               fields_ref;  /* its fields table, anchored; LUA_NOREF until set */
    int               doomed;      /* on the doomed list: to look at in the next sweep */
    int               idle;        /* on the idle list: kept for its history alone */
    struct lsse_chan *next_doomed, *next_in_bucket;
    struct lsse_chan *idle_prev, *idle_next;
} lsse_chan;

typedef struct lsse_chans {
    lsse_chan  **all;
    unsigned     n, cap;
    lsse_chan  **buckets;
    unsigned     nbuckets;                 /* a power of two */
    lsse_chan   *doomed;
    lsse_chan   *idle_head, *idle_tail;    /* unused longest first */
    uint64_t     freed[FREED_SLOTS];
    uint64_t     refused, evicted;
    unsigned     made;                     /* channels made or refused since the last
                                              full collection of make_room */
    int64_t      refused_log_us, evicted_log_us;
    unsigned     refused_more, evicted_more;
} lsse_chans;

typedef struct lsse_channel {
    lsse_chan   *rec;                      /* NULL once collected */
    lsse_server *b;
} lsse_channel;

static uint32_t name_hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static lsse_chans *chans_of(lsse_server *b)
{
    if (!b->chans)
        b->chans = calloc(1, sizeof *b->chans);
    return b->chans;
}

static lsse_chan *lookup(const lsse_chans *cs, const char *name, size_t len, uint32_t h)
{
    if (!cs->nbuckets)
        return NULL;
    for (lsse_chan *r = cs->buckets[h & (cs->nbuckets - 1)]; r; r = r->next_in_bucket)
        if (r->hash == h && r->len == len && memcmp(sse_channel_name(r->ch), name, len) == 0)
            return r;
    return NULL;
}

/* Room for one more record in the array and the buckets. 0 or -ENOMEM. */
static int grow(lsse_chans *cs)
{
    if (cs->n == cs->cap) {
        unsigned ncap = cs->cap ? cs->cap * 2 : 16;
        lsse_chan **a = realloc(cs->all, ncap * sizeof *a);
        if (!a)
            return -ENOMEM;
        cs->all = a;
        cs->cap = ncap;
    }
    if (cs->n + 1 > cs->nbuckets) {
        unsigned nb = cs->nbuckets ? cs->nbuckets * 2 : 64;
        lsse_chan **bk = calloc(nb, sizeof *bk);
        if (!bk)
            return -ENOMEM;
        for (unsigned i = 0; i < cs->n; i++) {
            lsse_chan *r = cs->all[i];
            r->next_in_bucket = bk[r->hash & (nb - 1)];
            bk[r->hash & (nb - 1)] = r;
        }
        free(cs->buckets);
        cs->buckets = bk;
        cs->nbuckets = nb;
    }
    return 0;
}

static void doom(lsse_chans *cs, lsse_chan *r)
{
    if (r->doomed)
        return;
    r->doomed = 1;
    r->next_doomed = cs->doomed;
    cs->doomed = r;
}

static void idle_remove(lsse_chans *cs, lsse_chan *r)
{
    if (!r->idle)
        return;
    *(r->idle_prev ? &r->idle_prev->idle_next : &cs->idle_head) = r->idle_next;
    *(r->idle_next ? &r->idle_next->idle_prev : &cs->idle_tail) = r->idle_prev;
    r->idle_prev = r->idle_next = NULL;
    r->idle = 0;
}

static void idle_append(lsse_chans *cs, lsse_chan *r)
{
    if (r->idle)
        return;
    r->idle = 1;
    r->idle_next = NULL;
    r->idle_prev = cs->idle_tail;
    *(cs->idle_tail ? &cs->idle_tail->idle_next : &cs->idle_head) = r;
    cs->idle_tail = r;
}

/* The last subscriber left (sse_channel's hook, in the middle of its calls): noted. */
static void on_idle(void *ud, sse_channel *ch)
{
    (void)ch;
    lsse_chan *r = ud;
    if (!r->handles && r->b->chans)
        doom(r->b->chans, r);
}

/* Frees a record nothing uses (no handle, no subscriber). */
static void chan_free(lua_State *L, lsse_server *b, lsse_chan *r)
{
    lsse_chans *cs = b->chans;
    uint64_t *freed = &cs->freed[r->hash % FREED_SLOTS];
    if (sse_channel_last(r->ch) > *freed)
        *freed = sse_channel_last(r->ch);
    idle_remove(cs, r);
    for (lsse_chan **link = &cs->buckets[r->hash & (cs->nbuckets - 1)]; *link;
         link = &(*link)->next_in_bucket)
        if (*link == r) {
            *link = r->next_in_bucket;
            break;
        }
    cs->all[r->index] = cs->all[--cs->n];
    cs->all[r->index]->index = r->index;
    if (b->broker)
        sse_broker_detach(b->broker, r->ch);
    lsse_unanchor(L, b, &r->fields_ref);
    sse_channel_free(r->ch);
    free(r);
}

/* Frees the noted records still unused; an unused one that keeps history (no broker)
 * goes to the end of the idle list instead. */
static void sweep(lua_State *L, lsse_server *b)
{
    lsse_chans *cs = b->chans;
    while (cs && cs->doomed) {
        lsse_chan *r = cs->doomed;
        cs->doomed = r->next_doomed;
        r->doomed = 0;
        if (r->handles || sse_channel_subscribers(r->ch))
            continue;
        if (!b->broker && sse_channel_kept(r->ch))
            idle_append(cs, r);
        else
            chan_free(L, b, r);
    }
}

/* One warning per burst: the first at once, then at most one line per 10 s. */
static void log_burst(lsse_server *b, int64_t *at, unsigned *more, const char *msg)
{
    int64_t now = sse_loop_now_us();
    if (*at && now - *at < BURST_LOG_US) {
        (*more)++;
        return;
    }
    char line[512];
    if (*more)
        snprintf(line, sizeof line, "%s (and %u more like it in the last %d s)", msg, *more,
                 BURST_LOG_US / 1000000);
    else
        snprintf(line, sizeof line, "%s", msg);
    lsse_log(b, SSE_LOG_WARN, line);
    *at = now;
    *more = 0;
}

/* max_channels is reached: makes room for one more if it can (see above). */
static void make_room(lua_State *L, lsse_server *b)
{
    lsse_chans *cs = b->chans;
    if (cs->made >= b->max_channels / 16) {
        cs->made = 0;
        lua_gc(L, LUA_GCCOLLECT);
        sweep(L, b);
        if (cs->n < b->max_channels)
            return;
    }
    if (cs->idle_head) {
        cs->evicted++;
        char msg[160];
        snprintf(msg, sizeof msg, "max_channels (%u) reached: the idle channel unused longest "
                 "was freed with its history (a resume from it gets the gap event)",
                 b->max_channels);
        log_burst(b, &cs->evicted_log_us, &cs->evicted_more, msg);
        chan_free(L, b, cs->idle_head);
    }
}

/* A new handle on r; the server userdata is at index 1. */
static void push_handle(lua_State *L, lsse_server *b, lsse_chan *r)
{
    lsse_channel *c = lua_newuserdatauv(L, sizeof *c, 1);
    c->rec = r;
    c->b = b;
    r->handles++;
    idle_remove(b->chans, r);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, CHANNEL_MT);
}

static lsse_channel *check_channel(lua_State *L, int idx)
{
    lsse_channel *c = luaL_checkudata(L, idx, CHANNEL_MT);
    if (!c->b->loop || !c->rec)
        luaL_error(L, "attempt to use a channel of a closed app");
    return c;
}

/* server:channel(name, history) -> the channel of that name (made now if there is none),
 * or nil, "max_channels" when max_channels is reached and every channel is in use. */
int lsse_server_channel(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    luaL_argcheck(L, len > 0 && !memchr(name, 0, len), 2, "a channel name is a non-empty string without NUL");
    lua_Integer history = luaL_optinteger(L, 3, 100);
    luaL_argcheck(L, history >= 0 && history <= 1000000, 3, "history must be 0 to 1000000");
    lsse_chans *cs = chans_of(b);
    if (!cs)
        return luaL_error(L, "out of memory");
    uint32_t h = name_hash(name, len);
    lsse_chan *r = lookup(cs, name, len, h);
    if (r) {
        push_handle(L, b, r);
        return 1;
    }
    sweep(L, b);
    cs->made++;
    if (b->max_channels && cs->n >= b->max_channels)
        make_room(L, b);
    if (b->max_channels && cs->n >= b->max_channels) {
        cs->refused++;
        char msg[160];
        snprintf(msg, sizeof msg, "max_channels (%u) reached and every channel is in use: "
                 "a new channel was refused", b->max_channels);
        log_burst(b, &cs->refused_log_us, &cs->refused_more, msg);
        lua_pushnil(L);
        lua_pushliteral(L, "max_channels");
        return 2;
    }
    if (grow(cs) != 0 || !(r = calloc(1, sizeof *r)))
        return luaL_error(L, "out of memory");
    r->ch = sse_channel_new(name, (unsigned)history, &b->ids);
    if (!r->ch) {
        free(r);
        return luaL_error(L, "out of memory");
    }
    r->b = b;
    r->len = len;
    r->hash = h;
    r->fields_ref = LUA_NOREF;
    sse_channel_on_idle(r->ch, on_idle, r);
    if (b->broker && sse_broker_attach(b->broker, r->ch) != 0) {
        sse_channel_free(r->ch);
        free(r);
        return luaL_error(L, "out of memory");
    }
    if (!b->broker)            /* with a broker the history, and what is gone, is Redis's */
        sse_channel_set_dropped(r->ch, cs->freed[h % FREED_SLOTS]);
    r->index = cs->n;
    cs->all[cs->n++] = r;
    r->next_in_bucket = cs->buckets[h & (cs->nbuckets - 1)];
    cs->buckets[h & (cs->nbuckets - 1)] = r;
    push_handle(L, b, r);
    return 1;
}

/* A handle is collected: its record is noted once none is left. Runs wherever the
 * collector does, so it frees nothing itself. */
static int channel_gc(lua_State *L)
{
    lsse_channel *c = luaL_checkudata(L, 1, CHANNEL_MT);
    lsse_chan *r = c->rec;
    c->rec = NULL;
    if (!r || !c->b->loop || !c->b->chans)   /* the app is closed: its records are gone */
        return 0;
    if (--r->handles == 0 && !sse_channel_subscribers(r->ch))
        doom(c->b->chans, r);
    return 0;
}

void lsse_channel_stats(lua_State *L, lsse_server *b, int t)
{
    lua_Integer subscribers = 0, publishes = 0;
    lsse_chans *cs = b->chans;
    sweep(L, b);
    unsigned n = cs ? cs->n : 0;
    /* The list is built from pointers taken first: a handle collected while it is built
     * only notes its record, and the sweep that frees it comes later. */
    lua_createtable(L, (int)n, 0);
    for (unsigned i = 0; i < n; i++) {
        sse_channel *ch = cs->all[i]->ch;
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
    lua_pushinteger(L, n);
    lua_setfield(L, t, "channels");
    lua_pushinteger(L, subscribers);
    lua_setfield(L, t, "subscribers");
    lua_pushinteger(L, publishes);
    lua_setfield(L, t, "publishes");
    lua_pushinteger(L, cs ? (lua_Integer)cs->evicted : 0);
    lua_setfield(L, t, "channels_evicted");
    lua_pushinteger(L, cs ? (lua_Integer)cs->refused : 0);
    lua_setfield(L, t, "channels_refused");
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
    lsse_chans *cs = b->chans;
    if (!cs)
        return;
    /* The anchors (fields tables) go with the server userdata. */
    for (unsigned i = 0; i < cs->n; i++) {
        sse_channel_free(cs->all[i]->ch);
        free(cs->all[i]);
    }
    free(cs->all);
    free(cs->buckets);
    free(cs);
    b->chans = NULL;
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
    int rc = sse_broker_publish(c->b->broker, c->rec->ch, ev, on_broker_published, t);
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
    uint64_t seq = sse_channel_publish(c->rec->ch, &ev);
    if (!seq)
        return luaL_error(L, "channel:publish: out of memory");
    if (ev.id)
        lua_pushlstring(L, ev.id, ev.id_len);
    else
        lua_pushfstring(L, "%I-%I", (lua_Integer)c->b->ids.epoch, (lua_Integer)seq);
    return 1;
}

static int is_computed(const char *k)
{
    return k && (strcmp(k, "subscribers") == 0 || strcmp(k, "name") == 0 ||
                 strcmp(k, "history") == 0);
}

/* Computed fields (subscribers, name, history), then the fields set on it (ch.x = v):
 * those belong to the channel, not to the handle, so every handle of it sees them for
 * as long as it exists. */
static int channel_get(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    sse_channel *ch = c->rec->ch;
    const char *k = lua_tostring(L, 2);
    if (k && strcmp(k, "subscribers") == 0)
        lua_pushinteger(L, sse_channel_subscribers(ch));
    else if (k && strcmp(k, "name") == 0)
        lua_pushstring(L, sse_channel_name(ch));
    else if (k && strcmp(k, "history") == 0)
        lua_pushinteger(L, sse_channel_history(ch));
    else if (c->rec->fields_ref == LUA_NOREF)
        lua_pushnil(L);
    else {
        lsse_push_anchored(L, c->b, c->rec->fields_ref);
        if (lua_istable(L, -1)) {
            lua_pushvalue(L, 2);
            lua_rawget(L, -2);
        } else {
            lua_pushnil(L);
        }
    }
    return 1;
}

static int channel_newindex(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    if (is_computed(lua_tostring(L, 2)))
        return luaL_error(L, "channel.%s is read-only", lua_tostring(L, 2));
    if (c->rec->fields_ref == LUA_NOREF) {
        lua_newtable(L);
        c->rec->fields_ref = lsse_anchor(L, c->b);
    }
    lsse_push_anchored(L, c->b, c->rec->fields_ref);
    if (!lua_istable(L, -1))
        return 0;              /* the server is being collected */
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

static int channel_tostring(lua_State *L)
{
    lsse_channel *c = luaL_checkudata(L, 1, CHANNEL_MT);
    lua_pushfstring(L, "sse.channel (%s)",
                    c->b->loop && c->rec ? sse_channel_name(c->rec->ch) : "closed");
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
    return check_channel(L, idx)->rec->ch;
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
    if (lsse_channel_subscribe(L, c->b, c->rec->ch, &s->sub, last_id, len, first, &n, &missed) < 0)
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
        { "__newindex", channel_newindex },
        { "__tostring", channel_tostring },
        { "__gc", channel_gc },
        { NULL, NULL },
    };
    lsse_class(L, CHANNEL_MT, methods, meta);
}
