/* Follows the bytes a client sends on one HTTP/1.1 connection, request after request,
 * just far enough to know where each head's lines begin and where its body ends, so
 * that a head can be judged before libmicrohttpd reads it (sse_server.c, "Heads vetted
 * before libmicrohttpd reads them"). It keeps no bytes: a few counters and a short field
 * name. Plain C, no I/O; test/test_head.c feeds it byte by byte and in one piece.
 *
 * What it refuses:
 * - obsolete line folding: a header (or the first header) line that starts with a space
 *   or tab (RFC 9112 5.2), which libmicrohttpd 0.9.75 joins to the line before with an
 *   overlapping memcpy (docs/libmicrohttpd.md, "Folded header lines");
 * - a TLS record as the first byte of a connection (0x16, a ClientHello): TLS sent to a
 *   plain port.
 * Where it cannot follow the framing (a Transfer-Encoding, a Content-Length that is not
 * one plain decimal number), it stops: the server refuses such a request and closes the
 * connection anyway (check_head in sse_server.c), so no later request comes on it. */
#ifndef SSE_HEAD_H
#define SSE_HEAD_H

#include <stddef.h>
#include <stdint.h>

typedef enum sse_head_verdict {
    SSE_HEAD_FINE,      /* nothing wrong so far */
    SSE_HEAD_FOLDED,    /* a header line starts with SP or HTAB */
    SSE_HEAD_TLS,       /* the connection starts with a TLS record */
    SSE_HEAD_LOST       /* framing it does not follow: no verdict on what comes after */
} sse_head_verdict;

typedef struct sse_head_scan {
    uint64_t offset;      /* bytes of the connection taken in (bodies included) */
    uint64_t body_left;   /* of the current request's body */
    uint64_t length;      /* its Content-Length (the first one) */
    uint64_t value;       /* the Content-Length value being read */
    int      state;
    int      verdict;     /* sse_head_verdict; sticks once not FINE */
    unsigned name_len;    /* of the field name being read (capped at sizeof name) */
    char     name[20];    /* ... lowercased */
    unsigned digits;      /* of the Content-Length value being read */
    int      value_bad;   /* ... it has something other than digits */
    int      value_cr;    /* ... and a CR that may end it */
    int      lengths;     /* Content-Length fields in this head */
    int      framing_bad; /* two that differ, a malformed one, or a Transfer-Encoding */
} sse_head_scan;

void sse_head_init(sse_head_scan *s);

/* Takes in the next n bytes of the connection; returns the verdict so far. */
sse_head_verdict sse_head_feed(sse_head_scan *s, const char *p, size_t n);

/* How many of the next bytes are body, which the scan may take in unseen
 * (sse_head_skip), 0 outside a body. */
uint64_t sse_head_body_left(const sse_head_scan *s);
void sse_head_skip(sse_head_scan *s, uint64_t n);

#endif
