/* sse_parser: an incremental text/event-stream parser implementing the WHATWG
 * "interpreting an event stream" rules exactly:
 *   - lines end in CRLF, LF or lone CR (a CR at the end of one feed and an LF at the
 *     start of the next are one line end);
 *   - a UTF-8 BOM (EF BB BF) at the very start of the stream is skipped;
 *   - "field:value" with one optional space after the colon stripped; a line without a
 *     colon is a field with an empty value; a line starting with ':' is a comment;
 *   - event: sets the type; data: appends value + LF; id: sets the last event id unless
 *     the value contains NUL; retry: sets the reconnection time if the value is ASCII
 *     digits only; other fields are ignored;
 *   - a blank line dispatches: if the data buffer is empty nothing is dispatched (the
 *     type is reset); otherwise the final LF is removed and the event is reported with
 *     type (default "message"), data and the last event id in force;
 *   - bytes after the last blank line are kept until more arrive (never dispatched at EOF).
 * Plain C, no Lua. Any chunking of the input gives the same events.
 */
#ifndef SSE_PARSER_H
#define SSE_PARSER_H

#include <stddef.h>
#include "sse_buf.h"

typedef struct sse_parser {
    int       state_bom;       /* bytes of a leading BOM matched so far; -1 once past the start */
    int       after_cr;        /* the previous byte ended a line with CR */
    sse_buf   line;            /* the current, unfinished line */
    sse_buf   data;            /* data buffer of the event being built */
    sse_buf   event;           /* event type buffer */
    sse_buf   id;              /* last event ID buffer: set by id: lines, persists across events */
    sse_buf   last_id;         /* last event ID string: copied from id at every blank line, so an
                                  id: not yet followed by one is not in force (it is what a
                                  reconnecting browser sends as Last-Event-ID) */
    long long retry;           /* reconnection time in ms, -1 until a valid retry: is seen */
} sse_parser;

/* Called for each dispatched event. Pointers are valid only during the call.
 * Return 0 to go on, non-zero to stop feeding (sse_parser_feed then returns that value). */
typedef int (*sse_parser_cb)(void *ud,
                             const char *event, size_t event_len,
                             const char *data,  size_t data_len,
                             const char *id,    size_t id_len);

void sse_parser_init(sse_parser *p);
void sse_parser_free(sse_parser *p);

/* Feeds bytes; calls cb for each event they complete. 0, -ENOMEM, or the callback's non-zero. */
int sse_parser_feed(sse_parser *p, const char *bytes, size_t len, sse_parser_cb cb, void *ud);

#endif
