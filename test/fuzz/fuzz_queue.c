/* Fuzzes the stream queue against the obvious model: a byte string per queue. The input
 * is a program of operations on two queues (reserve/commit, pushes of chunks shared by
 * both queues and the harness, reads with any max, pops, clears); after each one, the
 * bytes read or popped must be the next bytes of the model, in order, and `bytes` must
 * equal what the model has pending. Every written byte comes from one counter, so a
 * byte out of place, repeated or lost shows up; a shared chunk written again after it
 * was pushed shows up as a wrong byte in the other queue. */
#include "sse_queue.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(c) do { if (!(c)) abort(); } while (0)

typedef struct model {
    uint8_t *bytes;    /* everything written since the last clear */
    size_t   len, cap;
    size_t   head;     /* how much of it was consumed */
} model;

static void model_put(model *m, const void *p, size_t n)
{
    if (n == 0)
        return;
    if (m->len + n > m->cap) {
        m->cap = (m->len + n) * 2;
        m->bytes = realloc(m->bytes, m->cap);
        CHECK(m->bytes);
    }
    memcpy(m->bytes + m->len, p, n);
    m->len += n;
}

/* The queue gave out these bytes: they must be the model's next ones. */
static void model_take(model *m, const void *p, size_t n)
{
    CHECK(n <= m->len - m->head);
    CHECK(n == 0 || memcmp(m->bytes + m->head, p, n) == 0);
    m->head += n;
}

static const uint8_t *in, *in_end;
static unsigned next(void) { return in < in_end ? *in++ : 0; }

static uint8_t counter;
static void fill(char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (char)(counter = counter == 250 ? 0 : counter + 1);   /* period 251: not a power of two */
}

#define POOL 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sse_queue q[2] = { SSE_QUEUE_INIT, SSE_QUEUE_INIT };
    model m[2] = { { 0 } };
    sse_chunk *pool[POOL] = { 0 };   /* chunks the harness still holds a reference to */
    static char buf[1 << 14];
    in = data, in_end = data + size;
    counter = 0;

    while (in < in_end) {
        unsigned op = next();
        int k = op & 1;                      /* which queue */
        sse_queue *qk = &q[k];
        model *mk = &m[k];
        switch ((op >> 1) % 7) {
        case 0: {   /* reserve n, fill, commit n or less */
            size_t n = next() | (next() & 0x1f) << 8;
            size_t c = op & 0x80 ? n : n - next() % (n + 1);
            char *p = sse_queue_reserve(qk, n);
            CHECK(p);
            fill(p, c);
            model_put(mk, p, c);
            sse_queue_commit(qk, c);
            break;
        }
        case 1: {   /* a new shared chunk into the pool (any length, zero too) */
            int slot = next() % POOL;
            sse_chunk_unref(pool[slot]);
            size_t n = next() | (next() & 0x0f) << 8;
            pool[slot] = sse_chunk_new(n);
            CHECK(pool[slot]);
            fill(pool[slot]->data, n);
            pool[slot]->len = n;
            break;
        }
        case 2: {   /* push a pooled chunk (again, or into the other queue too) */
            sse_chunk *c = pool[next() % POOL];
            if (!c)
                break;
            CHECK(sse_queue_push(qk, c) == 0);
            model_put(mk, c->data, c->len);
            if (op & 0x80) {   /* the publisher lets go at once */
                for (int i = 0; i < POOL; i++)
                    if (pool[i] == c)
                        pool[i] = NULL;
                sse_chunk_unref(c);
            }
            break;
        }
        case 3: {   /* read with any max */
            size_t max = (next() | next() << 8) % (sizeof buf + 1);
            size_t got = sse_queue_read(qk, buf, max);
            size_t pending = mk->len - mk->head;
            CHECK(got == (max < pending ? max : pending));
            model_take(mk, buf, got);
            break;
        }
        case 4: {   /* peek and pop the head chunk */
            size_t off;
            sse_chunk *c = sse_queue_peek(qk, &off);
            CHECK((c == NULL) == (qk->count == 0));
            if (!c)
                break;
            CHECK(off <= c->len);
            model_take(mk, c->data + off, c->len - off);
            sse_queue_pop(qk);
            break;
        }
        case 5:     /* clear */
            sse_queue_clear(qk);
            mk->len = mk->head = 0;
            break;
        case 6: {   /* drop the harness's reference to a pooled chunk */
            int slot = next() % POOL;
            sse_chunk_unref(pool[slot]);
            pool[slot] = NULL;
            break;
        }
        }
        for (int i = 0; i < 2; i++) {
            CHECK(q[i].bytes == m[i].len - m[i].head);
            CHECK(q[i].count <= q[i].cap);
        }
    }

    /* Drain what is left: the rest must come out in order, then nothing is held. */
    for (int i = 0; i < 2; i++) {
        size_t got;
        while ((got = sse_queue_read(&q[i], buf, sizeof buf)) > 0)
            model_take(&m[i], buf, got);
        CHECK(m[i].head == m[i].len && q[i].bytes == 0);
        sse_queue_clear(&q[i]);
        free(m[i].bytes);
    }
    for (int i = 0; i < POOL; i++)
        sse_chunk_unref(pool[i]);
    return 0;
}
