/* C tests of the event encoder: exact bytes for each case, size == written bytes,
 * validation messages, and a round trip of many data strings through the parser
 * (what a browser's EventSource would report). */
#include "sse_frame.h"
#include "sse_parser.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* Makes failures readable: bytes with line breaks and non-ASCII shown escaped. */
static const char *esc(const char *s, size_t n)
{
    static char out[4][4096];
    static int slot;
    char *o = out[slot++ % 4], *e = o + sizeof out[0] - 8;
    char *w = o;
    for (size_t i = 0; i < n && w < e; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n')
            w += sprintf(w, "\\n");
        else if (c == '\r')
            w += sprintf(w, "\\r");
        else if (c < 0x20 || c >= 0x7f)
            w += sprintf(w, "\\x%02X", c);
        else
            *w++ = (char)c;
    }
    *w = '\0';
    return o;
}

/* Mirrors sse_event so that the table can leave fields out (NULL) and give string
 * lengths with the BIN() macro when they hold NUL bytes. */
typedef struct fcase {
    const char *name;
    const char *data;    size_t data_len;
    const char *event;   size_t event_len;
    const char *id;      size_t id_len;
    const char *comment; size_t comment_len;
    int         has_retry;
    long long   retry;
    const char *want;    size_t want_len;    /* NULL: must be rejected */
    const char *why;                         /* the rejection message */
} fcase;

#define BIN(s) s, sizeof(s) - 1
#define DATA(s) .data = s, .data_len = sizeof(s) - 1
#define EVENT(s) .event = s, .event_len = sizeof(s) - 1
#define ID(s) .id = s, .id_len = sizeof(s) - 1
#define COMMENT(s) .comment = s, .comment_len = sizeof(s) - 1
#define RETRY(n) .has_retry = 1, .retry = n
#define WANT(s) .want = s, .want_len = sizeof(s) - 1

static const fcase cases[] = {
    { "plain", DATA("hello"), WANT("data: hello\n\n") },
    { "LF", DATA("a\nb"), WANT("data: a\ndata: b\n\n") },
    { "CRLF", DATA("a\r\nb"), WANT("data: a\ndata: b\n\n") },
    { "lone CR", DATA("a\rb"), WANT("data: a\ndata: b\n\n") },
    { "CR CR is two breaks", DATA("a\r\rb"), WANT("data: a\ndata: \ndata: b\n\n") },
    { "LF CR is two breaks", DATA("a\n\rb"), WANT("data: a\ndata: \ndata: b\n\n") },
    { "CRLF LF", DATA("a\r\n\nb"), WANT("data: a\ndata: \ndata: b\n\n") },
    { "mixed", DATA("1\r2\n3\r\n4"), WANT("data: 1\ndata: 2\ndata: 3\ndata: 4\n\n") },
    { "trailing LF", DATA("abc\n"), WANT("data: abc\ndata: \n\n") },
    { "trailing CRLF", DATA("abc\r\n"), WANT("data: abc\ndata: \n\n") },
    { "trailing CR", DATA("abc\r"), WANT("data: abc\ndata: \n\n") },
    { "leading LF", DATA("\nabc"), WANT("data: \ndata: abc\n\n") },
    { "only LF", DATA("\n"), WANT("data: \ndata: \n\n") },
    { "only CRLF", DATA("\r\n"), WANT("data: \ndata: \n\n") },
    { "empty string", DATA(""), WANT("data: \n\n") },
    { "leading space kept", DATA(" the"), WANT("data:  the\n\n") },
    { "leading spaces on every line", DATA("  a\n b"), WANT("data:   a\ndata:  b\n\n") },
    { "only spaces", DATA("   "), WANT("data:    \n\n") },
    { "colon in data", DATA(": not a comment"), WANT("data: : not a comment\n\n") },
    { "field-like data", DATA("id: 5\nevent: x"), WANT("data: id: 5\ndata: event: x\n\n") },
    { "NUL in data", DATA("a\0b"), WANT("data: a\0b\n\n") },
    { "unicode", DATA("h\xC3\xA9llo \xE2\x9C\x93 \xF0\x9F\x98\x80"),
      WANT("data: h\xC3\xA9llo \xE2\x9C\x93 \xF0\x9F\x98\x80\n\n") },
    { "JSON", DATA("{\"a\":[1,2]}"), WANT("data: {\"a\":[1,2]}\n\n") },
    { "event", DATA("x"), EVENT("update"), WANT("event: update\ndata: x\n\n") },
    { "id", DATA("x"), ID("42"), WANT("id: 42\ndata: x\n\n") },
    { "empty id resets", DATA("x"), ID(""), WANT("id: \ndata: x\n\n") },
    { "retry", DATA("x"), RETRY(5000), WANT("retry: 5000\ndata: x\n\n") },
    { "retry 0", RETRY(0), WANT("retry: 0\n\n") },
    { "retry large", RETRY(9223372036854775807LL), WANT("retry: 9223372036854775807\n\n") },
    { "retry 10", RETRY(10), WANT("retry: 10\n\n") },
    { "retry 9", RETRY(9), WANT("retry: 9\n\n") },
    { "negative retry is absent", DATA("x"), RETRY(-1), WANT("data: x\n\n") },
    { "all fields in order", DATA("a\nb"), EVENT("e"), ID("7"), COMMENT("c"), RETRY(3),
      WANT(": c\nevent: e\nid: 7\nretry: 3\ndata: a\ndata: b\n\n") },
    { "id and event without data", EVENT("e"), ID("1"), WANT("event: e\nid: 1\n\n") },
    { "comment only", COMMENT("hi"), WANT(": hi\n\n") },
    { "empty comment", COMMENT(""), WANT(":\n\n") },
    { "multi-line comment", COMMENT("a\r\nb\rc\n"), WANT(": a\n: b\n: c\n:\n\n") },
    { "comment with NUL", COMMENT("a\0b"), WANT(": a\0b\n\n") },
    { "nothing at all", WANT("\n") },
    { "event with space", DATA("x"), EVENT("a b"), WANT("event: a b\ndata: x\n\n") },
    { "event with NUL is allowed", DATA("x"), EVENT("a\0b"), WANT("event: a\0b\ndata: x\n\n") },
    { "unicode id", ID("\xC3\xA9"), WANT("id: \xC3\xA9\n\n") },

    { "event with LF", DATA("x"), EVENT("a\nb"), .why = "field 'event' must not contain CR or LF" },
    { "event with CR", DATA("x"), EVENT("a\rb"), .why = "field 'event' must not contain CR or LF" },
    { "event that is only LF", EVENT("\n"), .why = "field 'event' must not contain CR or LF" },
    { "id with LF", DATA("x"), ID("1\n"), .why = "field 'id' must not contain CR, LF or NUL" },
    { "id with CR", DATA("x"), ID("\r1"), .why = "field 'id' must not contain CR, LF or NUL" },
    { "id with NUL", DATA("x"), ID("1\0"), .why = "field 'id' must not contain CR, LF or NUL" },
    { "injection through id", DATA("x"), ID("1\ndata: evil"),
      .why = "field 'id' must not contain CR, LF or NUL" },
};

