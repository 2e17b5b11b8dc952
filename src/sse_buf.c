#include "sse_buf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int sse_buf_reserve(sse_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    if (extra > (size_t)-1 / 2 - b->len)
        return -ENOMEM;
    size_t need = b->len + extra;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int sse_buf_append(sse_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    int rc = sse_buf_reserve(b, n);
    if (rc)
        return rc;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

void sse_buf_reset(sse_buf *b)
{
    b->len = 0;
}

void sse_buf_free(sse_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
