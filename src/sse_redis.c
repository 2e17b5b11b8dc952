/* sse_redis: hiredis's async API on sse_loop (see sse_redis.h and docs/design.md,
 * "Redis").
 *
 * hiredis (0.14, Debian 12) asks for events through five hooks (ev.addRead, delRead,
 * addWrite, delWrite, cleanup); each connection has one sse_watch whose epoll events
 * follow them, and the watch's callback calls redisAsyncHandleRead/Write.
 *
 * What shapes this file is that hiredis frees a context on its own, from inside
 * redisAsyncHandleRead/Write (a read error, EOF, a failed connect): it runs every pending
 * reply callback with a NULL reply, then the cleanup hook, then onDisconnect, and closes
 * the socket. So:
 *   - the first sign of that (a NULL reply, cleanup, onDisconnect, onConnect failing) is
 *     handled by conn_lose: the connection forgets its context, unwatches the socket and
 *     is marked lost, before any callback of the caller can run; whatever hiredis calls
 *     afterwards finds c->ac != ac and does nothing;
 *   - the loop's callback never touches a context after handling it unless c->ac still
 *     names it;
 *   - we free a context ourselves (redisAsyncFree) only from timers, from reply callbacks
 *     (hiredis then frees it when the callback returns) or from sse_redis_free, never
 *     from onConnect, cleanup or onDisconnect, which run with hiredis's own frames still
 *     using it;
 *   - the caller's on_state runs only at the end of our outermost loop callback
 *     (settle), outside hiredis, where reconnects are scheduled too. A reconnect is
 *     always a timer, so a new context never appears on a connection while hiredis is
 *     still tearing down the old one, nor while the loop's batch may hold an event of
 *     the old socket.
 */
#include "sse_redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <hiredis/async.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_FIRST_MS 100
#define BACKOFF_MAX_MS   5000
#define TIMEOUT_MS       3000

enum { CONN_CMD, CONN_SUB };

typedef struct rconn {
    sse_redis         *r;
    int                kind;
    redisAsyncContext *ac;        /* NULL: none (waiting for the retry timer) */
    sse_watch          w;
    uint32_t           events;    /* what hiredis asked for */
    int                watched;   /* w is in the epoll set */
    int                connected; /* onConnect said OK */
    int                ready;     /* and the setup replies are in */
    int                setup;     /* setup replies still to come (AUTH, SELECT, SUBSCRIBEs) */
    int                broken;    /* a watch or a setup command failed: the deadline ends it */
    int                lost;      /* dropped or failed since the last settle */
    unsigned           attempts;  /* failures in a row: the backoff's exponent */
    sse_timer          retry;     /* the next connect attempt */
    sse_timer          deadline;  /* connected and set up by then, or dropped */
    sse_timer          flush;     /* writes of this loop turn, at its end (ev_add_write) */
    int                want_write; /* hiredis has output, flush is due */
    int                flushing;  /* inside that flush: a leftover arms EPOLLOUT */
    char               why[160];
} rconn;

struct sse_redis_script {
    int    refs;
    size_t len;
    char   sha[41];
    char   text[];
};

typedef struct rcmd {
    sse_redis        *r;
    sse_redis_cb      cb;
    void             *ud;
    const char       *err;        /* on the refused list: why */
    struct rcmd      *next;       /* the refused list */
    /* an eval: EVALSHA sha nkeys args..., slots 0 and 1 become EVAL text on NOSCRIPT */
    sse_redis_script *script;
    int               retried;
    int               argc;
    const char      **av;
    size_t           *al;
} rcmd;

typedef struct topic {
    struct topic *next;
    uint32_t      hash;
    size_t        len;
    char          s[];
} topic;

struct sse_redis {
    sse_loop  *loop;
    char       host[INET6_ADDRSTRLEN];
    int        port, db, timeout_ms;
    char      *username, *password;
    void      *ud;
    void     (*on_state)(void *ud, int up, const char *why);
    void     (*on_message)(void *ud, const char *topic, size_t tlen, const char *payload, size_t plen);
    rconn      conn[2];
    topic    **buckets;
    size_t     nbuckets, ntopics;
    rcmd      *refused, *refused_tail;  /* answered by `deliver`, in order */
    size_t     nrefused;
    sse_timer  deliver;
    sse_timer  reap;                    /* frees r after a free from inside a callback */
    size_t     pending;
    int        depth;                   /* > 0: inside our loop callback or sse_redis_free */
    int        closing;
    int        reported;                /* the last up given to on_state; -1: none yet */
    uint64_t   rng;
};

