#include "sse_frame.h"

#include <errno.h>
#include <string.h>

/* Splitting text on CRLF, lone CR and LF.
 *
 * Encoding is the hot path of every send and publish, and almost all data has no line
 * break at all, so the scan uses memchr (vectorised in libc) once for CR and once for LF
 * and remembers where each was found: a position is searched again only after the
 * cursor has passed it, which keeps the whole split linear however the breaks mix. */
typedef struct line_scan {
    const char *p;     /* start of the next line */
    const char *end;
    const char *cr;    /* next CR at or after p, or end */
    const char *lf;    /* next LF at or after p, or end */
    int         done;  /* the last line has been returned */
} line_scan;

static const char *find_or_end(const char *p, const char *end, int c)
{
    const char *r = p < end ? memchr(p, c, (size_t)(end - p)) : NULL;
    return r ? r : end;
}

static void scan_init(line_scan *s, const char *text, size_t len)
{
    if (!text)   /* a NULL comment text of length 0: arithmetic on NULL is undefined */
        text = "";
    s->p = text;
    s->end = text + len;
    s->cr = find_or_end(s->p, s->end, '\r');
    s->lf = find_or_end(s->p, s->end, '\n');
    s->done = 0;
}

/* Yields every line, including the empty one after a trailing break and the single
 * empty line of empty text: n breaks always give n + 1 lines, which is exactly what
 * makes the client's "join with LF" reproduce the text. */
static int scan_next(line_scan *s, const char **line, size_t *len)
{
    if (s->done)
        return 0;
    if (s->cr < s->p)
        s->cr = find_or_end(s->p, s->end, '\r');
    if (s->lf < s->p)
        s->lf = find_or_end(s->p, s->end, '\n');
    const char *brk = s->cr < s->lf ? s->cr : s->lf;
    *line = s->p;
    *len = (size_t)(brk - s->p);
    if (brk == s->end) {
        s->done = 1;
        return 1;
    }
    s->p = brk + 1;
    if (*brk == '\r' && s->p < s->end && *s->p == '\n')
        s->p++;
    return 1;
}

/* Bytes of `prefix_len`-byte prefixes plus a newline on every line of text, when an
 * empty line is written as `empty_len` bytes in all. */
static size_t lines_size(const char *text, size_t len, size_t prefix_len, size_t empty_len)
{
    line_scan s;
    const char *line;
    size_t n, size = 0;
    scan_init(&s, text, len);
    while (scan_next(&s, &line, &n))
        size += n ? prefix_len + n + 1 : empty_len;
    return size;
}

static size_t digits(unsigned long long v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

static char *put(char *out, const char *p, size_t n)
{
    memcpy(out, p, n);
    return out + n;
}

/* Comment lines: ": text\n", and ":\n" for an empty line (no trailing space to trim). */
static char *put_comment_lines(char *out, const char *text, size_t len)
{
    line_scan s;
    const char *line;
    size_t n;
    scan_init(&s, text, len);
    while (scan_next(&s, &line, &n)) {
        if (n) {
            out = put(out, ": ", 2);
            out = put(out, line, n);
        } else {
            *out++ = ':';
        }
        *out++ = '\n';
    }
    return out;
}

int sse_frame_validate(const sse_event *ev, const char **why)
{
    /* A CR or LF in a single-line field would end the line early and let whoever
     * controls the value inject fields (or a whole event) into the stream. */
    if (ev->event && (memchr(ev->event, '\r', ev->event_len) || memchr(ev->event, '\n', ev->event_len))) {
        *why = "field 'event' must not contain CR or LF";
        return -EINVAL;
    }
    /* Browsers silently ignore an id containing NUL, so the client would resume from
     * an older id than the server thinks: refuse it here instead. */
    if (ev->id && (memchr(ev->id, '\r', ev->id_len) || memchr(ev->id, '\n', ev->id_len) ||
                   memchr(ev->id, '\0', ev->id_len))) {
        *why = "field 'id' must not contain CR, LF or NUL";
        return -EINVAL;
    }
    return 0;
}

size_t sse_frame_size(const sse_event *ev)
{
    size_t size = 1; /* the blank line */
    if (ev->comment)
        size += lines_size(ev->comment, ev->comment_len, 2, 2);
    if (ev->event)
        size += 8 + ev->event_len;
    if (ev->id)
        size += 5 + ev->id_len;
    if (ev->retry >= 0)
        size += 8 + digits((unsigned long long)ev->retry);
    if (ev->data)
        size += lines_size(ev->data, ev->data_len, 6, 7);
    return size;
}

size_t sse_frame_write(const sse_event *ev, char *out)
{
    char *start = out;
    if (ev->comment)
        out = put_comment_lines(out, ev->comment, ev->comment_len);
    if (ev->event) {
        out = put(out, "event: ", 7);
        out = put(out, ev->event, ev->event_len);
        *out++ = '\n';
    }
    if (ev->id) {
        out = put(out, "id: ", 4);
        out = put(out, ev->id, ev->id_len);
        *out++ = '\n';
    }
    if (ev->retry >= 0) {
        unsigned long long v = (unsigned long long)ev->retry;
        size_t n = digits(v);
        out = put(out, "retry: ", 7);
        for (size_t i = n; i-- > 0; v /= 10)
            out[i] = (char)('0' + v % 10);
        out += n;
        *out++ = '\n';
    }
    if (ev->data) {
        line_scan s;
        const char *line;
        size_t n;
        scan_init(&s, ev->data, ev->data_len);
        /* The space after the colon is written even before an empty line or a line
         * that starts with spaces: the client strips exactly one, so this is what keeps
         * leading spaces (LLM tokens such as " the") intact. */
        while (scan_next(&s, &line, &n)) {
            out = put(out, "data: ", 6);
            out = put(out, line, n);
            *out++ = '\n';
        }
    }
    *out++ = '\n';
    return (size_t)(out - start);
}

int sse_frame_encode(const sse_event *ev, sse_buf *b, const char **why)
{
    int rc = sse_frame_validate(ev, why);
    if (rc)
        return rc;
    size_t size = sse_frame_size(ev);
    rc = sse_buf_reserve(b, size);
    if (rc)
        return rc;
    b->len += sse_frame_write(ev, b->data + b->len);
    return 0;
}

size_t sse_frame_comment_size(const char *text, size_t len)
{
    return lines_size(text, len, 2, 2) + 1;
}

size_t sse_frame_comment_write(const char *text, size_t len, char *out)
{
    char *end = put_comment_lines(out, text, len);
    *end++ = '\n';
    return (size_t)(end - out);
}

/* ---- NDJSON ---- */

/* Bytes of s as the inside of a JSON string: quote, backslash and control bytes
 * escaped; everything else (UTF-8 included) as it is. */
static size_t json_escaped_size(const char *s, size_t n)
{
    size_t out = n;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t')
            out += 1;
        else if (c < 0x20)
            out += 5;           /* \u00XX */
    }
    return out;
}

