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
 * Optional bounds (0: none, the default), so that a hostile stream cannot make the parser
 * hold more than about max_line + max_event bytes:
 *   - max_line: a line (its bytes without the CR/LF, a partial BOM included) longer than
 *     this fails the feed with SSE_PARSER_ELINE, as soon as that many bytes of it have
 *     arrived (the line end need not come);
 *   - max_event: an event whose data (its data: values joined with LF) would be longer
 *     than this fails the feed with SSE_PARSER_EEVENT, at the data: line that passes it.
 * A failure is final: the buffers are released and every later feed returns the same
 * error. The events before the failing line are dispatched, and with the same events
 * whatever the chunking (lines are processed in order; the bound is checked on the line's
 * length so far, which only grows).
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
    size_t    max_line;        /* bytes a line may have; 0: no bound */
    size_t    max_event;       /* bytes an event's data may have; 0: no bound */
    int       error;           /* 0, or the bound that failed (final) */
} sse_parser;

/* Feed results besides 0, -ENOMEM and a callback's value (callbacks should return
 * positive values to stop, so that these stay distinct). */
#define SSE_PARSER_ELINE  (-1001)   /* a line longer than max_line */
#define SSE_PARSER_EEVENT (-1002)   /* an event's data longer than max_event */

/* Called for each dispatched event. Pointers are valid only during the call.
 * Return 0 to go on, non-zero to stop feeding (sse_parser_feed then returns that value). */
typedef int (*sse_parser_cb)(void *ud,
                             const char *event, size_t event_len,
                             const char *data,  size_t data_len,
                             const char *id,    size_t id_len);

/* An empty parser at the start of a stream, with no bounds: set p->max_line and
 * p->max_event after it (before the first feed). */
void sse_parser_init(sse_parser *p);
void sse_parser_free(sse_parser *p);

/* Starts the stream with a last event id in force (an EventSource reconnecting keeps the
 * one it had: events with no id: line report it). 0 or -ENOMEM. */
int sse_parser_set_last_id(sse_parser *p, const char *id, size_t len);

/* Feeds bytes; calls cb for each event they complete. 0, -ENOMEM, SSE_PARSER_ELINE,
 * SSE_PARSER_EEVENT (final: see above), or the callback's non-zero. */
int sse_parser_feed(sse_parser *p, const char *bytes, size_t len, sse_parser_cb cb, void *ud);

#endif
