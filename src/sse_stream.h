/* sse_stream: one client's event stream, from the moment its response is queued until
 * the last reference goes: its byte queue, heartbeat, gzip, and its life as an explicit
 * state machine. The server (sse_server.c, the libmicrohttpd adapter) owns the
 * connection, suspends and resumes it, and calls sse_stream_take from its reader.
 * Plain C, no Lua, no libmicrohttpd.
 *
 * States (every change goes through one function, set_state in sse_stream.c, which does
 * the bookkeeping and checks the change against the table there):
 *
 *   OPEN ──close──► CLOSING ──queue drained, final chunk out──┐
 *    │  \                │                                    ▼
 *    │   └─hang-up, drop, abort──► DEAD ──body ended────► COMPLETED
 *    └──────────── libmicrohttpd gave up (send failed) ───────┘
 *
 *   OPEN       takes writes; the reader sends what is queued, or the connection is
 *              suspended until something is
 *   CLOSING    takes no writes; ends cleanly (final chunk) once the queue has drained
 *   DEAD       the client is gone or was dropped: the queue is dropped, the body ends at
 *              the next reader call (and the socket is shut down, so the client sees a
 *              break, not a clean end)
 *   COMPLETED  libmicrohttpd is done with the connection; the stream_closed hook runs
 *              once, then only references remain (the binding's, until it releases it)
 *
 * Apart from the state, a stream may be on three lists of its sse_streams (each holds a
 * reference while it is on it): waiting to be resumed, waiting for its ready hook, and
 * (COMPLETED) waiting for its closed hook.
 */
#ifndef SSE_STREAM_H
#define SSE_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include "sse_log.h"
#include "sse_loop.h"
#include "sse_queue.h"

typedef struct sse_stream sse_stream;
typedef struct sse_gzip_twins sse_gzip_twins;

typedef enum sse_stream_state {
    SSE_STREAM_OPEN,
    SSE_STREAM_CLOSING,
    SSE_STREAM_DEAD,
    SSE_STREAM_COMPLETED,
} sse_stream_state;

/* What the streams tell their user (the binding): both run outside libmicrohttpd's run,
 * from sse_streams_run_deferred. */
typedef struct sse_stream_hooks {
    /* The stream's writer may run: just started, or its queue drained below the low-water
     * mark asked with sse_stream_want_drain. */
    void (*ready)(void *ud, sse_stream *st);
    /* The stream has ended (client gone, dropped, closed, shutdown); once. Afterwards the
     * binding only calls sse_stream_release. */
    void (*closed)(void *ud, sse_stream *st);
    void (*log)(void *ud, int level, const char *msg);
    void *ud;
} sse_stream_hooks;

/* All streams of one server. Embedded in the server; zero it, then sse_streams_init. */
/* What the streams have done since the server started (app:stats, app:metrics). */
typedef struct sse_stream_counts {
    unsigned live;          /* streams started and not completed */
    uint64_t started;       /* streams ever started */
    uint64_t events;        /* events and comments queued to streams (heartbeats not) */
    uint64_t heartbeats;
    uint64_t bytes;         /* body bytes handed to libmicrohttpd (after gzip) */
    uint64_t dropped_slow;  /* clients dropped past queue_limit */
} sse_stream_counts;

typedef struct sse_streams {
    sse_loop        *loop;
    sse_stream_hooks hooks;
    size_t           queue_limit;  /* bytes pending on one stream before it is dropped */
    int              ending;       /* the server is shutting down: end every stream once
                                      its queue has drained */
    int              wrote;        /* bytes were queued since the server last cleared it
                                      (the server counts publishing requests with it) */
    sse_stream      *live;         /* not COMPLETED */
    sse_stream      *to_resume;    /* suspended, with something new for the client: */
    sse_stream      *to_resume_tail; /* a FIFO of to_resume_n streams */
    unsigned         to_resume_n;
    sse_stream      *ready;        /* ready hook due */
    sse_stream      *closed;       /* COMPLETED, closed hook due */
    sse_gzip_twins  *twins;        /* compresses shared chunks for gzip streams */
    sse_stream_counts counts;      /* for app:stats() */
} sse_streams;

