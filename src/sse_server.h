/* sse_server: the libmicrohttpd glue. MHD runs in external-epoll mode inside sse_loop on
 * the caller's thread; streams are suspended while their queue is empty and resumed when
 * bytes arrive (docs/libmicrohttpd.md says why each step is as it is).
 * Plain C, no Lua: the binding sees requests and streams through the hooks below.
 */
#ifndef SSE_SERVER_H
#define SSE_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include "sse_log.h"
#include "sse_loop.h"
#include "sse_queue.h"
#include "sse_stream.h"

typedef struct sse_server  sse_server;
typedef struct sse_request sse_request;

typedef struct sse_header {
    const char *name;
    const char *value;
} sse_header;


typedef struct sse_server_hooks {
    /* The head of a request that announces a body has arrived (the body has not been read):
     * the hook may answer now (404, 405, 413...), and the body is then never read; else
     * the request hook runs once the body is in. Runs inside MHD_run. Optional. */
    void (*admit)(void *ud, sse_request *r);
    /* A complete request (headers and body). Runs inside MHD_run: it must answer with
     * sse_request_respond or sse_request_stream, or defer the answer (sse_request_defer);
     * if it does none of them the client gets 500. */
    void (*request)(void *ud, sse_request *r);
    /* A deferred request (sse_request_defer) will never be answered: its client hung up,
     * or the server is stopping. r is freed afterwards: the binding forgets it here.
     * Runs outside MHD_run. */
    void (*request_gone)(void *ud, sse_request *r);
    /* The stream's writer may run: just started, or its queue drained below the low-water
     * mark after sse_stream_want_drain. Runs outside MHD_run. */
    void (*stream_ready)(void *ud, sse_stream *s);
    /* The stream has ended (client gone, dropped, closed, shutdown). Runs outside MHD_run,
     * once; afterwards the binding only calls sse_stream_release. */
    void (*stream_closed)(void *ud, sse_stream *s);
    void (*log)(void *ud, int level, const char *msg);
} sse_server_hooks;

typedef struct sse_server_config {
    const char *host;             /* numeric IPv4 or IPv6 address */
    int         port;             /* 0: any free port */
    unsigned    max_connections;  /* 0: as many as the descriptor limit allows */
    size_t      max_body;         /* bytes; larger request bodies get 413 */
    size_t      queue_limit;      /* bytes pending on one stream before the client is dropped */
    size_t      conn_memory;      /* libmicrohttpd's memory pool per connection */
    unsigned    request_timeout_ms;   /* head and body must arrive within this (0: none) */
    unsigned    keepalive_timeout_ms; /* an idle kept-alive connection is closed after this */
    unsigned    max_per_ip;       /* connections from one address (0: no limit) */
    const sse_server_hooks *hooks;
    void       *ud;
} sse_server_config;

sse_server *sse_server_new(sse_loop *loop, const sse_server_config *cfg);  /* NULL: ENOMEM */
void        sse_server_free(sse_server *s);   /* shuts down first if still listening */

/* Binds and starts the daemon: HTTPS when tls_cert and tls_key (PEM text, copied) are
 * given, else plain HTTP. tls_priorities: a GnuTLS priority string (NULL: TLS 1.2 and 1.3
 * with GnuTLS's NORMAL ciphers). 0, or -errno with a message in err. */
int  sse_server_listen(sse_server *s, const char *tls_cert, const char *tls_key,
                       const char *tls_priorities, char *err, size_t errlen);
int  sse_server_port(const sse_server *s);
/* A worker: the next listen is on this port, shared (SO_REUSEPORT) with the others. */
void sse_server_share_port(sse_server *s, int port);
/* Binds host:port with SO_REUSEPORT without listening: the parent of worker processes
 * holds the port (port 0: a free one, *bound says which) that each worker then listens
 * on. 0 or -errno with a message in err. */
int  sse_port_reserve(const char *host, int port, int *fd, int *bound, char *err, size_t errlen);
int  sse_server_listening(const sse_server *s);
unsigned sse_server_connections(const sse_server *s);
/* What the server has done since it was made: its streams' counts, and requests
 * answered (responses and streams). */
typedef struct sse_server_counts {
    sse_stream_counts streams;
    uint64_t          requests;
} sse_server_counts;
void sse_server_counts_get(const sse_server *s, sse_server_counts *out);

/* How long the next poll may wait (microseconds; -1: no limit) so MHD and pending work
 * are served. */
int64_t sse_server_timeout(const sse_server *s);
/* After each poll: drives MHD (with the pending-resume loop) and runs deferred hooks. */
void sse_server_run(sse_server *s);
/* Graceful stop: stop accepting, end every stream after its queue drains, wait at most
 * drain_ms for clients to finish, then stop the daemon. Runs the loop itself. */
void sse_server_shutdown(sse_server *s, unsigned drain_ms);

/* --- requests (valid inside the request hook; a deferred one until it is answered) --- */
typedef void (*sse_kv_cb)(void *ud, const char *key, const char *value, size_t value_len);
const char *sse_request_method(const sse_request *r);
const char *sse_request_path(const sse_request *r);        /* percent-decoded, no query */
const char *sse_request_body(const sse_request *r, size_t *len);  /* NULL: no body */
uint64_t    sse_request_body_length(const sse_request *r);  /* announced (Content-Length) */
const char *sse_request_peer(const sse_request *r);        /* "127.0.0.1:40512" */
void sse_request_headers(sse_request *r, sse_kv_cb cb, void *ud);
void sse_request_query(sse_request *r, sse_kv_cb cb, void *ud);

/* A complete response. 0, or -1 when it cannot be sent (already answered, a status
 * outside 200-999, a header MHD refuses): the request is then still unanswered. */
int sse_request_respond(sse_request *r, int status, const sse_header *h, size_t nh,
                        const char *body, size_t len);

/* A response whose body is len bytes of the regular file fd from offset, sent by MHD
 * from the descriptor (never read into memory here). Takes fd: it is closed when the
 * response is done, and on failure too. 0 or -1 as sse_request_respond. */
int sse_request_respond_file(sse_request *r, int status, const sse_header *h, size_t nh,
                             int fd, uint64_t offset, uint64_t len);

/* Starts a stream (sse_stream.h): 200 with these headers and a body that stays open.
 * The stream_ready hook runs for it after MHD_run. The binding owns one reference
 * (sse_stream_release). NULL on failure (the request is then still unanswered). */
typedef struct sse_stream_opts {
    const sse_header *headers;
    size_t            nheaders;
    unsigned          heartbeat_ms;  /* after this much silence (0: never) ... */
    const char       *heartbeat;     /* ... this static string is sent (":\n\n" for SSE) */
    int               gzip;          /* compress the body (the caller checked Accept-Encoding
                                        and sends Content-Encoding) */
} sse_stream_opts;
sse_stream *sse_request_stream(sse_request *r, const sse_stream_opts *o);

/* From the request hook: the answer comes later. The connection is suspended (no
 * deadline: the app decides how long its handler takes) and r stays valid until it is
 * answered (sse_request_respond, _respond_file or _stream, from anywhere on the loop's
 * thread) or the request_gone hook runs. ud is the binding's (sse_request_ud). 0, or -1
 * if r is already answered or this is not its hook. */
int   sse_request_defer(sse_request *r, void *ud);
void *sse_request_ud(const sse_request *r);
int   sse_request_answered(const sse_request *r);

#endif