/* ---- SHA1, as Redis names scripts (FIPS 180-1) ---- */

static uint32_t rol(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

static void sha1_block(uint32_t h[5], const unsigned char *p)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999u;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1u;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDCu;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6u;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1_hex(const char *data, size_t len, char out[41])
{
    uint32_t h[5] = { 0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u };
    size_t i = 0;
    for (; len - i >= 64; i += 64)
        sha1_block(h, (const unsigned char *)data + i);
    unsigned char tail[128] = {0};
    size_t rest = len - i, tl = rest + 9 <= 64 ? 64 : 128;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int k = 0; k < 8; k++)
        tail[tl - 1 - k] = (unsigned char)(bits >> (8 * k));
    sha1_block(h, tail);
    if (tl == 128)
        sha1_block(h, tail + 64);
    for (int k = 0; k < 5; k++)
        snprintf(out + 8 * k, 9, "%08x", (unsigned)h[k]);
}

sse_redis_script *sse_redis_script_new(const char *text, size_t len)
{
    sse_redis_script *s = malloc(sizeof *s + len + 1);
    if (!s)
        return NULL;
    s->refs = 1;
    s->len = len;
    memcpy(s->text, text, len);
    s->text[len] = '\0';
    sha1_hex(s->text, len, s->sha);
    return s;
}

void sse_redis_script_free(sse_redis_script *s)
{
    if (s && --s->refs == 0)
        free(s);
}

const char *sse_redis_script_sha(const sse_redis_script *s) { return s->sha; }

/* ---- the topic set: chained hash, so a message's check and a subscribe stay O(1) ---- */

static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;                   /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static topic **topic_link(const sse_redis *r, const char *s, size_t n, uint32_t h)
{
    if (!r->nbuckets)
        return NULL;
    topic **l = &r->buckets[h & (r->nbuckets - 1)];
    while (*l && !((*l)->hash == h && (*l)->len == n && memcmp((*l)->s, s, n) == 0))
        l = &(*l)->next;
    return l;
}

static int topic_has(const sse_redis *r, const char *s, size_t n)
{
    topic **l = topic_link(r, s, n, hash_bytes(s, n));
    return l && *l;
}

static int topic_grow(sse_redis *r)
{
    size_t nb = r->nbuckets ? r->nbuckets * 2 : 16;
    topic **b = calloc(nb, sizeof *b);
    if (!b)
        return -ENOMEM;
    for (size_t i = 0; i < r->nbuckets; i++) {
        for (topic *t = r->buckets[i], *next; t; t = next) {
            next = t->next;
            t->next = b[t->hash & (nb - 1)];
            b[t->hash & (nb - 1)] = t;
        }
    }
    free(r->buckets);
    r->buckets = b;
    r->nbuckets = nb;
    return 0;
}

/* 1 added, 0 already there, -ENOMEM. */
static int topic_add(sse_redis *r, const char *s, size_t n)
{
    uint32_t h = hash_bytes(s, n);
    topic **l = topic_link(r, s, n, h);
    if (l && *l)
        return 0;
    if (r->ntopics >= r->nbuckets) {
        if (topic_grow(r) != 0)
            return -ENOMEM;
        l = topic_link(r, s, n, h);
    }
    topic *t = malloc(sizeof *t + n + 1);
    if (!t)
        return -ENOMEM;
    t->hash = h;
    t->len = n;
    memcpy(t->s, s, n);
    t->s[n] = '\0';
    t->next = NULL;
    *l = t;
    r->ntopics++;
    return 1;
}

static int topic_remove(sse_redis *r, const char *s, size_t n)
{
    topic **l = topic_link(r, s, n, hash_bytes(s, n));
    if (!l || !*l)
        return 0;
    topic *t = *l;
    *l = t->next;
    free(t);
    r->ntopics--;
    return 1;
}

