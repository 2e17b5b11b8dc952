/* sse_broker: channels on Redis (the design is in sse_broker.h and docs/broker.md). */
#include "sse_broker.h"
#include "sse_log.h"
#include "sse_redis.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_MS_DEFAULT 30000
#define BUCKETS 256
#define SETTLE_MS 300

/* Both scripts first make sure the app-wide epoch exists: Redis's TIME in ms when the
 * sequence is created, so a Redis that lost its data has a new one. */
#define ENSURE_EPOCH \
    "local epoch = redis.call('HGET', KEYS[1], 'epoch')\n" \
    "if not epoch then\n" \
    "  local t = redis.call('TIME')\n" \
    "  epoch = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))\n" \
    "  redis.call('HSET', KEYS[1], 'epoch', epoch)\n" \
    "end\n"

/* KEYS: meta, stream, channel hash. ARGV: topic, history, own id? ("1"/"0"), own id,
 * SSE before the id line, SSE after it, NDJSON without the id. The id goes in here,
 * where the sequence number is known, so the publisher encodes the event only once. */
static const char PUBLISH_LUA[] = ENSURE_EPOCH
    "local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)\n"
    "local n = redis.call('HINCRBY', KEYS[3], 'n', 1)\n"
    "local id, sse, nd = ARGV[4], ARGV[5], ARGV[7]\n"
    "if ARGV[3] == '0' then\n"
    "  id = epoch .. '-' .. seq\n"
    "  sse = ARGV[5] .. 'id: ' .. id .. '\\n' .. ARGV[6]\n"
    "  if nd == '\\n' then nd = '{\"id\":\"' .. id .. '\"}\\n'\n"
    "  else nd = '{\"id\":\"' .. id .. '\",' .. string.sub(nd, 2) end\n"
    "end\n"
    "local history = tonumber(ARGV[2])\n"
    "if history == 0 then\n"
    "  redis.call('HSET', KEYS[3], 'dropped', seq)\n"
    "else\n"
    "  local len = redis.call('XLEN', KEYS[2])\n"
    "  if len >= history then\n"
    "    local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', len - history + 1)\n"
    "    redis.call('HSET', KEYS[3], 'dropped', string.sub(old[#old][1], 3))\n"
    "    redis.call('XTRIM', KEYS[2], 'MAXLEN', history - 1)\n"
    "  end\n"
    "  redis.call('XADD', KEYS[2], '0-' .. seq, 'n', n, 's', sse, 'j', nd)\n"
    "end\n"
    "redis.call('PUBLISH', ARGV[1], epoch .. ' ' .. seq .. ' ' .. n .. ' ' .. #sse .. ' ' .. sse .. nd)\n"
    "return {epoch, seq, n, id}\n";

/* KEYS: meta, stream, channel hash. ARGV: after. The epoch, the channel's count, the
 * newest sequence number no longer kept, the app-wide sequence, and the kept events
 * after `after`. */
static const char SYNC_LUA[] = ENSURE_EPOCH
    "local n = redis.call('HGET', KEYS[3], 'n') or '0'\n"
    "local dropped = redis.call('HGET', KEYS[3], 'dropped') or '0'\n"
    "local seq = redis.call('HGET', KEYS[1], 'seq') or '0'\n"
    "return {epoch, n, dropped, seq, redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+')}\n";

/* An event that came before its turn (n > last + 1). */
typedef struct early {
    uint64_t   n, seq;
    sse_chunk *c, *nd;
} early;

/* A channel of this process in Redis. */
typedef struct bchan {
    sse_broker    *br;
    sse_channel   *ch;
    char          *topic, *stream, *hash;   /* "<prefix>:t:<name>", ":s:", ":c:" */
    uint64_t       last_n, last_seq;        /* the newest event delivered here */
    uint64_t       sub_n;                   /* the newest n pub/sub brought since the topic's
                                               subscription was last (re)made; 0: none */
    int            ready;                   /* its history is read (again, after an epoch change) */
    int            fresh;                   /* never read yet: what the stream has is history */
    int            syncing, sync_again;
    unsigned       inflight;                /* syncs given whose reply has not come: a
                                               detached channel (ch NULL) is freed after
                                               the last */
    early         *early;                   /* sorted by n */
    unsigned       nearly, early_cap;
    struct bchan  *next_in_bucket, *next;
} bchan;

