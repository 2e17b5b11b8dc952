/* Fuzzes the WHATWG parser's promise that chunking never matters: the input is fed
 * whole, in chunks whose sizes come from its first two bytes, and one byte at a time,
 * and the three runs must dispatch the same events and end with the same retry, last
 * event id and error. Half the inputs (byte 1's low bits) run with small bounds
 * (max_line, max_event), so the point where a bound fails must not depend on the
 * chunking either. Any difference aborts. */
#include "sse_parser.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Each event as three length-prefixed fields, so the runs compare as one byte string. */
static void put_field(sse_buf *b, const char *s, size_t n)
{
    if (sse_buf_append(b, &n, sizeof n) != 0 || sse_buf_append(b, s, n) != 0)
        abort();
}

static int on_event(void *ud, const char *event, size_t event_len, const char *data,
                    size_t data_len, const char *id, size_t id_len)
{
    sse_buf *b = ud;
    put_field(b, event, event_len);
    put_field(b, data, data_len);
    put_field(b, id, id_len);
    return 0;
}

typedef struct run {
    sse_parser p;
    sse_buf    events;
} run;

static void run_init(run *r, size_t max_line, size_t max_event)
{
    sse_parser_init(&r->p);
    r->p.max_line = max_line;
    r->p.max_event = max_event;
    r->events = (sse_buf)SSE_BUF_INIT;
}

static void feed(run *r, const uint8_t *s, size_t n)
{
    int rc = sse_parser_feed(&r->p, (const char *)s, n, on_event, &r->events);
    /* -ENOMEM is not expected (inputs are small); a failed bound is final */
    if (rc != 0 && !(rc == r->p.error && (rc == SSE_PARSER_ELINE || rc == SSE_PARSER_EEVENT)))
        abort();
}

static void same(const run *a, const run *b)
{
    if (a->events.len != b->events.len ||
        (a->events.len && memcmp(a->events.data, b->events.data, a->events.len) != 0))
        abort();
    if (a->p.retry != b->p.retry || a->p.error != b->p.error)
        abort();
    if (a->p.last_id.len != b->p.last_id.len ||
        (a->p.last_id.len && memcmp(a->p.last_id.data, b->p.last_id.data, a->p.last_id.len) != 0))
        abort();
}

static void run_free(run *r)
{
    sse_parser_free(&r->p);
    sse_buf_free(&r->events);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    /* Byte 0: the largest chunk (1..256); byte 1 seeds the sizes and picks the bounds.
     * The rest is the stream. */
    size_t max_chunk = (size_t)data[0] + 1;
    uint32_t seed = data[1] * 2654435761u + 1;
    const uint8_t *s = data + 2;
    size_t n = size - 2;

    size_t max_line = 0, max_event = 0;
    if (data[1] & 4) {
        max_line = 1 + (data[1] >> 3);          /* 1..32 */
        max_event = 1 + (data[1] >> 3) * 3;     /* 1..94 */
    }

    run whole, chunked, bytes;
    run_init(&whole, max_line, max_event);
    run_init(&chunked, max_line, max_event);
    run_init(&bytes, max_line, max_event);

    feed(&whole, s, n);
    for (size_t off = 0; off < n;) {
        seed ^= seed << 13, seed ^= seed >> 17, seed ^= seed << 5;   /* xorshift32 */
        size_t k = seed % max_chunk + 1;
        if (k > n - off)
            k = n - off;
        feed(&chunked, s + off, k);
        off += k;
    }
    for (size_t i = 0; i < n; i++)
        feed(&bytes, s + i, 1);

    same(&whole, &chunked);
    same(&whole, &bytes);
    run_free(&whole);
    run_free(&chunked);
    run_free(&bytes);
    return 0;
}