static void topics_clear(sse_redis *r)
{
    for (size_t i = 0; i < r->nbuckets; i++)
        for (topic *t = r->buckets[i], *next; t; t = next) {
            next = t->next;
            free(t);
        }
    free(r->buckets);
    r->buckets = NULL;
    r->nbuckets = r->ntopics = 0;
}

/* ---- commands: the one place a caller's callback runs ---- */

static void finish(rcmd *q, const redisReply *reply, const char *err)
{
    sse_redis *r = q->r;
    r->pending--;
    if (q->cb)
        q->cb(q->ud, reply, err);
    sse_redis_script_free(q->script);
    free(q);
}

static void on_deliver(sse_timer *t);

/* A command that cannot be sent is answered from a 0 ms timer, never from inside the
 * call that gave it: the caller may be in the middle of setting up what cb uses. */
static void refuse(sse_redis *r, rcmd *q, const char *err)
{
    q->err = err;
    q->next = NULL;
    if (r->refused_tail)
        r->refused_tail->next = q;
    else
        r->refused = q;
    r->refused_tail = q;
    r->nrefused++;
    if (!sse_timer_active(&r->deliver))
        sse_timer_start(r->loop, &r->deliver, 0, 0);
}

static rcmd *refused_pop(sse_redis *r)
{
    rcmd *q = r->refused;
    if (q) {
        r->refused = q->next;
        if (!r->refused)
            r->refused_tail = NULL;
        r->nrefused--;
    }
    return q;
}

static int send_eval(redisAsyncContext *ac, rcmd *q, int with_text);
static void conn_lose(rconn *c, const char *why);

/* A command's reply. NULL: its connection is going away (hiredis calls every pending
 * one so), or sse_redis_free freed it. */
static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    rcmd *q = priv;
    sse_redis *r = q->r;
    rconn *c = &r->conn[CONN_CMD];
    redisReply *rp = reply;
    if (!rp) {
        if (c->ac == ac)
            conn_lose(c, ac->errstr);
        finish(q, NULL, r->closing ? "closed" : "disconnected");
        return;
    }
    if (q->script && !q->retried && rp->type == REDIS_REPLY_ERROR &&
        strncmp(rp->str, "NOSCRIPT", 8) == 0) {
        /* The server does not know the script (restarted, SCRIPT FLUSH): EVAL sends the
         * text, and loads it again for the next EVALSHA. */
        q->retried = 1;
        if (r->closing)
            finish(q, NULL, "closed");
        else if (c->ac != ac || send_eval(ac, q, 1) != REDIS_OK)
            finish(q, NULL, "disconnected");
        return;
    }
    finish(q, rp, NULL);
}

/* ---- connections ---- */

static void leave(sse_redis *r);

/* hiredis is about to free c's context (or we are): forget it now, so nothing run
 * after this (hiredis's remaining callbacks, the caller's) uses it. */
static void conn_lose(rconn *c, const char *why)
{
    if (!c->ac)
        return;
    char tmp[sizeof c->why];
    snprintf(tmp, sizeof tmp, "%s", why && *why ? why : "disconnected");
    memcpy(c->why, tmp, sizeof tmp);
    if (c->watched)
        sse_loop_unwatch(c->r->loop, &c->w);    /* before hiredis closes the socket */
    c->watched = 0;
    c->events = 0;
    c->ac = NULL;
    c->connected = c->ready = 0;
    c->setup = 0;
    sse_timer_stop(c->r->loop, &c->deadline);
    sse_timer_stop(c->r->loop, &c->flush);
    c->want_write = 0;
    c->lost = 1;
}

/* We end c's connection. Not from onConnect, cleanup or onDisconnect (see the top). */
static void conn_drop(rconn *c, const char *why)
{
    redisAsyncContext *ac = c->ac;
    if (!ac)
        return;
    conn_lose(c, why);
    redisAsyncFree(ac);     /* inside one of its reply callbacks: when that returns */
}

static void ev_update(rconn *c, uint32_t events)
{
    if (!c->ac || events == c->events)
        return;
    c->events = events;
    int rc = 0;
    if (!events) {
        if (c->watched)
            rc = sse_loop_unwatch(c->r->loop, &c->w);
        c->watched = 0;
    } else if (c->watched) {
        rc = sse_loop_rewatch(c->r->loop, &c->w, events);
    } else {
        rc = sse_loop_watch(c->r->loop, &c->w, events);
        c->watched = rc == 0;
    }
    if (rc && !c->broken) {
        /* A hook cannot fail, and hiredis is on the stack: the deadline ends it. */
        snprintf(c->why, sizeof c->why, "cannot watch the socket: %s", strerror(-rc));
        c->broken = 1;
        sse_timer_start(c->r->loop, &c->deadline, 0, 0);
    }
}

