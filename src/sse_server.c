/* sse_server: libmicrohttpd in external-epoll mode with suspend/resume.
 *
 * Life of a stream: the access handler answers with a callback response whose reader
 * copies queued bytes; with nothing queued the reader suspends the connection, and the
 * next write resumes it. MHD_run is called again after resumes: MHD 0.9.75's
 * MHD_get_timeout ignores pending resumes (see ../shared/notes/libmicrohttpd.md §1).
 * Hang-ups are seen through our own EPOLLRDHUP watch on each stream's socket, because
 * MHD does not read while it sends a body (§3). Lua never runs inside the reader: hooks
 * that may run Lua are deferred to after MHD_run.
 *
 * Resumes are batched, and the batches paced by their own cost: wake() only lists the
 * stream; the list is resumed (and sent) in one go at the end of a loop turn, and after a
 * batch that took d microseconds the next one waits until d (at most 2 ms) has passed. An idle
 * server sends at once; a busy one (a fan-out that takes milliseconds while publishes keep
 * coming) keeps accepting publishes meanwhile, so each send() carries every event that
 * queued up — as a goroutine-per-client server does under load — and the cost per
 * delivery falls as the load rises, for at most SSE_BATCH_WAIT_MAX_US of added latency.
 */
#include "sse_server.h"
#include "sse_buf.h"
#include "sse_gzip.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

/* What an HTTP/1.0 client (unchunked body) gets per reader call at most. */
#define SSE_STREAM_BLOCK 4096
/* Descriptors kept free for the listening socket, epoll, files the app opens... */
#define SSE_FD_RESERVE 64
/* Bounds on the passes of one sse_server_run (the rest waits for the next turn). */
#define SSE_MHD_PASSES 16
#define SSE_DEFER_PASSES 4
/* The longest a batch of sends waits after the previous one. Measured on fan-out to 1,000
 * subscribers (bench/): unbounded, publishers run far ahead and latency grows without
 * limit; 2 ms gave 4x the deliveries per second at a fifth of the CPU per delivery with
 * the latency of unbatched sends. */
#define SSE_BATCH_WAIT_MAX_US 2000
/* Requests that queued events (publishes) allowed ahead of the next batch; see
 * sse_request_respond. Measured on fan-out to 1,000 and 100 subscribers (bench/): with
 * 32, 1.1M deliveries/s, p99 13 ms; 8: 1.65M/s, p99 8-9 ms; 4: 1.0M/s, p99 7-8 ms. */
#define SSE_UNSENT_MAX 8

enum { SSE_LOG_DEBUG = 3 };

struct sse_server {
    sse_loop          *loop;
    sse_server_config  cfg;
    char               host[INET6_ADDRSTRLEN];
    struct MHD_Daemon *mhd;
    int                listen_fd;
    int                port;
    sse_watch          mhd_watch;      /* MHD's own epoll fd, nested in ours */
    int                resume_pending; /* a resume since the last MHD_run */
    sse_stream        *to_resume;      /* suspended streams with something new to send */
    sse_request       *current;        /* the request whose hook is running, or NULL */
    sse_request       *held;           /* answers held until the next batch has gone out */
    unsigned           unsent;         /* requests that wrote to streams since the last batch */
    int64_t            resume_at;      /* the next batch of resumes not before (us) */
    int                shutting_down;
    char               tls_error[256]; /* MHD's last message while starting */
    sse_gzip_twins    *twins;          /* compresses shared chunks for gzip streams */
    sse_stream        *streams;        /* streams whose connection is alive */
    sse_stream        *ready;          /* deferred stream_ready hooks */
    sse_stream        *closed;         /* deferred stream_closed hooks */
};

struct sse_request {
    sse_server            *srv;
    struct MHD_Connection *conn;
    const char            *method;
    const char            *path;
    sse_buf                body;
    int                    has_body;
    int                    too_large;
    int                    answered;
    int                    wrote;       /* its hook queued bytes on streams (a publish) */
    unsigned               held_status;
    struct MHD_Response   *held;        /* its answer, held by backpressure */
    sse_request           *held_next;
    sse_stream            *stream;
    char                   peer[INET6_ADDRSTRLEN + 8];
};