/* A publish waiting for its reply. */
typedef struct pub {
    sse_broker          *br;
    bchan               *bc;                 /* NULL once its channel is detached */
    sse_broker_published cb;
    void                *ud;
    int                  own;                /* the event has an id of its own */
    sse_chunk           *pre, *post, *nd;    /* the forms, without the id unless own */
    struct pub          *prev, *next;
} pub;

struct sse_broker {
    sse_loop         *loop;
    sse_redis        *redis;
    sse_ids          *ids;
    sse_broker_hooks  hooks;
    char             *prefix, *meta;
    uint64_t          epoch;                 /* Redis's, 0 until known */
    bchan            *buckets[BUCKETS];
    bchan            *channels;
    pub              *pubs;
    sse_timer         check;
    unsigned          check_ms;
    sse_timer         settle;                /* a second read after subscribing */
    int               freeing;
    int               depth;                 /* inside a reply that runs the caller's code */
    sse_timer         reap;                  /* frees the memory of a broker freed there */
    sse_redis_script *publish_script, *sync_script;
};

static void blog(sse_broker *br, int level, const char *fmt, ...)
{
    if (!br->hooks.log)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    br->hooks.log(br->hooks.ud, level, msg);
}

static uint32_t hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static bchan *find_topic(sse_broker *br, const char *topic, size_t len)
{
    for (bchan *bc = br->buckets[hash(topic, len) % BUCKETS]; bc; bc = bc->next_in_bucket)
        if (strlen(bc->topic) == len && memcmp(bc->topic, topic, len) == 0)
            return bc;
    return NULL;
}

static bchan *find_channel(const sse_broker *br, const sse_channel *ch)
{
    for (bchan *bc = br->channels; bc; bc = bc->next)
        if (bc->ch == ch)
            return bc;
    return NULL;
}

static sse_chunk *chunk_of(const char *s, size_t n)
{
    sse_chunk *c = sse_chunk_new(n);
    if (c) {
        memcpy(c->data, s, n);
        c->len = n;
    }
    return c;
}

static uint64_t number(const char *s, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++)
        v = v * 10 + (uint64_t)(s[i] - '0');
    return v;
}

static uint64_t reply_number(const redisReply *r)
{
    if (!r)
        return 0;
    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer > 0 ? (uint64_t)r->integer : 0;
    if (r->type == REDIS_REPLY_STRING)
        return number(r->str, r->len);
    return 0;
}

/* ---- delivery in order ---- */

static void sync_channel(bchan *bc);
static void epoch_seen(sse_broker *br, uint64_t epoch);

static void deliver(bchan *bc, uint64_t n, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    sse_channel_deliver(bc->ch, seq, c, nd);
    bc->last_n = n;
    bc->last_seq = seq;
}

/* The event a channel's subscribers get when events they should have had are gone:
 * as lsse_channel's, `event: gap` with the channel and the last id delivered here. */
static void send_gap(bchan *bc)
{
    if (!sse_channel_subscribers(bc->ch))
        return;
    const char *name = sse_channel_name(bc->ch);
    char data[600], last[48];
    snprintf(last, sizeof last, "%llu-%llu", (unsigned long long)bc->br->epoch,
             (unsigned long long)bc->last_seq);
    size_t k = (size_t)snprintf(data, sizeof data, "{\"channel\":\"");
    for (const char *p = name; *p && k < sizeof data - 80; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            k += (size_t)snprintf(data + k, sizeof data - k, "\\%c", ch);
        else if (ch < 0x20)
            k += (size_t)snprintf(data + k, sizeof data - k, "\\u%04x", ch);
        else
            data[k++] = (char)ch;
    }
    snprintf(data + k, sizeof data - k, "\",\"last_event_id\":\"%s\"}", last);
    sse_event ev = SSE_EVENT_INIT;
    ev.event = "gap";
    ev.event_len = 3;
    ev.data = data;
    ev.data_len = strlen(data);
    ev.data_json = 1;
    sse_chunk *c = sse_chunk_new(sse_frame_size(&ev));
    sse_chunk *nd = c ? sse_chunk_new(sse_frame_ndjson_size(&ev)) : NULL;
    if (nd) {
        c->len = sse_frame_write(&ev, c->data);
        nd->len = sse_frame_ndjson_write(&ev, nd->data);
        sse_channel_broadcast(bc->ch, c, nd);
    }
    sse_chunk_unref(c);
    sse_chunk_unref(nd);
}

static void drop_early(bchan *bc, unsigned i)
{
    sse_chunk_unref(bc->early[i].c);
    sse_chunk_unref(bc->early[i].nd);
    memmove(bc->early + i, bc->early + i + 1, (bc->nearly - i - 1) * sizeof *bc->early);
    bc->nearly--;
}