static void ev_add_read(void *p)  { rconn *c = p; ev_update(c, c->events | EPOLLIN); }
static void ev_del_read(void *p)  { rconn *c = p; ev_update(c, c->events & ~(uint32_t)EPOLLIN); }
/* hiredis asks to write after every command. Once connected, the write is tried once
 * at the end of the loop turn (a 0 ms timer): every command of the turn goes out in one
 * write(2), with no EPOLL_CTL_MOD pair per command and no wait for EPOLLOUT; only what
 * the socket does not take then waits for EPOLLOUT. (Before the connection is made,
 * EPOLLOUT is how connect(2) completes.) Measured by bench/broker.sh on burst: two
 * epoll_ctl calls and a wake-up per publish before. */
static void ev_add_write(void *p)
{
    rconn *c = p;
    if (c->connected && !c->flushing) {
        c->want_write = 1;
        if (!sse_timer_active(&c->flush))
            sse_timer_start(c->r->loop, &c->flush, 0, 0);
        return;
    }
    ev_update(c, c->events | EPOLLOUT);
}

static void ev_del_write(void *p)
{
    rconn *c = p;
    c->want_write = 0;
    ev_update(c, c->events & ~(uint32_t)EPOLLOUT);
}

static void ev_cleanup(void *p)
{
    rconn *c = p;
    if (c->ac)
        conn_lose(c, c->ac->errstr);
}

static void mark_ready(rconn *c)
{
    c->ready = 1;
    c->attempts = 0;
    sse_timer_stop(c->r->loop, &c->deadline);
}

static void setup_reply(redisAsyncContext *ac, redisReply *reply, rconn *c, const char *what)
{
    if (c->ac != ac)
        return;
    if (!reply) {
        conn_lose(c, ac->errstr);
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[sizeof c->why];
        snprintf(why, sizeof why, "%s failed: %s", what, reply->str);
        conn_drop(c, why);
        return;
    }
    if (c->setup > 0 && --c->setup == 0)
        mark_ready(c);
}

static void on_auth_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    setup_reply(ac, reply, priv, "AUTH");
}

static void on_select_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    setup_reply(ac, reply, priv, "SELECT");
}

/* Every reply of the subscriber connection that is not AUTH's: hiredis passes those of
 * a channel to the callback its SUBSCRIBE registered, which is this one for all. */
static void on_sub_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    rconn *c = priv;
    sse_redis *r = c->r;
    redisReply *rp = reply;
    if (c->ac != ac)
        return;
    if (!rp) {
        conn_lose(c, ac->errstr);
        return;
    }
    if (rp->type == REDIS_REPLY_ERROR) {
        char why[sizeof c->why];
        snprintf(why, sizeof why, "SUBSCRIBE failed: %s", rp->str);
        conn_drop(c, why);
        return;
    }
    if (rp->type != REDIS_REPLY_ARRAY || rp->elements < 3 || rp->element[0]->type != REDIS_REPLY_STRING)
        return;
    const char *kind = rp->element[0]->str;
    redisReply *t = rp->element[1], *m = rp->element[2];
    if (strcasecmp(kind, "message") == 0) {
        /* The set decides, not the server: messages sent before an UNSUBSCRIBE reached
         * it are still on the way after sse_redis_unsubscribe has returned. */
        if (t->type == REDIS_REPLY_STRING && m->type == REDIS_REPLY_STRING && !r->closing &&
            r->on_message && topic_has(r, t->str, t->len))
            r->on_message(r->ud, t->str, t->len, m->str, m->len);
    } else if (strcasecmp(kind, "subscribe") == 0) {
        /* The restored topics' confirmations come first, before those of topics added
         * since: the connection is ready once they are in. */
        if (c->setup > 0 && --c->setup == 0)
            mark_ready(c);
    }
}

