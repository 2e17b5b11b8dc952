/* C tests of sse_redis against real redis-server processes of its own: each is started
 * on a free loopback port (--save '' --appendonly no: nothing touches the disk), waited
 * for until it answers PING, and killed by its PID. Without redis-server the test says
 * SKIPPED and passes. Every wait is a loop on sse_loop_poll with a deadline. */
#include "sse_redis.h"
#include "sse_loop.h"
#include "check.h"
#include "redis_server.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static sse_loop *loop;
static int port;            /* the main server's */
static pid_t server;

#define RUN_UNTIL(cond, ms)                                                   \
    do {                                                                      \
        int64_t end_ = sse_loop_now_us() + (int64_t)(ms) * 1000;              \
        while (!(cond) && sse_loop_now_us() < end_) {                         \
            int t_ = sse_loop_next_timeout(loop);                             \
            int64_t w_ = end_ - sse_loop_now_us();                            \
            if (w_ < 0)                                                       \
                w_ = 0;                                                       \
            if (t_ >= 0 && (int64_t)t_ * 1000 < w_)                           \
                w_ = (int64_t)t_ * 1000;                                      \
            sse_loop_poll(loop, w_);                                          \
        }                                                                     \
    } while (0)

/* ---- redis-server processes ---- */

static int listen_loopback(int *out_port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &al) != 0) {
        close(fd);
        return -1;
    }
    *out_port = ntohs(a.sin_port);
    return fd;
}

/* A blocking client for the test's own use (never the loop's): sends raw RESP, returns
 * the first reply's bytes (up to cap) or -1. */
static int raw_command(int p, const char *cmd, char *out, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)p),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct timeval tv = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int n = -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        send(fd, cmd, strlen(cmd), MSG_NOSIGNAL) == (ssize_t)strlen(cmd)) {
        ssize_t r = recv(fd, out, cap - 1, 0);
        if (r > 0) {
            out[r] = '\0';
            n = (int)r;
        }
    }
    close(fd);
    return n;
}

/* Starts redis-server on p (redis_server.h) with one extra "--name value" pair. */
static pid_t start_redis(int p, const char *extra1, const char *extra2)
{
    const char *extra[] = { extra1, extra2, NULL };
    return redis_start(p, extra1 ? extra : NULL);
}

/* ---- recorders ---- */

typedef struct msg {
    char   topic[32];
    size_t tlen;
    char   payload[64];
    size_t plen;
} msg;

typedef struct ctx {
    int        ups, downs, last;
    char       why[256];
    int        nmsgs;
    msg        msgs[1200];
    sse_redis *r;
    int        free_on_message;
    int        free_on_state;
} ctx;

static void on_state(void *ud, int up, const char *why)
{
    ctx *x = ud;
    if (up) {
        x->ups++;
        CHECK(why == NULL, "no why with up");
    } else {
        x->downs++;
        snprintf(x->why, sizeof x->why, "%s", why ? why : "(null)");
    }
    x->last = up;
    if (x->free_on_state)
        sse_redis_free(x->r);
}

static void on_message(void *ud, const char *t, size_t tlen, const char *p, size_t plen)
{
    ctx *x = ud;
    if (x->nmsgs < (int)(sizeof x->msgs / sizeof x->msgs[0])) {
        msg *m = &x->msgs[x->nmsgs];
        m->tlen = tlen;
        m->plen = plen;
        memcpy(m->topic, t, tlen < sizeof m->topic ? tlen : sizeof m->topic);
        memcpy(m->payload, p, plen < sizeof m->payload ? plen : sizeof m->payload);
    }
    x->nmsgs++;
    if (x->free_on_message)
        sse_redis_free(x->r);
}

typedef struct res {
    int        calls, order, type, reentrant;
    long long  integer;
    char       str[256];
    size_t     len;
    size_t     elements;
    char       err[64];
    sse_redis *free_me;         /* the callback frees this */
    sse_redis *then_r;          /* the callback gives GET k on then_r into then */
    struct res *then;
} res;

static int in_command, order_counter;