static sse_event to_event(const fcase *c)
{
    sse_event ev = SSE_EVENT_INIT;
    ev.data = c->data;
    ev.data_len = c->data_len;
    ev.event = c->event;
    ev.event_len = c->event_len;
    ev.id = c->id;
    ev.id_len = c->id_len;
    ev.comment = c->comment;
    ev.comment_len = c->comment_len;
    ev.retry = c->has_retry ? c->retry : -1;
    return ev;
}

static void check_case(const fcase *c)
{
    sse_event ev = to_event(c);
    const char *why = NULL;
    int rc = sse_frame_validate(&ev, &why);

    if (!c->want) {
        CHECK(rc == -EINVAL, "%s: validate returned %d, want -EINVAL", c->name, rc);
        CHECK(why && strcmp(why, c->why) == 0, "%s: message '%s', want '%s'", c->name,
              why ? why : "(null)", c->why);
        sse_buf b = SSE_BUF_INIT;
        why = NULL;
        rc = sse_frame_encode(&ev, &b, &why);
        CHECK(rc == -EINVAL && b.len == 0 && why && strcmp(why, c->why) == 0,
              "%s: encode returned %d (len %zu)", c->name, rc, b.len);
        sse_buf_free(&b);
        return;
    }

    CHECK(rc == 0, "%s: validate returned %d (%s)", c->name, rc, why ? why : "");
    size_t size = sse_frame_size(&ev);
    /* Guard bytes after the frame catch a write past the announced size even
     * without ASan. */
    char *out = malloc(size + 16);
    memset(out, '#', size + 16);
    size_t n = sse_frame_write(&ev, out);
    CHECK(n == size, "%s: wrote %zu bytes, size said %zu", c->name, n, size);
    CHECK(n == c->want_len && memcmp(out, c->want, n) == 0, "%s:\n  got  %s\n  want %s", c->name,
          esc(out, n), esc(c->want, c->want_len));
    CHECK(out[size] == '#', "%s: wrote past the size", c->name);
    free(out);

    /* sse_frame_encode appends to what the buffer already holds. */
    sse_buf b = SSE_BUF_INIT;
    sse_buf_append(&b, "prefix", 6);
    rc = sse_frame_encode(&ev, &b, &why);
    CHECK(rc == 0 && b.len == 6 + c->want_len && memcmp(b.data, "prefix", 6) == 0 &&
              memcmp(b.data + 6, c->want, c->want_len) == 0,
          "%s: encode into a buffer gave %d, %s", c->name, rc, esc(b.data, b.len));
    sse_buf_free(&b);
}

typedef struct comment_case {
    const char *text; size_t len;
    const char *want; size_t want_len;
} comment_case;

