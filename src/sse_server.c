/* sse_server: libmicrohttpd in external-epoll mode with suspend/resume.
 *
 * The libmicrohttpd adapter. A stream (sse_stream.c: its queue, heartbeat, gzip and
 * states) is answered with a callback response whose reader takes the stream's queued
 * bytes; with nothing queued the reader suspends the connection, and the next write
 * lists it for a resume. MHD_run is called again after resumes: MHD 0.9.75's
 * MHD_get_timeout ignores pending resumes (docs/libmicrohttpd.md, "The loop").
 * Hang-ups are seen through our own EPOLLRDHUP watch on each stream's socket, because
 * MHD does not read while it sends a body. Lua never runs inside the reader: hooks
 * that may run Lua are deferred to after MHD_run.
 *
 * Resumes are batched, and the batches paced by their own cost: wake() only lists the
 * stream; the list is resumed (and sent) at the end of a loop turn, a large one in a few
 * slices with loop turns between them, and after a batch that took d microseconds the
 * next one waits until d (at most 2 ms) has passed. An idle
 * server sends at once; a busy one (a fan-out that takes milliseconds while publishes keep
 * coming) keeps accepting publishes meanwhile, so each send() carries every event that
 * queued up — as a goroutine-per-client server does under load — and the cost per
 * delivery falls as the load rises, for at most SSE_BATCH_WAIT_MAX_US of added latency.
 *
 * Hostile clients: every connection has a record (sse_conn) from accept to close, on at
 * most one deadline list: "waiting" (its request head and body must arrive within
 * request_timeout) or "idle" (kept alive between requests). A connection past its
 * deadline is shut down. Request heads are checked before any body is read (methods,
 * NUL in the path, framing that could smuggle a request past a proxy), and a request
 * that announces a body is routed first (the admit hook), so bodies nobody wants are
 * never read. README.md, "Security and limits", says what users get.
 *
 * TLS (docs/tls.md): a handshake that waits for its client is parked (suspended, its
 * socket watched by us) so that it cannot keep libmicrohttpd, and so the loop, busy.
 */
#include "sse_server.h"
#include "sse_buf.h"
#include "sse_head.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/tcp.h>    /* struct tcp_info with tcpi_bytes_received */
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

/* What an HTTP/1.0 client (unchunked body) gets per reader call at most. MHD 0.9.75 gives
 * every callback response a buffer of this size, but uses it only for an unchunked body: a
 * chunked (HTTP/1.1) reader writes straight into the connection's send buffer, so there
 * the response gets the smallest block MHD takes and an idle stream saves 4 KiB. */
#define SSE_STREAM_BLOCK 4096
#define SSE_STREAM_BLOCK_CHUNKED 1
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
/* A batch of resumes goes out in about this many slices of at least SSE_SLICE_MIN streams
 * (send_batch). libmicrohttpd walks its whole list of suspended connections in the first
 * MHD_run after a resume, so every slice costs a pass over all the streams: a bounded
 * number of slices keeps that linear in the streams. Measured on fan-out to 10,000
 * (bench/, publishers up to 8 ahead): one slice gave 147k deliveries/s, p99 367 ms,
 * 6.7 CPU-s per million (each send carried 1.2 events: no publish was read during the
 * 60 ms fan-out); slices of 1000: 431-465k/s; slices of 256: 379-459k/s with MHD's walk at
 * 18% of the profile; 8 slices of at least 256: 478k/s, p99 230 ms, 2.1 CPU-s per million. */
#define SSE_BATCH_SLICES 8
#define SSE_SLICE_MIN 256
/* Publishing requests (they queued events) allowed ahead of the next batch; see
 * answer_or_hold. Measured on fan-out to 1,000 and 100 subscribers (bench/): with
 * 32, 1.1M deliveries/s, p99 13 ms; 8: 1.65M/s, p99 8-9 ms; 4: 1.0M/s, p99 7-8 ms. */
#define SSE_PUBLISHERS_AHEAD_MAX 8

/* A half-closed connection whose unread bytes MHD has left alone over SSE_STUCK_LOOKS runs
 * and SSE_STUCK_MS is shut down (close_half_closed); MHD reads what it can in the first
 * run after the hang-up. The loop looks again at least every 4 * SSE_STUCK_MS meanwhile. */
#define SSE_STUCK_LOOKS 3
#define SSE_STUCK_MS 10
/* How often a burst of the same refusal (per-address limit, descriptor limit) is logged. */
#define SSE_BURST_LOG_MS 10000
/* MHD may keep asking to be run at once (a connection it cannot progress stays on its
 * ready list). After this long of that with no response being sent (the legitimate
 * reason: a large body goes out one block per run until the socket is full), the loop
 * waits at least SSE_SPIN_WAIT_US per turn and runs MHD once per turn, so no connection
 * state can make the loop spin. */
#define SSE_SPIN_AFTER_US 1000000
#define SSE_SPIN_WAIT_US 1000
/* What TLS offers unless the caller says otherwise (GnuTLS priority syntax): GnuTLS's
 * NORMAL set, TLS 1.2 and 1.3 only (NORMAL alone also allows 1.0 and 1.1). */
#define SSE_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
/* Buckets of the per-address connection counts (only with max_per_ip). */
#define SSE_IP_BUCKETS 1024

/* One refusal logged per burst: the first at once, the rest counted into the next line. */
typedef struct sse_burst {
    uint64_t next_ms;    /* loop clock: log again not before this */
    unsigned more;       /* refusals since the last line */
} sse_burst;

typedef struct sse_conn sse_conn;

/* Connections with a deadline, in deadline order (all share one timeout, so appending
 * keeps the order). */
typedef struct sse_conn_list {
    sse_conn *head, *tail;
    unsigned  timeout_ms;   /* 0: none (its connections are kept, never expire) */
} sse_conn_list;

/* Connections from one address, while max_per_ip is set. */
typedef struct sse_ip_count {
    unsigned char        addr[16];   /* IPv4 as ::ffff:a.b.c.d */
    unsigned             n;
    struct sse_ip_count *next;
} sse_ip_count;

/* A TCP connection, from MHD's NOTIFY_STARTED to NOTIFY_CLOSED (several requests with
 * keep-alive). */
struct sse_conn {
    sse_server            *srv;
    struct MHD_Connection *conn;
    int                    fd;
    sse_conn_list         *list;       /* the deadline it is on, or NULL */
    uint64_t               deadline;   /* loop clock, ms */
    sse_conn              *prev, *next;
    sse_ip_count          *ip;         /* its address's count, with max_per_ip */
    sse_watch              hup;        /* EPOLLRDHUP on its socket; fd = -1 when not watched */
    int                    peer_closed; /* the client has sent its FIN */
    int                    unread;      /* ... and this many bytes were left unread */
    uint64_t               unread_since; /* since then (loop clock, ms) */
    unsigned               unread_looks; /* close_half_closed found them so, after a run */
    sse_stream            *stream;     /* the stream it carries, if any */
    uint64_t               trim_at;    /* the stream's body position at which its send buffer
                                          is next given back when idle (trim_idle) */
    sse_request           *deferred;   /* its request, while the binding answers it later */
    int                    decoded_nul; /* the last percent-decoding MHD asked of us made a
                                          NUL; MHD decodes the path last, so at the access
                                          handler this says whether the path has one */
    int                    requested;  /* a request has started on it (over TLS: the
                                          handshake is done) */
    int                    shut;       /* we shut it down (late, or half-closed) */
    int                    parked;     /* TLS: suspended by us until its client sends more
                                          (tls_park_waiting); hup watches EPOLLIN too */
    int                    in_request; /* MHD is answering a request on it (access handler
                                          called, completion not yet) */
    sse_head_scan          head;       /* plain ports: what the client sent, vetted before
                                          MHD reads it (head_guard) */
};

