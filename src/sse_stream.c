/* sse_stream: a client's event stream and its states (see sse_stream.h for the diagram).
 * Every state change goes through set_state, which checks it against `legal` (asserted
 * in debug builds) and does what the new state means for the lists, the heartbeat and
 * the queue, so no other code flips a stream's state by hand. */
#include "sse_stream.h"
#include "sse_gzip.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

struct sse_stream {
    sse_streams     *ss;
    sse_stream_state state;
    void            *conn;          /* the server's handle; NULL once COMPLETED */
    int              fd;            /* the connection's socket (not ours to close) */
    int              refs;          /* the response's, the binding's, and one per list */
    sse_queue        q;
    unsigned         suspended : 1; /* the server suspended it and has not resumed it */
    unsigned         on_resume : 1; /* on ss->to_resume */
    unsigned         on_ready : 1;  /* on ss->ready */
    unsigned         want_drain : 1;
    unsigned         counted : 1;   /* started: in ss->counts.live until COMPLETED */
    size_t           low_water;
    sse_timer        heartbeat;
    unsigned         heartbeat_ms;
    const char      *heartbeat_text;
    sse_gzip        *gz;            /* NULL: the body is not compressed */
    int              gz_finished;   /* the gzip trailer is out */
    uint64_t         last_write;
    sse_stream      *prev, *next;   /* ss->live */
    sse_stream      *resume_next, *ready_next, *closed_next;
    void            *ud;
    char             peer[56];
};

/* legal[from][to]: the only changes set_state makes. */
static const unsigned char legal[4][4] = {
    /* to:            OPEN CLOSING DEAD COMPLETED */
    /* OPEN      */ {  0,     1,     1,      1 },
    /* CLOSING   */ {  0,     0,     1,      1 },
    /* DEAD      */ {  0,     0,     0,      1 },
    /* COMPLETED */ {  0,     0,     0,      0 },
};

static void unref(sse_stream *st)
{
    if (--st->refs > 0)
        return;
    sse_queue_clear(&st->q);
    sse_gzip_free(st->gz);
    free(st);
}

/* Something new for a suspended client: the stream goes at the end of the resume list
 * (first woken, first sent: a big batch sent in slices never starves its tail). */
static void wake(sse_stream *st)
{
    if (st->suspended && st->conn && !st->on_resume) {
        sse_streams *ss = st->ss;
        st->on_resume = 1;
        st->refs++;
        st->resume_next = NULL;
        if (ss->to_resume)
            ss->to_resume_tail->resume_next = st;
        else
            ss->to_resume = st;
        ss->to_resume_tail = st;
        ss->to_resume_n++;
    }
}

static void defer_ready(sse_stream *st)
{
    if (st->on_ready || st->state == SSE_STREAM_COMPLETED)
        return;
    st->on_ready = 1;
    st->refs++;
    st->ready_next = st->ss->ready;
    st->ss->ready = st;
}

static void set_state(sse_stream *st, sse_stream_state to)
{
    assert(legal[st->state][to]);
    (void)legal;                  /* read by the assertion only */
    sse_streams *ss = st->ss;
    st->state = to;
    switch (to) {
    case SSE_STREAM_OPEN:
        break;
    case SSE_STREAM_CLOSING:
        wake(st);
        break;
    case SSE_STREAM_DEAD:
        sse_queue_clear(&st->q);
        /* A client that stopped reading blocks the server in a send, so the reader is
         * never called again: shut the socket down, and the next send fails and closes
         * the connection. A suspended one is resumed, its reader ends the body, and the
         * final chunk fails to go out: the client sees a break (and reconnects). */
        if (st->fd >= 0)
            shutdown(st->fd, SHUT_RDWR);
        wake(st);
        break;
    case SSE_STREAM_COMPLETED:
        sse_timer_stop(ss->loop, &st->heartbeat);
        if (st->counted)
            ss->counts.live--;
        st->counted = 0;
        if (st->prev)
            st->prev->next = st->next;
        else
            ss->live = st->next;
        if (st->next)
            st->next->prev = st->prev;
        st->prev = st->next = NULL;
        st->conn = NULL;
        st->fd = -1;
        st->suspended = 0;
        sse_queue_clear(&st->q);
        st->refs++;
        st->closed_next = ss->closed;
        ss->closed = st;
        break;
    }
}

/* ---- the streams of a server ---- */

void sse_streams_init(sse_streams *ss, sse_loop *loop, const sse_stream_hooks *hooks,
                      size_t queue_limit)
{
    memset(ss, 0, sizeof *ss);
    ss->loop = loop;
    ss->hooks = *hooks;
    ss->queue_limit = queue_limit;
}

int sse_streams_deferred(const sse_streams *ss)
{
    return ss->ready || ss->closed;
}