/* Delivers the early events whose turn has come (and drops those already had). */
static void drain_early(bchan *bc)
{
    while (bc->nearly && bc->early[0].n <= bc->last_n + 1) {
        early e = bc->early[0];
        if (e.n == bc->last_n + 1)
            deliver(bc, e.n, e.seq, e.c, e.nd);
        drop_early(bc, 0);
    }
}

/* The newest of the events before `before` (and after last_n) that will not come by
 * pub/sub: the others may still be on their way, and are not a gap even when the stream
 * no longer has them. Pub/sub brings every event published while the subscription
 * stands, in order: once it has brought n = sub_n in the current subscription, every
 * later event was published while subscribed too and is coming (a process's own
 * replies overtake pub/sub, and a burst runs ahead of a short history); the events up
 * to sub_n that it did not bring were published before the subscription and are only
 * in the stream. Without sub_n (the subscription is new) nothing is known: all are
 * taken as lost, as before. */
static uint64_t lost_before(const bchan *bc, uint64_t before)
{
    uint64_t end = before - 1;
    if (bc->sub_n && bc->sub_n < end)
        end = bc->sub_n;
    return end;
}

static void keep_early(bchan *bc, uint64_t n, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    unsigned i = 0;
    while (i < bc->nearly && bc->early[i].n < n)
        i++;
    if (i < bc->nearly && bc->early[i].n == n)
        return;                            /* already waiting */
    if (bc->nearly == bc->early_cap) {
        unsigned ncap = bc->early_cap ? bc->early_cap * 2 : 8;
        early *a = realloc(bc->early, ncap * sizeof *a);
        if (!a)
            return;                        /* the sync will bring it from the stream */
        bc->early = a;
        bc->early_cap = ncap;
    }
    memmove(bc->early + i + 1, bc->early + i, (bc->nearly - i) * sizeof *bc->early);
    sse_chunk_ref(c);
    sse_chunk_ref(nd);
    bc->early[i] = (early){ n, seq, c, nd };
    bc->nearly++;
}

/* Every event reaches a channel here, whichever way it came (pub/sub, the publisher's
 * reply, a sync): once each, in the order of n. */
static void arrive(bchan *bc, uint64_t n, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    if (n <= bc->last_n)
        return;                            /* had it */
    if (bc->ready && n == bc->last_n + 1) {
        deliver(bc, n, seq, c, nd);
        drain_early(bc);
        return;
    }
    keep_early(bc, n, seq, c, nd);
    if (bc->ready)
        sync_channel(bc);                  /* fetch what came in between */
}

/* ---- syncing a channel with its stream ---- */

/* One stream entry: [ "0-<seq>", [ "n", n, "s", sse, "j", ndjson ] ]. 0 if malformed. */
static int read_entry(const redisReply *e, uint64_t *seq, uint64_t *n, const redisReply **s,
                      const redisReply **j)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
        return 0;
    const char *id = e->element[0]->str;
    size_t len = e->element[0]->len;
    *seq = len > 2 && id[0] == '0' && id[1] == '-' ? number(id + 2, len - 2) : 0;
    *n = 0;
    *s = *j = NULL;
    const redisReply *f = e->element[1];
    for (size_t k = 0; f->type == REDIS_REPLY_ARRAY && k + 1 < f->elements; k += 2) {
        const redisReply *name = f->element[k];
        if (name->type != REDIS_REPLY_STRING || name->len != 1)
            continue;
        if (name->str[0] == 'n')
            *n = reply_number(f->element[k + 1]);
        else if (name->str[0] == 's')
            *s = f->element[k + 1];
        else if (name->str[0] == 'j')
            *j = f->element[k + 1];
    }
    return *seq && *n && *s && *j && (*s)->type == REDIS_REPLY_STRING &&
           (*j)->type == REDIS_REPLY_STRING;
}

static void on_sync_reply(bchan *bc, const redisReply *r, const char *err);

/* The replies that run the caller's code (a publish's callback, the ready hook), which
 * may free the broker, count themselves in br->depth (see sse_broker_free). */
static void bchan_free(bchan *bc);

static void on_sync(void *ud, const redisReply *r, const char *err)
{
    bchan *bc = ud;
    sse_broker *br = bc->br;
    bc->inflight--;
    if (!bc->ch) {                         /* detached meanwhile: it waited for this */
        if (!bc->inflight)
            bchan_free(bc);
        return;
    }
    br->depth++;
    on_sync_reply(bc, r, err);
    br->depth--;
}

