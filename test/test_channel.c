/* C tests of the channel core, with no server: each subscriber's sink records what it is
 * given, and reads it back as a client would (SSE through sse_parser; NDJSON as bytes).
 * Covers fan-out, ids, history, replay without a seam, the merge of several channels,
 * the gap decision, failing sinks, unsubscribe and clear, the NDJSON form, and what an
 * owner freeing unused channels is told (the idle hook, kept, last). */
#include "sse_channel.h"
#include "sse_parser.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A fixed epoch, so expected ids can be written down. */
#define EPOCH 1700000000000ULL
#define EPOCH_S "1700000000000"

/* A subscriber and its sink. Each event it reads is logged as "data@id" ("#n" stands for
 * our id EPOCH-n), or "type:data" for any other type, so that a whole stream compares as
 * one short string and a failure prints something readable. Gap events carry no id: they
 * are logged without one. */
typedef struct rec {
    sse_subscriber sb;
    sse_parser     p;
    sse_buf        log;
    sse_buf        raw;          /* every byte pushed, in order */
    sse_chunk     *chunks[64];   /* what was pushed, each with a reference (as a queue) */
    unsigned       nchunks;
    unsigned       calls;        /* push calls, failed ones included */
    int            fail;         /* 0, or what push returns instead of taking the chunk */
} rec;

static void die(const char *what)
{
    fprintf(stderr, "test_channel: %s\n", what);
    exit(2);
}

static void log_put(rec *r, const char *s, size_t n)
{
    if (sse_buf_append(&r->log, s, n) != 0)
        die("out of memory");
}

static int on_event(void *ud, const char *event, size_t event_len, const char *data,
                    size_t data_len, const char *id, size_t id_len)
{
    rec *r = ud;
    if (r->log.len)
        log_put(r, " ", 1);
    int message = event_len == 7 && memcmp(event, "message", 7) == 0;
    int gap = event_len == 3 && memcmp(event, "gap", 3) == 0;
    if (!message) {
        log_put(r, event, event_len);
        log_put(r, ":", 1);
    }
    log_put(r, data, data_len);
    if (!gap) {
        const char *ours = EPOCH_S "-";
        size_t k = strlen(ours);
        if (id_len > k && memcmp(id, ours, k) == 0) {
            log_put(r, "@#", 2);
            log_put(r, id + k, id_len - k);
        } else {
            log_put(r, "@", 1);
            log_put(r, id, id_len);
        }
    }
    return 0;
}

static int rec_push(void *ctx, sse_chunk *c)
{
    rec *r = ctx;
    r->calls++;
    if (r->fail)
        return r->fail;
    if (r->nchunks == sizeof r->chunks / sizeof r->chunks[0])
        die("too many chunks for one recorder");
    sse_chunk_ref(c);
    r->chunks[r->nchunks++] = c;
    if (sse_buf_append(&r->raw, c->data, c->len) != 0)
        die("out of memory");
    if (r->sb.format == SSE_FORMAT_SSE && sse_parser_feed(&r->p, c->data, c->len, on_event, r))
        die("parser failed");
    return 0;
}

static void rec_init(rec *r, int format)
{
    memset(r, 0, sizeof *r);
    sse_parser_init(&r->p);
    r->sb.format = format;
    r->sb.sink = (sse_sink){ rec_push, r };
}

static const char *logged(rec *r)
{
    if (sse_buf_reserve(&r->log, 1) != 0)
        die("out of memory");
    r->log.data[r->log.len] = '\0';
    return r->log.data;
}

static const char *raw(rec *r)
{
    if (sse_buf_reserve(&r->raw, 1) != 0)
        die("out of memory");
    r->raw.data[r->raw.len] = '\0';
    return r->raw.data;
}

/* Forgets what was received (the subscriptions stay). */
static void rec_reset(rec *r)
{
    for (unsigned i = 0; i < r->nchunks; i++)
        sse_chunk_unref(r->chunks[i]);
    r->nchunks = r->calls = 0;
    sse_buf_reset(&r->log);
    sse_buf_reset(&r->raw);
}

static void rec_free(rec *r)
{
    sse_subscriber_clear(&r->sb);
    rec_reset(r);
    sse_buf_free(&r->log);
    sse_buf_free(&r->raw);
    sse_parser_free(&r->p);
}