static void on_res(void *ud, const redisReply *rp, const char *err)
{
    res *x = ud;
    x->calls++;
    x->order = ++order_counter;
    x->reentrant += in_command;
    if (rp) {
        x->type = rp->type;
        x->integer = rp->integer;
        x->elements = rp->elements;
        if (rp->type == REDIS_REPLY_ARRAY && rp->elements && rp->element[0]->type == REDIS_REPLY_INTEGER)
            x->integer = rp->element[0]->integer;   /* SCRIPT EXISTS */
        if (rp->str) {
            x->len = rp->len;
            snprintf(x->str, sizeof x->str, "%.*s", (int)rp->len, rp->str);
        }
    } else {
        x->type = 0;
        snprintf(x->err, sizeof x->err, "%s", err ? err : "(null)");
    }
    if (x->then) {
        memset(x->then, 0, sizeof *x->then);
        const char *argv[] = { "GET", "k" };
        x->then->reentrant = -1;    /* marks it given: 0 once answered outside the call */
        in_command = 1;
        int rc = sse_redis_command(x->then_r, on_res, x->then, 2, argv, NULL);
        in_command = 0;
        x->then->reentrant = rc;    /* 0, or the error if refused */
    }
    if (x->free_me)
        sse_redis_free(x->free_me);
}

/* cmd(r, &res, "SET", "k", "v", NULL) */
static int cmd(sse_redis *r, res *x, ...)
{
    const char *argv[16];
    int argc = 0;
    va_list ap;
    va_start(ap, x);
    for (const char *a; argc < 16 && (a = va_arg(ap, const char *));)
        argv[argc++] = a;
    va_end(ap);
    memset(x, 0, sizeof *x);
    in_command = 1;
    int rc = sse_redis_command(r, on_res, x, argc, argv, NULL);
    in_command = 0;
    return rc;
}

static sse_redis *new_client(ctx *x, int p, int db, const char *password)
{
    memset(x, 0, sizeof *x);
    x->last = -1;
    sse_redis_config cfg = { .host = "127.0.0.1", .port = p, .db = db, .password = password,
                             .ud = x, .on_state = on_state, .on_message = on_message };
    const char *err = NULL;
    sse_redis *r = sse_redis_new(loop, &cfg, &err);
    CHECK(r != NULL, "sse_redis_new: %s", err ? err : "");
    x->r = r;
    return r;
}

static sse_redis *connect_client(ctx *x, int p, int db, const char *password)
{
    sse_redis *r = new_client(x, p, db, password);
    RUN_UNTIL(x->ups == 1, 3000);
    CHECK(x->ups == 1 && x->downs == 0 && sse_redis_up(r), "up once: %d ups, %d downs (%s)",
          x->ups, x->downs, x->why);
    return r;
}

/* A subscription is in place once a PUBLISH from the command connection reaches one
 * subscriber (the two connections' orders are independent). */
static int wait_subscribed(sse_redis *r, const char *topic)
{
    int64_t end = sse_loop_now_us() + 3000000;
    res x;
    while (sse_loop_now_us() < end) {
        cmd(r, &x, "PUBLISH", topic, "probe", NULL);
        RUN_UNTIL(x.calls, 1000);
        if (x.type == REDIS_REPLY_INTEGER && x.integer >= 1)
            return 1;
        RUN_UNTIL(0, 10);
    }
    return 0;
}

/* ---- the cases ---- */

static void test_config(void)
{
    const char *err = NULL;
    sse_redis_config bad_host = { .host = "redis.example.com" };
    CHECK(sse_redis_new(loop, &bad_host, &err) == NULL && err && strstr(err, "numeric"),
          "a host name is refused (no DNS on the loop): %s", err ? err : "(none)");
    err = NULL;
    sse_redis_config bad_port = { .port = 70000 };
    CHECK(sse_redis_new(loop, &bad_port, &err) == NULL && err, "port out of range: %s", err ? err : "(none)");
    err = NULL;
    sse_redis_config user_only = { .username = "u" };
    CHECK(sse_redis_new(loop, &user_only, &err) == NULL && err, "username without password: %s",
          err ? err : "(none)");
    sse_redis_config ok[] = { { .host = "localhost" }, { .host = "::1" }, { .host = NULL } };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        sse_redis *r = sse_redis_new(loop, &ok[i], &err);
        CHECK(r != NULL, "host %s accepted", ok[i].host ? ok[i].host : "(default)");
        sse_redis_free(r);          /* before any attempt: nothing ran */
    }
    CHECK(sse_loop_next_timeout(loop) == -1, "no timer left by those");
}

