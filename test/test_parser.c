/* C tests of the event-stream parser: every case is fed whole, a byte at a time, in
 * every split into two feeds and in pseudo-random chunkings, and must dispatch the
 * same events and end in the same state each time. */
#include "sse_parser.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* Events are recorded as one escaped line each ("type|data|id"), so a whole run
 * compares as one string and a failure prints something a human can read. */
typedef struct rec {
    char  *text;
    size_t len, cap;
    int    calls;
    int    stop_at;  /* return 7 from the callback on this call (1-based); 0 = never */
} rec;

static void rec_put(rec *r, const char *s, size_t n)
{
    if (r->len + n + 1 > r->cap) {
        r->cap = (r->len + n + 1) * 2;
        r->text = realloc(r->text, r->cap);
        if (!r->text) {
            perror("realloc");
            exit(2);
        }
    }
    memcpy(r->text + r->len, s, n);
    r->len += n;
    r->text[r->len] = '\0';
}

static void rec_escaped(rec *r, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[8];
        if (c == '\n')
            rec_put(r, "\\n", 2);
        else if (c == '\r')
            rec_put(r, "\\r", 2);
        else if (c == '\\' || c == '|')
            snprintf(tmp, sizeof tmp, "\\%c", c), rec_put(r, tmp, 2);
        else if (c < 0x20 || c >= 0x7f)
            snprintf(tmp, sizeof tmp, "\\x%02X", c), rec_put(r, tmp, 4);
        else
            rec_put(r, (const char *)&s[i], 1);
    }
}

static int on_event(void *ud, const char *event, size_t event_len, const char *data,
                    size_t data_len, const char *id, size_t id_len)
{
    rec *r = ud;
    rec_escaped(r, event, event_len);
    rec_put(r, "|", 1);
    rec_escaped(r, data, data_len);
    rec_put(r, "|", 1);
    rec_escaped(r, id, id_len);
    rec_put(r, "\n", 1);
    r->calls++;
    return r->calls == r->stop_at ? 7 : 0;
}

/* Adds the parser's final state, so chunkings must agree on it too. */
static void rec_state(rec *r, const sse_parser *p)
{
    char tmp[64];
    snprintf(tmp, sizeof tmp, "retry=%lld last_id=", p->retry);
    rec_put(r, tmp, strlen(tmp));
    rec_escaped(r, p->last_id.len ? p->last_id.data : "", p->last_id.len);
    if (p->error == SSE_PARSER_ELINE)
        rec_put(r, " ELINE", 6);
    else if (p->error == SSE_PARSER_EEVENT)
        rec_put(r, " EEVENT", 7);
    else if (p->error)
        rec_put(r, " E?", 3);
}

typedef struct pcase {
    const char *name;
    const char *in;
    size_t      in_len;   /* 0: strlen(in) */
    const char *want;     /* events then state, as recorded */
} pcase;

/* A case with the parser's bounds set. */
typedef struct bcase {
    pcase  c;
    size_t max_line, max_event;   /* 0: none */
} bcase;

#define BIN(s) s, sizeof(s) - 1