struct sse_server {
    sse_loop          *loop;
    sse_server_config  cfg;
    char               host[INET6_ADDRSTRLEN];
    struct MHD_Daemon *mhd;
    int                listen_fd;
    int                port;
    sse_watch          mhd_watch;      /* MHD's own epoll fd, nested in ours */
    int                resume_pending; /* a resume since the last MHD_run */
    sse_streams        streams;        /* every stream, and their lists */
    sse_request       *current;        /* the request whose hook is running, or NULL */
    sse_request       *answers_held;   /* publishers' answers, held until the next batch */
    unsigned           publishers;     /* requests that queued events since the last batch */
    int64_t            resume_at;      /* the next batch of resumes not before (us) */
    int64_t            batch_start;    /* when the batch being sent started (us) */
    unsigned           batch_size;     /* streams in it */
    unsigned           batch_left;     /* ... still to resume */
    int                shutting_down;
    char               tls_error[256]; /* MHD's last message while starting */
    sse_conn_list      waiting;        /* request head or body still to come */
    sse_conn_list      idle;           /* kept alive, between requests */
    sse_timer          deadlines;      /* fires at the earliest deadline of both lists */
    sse_ip_count     **ips;            /* SSE_IP_BUCKETS buckets, with max_per_ip */
    sse_burst          per_ip_burst;
    sse_burst          accept_burst;
    int64_t            mhd_zero_since; /* MHD has asked to run at once since (us), or 0 */
    int                spin_logged;    /* ... and the guard that slows the loop said so */
    sse_request       *deferred;       /* requests whose answer comes later (sse_request_defer) */
    uint64_t           requests;       /* answered (streams included), for app:stats() */
    int                reuseport;      /* a worker: the port is shared (sse_server_share_port) */
    unsigned           responding;     /* requests answered (not streams), not completed */
    int                conn_closed;    /* a connection closed during this MHD_run */
    int                peer_closed;    /* a client without a stream sent its FIN */
    int                tls;            /* listening with TLS */
    char              *peek;           /* plain ports: head_guard's window on a socket */
    size_t             peek_cap;
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
    int                    http11;      /* HTTP/1.1: a stream's body is chunked */
    int                    responding;  /* counted in srv->responding */
    unsigned               held_status;
    struct MHD_Response   *held_answer; /* held by publisher backpressure (answer_or_hold) */
    sse_request           *held_next;
    int                    deferred;    /* on srv->deferred: suspended until answered */
    int                    gone;        /* deferred, and its client hung up: never answered */
    sse_request           *dprev, *dnext;
    void                  *ud;          /* the binding's, while deferred */
    sse_stream            *stream;
    sse_conn              *c;
    uint64_t               body_length; /* announced by Content-Length */
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

/* Logs the first of a burst of like refusals at once and counts the others into the next
 * line, at most one line per SSE_BURST_LOG_MS: an attacker cannot flood the log. */
static void log_burst(sse_server *srv, sse_burst *b, const char *what)
{
    uint64_t now = sse_loop_now(srv->loop);
    if (b->next_ms && now < b->next_ms) {
        b->more++;
        return;
    }
    if (b->more)
        slog(srv, SSE_LOG_WARN, "%s (and %u more like it in the last %u s)", what, b->more,
             SSE_BURST_LOG_MS / 1000);
    else
        slog(srv, SSE_LOG_WARN, "%s", what);
    b->more = 0;
    b->next_ms = now + SSE_BURST_LOG_MS;
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
    if (!srv->mhd)   /* while starting: keep it, it may explain a failure */
        snprintf(srv->tls_error, sizeof srv->tls_error, "%.200s", msg);
    /* accept() failing (EMFILE: the descriptor limit) is the one MHD message an operator
     * must see: clients then wait unanswered in the backlog. */
    if (strncmp(msg, "Error accepting connection", 26) == 0) {
        struct rlimit rl;
        char what[400];
        getrlimit(RLIMIT_NOFILE, &rl);
        snprintf(what, sizeof what, "cannot accept connections: %s (descriptor limit %llu; "
                 "raise it with ulimit -n, or lower max_connections)", msg + 26 + (msg[26] == ':') + 1,
                 (unsigned long long)rl.rlim_cur);
        log_burst(srv, &srv->accept_burst, what);
        return;
    }
    /* Said with the client's address when the connection closes (tls_log_unserved). */
    static const char handshake_failed[] = "Error: received handshake message out of context";
    if (strncmp(msg, handshake_failed, sizeof handshake_failed - 1) == 0)
        return;
    /* Everything else (every reader abort, our way of closing a dead client, is reported
     * as an error) stays out of the default log. */
    srv->cfg.hooks->log(srv->cfg.ud, SSE_LOG_DEBUG, msg);
}

/* ---- connections: deadlines and per-address counts ---- */

static void arm_deadlines(sse_server *srv)
{
    uint64_t due = UINT64_MAX;
    if (srv->waiting.head)
        due = srv->waiting.head->deadline;
    if (srv->idle.head && srv->idle.head->deadline < due)
        due = srv->idle.head->deadline;
    if (due == UINT64_MAX) {
        sse_timer_stop(srv->loop, &srv->deadlines);
        return;
    }
    uint64_t now = sse_loop_now(srv->loop);
    sse_timer_start(srv->loop, &srv->deadlines, due > now ? due - now : 0, 0);
}

static void conn_unlist(sse_conn *c)
{
    sse_conn_list *l = c->list;
    if (!l)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        l->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        l->tail = c->prev;
    c->prev = c->next = NULL;
    c->list = NULL;
}

/* Starts c's deadline on list l (replacing any other). A list with no timeout still
 * holds its connections (close_half_closed looks there), with a deadline never reached. */
static void conn_deadline(sse_conn *c, sse_conn_list *l)
{
    sse_server *srv = c->srv;
    conn_unlist(c);
    c->deadline = l->timeout_ms ? sse_loop_now(srv->loop) + l->timeout_ms : UINT64_MAX;
    c->prev = l->tail;
    if (l->tail)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
    c->list = l;
    if (c->peer_closed)           /* it half-closed while its request was answered */
        srv->peer_closed = 1;
    if (l->head == c)
        arm_deadlines(srv);
}

static void tls_unpark(sse_conn *c);

/* Ends c from outside MHD's callbacks (it cannot be told to close it there): the socket is
 * shut down, and MHD sees the hang-up on its next run and closes the connection; a parked
 * handshake is resumed so that MHD looks at it again. */
static void conn_shut(sse_conn *c)
{
    c->shut = 1;
    shutdown(c->fd, SHUT_RDWR);
    tls_unpark(c);
}

/* Past its deadline: shut the connection down (conn_shut). */
static void on_deadlines(sse_timer *t)
{
    sse_server *srv = container_of(t, sse_server, deadlines);
    uint64_t now = sse_loop_now(srv->loop);
    sse_conn_list *lists[] = { &srv->waiting, &srv->idle };
    for (int i = 0; i < 2; i++) {
        while (lists[i]->head && lists[i]->head->deadline <= now) {
            sse_conn *c = lists[i]->head;
            conn_unlist(c);
            slog(srv, SSE_LOG_DEBUG, "closing a connection %s (fd %d)",
                 lists[i] == &srv->idle ? "idle after its last request" : "whose request did not arrive in time",
                 c->fd);
            conn_shut(c);
        }
    }
    arm_deadlines(srv);
}

static void ip_key(const struct sockaddr *sa, unsigned char key[16])
{
    memset(key, 0, 16);
    if (sa->sa_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    } else if (sa->sa_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    }
}

static sse_ip_count **ip_slot(sse_server *srv, const unsigned char key[16])
{
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (int i = 0; i < 16; i++)
        h = (h ^ key[i]) * 16777619u;
    sse_ip_count **p = &srv->ips[h % SSE_IP_BUCKETS];
    while (*p && memcmp((*p)->addr, key, 16) != 0)
        p = &(*p)->next;
    return p;
}

/* MHD's accept policy: the connection limit per address. The count itself is kept from
 * NOTIFY_STARTED to NOTIFY_CLOSED, nothing runs between this and NOTIFY_STARTED. */
static enum MHD_Result on_accept(void *cls, const struct sockaddr *sa, socklen_t len)
{
    sse_server *srv = cls;
    if (!srv->cfg.max_per_ip || !srv->ips)
        return MHD_YES;
    unsigned char key[16];
    ip_key(sa, key);
    sse_ip_count *e = *ip_slot(srv, key);
    if (!e || e->n < srv->cfg.max_per_ip)
        return MHD_YES;
    char ip[INET6_ADDRSTRLEN] = "?", what[200];
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof ip);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof ip);
    snprintf(what, sizeof what, "refused a connection from %s: it has %u open "
             "(max_connections_per_ip)", ip, e->n);
    log_burst(srv, &srv->per_ip_burst, what);
    return MHD_NO;
}

