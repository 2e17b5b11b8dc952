#include "sse_channel.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct sse_sub {
    sse_channel    *ch;
    sse_subscriber *owner;
    unsigned        slot;      /* index in ch->subs */
    sse_sub        *next;      /* the owner's next subscription */
};

typedef struct entry {
    uint64_t    seq;
    sse_chunk  *chunk;         /* the SSE form */
    sse_chunk  *nd;            /* the NDJSON form */
    const char *id;            /* points into chunk->data: chunks never change */
    size_t      id_len;
} entry;

struct sse_channel {
    char      *name;
    sse_ids   *ids;            /* the app-wide ids */
    sse_sub  **subs;
    unsigned   nsubs, subs_cap;
    entry     *hist;           /* ring of the last `history` events */
    unsigned   history, head, count;
    uint64_t   dropped;        /* newest sequence number no longer kept (0: none) */
    uint64_t   last;           /* newest sequence number delivered or remembered (0: none) */
    uint64_t   published;      /* events delivered (published here or by the broker) */
    sse_channel_idle idle;     /* called when the last subscriber leaves */
    void      *idle_ud;
};

uint64_t sse_ids_epoch(void)
{
    static uint64_t last;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    last = ms > last ? ms : last + 1;
    return last;
}

sse_channel *sse_channel_new(const char *name, unsigned history, sse_ids *ids)
{
    sse_channel *ch = calloc(1, sizeof *ch);
    if (!ch)
        return NULL;
    ch->name = strdup(name);
    if (!ch->name) {
        free(ch);
        return NULL;
    }
    ch->history = history;
    ch->ids = ids;
    return ch;
}

void sse_channel_free(sse_channel *ch)
{
    if (!ch)
        return;
    for (unsigned i = 0; i < ch->count; i++) {
        sse_chunk_unref(ch->hist[(ch->head + i) % ch->history].chunk);
        sse_chunk_unref(ch->hist[(ch->head + i) % ch->history].nd);
    }
    free(ch->hist);
    free(ch->subs);
    free(ch->name);
    free(ch);
}

const char *sse_channel_name(const sse_channel *ch) { return ch->name; }
unsigned sse_channel_subscribers(const sse_channel *ch) { return ch->nsubs; }
unsigned sse_channel_history(const sse_channel *ch) { return ch->history; }
uint64_t sse_channel_published(const sse_channel *ch) { return ch->published; }
unsigned sse_channel_kept(const sse_channel *ch) { return ch->count; }
uint64_t sse_channel_last(const sse_channel *ch) { return ch->last; }

void sse_channel_on_idle(sse_channel *ch, sse_channel_idle fn, void *ud)
{
    ch->idle = fn;
    ch->idle_ud = ud;
}

static entry *hist_at(const sse_channel *ch, unsigned i)
{
    return &ch->hist[(ch->head + i) % ch->history];
}

static sse_chunk *form(const entry *e, int format)
{
    return format == SSE_FORMAT_NDJSON ? e->nd : e->chunk;
}

static void remember(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd,
                     const char *id, size_t id_len)
{
    if (seq > ch->last)
        ch->last = seq;
    /* The ring is made on first use: a channel nobody publishes to (a room only
     * subscribed to, then left) costs no history. Without memory the event is dropped
     * as if pushed out: a resume from before it gets the gap. */
    if (ch->history && !ch->hist)
        ch->hist = calloc(ch->history, sizeof *ch->hist);
    if (!ch->hist) {
        ch->dropped = seq;
        return;
    }
    if (ch->count == ch->history) {
        entry *old = hist_at(ch, 0);
        ch->dropped = old->seq;
        sse_chunk_unref(old->chunk);
        sse_chunk_unref(old->nd);
        ch->head = (ch->head + 1) % ch->history;
        ch->count--;
    }
    entry *e = hist_at(ch, ch->count++);
    e->seq = seq;
    e->chunk = c;
    e->nd = nd;
    e->id = id;
    e->id_len = id_len;
    sse_chunk_ref(c);
    sse_chunk_ref(nd);
}

/* The result is not looked at: a sink that fails (a subscriber dropped as too slow, or
 * gone) has dealt with it on its side, and its owner clears the subscription when the
 * close reaches it; the other subscribers must get the event all the same. */
static void push(sse_subscriber *sb, sse_chunk *c)
{
    (void)sb->sink.push(sb->sink.ctx, c);
}