static const pcase cases[] = {
    { "LF", "data: a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "CRLF", "data: a\r\n\r\n", 0, "message|a|\nretry=-1 last_id=" },
    { "lone CR", "data: a\r\r", 0, "message|a|\nretry=-1 last_id=" },
    { "mixed line ends", "data: a\rdata: b\r\ndata: c\n\r\n", 0,
      "message|a\\nb\\nc|\nretry=-1 last_id=" },
    { "CRLF is one line end, not two", "data: a\r\ndata: b\n\n", 0,
      "message|a\\nb|\nretry=-1 last_id=" },
    { "CR then CR LF is two line ends", "data: a\r\r\n", 0, "message|a|\nretry=-1 last_id=" },
    { "LF CR is two line ends", "data: a\n\rdata: b\n\n", 0,
      "message|a|\nmessage|b|\nretry=-1 last_id=" },
    { "no space after colon", "data:a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "only one leading space stripped", "data:  a\n\n", 0, "message| a|\nretry=-1 last_id=" },
    { "tab is not stripped", "data:\ta\n\n", 0, "message|\\x09a|\nretry=-1 last_id=" },
    { "empty data line dispatches empty data", "data:\n\n", 0, "message||\nretry=-1 last_id=" },
    { "data with only a space", "data: \n\n", 0, "message||\nretry=-1 last_id=" },
    { "field without colon has empty value", "data\n\n", 0, "message||\nretry=-1 last_id=" },
    { "two data lines joined with LF", "data: a\ndata: b\n\n", 0,
      "message|a\\nb|\nretry=-1 last_id=" },
    { "trailing empty data line keeps an LF", "data: a\ndata: \n\n", 0,
      "message|a\\n|\nretry=-1 last_id=" },
    { "two empty data lines", "data\ndata\n\n", 0, "message|\\n|\nretry=-1 last_id=" },
    { "colon inside value", "data: a: b:c\n\n", 0, "message|a: b:c|\nretry=-1 last_id=" },
    { "NUL inside data kept", BIN("data: a\0b\n\n"), "message|a\\x00b|\nretry=-1 last_id=" },
    { "UTF-8 passed through", "data: h\xC3\xA9llo \xE2\x9C\x93\n\n", 0,
      "message|h\\xC3\\xA9llo \\xE2\\x9C\\x93|\nretry=-1 last_id=" },
    { "event type", "event: ping\ndata: x\n\ndata: y\n\n", 0,
      "ping|x|\nmessage|y|\nretry=-1 last_id=" },
    { "empty event type is message", "event:\ndata: x\n\n", 0, "message|x|\nretry=-1 last_id=" },
    { "last event type wins", "event: a\nevent: b\ndata: x\n\n", 0, "b|x|\nretry=-1 last_id=" },
    { "event without data not dispatched, type reset", "event: e\n\ndata: x\n\n", 0,
      "message|x|\nretry=-1 last_id=" },
    { "id without data updates the last id", "id: 5\n\ndata: x\n\n", 0,
      "message|x|5\nretry=-1 last_id=5" },
    { "id persists across events", "id: 1\ndata: a\n\ndata: b\n\n", 0,
      "message|a|1\nmessage|b|1\nretry=-1 last_id=1" },
    { "id after data in the same event", "data: a\nid: 9\n\n", 0, "message|a|9\nretry=-1 last_id=9" },
    { "empty id: resets", "id: 1\ndata: a\n\nid:\ndata: b\n\n", 0,
      "message|a|1\nmessage|b|\nretry=-1 last_id=" },
    { "id with no colon resets", "id: 1\n\nid\ndata: b\n\n", 0, "message|b|\nretry=-1 last_id=" },
    { "id with NUL ignored", BIN("id: 1\n\nid: 2\0x\ndata: a\n\n"),
      "message|a|1\nretry=-1 last_id=1" },
    { "id keeps spaces after the first", "id:  7 \ndata: a\n\n", 0,
      "message|a| 7 \nretry=-1 last_id= 7 " },
    { "id not in force before its blank line", "id: 1\ndata: a\n\nid: 2\ndata: b\n", 0,
      "message|a|1\nretry=-1 last_id=1" },
    { "retry digits", "retry: 1000\n\n", 0, "retry=1000 last_id=" },
    { "retry zero", "retry: 0\n", 0, "retry=0 last_id=" },
    { "retry set without blank line", "retry: 3000\ndata: a", 0, "retry=3000 last_id=" },
    { "retry 12a ignored", "retry: 12a\n\n", 0, "retry=-1 last_id=" },
    { "retry negative ignored", "retry: -1\n\n", 0, "retry=-1 last_id=" },
    { "retry two spaces ignored", "retry:  5\n\n", 0, "retry=-1 last_id=" },
    { "retry empty ignored", "retry:\n\n", 0, "retry=-1 last_id=" },
    { "retry invalid keeps previous", "retry: 5\nretry: x\n", 0, "retry=5 last_id=" },
    { "retry saturates", "retry: 99999999999999999999999\n", 0,
      "retry=9223372036854775807 last_id=" },
    { "comments ignored", ": hello\n:\ndata: a\n: mid\ndata: b\n\n", 0,
      "message|a\\nb|\nretry=-1 last_id=" },
    { "comment alone dispatches nothing", ": hi\n\n", 0, "retry=-1 last_id=" },
    { "unknown field ignored", "foo: bar\ndata: a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "field names are case sensitive", "Data: a\nEVENT: x\n\n", 0, "retry=-1 last_id=" },
    { "space before colon is part of the name", "data : a\n\n", 0, "retry=-1 last_id=" },
    { "blank lines alone dispatch nothing", "\n\r\n\r\n\n", 0, "retry=-1 last_id=" },
    { "unterminated event not dispatched", "data: a\n", 0, "retry=-1 last_id=" },
    { "unterminated line not dispatched", "data: a\n\ndata: b", 0, "message|a|\nretry=-1 last_id=" },
    { "unterminated CR line end counts", "data: a\n\r", 0, "message|a|\nretry=-1 last_id=" },
    { "BOM at start skipped", "\xEF\xBB\xBF" "data: a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "BOM then blank lines", "\xEF\xBB\xBF\n\ndata: a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "second BOM is part of the field name", "\xEF\xBB\xBF\xEF\xBB\xBF" "data: a\n\n", 0,
      "retry=-1 last_id=" },
    { "BOM later is content", "data: a\n\n\xEF\xBB\xBF" "data: b\n\n", 0,
      "message|a|\nretry=-1 last_id=" },
    { "BOM inside a value is kept", "data: \xEF\xBB\xBFx\n\n", 0,
      "message|\\xEF\\xBB\\xBFx|\nretry=-1 last_id=" },
    { "partial BOM is content", "\xEF\xBB" "data: a\n\ndata: b\n\n", 0,
      "message|b|\nretry=-1 last_id=" },
    { "partial BOM then line end", "\xEF\n" "data: a\n\n", 0, "message|a|\nretry=-1 last_id=" },
    { "partial BOM before a colon is a field name, not a comment", "\xEF\xBB:x\ndata: a\n\n", 0,
      "message|a|\nretry=-1 last_id=" },
    { "BOM only", "\xEF\xBB\xBF", 0, "retry=-1 last_id=" },
    { "long data line", "data: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n\n", 0,
      "message|aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa|\nretry=-1 last_id=" },
    { "full event", ": c\nevent: update\nid: 42\nretry: 10\ndata: {\"a\":1}\ndata: x\n\n", 0,
      "update|{\"a\":1}\\nx|42\nretry=10 last_id=42" },
    { "many events", "data: 1\n\ndata: 2\r\n\r\nevent: e\rdata: 3\r\r", 0,
      "message|1|\nmessage|2|\ne|3|\nretry=-1 last_id=" },

};

/* Bounds: the events before the failing line, then the error, whatever the chunking. */
static const bcase bounded[] = {
    { { "line of max_line bytes is fine", "data: 1234\n\n", 0,
          "message|1234|\nretry=-1 last_id=" }, 10, 0 },
    { { "line over max_line fails", "data: 1\n\ndata: 12345\n\ndata: 2\n\n", 0,
        "message|1|\nretry=-1 last_id= ELINE" }, 10, 0 },
    { { "line over max_line fails without its line end", "data: 1\n\ndata: 12345", 0,
        "message|1|\nretry=-1 last_id= ELINE" }, 10, 0 },
    { { "CRLF not counted in the line", "data: 1234\r\n\r\n", 0,
        "message|1234|\nretry=-1 last_id=" }, 10, 0 },
    { { "a comment line counts too", ":123456789\ndata: a\n\n", 0,
          "retry=-1 last_id= ELINE" }, 9, 0 },
    { { "a BOM is not counted", "\xEF\xBB\xBF" "data: 1234\n\n", 0,
        "message|1234|\nretry=-1 last_id=" }, 10, 0 },
    { { "a partial BOM is counted", "\xEF\xBB" "data: 12\n\n", 0,
          "retry=-1 last_id= ELINE" }, 9, 0 },
    { { "retry before the long line is kept", "retry: 5\nid: 3\n\ndata: 123456789", 0,
        "retry=5 last_id=3 ELINE" }, 8, 0 },
    { { "event data of max_event bytes is fine", "data: abc\ndata: de\n\n", 0,
        "message|abc\\nde|\nretry=-1 last_id=" }, 0, 6 },
    { { "event data over max_event fails", "data: a\n\ndata: abc\ndata: def\n\n", 0,
        "message|a|\nretry=-1 last_id= EEVENT" }, 0, 6 },
    { { "empty data lines count their LF", "data\ndata\ndata\ndata\n\n", 0,
        "retry=-1 last_id= EEVENT" }, 0, 2 },
    { { "max_event is per event", "data: abc\n\ndata: def\n\ndata: ghi\n\n", 0,
        "message|abc|\nmessage|def|\nmessage|ghi|\nretry=-1 last_id=" }, 0, 3 },
};

/* Feeds `in` in pieces ending at the offsets in cuts (the last one is len), then
 * records the final state. Returns the recording (to free). */
static char *run(const pcase *c, size_t max_line, size_t max_event, const size_t *cuts,
                 size_t ncuts)
{
    const char *in = c->in;
    sse_parser p;
    rec r = { 0 };
    size_t at = 0;
    sse_parser_init(&p);
    p.max_line = max_line;
    p.max_event = max_event;
    rec_put(&r, "", 0);
    for (size_t i = 0; i < ncuts; i++) {
        int rc = sse_parser_feed(&p, in + at, cuts[i] - at, on_event, &r);
        /* a failed bound is recorded with the state, and stays */
        if (rc && rc != p.error) {
            printf("%s: feed returned %d\n", c->name, rc);
            failed++;
        }
        at = cuts[i];
    }
    rec_state(&r, &p);
    sse_parser_free(&p);
    return r.text;
}

static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;

static unsigned rng(void)
{
    /* xorshift64: deterministic, so a failing chunking can be reproduced */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (unsigned)(rng_state >> 32);
}

static void check_case(const pcase *c, size_t max_line, size_t max_event)
{
    size_t len = c->in_len ? c->in_len : strlen(c->in);
    size_t *cuts = malloc((len + 1) * sizeof *cuts);
    char *got;

    /* whole */
    cuts[0] = len;
    got = run(c, max_line, max_event, cuts, 1);
    CHECK(strcmp(got, c->want) == 0, "%s (whole):\n  got  %s\n  want %s", c->name, got, c->want);
    free(got);

    /* a byte at a time */
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    got = run(c, max_line, max_event, cuts, len);
    CHECK(strcmp(got, c->want) == 0, "%s (byte by byte):\n  got  %s\n  want %s", c->name, got,
          c->want);
    free(got);

    /* every split into two feeds (the empty first or second feed included) */
    for (size_t k = 0; k <= len; k++) {
        cuts[0] = k;
        cuts[1] = len;
        got = run(c, max_line, max_event, cuts, 2);
        CHECK(strcmp(got, c->want) == 0, "%s (split at %zu):\n  got  %s\n  want %s", c->name, k,
              got, c->want);
        free(got);
    }

    /* random chunkings */
    for (int t = 0; t < 20; t++) {
        size_t n = 0, at = 0;
        while (at < len) {
            at += 1 + rng() % 5;
            if (at > len)
                at = len;
            cuts[n++] = at;
        }
        if (n == 0)
            cuts[n++] = 0;
        got = run(c, max_line, max_event, cuts, n);
        CHECK(strcmp(got, c->want) == 0, "%s (random chunking %d):\n  got  %s\n  want %s",
              c->name, t, got, c->want);
        free(got);
    }
    free(cuts);
}

static void test_stop(void)
{
    /* A non-zero callback result stops the feed there and is returned; the events
     * after it in the same feed are not reported. */
    sse_parser p;
    rec r = { 0 };
    r.stop_at = 1;
    rec_put(&r, "", 0);
    sse_parser_init(&p);
    int rc = sse_parser_feed(&p, "data: a\n\ndata: b\n\n", 18, on_event, &r);
    CHECK(rc == 7, "stop: feed returned %d, want 7", rc);
    CHECK(strcmp(r.text, "message|a|\n") == 0, "stop: got %s", r.text);
    /* The parser is still usable afterwards. */
    rc = sse_parser_feed(&p, "data: c\n\n", 9, on_event, &r);
    CHECK(rc == 0, "stop: later feed returned %d", rc);
    CHECK(strcmp(r.text, "message|a|\nmessage|c|\n") == 0, "stop then feed: got %s", r.text);
    sse_parser_free(&p);
    free(r.text);
}

static void test_resume_after_more_bytes(void)
{
    /* The unterminated tail is kept and completed by the next feed. */
    sse_parser p;
    rec r = { 0 };
    rec_put(&r, "", 0);
    sse_parser_init(&p);
    sse_parser_feed(&p, "data: a\n", 8, on_event, &r);
    CHECK(r.calls == 0, "tail: dispatched %d events before the blank line", r.calls);
    sse_parser_feed(&p, "\n", 1, on_event, &r);
    CHECK(strcmp(r.text, "message|a|\n") == 0, "tail: got %s", r.text);
    sse_parser_feed(&p, NULL, 0, on_event, &r);
    CHECK(r.calls == 1, "empty feed dispatched something");
    sse_parser_free(&p);
    free(r.text);
}

static void test_free_twice(void)
{
    sse_parser p;
    rec r = { 0 };
    sse_parser_init(&p);
    sse_parser_feed(&p, "id: 1\ndata: x", 13, on_event, &r);
    sse_parser_free(&p);
    sse_parser_free(&p); /* idempotent: ASan reports a double free otherwise */
    CHECK(p.line.data == NULL && p.data.data == NULL && p.last_id.data == NULL,
          "free leaves buffers set");
    free(r.text);
}

static void test_initial_last_id(void)
{
    /* A reconnecting EventSource's parser starts with the id it had: events without an
     * id: line report it, an empty id: resets it, and it is the last id until changed. */
    sse_parser p;
    rec r = { 0 };
    rec_put(&r, "", 0);
    sse_parser_init(&p);
    CHECK(sse_parser_set_last_id(&p, "41", 2) == 0, "set_last_id failed");
    const char *in = "data: a\n\nid\ndata: b\n\nid: 42\n\n";
    sse_parser_feed(&p, in, strlen(in), on_event, &r);
    rec_state(&r, &p);
    CHECK(strcmp(r.text, "message|a|41\nmessage|b|\nretry=-1 last_id=42") == 0,
          "initial last id: got %s", r.text);
    sse_parser_free(&p);
    free(r.text);
}

static void test_bounds_hold_memory(void)
{
    /* 10 MB of one line in 64 KiB feeds: fails once past max_line, with the line buffer
     * never much over the bound, and the buffers released; every later feed fails the
     * same way without dispatching. */
    enum { CHUNK = 65536, MAX = 1 << 20 };
    char *chunk = malloc(CHUNK);
    memset(chunk, 'x', CHUNK);
    memcpy(chunk, "data: ", 6);
    sse_parser p;
    rec r = { 0 };
    rec_put(&r, "", 0);
    sse_parser_init(&p);
    p.max_line = MAX;
    int rc = 0;
    size_t fed = 0, most = 0;
    sse_parser_feed(&p, "data: a\n\n", 9, on_event, &r);
    while (fed < 10u << 20 && rc == 0) {
        rc = sse_parser_feed(&p, chunk, CHUNK, on_event, &r);
        fed += CHUNK;
        if (p.line.cap > most)
            most = p.line.cap;
        memset(chunk, 'x', 6);
    }
    CHECK(rc == SSE_PARSER_ELINE, "long line: feed returned %d", rc);
    CHECK(fed <= MAX + CHUNK, "long line: failed only after %zu bytes", fed);
    CHECK(most <= 2 * MAX, "long line: the line buffer reached %zu bytes", most);
    CHECK(p.line.data == NULL && p.data.data == NULL, "long line: buffers kept after the failure");
    rc = sse_parser_feed(&p, "\n\ndata: b\n\n", 12, on_event, &r);
    CHECK(rc == SSE_PARSER_ELINE, "after the failure: feed returned %d", rc);
    CHECK(strcmp(r.text, "message|a|\n") == 0, "long line: got %s", r.text);
    sse_parser_free(&p);

    /* Endless short data: lines without a blank line fail at max_event. */
    sse_parser_init(&p);
    p.max_event = MAX;
    rc = 0;
    fed = 0;
    most = 0;
    for (size_t i = 0; i + 10 <= CHUNK; i += 10)
        memcpy(chunk + i, "data: 123\n", 10);
    while (fed < 10u << 20 && rc == 0) {
        rc = sse_parser_feed(&p, chunk, CHUNK / 10 * 10, on_event, &r);
        fed += CHUNK / 10 * 10;
        if (p.data.cap > most)
            most = p.data.cap;
    }
    CHECK(rc == SSE_PARSER_EEVENT, "endless data: feed returned %d", rc);
    CHECK(most <= 2 * MAX, "endless data: the data buffer reached %zu bytes", most);
    CHECK(p.data.data == NULL, "endless data: buffer kept after the failure");
    sse_parser_free(&p);
    free(chunk);
    free(r.text);
}

int main(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_case(&cases[i], 0, 0);
    for (size_t i = 0; i < sizeof bounded / sizeof bounded[0]; i++)
        check_case(&bounded[i].c, bounded[i].max_line, bounded[i].max_event);
    test_stop();
    test_resume_after_more_bytes();
    test_free_twice();
    test_initial_last_id();
    test_bounds_hold_memory();
    printf("test_parser: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