static void test_roundtrip(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    res set, get, inc1, inc2, wrong, nil;
    cmd(r, &set, "SET", "k", "v", NULL);
    cmd(r, &get, "GET", "k", NULL);
    cmd(r, &inc1, "INCR", "counter", NULL);
    cmd(r, &inc2, "INCR", "counter", NULL);
    cmd(r, &wrong, "INCR", "k", NULL);
    cmd(r, &nil, "GET", "no-such-key", NULL);
    CHECK(set.calls == 0 && sse_redis_pending(r) == 6, "nothing answered inside the calls: %zu pending",
          sse_redis_pending(r));
    RUN_UNTIL(nil.calls, 2000);
    CHECK(set.calls == 1 && set.type == REDIS_REPLY_STATUS && strcmp(set.str, "OK") == 0, "SET: %d '%s'",
          set.type, set.str);
    CHECK(get.calls == 1 && get.type == REDIS_REPLY_STRING && strcmp(get.str, "v") == 0, "GET: '%s'", get.str);
    CHECK(inc1.integer == 1 && inc2.integer == 2 && inc2.type == REDIS_REPLY_INTEGER, "INCR: %lld %lld",
          inc1.integer, inc2.integer);
    CHECK(wrong.calls == 1 && wrong.type == REDIS_REPLY_ERROR && wrong.err[0] == '\0' && wrong.str[0],
          "an error reply is a reply, not err: %d '%s' '%s'", wrong.type, wrong.str, wrong.err);
    CHECK(nil.type == REDIS_REPLY_NIL, "GET of nothing: nil (%d)", nil.type);
    CHECK(set.order < get.order && get.order < inc1.order && inc2.order < nil.order, "in order");
    /* Binary-safe arguments. */
    const char *argv[] = { "SET", "bin", "a\0b" };
    size_t lens[] = { 3, 3, 3 };
    res bset, bget;
    memset(&bset, 0, sizeof bset);
    sse_redis_command(r, on_res, &bset, 3, argv, lens);
    cmd(r, &bget, "STRLEN", "bin", NULL);
    RUN_UNTIL(bget.calls, 2000);
    CHECK(bget.integer == 3, "a value with a NUL: %lld bytes", bget.integer);
    CHECK(sse_redis_command(r, on_res, &bset, 0, argv, NULL) == -EINVAL, "argc 0 refused");
    /* A command given from a reply's callback. */
    res first, chained;
    cmd(r, &first, "SET", "k", "chained", NULL);
    first.then_r = r;
    first.then = &chained;
    RUN_UNTIL(first.calls && chained.calls, 2000);
    CHECK(chained.calls == 1 && chained.reentrant == 0 && strcmp(chained.str, "chained") == 0,
          "a command from a callback: %d '%s' '%s'", chained.calls, chained.str, chained.err);
    CHECK(sse_redis_pending(r) == 0, "nothing pending: %zu", sse_redis_pending(r));
    sse_redis_free(r);
}

static void test_select(void)
{
    ctx a, b;
    sse_redis *r3 = connect_client(&a, port, 3, NULL);
    sse_redis *r0 = connect_client(&b, port, 0, NULL);
    res set, get3, get0;
    cmd(r3, &set, "SET", "in-db-3", "yes", NULL);
    RUN_UNTIL(set.calls, 2000);
    cmd(r3, &get3, "GET", "in-db-3", NULL);
    cmd(r0, &get0, "GET", "in-db-3", NULL);
    RUN_UNTIL(get3.calls && get0.calls, 2000);
    CHECK(strcmp(get3.str, "yes") == 0 && get0.type == REDIS_REPLY_NIL, "SELECT 3: '%s' there, %d in db 0",
          get3.str, get0.type);
    sse_redis_free(r3);
    sse_redis_free(r0);
}