void sse_streams_init(sse_streams *ss, sse_loop *loop, const sse_stream_hooks *hooks,
                      size_t queue_limit);
/* Runs the deferred hooks (a bounded number of passes: hooks may defer more). */
void sse_streams_run_deferred(sse_streams *ss, int passes);
int  sse_streams_deferred(const sse_streams *ss);   /* hooks are due: run again at once */
/* Takes the first max streams of the resume list (0: all of it), oldest first, and calls
 * resume(conn, ctx) for each one still suspended, marking it resumed. */
void sse_streams_resume(sse_streams *ss, unsigned max,
                        void (*resume)(void *conn, void *ctx), void *ctx);
/* Shutdown: every stream ends once drained (end_all), then every suspended one is listed
 * for a resume (wake_all) so the server can stop with none suspended. */
void sse_streams_end_all(sse_streams *ss);
void sse_streams_wake_all(sse_streams *ss);
void sse_streams_free(sse_streams *ss);   /* after the last stream completed */

/* --- for the server --- */
/* A new OPEN stream with two references: the response's (sse_stream_response_done)
 * and the binding's (sse_stream_release). After heartbeat_ms of silence (0: never) the
 * static string heartbeat is sent (NULL: ":\n\n"); gzip compresses the body (the server
 * checked Accept-Encoding and sends Content-Encoding). NULL: ENOMEM. */
sse_stream *sse_stream_new(sse_streams *ss, unsigned heartbeat_ms, const char *heartbeat,
                           int gzip, const char *peer);
/* Its response is queued on conn (the server's handle), whose socket is fd: heartbeat
 * armed, ready hook deferred. peer_gone: the client already hung up. */
void    sse_stream_started(sse_stream *st, void *conn, int fd, int peer_gone);
/* What the reader returns: up to max bytes (> 0); 0: nothing now (the server suspends
 * the connection and calls sse_stream_suspended); or one of these. */
enum { SSE_TAKE_END = -1, SSE_TAKE_ERROR = -2 };
ssize_t sse_stream_take(sse_stream *st, char *buf, size_t max);
void    sse_stream_suspended(sse_stream *st);
void    sse_stream_hangup(sse_stream *st);          /* the client closed or reset */
void    sse_stream_completed(sse_stream *st);       /* libmicrohttpd is done with it */
void    sse_stream_response_done(sse_stream *st);   /* drops the response's reference */
void   *sse_stream_conn(const sse_stream *st);      /* the server's handle, or NULL */

/* --- for the binding and channels --- */
/* Queue bytes: 0, -EPIPE when the stream is not OPEN (or is dropped now because its
 * pending bytes passed queue_limit), -ENOMEM. */
int    sse_stream_write(sse_stream *st, const char *p, size_t n);
/* Write in place: reserve n bytes (NULL: not OPEN, or ENOMEM), fill them, then commit. */
char  *sse_stream_reserve(sse_stream *st, size_t n);
int    sse_stream_commit(sse_stream *st, size_t n);
/* Queue a shared chunk (channels): no copy. Same returns as sse_stream_write. */
int    sse_stream_push(sse_stream *st, sse_chunk *c);
size_t sse_stream_pending(const sse_stream *st);
int    sse_stream_open(const sse_stream *st);      /* OPEN: takes writes */
/* Ask for the ready hook once pending bytes fall to `low_water` or less. */
void   sse_stream_want_drain(sse_stream *st, size_t low_water);
/* Ends the response cleanly once the queue has drained (final chunk): OPEN -> CLOSING. */
void   sse_stream_close(sse_stream *st);
/* Ends it now: the client sees the stream break and reconnects. -> DEAD. */
void   sse_stream_abort(sse_stream *st);
const char *sse_stream_peer(const sse_stream *st);
void  *sse_stream_ud(const sse_stream *st);
void   sse_stream_set_ud(sse_stream *st, void *ud);
void   sse_stream_release(sse_stream *st);        /* drops the binding's reference */

#endif
