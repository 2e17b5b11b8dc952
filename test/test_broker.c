/* C tests of sse_broker alone (no Lua, no HTTP) against a real redis-server of their own:
 * started on a free loopback port with its append-only file in a temporary directory
 * (appendonly yes, appendfsync always: a restart keeps what was confirmed), waited for
 * until it answers PING, killed by its PID. Without redis-server the test says SKIPPED
 * and passes.
 *
 * Two brokers on one sse_loop stand for two processes: each has its own sse_ids and its
 * own sse_channel of each name, with the same prefix. Subscribers are recording sinks
 * that read what they get as a client would (SSE through sse_parser; NDJSON as bytes).
 * Every wait is a loop on sse_loop_poll with a deadline. */
#include "sse_broker.h"
#include "sse_channel.h"
#include "sse_loop.h"
#include "sse_parser.h"
#include "check.h"
#include "redis_server.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static sse_loop *loop;
static int port;
static pid_t server;
static char dir[64];

/* Runs the loop until cond or ms pass. Each poll waits 20 ms at most, so a condition
 * that changes outside the loop (Redis's own state, read with raw commands) is seen. */
#define RUN_UNTIL(cond, ms)                                                   \
    do {                                                                      \
        int64_t end_ = sse_loop_now_us() + (int64_t)(ms) * 1000;              \
        while (!(cond) && sse_loop_now_us() < end_) {                         \
            int64_t w_ = end_ - sse_loop_now_us();                            \
            if (w_ < 0)                                                       \
                w_ = 0;                                                       \
            if (w_ > 20000)                                                   \
                w_ = 20000;                                                   \
            int t_ = sse_loop_next_timeout(loop);                             \
            if (t_ >= 0 && (int64_t)t_ * 1000 < w_)                           \
                w_ = (int64_t)t_ * 1000;                                      \
            sse_loop_poll(loop, w_);                                          \
        }                                                                     \
    } while (0)

static void die(const char *what)
{
    fprintf(stderr, "test_broker: %s\n", what);
    exit(2);
}

/* ---- redis-server ---- */

/* A blocking client for the test's own use (never the loop's): sends one command in
 * RESP (binary-safe arguments; lens NULL: strlen) and returns its reply's bytes (up to
 * cap - 1, NUL-terminated), or -1. */
static int raw(int argc, const char **argv, const size_t *lens, char *out, size_t cap)
{
    sse_buf req;
    memset(&req, 0, sizeof req);
    char head[32];
    snprintf(head, sizeof head, "*%d\r\n", argc);
    int ok = sse_buf_append(&req, head, strlen(head)) == 0;
    for (int i = 0; i < argc && ok; i++) {
        size_t n = lens ? lens[i] : strlen(argv[i]);
        snprintf(head, sizeof head, "$%zu\r\n", n);
        ok = sse_buf_append(&req, head, strlen(head)) == 0 && sse_buf_append(&req, argv[i], n) == 0 &&
             sse_buf_append(&req, "\r\n", 2) == 0;
    }
    if (!ok)
        die("out of memory");
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct timeval tv = { 2, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int n = -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        send(fd, req.data, req.len, MSG_NOSIGNAL) == (ssize_t)req.len) {
        ssize_t r = recv(fd, out, cap - 1, 0);
        if (r > 0) {
            out[r] = '\0';
            n = (int)r;
        }
    }
    close(fd);
    sse_buf_free(&req);
    return n;
}

static int raw1(const char *a, char *out, size_t cap) { return raw(1, &a, NULL, out, cap); }

/* Subscribers of a topic in Redis (PUBSUB NUMSUB), -1 when it does not answer. */
static long numsub(const char *topic)
{
    const char *argv[] = { "PUBSUB", "NUMSUB", topic };
    char buf[512];
    if (raw(3, argv, NULL, buf, sizeof buf) <= 0)
        return -1;
    const char *colon = strrchr(buf, ':');
    return colon ? strtol(colon + 1, NULL, 10) : -1;
}

/* Starts redis-server on `port` with its files in `dir`, every write on disk before its
 * reply (so a restart keeps what was confirmed). -1 on failure. */
static pid_t start_redis(void)
{
    const char *extra[] = { "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", NULL };
    return redis_start(port, extra);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *f)
{
    (void)st; (void)flag; (void)f;
    return remove(path);
}

/* ---- processes: a broker with its own ids ---- */

typedef struct proc {
    sse_broker  *br;
    sse_ids      ids;
    int          downs, ups, lost, errors;   /* log lines: unavailable, connected, data lost, errors */
    int          readies;
    sse_channel *ready_ch;
    int          free_on_ready;              /* the ready hook frees the broker */
} proc;

static void on_log(void *ud, int level, const char *msg)
{
    proc *p = ud;
    if (strstr(msg, "redis: unavailable"))
        p->downs++;
    else if (strstr(msg, "redis: connected"))
        p->ups++;
    else if (strstr(msg, "data was lost"))
        p->lost++;
    if (level == 0)
        p->errors++;
}

static void on_ready(void *ud, sse_channel *ch)
{
    proc *p = ud;
    p->readies++;
    p->ready_ch = ch;
    if (p->free_on_ready) {
        sse_broker_free(p->br);
        p->br = NULL;
    }
}

static void proc_new(proc *p, const char *prefix, int p_port)
{
    memset(p, 0, sizeof *p);
    sse_broker_config cfg = { .host = "127.0.0.1", .port = p_port, .prefix = prefix };
    sse_broker_hooks hooks = { .log = on_log, .ready = on_ready, .ud = p };
    char err[128] = "";
    p->br = sse_broker_new(loop, &cfg, &p->ids, &hooks, err, sizeof err);
    CHECK(p->br != NULL, "sse_broker_new: %s", err);
    if (!p->br)
        die("no broker");
}

static sse_channel *attach(proc *p, const char *name, unsigned history)
{
    sse_channel *ch = sse_channel_new(name, history, &p->ids);
    if (!ch)
        die("out of memory");
    CHECK(sse_broker_attach(p->br, ch) == 0, "attach %s", name);
    return ch;
}

static int ready(proc *p, sse_channel *ch) { return sse_broker_ready(p->br, ch); }

/* Two processes on one prefix, each with channel `name` attached, once both have read
 * its history and both are subscribed to its topic. */