static void count_ip(sse_conn *c)
{
    sse_server *srv = c->srv;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!srv->ips || !ci || !ci->client_addr)
        return;
    unsigned char key[16];
    ip_key(ci->client_addr, key);
    sse_ip_count **slot = ip_slot(srv, key);
    if (!*slot) {
        if (!(*slot = calloc(1, sizeof **slot)))
            return;    /* uncounted: the limit is a defence, not a correctness matter */
        memcpy((*slot)->addr, key, 16);
    }
    (*slot)->n++;
    c->ip = *slot;
}

static void uncount_ip(sse_conn *c)
{
    if (!c->ip || --c->ip->n > 0)
        return;
    sse_ip_count **slot = ip_slot(c->srv, c->ip->addr);
    *slot = c->ip->next;
    free(c->ip);
}

/* ---- deferred requests: answered after the request hook has returned ---- */

static void undefer(sse_request *r)
{
    sse_server *srv = r->srv;
    if (r->dprev)
        r->dprev->dnext = r->dnext;
    else
        srv->deferred = r->dnext;
    if (r->dnext)
        r->dnext->dprev = r->dprev;
    r->dprev = r->dnext = NULL;
    r->deferred = 0;
    if (r->c)
        r->c->deferred = NULL;
}

/* A deferred request's client hung up (or the server is stopping): the binding is told
 * and forgets r; the connection is resumed and, with no answer, closed by MHD at its
 * next call of on_access. */
static void request_gone(sse_request *r)
{
    sse_server *srv = r->srv;
    undefer(r);
    r->gone = 1;
    if (srv->cfg.hooks->request_gone)
        srv->cfg.hooks->request_gone(srv->cfg.ud, r);
    MHD_resume_connection(r->conn);
    srv->resume_pending = 1;
}

/* After MHD_queue_response on a deferred request (its connection suspended: MHD 0.9.75
 * takes a response for a suspended connection, docs/libmicrohttpd.md): resume it, so
 * the next MHD_run sends the answer. */
static void answered_later(sse_request *r)
{
    if (!r->deferred)
        return;
    undefer(r);
    MHD_resume_connection(r->conn);
    r->srv->resume_pending = 1;
}

/* The client sent its FIN (or reset). MHD 0.9.75 does not always see it: when the FIN
 * comes with the last bytes it reads, it reads less than it asked for, takes the socket
 * for drained and waits for an edge that never comes, so the connection would sit in
 * CLOSE-WAIT until its deadline. A stream ends at once; any other connection is looked
 * at after the next MHD_run (close_half_closed), when MHD has read what was sent. */
static void head_guard(sse_conn *c);

/* Its client sent bytes (plain ports, and parked TLS handshakes), or hung up. */
static void on_conn_event(sse_watch *w, uint32_t events)
{
    sse_conn *c = container_of(w, sse_conn, hup);
    /* A parked connection's client sent bytes, or hung up: MHD goes on with it. */
    if (c->parked)
        tls_unpark(c);
    else if (events & EPOLLIN)
        head_guard(c);
    if (!(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) || c->hup.fd < 0)
        return;
    /* Level-triggered: stop watching at once or this fires every turn. */
    sse_loop_unwatch(c->srv->loop, &c->hup);
    c->hup.fd = -1;
    c->peer_closed = 1;
    if (c->stream)
        sse_stream_hangup(c->stream);
    else if (c->deferred)
        request_gone(c->deferred);
    else
        c->srv->peer_closed = 1;
}

/* Connections waiting for a request whose client has closed: once MHD has read all
 * there was, no request can come any more, so shut them down (MHD then sees the
 * hang-up). One with bytes still unread is looked at again after the next run, and shut
 * down once MHD has left them alone for a while (SSE_STUCK_*): MHD 0.9.75 stops reading,
 * without answering or closing, when a head just fits its pool (docs/libmicrohttpd.md,
 * "Memory"), and with its client gone nothing else would end it (found by fuzz_request). */
static void close_half_closed(sse_server *srv)
{
    srv->peer_closed = 0;
    uint64_t now = sse_loop_now(srv->loop);
    sse_conn_list *lists[] = { &srv->waiting, &srv->idle };
    for (int i = 0; i < 2; i++) {
        for (sse_conn *c = lists[i]->head, *next; c; c = next) {
            next = c->next;
            if (!c->peer_closed)
                continue;
            int unread = 0;
            if (ioctl(c->fd, FIONREAD, &unread) == 0 && unread > 0) {
                if (unread != c->unread) {
                    c->unread = unread;
                    c->unread_since = now;
                    c->unread_looks = 0;
                }
                if (++c->unread_looks < SSE_STUCK_LOOKS || now - c->unread_since < SSE_STUCK_MS) {
                    srv->peer_closed = 1;
                    continue;
                }
            }
            conn_unlist(c);
            conn_shut(c);
        }
    }
}

/* ---- TLS: handshakes parked while they wait for their client ----
 *
 * libmicrohttpd 0.9.75 in epoll mode clears a connection's "ready to read" mark only when
 * a read of request bytes finds none (recv_tls_adapter in connection_https.c). A handshake
 * that needs more bytes from the client (gnutls_handshake: GNUTLS_E_AGAIN) leaves the
 * mark set, so the connection stays on MHD's ready list, MHD_get_timeout answers 0, and
 * every run calls the handshake again until the client sends the rest: each handshake
 * spins the loop for a round trip, and a client that sends half a ClientHello and waits
 * spins it until request_timeout (one such client took 65 % of a core, 250 took all of
 * it). So after a run in which MHD asks to be run again at once, a TLS connection that has
 * not started a request and has nothing unread on its socket is parked: suspended (MHD
 * no longer looks at it) while our watch on its socket waits for bytes or a hang-up, then
 * resumed, and MHD goes on with the handshake. Before its first request a connection can
 * only be waiting for its client (the handshake, or the first bytes of the head), so
 * parking it loses nothing. Its request_timeout runs on meanwhile: at the deadline it is
 * shut down and resumed, and MHD closes it. (A handshake blocked on sending, a client that
 * does not read a first flight of a few KB, would also wait for the deadline.) */

