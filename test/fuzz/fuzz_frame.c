/* Fuzzes the encoder: sse_frame_size must be exactly what sse_frame_write writes (the
 * buffer is allocated to that size, so ASan sees any overrun), the validator must refuse
 * exactly the fields that could inject lines, and what is written must parse back
 * (sse_parser) to the same event: data with CRLF and CR turned into LF, the event type,
 * the id and the retry. The NDJSON form must be sized exactly too, and be one line.
 *
 * Input: byte 0 says which fields the event has; the rest is split on 0xFF into data,
 * event, id, comment and retry (up to 8 bytes, little-endian). 0xFF is the separator
 * because it never occurs in UTF-8 text, the encoder's normal input. */
#include "sse_frame.h"
#include "sse_parser.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F_DATA = 1, F_EVENT = 2, F_ID = 4, F_COMMENT = 8, F_RETRY = 16, F_JSON = 32 };

#define CHECK(c) do { if (!(c)) abort(); } while (0)

static int has(const char *s, size_t n, int c) { return s && memchr(s, c, n) != NULL; }

static int eq(const char *a, size_t an, const char *b, size_t bn)
{
    return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

typedef struct got {
    int    events;
    sse_buf event, data, id;
} got;

static int on_event(void *ud, const char *event, size_t event_len, const char *data,
                    size_t data_len, const char *id, size_t id_len)
{
    got *g = ud;
    g->events++;
    sse_buf_reset(&g->event);
    sse_buf_reset(&g->data);
    sse_buf_reset(&g->id);
    CHECK(sse_buf_append(&g->event, event, event_len) == 0);
    CHECK(sse_buf_append(&g->data, data, data_len) == 0);
    CHECK(sse_buf_append(&g->id, id, id_len) == 0);
    return 0;
}

/* Parses one whole encoding: every byte must be consumed (it ends in a blank line). */
static void parse(const char *out, size_t n, sse_parser *p, got *g)
{
    sse_parser_init(p);
    CHECK(sse_parser_feed(p, out, n, on_event, g) == 0);
    CHECK(p->line.len == 0);
}

/* What a client's data buffer holds for text: every CRLF or lone CR becomes LF. */
static size_t normalise(const char *s, size_t n, char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            out[k++] = '\n';
            if (i + 1 < n && s[i + 1] == '\n')
                i++;
        } else {
            out[k++] = s[i];
        }
    }
    return k;
}

static void check_ndjson(const sse_event *ev)
{
    size_t size = sse_frame_ndjson_size(ev);
    char *out = malloc(size);
    CHECK(out && sse_frame_ndjson_write(ev, out) == size);
    CHECK(out[size - 1] == '\n');
    /* Escaping must leave no raw control byte: one event is one line. Embedded JSON
     * data is the caller's text and is not checked. */
    if (!ev->data_json || !ev->data)
        for (size_t i = 0; i + 1 < size; i++)
            CHECK((unsigned char)out[i] >= 0x20);
    free(out);
}

static void check_comment(const char *text, size_t len)
{
    size_t size = sse_frame_comment_size(text, len);
    char *out = malloc(size);
    CHECK(out && sse_frame_comment_write(text, len, out) == size);
    sse_parser p;
    got g = { 0 };
    parse(out, size, &p, &g);
    CHECK(g.events == 0 && p.retry == -1 && p.last_id.len == 0 && p.id.len == 0);
    sse_parser_free(&p);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
    if (size < 1)
        return 0;
    unsigned flags = in[0];
    const char *field[5] = { 0 };
    size_t len[5] = { 0 };
    const char *s = (const char *)in + 1, *end = (const char *)in + size;
    for (int i = 0; i < 5; i++) {
        const char *sep = s < end ? memchr(s, 0xFF, (size_t)(end - s)) : NULL;
        const char *stop = sep ? sep : end;
        field[i] = s;
        len[i] = (size_t)(stop - s);
        s = sep ? sep + 1 : end;
    }

    sse_event ev = SSE_EVENT_INIT;
    if (flags & F_DATA)    ev.data = field[0],    ev.data_len = len[0];
    if (flags & F_EVENT)   ev.event = field[1],   ev.event_len = len[1];
    if (flags & F_ID)      ev.id = field[2],      ev.id_len = len[2];
    if (flags & F_COMMENT) ev.comment = field[3], ev.comment_len = len[3];
    if (flags & F_RETRY) {
        uint64_t r = 0;
        for (size_t i = 0; i < len[4] && i < 8; i++)
            r |= (uint64_t)(unsigned char)field[4][i] << (8 * i);
        ev.retry = (long long)(r & INT64_MAX);
    }
    ev.data_json = (flags & F_JSON) != 0;

    /* The validator refuses exactly a CR or LF in event, and CR, LF or NUL in id; such
     * fields are then left out so the rest of the event is still exercised. */
    int bad_event = has(ev.event, ev.event_len, '\r') || has(ev.event, ev.event_len, '\n');
    int bad_id = has(ev.id, ev.id_len, '\r') || has(ev.id, ev.id_len, '\n') ||
                 has(ev.id, ev.id_len, '\0');
    const char *why = NULL;
    int rc = sse_frame_validate(&ev, &why);
    CHECK((rc == -EINVAL) == (bad_event || bad_id) && (rc == 0 || rc == -EINVAL));
    CHECK(rc == 0 || why != NULL);
    if (bad_event)
        ev.event = NULL, ev.event_len = 0;
    if (bad_id)
        ev.id = NULL, ev.id_len = 0;
    CHECK(sse_frame_validate(&ev, &why) == 0);

    size_t n = sse_frame_size(&ev);
    char *out = malloc(n);
    CHECK(out && sse_frame_write(&ev, out) == n);

    sse_parser p;
    got g = { 0 };
    parse(out, n, &p, &g);
    CHECK(p.retry == ev.retry);
    CHECK(eq(p.last_id.data, p.last_id.len, ev.id, ev.id ? ev.id_len : 0));
    if (ev.data) {
        CHECK(g.events == 1);
        char *want = malloc(ev.data_len + 1);
        CHECK(want);
        size_t wn = normalise(ev.data, ev.data_len, want);
        CHECK(eq(g.data.data, g.data.len, want, wn));
        free(want);
        if (ev.event && ev.event_len)
            CHECK(eq(g.event.data, g.event.len, ev.event, ev.event_len));
        else
            CHECK(eq(g.event.data, g.event.len, "message", 7));
        CHECK(eq(g.id.data, g.id.len, ev.id, ev.id ? ev.id_len : 0));
    } else {
        CHECK(g.events == 0);   /* no data line, nothing to dispatch */
    }
    sse_parser_free(&p);
    sse_buf_free(&g.event);
    sse_buf_free(&g.data);
    sse_buf_free(&g.id);
    free(out);

    check_ndjson(&ev);
    if (ev.comment)
        check_comment(ev.comment, ev.comment_len);
    return 0;
}