struct sse_stream {
    sse_server            *srv;
    struct MHD_Connection *conn;        /* NULL once MHD has completed the response */
    int                    refs;        /* the response's and the binding's */
    sse_queue              q;
    unsigned               suspended : 1; /* we suspended it and have not resumed it */
    unsigned               closing : 1;   /* end with the final chunk once drained */
    unsigned               dead : 1;      /* client gone or dropped: end with an error */
    unsigned               completed : 1; /* MHD is done with the connection */
    unsigned               in_ready : 1;
    unsigned               in_resume : 1;  /* on srv->to_resume */
    unsigned               want_drain : 1;
    size_t                 low_water;
    int                    fd;          /* the connection's socket (owned by MHD) */
    sse_watch              hup;         /* fd = -1 when not watched */
    sse_timer              heartbeat;
    unsigned               heartbeat_ms;
    const char            *heartbeat_text;
    sse_gzip              *gz;          /* NULL: the body is not compressed */
    int                    gz_finished; /* the gzip trailer is out */
    uint64_t               last_write;
    sse_stream            *prev, *next; /* srv->streams */
    sse_stream            *ready_next;
    sse_stream            *resume_next;
    sse_stream            *closed_next;
    void                  *ud;
    char                   peer[INET6_ADDRSTRLEN + 8];
};

static void slog(sse_server *srv, int level, const char *fmt, ...)
{
    if (!srv->cfg.hooks->log)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    srv->cfg.hooks->log(srv->cfg.ud, level, msg);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    sse_server *srv = cls;
    if (!srv->cfg.hooks->log)
        return;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* MHD reports every reader abort (our way of closing a dead client) as an error:
     * keep its messages out of the default log. */
    if (!srv->mhd)   /* while starting: keep it, it may explain a failure */
        snprintf(srv->tls_error, sizeof srv->tls_error, "%.200s", msg);
    srv->cfg.hooks->log(srv->cfg.ud, SSE_LOG_DEBUG, msg);
}

/* ---- deferred hooks ---- */

static void defer_ready(sse_stream *st)
{
    if (st->in_ready || st->completed)
        return;
    st->in_ready = 1;
    st->refs++;
    st->ready_next = st->srv->ready;
    st->srv->ready = st;
}

static void stream_unref(sse_stream *st)
{
    if (--st->refs > 0)
        return;
    sse_queue_clear(&st->q);
    sse_gzip_free(st->gz);
    free(st);
}

static void run_deferred(sse_server *srv)
{
    /* Detach each list first: hooks may add to them; those wait for the next pass. */
    sse_stream *st = srv->ready;
    srv->ready = NULL;
    while (st) {
        sse_stream *next = st->ready_next;
        st->in_ready = 0;
        if (!st->completed)
            srv->cfg.hooks->stream_ready(srv->cfg.ud, st);
        stream_unref(st);
        st = next;
    }
    st = srv->closed;
    srv->closed = NULL;
    while (st) {
        sse_stream *next = st->closed_next;
        srv->cfg.hooks->stream_closed(srv->cfg.ud, st);
        stream_unref(st);
        st = next;
    }
}

/* ---- suspend / resume ---- */

/* Something new for the client: a suspended stream goes on the list of the next batch. */
static void wake(sse_stream *st)
{
    if (st->suspended && st->conn && !st->in_resume) {
        st->in_resume = 1;
        st->refs++;
        st->resume_next = st->srv->to_resume;
        st->srv->to_resume = st;
    }
}

static void resume_listed(sse_server *srv)
{
    sse_stream *st = srv->to_resume;
    srv->to_resume = NULL;
    while (st) {
        sse_stream *next = st->resume_next;
        st->in_resume = 0;
        if (st->suspended && st->conn) {
            st->suspended = 0;
            MHD_resume_connection(st->conn);
            srv->resume_pending = 1;
        }
        stream_unref(st);
        st = next;
    }
}