static void test_pipeline(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    enum { N = 1000 };
    res *rs = calloc(N, sizeof *rs);
    res del;
    cmd(r, &del, "DEL", "pipe", NULL);
    for (int i = 0; i < N; i++)
        cmd(r, &rs[i], "INCR", "pipe", NULL);
    RUN_UNTIL(rs[N - 1].calls, 5000);
    int ok = 1, reentrant = 0;
    for (int i = 0; i < N; i++) {
        reentrant += rs[i].reentrant;
        if (rs[i].calls != 1 || rs[i].integer != i + 1 || (i && rs[i].order != rs[i - 1].order + 1)) {
            CHECK(0, "reply %d: %d calls, %lld, order %d", i, rs[i].calls, rs[i].integer, rs[i].order);
            ok = 0;
            break;
        }
    }
    CHECK(ok, "1000 pipelined INCRs answered once each, in order");
    CHECK(reentrant == 0, "no callback inside sse_redis_command");
    free(rs);
    sse_redis_free(r);
}

static void test_pubsub(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    CHECK(sse_redis_subscribe(r, "news", 4) == 0 && sse_redis_subscribe(r, "news", 4) == 0 &&
          sse_redis_topics(r) == 1, "subscribe twice: one topic");
    CHECK(wait_subscribed(r, "news"), "subscribed to news");
    RUN_UNTIL(0, 20);
    x.nmsgs = 0;
    enum { N = 100 };
    res pub[N];
    char payload[N][16];
    for (int i = 0; i < N; i++) {
        snprintf(payload[i], sizeof payload[i], "m%d", i);
        cmd(r, &pub[i], "PUBLISH", "news", payload[i], NULL);
    }
    RUN_UNTIL(x.nmsgs >= N && pub[N - 1].calls, 3000);
    CHECK(x.nmsgs == N, "%d messages of %d", x.nmsgs, N);
    int inorder = 1;
    for (int i = 0; i < N && i < x.nmsgs; i++)
        if (x.msgs[i].tlen != 4 || memcmp(x.msgs[i].topic, "news", 4) != 0 ||
            x.msgs[i].plen != strlen(payload[i]) || memcmp(x.msgs[i].payload, payload[i], x.msgs[i].plen) != 0)
            inorder = 0;
    CHECK(inorder, "messages in order, topic and payload intact");

    /* Binary topic and payload. */
    CHECK(sse_redis_subscribe(r, "b\0n", 3) == 0, "binary topic");
    const char *bin_argv[] = { "PUBLISH", "b\0n", "x\0y\0z" };
    size_t bin_lens[] = { 7, 3, 5 };
    int64_t end = sse_loop_now_us() + 3000000;
    res bp;
    do {
        memset(&bp, 0, sizeof bp);
        sse_redis_command(r, on_res, &bp, 3, bin_argv, bin_lens);
        RUN_UNTIL(bp.calls, 1000);
    } while (bp.integer < 1 && sse_loop_now_us() < end);
    RUN_UNTIL(x.nmsgs > N, 2000);
    msg *m = &x.msgs[x.nmsgs - 1];
    CHECK(x.nmsgs > N && m->tlen == 3 && memcmp(m->topic, "b\0n", 3) == 0 && m->plen == 5 &&
          memcmp(m->payload, "x\0y\0z", 5) == 0, "NULs in topic and payload: %zu %zu", m->tlen, m->plen);

    /* Unsubscribe: nothing after it returns, even what was already on the way. A client
     * of the test's own publishes, so the messages wait in our socket unread. */
    int before = x.nmsgs;
    char buf[256];
    for (int i = 0; i < 5; i++)
        raw_command(port, "PUBLISH news in-flight\r\n", buf, sizeof buf);
    CHECK(strncmp(buf, ":1", 2) == 0, "published to our subscriber: %s", buf);
    CHECK(sse_redis_unsubscribe(r, "news", 4) == 0 && sse_redis_topics(r) == 1, "unsubscribed");
    res after;
    end = sse_loop_now_us() + 3000000;
    do {                            /* until the server has dropped the subscription */
        cmd(r, &after, "PUBLISH", "news", "after", NULL);
        RUN_UNTIL(after.calls, 1000);
    } while (after.integer != 0 && sse_loop_now_us() < end);
    CHECK(after.integer == 0, "the server no longer sends news to us");
    RUN_UNTIL(0, 50);
    CHECK(x.nmsgs == before, "no message after unsubscribe: %d more", x.nmsgs - before);
    CHECK(sse_redis_unsubscribe(r, "never", 5) == 0, "unsubscribing an unknown topic is a no-op");
    sse_redis_free(r);
}