static int send_auth(rconn *c)
{
    sse_redis *r = c->r;
    if (r->username)
        return redisAsyncCommand(c->ac, on_auth_reply, c, "AUTH %s %s", r->username, r->password);
    return redisAsyncCommand(c->ac, on_auth_reply, c, "AUTH %s", r->password);
}

/* SUBSCRIBE every topic of the set, in one command. */
static int send_restore(rconn *c)
{
    sse_redis *r = c->r;
    size_t n = r->ntopics + 1;
    const char **av = malloc(n * sizeof *av);
    size_t *al = malloc(n * sizeof *al);
    int rc = REDIS_ERR;
    if (av && al) {
        size_t k = 0;
        av[k] = "SUBSCRIBE";
        al[k++] = 9;
        for (size_t i = 0; i < r->nbuckets; i++)
            for (topic *t = r->buckets[i]; t; t = t->next) {
                av[k] = t->s;
                al[k++] = t->len;
            }
        rc = redisAsyncCommandArgv(c->ac, on_sub_reply, c, (int)n, av, al);
    }
    free(av);
    free(al);
    return rc;
}

/* Runs inside hiredis's connect handling: it sends the setup commands (they go out in
 * the same write) and must not free the context. */
static void on_connect(const redisAsyncContext *cac, int status)
{
    redisAsyncContext *ac = (redisAsyncContext *)cac;
    rconn *c = ac->data;
    sse_redis *r = c->r;
    if (c->ac != ac)
        return;
    if (status != REDIS_OK) {
        conn_lose(c, ac->errstr);       /* hiredis frees it when this returns */
        return;
    }
    c->connected = 1;
    int failed = 0;
    if (r->password) {
        failed |= send_auth(c) != REDIS_OK;
        c->setup++;
    }
    if (c->kind == CONN_CMD && r->db) {
        failed |= redisAsyncCommand(ac, on_select_reply, c, "SELECT %d", r->db) != REDIS_OK;
        c->setup++;
    }
    if (c->kind == CONN_SUB && r->ntopics) {
        failed |= send_restore(c) != REDIS_OK;
        c->setup += (int)r->ntopics;
    }
    if (failed && !c->broken) {
        snprintf(c->why, sizeof c->why, "cannot send the setup commands");
        c->broken = 1;
        sse_timer_start(r->loop, &c->deadline, 0, 0);
    } else if (c->setup == 0) {
        mark_ready(c);
    }
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    redisAsyncContext *ac = (redisAsyncContext *)cac;
    rconn *c = ac->data;
    if (c->ac == ac)
        conn_lose(c, ac->errstr);
}

static void conn_start(rconn *c)
{
    sse_redis *r = c->r;
    redisAsyncContext *ac = redisAsyncConnect(r->host, r->port);
    c->broken = 0;
    if (!ac) {
        snprintf(c->why, sizeof c->why, "out of memory");
        c->lost = 1;
        return;
    }
    if (ac->err) {
        snprintf(c->why, sizeof c->why, "%s", ac->errstr);
        redisAsyncFree(ac);
        c->lost = 1;
        return;
    }
    redisEnableKeepAlive(&ac->c);   /* a peer that vanished without a reset shows up, in time */
    ac->data = c;
    c->ac = ac;
    c->w.fd = ac->c.fd;
    c->events = 0;
    c->watched = 0;
    c->connected = c->ready = 0;
    c->setup = 0;
    ac->ev.data = c;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    sse_timer_start(r->loop, &c->deadline, (uint64_t)r->timeout_ms, 0);
    redisAsyncSetConnectCallback(ac, on_connect);   /* asks for EPOLLOUT: connect(2) done */
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
}

/* hiredis 0.14 writes with write(2), not send(MSG_NOSIGNAL): a write to a server that
 * has died raises SIGPIPE, whose default action ends the process. Unless the process
 * ignores it already, it is blocked around the write and the one raised is taken back. */
static void handle_write(redisAsyncContext *ac)
{
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN) {
        redisAsyncHandleWrite(ac);
        return;
    }
    sigset_t pipe, old, pending;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigprocmask(SIG_BLOCK, &pipe, &old);
    sigpending(&pending);
    int had = sigismember(&pending, SIGPIPE);
    redisAsyncHandleWrite(ac);
    if (!had && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE)) {
        struct timespec zero = { 0, 0 };
        sigtimedwait(&pipe, NULL, &zero);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
}