void sse_streams_run_deferred(sse_streams *ss, int passes)
{
    for (int pass = 0; pass < passes && sse_streams_deferred(ss); pass++) {
        /* Detach each list first: hooks may add to them; those wait for the next pass. */
        sse_stream *st = ss->ready;
        ss->ready = NULL;
        while (st) {
            sse_stream *next = st->ready_next;
            st->on_ready = 0;
            if (st->state != SSE_STREAM_COMPLETED)
                ss->hooks.ready(ss->hooks.ud, st);
            unref(st);
            st = next;
        }
        st = ss->closed;
        ss->closed = NULL;
        while (st) {
            sse_stream *next = st->closed_next;
            ss->hooks.closed(ss->hooks.ud, st);
            unref(st);
            st = next;
        }
    }
}

void sse_streams_resume(sse_streams *ss, unsigned max,
                        void (*resume)(void *conn, void *ctx), void *ctx)
{
    for (unsigned n = 0; ss->to_resume && (max == 0 || n < max); n++) {
        sse_stream *st = ss->to_resume;
        ss->to_resume = st->resume_next;
        ss->to_resume_n--;
        st->on_resume = 0;
        if (st->suspended && st->conn) {
            st->suspended = 0;
            resume(st->conn, ctx);
        }
        unref(st);
    }
}

void sse_streams_end_all(sse_streams *ss)
{
    ss->ending = 1;
    for (sse_stream *st = ss->live; st; st = st->next) {
        if (st->state == SSE_STREAM_OPEN)
            set_state(st, SSE_STREAM_CLOSING);
        else
            wake(st);
    }
}

void sse_streams_wake_all(sse_streams *ss)
{
    for (sse_stream *st = ss->live; st; st = st->next)
        wake(st);
}

void sse_streams_free(sse_streams *ss)
{
    sse_gzip_twins_free(ss->twins);
    ss->twins = NULL;
}

/* ---- for the server ---- */

static int write_bytes(sse_stream *st, const char *p, size_t n);

static void on_heartbeat(sse_timer *t)
{
    sse_stream *st = container_of(t, sse_stream, heartbeat);
    sse_loop *loop = st->ss->loop;
    uint64_t idle = sse_loop_now(loop) - st->last_write;
    if (idle >= st->heartbeat_ms) {
        if (write_bytes(st, st->heartbeat_text, strlen(st->heartbeat_text)) == 0)
            st->ss->counts.heartbeats++;
        idle = 0;
    }
    if (st->state == SSE_STREAM_OPEN)
        sse_timer_start(loop, &st->heartbeat, st->heartbeat_ms - idle, 0);
}

sse_stream *sse_stream_new(sse_streams *ss, unsigned heartbeat_ms, const char *heartbeat,
                           int gzip, const char *peer)
{
    sse_stream *st = calloc(1, sizeof *st);
    if (!st)
        return NULL;
    if (gzip && !(st->gz = sse_gzip_new())) {
        free(st);
        return NULL;
    }
    st->ss = ss;
    st->state = SSE_STREAM_OPEN;
    st->refs = 2;
    st->fd = -1;
    st->heartbeat_ms = heartbeat_ms;
    st->heartbeat_text = heartbeat ? heartbeat : ":\n\n";
    st->last_write = sse_loop_now(ss->loop);
    sse_timer_init(&st->heartbeat, on_heartbeat);
    snprintf(st->peer, sizeof st->peer, "%s", peer ? peer : "");
    return st;
}

void sse_stream_started(sse_stream *st, void *conn, int fd, int peer_gone)
{
    sse_streams *ss = st->ss;
    st->conn = conn;
    st->fd = fd;
    st->next = ss->live;
    if (ss->live)
        ss->live->prev = st;
    ss->live = st;
    ss->counts.live++;
    ss->counts.started++;
    st->counted = 1;
    if (peer_gone)
        set_state(st, SSE_STREAM_DEAD);
    else if (st->heartbeat_ms)
        sse_timer_start(ss->loop, &st->heartbeat, st->heartbeat_ms, 0);
    defer_ready(st);
}

/* What a gzip stream has for the client now: what is queued, compressed (shared
 * chunks' twins spliced in), sync-flushed once per call so every event is readable on
 * arrival; and the gzip trailer once the stream is ending. Count, or -1 on error. */
static ssize_t gzip_take(sse_stream *st, char *buf, size_t max, int ending)
{
    sse_gzip *g = st->gz;
    while (sse_gzip_pending(g) < max) {
        size_t off;
        sse_chunk *c = sse_queue_peek(&st->q, &off);
        if (!c)
            break;
        int rc;
        if (c->frozen && off == 0 && c->len >= SSE_GZIP_SPLICE_MIN) {
            if (!st->ss->twins && !(st->ss->twins = sse_gzip_twins_new()))
                return -1;
            rc = sse_gzip_splice(g, st->ss->twins, c);
        } else {
            rc = sse_gzip_write(g, c->data + off, c->len - off);
        }
        if (rc != 0)
            return -1;
        sse_queue_pop(&st->q);
    }
    if (sse_gzip_flush(g) != 0)
        return -1;
    if (!sse_gzip_pending(g) && ending && !st->gz_finished) {
        st->gz_finished = 1;
        if (sse_gzip_finish(g) != 0)
            return -1;
    }
    return (ssize_t)sse_gzip_read(g, buf, max);
}