static void test_script(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    sse_redis_script *empty = sse_redis_script_new("", 0), *abc = sse_redis_script_new("abc", 3);
    CHECK(strcmp(sse_redis_script_sha(empty), "da39a3ee5e6b4b0d3255bfef95601890afd80709") == 0 &&
          strcmp(sse_redis_script_sha(abc), "a9993e364706816aba3e25717850c26c9cd0d89d") == 0,
          "SHA1 test vectors: %s %s", sse_redis_script_sha(empty), sse_redis_script_sha(abc));
    sse_redis_script_free(empty);
    sse_redis_script_free(abc);
    /* 200 bytes: a message of more than one block. */
    char text[256];
    snprintf(text, sizeof text, "%s%-150s", "return redis.call('INCRBY', KEYS[1], ARGV[1]) --", "padding");
    sse_redis_script *s = sse_redis_script_new(text, strlen(text));
    res load, flush, del, e1, e2, e3, exists, ex2;
    cmd(r, &load, "SCRIPT", "LOAD", text, NULL);
    RUN_UNTIL(load.calls, 2000);
    CHECK(strcmp(load.str, sse_redis_script_sha(s)) == 0, "our SHA1 is Redis's: %s %s", load.str,
          sse_redis_script_sha(s));
    cmd(r, &flush, "SCRIPT", "FLUSH", NULL);
    cmd(r, &del, "DEL", "sc", NULL);
    cmd(r, &exists, "SCRIPT", "EXISTS", sse_redis_script_sha(s), NULL);
    RUN_UNTIL(exists.calls, 2000);
    CHECK(exists.elements == 1 && exists.integer == 0, "flushed: the server does not know it");
    const char *args[] = { "sc", "5" };
    memset(&e1, 0, sizeof e1);
    CHECK(sse_redis_eval(r, s, on_res, &e1, 1, 2, args, NULL) == 0, "eval given");
    RUN_UNTIL(e1.calls, 2000);
    CHECK(e1.calls == 1 && e1.type == REDIS_REPLY_INTEGER && e1.integer == 5,
          "after SCRIPT FLUSH, NOSCRIPT is retried with EVAL: %d %lld '%s' '%s'", e1.type, e1.integer,
          e1.str, e1.err);
    cmd(r, &ex2, "SCRIPT", "EXISTS", sse_redis_script_sha(s), NULL);
    memset(&e2, 0, sizeof e2);
    sse_redis_eval(r, s, on_res, &e2, 1, 2, args, NULL);
    RUN_UNTIL(e2.calls, 2000);
    CHECK(ex2.elements == 1 && ex2.integer == 1, "the EVAL loaded it again");
    CHECK(e2.integer == 10, "EVALSHA again: %lld", e2.integer);
    /* The caller may drop the script while an eval of it is in flight. */
    cmd(r, &flush, "SCRIPT", "FLUSH", NULL);
    memset(&e3, 0, sizeof e3);
    sse_redis_eval(r, s, on_res, &e3, 1, 2, args, NULL);
    sse_redis_script_free(s);
    RUN_UNTIL(e3.calls, 2000);
    CHECK(e3.integer == 15, "flushed again, script freed meanwhile: %lld '%s'", e3.integer, e3.str);
    /* A failing script is an error reply, not retried. */
    sse_redis_script *bad = sse_redis_script_new("return redis.call('NOPE')", 25);
    res eb;
    memset(&eb, 0, sizeof eb);
    sse_redis_eval(r, bad, on_res, &eb, 0, 0, NULL, NULL);
    RUN_UNTIL(eb.calls, 2000);
    CHECK(eb.calls == 1 && eb.type == REDIS_REPLY_ERROR && eb.err[0] == '\0', "script error: %d '%s'",
          eb.type, eb.str);
    CHECK(sse_redis_eval(r, bad, on_res, &eb, 2, 1, args, NULL) == -EINVAL, "nkeys > argc refused");
    sse_redis_script_free(bad);
    sse_redis_free(r);
}