/* Parks the connections waiting for their client; 1 if it parked any. */
static int tls_park_waiting(sse_server *srv)
{
    int parked = 0;
    for (sse_conn *c = srv->waiting.head; c; c = c->next) {
        int unread = 0;
        if (c->requested || c->parked || c->peer_closed || c->hup.fd < 0 ||
            ioctl(c->fd, FIONREAD, &unread) != 0 || unread > 0)
            continue;
        if (sse_loop_rewatch(srv->loop, &c->hup, EPOLLIN | EPOLLRDHUP) != 0)
            continue;
        MHD_suspend_connection(c->conn);
        c->parked = 1;
        parked = 1;
    }
    return parked;
}

/* Hands a parked connection back to MHD (its next run goes on with the handshake). */
static void tls_unpark(sse_conn *c)
{
    if (!c->parked)
        return;
    c->parked = 0;
    if (sse_loop_rewatch(c->srv->loop, &c->hup, EPOLLRDHUP) != 0) {
        sse_loop_unwatch(c->srv->loop, &c->hup);
        c->hup.fd = -1;
    }
    MHD_resume_connection(c->conn);
    c->srv->resume_pending = 1;
}

static void tls_unpark_all(sse_server *srv)
{
    for (sse_conn *c = srv->waiting.head; c; c = c->next)
        tls_unpark(c);
}

static void peer_name(struct MHD_Connection *conn, char *out, size_t outlen);

/* ---- plain ports: heads vetted before libmicrohttpd reads them ----
 *
 * Some heads must never reach libmicrohttpd 0.9.75: it joins a folded header line (one
 * that starts with a space or tab, RFC 9112 5.2) to the line before with an overlapping
 * memcpy (docs/libmicrohttpd.md, "Folded header lines"), and nothing can stop it once the
 * bytes are in its buffer. So on a plain port every byte a client sends is looked at
 * (MSG_PEEK) before MHD reads it: our watch on the socket (edge-triggered EPOLLIN) fires
 * in the same poll as MHD's, and the loop runs our callbacks before MHD_run. A scan of
 * the request stream (sse_head.c) follows where each head's lines start; bodies are
 * skipped without being looked at. A folded head is answered 400 and the connection
 * closed; TLS on the plain port is closed with one debug line.
 *
 * Where MHD stands in the byte stream is the kernel's count: bytes received
 * (tcpi_bytes_received) minus bytes still queued on the socket. The window looked at is
 * what sits in the socket ahead of MHD: a client more than peek_cap bytes of pipelined
 * requests ahead of the server is closed, as no real client is. Bytes that arrive while
 * MHD_run itself is running can be read by MHD before our watch fires (the kernel tells
 * both at once, and MHD may look first); the guard then sees that MHD is past the bytes it
 * vetted and stops vetting that connection (a debug line says so). Over TLS the bytes are
 * encrypted until MHD has them, so TLS ports are not vetted. */

/* The kernel's view of fd: bytes received so far; with buf, also how many are still
 * queued on the socket, the first of them (at most cap) peeked into buf. Read until two
 * TCP_INFOs agree, so that the queue belongs to the count. 0 on success. */
static int socket_position(int fd, uint64_t *received, char *buf, size_t cap,
                           size_t *peeked, size_t *queued)
{
    for (int tries = 0; tries < 4; tries++) {
        struct tcp_info a, b;
        socklen_t la = sizeof a, lb = sizeof b;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &a, &la) != 0)
            return -1;
        *received = a.tcpi_bytes_received;
        if (!buf)
            return 0;
        ssize_t n = recv(fd, buf, cap, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        int inq = n > 0 ? (int)n : 0;
        if ((size_t)inq == cap && ioctl(fd, FIONREAD, &inq) != 0)
            return -1;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &b, &lb) != 0)
            return -1;
        if (a.tcpi_bytes_received == b.tcpi_bytes_received) {
            *peeked = n > 0 ? (size_t)n : 0;
            *queued = (size_t)inq;
            return 0;
        }
    }
    return -1;
}

static const char fold_answer[] =
    "HTTP/1.1 400 Bad Request\r\n"
    "Connection: close\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 62\r\n"
    "\r\n"
    "obsolete line folding: a header line starts with space or tab\n";

/* Ends c for what head_guard found: the client's bytes are read here (so MHD gets none of
 * them), a folded head is answered 400 if MHD is not answering a request on c at the
 * moment (a pipelined head behind an answer just closes), and the socket is shut down
 * (also for HEAD_TOO_FAR_AHEAD: more pipelined than the window holds):
 * MHD sees the hang-up and closes the connection. */
#define HEAD_TOO_FAR_AHEAD (-1)

