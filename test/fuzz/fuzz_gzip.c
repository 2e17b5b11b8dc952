/* Fuzzes the streaming gzip body: two streams get random writes (fresh bytes, or
 * repeats of their own earlier text so the compressor makes back-references) and
 * splices of shared chunks, whose compressed twins are made once and reused by both
 * streams, as a channel's subscribers do. Everything read from a stream goes through
 * zlib's gzip inflate, which must reproduce the plaintext byte for byte; after each
 * flush or splice, all plaintext so far must have come out (the client can show every
 * event on arrival); finish must give a gzip end whose CRC and length zlib accepts,
 * with nothing after it. */
#include "sse_gzip.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define CHECK(c) do { if (!(c)) abort(); } while (0)

static const uint8_t *in, *in_end;
static unsigned next(void) { return in < in_end ? *in++ : 0; }

typedef struct stream {
    sse_gzip *g;
    sse_buf   plain;    /* every byte written or spliced */
    z_stream  z;        /* the client */
    size_t    out;      /* plaintext bytes the client has decoded (and matched) */
    int       ended;    /* inflate saw the gzip trailer */
} stream;

/* The client receives bytes: decode them and match each decoded byte with the text. */
static void client_feed(stream *s, const char *p, size_t n)
{
    static unsigned char out[1 << 16];
    s->z.next_in = (Bytef *)p;
    s->z.avail_in = (uInt)n;
    while (s->z.avail_in > 0) {
        CHECK(!s->ended);   /* bytes after the end of the gzip member */
        s->z.next_out = out;
        s->z.avail_out = sizeof out;
        int rc = inflate(&s->z, Z_NO_FLUSH);
        CHECK(rc == Z_OK || rc == Z_STREAM_END || rc == Z_BUF_ERROR);
        size_t got = sizeof out - s->z.avail_out;
        CHECK(s->out + got <= s->plain.len);
        CHECK(got == 0 || memcmp(s->plain.data + s->out, out, got) == 0);
        s->out += got;
        if (rc == Z_STREAM_END)
            s->ended = 1;
        else if (got == 0 && rc == Z_BUF_ERROR)
            CHECK(s->z.avail_in == 0);   /* no progress with input left: stuck */
    }
}

/* The server sends what is pending, in pieces of any size. */
static void send_pending(stream *s)
{
    char buf[512];
    while (sse_gzip_pending(s->g) > 0) {
        size_t max = next() % sizeof buf + 1;
        size_t n = sse_gzip_read(s->g, buf, max);
        CHECK(n > 0 && n <= max);
        client_feed(s, buf, n);
    }
}

/* At a flush point the client has everything: drain and compare the counts. */
static void all_out(stream *s)
{
    send_pending(s);
    CHECK(s->out == s->plain.len);
}

#define POOL 3

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* One twin maker, as per server: it resets per twin, so inputs stay independent. */
    static sse_gzip_twins *twins;
    if (!twins)
        CHECK(twins = sse_gzip_twins_new());
    in = data, in_end = data + size;

    stream st[2];
    memset(st, 0, sizeof st);
    for (int i = 0; i < 2; i++) {
        CHECK(st[i].g = sse_gzip_new());
        CHECK(inflateInit2(&st[i].z, 16 + 15) == Z_OK);   /* gzip wrapper only */
    }
    sse_chunk *pool[POOL] = { 0 };

    while (in < in_end) {
        unsigned op = next();
        stream *s = &st[op & 1];
        switch ((op >> 1) % 5) {
        case 0: {   /* write n bytes: fresh from the input, or a repeat of earlier text */
            size_t n = next();
            char tmp[256];
            if (op & 0x80 && s->plain.len) {
                size_t dist = (next() | next() << 8) % s->plain.len + 1;
                for (size_t i = 0; i < n; i++)   /* overlapping copy, as LZ77 would */
                    tmp[i] = i < dist ? s->plain.data[s->plain.len - dist + i] : tmp[i - dist];
            } else {
                for (size_t i = 0; i < n; i++)
                    tmp[i] = (char)next();
            }
            CHECK(sse_gzip_write(s->g, tmp, n) == 0);
            CHECK(sse_buf_append(&s->plain, tmp, n) == 0);
            break;
        }
        case 1: {   /* a new shared chunk: a short pattern from the input, repeated */
            int slot = next() % POOL;
            sse_chunk_unref(pool[slot]);
            size_t n = next() | (next() & 0x0f) << 8;
            size_t period = next() % 64 + 1;
            sse_chunk *c = pool[slot] = sse_chunk_new(n);
            CHECK(c);
            for (size_t i = 0; i < n; i++)
                c->data[i] = i < period ? (char)next() : c->data[i - period];
            c->len = n;
            c->frozen = 1;
            break;
        }
        case 2: {   /* splice a shared chunk (its twin is made on first use) */
            sse_chunk *c = pool[next() % POOL];
            if (!c)
                break;
            CHECK(sse_gzip_splice(s->g, twins, c) == 0);
            CHECK(sse_buf_append(&s->plain, c->data, c->len) == 0);
            if (c->len)   /* a twin ends at a flush point (an empty chunk adds nothing) */
                all_out(s);
            break;
        }
        case 3:     /* flush: everything written must now decode */
            CHECK(sse_gzip_flush(s->g) == 0);
            all_out(s);
            break;
        case 4: {   /* a partial send: what decodes must be a prefix of the text */
            char buf[512];
            size_t n = sse_gzip_read(s->g, buf, next() % sizeof buf);
            client_feed(s, buf, n);
            break;
        }
        }
    }

    for (int i = 0; i < 2; i++) {
        CHECK(sse_gzip_finish(st[i].g) == 0);
        all_out(&st[i]);
        CHECK(st[i].ended);   /* zlib checked the trailer's CRC-32 and length */
        inflateEnd(&st[i].z);
        sse_gzip_free(st[i].g);
        sse_buf_free(&st[i].plain);
    }
    for (int i = 0; i < POOL; i++)
        sse_chunk_unref(pool[i]);
    return 0;
}