static uint64_t last_tick, max_gap;
static int nticks;
static void on_tick(sse_timer *t)
{
    uint64_t now = (uint64_t)sse_loop_now_us();
    if (last_tick && now - last_tick > max_gap)
        max_gap = now - last_tick;
    last_tick = now;
    nticks++;
}

static void test_outage(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    sse_redis_subscribe(r, "live", 4);
    sse_redis_subscribe(r, "dropped", 7);
    char names[300][8];
    for (int i = 0; i < 300; i++) {
        snprintf(names[i], sizeof names[i], "t%d", i);
        sse_redis_subscribe(r, names[i], strlen(names[i]));
    }
    CHECK(wait_subscribed(r, "live") && wait_subscribed(r, "t299"), "subscribed to live and t0..t299");
    res blpop, during, pub, set, get, late, gone, many, after_down;
    cmd(r, &blpop, "BLPOP", "nothing", "0", NULL);     /* in flight until the server dies */
    blpop.then_r = r;                                  /* its callback gives another */
    blpop.then = &after_down;
    enum { QUEUED = 500 };
    res *queued = calloc(QUEUED, sizeof *queued);      /* held by the server behind BLPOP */
    for (int i = 0; i < QUEUED; i++)
        cmd(r, &queued[i], "GET", "k", NULL);
    RUN_UNTIL(0, 20);
    redis_stop(server);
    int64_t killed = sse_loop_now_us();
    RUN_UNTIL(x.downs == 1 && blpop.calls, 3000);
    CHECK(x.downs == 1 && x.why[0] && !sse_redis_up(r), "down once: %d, '%s'", x.downs, x.why);
    CHECK(sse_loop_now_us() - killed < 1000000, "seen within a second: %lld us",
          (long long)(sse_loop_now_us() - killed));
    CHECK(blpop.calls == 1 && strcmp(blpop.err, "disconnected") == 0, "the command in flight failed: '%s'",
          blpop.err);
    int all_once = 1;
    for (int i = 0; i < QUEUED; i++)
        all_once &= queued[i].calls == 1 && strcmp(queued[i].err, "disconnected") == 0 && queued[i].order > blpop.order;
    CHECK(all_once, "the %d behind it failed too, once each, after it", QUEUED);
    free(queued);
    RUN_UNTIL(after_down.calls, 1000);
    CHECK(after_down.calls == 1 && after_down.reentrant == 0 && strcmp(after_down.err, "redis unavailable") == 0,
          "a command from that callback is refused on the next turn: '%s'", after_down.err);
    /* Topics changed while down: restored as they are now. */
    sse_redis_subscribe(r, "late", 4);
    sse_redis_unsubscribe(r, "dropped", 7);
    int64_t t0 = sse_loop_now_us();
    cmd(r, &during, "GET", "k", NULL);
    CHECK(during.calls == 0, "not answered inside sse_redis_command");
    RUN_UNTIL(during.calls, 1000);
    CHECK(during.calls == 1 && strcmp(during.err, "redis unavailable") == 0 && during.reentrant == 0,
          "a command while down fails: '%s'", during.err);
    CHECK(sse_loop_now_us() - t0 < 100000, "fast: %lld us", (long long)(sse_loop_now_us() - t0));
    /* The loop goes on: a 10 ms timer ticks through the failing reconnect attempts. */
    sse_timer tick;
    sse_timer_init(&tick, on_tick);
    sse_timer_start(loop, &tick, 10, 10);
    RUN_UNTIL(0, 600);
    sse_timer_stop(loop, &tick);
    CHECK(nticks >= 40 && max_gap < 100000, "the timer kept ticking: %d ticks, gap %llu us", nticks,
          (unsigned long long)max_gap);
    CHECK(x.downs == 1 && x.ups == 1, "failed attempts are not reported again: %d downs", x.downs);

    server = start_redis(port, NULL, NULL);
    CHECK(server > 0, "redis-server restarted on port %d", port);
    RUN_UNTIL(x.ups == 2, 10000);
    CHECK(x.ups == 2 && x.downs == 1 && sse_redis_up(r), "up again once: %d ups, %d downs", x.ups, x.downs);
    int before = x.nmsgs;
    cmd(r, &pub, "PUBLISH", "live", "back", NULL);
    RUN_UNTIL(pub.calls && x.nmsgs > before, 2000);
    CHECK(pub.integer == 1, "subscription restored before up was reported: %lld receivers", pub.integer);
    CHECK(x.nmsgs == before + 1 && memcmp(x.msgs[before].payload, "back", 4) == 0, "the message arrived");
    cmd(r, &late, "PUBLISH", "late", "x", NULL);
    cmd(r, &gone, "PUBLISH", "dropped", "x", NULL);
    cmd(r, &many, "PUBLISH", "t173", "x", NULL);
    RUN_UNTIL(late.calls && gone.calls && many.calls, 2000);
    CHECK(late.integer == 1 && gone.integer == 0 && many.integer == 1,
          "the set as it was at the reconnect: late %lld, dropped %lld, t173 %lld", late.integer,
          gone.integer, many.integer);
    cmd(r, &set, "SET", "again", "1", NULL);
    cmd(r, &get, "GET", "again", NULL);
    RUN_UNTIL(get.calls, 2000);
    CHECK(strcmp(get.str, "1") == 0, "commands work again: '%s' '%s'", get.str, get.err);
    sse_redis_free(r);
}