static const comment_case comment_cases[] = {
    { BIN(""), BIN(":\n\n") },
    { BIN("ping"), BIN(": ping\n\n") },
    { BIN(" x"), BIN(":  x\n\n") },
    { BIN("a\nb"), BIN(": a\n: b\n\n") },
    { BIN("a\r\nb"), BIN(": a\n: b\n\n") },
    { BIN("a\rb"), BIN(": a\n: b\n\n") },
    { BIN("a\n"), BIN(": a\n:\n\n") },
    { BIN("\n\n"), BIN(":\n:\n:\n\n") },
};

static void check_comment(const comment_case *c)
{
    size_t size = sse_frame_comment_size(c->text, c->len);
    char *out = malloc(size + 1);
    out[size] = '#';
    size_t n = sse_frame_comment_write(c->text, c->len, out);
    CHECK(n == size && out[size] == '#', "comment %s: wrote %zu, size %zu", esc(c->text, c->len),
          n, size);
    CHECK(n == c->want_len && memcmp(out, c->want, n) == 0, "comment %s:\n  got  %s\n  want %s",
          esc(c->text, c->len), esc(out, n), esc(c->want, c->want_len));
    free(out);
}

/* Round trip: what the parser (a browser's interpretation) reports for the encoded
 * event must be the data with CRLF and lone CR turned into LF, and nothing else. */
typedef struct got_events {
    int    count;
    char  *data;
    size_t len;
    char   id[64];
    size_t id_len;
    char   type[64];
    size_t type_len;
} got_events;

static int collect(void *ud, const char *event, size_t event_len, const char *data,
                   size_t data_len, const char *id, size_t id_len)
{
    got_events *g = ud;
    g->count++;
    free(g->data);
    g->data = malloc(data_len + 1);
    memcpy(g->data, data, data_len);
    g->len = data_len;
    g->id_len = id_len < sizeof g->id ? id_len : sizeof g->id;
    memcpy(g->id, id, g->id_len);
    g->type_len = event_len < sizeof g->type ? event_len : sizeof g->type;
    memcpy(g->type, event, g->type_len);
    return 0;
}

static size_t normalize(const char *s, size_t n, char *out)
{
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            out[w++] = '\n';
            if (i + 1 < n && s[i + 1] == '\n')
                i++;
        } else {
            out[w++] = s[i];
        }
    }
    return w;
}

static void check_round_trip(const char *data, size_t len, const char *label)
{
    sse_event ev = SSE_EVENT_INIT;
    ev.data = data;
    ev.data_len = len;
    ev.id = "12";
    ev.id_len = 2;
    ev.event = "tick";
    ev.event_len = 4;
    sse_buf b = SSE_BUF_INIT;
    const char *why;
    int rc = sse_frame_encode(&ev, &b, &why);
    CHECK(rc == 0, "round trip %s: encode returned %d", label, rc);

    sse_parser p;
    got_events g = { 0 };
    sse_parser_init(&p);
    rc = sse_parser_feed(&p, b.data, b.len, collect, &g);
    char *want = malloc(len + 1);
    size_t want_len = normalize(data, len, want);
    CHECK(rc == 0 && g.count == 1, "round trip %s: %d events (rc %d)", label, g.count, rc);
    CHECK(g.count == 1 && g.len == want_len && memcmp(g.data, want, want_len) == 0,
          "round trip %s:\n  got  %s\n  want %s", label, esc(g.data ? g.data : "", g.len),
          esc(want, want_len));
    CHECK(g.id_len == 2 && memcmp(g.id, "12", 2) == 0 && g.type_len == 4 &&
              memcmp(g.type, "tick", 4) == 0,
          "round trip %s: id or type lost", label);
    free(want);
    free(g.data);
    sse_parser_free(&p);
    sse_buf_free(&b);
}

static unsigned long long rng_state = 0x243F6A8885A308D3ull;

static unsigned rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (unsigned)(rng_state >> 32);
}

static void test_round_trips(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (cases[i].data && cases[i].want)
            check_round_trip(cases[i].data, cases[i].data_len, cases[i].name);

    /* Random strings over the bytes that matter to framing. */
    static const char alphabet[] = { 'a', ' ', ':', '\r', '\n', '\0', '\xEF', '\xBB', '\xBF', 'd' };
    char s[24], label[32];
    for (int t = 0; t < 3000; t++) {
        size_t len = rng() % sizeof s;
        for (size_t i = 0; i < len; i++)
            s[i] = alphabet[rng() % sizeof alphabet];
        snprintf(label, sizeof label, "random #%d", t);
        check_round_trip(s, len, label);
    }
}

static void test_data_not_copied_past_len(void)
{
    /* data_len bounds the data: bytes after it (here a line break) are not encoded. */
    sse_event ev = SSE_EVENT_INIT;
    ev.data = "ab\ncd";
    ev.data_len = 2;
    char out[32];
    size_t n = sse_frame_write(&ev, out);
    CHECK(n == 10 && memcmp(out, "data: ab\n\n", 10) == 0, "data_len ignored: %s", esc(out, n));
}

int main(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_case(&cases[i]);
    for (size_t i = 0; i < sizeof comment_cases / sizeof comment_cases[0]; i++)
        check_comment(&comment_cases[i]);
    test_round_trips();
    test_data_not_copied_past_len();
    printf("test_frame: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