static void on_flush(sse_timer *t)
{
    rconn *c = (rconn *)((char *)t - offsetof(rconn, flush));
    sse_redis *r = c->r;
    redisAsyncContext *ac = c->ac;
    if (!ac || !c->want_write)
        return;
    c->want_write = 0;
    r->depth++;
    c->flushing = 1;
    handle_write(ac);
    c->flushing = 0;
    leave(r);
}

static void on_watch(sse_watch *w, uint32_t ev)
{
    rconn *c = (rconn *)((char *)w - offsetof(rconn, w));
    sse_redis *r = c->r;
    redisAsyncContext *ac = c->ac;
    if (!ac || !c->watched)
        return;             /* a socket let go earlier in this batch */
    r->depth++;
    /* A refused connect shows as ERR/HUP: the read side's connect check reports it. */
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
        redisAsyncHandleRead(ac);
    if (c->ac == ac && (ev & EPOLLOUT) && (c->events & EPOLLOUT))
        handle_write(ac);
    leave(r);
}

static void schedule_retry(rconn *c)
{
    sse_redis *r = c->r;
    unsigned a = c->attempts < 16 ? c->attempts : 16;
    uint64_t d = (uint64_t)BACKOFF_FIRST_MS << a;
    if (d > BACKOFF_MAX_MS)
        d = BACKOFF_MAX_MS;
    /* xorshift64: jitter between d/2 and d, so clients that lost one server together do
     * not all come back at the same instant. */
    r->rng ^= r->rng << 13;
    r->rng ^= r->rng >> 7;
    r->rng ^= r->rng << 17;
    d = d / 2 + r->rng % (d / 2 + 1);
    c->attempts++;
    sse_timer_start(r->loop, &c->retry, d, 0);
}

/* At the end of our outermost loop callback, outside hiredis: reconnects are scheduled
 * and the caller hears of a change of state. */
static void settle(sse_redis *r)
{
    rconn *down = NULL;
    for (int k = 0; k < 2; k++) {
        rconn *c = &r->conn[k];
        if (c->lost) {
            c->lost = 0;
            if (!down)
                down = c;
            schedule_retry(c);
        }
    }
    if (down && r->reported != 0) {
        char why[sizeof down->why];
        memcpy(why, down->why, sizeof why);
        r->reported = 0;
        if (r->on_state)
            r->on_state(r->ud, 0, why);
    } else if (!down && r->conn[CONN_CMD].ready && r->conn[CONN_SUB].ready && r->reported != 1) {
        r->reported = 1;
        if (r->on_state)
            r->on_state(r->ud, 1, NULL);
    }
}

/* Every loop callback of ours: depth++ on entry, leave() on exit. A sse_redis_free
 * inside (depth > 0) leaves the memory to the reap timer. */
static void leave(sse_redis *r)
{
    if (r->depth == 1 && !r->closing)
        settle(r);
    r->depth--;
}

static void on_retry(sse_timer *t)
{
    rconn *c = (rconn *)((char *)t - offsetof(rconn, retry));
    sse_redis *r = c->r;
    r->depth++;
    conn_start(c);
    leave(r);
}

static void on_deadline(sse_timer *t)
{
    rconn *c = (rconn *)((char *)t - offsetof(rconn, deadline));
    sse_redis *r = c->r;
    r->depth++;
    conn_drop(c, c->broken ? c->why : c->connected ? "timed out setting up the connection"
                                                   : "connect timed out");
    leave(r);
}

static void on_deliver(sse_timer *t)
{
    sse_redis *r = (sse_redis *)((char *)t - offsetof(sse_redis, deliver));
    r->depth++;
    /* Only those refused before this turn: one refused from a callback here waits for
     * the next, so a caller that retries at once cannot spin inside one timer. */
    size_t n = r->nrefused;
    rcmd *q;
    while (n-- && !r->closing && (q = refused_pop(r)))
        finish(q, NULL, q->err);
    leave(r);
}

static void release(sse_redis *r)
{
    free(r->username);
    free(r->password);
    free(r);
}

static void on_reap(sse_timer *t)
{
    release((sse_redis *)((char *)t - offsetof(sse_redis, reap)));
}