static char *json_escaped_write(const char *s, size_t n, char *o)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"':  *o++ = '\\'; *o++ = '"'; break;
        case '\\': *o++ = '\\'; *o++ = '\\'; break;
        case '\n': *o++ = '\\'; *o++ = 'n'; break;
        case '\r': *o++ = '\\'; *o++ = 'r'; break;
        case '\t': *o++ = '\\'; *o++ = 't'; break;
        default:
            if (c < 0x20) {
                memcpy(o, "\\u00", 4);
                o[4] = hex[c >> 4];
                o[5] = hex[c & 15];
                o += 6;
            } else {
                *o++ = (char)c;
            }
        }
    }
    return o;
}

size_t sse_frame_ndjson_size(const sse_event *ev)
{
    size_t n = 0;
    int fields = 0;
    if (ev->id) {
        n += sizeof "\"id\":\"\"" - 1 + json_escaped_size(ev->id, ev->id_len);
        fields++;
    }
    if (ev->event) {
        n += sizeof "\"event\":\"\"" - 1 + json_escaped_size(ev->event, ev->event_len);
        fields++;
    }
    if (ev->data) {
        n += sizeof "\"data\":" - 1;
        n += ev->data_json ? ev->data_len : 2 + json_escaped_size(ev->data, ev->data_len);
        fields++;
    }
    if (fields == 0)
        return 1;
    return n + (size_t)(fields - 1) + 2 + 1;    /* commas, braces, newline */
}

static char *put_field(char *o, const char *sep, const char *lit)
{
    size_t a = strlen(sep), b = strlen(lit);
    memcpy(o, sep, a);
    memcpy(o + a, lit, b);
    return o + a + b;
}

size_t sse_frame_ndjson_write(const sse_event *ev, char *out)
{
    char *o = out;
    if (!ev->id && !ev->event && !ev->data) {
        *o++ = '\n';
        return 1;
    }
    *o++ = '{';
    const char *sep = "";
    if (ev->id) {
        o = put_field(o, sep, "\"id\":\"");
        o = json_escaped_write(ev->id, ev->id_len, o);
        *o++ = '"';
        sep = ",";
    }
    if (ev->event) {
        o = put_field(o, sep, "\"event\":\"");
        o = json_escaped_write(ev->event, ev->event_len, o);
        *o++ = '"';
        sep = ",";
    }
    if (ev->data) {
        o = put_field(o, sep, "\"data\":");
        if (ev->data_json) {
            memcpy(o, ev->data, ev->data_len);
            o += ev->data_len;
        } else {
            *o++ = '"';
            o = json_escaped_write(ev->data, ev->data_len, o);
            *o++ = '"';
        }
    }
    *o++ = '}';
    *o++ = '\n';
    return (size_t)(o - out);
}
