/* The request-stream scan of sse_head.h. Lines end at LF (a CR before it is dropped), as
 * libmicrohttpd 0.9.75 splits them; empty lines before a request line are skipped, as it
 * does. A body is as long as the head's Content-Length says (none without one). */
#include "sse_head.h"

#include <string.h>

enum {
    REQ_START,     /* before a request line (empty lines are skipped) */
    REQ_CR,        /* ... after a CR there */
    REQ_LINE,      /* in the request line */
    LINE_START,    /* at the first byte of a header line */
    LINE_CR,       /* ... after a CR there: an empty line if LF follows */
    LINE_NAME,     /* in a field name */
    LENGTH_WS,     /* after "Content-Length:", before the value */
    LENGTH_VALUE,  /* in its value */
    LINE_REST,     /* in a line whose rest does not matter */
    BODY
};

void sse_head_init(sse_head_scan *s)
{
    memset(s, 0, sizeof *s);
    s->state = REQ_START;
    s->verdict = SSE_HEAD_FINE;
}

static int is_name(const sse_head_scan *s, const char *lower)
{
    size_t n = strlen(lower);
    return s->name_len == n && memcmp(s->name, lower, n) == 0;
}

/* A Content-Length value ended (at its LF): the number, if it is one. */
static void length_done(sse_head_scan *s)
{
    if (s->value_bad || s->digits == 0 || s->digits > 19 ||
        (s->lengths && s->value != s->length))
        s->framing_bad = 1;
    s->length = s->value;
    s->lengths++;
}

/* The empty line after the headers: on to the body, or the next request. */
static void head_done(sse_head_scan *s)
{
    if (s->framing_bad) {
        s->verdict = SSE_HEAD_LOST;
        return;
    }
    s->body_left = s->lengths ? s->length : 0;
    s->state = s->body_left ? BODY : REQ_START;
    s->lengths = 0;
    s->length = 0;
}

sse_head_verdict sse_head_feed(sse_head_scan *s, const char *p, size_t n)
{
    for (size_t i = 0; i < n && s->verdict == SSE_HEAD_FINE; i++) {
        unsigned char ch = (unsigned char)p[i];
        switch (s->state) {
        case BODY: {
            uint64_t take = n - i < s->body_left ? n - i : s->body_left;
            s->body_left -= take;
            i += take - 1;
            if (!s->body_left)
                s->state = REQ_START;
            break;
        }
        case REQ_START:
            if (ch == 0x16 && s->offset + i == 0)
                s->verdict = SSE_HEAD_TLS;
            else if (ch == '\r')
                s->state = REQ_CR;
            else if (ch != '\n')
                s->state = REQ_LINE;
            break;
        case REQ_CR:
            s->state = ch == '\n' ? REQ_START : REQ_LINE;
            break;
        case REQ_LINE:
            if (ch == '\n')
                s->state = LINE_START;
            break;
        case LINE_START:
            if (ch == ' ' || ch == '\t')
                s->verdict = SSE_HEAD_FOLDED;
            else if (ch == '\n')
                head_done(s);
            else if (ch == '\r')
                s->state = LINE_CR;
            else {
                s->name[0] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
                s->name_len = 1;
                s->state = LINE_NAME;
            }
            break;
        case LINE_CR:
            if (ch == '\n')
                head_done(s);
            else
                s->state = LINE_REST;
            break;
        case LINE_NAME:
            if (ch == '\n') {
                s->state = LINE_START;
            } else if (ch == ':') {
                if (is_name(s, "content-length")) {
                    s->digits = 0;
                    s->value_bad = s->value_cr = 0;
                    s->value = 0;
                    s->state = LENGTH_WS;
                } else {
                    if (is_name(s, "transfer-encoding"))
                        s->framing_bad = 1;
                    s->state = LINE_REST;
                }
            } else if (s->name_len < sizeof s->name) {
                s->name[s->name_len++] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
            } else {
                s->name_len = sizeof s->name + 1;   /* longer than any name we look for */
            }
            break;
        case LENGTH_WS:
            if (ch == ' ' || ch == '\t')
                break;
            s->state = LENGTH_VALUE;
            /* fall through */
        case LENGTH_VALUE:
            if (ch == '\n') {
                length_done(s);
                s->state = LINE_START;
            } else if (s->value_cr) {
                s->value_bad = 1;               /* a CR inside the value */
                s->value_cr = ch == '\r';
            } else if (ch == '\r') {
                s->value_cr = 1;
            } else if (ch >= '0' && ch <= '9') {
                if (++s->digits <= 19)
                    s->value = s->value * 10 + (ch - '0');
            } else {
                s->value_bad = 1;
            }
            break;
        case LINE_REST:
            if (ch == '\n')
                s->state = LINE_START;
            break;
        }
    }
    s->offset += n;
    return s->verdict;
}

uint64_t sse_head_body_left(const sse_head_scan *s)
{
    return s->verdict == SSE_HEAD_FINE && s->state == BODY ? s->body_left : 0;
}

void sse_head_skip(sse_head_scan *s, uint64_t n)
{
    if (n > sse_head_body_left(s))
        n = sse_head_body_left(s);
    s->body_left -= n;
    s->offset += n;
    if (s->state == BODY && !s->body_left)
        s->state = REQ_START;
}
