/* sse_head: the verdicts on request streams, fed in one piece and byte by byte (a head
 * split anywhere across reads must get the same verdict, at the same byte). */
#include "sse_head.h"

#include "check.h"

#include <string.h>

static const char *names[] = { "fine", "folded", "tls", "lost" };

typedef struct {
    const char *what;
    const char *bytes;
    size_t      len;        /* 0: strlen(bytes) */
    int         verdict;
} head_case;

#define S(s) s, sizeof(s) - 1

static const head_case cases[] = {
    { "a GET", S("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), SSE_HEAD_FINE },
    { "bare LFs", S("GET / HTTP/1.1\nHost: a\n\n"), SSE_HEAD_FINE },
    { "a folded line", S("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n"), SSE_HEAD_FOLDED },
    { "a folded line (tab)", S("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n"), SSE_HEAD_FOLDED },
    { "a fold after a bare LF", S("GET / HTTP/1.1\nHost: a\n x\n\n"), SSE_HEAD_FOLDED },
    { "space before the first header", S("GET / HTTP/1.1\r\n Host: a\r\n\r\n"), SSE_HEAD_FOLDED },
    { "a space inside a line is not a fold", S("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), SSE_HEAD_FINE },
    { "a lone CR does not end a line", S("GET / HTTP/1.1\r\nHost: a\r b\r\n\r\n"), SSE_HEAD_FINE },
    { "empty lines before the request line", S("\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), SSE_HEAD_FINE },
    { "a body that looks like a fold is a body",
      S("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nx\r\n y\r\n z"
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n"), SSE_HEAD_FINE },
    { "a fold in the request after a body",
      S("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n"), SSE_HEAD_FOLDED },
    { "a fold in the second pipelined request",
      S("GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\t2\r\n\r\n"),
      SSE_HEAD_FOLDED },
    { "content-length, any case, spaces before", S("POST / HTTP/1.1\r\ncOnTeNt-LeNgTh: \t 2\r\n\r\n\r\n"
      "GET / HTTP/1.1\r\n\r\n"), SSE_HEAD_FINE },
    { "the same length twice", S("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n "
      "GET / HTTP/1.1\r\nX: 1\r\n 2\r\n\r\n"), SSE_HEAD_FOLDED },
    { "two lengths that differ", S("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
      SSE_HEAD_LOST },
    { "a length with a space after", S("POST / HTTP/1.1\r\nContent-Length: 1 \r\n\r\na"), SSE_HEAD_LOST },
    { "a length with a sign", S("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\na"), SSE_HEAD_LOST },
    { "an empty length", S("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n"), SSE_HEAD_LOST },
    { "a length of 20 digits", S("POST / HTTP/1.1\r\nContent-Length: 00000000000000000001\r\n\r\n"),
      SSE_HEAD_LOST },
    { "a CR inside the length", S("POST / HTTP/1.1\r\nContent-Length: 1\r2\r\n\r\n"), SSE_HEAD_LOST },
    { "a transfer coding", S("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\r\n"), SSE_HEAD_LOST },
    { "a name that only starts like content-length",
      S("POST / HTTP/1.1\r\nContent-Lengthy: 5\r\n\r\nGET / HTTP/1.1\r\nX: 1\r\n 2\r\n"), SSE_HEAD_FOLDED },
    { "a ClientHello", S("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), SSE_HEAD_TLS },
    { "0x16 later is not TLS", S("\r\n\x16\x03\x01"), SSE_HEAD_FINE },
    { "a folded line with a NUL before it", "GET / HTTP/1.1\r\nA: \0\r\n b\r\n\r\n", 28, SSE_HEAD_FOLDED },
};

/* Feeds c in pieces of `step` bytes (0: at once); the verdict, and where it came. */
static int feed(const head_case *c, size_t step, uint64_t *at)
{
    sse_head_scan s;
    sse_head_init(&s);
    size_t n = c->len ? c->len : strlen(c->bytes);
    *at = 0;
    int v = SSE_HEAD_FINE;
    for (size_t off = 0; off < n;) {
        size_t k = step && step < n - off ? step : n - off;
        v = sse_head_feed(&s, c->bytes + off, k);
        off += k;
        if (v != SSE_HEAD_FINE && !*at)
            *at = off;
    }
    return v;
}

static void test_cases(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t at_once, at_byte;
        int v = feed(&cases[i], 0, &at_once);
        CHECK(v == cases[i].verdict, "%s: %s, expected %s", cases[i].what, names[v],
              names[cases[i].verdict]);
        for (size_t step = 1; step <= 7; step++) {
            int w = feed(&cases[i], step, &at_byte);
            CHECK(w == v, "%s in pieces of %zu: %s, at once %s", cases[i].what, step,
                  names[w], names[v]);
        }
        feed(&cases[i], 1, &at_byte);
        if (v == SSE_HEAD_FOLDED) {   /* byte by byte: at the SP/HT itself */
            size_t n = cases[i].len ? cases[i].len : strlen(cases[i].bytes);
            const char *p = cases[i].bytes + at_byte - 1;
            CHECK(at_byte <= n && (*p == ' ' || *p == '\t') && p[-1] == '\n',
                  "%s: the fold was seen at byte %llu", cases[i].what,
                  (unsigned long long)at_byte);
        }
    }
}

/* A body is taken in unseen: sse_head_skip moves over it, the scan goes on after it. */
static void test_skip(void)
{
    sse_head_scan s;
    sse_head_init(&s);
    const char *head = "POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n";
    CHECK(sse_head_feed(&s, head, strlen(head)) == SSE_HEAD_FINE, "head");
    CHECK(sse_head_body_left(&s) == 1000000, "body left %llu",
          (unsigned long long)sse_head_body_left(&s));
    sse_head_skip(&s, 999999);
    CHECK(sse_head_body_left(&s) == 1, "one left");
    const char *rest = "xGET / HTTP/1.1\r\nA: 1\r\n\t2\r\n";
    CHECK(sse_head_feed(&s, rest, strlen(rest)) == SSE_HEAD_FOLDED, "the fold after the body");
    CHECK(s.offset == strlen(head) + 999999 + strlen(rest), "offset %llu",
          (unsigned long long)s.offset);
    sse_head_skip(&s, 5);   /* no body: nothing skipped */
    CHECK(sse_head_body_left(&s) == 0, "no body after a verdict");
}

int main(void)
{
    test_cases();
    test_skip();
    printf("test_head: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
