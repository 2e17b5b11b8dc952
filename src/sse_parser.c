#include "sse_parser.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

static const char BOM[3] = { '\xEF', '\xBB', '\xBF' };

void sse_parser_init(sse_parser *p)
{
    memset(p, 0, sizeof *p); /* empty buffers, at the start of the stream, no CR seen */
    p->retry = -1;
}

void sse_parser_free(sse_parser *p)
{
    sse_buf_free(&p->line);
    sse_buf_free(&p->data);
    sse_buf_free(&p->event);
    sse_buf_free(&p->id);
    sse_buf_free(&p->last_id);
}

static int buf_set(sse_buf *b, const char *s, size_t n)
{
    sse_buf_reset(b);
    return sse_buf_append(b, s, n);
}

int sse_parser_set_last_id(sse_parser *p, const char *id, size_t len)
{
    int rc = buf_set(&p->id, id, len);
    return rc ? rc : buf_set(&p->last_id, id, len);
}

/* An empty sse_buf has no storage; callers get "" rather than NULL so that they can
 * hand the pointer to memcpy/memcmp/lua_pushlstring without a special case. */
static const char *buf_str(const sse_buf *b)
{
    return b->len ? b->data : "";
}

/* Appends to the unfinished line, within max_line. */
static int line_append(sse_parser *p, const char *s, size_t n)
{
    if (p->max_line && n > p->max_line - p->line.len)
        return SSE_PARSER_ELINE;
    return sse_buf_append(&p->line, s, n);
}

static int field_is(const char *name, size_t n, const char *lit, size_t lit_len)
{
    return n == lit_len && memcmp(name, lit, n) == 0;
}

static int dispatch(sse_parser *p, sse_parser_cb cb, void *ud)
{
    int rc = buf_set(&p->last_id, buf_str(&p->id), p->id.len);
    if (rc)
        return rc;
    if (p->data.len == 0) {
        sse_buf_reset(&p->event);
        return 0;
    }
    /* Reset before the callback: it may stop the feed or (in the Lua binding) raise,
     * and the parser must be ready for the next event either way. */
    size_t data_len = p->data.len - 1; /* the final LF is removed */
    size_t event_len = p->event.len;
    p->data.len = 0;
    p->event.len = 0;
    const char *event = event_len ? p->event.data : "message";
    if (!event_len)
        event_len = 7;
    return cb(ud, event, event_len, p->data.data, data_len, buf_str(&p->last_id), p->last_id.len);
}

static void set_retry(sse_parser *p, const char *v, size_t n)
{
    /* Digits only: "12a", " 5" and "-1" are ignored, as is the empty value (it names
     * no integer). A value too large for the type saturates rather than wrapping. */
    if (n == 0)
        return;
    long long r = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return;
        int d = v[i] - '0';
        r = r > (LLONG_MAX - d) / 10 ? LLONG_MAX : r * 10 + d;
    }
    p->retry = r;
}

static int process_line(sse_parser *p, const char *s, size_t n, sse_parser_cb cb, void *ud)
{
    if (n == 0)
        return dispatch(p, cb, ud);
    if (s[0] == ':')
        return 0;
    const char *colon = memchr(s, ':', n);
    size_t name_len = colon ? (size_t)(colon - s) : n;
    const char *value = colon ? colon + 1 : s + n;
    size_t value_len = n - name_len - (colon ? 1 : 0);
    if (value_len && value[0] == ' ') {
        value++;
        value_len--;
    }

    if (field_is(s, name_len, "data", 4)) {
        /* data.len counts an LF per earlier line, so this is the data the event would
         * have if it ended here */
        if (p->max_event &&
            (p->data.len > p->max_event || value_len > p->max_event - p->data.len))
            return SSE_PARSER_EEVENT;
        int rc = sse_buf_reserve(&p->data, value_len + 1);
        if (rc)
            return rc;
        if (value_len)
            memcpy(p->data.data + p->data.len, value, value_len);
        p->data.len += value_len;
        p->data.data[p->data.len++] = '\n';
        return 0;
    }
    if (field_is(s, name_len, "event", 5))
        return buf_set(&p->event, value, value_len);
    if (field_is(s, name_len, "id", 2)) {
        if (memchr(value, '\0', value_len))
            return 0;
        return buf_set(&p->id, value, value_len);
    }
    if (field_is(s, name_len, "retry", 5))
        set_retry(p, value, value_len);
    return 0;
}

static int feed(sse_parser *p, const char *bytes, size_t len, sse_parser_cb cb, void *ud);

int sse_parser_feed(sse_parser *p, const char *bytes, size_t len, sse_parser_cb cb, void *ud)
{
    if (p->error)
        return p->error;
    int rc = feed(p, bytes, len, cb, ud);
    if (rc == SSE_PARSER_ELINE || rc == SSE_PARSER_EEVENT) {
        /* Final: what the stream sent so far is of no further use. */
        p->error = rc;
        sse_buf_free(&p->line);
        sse_buf_free(&p->data);
        sse_buf_free(&p->event);
    }
    return rc;
}

static int feed(sse_parser *p, const char *bytes, size_t len, sse_parser_cb cb, void *ud)
{
    if (len == 0)
        return 0;
    const char *s = bytes, *end = bytes + len;
    int rc;

    /* The BOM may arrive a byte at a time; bytes that turn out not to be one are
     * ordinary line content (they cannot be CR or LF). */
    while (p->state_bom >= 0 && s < end) {
        if (*s == BOM[p->state_bom]) {
            s++;
            if (++p->state_bom == 3)
                p->state_bom = -1;
        } else {
            rc = line_append(p, BOM, (size_t)p->state_bom);
            if (rc)
                return rc;
            p->state_bom = -1;
        }
    }
    if (s == end)
        return 0;

    /* The LF of a CRLF whose CR ended the previous feed. */
    if (p->after_cr) {
        p->after_cr = 0;
        if (*s == '\n')
            s++;
    }

    /* Same trick as the encoder: one memchr per kind of line end, searched again only
     * once passed, so long lines cost a vectorised scan rather than a per-byte loop. */
    const char *cr = NULL, *lf = NULL;
    while (s < end) {
        if (!cr || cr < s) {
            cr = memchr(s, '\r', (size_t)(end - s));
            if (!cr)
                cr = end;
        }
        if (!lf || lf < s) {
            lf = memchr(s, '\n', (size_t)(end - s));
            if (!lf)
                lf = end;
        }
        const char *brk = cr < lf ? cr : lf;
        if (brk == end)
            return line_append(p, s, (size_t)(end - s));

        const char *line = s;
        size_t n = (size_t)(brk - s);
        s = brk + 1;
        if (*brk == '\r') {
            if (s == end)
                p->after_cr = 1;
            else if (*s == '\n')
                s++;
        }

        if (p->line.len) {
            /* The line began in an earlier feed: complete it in the line buffer, and
             * empty the buffer before the callback can stop or raise (the memory,
             * which process_line does not touch, stays valid until the next append). */
            rc = line_append(p, line, n);
            if (rc)
                return rc;
            size_t total = p->line.len;
            p->line.len = 0;
            rc = process_line(p, p->line.data, total, cb, ud);
        } else if (p->max_line && n > p->max_line) {
            rc = SSE_PARSER_ELINE;
        } else {
            rc = process_line(p, line, n, cb, ud);
        }
        if (rc)
            return rc;
    }
    return 0;
}
