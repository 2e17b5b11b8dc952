/* sse_buf: a growable byte buffer (in the spirit of lua-cjson's strbuf).
 * Plain C, no Lua. Functions return 0 or -ENOMEM. */
#ifndef SSE_BUF_H
#define SSE_BUF_H

#include <stddef.h>

typedef struct sse_buf {
    char  *data;
    size_t len;
    size_t cap;
} sse_buf;

#define SSE_BUF_INIT { NULL, 0, 0 }

/* Make room for `extra` more bytes after len. */
int  sse_buf_reserve(sse_buf *b, size_t extra);
int  sse_buf_append(sse_buf *b, const void *p, size_t n);
void sse_buf_reset(sse_buf *b);   /* len = 0, keeps the memory */
void sse_buf_free(sse_buf *b);    /* releases the memory; b is empty again */

#endif