static void head_refuse(sse_conn *c, int v)
{
    sse_server *srv = c->srv;
    char peer[INET6_ADDRSTRLEN + 8];
    peer_name(c->conn, peer, sizeof peer);
    for (int i = 0; i < 64 && recv(c->fd, srv->peek, srv->peek_cap, MSG_DONTWAIT) > 0; i++)
        ;
    if (v == SSE_HEAD_FOLDED) {
        if (!c->in_request)
            (void)!send(c->fd, fold_answer, sizeof fold_answer - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        slog(srv, SSE_LOG_DEBUG, "%s: 400 obsolete line folding (a header line starts with "
             "a space or tab): connection closed", peer);
    } else if (v == SSE_HEAD_TLS) {
        slog(srv, SSE_LOG_DEBUG, "%s: TLS on the plain HTTP port: connection closed", peer);
    } else {
        slog(srv, SSE_LOG_DEBUG, "%s: more than %zu bytes of pipelined requests ahead of "
             "the server: connection closed", peer, srv->peek_cap);
    }
    conn_unlist(c);
    conn_shut(c);
}

/* Looks at the bytes c's client sent that nobody has looked at yet (see above). */
static void head_guard(sse_conn *c)
{
    sse_server *srv = c->srv;
    sse_head_scan *h = &c->head;
    if (srv->tls || c->shut || h->verdict != SSE_HEAD_FINE || c->fd < 0)
        return;
    uint64_t received;
    size_t peeked = 0, queued = 0;
    if (socket_position(c->fd, &received, NULL, 0, NULL, NULL) != 0 || received <= h->offset)
        return;
    /* A body is skipped unseen: only what follows it needs a look. */
    uint64_t body = sse_head_body_left(h);
    if (body) {
        sse_head_skip(h, received - h->offset < body ? received - h->offset : body);
        if (received == h->offset)
            return;
    }
    if (socket_position(c->fd, &received, srv->peek, srv->peek_cap, &peeked, &queued) != 0)
        return;
    uint64_t consumed = received - queued;
    if (consumed > h->offset) {   /* MHD read bytes before this look (see above) */
        char peer[INET6_ADDRSTRLEN + 8];
        peer_name(c->conn, peer, sizeof peer);
        slog(srv, SSE_LOG_DEBUG, "%s: libmicrohttpd read %llu bytes before they were "
             "looked at: the connection's later heads are not checked for folding", peer,
             (unsigned long long)(consumed - h->offset));
        h->verdict = SSE_HEAD_LOST;
        return;
    }
    size_t seen = (size_t)(h->offset - consumed);   /* vetted, at the front of the queue */
    sse_head_verdict v = seen < peeked ? sse_head_feed(h, srv->peek + seen, peeked - seen)
                                       : SSE_HEAD_FINE;
    if (v == SSE_HEAD_FOLDED || v == SSE_HEAD_TLS) {
        head_refuse(c, v);
        return;
    }
    /* More queued than the window shows: fine inside a body, which needs no look. */
    uint64_t beyond = received - h->offset, skip = sse_head_body_left(h);
    if (v == SSE_HEAD_FINE && beyond) {
        sse_head_skip(h, skip < beyond ? skip : beyond);
        if (h->offset < received)
            head_refuse(c, HEAD_TOO_FAR_AHEAD);
    }
}

/* A TLS connection closed before any request, and not by us: its handshake failed, or
 * its client left. MHD's own line for a failed handshake names neither the client nor the
 * cause, so mhd_log drops it and this one line says who and, where it can tell, why (a
 * client may also end a finished handshake with a TLS close_notify, which MHD acts on
 * before its FIN arrives, so "the client closed" is said only when the FIN came first).
 * GnuTLS reads a record's 5-byte header first, so of a plain HTTP request ("GET /...")
 * only that much was read and its request line is still in the socket (the descriptor is
 * closed after this notification). */
static void tls_log_unserved(sse_conn *c)
{
    char peer[INET6_ADDRSTRLEN + 8], head[1024];
    peer_name(c->conn, peer, sizeof peer);
    ssize_t n = c->fd >= 0 ? recv(c->fd, head, sizeof head - 1, MSG_PEEK | MSG_DONTWAIT) : -1;
    head[n > 0 ? n : 0] = '\0';
    if (strstr(head, " HTTP/1.") || strstr(head, " HTTP/2"))
        slog(c->srv, SSE_LOG_DEBUG, "%s: plain HTTP on the TLS port: connection closed", peer);
    else if (c->peer_closed)
        slog(c->srv, SSE_LOG_DEBUG, "%s: the client closed its TLS connection before any "
             "request", peer);
    else   /* MHD cannot say which: its TLS session is gone by now */
        slog(c->srv, SSE_LOG_DEBUG, "%s: TLS connection closed before any request: its "
             "handshake failed (not TLS, or no protocol version or cipher in common with "
             "the TLS priorities), or the client ended it", peer);
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    sse_server *srv = cls;
    sse_conn *c = *socket_context;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        if (!(c = calloc(1, sizeof *c)))
            return;    /* no deadline for it: only the descriptor limit bounds it */
        c->srv = srv;
        c->conn = conn;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        c->fd = ci ? ci->connect_fd : -1;
        c->hup.fd = c->fd;
        c->hup.cb = on_conn_event;
        sse_head_init(&c->head);
        /* Plain ports: bytes too (head_guard), once per arrival. */
        uint32_t events = srv->tls ? EPOLLRDHUP : EPOLLIN | EPOLLRDHUP | EPOLLET;
        if (c->fd < 0 || sse_loop_watch(srv->loop, &c->hup, events) != 0)
            c->hup.fd = -1;
        count_ip(c);
        conn_deadline(c, &srv->waiting);
        *socket_context = c;
        head_guard(c);    /* its first bytes may be here already: MHD reads in its next run */
    } else if (c) {
        if (srv->tls && !c->requested && !c->shut && !srv->shutting_down)
            tls_log_unserved(c);
        srv->conn_closed = 1;
        if (c->hup.fd >= 0)       /* before MHD closes the fd: its number will be reused */
            sse_loop_unwatch(srv->loop, &c->hup);
        conn_unlist(c);
        uncount_ip(c);
        free(c);
        *socket_context = NULL;
    }
}

static sse_conn *conn_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* MHD's own percent-decoding, noting whether it produced a NUL: a decoded path is a C
 * string everywhere after this, so "/a%00/b" would silently become "/a". */
static size_t on_unescape(void *cls, struct MHD_Connection *conn, char *s)
{
    size_t n = MHD_http_unescape(s);
    sse_conn *c = conn_of(conn);
    if (c)
        c->decoded_nul = strlen(s) != n;
    return n;
}

/* ---- suspend / resume ---- */

static void resume_stream(void *conn, void *ctx)
{
    sse_server *srv = ctx;
    MHD_resume_connection(conn);
    srv->resume_pending = 1;
}

/* Is MHD asking to be run again at once? After a resume it calls the reader in one
 * MHD_run and may send the bytes only in the next (docs/libmicrohttpd.md, "The loop"). */
static int mhd_wants_more(sse_server *srv)
{
    MHD_UNSIGNED_LONG_LONG ms;
    return MHD_get_timeout(srv->mhd, &ms) == MHD_YES && ms == 0;
}

/* Has MHD been asking to run at once for so long, with nothing to send, that it must be
 * making no progress? */
static int mhd_spinning(const sse_server *srv)
{
    return srv->mhd_zero_since && !srv->responding &&
           sse_loop_now_us() - srv->mhd_zero_since > SSE_SPIN_AFTER_US;
}

static void drive_mhd(sse_server *srv)
{
    int passes = 0;
    int spinning = mhd_spinning(srv);
    int more;
    /* The guard is a backstop: no connection state we know of needs it (hostile_spec's
     * "every attack in turn" checks that it stays quiet), so it says when it acts. */
    if (spinning && !srv->spin_logged) {
        srv->spin_logged = 1;
        slog(srv, SSE_LOG_WARN, "libmicrohttpd asked to be run at once for %d s with nothing "
             "to send; running it once per %d us from now on (a connection it cannot "
             "progress: please report)", SSE_SPIN_AFTER_US / 1000000, SSE_SPIN_WAIT_US);
    }
    do {
        srv->resume_pending = 0;
        srv->conn_closed = 0;
        MHD_run(srv->mhd);
        more = mhd_wants_more(srv);
        if (more && srv->tls && tls_park_waiting(srv))
            more = mhd_wants_more(srv);
        /* A connection that closed may have brought MHD back under its connection limit
         * (or out of EMFILE); it puts its listening socket back into its epoll set only at
         * the start of a run, and its timeout does not say so: without another run now,
         * new clients would wait in the backlog until something else woke the loop. */
    } while ((srv->resume_pending || srv->conn_closed || (more && !spinning)) &&
             ++passes < SSE_MHD_PASSES);
    if (!more)
        srv->mhd_zero_since = srv->spin_logged = 0;
    else if (!srv->mhd_zero_since)
        srv->mhd_zero_since = sse_loop_now_us();
}

/* The batch went out: answer the requests held back (their next MHD_run does it). */
static void release_answers(sse_server *srv)
{
    srv->publishers = 0;
    for (sse_request *r = srv->answers_held; r; r = r->held_next) {
        MHD_resume_connection(r->conn);
        srv->resume_pending = 1;
    }
    srv->answers_held = NULL;
}

/* Resumes and sends the listed streams, if the pacing allows it now. A batch is the resume
 * list as it stands when the batch starts; it goes out in about SSE_BATCH_SLICES slices with a loop
 * turn between them, so publishes are read while a large fan-out is under way and the
 * streams later in the batch carry them in the same send. The batch ends, and the held
 * answers are released, after its last slice. */