static void open_pair(proc *A, proc *B, const char *prefix, const char *name, unsigned history,
                      sse_channel **ca, sse_channel **cb)
{
    char topic[96];
    snprintf(topic, sizeof topic, "%s:t:%s", prefix, name);
    proc_new(A, prefix, port);
    proc_new(B, prefix, port);
    *ca = attach(A, name, history);
    *cb = attach(B, name, history);
    RUN_UNTIL(ready(A, *ca) && ready(B, *cb) && numsub(topic) == 2, 5000);
}

static void close_pair(proc *A, proc *B, sse_channel *ca, sse_channel *cb)
{
    sse_broker_free(A->br);
    sse_broker_free(B->br);
    sse_channel_free(ca);
    sse_channel_free(cb);
}

/* ---- recording subscribers ---- */

typedef struct got {
    char   type[16];
    char  *id, *data;
} got;

typedef struct rec {
    sse_subscriber sb;
    sse_parser     p;
    sse_buf        raw;          /* every byte pushed, in order */
    got           *evs;          /* SSE: the events a client dispatches */
    size_t         nevs, cap;
    size_t         lines;        /* NDJSON: lines received */
    unsigned       pushes;
} rec;

static int on_event(void *ud, const char *event, size_t event_len, const char *data,
                    size_t data_len, const char *id, size_t id_len)
{
    rec *r = ud;
    if (r->nevs == r->cap) {
        size_t ncap = r->cap ? r->cap * 2 : 64;
        got *g = realloc(r->evs, ncap * sizeof *g);
        if (!g)
            die("out of memory");
        r->evs = g;
        r->cap = ncap;
    }
    got *g = &r->evs[r->nevs++];
    snprintf(g->type, sizeof g->type, "%.*s", (int)event_len, event);
    g->id = strndup(id, id_len);
    g->data = strndup(data, data_len);
    if (!g->id || !g->data)
        die("out of memory");
    return 0;
}

static int rec_push(void *ctx, sse_chunk *c)
{
    rec *r = ctx;
    r->pushes++;
    if (sse_buf_append(&r->raw, c->data, c->len) != 0)
        die("out of memory");
    if (r->sb.format == SSE_FORMAT_SSE) {
        if (sse_parser_feed(&r->p, c->data, c->len, on_event, r) != 0)
            die("parser failed");
    } else {
        for (size_t i = 0; i < c->len; i++)
            r->lines += c->data[i] == '\n';
    }
    return 0;
}

static void rec_init(rec *r, int format)
{
    memset(r, 0, sizeof *r);
    sse_parser_init(&r->p);
    r->sb.format = format;
    r->sb.sink = (sse_sink){ rec_push, r };
}

static void rec_free(rec *r)
{
    sse_subscriber_clear(&r->sb);
    for (size_t i = 0; i < r->nevs; i++) {
        free(r->evs[i].id);
        free(r->evs[i].data);
    }
    free(r->evs);
    sse_buf_free(&r->raw);
    sse_parser_free(&r->p);
}

/* A live subscription (no Last-Event-ID). */
static void live(rec *r, sse_channel *ch)
{
    CHECK(sse_subscribe(&r->sb, ch, 0, 0, NULL) == 0, "subscribe to %s", sse_channel_name(ch));
}

static const char *raw_of(rec *r)
{
    if (sse_buf_reserve(&r->raw, 1) != 0)
        die("out of memory");
    r->raw.data[r->raw.len] = '\0';
    return r->raw.data;
}

/* The data of r's events that are not gaps, joined with spaces (for short streams). */
static const char *datas(rec *r)
{
    static char out[4][2048];
    static int k;
    char *o = out[k++ % 4];
    size_t n = 0;
    o[0] = '\0';
    for (size_t i = 0; i < r->nevs && n < sizeof out[0] - 64; i++)
        n += (size_t)snprintf(o + n, sizeof out[0] - n, "%s%s%s", n ? " " : "",
                              strcmp(r->evs[i].type, "gap") == 0 ? "gap:" : "", r->evs[i].data);
    return o;
}