/* ---- public ---- */

static const char *check_config(const sse_redis_config *cfg, char *host)
{
    const char *h = cfg->host && *cfg->host ? cfg->host : "127.0.0.1";
    unsigned char addr[16];
    if (strcasecmp(h, "localhost") == 0)
        h = "127.0.0.1";        /* not ::1: a Redis bound to 127.0.0.1 is the usual case */
    if (inet_pton(AF_INET, h, addr) != 1 && inet_pton(AF_INET6, h, addr) != 1)
        return "redis host must be a numeric address or \"localhost\" (a DNS lookup would block the loop)";
    snprintf(host, INET6_ADDRSTRLEN, "%s", h);
    if (cfg->port < 0 || cfg->port > 65535)
        return "redis port out of range";
    if (cfg->db < 0)
        return "redis db must be >= 0";
    if (cfg->timeout_ms < 0)
        return "negative timeout";
    if (cfg->username && !(cfg->password && *cfg->password))
        return "redis username without password";
    return NULL;
}

sse_redis *sse_redis_new(sse_loop *loop, const sse_redis_config *cfg, const char **err)
{
    char host[INET6_ADDRSTRLEN];
    const char *why = cfg ? check_config(cfg, host) : "no config";
    sse_redis *r = why ? NULL : calloc(1, sizeof *r);
    if (r) {
        r->loop = loop;
        memcpy(r->host, host, sizeof host);
        r->port = cfg->port ? cfg->port : 6379;
        r->db = cfg->db;
        r->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : TIMEOUT_MS;
        r->ud = cfg->ud;
        r->on_state = cfg->on_state;
        r->on_message = cfg->on_message;
        r->reported = -1;
        r->rng = (uint64_t)sse_loop_now_us() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)r;
        if (!r->rng)
            r->rng = 1;
        if (cfg->password && *cfg->password && !(r->password = strdup(cfg->password)))
            why = "out of memory";
        if (cfg->username && !(r->username = strdup(cfg->username)))
            why = "out of memory";
        sse_timer_init(&r->deliver, on_deliver);
        sse_timer_init(&r->reap, on_reap);
        for (int k = 0; k < 2; k++) {
            rconn *c = &r->conn[k];
            c->r = r;
            c->kind = k;
            c->w.fd = -1;
            c->w.cb = on_watch;
            sse_timer_init(&c->retry, on_retry);
            sse_timer_init(&c->deadline, on_deadline);
            sse_timer_init(&c->flush, on_flush);
        }
        if (why) {
            release(r);
            r = NULL;
        }
    } else if (!why) {
        why = "out of memory";
    }
    if (!r) {
        if (err)
            *err = why;
        return NULL;
    }
    /* From the loop, not from here: no callback runs before the caller has r. */
    for (int k = 0; k < 2; k++)
        sse_timer_start(loop, &r->conn[k].retry, 0, 0);
    return r;
}

void sse_redis_free(sse_redis *r)
{
    if (!r || r->closing)
        return;
    r->closing = 1;
    r->depth++;
    for (int k = 0; k < 2; k++) {
        rconn *c = &r->conn[k];
        sse_timer_stop(r->loop, &c->retry);
        sse_timer_stop(r->loop, &c->deadline);
        sse_timer_stop(r->loop, &c->flush);
        conn_drop(c, "closed");     /* its pending replies: finish with "closed" */
    }
    rcmd *q;
    while ((q = refused_pop(r)))
        finish(q, NULL, "closed");
    sse_timer_stop(r->loop, &r->deliver);
    topics_clear(r);
    r->depth--;
    /* Inside one of our callbacks the loop's batch may still hold an event of one of our
     * watches, and hiredis may still be running the callbacks of the context it was in. */
    if (r->depth > 0)
        sse_timer_start(r->loop, &r->reap, 0, 0);
    else
        release(r);
}

int sse_redis_up(const sse_redis *r)
{
    return !r->closing && r->conn[CONN_CMD].ready && r->conn[CONN_SUB].ready;
}

static rcmd *new_cmd(sse_redis *r, sse_redis_cb cb, void *cbud, size_t extra)
{
    rcmd *q = calloc(1, sizeof *q + extra);
    if (!q)
        return NULL;
    q->r = r;
    q->cb = cb;
    q->ud = cbud;
    r->pending++;
    return q;
}

