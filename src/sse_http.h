/* sse_http: outbound HTTP(S) requests on libcurl's multi interface, driven by sse_loop.
 * curl tells us which sockets to watch and when its one timeout is due; the loop's
 * callbacks hand events back to curl_multi_socket_action. No thread of ours, no polling.
 * Plain C, no Lua, single-threaded: every call on the loop's thread.
 *
 * Callbacks of a transfer, in order: head (at most once), data (zero or more pieces, as
 * they arrive), done (exactly once, unless the transfer was cancelled). After done
 * returns, the transfer is freed.
 */
#ifndef SSE_HTTP_H
#define SSE_HTTP_H

#include <stddef.h>

#include "sse_loop.h"

typedef struct sse_http sse_http;
typedef struct sse_http_transfer sse_http_transfer;

typedef struct sse_http_request {
    const char         *method;     /* NULL: "GET" ("HEAD" asks for no body) */
    const char         *url;        /* http:// or https:// only */
    const char *const  *headers;    /* "Name: value", no CR or LF */
    size_t              nheaders;
    const char         *body;       /* copied at start; NULL: none */
    size_t              body_len;
    long                timeout_ms; /* the whole transfer; 0: none (a stream) */
    size_t              max_size;   /* body bytes; 0: no limit */
    int                 insecure;   /* TLS: do not verify peer and host */
    const char         *ca_file;    /* TLS: CA bundle; NULL: the system's */
    int                 follow_redirects;  /* up to 10 */
} sse_http_request;

typedef struct sse_http_handler {
    /* The final response's status and header lines ("Name: value"), valid during the
     * call only. Not called for 1xx responses nor for redirects being followed. */
    void (*head)(void *ud, long status, const char *const *headers, size_t n);
    /* A piece of the body as it arrived. Non-zero: cancel (no done follows). */
    int  (*data)(void *ud, const char *p, size_t n);
    /* err: 0 or an SSE_HTTP_E* / CURLcode value; msg: NULL when err is 0. */
    void (*done)(void *ud, int err, const char *msg);
} sse_http_handler;

/* err values with a name (they are CURLcode values: sse_http.c checks they match). */
enum {
    SSE_HTTP_OK        = 0,
    SSE_HTTP_ETIMEOUT  = 28,   /* CURLE_OPERATION_TIMEDOUT */
    SSE_HTTP_ETOOLARGE = 63,   /* CURLE_FILESIZE_EXCEEDED: body past max_size, or headers past 256 KB */
};

/* A short class of err for error values in a binding: "timeout", "dns", "connect",
 * "tls", "too_large", "http" (protocol or I/O) or "other"; NULL for 0. */
const char *sse_http_error_kind(int err);

sse_http *sse_http_new(sse_loop *loop);   /* NULL on failure (curl or memory) */
/* Cancels every transfer (no callback runs) and releases curl. Not from a callback. */
void      sse_http_free(sse_http *h);

/* Starts a transfer. On bad input or failure returns NULL and sets *err (if err is not
 * NULL) to a static message; no callback runs then. cb is copied; ud is passed back.
 * May be called from any callback, also a transfer's own. */
sse_http_transfer *sse_http_start(sse_http *h, const sse_http_request *rq,
                                  const sse_http_handler *cb, void *ud, const char **err);

/* Stops a transfer: no callback of it runs after this returns. The rule for t: it is
 * valid from start until its done callback returns or until it is cancelled. Inside any
 * callback of this sse_http, memory is released only after that callback returns, so a
 * second cancel of t there, or a cancel of t inside its own done, is a harmless no-op;
 * outside callbacks t is freed at once and must not be used again (a binding forgets t
 * in done and when it cancels). May be called from any callback, also t's own. */
void sse_http_cancel(sse_http_transfer *t);

/* Connections curl keeps alive for reuse (at most 16) are all closed once no transfer has
 * run for ms milliseconds (default 5000; 0: as soon as the last one ends). */
void sse_http_set_idle(sse_http *h, unsigned ms);

/* For tests and diagnostics: live transfers (curl easy handles) and socket watches. */
size_t sse_http_transfers(const sse_http *h);
size_t sse_http_watches(const sse_http *h);

#endif