/* Is MHD asking to be run again at once? After a resume it calls the reader in one
 * MHD_run and may send the bytes only in the next (notes §1.4). */
static int mhd_wants_more(sse_server *srv)
{
    MHD_UNSIGNED_LONG_LONG ms;
    return MHD_get_timeout(srv->mhd, &ms) == MHD_YES && ms == 0;
}

static void drive_mhd(sse_server *srv)
{
    int passes = 0;
    do {
        srv->resume_pending = 0;
        MHD_run(srv->mhd);
    } while ((srv->resume_pending || mhd_wants_more(srv)) && ++passes < SSE_MHD_PASSES);
}

/* The batch went out: answer the requests held back (their next MHD_run does it). */
static void release_held(sse_server *srv)
{
    srv->unsent = 0;
    for (sse_request *r = srv->held; r; r = r->held_next) {
        MHD_resume_connection(r->conn);
        srv->resume_pending = 1;
    }
    srv->held = NULL;
}

/* Resumes and sends the listed streams, if the pacing allows it now. */
static void send_batch(sse_server *srv)
{
    if ((!srv->to_resume && !srv->held) || !srv->mhd)
        return;
    int64_t start = sse_loop_now_us();
    if (start < srv->resume_at && !srv->shutting_down)
        return;
    resume_listed(srv);
    drive_mhd(srv);
    release_held(srv);
    int64_t end = sse_loop_now_us();
    int64_t d = end - start;
    srv->resume_at = end + (d < SSE_BATCH_WAIT_MAX_US ? d : SSE_BATCH_WAIT_MAX_US);
}

static void after_read(sse_stream *st)
{
    if (st->want_drain && st->q.bytes <= st->low_water) {
        st->want_drain = 0;
        defer_ready(st);
    }
}

/* What a gzip stream has for the client now: what is queued, compressed (shared
 * chunks' twins spliced in), sync-flushed once per call so every event is readable on
 * arrival; and the gzip trailer once the stream is ending. Count, or -1 on error. */
static ssize_t gzip_take(sse_stream *st, char *buf, size_t max)
{
    sse_gzip *g = st->gz;
    while (sse_gzip_pending(g) < max) {
        size_t off;
        sse_chunk *c = sse_queue_peek(&st->q, &off);
        if (!c)
            break;
        int rc;
        if (c->frozen && off == 0 && c->len >= SSE_GZIP_SPLICE_MIN) {
            if (!st->srv->twins && !(st->srv->twins = sse_gzip_twins_new()))
                return -1;
            rc = sse_gzip_splice(g, st->srv->twins, c);
        } else {
            rc = sse_gzip_write(g, c->data + off, c->len - off);
        }
        if (rc != 0)
            return -1;
        sse_queue_pop(&st->q);
    }
    if (sse_gzip_flush(g) != 0)
        return -1;
    if (!sse_gzip_pending(g) && (st->closing || st->srv->shutting_down) && !st->gz_finished) {
        st->gz_finished = 1;
        if (sse_gzip_finish(g) != 0)
            return -1;
    }
    return (ssize_t)sse_gzip_read(g, buf, max);
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    sse_stream *st = cls;
    if (st->dead)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    ssize_t n = st->gz ? gzip_take(st, buf, max) : (ssize_t)sse_queue_read(&st->q, buf, max);
    if (n < 0)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    if (n > 0) {
        /* Return data without suspending: suspending now would hold these bytes
         * back until the next resume. */
        after_read(st);
        return n;
    }
    if (st->closing || st->srv->shutting_down)
        return MHD_CONTENT_READER_END_OF_STREAM;
    MHD_suspend_connection(st->conn);
    st->suspended = 1;
    return 0;
}

static void stream_response_free(void *cls)
{
    stream_unref(cls);
}