#define DATAS(r, want) \
    CHECK(strcmp(datas(r), want) == 0, "%s: got '%s', want '%s'", #r, datas(r), want)

static int gaps(const rec *r)
{
    int n = 0;
    for (size_t i = 0; i < r->nevs; i++)
        n += strcmp(r->evs[i].type, "gap") == 0;
    return n;
}

/* ---- publishing ---- */

typedef struct pubres {
    int  calls, reentrant;
    char id[128], err[128];
    int  ok;
} pubres;

static int in_publish;
static sse_broker **free_in_callback;    /* on_pub frees this broker (and clears it) */

static void on_pub(void *ud, const char *id, size_t idlen, const char *err)
{
    pubres *r = ud;
    r->calls++;
    r->reentrant += in_publish;
    if (id) {
        r->ok = 1;
        snprintf(r->id, sizeof r->id, "%.*s", (int)idlen, id);
    } else {
        snprintf(r->err, sizeof r->err, "%s", err ? err : "(null)");
    }
    if (free_in_callback && *free_in_callback) {
        sse_broker *br = *free_in_callback;
        *free_in_callback = NULL;
        sse_broker_free(br);
    }
}

static int publish_ev(proc *p, sse_channel *ch, const sse_event *ev, pubres *r)
{
    const char *why;
    if (sse_frame_validate(ev, &why) != 0)
        die(why);
    memset(r, 0, sizeof *r);
    in_publish = 1;
    int rc = sse_broker_publish(p->br, ch, ev, on_pub, r);
    in_publish = 0;
    return rc;
}

static sse_event data_event(const char *data)
{
    sse_event ev = SSE_EVENT_INIT;
    ev.data = data;
    ev.data_len = strlen(data);
    return ev;
}

static int publish(proc *p, sse_channel *ch, const char *data, pubres *r)
{
    sse_event ev = data_event(data);
    return publish_ev(p, ch, &ev, r);
}

static uint64_t seq_of(const char *id)
{
    const char *dash = strchr(id, '-');
    return dash ? strtoull(dash + 1, NULL, 10) : 0;
}

static uint64_t epoch_of(const char *id)
{
    return strtoull(id, NULL, 10);
}

/* What sse_channel_publish would send for ev with this id: the bytes every subscriber
 * of every process must get. */
static void expect_sse(sse_buf *b, const sse_event *ev, const char *id)
{
    sse_event e = *ev;
    e.id = id;
    e.id_len = strlen(id);
    char *tmp = malloc(sse_frame_size(&e));
    if (!tmp || sse_buf_append(b, tmp, sse_frame_write(&e, tmp)) != 0)
        die("out of memory");
    free(tmp);
}

static void expect_ndjson(sse_buf *b, const sse_event *ev, const char *id)
{
    sse_event e = *ev;
    e.id = id;
    e.id_len = strlen(id);
    char *tmp = malloc(sse_frame_ndjson_size(&e));
    if (!tmp || sse_buf_append(b, tmp, sse_frame_ndjson_write(&e, tmp)) != 0)
        die("out of memory");
    free(tmp);
}

static int same_bytes(const sse_buf *a, const sse_buf *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

/* A gap event as the binding makes one (event "gap", no id). */
static sse_chunk *gap_chunk(const char *channel, const char *last)
{
    char data[256];
    snprintf(data, sizeof data, "{\"channel\":\"%s\",\"last_event_id\":\"%s\"}", channel, last);
    sse_event ev = SSE_EVENT_INIT;
    ev.event = "gap";
    ev.event_len = 3;
    ev.data = data;
    ev.data_len = strlen(data);
    sse_chunk *c = sse_chunk_new(sse_frame_size(&ev));
    if (!c)
        die("out of memory");
    c->len = sse_frame_write(&ev, c->data);
    return c;
}

/* A resume as the binding makes it once the channel is ready: the resume point, the
 * gap first when events may be missing, the subscription with its replay. Returns the
 * count of events to replay; *missed as sse_channel_resume_point says. No flush. */
static unsigned resume(rec *r, sse_channel *ch, const char *last, int *missed)
{
    uint64_t after = 0;
    int m = 0;
    unsigned n = sse_channel_resume_point(ch, last, strlen(last), &after, &m);
    sse_chunk *gap = m ? gap_chunk(sse_channel_name(ch), last) : NULL;
    CHECK(sse_subscribe(&r->sb, ch, 1, after, gap) == 0, "resume on %s", sse_channel_name(ch));
    sse_chunk_unref(gap);
    if (missed)
        *missed = m;
    return n;
}

/* Only the decision, without subscribing. */
static unsigned resume_point(sse_channel *ch, const char *last, int *missed)
{
    uint64_t after;
    return sse_channel_resume_point(ch, last, strlen(last), &after, missed);
}

/* ---- the cases ---- */

/* A publish on A reaches the subscribers on A and on B once each, in order, with the
 * bytes an in-memory channel would send (SSE and NDJSON), whatever fields it has. */
static void test_fanout(void)
{
    proc A, B;
    proc_new(&A, "tb1", port);
    proc_new(&B, "tb1", port);
    sse_channel *ca = attach(&A, "news", 100), *cb = attach(&B, "news", 100);
    CHECK(!ready(&A, ca) && !ready(&B, cb), "not ready before the history is read");
    RUN_UNTIL(ready(&A, ca) && ready(&B, cb) && numsub("tb1:t:news") == 2, 5000);
    CHECK(ready(&A, ca) && ready(&B, cb), "both channels ready");
    CHECK(A.readies == 1 && B.readies == 1 && A.ready_ch == ca && B.ready_ch == cb,
          "the ready hook ran once for each: %d %d", A.readies, B.readies);
    CHECK(numsub("tb1:t:news") == 2, "both processes subscribed to the topic");
    CHECK(sse_broker_up(A.br) && sse_broker_up(B.br), "both up");
    rec a1, a2, b1, b2;
    rec_init(&a1, SSE_FORMAT_SSE);
    rec_init(&a2, SSE_FORMAT_NDJSON);
    rec_init(&b1, SSE_FORMAT_SSE);
    rec_init(&b2, SSE_FORMAT_NDJSON);
    live(&a1, ca);
    live(&a2, ca);
    live(&b1, cb);
    live(&b2, cb);

    enum { K = 5 };
    sse_event ev[K];
    ev[0] = data_event("hello");
    ev[1] = data_event("two\nlines");
    ev[1].event = "note";
    ev[1].event_len = 4;
    ev[1].comment = "a comment";
    ev[1].comment_len = 9;
    ev[1].retry = 1500;
    ev[2] = data_event("{\"k\":[1,2]}");
    ev[2].data_json = 1;
    ev[2].id = "mine-3";
    ev[2].id_len = 6;
    ev[3] = data_event("");
    ev[4] = data_event("id: not an id\ndata: nor data");
    pubres r[K];
    for (int i = 0; i < K; i++)
        CHECK(publish_ev(&A, ca, &ev[i], &r[i]) == 0, "publish %d", i);
    CHECK(r[0].calls == 0 && a1.pushes == 0, "nothing happens inside the publish call");
    RUN_UNTIL(r[K - 1].calls && a1.nevs >= K && b1.nevs >= K && a2.lines >= K && b2.lines >= K, 5000);
    int once = 1;
    for (int i = 0; i < K; i++)
        once &= r[i].calls == 1 && r[i].ok && r[i].reentrant == 0;
    CHECK(once, "every publish confirmed once, after the call: %s", r[0].err);
    CHECK(strcmp(r[2].id, "mine-3") == 0, "an event's own id is kept: %s", r[2].id);
    CHECK(epoch_of(r[0].id) == A.ids.epoch && A.ids.epoch == B.ids.epoch && A.ids.epoch > 0,
          "ids are <epoch>-<seq> with Redis's epoch, the same in both processes: %s", r[0].id);
    CHECK(seq_of(r[0].id) < seq_of(r[1].id) && seq_of(r[1].id) < seq_of(r[3].id) &&
          seq_of(r[3].id) < seq_of(r[4].id), "ids increase: %s %s %s %s", r[0].id, r[1].id, r[3].id, r[4].id);
    CHECK(a1.nevs == K && b1.nevs == K && a2.lines == K && b2.lines == K,
          "each subscriber got each event once: %zu %zu %zu %zu", a1.nevs, b1.nevs, a2.lines, b2.lines);
    sse_buf want_sse, want_nd;
    memset(&want_sse, 0, sizeof want_sse);
    memset(&want_nd, 0, sizeof want_nd);
    for (int i = 0; i < K; i++) {
        expect_sse(&want_sse, &ev[i], r[i].id);
        expect_ndjson(&want_nd, &ev[i], r[i].id);
    }
    CHECK(same_bytes(&a1.raw, &want_sse) && same_bytes(&b1.raw, &want_sse),
          "SSE bytes on A and B are what an in-memory channel sends:\nA: %s\nB: %s", raw_of(&a1), raw_of(&b1));
    CHECK(same_bytes(&a2.raw, &want_nd) && same_bytes(&b2.raw, &want_nd),
          "NDJSON bytes on A and B are what an in-memory channel sends:\nA: %s\nB: %s", raw_of(&a2), raw_of(&b2));
    int fields = 1;
    for (int i = 0; i < K && i < (int)b1.nevs; i++)
        fields &= strcmp(b1.evs[i].id, r[i].id) == 0;
    CHECK(fields && strcmp(b1.evs[1].type, "note") == 0 && strcmp(b1.evs[1].data, "two\nlines") == 0 &&
          strcmp(b1.evs[4].data, "id: not an id\ndata: nor data") == 0, "B's client reads the events A published");
    /* The second read 300 ms after subscribing, and the echoes: nothing more. */
    unsigned pa = a1.pushes, pb = b1.pushes;
    RUN_UNTIL(0, 500);
    CHECK(a1.pushes == pa && b1.pushes == pb, "nothing delivered twice: %u %u more", a1.pushes - pa,
          b1.pushes - pb);
    CHECK(A.errors == 0 && B.errors == 0, "no error logged");
    sse_buf_free(&want_sse);
    sse_buf_free(&want_nd);
    rec_free(&a1);
    rec_free(&a2);
    rec_free(&b1);
    rec_free(&b2);
    close_pair(&A, &B, ca, cb);
}

/* 1,000 publishes given at once, alternating between A and B (two connections racing
 * each other in Redis): every subscriber of both gets the same ids in the same order,
 * each once, each process's events in the order it gave them. */
static void test_alternating(void)
{
    proc A, B;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb2", "feed", 100, &ca, &cb);
    CHECK(ready(&A, ca) && ready(&B, cb), "both ready");
    enum { N = 1000, S = 4 };
    rec s[S];
    for (int i = 0; i < S; i++) {
        rec_init(&s[i], i % 2 ? SSE_FORMAT_NDJSON : SSE_FORMAT_SSE);
        live(&s[i], i < 2 ? ca : cb);
    }
    pubres *r = calloc(N, sizeof *r);
    char (*data)[16] = calloc(N, sizeof *data);
    if (!r || !data)
        die("out of memory");
    int given = 1;
    for (int i = 0; i < N; i++) {
        snprintf(data[i], sizeof data[i], "%c-%d", i % 2 ? 'b' : 'a', i);
        given &= publish(i % 2 ? &B : &A, i % 2 ? cb : ca, data[i], &r[i]) == 0;
    }
    CHECK(given, "1000 publishes given");
    RUN_UNTIL(r[N - 1].calls && r[N - 2].calls && s[0].nevs >= N && s[2].nevs >= N &&
              s[1].lines >= N && s[3].lines >= N, 30000);
    int confirmed = 0;
    for (int i = 0; i < N; i++)
        confirmed += r[i].calls == 1 && r[i].ok && !r[i].reentrant;
    CHECK(confirmed == N, "every publish confirmed once: %d of %d", confirmed, N);
    CHECK(s[0].nevs == N && s[2].nevs == N && s[1].lines == N && s[3].lines == N,
          "every subscriber got %d events: %zu %zu %zu %zu", N, s[0].nevs, s[2].nevs, s[1].lines, s[3].lines);
    if (s[0].nevs != N || s[1].lines != N) {        /* what is missing, to tell why */
        char *have = calloc(N, 1);
        for (size_t k = 0; k < s[0].nevs; k++) {
            int i = atoi(s[0].evs[k].data + 2);
            if (i >= 0 && i < N)
                have[i] = 1;
        }
        printf("A: %d downs %d ups %d lost %d errors; B: %d %d %d %d; gaps %d\nmissing on A:", A.downs,
               A.ups, A.lost, A.errors, B.downs, B.ups, B.lost, B.errors, gaps(&s[0]));
        for (int i = 0; i < N; i++)
            if (!have[i])
                printf(" %s (%s)", data[i], r[i].id);
        printf("\n");
        free(have);
    }
    /* The same ids in the same order, ids increasing, each event once. */
    int same = s[0].nevs == s[2].nevs, increasing = 1, once = 1, ids_match = 1;
    int last_a = -1, last_b = -1, in_order = 1;
    char *seen = calloc(N, 1);
    for (size_t k = 0; same && k < s[0].nevs; k++) {
        const got *x = &s[0].evs[k], *y = &s[2].evs[k];
        same &= strcmp(x->id, y->id) == 0 && strcmp(x->data, y->data) == 0;
        if (k)
            increasing &= seq_of(x->id) > seq_of(s[0].evs[k - 1].id) && epoch_of(x->id) == A.ids.epoch;
        int i = atoi(x->data + 2);
        if (i < 0 || i >= N || strcmp(x->data, data[i]) != 0 || seen[i]) {
            once = 0;
            continue;
        }
        seen[i] = 1;
        ids_match &= strcmp(r[i].id, x->id) == 0;
        int *last = i % 2 ? &last_b : &last_a;
        in_order &= i > *last;
        *last = i;
    }
    free(seen);
    CHECK(same, "A's and B's SSE subscribers got the same ids and data in the same order");
    CHECK(same_bytes(&s[0].raw, &s[2].raw) && same_bytes(&s[1].raw, &s[3].raw),
          "and the same bytes (SSE and NDJSON)");
    CHECK(increasing, "ids increase, one epoch");
    CHECK(once, "each event once");
    CHECK(ids_match, "each event has the id its publish was confirmed with");
    CHECK(in_order, "each process's events in the order it gave them");
    CHECK(s[0].nevs == N && A.ids.seq == B.ids.seq && A.ids.seq == seq_of(s[0].evs[N - 1].id),
          "both processes' sequence follows Redis's: %llu %llu", (unsigned long long)A.ids.seq,
          (unsigned long long)B.ids.seq);
    unsigned before[S];
    for (int i = 0; i < S; i++)
        before[i] = s[i].pushes;
    RUN_UNTIL(0, 500);
    int more = 0;
    for (int i = 0; i < S; i++)
        more += (int)(s[i].pushes - before[i]);
    CHECK(more == 0, "nothing delivered twice later: %d", more);
    for (int i = 0; i < S; i++)
        rec_free(&s[i]);
    free(r);
    free(data);
    close_pair(&A, &B, ca, cb);
}

/* The same with a short history (0, 1, 5): each process's replies (its own events)
 * overtake the pub/sub messages of the other's events, which come in the same moment
 * on the other connection, and a sync that this early arrival starts finds the stream
 * without them (trimmed). What pub/sub is still bringing is not lost: no gap, every
 * event once, in order. (Before the fix: a gap and the events behind it dropped, in
 * almost every run for one of the three.) */
static void test_burst(unsigned history)
{
    proc A, B;
    char prefix[16];
    snprintf(prefix, sizeof prefix, "tb8-%u", history);
    sse_channel *ca, *cb;
    open_pair(&A, &B, prefix, "burst", history, &ca, &cb);
    CHECK(ready(&A, ca) && ready(&B, cb), "both ready");
    enum { N = 400 };
    rec ra, rb;
    rec_init(&ra, SSE_FORMAT_SSE);
    rec_init(&rb, SSE_FORMAT_SSE);
    live(&ra, ca);
    live(&rb, cb);
    pubres *r = calloc(N, sizeof *r);
    char (*data)[16] = calloc(N, sizeof *data);
    if (!r || !data)
        die("out of memory");
    for (int i = 0; i < N; i++) {
        snprintf(data[i], sizeof data[i], "%c-%d", i % 2 ? 'b' : 'a', i);
        publish(i % 2 ? &B : &A, i % 2 ? cb : ca, data[i], &r[i]);
    }
    RUN_UNTIL(r[N - 1].calls && r[N - 2].calls && ra.nevs >= N && rb.nevs >= N, 20000);
    RUN_UNTIL(0, 400);
    int confirmed = 0;
    for (int i = 0; i < N; i++)
        confirmed += r[i].ok;
    CHECK(confirmed == N, "all confirmed: %d", confirmed);
    CHECK(gaps(&ra) == 0 && gaps(&rb) == 0, "history %u: no gap: %d on A, %d on B", history, gaps(&ra),
          gaps(&rb));
    CHECK(ra.nevs == N && rb.nevs == N, "every event on both: %zu %zu", ra.nevs, rb.nevs);
    int same = ra.nevs == rb.nevs, increasing = 1;
    for (size_t k = 0; same && k < ra.nevs; k++) {
        same &= strcmp(ra.evs[k].id, rb.evs[k].id) == 0;
        increasing &= k == 0 || seq_of(ra.evs[k].id) > seq_of(ra.evs[k - 1].id);
    }
    CHECK(same && increasing, "the same ids in the same order on both, increasing");
    rec_free(&ra);
    rec_free(&rb);
    free(r);
    free(data);
    close_pair(&A, &B, ca, cb);
}

/* A client that read events on A moves to B with the last id it had: B replays exactly
 * what came after it (byte for byte what A sent), merged with what is published while
 * the replay is pending, then live events. A process that starts using the channel
 * later (C) answers the same from the history it read from the stream. */
static void test_resume(void)
{
    proc A, B, C;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb3", "room", 100, &ca, &cb);
    rec ra, wb;                     /* a client on A; a witness of what B received */
    rec_init(&ra, SSE_FORMAT_SSE);
    rec_init(&wb, SSE_FORMAT_SSE);
    live(&ra, ca);
    live(&wb, cb);
    pubres r[12];
    char data[12][16];
    for (int i = 0; i < 10; i++) {
        snprintf(data[i], sizeof data[i], "m-%d", i + 1);
        publish(&A, ca, data[i], &r[i]);
    }
    RUN_UNTIL(ra.nevs >= 10 && wb.nevs >= 10, 5000);
    CHECK(ra.nevs == 10 && wb.nevs == 10, "10 events on A and B: %zu %zu", ra.nevs, wb.nevs);
    if (ra.nevs < 10)
        return;
    const char *last = ra.evs[3].id;        /* the client read m-1..m-4 on A */
    size_t from = 0;                        /* where m-5 starts in A's bytes */
    for (int k = 0; k < 4; k++)
        from = (size_t)(strstr(raw_of(&ra) + from, "\n\n") - ra.raw.data) + 2;

    rec rb;
    rec_init(&rb, SSE_FORMAT_SSE);
    int missed = -1;
    unsigned n = resume(&rb, cb, last, &missed);
    CHECK(n == 6 && missed == 0, "B would replay m-5..m-10 without a gap: %u, missed %d", n, missed);
    /* Published while the replay is pending: held, then merged in order. */
    snprintf(data[10], sizeof data[10], "m-11");
    publish(&A, ca, data[10], &r[10]);
    RUN_UNTIL(wb.nevs >= 11 && ra.nevs >= 11, 5000);
    CHECK(wb.nevs == 11 && rb.pushes == 0, "m-11 reached B and is held for the pending replay: %u pushes",
          rb.pushes);
    CHECK(sse_subscriber_flush(&rb.sb) == 0, "flush");
    DATAS(&rb, "m-5 m-6 m-7 m-8 m-9 m-10 m-11");
    snprintf(data[11], sizeof data[11], "m-12");
    publish(&B, cb, data[11], &r[11]);
    RUN_UNTIL(rb.nevs >= 8 && ra.nevs >= 12, 5000);
    DATAS(&rb, "m-5 m-6 m-7 m-8 m-9 m-10 m-11 m-12");
    CHECK(gaps(&rb) == 0, "no gap");
    CHECK(rb.raw.len == ra.raw.len - from && memcmp(rb.raw.data, ra.raw.data + from, rb.raw.len) == 0,
          "the moved client got byte for byte what A's client got after m-4");

    /* A third process that starts using the channel now: its history comes from the
     * stream; resumes wait for it (sse_broker_ready), then are answered the same. */
    proc_new(&C, "tb3", port);
    sse_channel *cc = attach(&C, "room", 100);
    CHECK(!ready(&C, cc), "C not ready at once");
    RUN_UNTIL(ready(&C, cc), 5000);
    CHECK(ready(&C, cc) && C.ids.epoch == A.ids.epoch && C.ids.seq >= seq_of(r[11].id),
          "C ready, with Redis's epoch and sequence");
    rec rc, rnew, rold;
    rec_init(&rc, SSE_FORMAT_SSE);
    rec_init(&rnew, SSE_FORMAT_SSE);
    rec_init(&rold, SSE_FORMAT_SSE);
    n = resume(&rc, cc, last, &missed);
    CHECK(n == 8 && missed == 0, "C would replay m-5..m-12: %u, missed %d", n, missed);
    n = resume(&rnew, cc, ra.evs[11].id, &missed);
    CHECK(n == 0 && missed == 0, "the newest id: nothing to replay, no gap: %u %d", n, missed);
    n = resume(&rold, cc, "1000-3", &missed);
    CHECK(n == 12 && missed == 1, "an id of another epoch: the gap and everything kept: %u %d", n, missed);
    sse_subscriber_flush(&rc.sb);
    sse_subscriber_flush(&rnew.sb);
    sse_subscriber_flush(&rold.sb);
    CHECK(rc.raw.len == ra.raw.len - from && memcmp(rc.raw.data, ra.raw.data + from, rc.raw.len) == 0,
          "C replays byte for byte what A sent: %s", raw_of(&rc));
    CHECK(rnew.nevs == 0 && rold.nevs == 13 && strcmp(rold.evs[0].type, "gap") == 0, "%zu %zu", rnew.nevs,
          rold.nevs);
    pubres r13;
    publish(&A, ca, "m-13", &r13);
    RUN_UNTIL(rc.nevs >= 9 && rnew.nevs >= 1 && rb.nevs >= 9, 5000);
    CHECK(rc.nevs == 9 && rnew.nevs == 1 && strcmp(rnew.evs[0].data, "m-13") == 0 && rb.nevs == 9,
          "then live events on C and B");
    rec_free(&ra);
    rec_free(&wb);
    rec_free(&rb);
    rec_free(&rc);
    rec_free(&rnew);
    rec_free(&rold);
    sse_broker_free(A.br);
    sse_broker_free(B.br);
    sse_broker_free(C.br);
    sse_channel_free(ca);
    sse_channel_free(cb);
    sse_channel_free(cc);
}

/* history 5 and 20 publishes: the stream keeps t-16..t-20. A resume from an id before
 * t-15 gets the gap decision (missed = 1) and the five kept; from t-15 (the newest
 * trimmed: nothing after it is gone) or later, no gap. The same on A, on B, and on a
 * process that reads the history from the stream afterwards. */
static void test_trimmed(void)
{
    proc A, B, C;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb4", "short", 5, &ca, &cb);
    rec wb;
    rec_init(&wb, SSE_FORMAT_SSE);
    live(&wb, cb);
    pubres r[20];
    char data[20][16];
    for (int i = 0; i < 20; i++) {
        snprintf(data[i], sizeof data[i], "t-%d", i + 1);
        publish(&A, ca, data[i], &r[i]);
    }
    RUN_UNTIL(r[19].calls && wb.nevs >= 20, 5000);
    CHECK(wb.nevs == 20 && gaps(&wb) == 0, "a live subscriber gets all 20, no gap: %zu", wb.nevs);
    proc_new(&C, "tb4", port);
    sse_channel *cc = attach(&C, "short", 5);
    RUN_UNTIL(ready(&C, cc), 5000);
    CHECK(ready(&C, cc), "C ready");
    sse_channel *chs[3] = { ca, cb, cc };
    const char *names[3] = { "A", "B", "C" };
    for (int k = 0; k < 3; k++) {
        int m;
        unsigned n = resume_point(chs[k], r[2].id, &m);
        CHECK(n == 5 && m == 1, "%s: from t-3: the gap and the 5 kept: %u, missed %d", names[k], n, m);
        n = resume_point(chs[k], r[13].id, &m);
        CHECK(n == 5 && m == 1, "%s: from t-14: the gap: %u, missed %d", names[k], n, m);
        n = resume_point(chs[k], r[14].id, &m);
        CHECK(n == 5 && m == 0, "%s: from t-15 (the newest trimmed): no gap: %u, missed %d", names[k], n, m);
        n = resume_point(chs[k], r[15].id, &m);
        CHECK(n == 4 && m == 0, "%s: from t-16: 4, no gap: %u, missed %d", names[k], n, m);
    }
    rec rb, rc;
    rec_init(&rb, SSE_FORMAT_SSE);
    rec_init(&rc, SSE_FORMAT_SSE);
    int mb, mc;
    resume(&rb, cb, r[2].id, &mb);
    resume(&rc, cc, r[2].id, &mc);
    sse_subscriber_flush(&rb.sb);
    sse_subscriber_flush(&rc.sb);
    CHECK(rb.nevs == 6 && strcmp(rb.evs[0].type, "gap") == 0 && strcmp(rb.evs[1].data, "t-16") == 0 &&
          strcmp(rb.evs[5].data, "t-20") == 0, "B: the gap, then t-16..t-20: %s", datas(&rb));
    CHECK(rc.nevs == 6 && strcmp(rc.evs[0].type, "gap") == 0 && strcmp(rc.evs[1].data, "t-16") == 0 &&
          strcmp(rc.evs[5].data, "t-20") == 0, "C: the gap, then t-16..t-20: %s", datas(&rc));
    CHECK(rb.raw.len == rc.raw.len && memcmp(rb.raw.data, rc.raw.data, rb.raw.len) == 0,
          "B and C replay the same bytes");
    rec_free(&wb);
    rec_free(&rb);
    rec_free(&rc);
    sse_broker_free(A.br);
    sse_broker_free(B.br);
    sse_broker_free(C.br);
    sse_channel_free(ca);
    sse_channel_free(cb);
    sse_channel_free(cc);
}

/* FLUSHALL (Redis lost its data): the next publish creates a new epoch; every
 * subscriber of both processes gets the gap event, then the new event; an id of the
 * old epoch resumes with the gap. */
static void test_flushall(void)
{
    proc A, B;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb5", "ticks", 100, &ca, &cb);
    rec ra, rb;
    rec_init(&ra, SSE_FORMAT_SSE);
    rec_init(&rb, SSE_FORMAT_SSE);
    live(&ra, ca);
    live(&rb, cb);
    pubres r[3], after;
    for (int i = 0; i < 3; i++) {           /* one after the other: A, B, A */
        char d[8];
        snprintf(d, sizeof d, "t-%d", i + 1);
        publish(i == 1 ? &B : &A, i == 1 ? cb : ca, d, &r[i]);
        RUN_UNTIL(r[i].calls, 5000);
    }
    RUN_UNTIL(ra.nevs >= 3 && rb.nevs >= 3, 5000);
    CHECK(ra.nevs == 3 && rb.nevs == 3, "3 events on both");
    uint64_t old_epoch = A.ids.epoch;
    char last[64];
    snprintf(last, sizeof last, "%s", ra.evs[2].id);
    char buf[256];
    CHECK(raw1("FLUSHALL", buf, sizeof buf) > 0 && strncmp(buf, "+OK", 3) == 0, "FLUSHALL: %s", buf);
    CHECK(publish(&A, ca, "new", &after) == 0, "publish after the flush");
    RUN_UNTIL(after.calls && ra.nevs >= 5 && rb.nevs >= 5, 5000);
    CHECK(after.ok && epoch_of(after.id) != old_epoch && epoch_of(after.id) == A.ids.epoch,
          "the publish has an id of a new epoch: %s (was %llu)", after.id, (unsigned long long)old_epoch);
    char want[512];
    snprintf(want, sizeof want, "t-1 t-2 t-3 gap:{\"channel\":\"ticks\",\"last_event_id\":\"%s\"} new", last);
    DATAS(&ra, want);
    DATAS(&rb, want);
    CHECK(ra.nevs == 5 && strcmp(ra.evs[4].id, after.id) == 0 && rb.nevs == 5 && strcmp(rb.evs[4].id, after.id) == 0,
          "the new event with its new id on both");
    CHECK(A.lost == 1 && B.lost == 1 && A.ids.epoch == B.ids.epoch, "both logged the loss once: %d %d", A.lost,
          B.lost);
    RUN_UNTIL(ready(&A, ca) && ready(&B, cb), 5000);
    int m;
    unsigned n = resume_point(cb, r[1].id, &m);
    CHECK(m == 1 && n == 1, "an id of the old epoch resumes with the gap (and the new event): %u %d", n, m);
    n = resume_point(cb, after.id, &m);
    CHECK(m == 0 && n == 0, "the new id resumes cleanly: %u %d", n, m);

    /* A message of the old epoch that was still unread in B's pub/sub socket when B's
     * command connection saw the new epoch (here: t-3's message again, as Redis sent it
     * before the flush). It is old news: no gap, no event, the new epoch stays. */
    char payload[512];
    int plen = snprintf(payload, sizeof payload, "%llu %llu 3 %zu ", (unsigned long long)old_epoch,
                        (unsigned long long)seq_of(last), strlen("id: \ndata: t-3\n\n") + strlen(last));
    plen += snprintf(payload + plen, sizeof payload - plen, "id: %s\ndata: t-3\n\n{\"id\":\"%s\",\"data\":\"t-3\"}\n",
                     last, last);
    const char *argv[] = { "PUBLISH", "tb5:t:ticks", payload };
    size_t lens[] = { 7, strlen(argv[1]), (size_t)plen };
    CHECK(raw(3, argv, lens, buf, sizeof buf) > 0 && strncmp(buf, ":2", 2) == 0, "the late message sent: %s", buf);
    pubres later;
    RUN_UNTIL(0, 200);
    publish(&A, ca, "later", &later);
    RUN_UNTIL(later.calls && ra.nevs >= 6 && rb.nevs >= 6, 5000);
    RUN_UNTIL(0, 400);
    snprintf(want + strlen(want), sizeof want - strlen(want), " later");
    DATAS(&ra, want);
    DATAS(&rb, want);
    CHECK(A.ids.epoch == epoch_of(after.id) && B.ids.epoch == epoch_of(after.id) && A.lost == 1 && B.lost == 1,
          "the epoch stays the new one: %llu %llu, %d %d losses logged", (unsigned long long)A.ids.epoch,
          (unsigned long long)B.ids.epoch, A.lost, B.lost);
    rec_free(&ra);
    rec_free(&rb);
    close_pair(&A, &B, ca, cb);
}

/* Redis killed (SIGKILL) and restarted with its append-only file: publishes during the
 * outage fail through the callback; after the restart new publishes reach both, with
 * no gap (the data and the epoch survived). Then only the pub/sub connections are
 * killed: what is published before they are back reaches B from the stream. */
static void test_outage(void)
{
    proc A, B;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb6", "feed", 100, &ca, &cb);
    rec ra, rb;
    rec_init(&ra, SSE_FORMAT_SSE);
    rec_init(&rb, SSE_FORMAT_SSE);
    live(&ra, ca);
    live(&rb, cb);
    pubres before;
    publish(&A, ca, "before", &before);
    RUN_UNTIL(ra.nevs >= 1 && rb.nevs >= 1, 5000);
    CHECK(before.ok && ra.nevs == 1 && rb.nevs == 1, "the first event on both");
    uint64_t epoch = A.ids.epoch;

    redis_stop(server);
    server = -1;
    RUN_UNTIL(!sse_broker_up(A.br) && !sse_broker_up(B.br) && A.downs && B.downs, 5000);
    CHECK(!sse_broker_up(A.br) && !sse_broker_up(B.br), "both see Redis down");
    CHECK(A.downs == 1 && B.downs == 1, "logged once each: %d %d", A.downs, B.downs);
    enum { D = 5 };
    pubres during[D];
    for (int i = 0; i < D; i++) {
        char d[16];
        snprintf(d, sizeof d, "during-%d", i);
        CHECK(publish(i % 2 ? &B : &A, i % 2 ? cb : ca, d, &during[i]) == 0, "given while down");
    }
    CHECK(during[0].calls == 0, "not answered inside the call");
    RUN_UNTIL(during[D - 1].calls && during[D - 2].calls, 3000);
    int failed_once = 1;
    for (int i = 0; i < D; i++)
        failed_once &= during[i].calls == 1 && !during[i].ok && during[i].err[0] && !during[i].reentrant;
    CHECK(failed_once, "each failed once through the callback: '%s'", during[0].err);
    CHECK(strstr(during[0].err, "unavailable") != NULL, "with why: '%s'", during[0].err);
    RUN_UNTIL(0, 300);
    CHECK(ra.nevs == 1 && rb.nevs == 1, "nothing delivered meanwhile");

    server = start_redis();
    CHECK(server > 0, "redis-server restarted with its append-only file");
    RUN_UNTIL(sse_broker_up(A.br) && sse_broker_up(B.br) && numsub("tb6:t:feed") == 2, 15000);
    CHECK(sse_broker_up(A.br) && sse_broker_up(B.br) && A.ups >= 1 && B.ups >= 1, "both up again");
    pubres after;
    publish(&B, cb, "after", &after);
    RUN_UNTIL(after.calls && ra.nevs >= 2 && rb.nevs >= 2, 5000);
    CHECK(after.ok && epoch_of(after.id) == epoch && seq_of(after.id) > seq_of(before.id),
          "the sequence goes on, same epoch: %s after %s ('%s')", after.id, before.id, after.err);
    DATAS(&ra, "before after");
    DATAS(&rb, "before after");
    CHECK(A.lost == 0 && B.lost == 0, "no data was lost");

    /* Only the pub/sub connections die; publishes on A's command connection go on and
     * are stored while B is not subscribed. */
    int bdowns = B.downs, bups = B.ups;
    char buf[256];
    const char *kill_pubsub[] = { "CLIENT", "KILL", "TYPE", "pubsub" };
    CHECK(raw(4, kill_pubsub, NULL, buf, sizeof buf) > 0 && strncmp(buf, ":2", 2) == 0,
          "both pub/sub connections killed: %s", buf);
    enum { P = 5 };
    pubres p[P];
    for (int i = 0; i < P; i++) {
        char d[16];
        snprintf(d, sizeof d, "p-%d", i + 1);
        publish(&A, ca, d, &p[i]);
    }
    RUN_UNTIL(p[P - 1].calls && rb.nevs >= 2 + P && ra.nevs >= 2 + P && B.ups > bups, 10000);
    int stored = 1;
    for (int i = 0; i < P; i++)
        stored &= p[i].ok;
    CHECK(stored, "publishes while the pub/sub connections reconnect are stored: '%s'", p[0].err);
    CHECK(B.downs == bdowns + 1 && B.ups == bups + 1, "B saw its link go down and come back: %d %d",
          B.downs - bdowns, B.ups - bups);
    DATAS(&ra, "before after p-1 p-2 p-3 p-4 p-5");
    DATAS(&rb, "before after p-1 p-2 p-3 p-4 p-5");
    RUN_UNTIL(0, 500);
    CHECK(ra.nevs == 7 && rb.nevs == 7 && gaps(&rb) == 0, "once each, no gap: %zu %zu", ra.nevs, rb.nevs);
    rec_free(&ra);
    rec_free(&rb);
    close_pair(&A, &B, ca, cb);
}

/* sse_broker_free with publishes in flight, half answered, not yet sent, refused while
 * down, and from inside its own callbacks: no callback after it, nothing leaked or used
 * after it is freed (ASan). */
static void test_free(void)
{
    proc A, B;
    sse_channel *ca, *cb;
    open_pair(&A, &B, "tb7", "gone", 100, &ca, &cb);
    rec ra, rb;
    rec_init(&ra, SSE_FORMAT_SSE);
    rec_init(&rb, SSE_FORMAT_SSE);
    live(&ra, ca);
    live(&rb, cb);
    enum { N = 1000 };              /* replies: several reads of 16 KB, so A is freed midway */
    pubres *ra_res = calloc(N, sizeof *ra_res), *rb_res = calloc(N, sizeof *rb_res);
    /* B: freed before any was sent; A: after a few turns, with some answered. */
    for (int i = 0; i < N; i++)
        publish(&B, cb, "b", &rb_res[i]);
    sse_broker_free(B.br);
    for (int i = 0; i < N; i++)
        publish(&A, ca, "a", &ra_res[i]);
    RUN_UNTIL(ra_res[10].calls, 5000);
    int answered = 0;
    for (int i = 0; i < N; i++)
        answered += ra_res[i].calls;
    sse_broker_free(A.br);
    int after_free = 0, twice = 0;
    RUN_UNTIL(0, 300);
    int total = 0;
    for (int i = 0; i < N; i++) {
        total += ra_res[i].calls;
        twice += ra_res[i].calls > 1 || rb_res[i].calls > 1;
        after_free += rb_res[i].calls;
    }
    after_free += total - answered;
    CHECK(answered > 0 && answered < N, "A freed with %d of %d answered", answered, N);
    CHECK(after_free == 0 && twice == 0, "no callback after sse_broker_free: %d", after_free);
    rec_free(&ra);
    rec_free(&rb);
    sse_channel_free(ca);
    sse_channel_free(cb);
    free(ra_res);
    free(rb_res);

    /* Freed while Redis cannot be reached: refused publishes waiting for their turn. */
    proc D;
    proc_new(&D, "tb7", redis_free_port());
    sse_channel *cd = attach(&D, "gone", 10);
    pubres rd[3], waiting;
    for (int i = 0; i < 3; i++)
        publish(&D, cd, "x", &rd[i]);
    RUN_UNTIL(D.downs && rd[2].calls, 3000);
    CHECK(rd[0].calls == 1 && rd[2].calls == 1 && strstr(rd[0].err, "unavailable"),
          "refused while down: '%s'", rd[0].err);
    publish(&D, cd, "y", &waiting);         /* refused, its answer due on the next turn */
    sse_broker_free(D.br);
    RUN_UNTIL(0, 100);
    CHECK(waiting.calls == 0, "no callback after free while down");
    sse_channel_free(cd);

    /* Freed from inside a publish's callback, with more publishes and syncs in flight. */
    proc E;
    proc_new(&E, "tb7", port);
    sse_channel *ce = attach(&E, "gone", 100);
    RUN_UNTIL(ready(&E, ce), 5000);
    rec re;
    rec_init(&re, SSE_FORMAT_SSE);
    live(&re, ce);
    pubres re_res[50];
    for (int i = 0; i < 50; i++)
        publish(&E, ce, "e", &re_res[i]);
    free_in_callback = &E.br;
    RUN_UNTIL(E.br == NULL, 5000);
    free_in_callback = NULL;
    CHECK(E.br == NULL && re_res[0].calls == 1, "freed in the first publish's callback");
    RUN_UNTIL(0, 100);
    int later = 0;
    for (int i = 1; i < 50; i++)
        later += re_res[i].calls;
    CHECK(later == 0, "no callback after: %d", later);
    rec_free(&re);
    sse_channel_free(ce);

    /* Freed from inside the ready hook. */
    proc F;
    proc_new(&F, "tb7", port);
    F.free_on_ready = 1;
    sse_channel *cf = attach(&F, "gone", 100);
    RUN_UNTIL(F.br == NULL, 5000);
    CHECK(F.br == NULL && F.readies == 1, "freed in the ready hook");
    RUN_UNTIL(0, 100);
    sse_channel_free(cf);
}

int main(void)
{
    if (!redis_installed()) {
        printf("test_broker: SKIPPED: redis-server is not installed\n");
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);   /* what failed stays visible if a sanitizer aborts */
    snprintf(dir, sizeof dir, "/tmp/test_broker.XXXXXX");
    if (!mkdtemp(dir))
        die("mkdtemp");
    loop = sse_loop_new();
    port = redis_free_port();
    server = start_redis();
    CHECK(server > 0, "redis-server started on port %d in %s", port, dir);
    if (server > 0) {
        test_fanout();
        test_alternating();
        test_burst(0);
        test_burst(1);
        test_burst(5);
        test_resume();
        test_trimmed();
        test_flushall();
        test_outage();
        test_free();
    }
    RUN_UNTIL(0, 20);
    CHECK(sse_loop_next_timeout(loop) == -1, "no timer left on the loop");
    sse_loop_free(loop);
    redis_stop(server);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("test_broker: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