#define LOGGED(r, want) \
    CHECK(strcmp(logged(r), want) == 0, "%s: got '%s', want '%s'", #r, logged(r), want)

/* Our id for sequence number n. */
static const char *our_id(unsigned long long n)
{
    static char buf[4][48];
    static int k;
    char *b = buf[k++ % 4];
    snprintf(b, sizeof buf[0], "%s-%llu", EPOCH_S, n);
    return b;
}

static uint64_t pub_event(sse_channel *ch, const char *event, const char *data, const char *id,
                          int data_json)
{
    sse_event ev = SSE_EVENT_INIT;
    ev.data = data;
    ev.data_len = strlen(data);
    ev.data_json = data_json;
    if (event) {
        ev.event = event;
        ev.event_len = strlen(event);
    }
    if (id) {
        ev.id = id;
        ev.id_len = strlen(id);
    }
    const char *why;
    if (sse_frame_validate(&ev, &why) != 0)
        die(why);
    return sse_channel_publish(ch, &ev);
}

static uint64_t pub(sse_channel *ch, const char *data)
{
    return pub_event(ch, NULL, data, NULL, 0);
}

/* The gap event as the binding makes it (event "gap", no id), here with the channel's name
 * as data so a test can tell whose gap it is. */
static sse_chunk *gap_chunk(const sse_channel *ch, int format)
{
    sse_event ev = SSE_EVENT_INIT;
    ev.event = "gap";
    ev.event_len = 3;
    ev.data = sse_channel_name(ch);
    ev.data_len = strlen(ev.data);
    int nd = format == SSE_FORMAT_NDJSON;
    sse_chunk *c = sse_chunk_new(nd ? sse_frame_ndjson_size(&ev) : sse_frame_size(&ev));
    if (!c)
        die("out of memory");
    c->len = nd ? sse_frame_ndjson_write(&ev, c->data) : sse_frame_write(&ev, c->data);
    return c;
}

/* Subscribes as the binding does for a client that sent last (NULL: none): the resume
 * point, the gap event if events may be missing, then the subscription. Returns what
 * sse_channel_resume_point counted; *missed as it says. */
static unsigned resume(rec *r, sse_channel *ch, const char *last, int *missed)
{
    uint64_t after = 0;
    int m;
    unsigned n = sse_channel_resume_point(ch, last, last ? strlen(last) : 0, &after, &m);
    sse_chunk *gap = m ? gap_chunk(ch, r->sb.format) : NULL;
    int rc = sse_subscribe(&r->sb, ch, last != NULL, after, gap);
    sse_chunk_unref(gap);
    CHECK(rc == 0, "subscribe to %s: %d", sse_channel_name(ch), rc);
    if (missed)
        *missed = m;
    return n;
}

static void live(rec *r, sse_channel *ch)
{
    int rc = sse_subscribe(&r->sb, ch, 0, 0, NULL);
    CHECK(rc == 0, "live subscribe to %s: %d", sse_channel_name(ch), rc);
}

static void test_fanout(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("news", 10, &ids);
    rec r[3];
    for (int i = 0; i < 3; i++) {
        rec_init(&r[i], SSE_FORMAT_SSE);
        live(&r[i], ch);
    }
    CHECK(sse_channel_subscribers(ch) == 3, "3 subscribers: %u", sse_channel_subscribers(ch));
    CHECK(sse_subscribe(&r[0].sb, ch, 0, 0, NULL) == 1, "subscribing twice says so");
    CHECK(sse_channel_subscribers(ch) == 3, "and adds no subscriber");
    pub(ch, "a");
    pub(ch, "b");
    pub(ch, "c");
    for (int i = 0; i < 3; i++) {
        LOGGED(&r[i], "a@#1 b@#2 c@#3");
        CHECK(r[i].calls == 3, "subscriber %d: one push per event: %u", i, r[i].calls);
        CHECK(!sse_subscriber_has_pending(&r[i].sb), "a live subscription has nothing pending");
    }
    /* Encoded once: every subscriber got the same chunk. */
    for (unsigned k = 0; k < 3; k++)
        CHECK(r[0].chunks[k] == r[1].chunks[k] && r[1].chunks[k] == r[2].chunks[k],
              "event %u is one shared chunk", k + 1);
    /* The history's reference, and one per recorder. */
    CHECK(r[0].chunks[0]->refs == 4, "refs of a kept, pushed chunk: %u", r[0].chunks[0]->refs);
    CHECK(strcmp(raw(&r[1]), "id: " EPOCH_S "-1\ndata: a\n\nid: " EPOCH_S "-2\ndata: b\n\n"
                             "id: " EPOCH_S "-3\ndata: c\n\n") == 0,
          "the bytes: '%s'", raw(&r[1]));
    for (int i = 0; i < 3; i++)
        rec_free(&r[i]);
    CHECK(sse_channel_subscribers(ch) == 0, "cleared subscribers are gone");
    sse_channel_free(ch);
}

static void test_ids(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *a = sse_channel_new("a", 10, &ids);
    sse_channel *b = sse_channel_new("b", 10, &ids);
    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    live(&r, a);
    live(&r, b);
    uint64_t s1 = pub(a, "x");
    uint64_t s2 = pub(b, "y");
    uint64_t s3 = pub(a, "z");
    CHECK(s1 == 1 && s2 == 2 && s3 == 3, "one sequence across the app's channels: %llu %llu %llu",
          (unsigned long long)s1, (unsigned long long)s2, (unsigned long long)s3);
    uint64_t s4 = pub_event(b, NULL, "w", "mine-7", 0);
    CHECK(s4 == 4, "an event with its own id still takes a number: %llu", (unsigned long long)s4);
    pub(a, "v");
    CHECK(ids.seq == 5, "ids.seq is the last number given: %llu", (unsigned long long)ids.seq);
    LOGGED(&r, "x@#1 y@#2 z@#3 w@mine-7 v@#5");

    /* The id given is kept with its event: resuming from it replays what came after. */
    rec q;
    rec_init(&q, SSE_FORMAT_SSE);
    int missed;
    unsigned n = resume(&q, b, "mine-7", &missed);
    CHECK(n == 0 && !missed, "b has nothing after mine-7: %u, missed %d", n, missed);
    pub(b, "u");
    sse_subscriber_flush(&q.sb);
    LOGGED(&q, "u@#6");
    rec_free(&q);
    /* Only b kept it: to a it is an unknown id (a gap, and all a keeps). */
    rec_init(&q, SSE_FORMAT_SSE);
    n = resume(&q, a, "mine-7", &missed);
    CHECK(n == 3 && missed, "a does not know mine-7: %u, missed %d", n, missed);
    sse_subscriber_flush(&q.sb);
    LOGGED(&q, "gap:a x@#1 z@#3 v@#5");
    rec_free(&q);

    rec_init(&q, SSE_FORMAT_SSE);
    n = resume(&q, a, our_id(4), &missed);
    CHECK(n == 1 && !missed, "an id of ours for b's number resumes a after it: %u, missed %d", n,
          missed);
    sse_subscriber_flush(&q.sb);
    LOGGED(&q, "v@#5");
    rec_free(&q);

    uint64_t e1 = sse_ids_epoch(), e2 = sse_ids_epoch();
    CHECK(e2 > e1, "epochs are unique in the process: %llu then %llu",
          (unsigned long long)e1, (unsigned long long)e2);
    CHECK(e1 > 1600000000000ULL, "an epoch is milliseconds since 1970: %llu", (unsigned long long)e1);
    rec_free(&r);
    sse_channel_free(a);
    sse_channel_free(b);
}

static void test_replay_seam(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("c", 10, &ids);
    sse_channel *other = sse_channel_new("other", 10, &ids);
    pub(ch, "1");
    pub(ch, "2");
    pub(ch, "3");
    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    live(&r, other);
    uint64_t after;
    int missed;
    unsigned n = sse_channel_resume_point(ch, our_id(1), strlen(our_id(1)), &after, &missed);
    CHECK(n == 2 && after == 1 && !missed, "after #1: %u kept, after %llu, missed %d", n,
          (unsigned long long)after, missed);
    CHECK(sse_subscribe(&r.sb, ch, 1, after, NULL) == 0, "subscribe with replay");
    CHECK(sse_subscriber_has_pending(&r.sb), "the replay waits for the flush");
    pub(ch, "4");
    pub(other, "5");     /* live on a channel with no replay: held too, to keep the order */
    CHECK(r.calls == 0, "nothing is pushed before the flush: %u", r.calls);
    CHECK(sse_subscriber_flush(&r.sb) == 0, "flush");
    LOGGED(&r, "2@#2 3@#3 4@#4 5@#5");
    CHECK(!sse_subscriber_has_pending(&r.sb), "nothing pending after the flush");
    pub(ch, "6");
    LOGGED(&r, "2@#2 3@#3 4@#4 5@#5 6@#6");
    CHECK(sse_subscriber_flush(&r.sb) == 0 && r.calls == 5, "a flush with nothing pending sends "
          "nothing: %u pushes", r.calls);

    /* The replay was taken at subscribe time: publishes before the flush that push the
     * replayed events out of a short history do not lose them. */
    sse_channel *tiny = sse_channel_new("tiny", 2, &ids);
    pub(tiny, "t7");
    pub(tiny, "t8");
    rec q;
    rec_init(&q, SSE_FORMAT_SSE);
    n = resume(&q, tiny, our_id(6), &missed);
    CHECK(n == 2 && !missed, "tiny keeps #7 and #8: %u, missed %d", n, missed);
    pub(tiny, "t9");
    pub(tiny, "t10");
    pub(tiny, "t11");
    sse_subscriber_flush(&q.sb);
    LOGGED(&q, "t7@#7 t8@#8 t9@#9 t10@#10 t11@#11");

    /* A held event that a later replay also has is sent once: held while another replay
     * was pending, then the channel is left and joined again with a replay from before. */
    rec d;
    rec_init(&d, SSE_FORMAT_SSE);
    resume(&d, other, our_id(11), &missed);        /* pending: holds what comes */
    live(&d, ch);
    pub(ch, "12");                                  /* held */
    CHECK(sse_unsubscribe(&d.sb, ch) == 0, "leave ch");
    n = resume(&d, ch, our_id(11), &missed);        /* its replay has #12 as well */
    CHECK(n == 1 && !missed, "ch has #12 after #11: %u", n);
    sse_subscriber_flush(&d.sb);
    LOGGED(&d, "12@#12");
    CHECK(d.calls == 1, "the duplicate is not pushed: %u pushes", d.calls);

    rec_free(&r);
    rec_free(&q);
    rec_free(&d);
    sse_channel_free(ch);
    sse_channel_free(other);
    sse_channel_free(tiny);
}

static void test_merge(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *a = sse_channel_new("a", 10, &ids);
    sse_channel *b = sse_channel_new("b", 10, &ids);
    sse_channel *c = sse_channel_new("c", 10, &ids);
    pub(a, "a1");
    pub(b, "b2");
    pub(a, "a3");
    pub(c, "c4");
    pub(b, "b5");
    pub(a, "a6");
    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    /* One Last-Event-ID for all three: what each channel has after #2. */
    int missed;
    CHECK(resume(&r, a, our_id(2), &missed) == 2 && !missed, "a after #2: a3 a6");
    CHECK(resume(&r, b, our_id(2), &missed) == 1 && !missed, "b after #2: b5");
    CHECK(resume(&r, c, our_id(2), &missed) == 1 && !missed, "c after #2: c4");
    pub(b, "b7");
    pub(c, "c8");
    CHECK(r.calls == 0, "nothing before the flush");
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "a3@#3 c4@#4 b5@#5 a6@#6 b7@#7 c8@#8");
    pub(a, "a9");
    LOGGED(&r, "a3@#3 c4@#4 b5@#5 a6@#6 b7@#7 c8@#8 a9@#9");
    rec_free(&r);
    sse_channel_free(a);
    sse_channel_free(b);
    sse_channel_free(c);
}