ssize_t sse_stream_take(sse_stream *st, char *buf, size_t max)
{
    /* A dead stream ends as a finished one would (see docs/libmicrohttpd.md, "Closed but
     * not cleaned up"): its socket is shut down, so the final chunk does not arrive. */
    if (st->state == SSE_STREAM_DEAD)
        return SSE_TAKE_END;
    int ending = st->state == SSE_STREAM_CLOSING || st->ss->ending;
    ssize_t n = st->gz ? gzip_take(st, buf, max, ending)
                       : (ssize_t)sse_queue_read(&st->q, buf, max);
    if (n < 0)
        return SSE_TAKE_ERROR;
    if (n > 0) {
        st->ss->counts.bytes += (uint64_t)n;
        if (st->want_drain && st->q.bytes <= st->low_water) {
            st->want_drain = 0;
            defer_ready(st);
        }
        return n;
    }
    return ending ? SSE_TAKE_END : 0;
}

void sse_stream_suspended(sse_stream *st) { st->suspended = 1; }

void sse_stream_hangup(sse_stream *st)
{
    if (st->state == SSE_STREAM_OPEN || st->state == SSE_STREAM_CLOSING)
        set_state(st, SSE_STREAM_DEAD);
}

void sse_stream_completed(sse_stream *st)
{
    if (st->state != SSE_STREAM_COMPLETED)
        set_state(st, SSE_STREAM_COMPLETED);
}

void sse_stream_response_done(sse_stream *st) { unref(st); }
void *sse_stream_conn(const sse_stream *st) { return st->conn; }

/* ---- for the binding and channels ---- */

int sse_stream_open(const sse_stream *st) { return st->state == SSE_STREAM_OPEN; }
size_t sse_stream_pending(const sse_stream *st) { return st->q.bytes; }
const char *sse_stream_peer(const sse_stream *st) { return st->peer; }
void *sse_stream_ud(const sse_stream *st) { return st->ud; }
void sse_stream_set_ud(sse_stream *st, void *ud) { st->ud = ud; }

/* After bytes were queued: drop a client past queue_limit, else wake it. */
static int after_write(sse_stream *st)
{
    sse_streams *ss = st->ss;
    ss->wrote = 1;
    st->last_write = sse_loop_now(ss->loop);
    if (st->q.bytes > ss->queue_limit) {
        if (ss->hooks.log) {
            char msg[160];
            snprintf(msg, sizeof msg, "dropped slow client %s: %zu bytes pending (queue_limit %zu)",
                     st->peer, st->q.bytes, ss->queue_limit);
            ss->hooks.log(ss->hooks.ud, SSE_LOG_WARN, msg);
        }
        ss->counts.dropped_slow++;
        set_state(st, SSE_STREAM_DEAD);
        return -EPIPE;
    }
    wake(st);
    return 0;
}

/* Copies n bytes into the queue (a heartbeat, or sse_stream_write's event). */
static int write_bytes(sse_stream *st, const char *p, size_t n)
{
    if (st->state != SSE_STREAM_OPEN)
        return -EPIPE;
    char *dst = sse_queue_reserve(&st->q, n);
    if (!dst)
        return -ENOMEM;
    memcpy(dst, p, n);
    sse_queue_commit(&st->q, n);
    return after_write(st);
}

char *sse_stream_reserve(sse_stream *st, size_t n)
{
    return st->state == SSE_STREAM_OPEN ? sse_queue_reserve(&st->q, n) : NULL;
}

/* An event (or comment) queued: counted for app:stats() when it stays queued. */
static int counted(sse_stream *st, int rc)
{
    if (rc == 0)
        st->ss->counts.events++;
    return rc;
}

int sse_stream_commit(sse_stream *st, size_t n)
{
    sse_queue_commit(&st->q, n);
    return counted(st, after_write(st));
}

int sse_stream_write(sse_stream *st, const char *p, size_t n)
{
    return counted(st, write_bytes(st, p, n));
}

int sse_stream_push(sse_stream *st, sse_chunk *c)
{
    if (st->state != SSE_STREAM_OPEN)
        return -EPIPE;
    if (sse_queue_push(&st->q, c) != 0)
        return -ENOMEM;
    return counted(st, after_write(st));
}

void sse_stream_want_drain(sse_stream *st, size_t low_water)
{
    st->low_water = low_water;
    if (st->q.bytes <= low_water) {
        st->want_drain = 0;
        defer_ready(st);
    } else {
        st->want_drain = 1;
    }
}

void sse_stream_close(sse_stream *st)
{
    if (st->state == SSE_STREAM_OPEN)
        set_state(st, SSE_STREAM_CLOSING);
}

void sse_stream_abort(sse_stream *st)
{
    if (st->state == SSE_STREAM_OPEN || st->state == SSE_STREAM_CLOSING)
        set_state(st, SSE_STREAM_DEAD);
}

void sse_stream_release(sse_stream *st)
{
    st->ud = NULL;
    unref(st);
}