static int hold(sse_subscriber *sb, uint64_t seq, sse_chunk *c)
{
    if (sb->nheld == sb->held_cap) {
        unsigned ncap = sb->held_cap ? sb->held_cap * 2 : 8;
        sse_held *h = realloc(sb->held, ncap * sizeof *h);
        if (!h)
            return -ENOMEM;
        sb->held = h;
        sb->held_cap = ncap;
    }
    sb->held[sb->nheld].seq = seq;
    sb->held[sb->nheld].chunk = c;
    sb->nheld++;
    sse_chunk_ref(c);
    return 0;
}

/* The value of the "id: " line of an encoded event (NULL: none), inside the chunk's own
 * bytes so the history needs no copy. Fields start lines: data never holds a newline. */
static const char *sent_id(const sse_chunk *c, size_t *len)
{
    for (size_t i = 0; i + 4 <= c->len; i++) {
        if ((i == 0 || c->data[i - 1] == '\n') && memcmp(c->data + i, "id: ", 4) == 0) {
            const char *id = c->data + i + 4;
            const char *end = memchr(id, '\n', c->len - i - 4);
            *len = end ? (size_t)(end - id) : c->len - i - 4;
            return id;
        }
    }
    *len = 0;
    return NULL;
}

void sse_channel_remember(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    if (seq > ch->ids->seq)
        ch->ids->seq = seq;
    size_t id_len;
    const char *id = sent_id(c, &id_len);
    remember(ch, seq, c, nd, id, id_len);
}

/* Every subscriber gets the form it asked for. A kept event (seq > 0) waits while the
 * subscriber's replay is pending, so ids stay in order; one kept nowhere (a gap, seq 0)
 * goes out at once. */
static void fan_out(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    for (unsigned i = 0; i < ch->nsubs; i++) {
        sse_subscriber *sb = ch->subs[i]->owner;
        sse_chunk *mine = sb->format == SSE_FORMAT_NDJSON ? nd : c;
        if (seq && sb->npending)
            hold(sb, seq, mine);
        else
            push(sb, mine);
    }
}

void sse_channel_deliver(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd)
{
    sse_channel_remember(ch, seq, c, nd);
    ch->published++;
    fan_out(ch, seq, c, nd);
}

void sse_channel_broadcast(sse_channel *ch, sse_chunk *c, sse_chunk *nd)
{
    fan_out(ch, 0, c, nd);
}

void sse_channel_forget(sse_channel *ch, uint64_t dropped)
{
    for (unsigned i = 0; i < ch->count; i++) {
        sse_chunk_unref(hist_at(ch, i)->chunk);
        sse_chunk_unref(hist_at(ch, i)->nd);
    }
    ch->head = ch->count = 0;
    ch->dropped = dropped;
}

void sse_channel_set_dropped(sse_channel *ch, uint64_t dropped)
{
    if (dropped > ch->dropped)
        ch->dropped = dropped;
}

uint64_t sse_channel_publish(sse_channel *ch, const sse_event *ev)
{
    uint64_t seq = ch->ids->seq + 1;
    sse_event e = *ev;
    char num[48];
    if (!e.id) {
        e.id_len = (size_t)snprintf(num, sizeof num, "%llu-%llu",
                                    (unsigned long long)ch->ids->epoch, (unsigned long long)seq);
        e.id = num;
    }
    sse_chunk *c = sse_chunk_new(sse_frame_size(&e));
    sse_chunk *nd = c ? sse_chunk_new(sse_frame_ndjson_size(&e)) : NULL;
    if (!nd) {
        sse_chunk_unref(c);
        return 0;
    }
    c->len = sse_frame_write(&e, c->data);
    nd->len = sse_frame_ndjson_write(&e, nd->data);
    sse_channel_deliver(ch, seq, c, nd);
    sse_chunk_unref(nd);
    sse_chunk_unref(c);
    return seq;
}

/* Reads a decimal number that fits in 64 bits: the count of digits used, or 0. */
static size_t read_number(const char *s, size_t len, uint64_t *out)
{
    uint64_t v = 0;
    size_t i = 0;
    while (i < len && i < 19 && s[i] >= '0' && s[i] <= '9')
        v = v * 10 + (uint64_t)(s[i++] - '0');
    *out = v;
    return i;
}

/* Is s one of our ids ("<epoch>-<seq>")? 1 with *seq set: of this app's epoch; -1: of
 * another epoch (an earlier run); 0: not of this form. */