static void send_batch(sse_server *srv)
{
    if ((!srv->streams.to_resume && !srv->answers_held) || !srv->mhd)
        return;
    int64_t now = sse_loop_now_us();
    if (!srv->batch_left) {
        if (now < srv->resume_at && !srv->shutting_down)
            return;
        srv->batch_left = srv->batch_size = srv->streams.to_resume_n;
        srv->batch_start = now;
    }
    unsigned slice = srv->batch_size / SSE_BATCH_SLICES;
    if (slice < SSE_SLICE_MIN)
        slice = SSE_SLICE_MIN;
    if (slice > srv->batch_left)
        slice = srv->batch_left;
    srv->batch_left -= slice;
    sse_streams_resume(&srv->streams, slice, resume_stream, srv);
    drive_mhd(srv);
    if (srv->batch_left)
        return;
    release_answers(srv);
    int64_t end = sse_loop_now_us();
    int64_t d = end - srv->batch_start;
    srv->resume_at = end + (d < SSE_BATCH_WAIT_MAX_US ? d : SSE_BATCH_WAIT_MAX_US);
}

/* An idle stream's memory: MHD 0.9.75 puts the request head and then the send buffer in the
 * connection's pool (connection_memory), and zeroes the unused half of the read buffer when
 * the head has been read, so most of the pool is resident although an idle stream holds no
 * bytes. Once a stream goes idle, and again after every SSE_TRIM_BYTES it sent, the whole
 * pages of the free part of the send buffer (what the reader may write: MHD keeps nothing
 * there) are handed back to the kernel; they come back as zero pages when written. An idle
 * stream then keeps about two pages of its pool, whatever its size (docs/libmicrohttpd.md,
 * "Memory"). The position is per response, so trim_at is reset for each new stream on
 * a kept-alive connection (sse_request_stream). */
#define SSE_TRIM_BYTES (64 << 10)

static void trim_idle(sse_conn *c, uint64_t pos, char *buf, size_t max)
{
    if (pos < c->trim_at)
        return;
    c->trim_at = pos + SSE_TRIM_BYTES;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t from = ((uintptr_t)buf + page - 1) & ~(page - 1);
    uintptr_t to = ((uintptr_t)buf + max) & ~(page - 1);
    if (to > from)
        madvise((void *)from, to - from, MADV_DONTNEED);
}

/* libmicrohttpd's reader: the stream's bytes, or suspend until there are some. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    sse_stream *st = cls;
    ssize_t n = sse_stream_take(st, buf, max);
    if (n == SSE_TAKE_END)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (n == SSE_TAKE_ERROR)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    if (n == 0) {
        /* Only when returning nothing: suspending while returning data would hold that
         * data back until the next resume. */
        struct MHD_Connection *conn = sse_stream_conn(st);
        sse_conn *c = conn_of(conn);
        if (c)
            trim_idle(c, pos, buf, max);
        MHD_suspend_connection(conn);
        sse_stream_suspended(st);
    }
    return n;
}

static void stream_response_free(void *cls)
{
    sse_stream_response_done(cls);
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

/* ---- the request head, checked before anything else sees it ---- */

static int is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

struct head_scan {
    int         content_lengths;   /* Content-Length fields seen */
    int         lengths_differ;
    int         bad_length;        /* not a plain decimal number */
    uint64_t    length;
    int         transfer_encoding; /* Transfer-Encoding fields seen */
    int         chunked;           /* ... and it says exactly "chunked" */
    int         bad_name;          /* whitespace in a field name ("Transfer-Encoding :") */
    int         host;
};

static enum MHD_Result scan_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                   size_t key_len, const char *value, size_t value_len)
{
    struct head_scan *h = cls;
    if (!value)
        value = "", value_len = 0;
    for (size_t i = 0; i < key_len; i++)
        if (!is_tchar((unsigned char)key[i]))
            h->bad_name = 1;
    if (strcasecmp(key, "Content-Length") == 0) {
        uint64_t v = 0;
        int ok = value_len > 0 && value_len <= 19;
        for (size_t i = 0; ok && i < value_len; i++) {
            ok = value[i] >= '0' && value[i] <= '9';
            v = v * 10 + (uint64_t)(value[i] - '0');
        }
        h->bad_length |= !ok;
        if (h->content_lengths++ && v != h->length)
            h->lengths_differ = 1;
        h->length = v;
    } else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        h->transfer_encoding++;
        h->chunked = strcasecmp(value, "chunked") == 0;
    } else if (strcasecmp(key, "Host") == 0) {
        h->host = 1;
    }
    return MHD_YES;
}

/* What the head of r deserves before anyone looks at it: 0 (fine) or an error status,
 * with the reason in *why. The framing rules are RFC 9112's for a server that may sit
 * behind a proxy: any ambiguity about where a body ends could let a client smuggle a
 * second request past the proxy, so it is refused and the connection closed. */
static int check_head(sse_request *r, const char *version, const char **why)
{
    const char *m = r->method;
    int upper = *m != '\0';
    for (const char *p = m; *p; p++) {
        if (!is_tchar((unsigned char)*p)) {
            *why = "malformed method";
            return 400;
        }
        upper &= (*p >= 'A' && *p <= 'Z') || *p == '_' || *p == '-';
    }
    if (!upper) {            /* methods are case-sensitive: "get" is not GET */
        *why = "method not implemented";
        return 501;
    }
    if (r->c && r->c->decoded_nul) {
        *why = "NUL in the path";
        return 400;
    }
    struct head_scan h = { 0 };
    MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, scan_header, &h);
    if (h.bad_name) {
        *why = "malformed header field name";
        return 400;
    }
    if (strcmp(version, "HTTP/1.1") == 0 && !h.host) {
        *why = "HTTP/1.1 request without Host";
        return 400;
    }
    if (h.transfer_encoding && h.content_lengths) {
        *why = "both Content-Length and Transfer-Encoding";
        return 400;
    }
    if (h.bad_length || h.lengths_differ) {
        *why = "malformed Content-Length";
        return 400;
    }
    if (h.transfer_encoding > 1 || (h.transfer_encoding && !h.chunked)) {
        *why = "transfer coding not implemented";
        return 501;
    }
    /* Bodies are read whole (at most max_body) before the handler runs, so a chunked one
     * gains nothing over Content-Length; and libmicrohttpd 0.9.75 stalls for good (and
     * keeps the loop busy) on a chunk-size line longer than its read buffer. */
    if (h.chunked) {
        *why = "chunked request bodies are not accepted: send Content-Length";
        return 411;
    }
    r->body_length = h.length;
    if (h.length > r->srv->cfg.max_body) {
        *why = "request body too large";
        return 413;
    }
    return 0;
}

/* The first call for a request: its head is complete, no body byte has been read. */
static enum MHD_Result start_request(sse_server *srv, struct MHD_Connection *conn,
                                     const char *url, const char *method,
                                     const char *version, void **con_cls)
{
    sse_request *r = calloc(1, sizeof *r);
    if (!r)
        return MHD_NO;
    r->srv = srv;
    r->conn = conn;
    r->method = method;
    r->path = url;
    r->c = conn_of(conn);
    r->http11 = strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
    peer_name(conn, r->peer, sizeof r->peer);
    *con_cls = r;
    if (r->c)
        r->c->requested = r->c->in_request = 1;
    /* A new request on a kept-alive connection: its body has request_timeout from now. */
    if (r->c && r->c->list == &srv->idle)
        conn_deadline(r->c, &srv->waiting);
    const char *why = NULL;
    int status = check_head(r, version, &why);
    if (status) {
        /* Answered on the first call: MHD reads no body and closes the connection. */
        slog(srv, SSE_LOG_DEBUG, "%s: %d %s", r->peer, status, why);
        char body[128];
        snprintf(body, sizeof body, "%s\n", why);
        queue_plain(r, status, body);
        return MHD_YES;
    }
    if (r->body_length && srv->cfg.hooks->admit)
        srv->cfg.hooks->admit(srv->cfg.ud, r);
    return MHD_YES;
}