static void on_sync_reply(bchan *bc, const redisReply *r, const char *err)
{
    sse_broker *br = bc->br;
    bc->syncing = 0;
    if (br->freeing)
        return;
    if (err || !r || r->type != REDIS_REPLY_ARRAY || r->elements != 5) {
        if (!err && r && r->type == REDIS_REPLY_ERROR)
            blog(br, SSE_LOG_ERROR, "redis: reading channel '%s': %s", sse_channel_name(bc->ch), r->str);
        return;                            /* the link is down: synced again when it is back */
    }
    uint64_t epoch = reply_number(r->element[0]);
    if (epoch != br->epoch) {
        epoch_seen(br, epoch);             /* syncs every channel again */
        return;
    }
    uint64_t count = reply_number(r->element[1]);
    uint64_t dropped = reply_number(r->element[2]);
    uint64_t seq_now = reply_number(r->element[3]);
    const redisReply *entries = r->element[4];
    /* Ids up to the app-wide sequence have been issued: a client may resume from one
     * whose event is still on its way here. */
    if (seq_now > br->ids->seq)
        br->ids->seq = seq_now;
    int first = bc->fresh, was_ready = bc->ready;
    bc->fresh = 0;
    sse_channel_set_dropped(bc->ch, dropped);
    for (size_t i = 0; entries->type == REDIS_REPLY_ARRAY && i < entries->elements; i++) {
        uint64_t seq, n;
        const redisReply *s, *j;
        if (!read_entry(entries->element[i], &seq, &n, &s, &j))
            continue;
        if (first && bc->last_n == 0)      /* a fresh process missed nothing before this */
            bc->last_n = n - 1;
        if (n <= bc->last_n)
            continue;
        if (n > bc->last_n + 1) {          /* the stream no longer has what came between */
            uint64_t lost = lost_before(bc, n);
            if (lost > bc->last_n) {
                send_gap(bc);
                bc->last_n = lost;
            }
        }
        sse_chunk *c = chunk_of(s->str, s->len), *nd = chunk_of(j->str, j->len);
        if (c && nd && first) {            /* history, not news: kept, sent to nobody */
            sse_channel_remember(bc->ch, seq, c, nd);
            bc->last_n = n;
            bc->last_seq = seq;
        } else if (c && nd && n == bc->last_n + 1) {
            deliver(bc, n, seq, c, nd);
        } else if (c && nd) {
            keep_early(bc, n, seq, c, nd); /* after those pub/sub is still bringing */
        }
        sse_chunk_unref(c);
        sse_chunk_unref(nd);
    }
    if (first && bc->last_n < count)
        bc->last_n = count;                /* a fresh process starts at the present */
    bc->ready = 1;
    drain_early(bc);
    if (bc->nearly) {
        if (count >= bc->early[0].n) {
            /* The script ran after the early one was stored, yet the stream lacks what
             * came before it: trimmed (or history 0). Gone, unless pub/sub brings it. */
            uint64_t lost = lost_before(bc, bc->early[0].n);
            if (lost > bc->last_n) {
                send_gap(bc);
                bc->last_n = lost;
                drain_early(bc);
            }
        } else {
            bc->sync_again = 1;            /* read before it was stored: read again */
        }
    } else if (count > bc->last_n) {
        uint64_t lost = lost_before(bc, count + 1);
        if (lost > bc->last_n) {
            send_gap(bc);                  /* not received, and gone from the stream */
            bc->last_n = lost;
        }
    }
    if (!was_ready && br->hooks.ready)
        br->hooks.ready(br->hooks.ud, bc->ch);
    if (bc->sync_again) {
        bc->sync_again = 0;
        sync_channel(bc);
    }
}

static void sync_channel(bchan *bc)
{
    sse_broker *br = bc->br;
    if (bc->syncing) {
        bc->sync_again = 1;
        return;
    }
    char after[24];
    snprintf(after, sizeof after, "%llu", (unsigned long long)bc->last_seq);
    const char *argv[] = { br->meta, bc->stream, bc->hash, after };
    size_t lens[] = { strlen(br->meta), strlen(bc->stream), strlen(bc->hash), strlen(after) };
    if (sse_redis_eval(br->redis, br->sync_script, on_sync, bc, 3, 4, argv, lens) == 0) {
        bc->syncing = 1;
        bc->inflight++;
    }
}