static void on_hangup(sse_watch *w, uint32_t events)
{
    sse_stream *st = container_of(w, sse_stream, hup);
    /* Level-triggered: stop watching at once or this fires every turn. */
    sse_loop_unwatch(st->srv->loop, &st->hup);
    st->hup.fd = -1;
    st->dead = 1;
    wake(st);
}

static void on_heartbeat(sse_timer *t)
{
    sse_stream *st = container_of(t, sse_stream, heartbeat);
    uint64_t now = sse_loop_now(st->srv->loop);
    uint64_t idle = now - st->last_write;
    if (idle >= st->heartbeat_ms) {
        sse_stream_write(st, st->heartbeat_text, strlen(st->heartbeat_text));
        idle = 0;
    }
    if (sse_stream_open(st))
        sse_timer_start(st->srv->loop, &st->heartbeat, st->heartbeat_ms - idle, 0);
}

static void stream_completed(sse_stream *st)
{
    sse_server *srv = st->srv;
    if (st->hup.fd >= 0) {
        /* Before MHD closes the fd: its number will be reused. */
        sse_loop_unwatch(srv->loop, &st->hup);
        st->hup.fd = -1;
    }
    sse_timer_stop(srv->loop, &st->heartbeat);
    if (st->prev)
        st->prev->next = st->next;
    else
        srv->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    st->prev = st->next = NULL;
    st->conn = NULL;
    st->fd = -1;
    st->completed = 1;
    st->suspended = 0;
    sse_queue_clear(&st->q);
    st->refs++;
    st->closed_next = srv->closed;
    srv->closed = st;
}

/* ---- requests ---- */

static void peer_name(struct MHD_Connection *conn, char *out, size_t outlen)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    out[0] = '\0';
    if (!ci || !ci->client_addr)
        return;
    const struct sockaddr *sa = ci->client_addr;
    char ip[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        snprintf(out, outlen, "%s:%u", ip, ntohs(a->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        snprintf(out, outlen, "[%s]:%u", ip, ntohs(a->sin6_port));
    }
}

static int add_headers(struct MHD_Response *resp, const sse_header *h, size_t nh)
{
    for (size_t i = 0; i < nh; i++)
        if (MHD_add_response_header(resp, h[i].name, h[i].value) != MHD_YES)
            return -1;
    return 0;
}

static int queue_plain(sse_request *r, int status, const char *body)
{
    static const sse_header h[] = { { "Content-Type", "text/plain; charset=utf-8" } };
    return sse_request_respond(r, status, h, 1, body, strlen(body));
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload, size_t *upload_size, void **con_cls)
{
    sse_server *srv = cls;
    sse_request *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        r->srv = srv;
        r->conn = conn;
        peer_name(conn, r->peer, sizeof r->peer);
        *con_cls = r;
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > srv->cfg.max_body) {
            /* Answer before the body is read: MHD then closes the connection. */
            queue_plain(r, 413, "request body too large\n");
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!r->too_large && !r->answered) {
            if (*upload_size > srv->cfg.max_body - r->body.len) {
                r->too_large = 1;
                sse_buf_free(&r->body);
            } else if (sse_buf_append(&r->body, upload, *upload_size) != 0) {
                return MHD_NO;
            }
            r->has_body = 1;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->held) {               /* resumed after the batch: answer now */
        MHD_queue_response(conn, r->held_status, r->held);
        MHD_destroy_response(r->held);
        r->held = NULL;
        return MHD_YES;
    }
    if (r->answered)
        return MHD_YES;
    if (r->too_large) {
        queue_plain(r, 413, "request body too large\n");
        return MHD_YES;
    }
    r->method = method;
    r->path = url;
    srv->current = r;
    srv->cfg.hooks->request(srv->cfg.ud, r);
    srv->current = NULL;
    if (r->wrote)
        srv->unsent++;
    if (!r->answered)
        queue_plain(r, 500, "internal server error\n");
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    sse_request *r = *con_cls;
    if (!r)
        return;
    if (r->stream)
        stream_completed(r->stream);
    if (r->held)
        MHD_destroy_response(r->held);
    sse_buf_free(&r->body);
    free(r);
    *con_cls = NULL;
}