static int parse_id(const sse_ids *ids, const char *s, size_t len, uint64_t *seq)
{
    uint64_t epoch;
    size_t n = read_number(s, len, &epoch);
    if (n == 0 || n >= len || s[n] != '-')
        return 0;
    size_t m = read_number(s + n + 1, len - n - 1, seq);
    if (m == 0 || n + 1 + m != len)
        return 0;
    return epoch == ids->epoch ? 1 : -1;
}

unsigned sse_channel_resume_point(const sse_channel *ch, const char *last_id, size_t len,
                                  uint64_t *after, int *missed)
{
    *missed = 0;
    if (!last_id) {
        *after = ch->ids->seq;
        return 0;
    }
    /* An id of ours (a kept event's own id, maybe the app's) wins over reading it. */
    int found = 0;
    for (unsigned i = ch->count; i-- > 0;) {
        const entry *e = hist_at(ch, i);
        if (e->id && e->id_len == len && memcmp(e->id, last_id, len) == 0) {
            *after = e->seq;
            found = 1;
            break;
        }
    }
    if (!found && (parse_id(ch->ids, last_id, len, after) != 1 || *after > ch->ids->seq)) {
        /* An earlier run's id, or one never issued: nothing is known of what the client
         * has, so replay what is kept and say that more may be missing. */
        *after = 0;
        *missed = 1;
    } else if (ch->dropped > *after) {
        *missed = 1;
    }
    unsigned n = 0;
    for (unsigned i = 0; i < ch->count; i++)
        if (hist_at(ch, i)->seq > *after)
            n++;
    return n;
}

uint64_t sse_channel_newest_after(const sse_channel *ch, unsigned n, unsigned *count)
{
    if (n >= ch->count) {
        *count = ch->count;
        return 0;
    }
    *count = n;
    return hist_at(ch, ch->count - n - 1)->seq;
}

static sse_sub *find_sub(const sse_subscriber *sb, const sse_channel *ch)
{
    for (sse_sub *s = sb->subs; s; s = s->next)
        if (s->ch == ch)
            return s;
    return NULL;
}

/* The kept events after `after`, in the subscriber's form, each with a reference. */
static int snapshot(const sse_channel *ch, int format, uint64_t after, sse_held **out,
                    unsigned *count)
{
    unsigned n = 0;
    for (unsigned i = 0; i < ch->count; i++)
        n += hist_at(ch, i)->seq > after;
    sse_held *events = NULL;
    if (n && !(events = malloc(n * sizeof *events)))
        return -ENOMEM;
    unsigned k = 0;
    for (unsigned i = 0; i < ch->count; i++) {
        const entry *e = hist_at(ch, i);
        if (e->seq > after) {
            events[k].seq = e->seq;
            events[k].chunk = form(e, format);
            sse_chunk_ref(events[k].chunk);
            k++;
        }
    }
    *out = events;
    *count = k;
    return 0;
}

int sse_subscribe(sse_subscriber *sb, sse_channel *ch, int replay, uint64_t after,
                  sse_chunk *gap)
{
    if (find_sub(sb, ch))
        return 1;
    if (ch->nsubs == ch->subs_cap) {
        unsigned ncap = ch->subs_cap ? ch->subs_cap * 2 : 16;
        sse_sub **s = realloc(ch->subs, ncap * sizeof *s);
        if (!s)
            return -ENOMEM;
        ch->subs = s;
        ch->subs_cap = ncap;
    }
    sse_held *events = NULL;
    unsigned nevents = 0;
    if (replay && snapshot(ch, sb->format, after, &events, &nevents) != 0)
        return -ENOMEM;
    if (replay && sb->npending == sb->pending_cap) {
        unsigned ncap = sb->pending_cap ? sb->pending_cap * 2 : 4;
        sse_pending *p = realloc(sb->pending, ncap * sizeof *p);
        if (!p)
            goto nomem;
        sb->pending = p;
        sb->pending_cap = ncap;
    }
    sse_sub *sub = malloc(sizeof *sub);
    if (!sub)
        goto nomem;
    sub->ch = ch;
    sub->owner = sb;
    sub->slot = ch->nsubs;
    sub->next = sb->subs;
    sb->subs = sub;
    ch->subs[ch->nsubs++] = sub;
    if (replay) {
        if (gap)
            sse_chunk_ref(gap);
        sb->pending[sb->npending++] = (sse_pending){ ch, gap, events, nevents, 0 };
    }
    return 0;
nomem:
    for (unsigned i = 0; i < nevents; i++)
        sse_chunk_unref(events[i].chunk);
    free(events);
    return -ENOMEM;
}

