#include "sse_queue.h"

#include <stdlib.h>
#include <string.h>

/* New chunks get at least this much room so a burst of small events coalesces
 * into one allocation instead of one per event. */
#define SSE_CHUNK_MIN 4096

sse_chunk *sse_chunk_new(size_t cap)
{
    sse_chunk *c = malloc(sizeof *c + cap);
    if (!c)
        return NULL;
    c->refs = 1;
    c->frozen = 0;
    c->len = 0;
    c->cap = cap;
    c->gz = NULL;
    c->crc = 0;
    return c;
}

void sse_chunk_ref(sse_chunk *c)
{
    c->refs++;
}

void sse_chunk_unref(sse_chunk *c)
{
    if (c && --c->refs == 0) {
        sse_chunk_unref(c->gz);
        free(c);
    }
}

static int grow_ring(sse_queue *q)
{
    unsigned ncap = q->cap ? q->cap * 2 : 4;
    sse_chunk **r = malloc(ncap * sizeof *r);
    if (!r)
        return -1;
    /* Unwrap the ring so the oldest chunk is at slot 0. */
    for (unsigned i = 0; i < q->count; i++)
        r[i] = q->ring[(q->head + i) & (q->cap - 1)];
    free(q->ring);
    q->ring = r;
    q->cap = ncap;
    q->head = 0;
    return 0;
}

static int append_chunk(sse_queue *q, sse_chunk *c)
{
    if (q->count == q->cap && grow_ring(q) != 0)
        return -1;
    q->ring[(q->head + q->count) & (q->cap - 1)] = c;
    q->count++;
    return 0;
}

static sse_chunk *tail(const sse_queue *q)
{
    return q->count ? q->ring[(q->head + q->count - 1) & (q->cap - 1)] : NULL;
}

int sse_queue_push(sse_queue *q, sse_chunk *c)
{
    if (append_chunk(q, c) != 0)
        return -1;
    sse_chunk_ref(c);
    c->frozen = 1;
    q->bytes += c->len;
    return 0;
}

char *sse_queue_reserve(sse_queue *q, size_t n)
{
    sse_chunk *t = tail(q);
    /* Only a chunk no one else holds may grow: shared chunks are immutable. */
    if (t && !t->frozen && t->refs == 1 && t->cap - t->len >= n)
        return t->data + t->len;
    sse_chunk *c = sse_chunk_new(n > SSE_CHUNK_MIN ? n : SSE_CHUNK_MIN);
    if (!c)
        return NULL;
    if (append_chunk(q, c) != 0) {
        free(c);
        return NULL;
    }
    return c->data;
}

void sse_queue_commit(sse_queue *q, size_t n)
{
    tail(q)->len += n;
    q->bytes += n;
}

sse_chunk *sse_queue_peek(const sse_queue *q, size_t *offset)
{
    if (!q->count)
        return NULL;
    *offset = q->offset;
    return q->ring[q->head];
}

void sse_queue_pop(sse_queue *q)
{
    sse_chunk *c = q->ring[q->head];
    q->bytes -= c->len - q->offset;
    sse_chunk_unref(c);
    q->head = (q->head + 1) & (q->cap - 1);
    q->count--;
    q->offset = 0;
    if (q->count == 0) {
        free(q->ring);
        q->ring = NULL;
        q->cap = q->head = 0;
    }
}

size_t sse_queue_read(sse_queue *q, char *buf, size_t max)
{
    size_t done = 0;
    while (q->count && done < max) {
        sse_chunk *c = q->ring[q->head];
        size_t avail = c->len - q->offset;
        size_t n = avail < max - done ? avail : max - done;
        memcpy(buf + done, c->data + q->offset, n);
        done += n;
        q->offset += n;
        if (q->offset == c->len) {
            /* Drained chunks are freed at once, even an unshared tail that could be
             * reused: an idle stream then holds no buffer at all. */
            sse_chunk_unref(c);
            q->head = (q->head + 1) & (q->cap - 1);
            q->count--;
            q->offset = 0;
        }
    }
    q->bytes -= done;
    if (q->count == 0) {
        free(q->ring);
        q->ring = NULL;
        q->cap = q->head = 0;
    }
    return done;
}

void sse_queue_clear(sse_queue *q)
{
    for (unsigned i = 0; i < q->count; i++)
        sse_chunk_unref(q->ring[(q->head + i) & (q->cap - 1)]);
    free(q->ring);
    *q = (sse_queue)SSE_QUEUE_INIT;
}