const char *sse_request_method(const sse_request *r) { return r->method; }
const char *sse_request_path(const sse_request *r) { return r->path; }
const char *sse_request_peer(const sse_request *r) { return r->peer; }

const char *sse_request_body(const sse_request *r, size_t *len)
{
    *len = r->body.len;
    return r->has_body ? (r->body.data ? r->body.data : "") : NULL;
}

struct kv_ctx { sse_kv_cb cb; void *ud; };

static enum MHD_Result kv_iter(void *cls, enum MHD_ValueKind kind, const char *key,
                               size_t key_len, const char *value, size_t value_len)
{
    struct kv_ctx *ctx = cls;
    ctx->cb(ctx->ud, key, value ? value : "", value ? value_len : 0);
    return MHD_YES;
}

void sse_request_headers(sse_request *r, sse_kv_cb cb, void *ud)
{
    struct kv_ctx ctx = { cb, ud };
    MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, kv_iter, &ctx);
}

void sse_request_query(sse_request *r, sse_kv_cb cb, void *ud)
{
    struct kv_ctx ctx = { cb, ud };
    MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, kv_iter, &ctx);
}

int sse_request_respond(sse_request *r, int status, const sse_header *h, size_t nh,
                        const char *body, size_t len)
{
    if (r->answered)
        return -1;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)(body ? body : ""), MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return -1;
    if (add_headers(resp, h, nh) != 0) {
        MHD_destroy_response(resp);
        return -1;
    }
    r->answered = 1;
    sse_server *srv = r->srv;
    /* Backpressure on publishers: a request that queued events for streams while more
     * than SSE_UNSENT_MAX such requests wait for the next batch is answered only once that
     * batch has gone out. A publisher can then run at most that far ahead of delivery, so
     * latency stays bounded while each batch still carries many events. */
    if (r->wrote && srv->unsent >= SSE_UNSENT_MAX && srv->current == r) {
        r->held = resp;
        r->held_status = (unsigned)status;
        r->held_next = srv->held;
        srv->held = r;
        MHD_suspend_connection(r->conn);
        return 0;
    }
    enum MHD_Result ok = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ok == MHD_YES ? 0 : -1;
}

static int has_header(const sse_header *h, size_t nh, const char *name)
{
    for (size_t i = 0; i < nh; i++)
        if (strcasecmp(h[i].name, name) == 0)
            return 1;
    return 0;
}