/* Redis's epoch is known now, or has changed: Redis lost its data (a restart without
 * persistence, a failover to a replica that had not caught up, FLUSHALL). Every local
 * history then belongs to the old epoch: subscribers are told with a gap event (naming
 * the last id of the old epoch), the histories are dropped, and every channel is read
 * again, its events in the new epoch being news to everyone. */
static void epoch_seen(sse_broker *br, uint64_t epoch)
{
    if (br->epoch == epoch)
        return;
    if (br->epoch) {
        blog(br, SSE_LOG_WARN, "redis: the broker's data was lost (new epoch %llu): "
             "clients are sent a gap event", (unsigned long long)epoch);
        for (bchan *bc = br->channels; bc; bc = bc->next) {
            send_gap(bc);
            sse_channel_forget(bc->ch, 0);
            while (bc->nearly)
                drop_early(bc, 0);
            bc->last_n = bc->last_seq = 0;
            bc->sub_n = 0;                 /* counts of the new epoch from here */
            bc->ready = 0;                 /* resumes wait for the new history */
        }
    }
    br->epoch = epoch;
    br->ids->epoch = epoch;
    br->ids->seq = 0;
    for (bchan *bc = br->channels; bc; bc = bc->next) {
        bc->syncing = 0;
        sync_channel(bc);
    }
}

/* ---- publish ---- */

static void pub_free(sse_broker *br, pub *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        br->pubs = p->next;
    if (p->next)
        p->next->prev = p->prev;
    sse_chunk_unref(p->pre);
    sse_chunk_unref(p->post);
    sse_chunk_unref(p->nd);
    free(p);
}

/* The event as every process sends it: the id line between pre and post, the NDJSON
 * object with the id first (what the script built, so both are byte for byte the same). */
static void forms(const pub *p, const char *id, size_t idlen, sse_chunk **c, sse_chunk **nd)
{
    if (p->own) {
        *c = p->pre;
        *nd = p->nd;
        sse_chunk_ref(*c);
        sse_chunk_ref(*nd);
        return;
    }
    *c = sse_chunk_new(p->pre->len + 5 + idlen + p->post->len);
    int bare = p->nd->len == 1;            /* "\n": no id, event or data */
    *nd = sse_chunk_new(8 + idlen + 2 + p->nd->len);
    if (!*c || !*nd)
        return;
    char *o = (*c)->data;
    memcpy(o, p->pre->data, p->pre->len);
    o += p->pre->len;
    memcpy(o, "id: ", 4);
    memcpy(o + 4, id, idlen);
    o[4 + idlen] = '\n';
    o += 5 + idlen;
    memcpy(o, p->post->data, p->post->len);
    (*c)->len = (size_t)(o + p->post->len - (*c)->data);
    o = (*nd)->data;
    memcpy(o, "{\"id\":\"", 7);
    memcpy(o + 7, id, idlen);
    o += 7 + idlen;
    if (bare) {
        memcpy(o, "\"}\n", 3);
        o += 3;
    } else {
        memcpy(o, "\",", 2);
        memcpy(o + 2, p->nd->data + 1, p->nd->len - 1);
        o += 2 + p->nd->len - 1;
    }
    (*nd)->len = (size_t)(o - (*nd)->data);
}

static void on_published_reply(pub *p, const redisReply *r, const char *err);

static void on_published(void *ud, const redisReply *r, const char *err)
{
    pub *p = ud;
    sse_broker *br = p->br;
    if (!p->bc) {                          /* its channel was freed meanwhile */
        if (!br->freeing && p->cb)
            p->cb(p->ud, NULL, 0, "channel freed");
        if (!br->freeing)
            pub_free(br, p);
        return;
    }
    br->depth++;
    on_published_reply(p, r, err);
    br->depth--;
}

