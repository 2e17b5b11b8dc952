/* C tests of the stream byte queue: coalescing into an unshared tail, shared chunks
 * never written again, reads that cross chunks and stop part-way, accounting. */
#include "sse_queue.h"
#include "check.h"

#include <stdio.h>
#include <string.h>


static void put(sse_queue *q, const char *s)
{
    size_t n = strlen(s);
    char *p = sse_queue_reserve(q, n);
    memcpy(p, s, n);
    sse_queue_commit(q, n);
}

static void test_coalesce(void)
{
    sse_queue q = SSE_QUEUE_INIT;
    put(&q, "data: a\n\n");
    put(&q, "data: b\n\n");
    CHECK(q.count == 1, "small writes share one chunk, got %u chunks", q.count);
    CHECK(q.bytes == 18, "bytes counted: %zu", q.bytes);
    char buf[64];
    size_t n = sse_queue_read(&q, buf, sizeof buf);
    CHECK(n == 18 && memcmp(buf, "data: a\n\ndata: b\n\n", 18) == 0, "read both: %zu", n);
    CHECK(q.bytes == 0 && q.count == 0 && q.ring == NULL, "drained queue holds nothing");
    sse_queue_clear(&q);
}

static void test_shared_chunk_not_written(void)
{
    sse_chunk *c = sse_chunk_new(16);
    memcpy(c->data, "data: x\n\n", 9);
    c->len = 9;
    sse_queue a = SSE_QUEUE_INIT, b = SSE_QUEUE_INIT;
    sse_queue_push(&a, c);
    sse_queue_push(&b, c);
    sse_chunk_unref(c);              /* the publisher's reference */
    CHECK(c->refs == 2, "two queues hold it: %u", c->refs);
    put(&a, "data: y\n\n");           /* must not land inside the shared chunk */
    CHECK(c->len == 9, "shared chunk untouched: len %zu", c->len);
    CHECK(a.count == 2, "private write got its own chunk: %u", a.count);
    char buf[64];
    size_t n = sse_queue_read(&b, buf, sizeof buf);
    CHECK(n == 9 && memcmp(buf, "data: x\n\n", 9) == 0, "b reads only the shared event");
    n = sse_queue_read(&a, buf, sizeof buf);
    CHECK(n == 18 && memcmp(buf, "data: x\n\ndata: y\n\n", 18) == 0, "a reads both in order");
    sse_queue_clear(&a);
    sse_queue_clear(&b);
}

static void test_partial_reads(void)
{
    sse_queue q = SSE_QUEUE_INIT;
    char big[10000];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (char)('a' + i % 26);
    for (int k = 0; k < 3; k++) {
        char *p = sse_queue_reserve(&q, sizeof big);
        memcpy(p, big, sizeof big);
        sse_queue_commit(&q, sizeof big);
    }
    CHECK(q.bytes == 30000, "bytes: %zu", q.bytes);
    char out[30000];
    size_t got = 0;
    /* Odd read sizes cross chunk boundaries at every offset. */
    while (q.bytes) {
        size_t n = sse_queue_read(&q, out + got, 777);
        CHECK(n > 0 && n <= 777, "read returns 1..max: %zu", n);
        if (n == 0)
            break;
        got += n;
    }
    int same = got == 30000;
    for (size_t i = 0; same && i < got; i++)
        same = out[i] == big[i % sizeof big];
    CHECK(same, "bytes arrive in order across chunks (%zu)", got);
    CHECK(sse_queue_read(&q, out, 10) == 0, "empty queue reads 0");
    sse_queue_clear(&q);
}

static void test_ring_growth(void)
{
    sse_queue q = SSE_QUEUE_INIT;
    sse_chunk *c = sse_chunk_new(4);
    memcpy(c->data, "abcd", 4);
    c->len = 4;
    /* Interleave reads and pushes so the ring wraps before it grows. */
    char buf[8];
    size_t total = 0;
    for (int i = 0; i < 100; i++) {
        sse_queue_push(&q, c);
        if (i % 3 == 0)
            total += sse_queue_read(&q, buf, 4);
    }
    CHECK(c->refs == 1 + q.count, "one reference per queued slot: %u vs %u", c->refs, q.count);
    CHECK(q.bytes == 400 - total, "bytes after wraps: %zu", q.bytes);
    sse_queue_clear(&q);
    CHECK(c->refs == 1, "clear drops every reference: %u", c->refs);
    sse_chunk_unref(c);
}

int main(void)
{
    test_coalesce();
    test_shared_chunk_not_written();
    test_partial_reads();
    test_ring_growth();
    printf("test_queue: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