static void test_refused(void)
{
    ctx x;
    sse_redis *r = new_client(&x, redis_free_port(), 0, NULL);
    res c;
    cmd(r, &c, "GET", "k", NULL);
    CHECK(c.calls == 0, "not answered inside the call");
    RUN_UNTIL(c.calls && x.downs, 2000);
    CHECK(c.calls == 1 && strcmp(c.err, "redis unavailable") == 0 && !c.reentrant, "refused: '%s'", c.err);
    CHECK(x.downs == 1 && x.ups == 0 && strstr(x.why, "refused"), "down with why: '%s'", x.why);
    RUN_UNTIL(0, 300);              /* a few attempts more, none reported */
    CHECK(x.downs == 1, "reported once: %d", x.downs);
    sse_redis_free(r);

    /* Freed from inside on_state. */
    ctx y;
    sse_redis *s = new_client(&y, redis_free_port(), 0, NULL);
    y.free_on_state = 1;
    res c2;
    cmd(s, &c2, "GET", "k", NULL);
    RUN_UNTIL(y.downs, 2000);
    CHECK(y.downs == 1 && c2.calls == 1, "freed in on_state: %d downs, %d calls ('%s')", y.downs, c2.calls, c2.err);
    RUN_UNTIL(0, 300);
    CHECK(y.downs == 1, "nothing after");
}

/* A server that takes the connection and never answers: the setup (AUTH) times out. */
static void test_timeout(void)
{
    int p, lfd = listen_loopback(&p);
    ctx x;
    memset(&x, 0, sizeof x);
    sse_redis_config cfg = { .port = p, .password = "pw", .timeout_ms = 150, .ud = &x, .on_state = on_state };
    sse_redis *r = sse_redis_new(loop, &cfg, NULL);
    int64_t t0 = sse_loop_now_us();
    RUN_UNTIL(x.downs, 2000);
    int64_t took = sse_loop_now_us() - t0;
    CHECK(x.downs == 1 && strstr(x.why, "timed out"), "setup timed out: '%s'", x.why);
    CHECK(took >= 140000 && took < 1000000, "after ~150 ms: %lld us", (long long)took);
    sse_redis_free(r);
    close(lfd);
}

static void test_auth(void)
{
    int p = redis_free_port();
    pid_t pid = start_redis(p, "--requirepass", "s3cret");
    CHECK(pid > 0, "redis-server with requirepass");
    if (pid <= 0)
        return;
    ctx a, b;
    sse_redis *good = connect_client(&a, p, 2, "s3cret");
    res set, get;
    cmd(good, &set, "SET", "x", "1", NULL);
    cmd(good, &get, "GET", "x", NULL);
    RUN_UNTIL(get.calls, 2000);
    CHECK(strcmp(get.str, "1") == 0, "with the password: '%s' '%s'", get.str, get.err);
    sse_redis_subscribe(good, "t", 1);
    CHECK(wait_subscribed(good, "t"), "the subscriber authenticated too");
    sse_redis *bad = new_client(&b, p, 0, "wrong");
    RUN_UNTIL(b.downs, 2000);
    CHECK(b.downs == 1 && b.ups == 0 && strstr(b.why, "AUTH failed"), "wrong password: '%s'", b.why);
    sse_redis_free(good);
    sse_redis_free(bad);
    redis_stop(pid);
}