sse_stream *sse_request_stream(sse_request *r, const sse_stream_opts *o)
{
    const sse_header *h = o->headers;
    size_t nh = o->nheaders;
    sse_server *srv = r->srv;
    if (r->answered)
        return NULL;
    sse_stream *st = calloc(1, sizeof *st);
    if (!st)
        return NULL;
    st->srv = srv;
    st->refs = 2;
    st->hup.fd = -1;
    st->fd = -1;
    st->heartbeat_ms = o->heartbeat_ms;
    st->heartbeat_text = o->heartbeat ? o->heartbeat : ":\n\n";
    if (o->gzip && !(st->gz = sse_gzip_new())) {
        free(st);
        return NULL;
    }
    st->last_write = sse_loop_now(srv->loop);
    sse_timer_init(&st->heartbeat, on_heartbeat);
    memcpy(st->peer, r->peer, sizeof st->peer);

    struct MHD_Response *resp = MHD_create_response_from_callback(
        MHD_SIZE_UNKNOWN, SSE_STREAM_BLOCK, stream_reader, st, stream_response_free);
    if (!resp) {
        sse_gzip_free(st->gz);
        free(st);
        return NULL;
    }
    int bad = add_headers(resp, h, nh);
    if (!bad && !has_header(h, nh, "Content-Type"))
        bad = MHD_add_response_header(resp, "Content-Type", "text/event-stream") != MHD_YES;
    if (!bad && !has_header(h, nh, "Cache-Control"))
        bad = MHD_add_response_header(resp, "Cache-Control", "no-cache") != MHD_YES;
    /* Tells nginx (and proxies that copy it) not to buffer the stream. */
    if (!bad)
        bad = MHD_add_response_header(resp, "X-Accel-Buffering", "no") != MHD_YES;
    enum MHD_Result ok = bad ? MHD_NO : MHD_queue_response(r->conn, MHD_HTTP_OK, resp);
    r->answered = 1;
    st->conn = r->conn;
    MHD_destroy_response(resp);   /* runs stream_response_free now if not queued */
    if (ok != MHD_YES) {
        st->conn = NULL;
        stream_unref(st);         /* the binding's reference: nobody else has it */
        return NULL;
    }
    r->stream = st;

    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) {
        st->fd = ci->connect_fd;
        st->hup.fd = ci->connect_fd;
        st->hup.cb = on_hangup;
        if (sse_loop_watch(srv->loop, &st->hup, EPOLLRDHUP) != 0)
            st->hup.fd = -1;
    }
    st->next = srv->streams;
    if (srv->streams)
        srv->streams->prev = st;
    srv->streams = st;
    if (o->heartbeat_ms)
        sse_timer_start(srv->loop, &st->heartbeat, o->heartbeat_ms, 0);
    defer_ready(st);
    return st;
}

/* ---- streams ---- */

static int accepts(const sse_stream *st)
{
    return !st->completed && !st->dead && !st->closing;
}

int sse_stream_open(const sse_stream *st) { return accepts(st); }
size_t sse_stream_pending(const sse_stream *st) { return st->q.bytes; }
const char *sse_stream_peer(const sse_stream *st) { return st->peer; }
void *sse_stream_ud(const sse_stream *st) { return st->ud; }
void sse_stream_set_ud(sse_stream *st, void *ud) { st->ud = ud; }

static void drop(sse_stream *st)
{
    slog(st->srv, SSE_LOG_WARN,
         "dropped slow client %s: %zu bytes pending (queue_limit %zu)",
         st->peer, st->q.bytes, st->srv->cfg.queue_limit);
    sse_stream_abort(st);
}

static int after_write(sse_stream *st)
{
    if (st->srv->current)
        st->srv->current->wrote = 1;
    st->last_write = sse_loop_now(st->srv->loop);
    if (st->q.bytes > st->srv->cfg.queue_limit) {
        drop(st);
        return -EPIPE;
    }
    wake(st);
    return 0;
}

char *sse_stream_reserve(sse_stream *st, size_t n)
{
    return accepts(st) ? sse_queue_reserve(&st->q, n) : NULL;
}

int sse_stream_commit(sse_stream *st, size_t n)
{
    sse_queue_commit(&st->q, n);
    return after_write(st);
}

int sse_stream_write(sse_stream *st, const char *p, size_t n)
{
    if (!accepts(st))
        return -EPIPE;
    char *dst = sse_queue_reserve(&st->q, n);
    if (!dst)
        return -ENOMEM;
    memcpy(dst, p, n);
    return sse_stream_commit(st, n);
}

int sse_stream_push(sse_stream *st, sse_chunk *c)
{
    if (!accepts(st))
        return -EPIPE;
    if (sse_queue_push(&st->q, c) != 0)
        return -ENOMEM;
    return after_write(st);
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
    if (st->completed)
        return;
    st->closing = 1;
    wake(st);
}

void sse_stream_abort(sse_stream *st)
{
    if (st->completed)
        return;
    st->dead = 1;
    sse_queue_clear(&st->q);
    /* A client that stopped reading blocks MHD in a send, so the reader (which would
     * return the error) is never called again: shut the socket down instead, and MHD's
     * next send fails and closes the connection. */
    if (!st->suspended && st->fd >= 0)
        shutdown(st->fd, SHUT_RDWR);
    wake(st);
}