/* The request is answered (or is a stream): no deadline for its connection any more. */
static void request_answered(sse_request *r, int stream)
{
    r->answered = 1;
    r->srv->requests++;
    if (!stream) {
        r->responding = 1;
        r->srv->responding++;
    }
    if (r->c)
        conn_unlist(r->c);
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload, size_t *upload_size, void **con_cls)
{
    sse_server *srv = cls;
    sse_request *r = *con_cls;
    if (!r)
        return start_request(srv, conn, url, method, version, con_cls);
    if (*upload_size) {
        /* Content-Length was checked against max_body, but count anyway. */
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
    if (r->gone)                 /* resumed with no answer: its client left */
        return MHD_NO;
    if (r->held_answer) {        /* resumed after the batch: answer now */
        MHD_queue_response(conn, r->held_status, r->held_answer);
        MHD_destroy_response(r->held_answer);
        r->held_answer = NULL;
        return MHD_YES;
    }
    if (r->answered)
        return MHD_YES;
    if (r->too_large) {
        queue_plain(r, 413, "request body too large\n");
        return MHD_YES;
    }
    srv->current = r;
    srv->streams.wrote = 0;
    srv->cfg.hooks->request(srv->cfg.ud, r);
    srv->current = NULL;
    if (srv->streams.wrote)      /* it published: counted until the next batch */
        srv->publishers++;
    if (!r->answered && !r->deferred && queue_plain(r, 500, "internal server error\n") != 0)
        return MHD_NO;           /* not even that: MHD closes the connection */
    return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    sse_server *srv = cls;
    sse_request *r = *con_cls;
    if (!r)
        return;
    if (r->responding)
        srv->responding--;
    if (r->c)
        r->c->stream = NULL, r->c->in_request = 0;
    if (r->stream)
        sse_stream_completed(r->stream);
    /* May be kept alive, after a stream that ended cleanly too: idle until the next. */
    if (r->c && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK)
        conn_deadline(r->c, &srv->idle);
    if (r->held_answer)
        MHD_destroy_response(r->held_answer);
    if (r->deferred) {           /* not expected: MHD closes no suspended connection */
        undefer(r);
        if (srv->cfg.hooks->request_gone)
            srv->cfg.hooks->request_gone(srv->cfg.ud, r);
    }
    sse_buf_free(&r->body);
    free(r);
    *con_cls = NULL;
}

const char *sse_request_method(const sse_request *r) { return r->method; }
const char *sse_request_path(const sse_request *r) { return r->path; }
const char *sse_request_peer(const sse_request *r) { return r->peer; }

uint64_t sse_request_body_length(const sse_request *r) { return r->body_length; }

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

/* Sends resp (taken) with headers h as r's answer, or holds it: backpressure on
 * publishers. A request that queued events for streams while SSE_PUBLISHERS_AHEAD_MAX
 * such requests already wait for the next batch is answered only once that batch has
 * gone out (its connection suspended meanwhile). A publisher can then run at most that
 * far ahead of delivery, so latency stays bounded while each batch still carries many
 * events. 0, or -1 when MHD refuses. */
static int answer_or_hold(sse_request *r, int status, struct MHD_Response *resp,
                          const sse_header *h, size_t nh)
{
    if (add_headers(resp, h, nh) != 0) {
        MHD_destroy_response(resp);
        return -1;
    }
    sse_server *srv = r->srv;
    if (srv->current == r && srv->streams.wrote && srv->publishers >= SSE_PUBLISHERS_AHEAD_MAX) {
        r->held_answer = resp;
        r->held_status = (unsigned)status;
        r->held_next = srv->answers_held;
        srv->answers_held = r;
        MHD_suspend_connection(r->conn);
        request_answered(r, 0);
        return 0;
    }
    enum MHD_Result ok = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    if (ok != MHD_YES)
        return -1;
    request_answered(r, 0);
    answered_later(r);
    return 0;
}

/* 1xx are the protocol's own (100-continue, upgrades), never a final answer. */
static int answerable(const sse_request *r, int status)
{
    return !r->answered && !r->gone && status >= 200 && status <= 999;
}

int sse_request_respond(sse_request *r, int status, const sse_header *h, size_t nh,
                        const char *body, size_t len)
{
    if (!answerable(r, status))
        return -1;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)(body ? body : ""), MHD_RESPMEM_MUST_COPY);
    return resp ? answer_or_hold(r, status, resp, h, nh) : -1;
}

int sse_request_respond_file(sse_request *r, int status, const sse_header *h, size_t nh,
                             int fd, uint64_t offset, uint64_t len)
{
    /* MHD reads it in blocks of the connection's write buffer as the socket drains (or
     * uses sendfile() once told SIGPIPE is handled, MHD_OPTION_SIGPIPE_HANDLED_BY_APP),
     * so a file of any size costs no memory here. */
    struct MHD_Response *resp =
        answerable(r, status) ? MHD_create_response_from_fd_at_offset64(len, fd, offset) : NULL;
    if (!resp) {
        close(fd);
        return -1;
    }
    return answer_or_hold(r, status, resp, h, nh);   /* the response owns fd now */
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
    if (r->answered || r->gone)
        return NULL;
    sse_stream *st = sse_stream_new(&srv->streams, o->heartbeat_ms, o->heartbeat, o->gzip, r->peer);
    if (!st)
        return NULL;
    size_t block = r->http11 ? SSE_STREAM_BLOCK_CHUNKED : SSE_STREAM_BLOCK;
    struct MHD_Response *resp = MHD_create_response_from_callback(
        MHD_SIZE_UNKNOWN, block, stream_reader, st, stream_response_free);
    if (!resp) {
        sse_stream_response_done(st);
        sse_stream_release(st);
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
    MHD_destroy_response(resp);   /* runs stream_response_free now if not queued */
    if (ok != MHD_YES) {
        sse_stream_release(st);   /* the binding's reference: nobody else has it */
        return NULL;              /* still unanswered: the caller's fallback answers */
    }
    request_answered(r, 1);       /* a stream is bounded by its heartbeat, not a deadline */
    r->stream = st;
    /* Hang-ups come through the connection's EPOLLRDHUP watch (on_conn_event):
     * MHD does not read while it sends a body, so alone it would notice a dead client
     * only when a send fails. */
    if (r->c) {
        r->c->stream = st;
        r->c->trim_at = 0;
    }
    sse_stream_started(st, r->conn, r->c ? r->c->fd : -1, r->c && r->c->peer_closed);
    answered_later(r);
    return st;
}

int sse_request_defer(sse_request *r, void *ud)
{
    sse_server *srv = r->srv;
    if (r->answered || r->deferred || r->gone || srv->current != r)
        return -1;
    r->deferred = 1;
    r->ud = ud;
    r->dnext = srv->deferred;
    if (srv->deferred)
        srv->deferred->dprev = r;
    srv->deferred = r;
    if (r->c) {
        conn_unlist(r->c);       /* the app's handler decides how long it takes */
        r->c->deferred = r;
    }
    MHD_suspend_connection(r->conn);
    return 0;
}

void *sse_request_ud(const sse_request *r) { return r->ud; }
int sse_request_answered(const sse_request *r) { return r->answered; }

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
    sse_stream_hooks sh = {
        .ready = cfg->hooks->stream_ready,
        .closed = cfg->hooks->stream_closed,
        .log = cfg->hooks->log,
        .ud = cfg->ud,
    };
    sse_streams_init(&srv->streams, loop, &sh, cfg->queue_limit);
    srv->waiting.timeout_ms = cfg->request_timeout_ms;
    srv->idle.timeout_ms = cfg->keepalive_timeout_ms;
    sse_timer_init(&srv->deadlines, on_deadlines);
    return srv;
}

