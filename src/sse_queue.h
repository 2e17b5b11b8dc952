/* sse_queue: the bytes waiting to be sent on one stream.
 *
 * A queue is a ring of pointers to reference-counted chunks. A chunk that only this
 * queue holds stays writable at its tail, so many small events from one generator
 * coalesce into one chunk; a chunk shared by many queues (a channel publish: encoded
 * once, pushed to every subscriber) is never written again. The reader copies across
 * chunks, so one reader call can carry many events.
 * Plain C, no Lua. Functions return 0 or -ENOMEM.
 */
#ifndef SSE_QUEUE_H
#define SSE_QUEUE_H

#include <stddef.h>

typedef struct sse_chunk {
    unsigned          refs;
    unsigned          frozen; /* pushed to queues (shared): never written again */
    size_t            len;
    size_t            cap;
    struct sse_chunk *gz;     /* its compressed twin, made once for all gzip streams */
    unsigned long     crc;    /* CRC-32 of data, set with gz */
    char              data[];
} sse_chunk;

/* A new chunk with refs = 1 and room for cap bytes. NULL on ENOMEM. */
sse_chunk *sse_chunk_new(size_t cap);
void sse_chunk_ref(sse_chunk *c);
void sse_chunk_unref(sse_chunk *c);

typedef struct sse_queue {
    sse_chunk **ring;
    unsigned    cap;     /* slots in ring (a power of two, or 0) */
    unsigned    head;    /* index of the oldest chunk */
    unsigned    count;   /* chunks in the ring */
    size_t      offset;  /* bytes of the head chunk already sent */
    size_t      bytes;   /* bytes pending in all (what queue_limit is compared with) */
} sse_queue;

#define SSE_QUEUE_INIT { NULL, 0, 0, 0, 0, 0 }

/* Appends a shared chunk (takes a new reference). */
int sse_queue_push(sse_queue *q, sse_chunk *c);

/* Returns a pointer where n bytes can be written at the end of the queue: inside the
 * tail chunk if this queue is its only holder and it has room, else in a new chunk.
 * Follow with sse_queue_commit(q, n). NULL on ENOMEM. */
char *sse_queue_reserve(sse_queue *q, size_t n);
void  sse_queue_commit(sse_queue *q, size_t n);

/* The oldest chunk and how much of it was read (NULL when empty); pop drops it. */
sse_chunk *sse_queue_peek(const sse_queue *q, size_t *offset);
void       sse_queue_pop(sse_queue *q);

/* Copies up to max pending bytes into buf and consumes them; returns the count. */
size_t sse_queue_read(sse_queue *q, char *buf, size_t max);

/* Drops everything pending and frees the ring. */
void sse_queue_clear(sse_queue *q);

#endif
