/* sse_frame: the event encoder (WHATWG "text/event-stream" framing).
 * Plain C, no Lua: validates the fields of one event and writes its exact bytes.
 *
 * Output layout of one event, always ending in a blank line:
 *   ": <comment line>\n"   one per line of `comment` (split on CRLF, CR, LF; ":" alone for an empty line)
 *   "event: <event>\n"
 *   "id: <id>\n"
 *   "retry: <retry>\n"
 *   "data: <line>\n"       one per line of `data` (split on CRLF, CR, LF; the space is always written)
 *   "\n"
 * The empty data string gives one "data: \n" line; "a\n" gives "data: a\ndata: \n".
 */
#ifndef SSE_FRAME_H
#define SSE_FRAME_H

#include <stddef.h>
#include "sse_buf.h"

typedef struct sse_event {
    const char *data;    size_t data_len;    /* data == NULL: no data field */
    const char *event;   size_t event_len;   /* NULL: no event field */
    const char *id;      size_t id_len;      /* NULL: no id field (an empty id is allowed: it resets) */
    const char *comment; size_t comment_len; /* NULL: no comment */
    long long   retry;                        /* < 0: no retry field */
    int         data_json;                    /* data is JSON text (a table, number or
                                                 boolean): NDJSON embeds it as it is */
} sse_event;

#define SSE_EVENT_INIT { NULL, 0, NULL, 0, NULL, 0, NULL, 0, -1, 0 }

/* 0 when the event can be encoded; otherwise -EINVAL and *why is set to a static
 * message naming the field, e.g. "field 'id' must not contain CR, LF or NUL". */
int sse_frame_validate(const sse_event *ev, const char **why);

/* Exact number of bytes sse_frame_write produces for a valid event. */
size_t sse_frame_size(const sse_event *ev);

/* Writes the event into out (which has room for sse_frame_size bytes); returns the count.
 * The event must have passed sse_frame_validate. */
size_t sse_frame_write(const sse_event *ev, char *out);

/* Validates then appends to b: 0, -EINVAL (with *why) or -ENOMEM. */
int sse_frame_encode(const sse_event *ev, sse_buf *b, const char **why);

/* Comment lines only (heartbeats, padding), followed by a blank line:
 * ": line\n" per line of text (":\n" for an empty line), then "\n". */
size_t sse_frame_comment_size(const char *text, size_t len);
size_t sse_frame_comment_write(const char *text, size_t len, char *out);

/* The NDJSON form of an event (format = "ndjson"): one JSON object on one line,
 *   {"id":"<id>","event":"<event>","data":<data>}\n
 * with only the fields the event has; data is embedded as it is when data_json is set,
 * else as a JSON string. An event with none of these fields (a comment) is a blank
 * line, which NDJSON readers skip: it serves as a heartbeat. retry has no NDJSON form. */
size_t sse_frame_ndjson_size(const sse_event *ev);
size_t sse_frame_ndjson_write(const sse_event *ev, char *out);

#endif