void sse_stream_release(sse_stream *st)
{
    st->ud = NULL;
    stream_unref(st);
}

/* ---- the daemon ---- */

sse_server *sse_server_new(sse_loop *loop, const sse_server_config *cfg)
{
    sse_server *srv = calloc(1, sizeof *srv);
    if (!srv)
        return NULL;
    srv->loop = loop;
    srv->cfg = *cfg;
    snprintf(srv->host, sizeof srv->host, "%s", cfg->host ? cfg->host : "127.0.0.1");
    srv->cfg.host = srv->host;
    srv->listen_fd = -1;
    srv->mhd_watch.fd = -1;
    return srv;
}

static void on_mhd_ready(sse_watch *w, uint32_t events)
{
    /* Nothing to do here: sse_server_run calls MHD_run after every poll. */
}

static int open_listener(sse_server *srv, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof ss);
    const char *host = srv->host;
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)srv->cfg.port);
        sslen = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)srv->cfg.port);
        sslen = sizeof *a6;
    } else {
        snprintf(err, errlen, "host '%s' is not a numeric IPv4 or IPv6 address", srv->host);
        return -EINVAL;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 || listen(fd, 4096) != 0)
        goto fail;
    sslen = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sslen);
    srv->port = ntohs(ss.ss_family == AF_INET ? a4->sin_port : a6->sin6_port);
    srv->listen_fd = fd;
    return 0;
fail:;
    int e = errno;
    if (fd >= 0)
        close(fd);
    snprintf(err, errlen, "%s port %d: %s", srv->host, srv->cfg.port, strerror(e));
    return -e;
}

/* Streams are long-lived: let the process hold as many sockets as the hard limit allows. */
static unsigned connection_limit(const sse_server *srv)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    unsigned fit = rl.rlim_cur > SSE_FD_RESERVE * 2 ? (unsigned)(rl.rlim_cur - SSE_FD_RESERVE) : 64;
    if (srv->cfg.max_connections && srv->cfg.max_connections < fit)
        return srv->cfg.max_connections;
    return fit;
}

