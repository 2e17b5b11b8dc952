#include "sse_gzip.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

struct sse_gzip {
    z_stream z;
    int      ready;       /* deflateInit2 done */
    int      dirty;       /* bytes given since the last flush */
    uLong    crc;
    uint64_t total;       /* plaintext length (ISIZE is it mod 2^32) */
    sse_buf  out;
    size_t   out_off;
};

struct sse_gzip_twins {
    z_stream z;
};

static const unsigned char gzip_header[10] = {
    0x1f, 0x8b, 8 /* deflate */, 0 /* no flags */, 0, 0, 0, 0 /* no mtime */,
    0 /* xfl */, 3 /* OS: Unix */,
};

sse_gzip *sse_gzip_new(void)
{
    sse_gzip *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->crc = crc32(0, Z_NULL, 0);
    if (sse_buf_append(&g->out, gzip_header, sizeof gzip_header) != 0) {
        free(g);
        return NULL;
    }
    return g;
}

void sse_gzip_free(sse_gzip *g)
{
    if (!g)
        return;
    if (g->ready)
        deflateEnd(&g->z);
    sse_buf_free(&g->out);
    free(g);
}

static int ensure_ready(sse_gzip *g)
{
    if (g->ready)
        return 0;
    /* Raw deflate (negative window bits): we write the gzip wrapper ourselves, so the
     * stream can take spliced blocks and a dictionary. */
    if (deflateInit2(&g->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -SSE_GZIP_WBITS,
                     SSE_GZIP_MEMLEVEL, Z_DEFAULT_STRATEGY) != Z_OK)
        return -ENOMEM;
    g->ready = 1;
    return 0;
}

/* Runs deflate over in[0..n) with `flush`, appending all output to g->out. */
static int pump(z_stream *z, sse_buf *out, const char *in, size_t n, int flush)
{
    z->next_in = (Bytef *)in;
    z->avail_in = (uInt)n;
    do {
        if (sse_buf_reserve(out, 1024 + n / 2) != 0)
            return -ENOMEM;
        z->next_out = (Bytef *)out->data + out->len;
        z->avail_out = (uInt)(out->cap - out->len);
        size_t before = z->avail_out;
        int rc = deflate(z, flush);
        out->len += before - z->avail_out;
        if (rc == Z_STREAM_ERROR)
            return -EINVAL;
        if (rc == Z_STREAM_END)
            break;
        /* Done when all input is in and deflate left room: nothing more is pending. */
    } while (z->avail_in > 0 || z->avail_out == 0);
    return 0;
}

int sse_gzip_write(sse_gzip *g, const char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (ensure_ready(g) != 0)
        return -ENOMEM;
    g->crc = crc32(g->crc, (const Bytef *)p, (uInt)n);
    g->total += n;
    g->dirty = 1;
    return pump(&g->z, &g->out, p, n, Z_NO_FLUSH);
}

int sse_gzip_flush(sse_gzip *g)
{
    if (!g->dirty)
        return 0;
    g->dirty = 0;
    return pump(&g->z, &g->out, NULL, 0, Z_SYNC_FLUSH);
}

sse_gzip_twins *sse_gzip_twins_new(void)
{
    sse_gzip_twins *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    if (deflateInit2(&t->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -15, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        free(t);
        return NULL;
    }
    return t;
}

void sse_gzip_twins_free(sse_gzip_twins *t)
{
    if (!t)
        return;
    deflateEnd(&t->z);
    free(t);
}

/* The twin: c's bytes compressed from a fresh state and sync-flushed, so they stand
 * alone inside any deflate stream that is at a flush point. */
static int make_twin(sse_gzip_twins *t, sse_chunk *c)
{
    sse_buf out = SSE_BUF_INIT;
    deflateReset(&t->z);
    if (pump(&t->z, &out, c->data, c->len, Z_SYNC_FLUSH) != 0) {
        sse_buf_free(&out);
        return -ENOMEM;
    }
    sse_chunk *gz = sse_chunk_new(out.len);
    if (!gz) {
        sse_buf_free(&out);
        return -ENOMEM;
    }
    memcpy(gz->data, out.data, out.len);
    gz->len = out.len;
    gz->frozen = 1;
    sse_buf_free(&out);
    c->crc = crc32(crc32(0, Z_NULL, 0), (const Bytef *)c->data, (uInt)c->len);
    c->gz = gz;
    return 0;
}

int sse_gzip_splice(sse_gzip *g, sse_gzip_twins *t, sse_chunk *c)
{
    if (c->len == 0)
        return 0;
    if (!c->gz && make_twin(t, c) != 0)
        return -ENOMEM;
    if (ensure_ready(g) != 0 || sse_gzip_flush(g) != 0)
        return -ENOMEM;
    if (sse_buf_append(&g->out, c->gz->data, c->gz->len) != 0)
        return -ENOMEM;
    g->crc = crc32_combine(g->crc, c->crc, (z_off_t)c->len);
    g->total += c->len;
    /* The client's window now ends with c's bytes: let our compressor know, or its
     * next back-references would point at the wrong bytes. */
    size_t wsize = (size_t)1 << SSE_GZIP_WBITS;
    size_t n = c->len < wsize ? c->len : wsize;
    deflateSetDictionary(&g->z, (const Bytef *)c->data + c->len - n, (uInt)n);
    return 0;
}

int sse_gzip_finish(sse_gzip *g)
{
    if (ensure_ready(g) != 0)
        return -ENOMEM;
    if (pump(&g->z, &g->out, NULL, 0, Z_FINISH) != 0)
        return -ENOMEM;
    unsigned char trailer[8];
    uint32_t crc = (uint32_t)g->crc, isize = (uint32_t)g->total;
    for (int i = 0; i < 4; i++) {
        trailer[i] = (unsigned char)(crc >> (8 * i));
        trailer[4 + i] = (unsigned char)(isize >> (8 * i));
    }
    return sse_buf_append(&g->out, trailer, sizeof trailer);
}

size_t sse_gzip_read(sse_gzip *g, char *buf, size_t max)
{
    size_t avail = g->out.len - g->out_off;
    size_t n = avail < max ? avail : max;
    memcpy(buf, g->out.data + g->out_off, n);
    g->out_off += n;
    if (g->out_off == g->out.len) {
        g->out.len = g->out_off = 0;
        /* A big burst should not pin its buffer for the rest of the stream. */
        if (g->out.cap > 65536)
            sse_buf_free(&g->out);
    }
    return n;
}

size_t sse_gzip_pending(const sse_gzip *g) { return g->out.len - g->out_off; }