static void on_published_reply(pub *p, const redisReply *r, const char *err)
{
    sse_broker *br = p->br;
    if (br->freeing)
        return;
    char why[256];
    if (!err && (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 4 ||
                 r->element[3]->type != REDIS_REPLY_STRING)) {
        snprintf(why, sizeof why, "redis: %s", r && r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        err = why;
    }
    if (err) {
        if (p->cb)
            p->cb(p->ud, NULL, 0, err);
        pub_free(br, p);
        return;
    }
    uint64_t epoch = reply_number(r->element[0]);
    uint64_t seq = reply_number(r->element[1]);
    uint64_t n = reply_number(r->element[2]);
    const redisReply *id = r->element[3];
    if (epoch != br->epoch)
        epoch_seen(br, epoch);
    sse_chunk *c = NULL, *nd = NULL;
    forms(p, id->str, id->len, &c, &nd);
    if (c && nd)
        arrive(p->bc, n, seq, c, nd);      /* here at once; the echo is dropped */
    sse_chunk_unref(c);
    sse_chunk_unref(nd);
    if (p->cb)
        p->cb(p->ud, id->str, id->len, NULL);
    pub_free(br, p);
}

/* Splits the SSE form of ev (no id) at the place of its id line. */
static int encode_parts(const sse_event *ev, pub *p)
{
    sse_event e = *ev;
    if (e.id) {                            /* its own id: sent as it is */
        p->own = 1;
        p->pre = sse_chunk_new(sse_frame_size(&e));
        p->nd = sse_chunk_new(sse_frame_ndjson_size(&e));
        if (!p->pre || !p->nd)
            return -ENOMEM;
        p->pre->len = sse_frame_write(&e, p->pre->data);
        p->nd->len = sse_frame_ndjson_write(&e, p->nd->data);
        return 0;
    }
    e.id = "";                             /* "id: \n" marks the place */
    e.id_len = 0;
    sse_chunk *all = sse_chunk_new(sse_frame_size(&e));
    e.id = NULL;
    p->nd = sse_chunk_new(sse_frame_ndjson_size(&e));
    if (!all || !p->nd) {
        sse_chunk_unref(all);
        return -ENOMEM;
    }
    e.id = "";
    all->len = sse_frame_write(&e, all->data);
    e.id = NULL;
    p->nd->len = sse_frame_ndjson_write(&e, p->nd->data);
    size_t at = 0;
    while (at + 5 <= all->len && !((at == 0 || all->data[at - 1] == '\n') &&
                                   memcmp(all->data + at, "id: \n", 5) == 0))
        at++;
    p->pre = chunk_of(all->data, at);
    p->post = chunk_of(all->data + at + 5, all->len - at - 5);
    sse_chunk_unref(all);
    return p->pre && p->post ? 0 : -ENOMEM;
}

int sse_broker_publish(sse_broker *br, sse_channel *ch, const sse_event *ev,
                       sse_broker_published cb, void *ud)
{
    bchan *bc = find_channel(br, ch);
    if (!bc)
        return -EINVAL;
    /* Not sse_redis_up: the command connection may be up while the subscriber
     * reconnects, and a publish needs only the former (sse_redis answers "redis
     * unavailable" on the next turn when it is down). */
    pub *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->br = br;
    p->bc = bc;
    p->cb = cb;
    p->ud = ud;
    if (encode_parts(ev, p) != 0) {
        sse_chunk_unref(p->pre);
        sse_chunk_unref(p->post);
        sse_chunk_unref(p->nd);
        free(p);
        return -ENOMEM;
    }
    char history[24];
    snprintf(history, sizeof history, "%u", sse_channel_history(ch));
    const char *own_id = p->own ? ev->id : "";
    size_t own_len = p->own ? ev->id_len : 0;
    const char *argv[] = {
        br->meta, bc->stream, bc->hash, bc->topic, history, p->own ? "1" : "0", own_id,
        p->pre->data, p->post ? p->post->data : "", p->nd->data,
    };
    size_t lens[] = {
        strlen(br->meta), strlen(bc->stream), strlen(bc->hash), strlen(bc->topic),
        strlen(history), 1, own_len, p->pre->len, p->post ? p->post->len : 0, p->nd->len,
    };
    p->next = br->pubs;
    if (br->pubs)
        br->pubs->prev = p;
    br->pubs = p;
    int rc = sse_redis_eval(br->redis, br->publish_script, on_published, p, 3, 10, argv, lens);
    if (rc != 0) {
        pub_free(br, p);
        return rc;
    }
    return 0;
}

void sse_broker_forget(sse_broker *br, void *ud)
{
    for (pub *p = br->pubs; p; p = p->next)
        if (p->ud == ud)
            p->cb = NULL;
}

/* ---- pub/sub and the link ---- */

/* "<epoch> <seq> <n> <sse length> <sse><ndjson>" */
static void on_message(void *ud, const char *topic, size_t tlen, const char *msg, size_t len)
{
    sse_broker *br = ud;
    bchan *bc = find_topic(br, topic, tlen);
    if (!bc)
        return;
    uint64_t f[4];
    size_t at = 0;
    for (int i = 0; i < 4; i++) {
        size_t start = at;
        while (at < len && msg[at] >= '0' && msg[at] <= '9')
            at++;
        if (at == start || at >= len || msg[at] != ' ')
            return;
        f[i] = number(msg + start, at - start);
        at++;
    }
    if (f[3] > len - at)
        return;
    if (f[0] != br->epoch) {
        /* Pub/sub and the command connection are not ordered with each other: this may
         * be a message of the old epoch still unread here after a reply showed the new
         * one, or one of a new epoch before any reply did. Only what a script reads on
         * the command connection (in Redis's order) decides: the sync sees a new epoch
         * if there is one, and reads the event from the stream. */
        sync_channel(bc);
        return;
    }
    if (f[2] > bc->sub_n)
        bc->sub_n = f[2];
    sse_chunk *c = chunk_of(msg + at, f[3]);
    sse_chunk *nd = chunk_of(msg + at + f[3], len - at - f[3]);
    if (c && nd)
        arrive(bc, f[2], f[1], c, nd);
    sse_chunk_unref(c);
    sse_chunk_unref(nd);
}

static void on_state(void *ud, int up, const char *why)
{
    sse_broker *br = ud;
    if (!up) {
        blog(br, SSE_LOG_WARN, "redis: unavailable (%s): publishes fail until it is back; "
             "streams stay open", why ? why : "disconnected");
        for (bchan *bc = br->channels; bc; bc = bc->next) {
            bc->syncing = 0;
            bc->sub_n = 0;                 /* the subscriptions are made again */
        }
        return;
    }
    blog(br, SSE_LOG_INFO, "redis: connected");
    /* Whatever was published meanwhile is read from the streams. The subscriptions have
     * just been made (again, maybe on a subscriber connection that dropped while the
     * link was down already): what pub/sub brought before says nothing now. */
    for (bchan *bc = br->channels; bc; bc = bc->next) {
        bc->sub_n = 0;
        sync_channel(bc);
    }
    sse_timer_start(br->loop, &br->settle, SETTLE_MS, 0);
}

static void on_check(sse_timer *t)
{
    sse_broker *br = (sse_broker *)((char *)t - offsetof(sse_broker, check));
    for (bchan *bc = br->channels; bc; bc = bc->next)
        if (bc->ready && sse_channel_subscribers(bc->ch))
            sync_channel(bc);
}

/* A SUBSCRIBE takes effect a little after the first read of the stream may have run: an
 * event published in between would wait for the next one (or the periodic check), so
 * every channel is read once more shortly after subscribing or reconnecting. */
static void on_settle(sse_timer *t)
{
    sse_broker *br = (sse_broker *)((char *)t - offsetof(sse_broker, settle));
    for (bchan *bc = br->channels; bc; bc = bc->next)
        if (bc->ready)
            sync_channel(bc);
}

/* ---- the broker ---- */

static void release(sse_broker *br);
static void on_reap(sse_timer *t);

static char *key(const char *prefix, const char *kind, const char *name)
{
    size_t n = strlen(prefix) + strlen(kind) + strlen(name) + 3;
    char *k = malloc(n);
    if (k)
        snprintf(k, n, "%s:%s%s%s", prefix, kind, *name ? ":" : "", name);
    return k;
}

sse_broker *sse_broker_new(sse_loop *loop, const sse_broker_config *cfg, sse_ids *ids,
                           const sse_broker_hooks *hooks, char *err, size_t errlen)
{
    sse_broker *br = calloc(1, sizeof *br);
    if (!br) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    br->loop = loop;
    br->ids = ids;
    br->hooks = *hooks;
    br->check_ms = cfg->check_ms ? cfg->check_ms : CHECK_MS_DEFAULT;
    br->prefix = strdup(cfg->prefix && *cfg->prefix ? cfg->prefix : "sse");
    br->meta = br->prefix ? key(br->prefix, "meta", "") : NULL;
    br->publish_script = sse_redis_script_new(PUBLISH_LUA, sizeof PUBLISH_LUA - 1);
    br->sync_script = sse_redis_script_new(SYNC_LUA, sizeof SYNC_LUA - 1);
    sse_timer_init(&br->check, on_check);
    sse_timer_init(&br->settle, on_settle);
    sse_timer_init(&br->reap, on_reap);
    sse_redis_config rc = {
        .host = cfg->host, .port = cfg->port, .db = cfg->db, .password = cfg->password,
        .on_state = on_state, .on_message = on_message, .ud = br,
    };
    if (!br->prefix || !br->meta || !br->publish_script || !br->sync_script) {
        snprintf(err, errlen, "out of memory");
        sse_broker_free(br);
        return NULL;
    }
    const char *why = NULL;
    br->redis = sse_redis_new(loop, &rc, &why);
    if (!br->redis) {
        snprintf(err, errlen, "%s", why ? why : "out of memory");
        sse_broker_free(br);
        return NULL;
    }
    sse_timer_start(loop, &br->check, br->check_ms, br->check_ms);
    return br;
}

static void on_reap(sse_timer *t)
{
    release((sse_broker *)((char *)t - offsetof(sse_broker, reap)));
}

/* From one of our callbacks (a publish's callback, the ready hook), sse_redis answers
 * the commands still in flight on that connection with "closed" only once the callback
 * has returned: those answers need the pubs and channels they point at. So the memory
 * is released by a 0 ms timer then (run the loop once more before sse_loop_free, as
 * for sse_redis_free); otherwise before this returns. No callback runs after this. */
void sse_broker_free(sse_broker *br)
{
    if (!br || br->freeing)
        return;
    br->freeing = 1;
    sse_timer_stop(br->loop, &br->check);
    sse_timer_stop(br->loop, &br->settle);
    sse_redis_free(br->redis);            /* in-flight callbacks see br->freeing */
    if (br->depth > 0)
        sse_timer_start(br->loop, &br->reap, 0, 0);
    else
        release(br);
}

static void bchan_free(bchan *bc)
{
    while (bc->nearly)
        drop_early(bc, 0);
    free(bc->early);
    free(bc->topic);
    free(bc->stream);
    free(bc->hash);
    free(bc);
}

static void release(sse_broker *br)
{
    while (br->pubs)
        pub_free(br, br->pubs);
    for (bchan *bc = br->channels, *next; bc; bc = next) {
        next = bc->next;
        bchan_free(bc);
    }
    sse_redis_script_free(br->publish_script);
    sse_redis_script_free(br->sync_script);
    free(br->meta);
    free(br->prefix);
    free(br);
}

sse_redis *sse_broker_redis(sse_broker *br)
{
    return br->redis;
}

int sse_broker_up(const sse_broker *br)
{
    return sse_redis_up(br->redis);
}

int sse_broker_attach(sse_broker *br, sse_channel *ch)
{
    bchan *bc = calloc(1, sizeof *bc);
    if (!bc)
        return -ENOMEM;
    const char *name = sse_channel_name(ch);
    bc->br = br;
    bc->ch = ch;
    bc->fresh = 1;
    bc->topic = key(br->prefix, "t", name);
    bc->stream = key(br->prefix, "s", name);
    bc->hash = key(br->prefix, "c", name);
    if (!bc->topic || !bc->stream || !bc->hash || sse_redis_subscribe(br->redis, bc->topic, strlen(bc->topic)) != 0) {
        free(bc->topic);
        free(bc->stream);
        free(bc->hash);
        free(bc);
        return -ENOMEM;
    }
    uint32_t h = hash(bc->topic, strlen(bc->topic)) % BUCKETS;
    bc->next_in_bucket = br->buckets[h];
    br->buckets[h] = bc;
    bc->next = br->channels;
    br->channels = bc;
    sse_channel_forget(ch, 0);
    sync_channel(bc);
    sse_timer_start(br->loop, &br->settle, SETTLE_MS, 0);
    return 0;
}

void sse_broker_detach(sse_broker *br, sse_channel *ch)
{
    bchan *bc = find_channel(br, ch);
    if (!bc)
        return;
    for (bchan **link = &br->channels; *link; link = &(*link)->next)
        if (*link == bc) {
            *link = bc->next;
            break;
        }
    uint32_t h = hash(bc->topic, strlen(bc->topic)) % BUCKETS;
    for (bchan **link = &br->buckets[h]; *link; link = &(*link)->next_in_bucket)
        if (*link == bc) {
            *link = bc->next_in_bucket;
            break;
        }
    sse_redis_unsubscribe(br->redis, bc->topic, strlen(bc->topic));
    for (pub *p = br->pubs; p; p = p->next)
        if (p->bc == bc)
            p->bc = NULL;
    bc->ch = NULL;
    if (bc->inflight)                      /* freed by the last reply (on_sync) */
        return;
    bchan_free(bc);
}

int sse_broker_ready(const sse_broker *br, const sse_channel *ch)
{
    const bchan *bc = find_channel(br, ch);
    return bc && bc->ready;
}