static void drop_pending(sse_subscriber *sb, unsigned i)
{
    sse_pending *p = &sb->pending[i];
    sse_chunk_unref(p->gap);
    for (unsigned k = 0; k < p->nevents; k++)
        sse_chunk_unref(p->events[k].chunk);
    free(p->events);
    sb->pending[i] = sb->pending[--sb->npending];
}

int sse_unsubscribe(sse_subscriber *sb, sse_channel *ch)
{
    sse_sub **link = &sb->subs;
    while (*link && (*link)->ch != ch)
        link = &(*link)->next;
    sse_sub *sub = *link;
    if (!sub)
        return -1;
    *link = sub->next;
    sse_sub *last = ch->subs[--ch->nsubs];
    ch->subs[sub->slot] = last;
    last->slot = sub->slot;
    free(sub);
    for (unsigned i = 0; i < sb->npending; i++)
        if (sb->pending[i].ch == ch) {
            drop_pending(sb, i);
            break;
        }
    if (ch->nsubs == 0 && ch->idle)
        ch->idle(ch->idle_ud, ch);
    return 0;
}

int sse_subscribe_unresolved(sse_subscriber *sb, sse_channel *ch)
{
    int rc = sse_subscribe(sb, ch, 1, UINT64_MAX, NULL);
    if (rc == 0)
        sb->pending[sb->npending - 1].unresolved = 1;
    return rc;
}

int sse_subscriber_resolve(sse_subscriber *sb, sse_channel *ch, uint64_t after, sse_chunk *gap)
{
    for (unsigned i = 0; i < sb->npending; i++) {
        sse_pending *p = &sb->pending[i];
        if (p->ch != ch || !p->unresolved)
            continue;
        if (snapshot(ch, sb->format, after, &p->events, &p->nevents) != 0)
            return -ENOMEM;
        if (gap)
            sse_chunk_ref(gap);
        p->gap = gap;
        p->unresolved = 0;
        return 0;
    }
    return -1;
}

int sse_subscriber_has_pending(const sse_subscriber *sb)
{
    return sb->npending > 0;
}

static int by_seq(const void *a, const void *b)
{
    uint64_t x = ((const sse_held *)a)->seq, y = ((const sse_held *)b)->seq;
    return x < y ? -1 : x > y;
}

int sse_subscriber_flush(sse_subscriber *sb)
{
    if (!sb->npending)
        return 0;
    /* A replay still to be decided holds everything back, so ids stay in order. */
    for (unsigned p = 0; p < sb->npending; p++)
        if (sb->pending[p].unresolved)
            return 0;
    /* Everything to send: the events each subscription is to replay, and the held live
     * ones (a held one may also be among those to replay: duplicates go after sorting). */
    size_t n = sb->nheld;
    for (unsigned p = 0; p < sb->npending; p++)
        n += sb->pending[p].nevents;
    sse_held *all = malloc((n ? n : 1) * sizeof *all);
    if (!all)
        return -ENOMEM;
    size_t k = 0;
    for (unsigned i = 0; i < sb->nheld; i++)
        all[k++] = sb->held[i];
    for (unsigned p = 0; p < sb->npending; p++)
        for (unsigned i = 0; i < sb->pending[p].nevents; i++)
            all[k++] = sb->pending[p].events[i];
    qsort(all, k, sizeof *all, by_seq);
    for (unsigned p = 0; p < sb->npending; p++)
        if (sb->pending[p].gap)
            push(sb, sb->pending[p].gap);
    for (size_t i = 0; i < k; i++)
        if (i == 0 || all[i].seq != all[i - 1].seq)
            push(sb, all[i].chunk);
    free(all);
    for (unsigned i = 0; i < sb->nheld; i++)
        sse_chunk_unref(sb->held[i].chunk);
    sb->nheld = 0;
    while (sb->npending)
        drop_pending(sb, sb->npending - 1);
    return 0;
}

void sse_subscriber_clear(sse_subscriber *sb)
{
    while (sb->subs)
        sse_unsubscribe(sb, sb->subs->ch);
    while (sb->npending)
        drop_pending(sb, sb->npending - 1);
    for (unsigned i = 0; i < sb->nheld; i++)
        sse_chunk_unref(sb->held[i].chunk);
    free(sb->held);
    free(sb->pending);
    sb->held = NULL;
    sb->pending = NULL;
    sb->nheld = sb->held_cap = sb->npending = sb->pending_cap = 0;
}