static void on_mhd_ready(sse_watch *w, uint32_t events)
{
    /* Nothing to do here: sse_server_run calls MHD_run after every poll. */
}

/* A TCP socket bound to host:port (0: any free port, *bound says which), listening
 * unless do_listen is 0. SO_REUSEPORT lets worker processes each bind the same port. */
static int bind_socket(const char *host, int port, int reuseport, int do_listen,
                       int *out_fd, int *bound, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof ss);
    const char *name = host;
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        sslen = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        sslen = sizeof *a6;
    } else {
        snprintf(err, errlen, "host '%s' is not a numeric IPv4 or IPv6 address", name);
        return -EINVAL;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 || (do_listen && listen(fd, 4096) != 0))
        goto fail;
    sslen = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sslen);
    *bound = ntohs(ss.ss_family == AF_INET ? a4->sin_port : a6->sin6_port);
    *out_fd = fd;
    return 0;
fail:;
    int e = errno;
    if (fd >= 0)
        close(fd);
    snprintf(err, errlen, "%s port %d: %s", name, port, strerror(e));
    return -e;
}

static int open_listener(sse_server *srv, char *err, size_t errlen)
{
    return bind_socket(srv->host, srv->cfg.port, srv->reuseport, 1, &srv->listen_fd,
                       &srv->port, err, errlen);
}

void sse_server_share_port(sse_server *srv, int port)
{
    srv->cfg.port = port;
    srv->reuseport = 1;
}

int sse_port_reserve(const char *host, int port, int *fd, int *bound, char *err, size_t errlen)
{
    return bind_socket(host, port, 1, 0, fd, bound, err, errlen);
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
                      const char *tls_priorities, char *err, size_t errlen)
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
        { MHD_OPTION_HTTPS_PRIORITIES, 0,
          (void *)(tls_priorities ? tls_priorities : SSE_TLS_PRIORITIES) },
        { MHD_OPTION_END, 0, NULL },
    };
    if (tls)
        flags |= MHD_USE_TLS;
    else
        tls_opts[0].option = MHD_OPTION_END;
    srv->tls_error[0] = '\0';
    srv->shutting_down = 0;
    srv->tls = tls;
    /* head_guard's window: twice what MHD can hold of a head, 64 KiB at least. */
    size_t cap = srv->cfg.conn_memory * 2 > 65536 ? srv->cfg.conn_memory * 2 : 65536;
    if (!tls && !srv->peek && (srv->peek = malloc(cap)))
        srv->peek_cap = cap;
    if ((!tls && !srv->peek) || (srv->cfg.max_per_ip && !srv->ips &&
        !(srv->ips = calloc(SSE_IP_BUCKETS, sizeof *srv->ips)))) {
        close(srv->listen_fd);
        srv->listen_fd = -1;
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    /* The logger first: MHD says so (and prints to stderr) otherwise. */
    srv->mhd = MHD_start_daemon(flags, 0, on_accept, srv, on_access, srv,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_LISTEN_SOCKET, (MHD_socket)srv->listen_fd,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv,
        MHD_OPTION_UNESCAPE_CALLBACK, on_unescape, srv,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, srv->cfg.conn_memory,
        MHD_OPTION_CONNECTION_LIMIT, connection_limit(srv),
        MHD_OPTION_ARRAY, tls_opts,
        MHD_OPTION_END);
    if (!srv->mhd) {
        close(srv->listen_fd);
        srv->listen_fd = -1;
        if (tls && strstr(srv->tls_error, "priorities"))
            snprintf(err, errlen, "TLS: the priority string was refused: %s", srv->tls_error);
        else if (tls)
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

void sse_server_counts_get(const sse_server *srv, sse_server_counts *out)
{
    out->streams = srv->streams.counts;
    out->requests = srv->requests;
}

int64_t sse_server_timeout(const sse_server *srv)
{
    if (sse_streams_deferred(&srv->streams) || srv->resume_pending || srv->batch_left)
        return 0;
    if (!srv->mhd)
        return -1;
    int64_t t = -1;
    if (srv->streams.to_resume || srv->answers_held) {
        t = srv->resume_at - sse_loop_now_us();
        if (t <= 0)
            return 0;
    }
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(srv->mhd, &ms) == MHD_YES) {
        int64_t m = ms > 86400000ull ? 86400000000LL : (int64_t)ms * 1000;
        /* A legitimate "at once" (a response larger than one send) ends when the socket
         * is full; one that lasts a second is a connection MHD cannot progress. */
        if (m == 0 && mhd_spinning(srv))
            m = SSE_SPIN_WAIT_US;
        if (t < 0 || m < t)
            t = m;
    }
    /* A half-closed connection with bytes unread is looked at again (close_half_closed). */
    if (srv->peer_closed && (t < 0 || t > SSE_STUCK_MS * 4000))
        t = SSE_STUCK_MS * 4000;
    return t;
}

void sse_server_run(sse_server *srv)
{
    if (srv->mhd)
        drive_mhd(srv);
    if (srv->peer_closed)
        close_half_closed(srv);
    sse_streams_run_deferred(&srv->streams, SSE_DEFER_PASSES);
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
    sse_streams_end_all(&srv->streams);
    sse_loop_now_update(srv->loop);
    uint64_t deadline = sse_loop_now(srv->loop) + drain_ms;
    sse_server_run(srv);
    while ((srv->streams.live || srv->deferred) && sse_loop_now(srv->loop) < deadline) {
        int64_t wait = (int64_t)(deadline - sse_loop_now(srv->loop)) * 1000;
        int64_t t = sse_server_timeout(srv);
        if (t >= 0 && t < wait)
            wait = t;
        sse_loop_poll(srv->loop, wait > 50000 ? 50000 : wait);
        sse_server_run(srv);
    }
    /* MHD aborts if stopped with a suspended connection. */
    tls_unpark_all(srv);
    sse_streams_wake_all(&srv->streams);
    sse_streams_resume(&srv->streams, 0, resume_stream, srv);
    srv->batch_left = 0;
    release_answers(srv);
    if (srv->deferred)
        slog(srv, SSE_LOG_WARN, "shutdown: closing requests whose handlers did not return in %u ms", drain_ms);
    while (srv->deferred)
        request_gone(srv->deferred);
    if (srv->streams.live)
        slog(srv, SSE_LOG_WARN, "shutdown: closing streams that did not drain in %u ms", drain_ms);
    sse_loop_unwatch(srv->loop, &srv->mhd_watch);
    srv->mhd_watch.fd = -1;
    MHD_stop_daemon(srv->mhd);
    srv->mhd = NULL;
    close(srv->listen_fd);
    srv->listen_fd = -1;
    srv->resume_pending = 0;
    while (sse_streams_deferred(&srv->streams))
        sse_streams_run_deferred(&srv->streams, 1);
    sse_streams_free(&srv->streams);
    sse_timer_stop(srv->loop, &srv->deadlines);
    free(srv->ips);               /* every count went with its connection */
    srv->ips = NULL;
}

void sse_server_free(sse_server *srv)
{
    if (!srv)
        return;
    sse_server_shutdown(srv, 0);
    free(srv->peek);
    free(srv);
}