static void test_history(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("h", 3, &ids);
    CHECK(sse_channel_history(ch) == 3, "history: %u", sse_channel_history(ch));
    for (int i = 1; i <= 5; i++) {
        char d[8];
        snprintf(d, sizeof d, "e%d", i);
        pub(ch, d);
    }
    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    int missed;
    unsigned n = resume(&r, ch, our_id(0), &missed);
    CHECK(n == 3 && missed, "only the last 3 are kept, and #1-#2 are missed: %u, %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "gap:h e3@#3 e4@#4 e5@#5");
    rec_free(&r);

    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, ch, our_id(3), &missed);
    CHECK(n == 2 && !missed, "a kept event's id: %u after it, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "e4@#4 e5@#5");
    rec_free(&r);

    /* No history: live only, and any id of ours from before misses something. */
    sse_channel *none = sse_channel_new("none", 0, &ids);
    rec_init(&r, SSE_FORMAT_SSE);
    live(&r, none);
    pub(none, "n6");
    LOGGED(&r, "n6@#6");
    rec_free(&r);
    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, none, our_id(5), &missed);
    CHECK(n == 0 && missed, "history 0: #6 is gone: %u, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "gap:none");
    rec_free(&r);
    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, none, our_id(6), &missed);
    CHECK(n == 0 && !missed, "history 0, up to date: %u, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "");
    rec_free(&r);
    sse_channel_free(ch);
    sse_channel_free(none);
}

static void test_gap(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("g", 2, &ids);
    sse_channel *empty = sse_channel_new("empty", 0, &ids);
    sse_channel *fresh = sse_channel_new("fresh", 10, &ids);
    int missed;
    uint64_t after;

    /* Nothing published yet: "<epoch>-0" is up to date, another epoch is not. */
    unsigned n = sse_channel_resume_point(fresh, our_id(0), strlen(our_id(0)), &after, &missed);
    CHECK(n == 0 && !missed, "<epoch>-0 on a new channel: %u, missed %d", n, missed);
    n = sse_channel_resume_point(empty, "99-0", 4, &after, &missed);
    CHECK(n == 0 && missed && after == 0, "another epoch, empty history: missed %d", missed);
    n = sse_channel_resume_point(fresh, "99-0", 4, &after, &missed);
    CHECK(n == 0 && missed, "another epoch, nothing published: missed %d", missed);

    for (int i = 1; i <= 5; i++) {
        char d[8];
        snprintf(d, sizeof d, "g%d", i);
        pub(ch, d);
    }
    pub(fresh, "f6");
    pub(fresh, "f7");

    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, ch, our_id(2), &missed);
    CHECK(n == 2 && missed, "older than the kept history: %u, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "gap:g g4@#4 g5@#5");
    rec_free(&r);

    /* The newest event pushed out is #3: a client that has it missed nothing. */
    n = sse_channel_resume_point(ch, our_id(3), strlen(our_id(3)), &after, &missed);
    CHECK(n == 2 && after == 3 && !missed, "has the last dropped one: %u, after %llu, missed %d",
          n, (unsigned long long)after, missed);

    char other[48];
    snprintf(other, sizeof other, "%llu-4", EPOCH - 5000);
    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, fresh, other, &missed);
    CHECK(n == 2 && missed, "another epoch: everything kept, and a gap: %u, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "gap:fresh f6@#6 f7@#7");
    rec_free(&r);

    const char *unknown[] = { "nonsense", "", "-5", EPOCH_S "-", EPOCH_S "-5x", NULL };
    for (int i = 0; unknown[i]; i++) {
        rec_init(&r, SSE_FORMAT_SSE);
        n = resume(&r, fresh, unknown[i], &missed);
        CHECK(n == 2 && missed, "unknown id '%s': %u, missed %d", unknown[i], n, missed);
        sse_subscriber_flush(&r.sb);
        LOGGED(&r, "gap:fresh f6@#6 f7@#7");
        rec_free(&r);
    }
    /* Of this epoch but never issued (the next number, or beyond). */
    n = sse_channel_resume_point(fresh, our_id(8), strlen(our_id(8)), &after, &missed);
    CHECK(n == 2 && missed && after == 0, "an id not issued yet: %u, missed %d", n, missed);

    /* A fresh client: nothing replayed, no gap, new events only. */
    rec_init(&r, SSE_FORMAT_SSE);
    n = sse_channel_resume_point(fresh, NULL, 0, &after, &missed);
    CHECK(n == 0 && !missed && after == ids.seq, "no id: %u, missed %d, after %llu", n, missed,
          (unsigned long long)after);
    resume(&r, fresh, NULL, &missed);
    CHECK(!sse_subscriber_has_pending(&r.sb), "no id: nothing pending");
    sse_subscriber_flush(&r.sb);
    pub(fresh, "f8");
    LOGGED(&r, "f8@#8");
    rec_free(&r);

    /* "<epoch>-0" with nothing pushed out: all that is kept, no gap. */
    rec_init(&r, SSE_FORMAT_SSE);
    n = resume(&r, fresh, our_id(0), &missed);
    CHECK(n == 3 && !missed, "<epoch>-0: %u, missed %d", n, missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "f6@#6 f7@#7 f8@#8");
    rec_free(&r);

    /* Two pending channels, both with a gap: the gaps come first, then the merge. */
    rec_init(&r, SSE_FORMAT_SSE);
    resume(&r, ch, "nonsense", &missed);
    resume(&r, fresh, other, &missed);
    sse_subscriber_flush(&r.sb);
    LOGGED(&r, "gap:g gap:fresh g4@#4 g5@#5 f6@#6 f7@#7 f8@#8");
    rec_free(&r);

    sse_channel_free(ch);
    sse_channel_free(empty);
    sse_channel_free(fresh);
}

static void test_failing_sink(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("f", 10, &ids);
    rec r[4];
    for (int i = 0; i < 4; i++) {
        rec_init(&r[i], SSE_FORMAT_SSE);
        live(&r[i], ch);
    }
    r[1].fail = -EPIPE;     /* dropped as too slow */
    r[2].fail = -ENOMEM;
    pub(ch, "a");
    pub(ch, "b");
    for (int i = 0; i < 4; i++)
        CHECK(r[i].calls == 2, "subscriber %d was given both: %u", i, r[i].calls);
    LOGGED(&r[0], "a@#1 b@#2");
    LOGGED(&r[3], "a@#1 b@#2");
    CHECK(sse_channel_subscribers(ch) == 4, "the channel keeps a failed subscriber until its "
          "owner clears it: %u", sse_channel_subscribers(ch));

    /* A failing sink in a replay: every event is still offered, the others unaffected. */
    rec q, ok;
    rec_init(&q, SSE_FORMAT_SSE);
    rec_init(&ok, SSE_FORMAT_SSE);
    q.fail = -EPIPE;
    int missed;
    resume(&q, ch, "unknown", &missed);
    resume(&ok, ch, our_id(0), &missed);
    pub(ch, "c");
    CHECK(sse_subscriber_flush(&q.sb) == 0, "a flush to a failing sink still succeeds");
    sse_subscriber_flush(&ok.sb);
    CHECK(q.calls == 4, "gap + 2 kept + 1 held offered: %u", q.calls);
    CHECK(!sse_subscriber_has_pending(&q.sb), "and nothing stays pending");
    LOGGED(&ok, "a@#1 b@#2 c@#3");
    LOGGED(&r[3], "a@#1 b@#2 c@#3");

    rec_free(&r[1]);     /* the owner learns of the drop */
    CHECK(sse_channel_subscribers(ch) == 5, "one subscriber fewer: %u", sse_channel_subscribers(ch));
    pub(ch, "d");
    LOGGED(&r[0], "a@#1 b@#2 c@#3 d@#4");
    LOGGED(&r[3], "a@#1 b@#2 c@#3 d@#4");
    rec_free(&r[0]);
    rec_free(&r[2]);
    rec_free(&r[3]);
    rec_free(&q);
    rec_free(&ok);
    sse_channel_free(ch);
}

static void test_unsubscribe(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *a = sse_channel_new("a", 10, &ids);
    sse_channel *b = sse_channel_new("b", 10, &ids);
    rec r[3];
    for (int i = 0; i < 3; i++) {
        rec_init(&r[i], SSE_FORMAT_SSE);
        live(&r[i], a);
    }
    live(&r[0], b);
    CHECK(sse_unsubscribe(&r[0].sb, a) == 0, "unsubscribe");
    CHECK(sse_unsubscribe(&r[0].sb, a) == -1, "a second time: not subscribed");
    CHECK(sse_channel_subscribers(a) == 2 && sse_channel_subscribers(b) == 1,
          "counts: a %u, b %u", sse_channel_subscribers(a), sse_channel_subscribers(b));
    pub(a, "a1");
    pub(b, "b2");
    LOGGED(&r[0], "b2@#2");
    /* The first subscriber's slot went to the last one: both remaining still get a. */
    LOGGED(&r[1], "a1@#1");
    LOGGED(&r[2], "a1@#1");
    CHECK(sse_unsubscribe(&r[2].sb, b) == -1, "never subscribed to b");

    /* Leaving a channel whose replay is pending drops the replay. */
    rec q;
    rec_init(&q, SSE_FORMAT_SSE);
    int missed;
    resume(&q, a, our_id(0), &missed);
    CHECK(sse_subscriber_has_pending(&q.sb), "pending");
    CHECK(sse_unsubscribe(&q.sb, a) == 0, "unsubscribe before the flush");
    CHECK(!sse_subscriber_has_pending(&q.sb), "the replay went with it");
    sse_subscriber_flush(&q.sb);
    pub(a, "a3");
    LOGGED(&q, "");
    CHECK(q.calls == 0, "nothing pushed: %u", q.calls);

    /* Subscribe again: a new subscription with its own replay. */
    resume(&q, a, our_id(1), &missed);
    sse_subscriber_flush(&q.sb);
    LOGGED(&q, "a3@#3");
    for (int i = 0; i < 3; i++)
        rec_free(&r[i]);
    rec_free(&q);
    sse_channel_free(a);
    sse_channel_free(b);
}

static void test_clear(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *a = sse_channel_new("a", 10, &ids);
    sse_channel *b = sse_channel_new("b", 10, &ids);
    rec watch;
    rec_init(&watch, SSE_FORMAT_SSE);
    live(&watch, a);
    pub(a, "a1");
    sse_chunk *kept = watch.chunks[0];
    CHECK(kept->refs == 2, "kept + watcher: %u", kept->refs);

    rec r;
    rec_init(&r, SSE_FORMAT_SSE);
    int missed;
    resume(&r, a, our_id(0), &missed);       /* takes a reference to a1 for the replay */
    resume(&r, b, "elsewhere", &missed);     /* with a gap */
    pub(a, "a2");                            /* held */
    CHECK(kept->refs == 3, "a pending replay holds the kept chunk: %u", kept->refs);
    sse_chunk *held = watch.chunks[1];
    CHECK(held->refs == 3, "kept + watcher + held: %u", held->refs);
    sse_subscriber_clear(&r.sb);
    CHECK(r.calls == 0, "clear sends nothing: %u", r.calls);
    CHECK(sse_channel_subscribers(a) == 1 && sse_channel_subscribers(b) == 0,
          "clear leaves every channel: a %u, b %u", sse_channel_subscribers(a),
          sse_channel_subscribers(b));
    CHECK(!sse_subscriber_has_pending(&r.sb), "nothing pending");
    CHECK(kept->refs == 2 && held->refs == 2, "its references are dropped: %u, %u", kept->refs,
          held->refs);
    CHECK(r.sb.subs == NULL && r.sb.held == NULL && r.sb.pending == NULL && r.sb.nheld == 0,
          "the subscriber is back to zero");
    sse_subscriber_clear(&r.sb);             /* twice is harmless */
    /* And can subscribe again. */
    live(&r, b);
    pub(b, "b3");
    LOGGED(&r, "b3@#3");
    rec_free(&r);
    rec_free(&watch);
    sse_channel_free(a);
    sse_channel_free(b);
}

static void test_ndjson(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *ch = sse_channel_new("nd", 10, &ids);
    rec sse, nd1, nd2;
    rec_init(&sse, SSE_FORMAT_SSE);
    rec_init(&nd1, SSE_FORMAT_NDJSON);
    rec_init(&nd2, SSE_FORMAT_NDJSON);
    live(&sse, ch);
    live(&nd1, ch);
    live(&nd2, ch);
    pub_event(ch, "tick", "x\"y", NULL, 0);
    pub_event(ch, NULL, "{\"n\":2}", "own", 1);
    const char *want_nd = "{\"id\":\"" EPOCH_S "-1\",\"event\":\"tick\",\"data\":\"x\\\"y\"}\n"
                          "{\"id\":\"own\",\"data\":{\"n\":2}}\n";
    CHECK(strcmp(raw(&nd1), want_nd) == 0, "NDJSON form: got '%s'", raw(&nd1));
    CHECK(strcmp(raw(&sse), "event: tick\nid: " EPOCH_S "-1\ndata: x\"y\n\n"
                            "id: own\ndata: {\"n\":2}\n\n") == 0, "SSE form: got '%s'", raw(&sse));
    LOGGED(&sse, "tick:x\"y@#1 {\"n\":2}@own");
    CHECK(nd1.chunks[0] == nd2.chunks[0] && nd1.chunks[1] == nd2.chunks[1],
          "NDJSON subscribers share one chunk per event");
    CHECK(nd1.chunks[0] != sse.chunks[0], "and it is not the SSE one");

    /* A replay, with a gap, in NDJSON. */
    rec late;
    rec_init(&late, SSE_FORMAT_NDJSON);
    int missed;
    unsigned n = resume(&late, ch, "old", &missed);
    CHECK(n == 2 && missed, "unknown id: %u, missed %d", n, missed);
    pub(ch, "z");
    sse_subscriber_flush(&late.sb);
    char want[512];
    snprintf(want, sizeof want, "{\"event\":\"gap\",\"data\":\"nd\"}\n%s"
             "{\"id\":\"" EPOCH_S "-3\",\"data\":\"z\"}\n", want_nd);
    CHECK(strcmp(raw(&late), want) == 0, "NDJSON replay: got '%s'", raw(&late));
    CHECK(late.chunks[1] == nd1.chunks[0], "the replay is the kept NDJSON chunk");
    rec_free(&sse);
    rec_free(&nd1);
    rec_free(&nd2);
    rec_free(&late);
    sse_channel_free(ch);
}

static unsigned idle_calls;
static void on_idle(void *ud, sse_channel *ch)
{
    CHECK(ud == ch, "the hook gets its own channel");
    idle_calls++;
}

static void test_idle(void)
{
    sse_ids ids = { EPOCH, 0 };
    sse_channel *a = sse_channel_new("a", 3, &ids);
    sse_channel *z = sse_channel_new("z", 0, &ids);
    sse_channel_on_idle(a, on_idle, a);
    CHECK(sse_channel_kept(a) == 0 && sse_channel_last(a) == 0, "nothing yet");
    rec r[2];
    for (int i = 0; i < 2; i++) {
        rec_init(&r[i], SSE_FORMAT_SSE);
        live(&r[i], a);
    }
    CHECK(sse_unsubscribe(&r[0].sb, a) == 0 && idle_calls == 0, "one subscriber left: %u", idle_calls);
    sse_subscriber_clear(&r[1].sb);
    CHECK(idle_calls == 1, "the last one leaving calls the hook once: %u", idle_calls);
    live(&r[0], a);
    sse_unsubscribe(&r[0].sb, a);
    CHECK(idle_calls == 2, "and again after a new subscriber: %u", idle_calls);
    /* What an owner reads before freeing: kept events, and the newest seq given. */
    for (int i = 0; i < 5; i++)
        pub(a, "x");
    pub(z, "y");
    CHECK(sse_channel_kept(a) == 3 && sse_channel_last(a) == 5, "a keeps 3, last 5: %u, %llu",
          sse_channel_kept(a), (unsigned long long)sse_channel_last(a));
    CHECK(sse_channel_kept(z) == 0 && sse_channel_last(z) == 6, "z keeps none, last 6: %u, %llu",
          sse_channel_kept(z), (unsigned long long)sse_channel_last(z));
    /* A channel made again with what its old self had marked as gone resumes with a gap. */
    sse_channel *z2 = sse_channel_new("z", 0, &ids);
    sse_channel_set_dropped(z2, sse_channel_last(z));
    int missed;
    rec q;
    rec_init(&q, SSE_FORMAT_SSE);
    resume(&q, z2, our_id(5), &missed);
    CHECK(missed, "a resume from before the old channel's last event is told");
    sse_subscriber_clear(&q.sb);
    resume(&q, z2, our_id(6), &missed);
    CHECK(!missed, "one from its last event is not");
    for (int i = 0; i < 2; i++)
        rec_free(&r[i]);
    rec_free(&q);
    sse_channel_free(a);
    sse_channel_free(z);
    sse_channel_free(z2);
}

int main(void)
{
    test_fanout();
    test_ids();
    test_replay_seam();
    test_merge();
    test_history();
    test_gap();
    test_failing_sink();
    test_unsubscribe();
    test_clear();
    test_ndjson();
    test_idle();
    printf("test_channel: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
