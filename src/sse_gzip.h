/* sse_gzip: a gzip response body that still streams.
 *
 * Each stream has its own small raw-deflate state; every batch of its own bytes is
 * compressed and sync-flushed, so each event can be decompressed the moment it arrives.
 * The gzip header and trailer are written here (CRC-32 and length of all plaintext).
 *
 * Large channel events are not compressed once per subscriber: a shared chunk of at
 * least SSE_GZIP_SPLICE_MIN bytes gets a compressed twin, made once with a fresh deflate
 * state and sync-flushed, so its blocks reference nothing before them and can be spliced
 * into any gzip stream. (A small event compressed alone gains nothing — its repeats are
 * in the events before it — so small shared events go through each stream's own
 * compressor, which remembers them: cheap for small events, and it pays.) After a splice
 * the stream's own compressor is given the spliced plaintext as its dictionary (raw
 * deflate allows that after a flush), so its later back-references match what the client
 * has decoded. CRCs are joined with crc32_combine.
 * Plain C, no Lua; needs zlib.
 */
#ifndef SSE_GZIP_H
#define SSE_GZIP_H

#include <stddef.h>
#include "sse_buf.h"
#include "sse_queue.h"

/* Per-stream cost: deflate's state with a 2^SSE_GZIP_WBITS window and memLevel
 * SSE_GZIP_MEMLEVEL (measured in the README), allocated on first use. */
#define SSE_GZIP_WBITS    10
#define SSE_GZIP_MEMLEVEL 2

/* Shared chunks from this size on are spliced as twins (see above). */
#define SSE_GZIP_SPLICE_MIN 1024

typedef struct sse_gzip sse_gzip;

/* The shared compressor that makes twins: one per server. */
typedef struct sse_gzip_twins sse_gzip_twins;
sse_gzip_twins *sse_gzip_twins_new(void);
void            sse_gzip_twins_free(sse_gzip_twins *t);

sse_gzip *sse_gzip_new(void);              /* NULL on ENOMEM; writes the gzip header */
void      sse_gzip_free(sse_gzip *g);

/* Compresses private bytes (no flush yet). 0 or -ENOMEM. */
int sse_gzip_write(sse_gzip *g, const char *p, size_t n);
/* Appends a shared chunk through its compressed twin (made now if needed). 0 or -ENOMEM. */
int sse_gzip_splice(sse_gzip *g, sse_gzip_twins *t, sse_chunk *c);
/* Sync flush: everything so far can be decompressed by the client. 0 or -ENOMEM. */
int sse_gzip_flush(sse_gzip *g);
/* Ends the gzip member: final block and trailer. 0 or -ENOMEM. */
int sse_gzip_finish(sse_gzip *g);

/* Compressed bytes ready to send: copy up to max into buf, returns the count. */
size_t sse_gzip_read(sse_gzip *g, char *buf, size_t max);
size_t sse_gzip_pending(const sse_gzip *g);

#endif