int sse_redis_command(sse_redis *r, sse_redis_cb cb, void *cbud,
                      int argc, const char **argv, const size_t *argvlen)
{
    if (r->closing)
        return -ESHUTDOWN;
    if (argc < 1 || !argv)
        return -EINVAL;
    rcmd *q = new_cmd(r, cb, cbud, 0);
    if (!q)
        return -ENOMEM;
    rconn *c = &r->conn[CONN_CMD];
    if (!c->ready || redisAsyncCommandArgv(c->ac, on_cmd_reply, q, argc, argv, argvlen) != REDIS_OK)
        refuse(r, q, "redis unavailable");
    return 0;
}

static int send_eval(redisAsyncContext *ac, rcmd *q, int with_text)
{
    q->av[0] = with_text ? "EVAL" : "EVALSHA";
    q->al[0] = strlen(q->av[0]);
    q->av[1] = with_text ? q->script->text : q->script->sha;
    q->al[1] = with_text ? q->script->len : 40;
    return redisAsyncCommandArgv(ac, on_cmd_reply, q, q->argc, q->av, q->al);
}

int sse_redis_eval(sse_redis *r, sse_redis_script *s, sse_redis_cb cb, void *cbud,
                   int nkeys, int argc, const char **argv, const size_t *argvlen)
{
    if (r->closing)
        return -ESHUTDOWN;
    if (!s || argc < 0 || nkeys < 0 || nkeys > argc || (argc && !argv) || argc > 0x7ffffff0)
        return -EINVAL;
    /* The arguments are kept for the EVAL retry: one block holds the argv, the lengths,
     * the nkeys digits and the bytes. */
    size_t n = (size_t)argc + 3, bytes = 0;
    for (int i = 0; i < argc; i++)
        bytes += argvlen ? argvlen[i] : strlen(argv[i]);
    rcmd *q = new_cmd(r, cb, cbud, n * (sizeof(char *) + sizeof(size_t)) + 16 + bytes);
    if (!q)
        return -ENOMEM;
    q->av = (const char **)(q + 1);
    q->al = (size_t *)(q->av + n);
    char *p = (char *)(q->al + n);
    q->argc = (int)n;
    q->script = s;
    s->refs++;
    q->al[2] = (size_t)snprintf(p, 16, "%d", nkeys);
    q->av[2] = p;
    p += 16;
    for (int i = 0; i < argc; i++) {
        size_t len = argvlen ? argvlen[i] : strlen(argv[i]);
        memcpy(p, argv[i], len);
        q->av[i + 3] = p;
        q->al[i + 3] = len;
        p += len;
    }
    rconn *c = &r->conn[CONN_CMD];
    if (!c->ready || send_eval(c->ac, q, 0) != REDIS_OK)
        refuse(r, q, "redis unavailable");
    return 0;
}

int sse_redis_subscribe(sse_redis *r, const char *topic, size_t len)
{
    if (r->closing)
        return -ESHUTDOWN;
    if (!topic && len)
        return -EINVAL;
    int rc = topic_add(r, topic ? topic : "", len);
    if (rc <= 0)
        return rc;
    /* Not yet connected: the restore at connect sends it with the others. */
    rconn *c = &r->conn[CONN_SUB];
    if (c->connected)
        redisAsyncCommand(c->ac, on_sub_reply, c, "SUBSCRIBE %b", topic ? topic : "", len);
    return 0;
}

int sse_redis_unsubscribe(sse_redis *r, const char *topic, size_t len)
{
    if (r->closing)
        return -ESHUTDOWN;
    if (!topic && len)
        return -EINVAL;
    if (!topic_remove(r, topic ? topic : "", len))
        return 0;
    rconn *c = &r->conn[CONN_SUB];
    if (c->connected)   /* refused by hiredis when it is not in subscribe mode: nothing to undo */
        redisAsyncCommand(c->ac, on_sub_reply, c, "UNSUBSCRIBE %b", topic ? topic : "", len);
    return 0;
}

size_t sse_redis_pending(const sse_redis *r) { return r->pending; }
size_t sse_redis_topics(const sse_redis *r) { return r->ntopics; }