static void test_free_in_flight(void)
{
    ctx x;
    sse_redis *r = connect_client(&x, port, 0, NULL);
    enum { N = 200 };
    res *rs = calloc(N + 2, sizeof *rs);
    for (int i = 0; i < N; i++)
        cmd(r, &rs[i], "GET", "k", NULL);
    cmd(r, &rs[N], "BLPOP", "nothing", "0", NULL);
    sse_redis_script *s = sse_redis_script_new("return 1", 8);
    sse_redis_eval(r, s, on_res, &rs[N + 1], 0, 0, NULL, NULL);
    sse_redis_script_free(s);
    sse_redis_free(r);
    int once = 1;
    for (int i = 0; i < N + 2; i++)
        if (rs[i].calls != 1 || strcmp(rs[i].err, "closed") != 0)
            once = 0;
    CHECK(once, "every pending callback ran once with 'closed' inside free");
    free(rs);

    /* Commands refused while down, still waiting for their timer. */
    ctx y;
    sse_redis *d = new_client(&y, redis_free_port(), 0, NULL);
    res w;
    cmd(d, &w, "GET", "k", NULL);
    sse_redis_free(d);
    CHECK(w.calls == 1 && strcmp(w.err, "closed") == 0, "a refused one too: '%s'", w.err);

    /* Freed from inside a reply callback: the others still get 'closed', once. */
    ctx z;
    sse_redis *f = connect_client(&z, port, 0, NULL);
    sse_redis_subscribe(f, "gone", 4);
    res first, second, third;
    cmd(f, &first, "PING", NULL);
    first.free_me = f;
    cmd(f, &second, "PING", NULL);
    cmd(f, &third, "BLPOP", "nothing", "0", NULL);
    RUN_UNTIL(first.calls, 2000);
    CHECK(first.calls == 1 && first.type == REDIS_REPLY_STATUS, "first answered");
    CHECK(second.calls == 1 && third.calls == 1 && strcmp(second.err, "closed") == 0 &&
          strcmp(third.err, "closed") == 0, "the rest closed: '%s' '%s'", second.err, third.err);
    RUN_UNTIL(0, 20);               /* the reap timer releases the memory */

    /* Freed from inside on_message. */
    ctx m;
    sse_redis *g = connect_client(&m, port, 0, NULL);
    sse_redis_subscribe(g, "bye", 3);
    CHECK(wait_subscribed(g, "bye"), "subscribed to bye");
    RUN_UNTIL(m.nmsgs, 1000);
    m.free_on_message = 1;
    char buf[64];
    raw_command(port, "PUBLISH bye now\r\n", buf, sizeof buf);
    raw_command(port, "PUBLISH bye again\r\n", buf, sizeof buf);
    int n = m.nmsgs;
    RUN_UNTIL(m.nmsgs > n, 2000);
    RUN_UNTIL(0, 50);
    CHECK(m.nmsgs == n + 1, "freed in on_message: no message after: %d", m.nmsgs - n);
}

int main(void)
{
    if (!redis_installed()) {
        printf("test_redis: SKIPPED: redis-server is not installed\n");
        return 0;
    }
    signal(SIGPIPE, SIG_DFL);       /* sse_redis must survive writes to a dead server */
    loop = sse_loop_new();
    int fds = count_fds();
    port = redis_free_port();
    server = start_redis(port, NULL, NULL);
    CHECK(server > 0, "redis-server started on port %d", port);
    if (server <= 0) {
        printf("test_redis: %d passed, %d failed\n", passed, failed);
        return 1;
    }
    test_config();
    test_roundtrip();
    test_select();
    test_pipeline();
    test_pubsub();
    test_script();
    test_refused();
    test_timeout();
    test_auth();
    test_free_in_flight();
    test_outage();
    RUN_UNTIL(0, 20);
    CHECK(sse_loop_next_timeout(loop) == -1, "no timer left on the loop");
    CHECK(count_fds() == fds, "every socket closed: %d, was %d", count_fds(), fds);
    sse_loop_free(loop);
    redis_stop(server);
    printf("test_redis: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