int sse_server_listen(sse_server *srv, const char *tls_cert, const char *tls_key,
                      char *err, size_t errlen)
{
    if (srv->mhd) {
        snprintf(err, errlen, "already listening");
        return -EALREADY;
    }
    int tls = tls_cert && tls_key;
    if (tls && !MHD_is_feature_supported(MHD_FEATURE_TLS)) {
        snprintf(err, errlen, "this libmicrohttpd was built without TLS");
        return -ENOTSUP;
    }
    int rc = open_listener(srv, err, errlen);
    if (rc)
        return rc;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    /* A daemon is TLS or plain: the options are the same apart from the key pair. */
    struct MHD_OptionItem tls_opts[] = {
        { MHD_OPTION_HTTPS_MEM_CERT, 0, (void *)tls_cert },
        { MHD_OPTION_HTTPS_MEM_KEY, 0, (void *)tls_key },
        { MHD_OPTION_END, 0, NULL },
    };
    if (tls)
        flags |= MHD_USE_TLS;
    else
        tls_opts[0].option = MHD_OPTION_END;
    srv->tls_error[0] = '\0';
    srv->shutting_down = 0;
    srv->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_access, srv,
        MHD_OPTION_LISTEN_SOCKET, (MHD_socket)srv->listen_fd,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, srv->cfg.conn_memory,
        MHD_OPTION_CONNECTION_LIMIT, connection_limit(srv),
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_ARRAY, tls_opts,
        MHD_OPTION_END);
    if (!srv->mhd) {
        close(srv->listen_fd);
        srv->listen_fd = -1;
        if (tls)
            snprintf(err, errlen, "TLS: the certificate or key was refused%s%s",
                     srv->tls_error[0] ? ": " : "", srv->tls_error);
        else
            snprintf(err, errlen, "libmicrohttpd could not start on %s port %d", srv->host, srv->port);
        return tls ? -EINVAL : -EIO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(srv->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    srv->mhd_watch.fd = di->epoll_fd;
    srv->mhd_watch.cb = on_mhd_ready;
    rc = sse_loop_watch(srv->loop, &srv->mhd_watch, EPOLLIN);
    if (rc) {
        MHD_stop_daemon(srv->mhd);
        srv->mhd = NULL;
        close(srv->listen_fd);
        srv->listen_fd = -1;
        snprintf(err, errlen, "epoll: %s", strerror(-rc));
        return rc;
    }
    return 0;
}

int sse_server_port(const sse_server *srv) { return srv->port; }
int sse_server_listening(const sse_server *srv) { return srv->mhd != NULL; }

unsigned sse_server_connections(const sse_server *srv)
{
    if (!srv->mhd)
        return 0;
    const union MHD_DaemonInfo *di =
        MHD_get_daemon_info(srv->mhd, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
    return di ? di->num_connections : 0;
}

int64_t sse_server_timeout(const sse_server *srv)
{
    if (srv->ready || srv->closed || srv->resume_pending)
        return 0;
    if (!srv->mhd)
        return -1;
    int64_t t = -1;
    if (srv->to_resume || srv->held) {
        t = srv->resume_at - sse_loop_now_us();
        if (t <= 0)
            return 0;
    }
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(srv->mhd, &ms) == MHD_YES) {
        int64_t m = ms > 86400000ull ? 86400000000LL : (int64_t)ms * 1000;
        if (t < 0 || m < t)
            t = m;
    }
    return t;
}

void sse_server_run(sse_server *srv)
{
    if (srv->mhd)
        drive_mhd(srv);
    for (int pass = 0; pass < SSE_DEFER_PASSES && (srv->ready || srv->closed); pass++)
        run_deferred(srv);
    /* Everything written in this turn (handlers, timers, generators) goes in one batch. */
    send_batch(srv);
}

void sse_server_shutdown(sse_server *srv, unsigned drain_ms)
{
    if (!srv->mhd)
        return;
    srv->shutting_down = 1;
    /* Stop accepting; the listening socket is ours to close once MHD is stopped. */
    MHD_quiesce_daemon(srv->mhd);
    for (sse_stream *st = srv->streams; st; st = st->next) {
        st->closing = 1;
        wake(st);
    }
    sse_loop_now_update(srv->loop);
    uint64_t deadline = sse_loop_now(srv->loop) + drain_ms;
    sse_server_run(srv);
    while (srv->streams && sse_loop_now(srv->loop) < deadline) {
        int64_t wait = (int64_t)(deadline - sse_loop_now(srv->loop)) * 1000;
        int64_t t = sse_server_timeout(srv);
        if (t >= 0 && t < wait)
            wait = t;
        sse_loop_poll(srv->loop, wait > 50000 ? 50000 : wait);
        sse_server_run(srv);
    }
    /* MHD aborts if stopped with a suspended connection. */
    for (sse_stream *st = srv->streams; st; st = st->next)
        wake(st);
    resume_listed(srv);
    release_held(srv);
    if (srv->streams)
        slog(srv, SSE_LOG_WARN, "shutdown: closing streams that did not drain in %u ms", drain_ms);
    sse_loop_unwatch(srv->loop, &srv->mhd_watch);
    srv->mhd_watch.fd = -1;
    MHD_stop_daemon(srv->mhd);
    srv->mhd = NULL;
    close(srv->listen_fd);
    srv->listen_fd = -1;
    srv->resume_pending = 0;
    while (srv->ready || srv->closed)
        run_deferred(srv);
    sse_gzip_twins_free(srv->twins);
    srv->twins = NULL;
}

void sse_server_free(sse_server *srv)
{
    if (!srv)
        return;
    sse_server_shutdown(srv, 0);
    free(srv);
}
