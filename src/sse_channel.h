/* sse_channel: publish/subscribe with replay. Plain C: no Lua, no HTTP.
 *
 * A publish encodes the event once into a reference-counted chunk; every subscriber's
 * sink gets a pointer to that chunk (no copy, no Lua call per subscriber), and the
 * channel keeps the last `history` chunks for replay. Every publish takes the next
 * number of an app-wide sequence; an event without an id is sent with the id
 * "<epoch>-<number>" (sse_ids), so one Last-Event-ID resumes any set of channels, and an
 * id from an earlier run of the server (another epoch) is always recognised as one.
 * Each publish is encoded in both stream formats (SSE and NDJSON): once each, whatever
 * the subscribers.
 *
 * Replay without a seam: a subscription made with a last event id is "pending" until
 * sse_subscriber_flush. Until then live publishes to that subscriber are held; the
 * flush sends, in sequence order and once each, the kept events after the id from every
 * pending channel together with the held ones. The binding flushes when the stream's
 * generator yields or returns, so subscribing to several channels in one turn replays
 * them merged in publish order.
 *
 * Resuming from a Last-Event-ID (sse_channel_resume_point) decides, in this order:
 *   - the id is the own id of an event this channel keeps (given by the publisher, or
 *     ours): replay what came after that event;
 *   - it is "<epoch>-<seq>" with this app's epoch and a seq already issued: replay what
 *     is kept after seq, with the gap first if an event after seq has been pushed out of
 *     the history;
 *   - anything else (another epoch: a run before a restart, whose numbers mean nothing
 *     now; an id never issued; not of our form): the gap, then everything kept. Without
 *     a history that is the gap alone: it still tells the client it missed something.
 * "<epoch>-0" is of this epoch and before everything, so it replays all that is kept,
 * and with no gap as long as nothing has been pushed out yet.
 *
 * Subscribers are sinks (sse_sink), not HTTP streams: the binding gives each subscriber
 * a function that queues a chunk on its stream, and a test gives one that records. So
 * this file knows nothing of the server, and everything above can be tested without one.
 *
 * The seam for brokers. What is here splits in two. A broker-backed channel (events
 * shared by several server processes through Redis, NATS, a database...) would replace
 * the first half and keep the second.
 *   The backend, which a broker would provide:
 *     - append: store one event and give it its place in the order, a sequence number
 *       (an event without an id of its own is sent as "<epoch>-<seq>"), so that every
 *       process agrees on both (here: ++ids->seq and the history ring);
 *     - range: the kept events after a given place, oldest first, and whether some after
 *       it are no longer kept (here: the ring, `dropped`, sse_channel_resume_point);
 *     - notify: tell this process of each event appended anywhere, so it reaches this
 *       process's subscribers; and subscribe/unsubscribe to that (here there is one
 *       process, so publish itself is the notification).
 *   The core, which stays whatever the backend:
 *     - encode each event once, into shared chunks in both forms (SSE and NDJSON);
 *     - fan-out: one chunk pushed to every sink, the form each subscriber asked for;
 *     - replay without a seam: what the range gave and what was notified meanwhile,
 *       merged by sequence number, each event once;
 *     - the gap decision: which ids resume where, and when the client is told it missed
 *       events (the rules above).
 */
#ifndef SSE_CHANNEL_H
#define SSE_CHANNEL_H

#include <stddef.h>
#include <stdint.h>
#include "sse_frame.h"
#include "sse_queue.h"

typedef struct sse_channel sse_channel;

/* The app-wide ids: "<epoch>-<seq>". The epoch is the app's start time in milliseconds
 * since 1970 (made unique within the process), the sequence counts from 1. A restarted
 * server has a new epoch, so a client resuming with an id from before the restart gets
 * the gap event instead of events silently matched against a restarted count. */
typedef struct sse_ids {
    uint64_t epoch;
    uint64_t seq;
} sse_ids;

/* A new epoch: now, or one more than the last one given in this process. */
uint64_t sse_ids_epoch(void);
typedef struct sse_sub sse_sub;

/* Where a subscriber's events go. push queues c (it takes its own reference if it keeps
 * the chunk; the chunk is shared and must not be written) and returns 0, or -EPIPE (the
 * subscriber is gone or was just dropped as too slow) or -ENOMEM, as sse_stream_push
 * does. A failure concerns that subscriber alone: the channel goes on to the others and
 * keeps the subscription, which its owner ends (sse_subscriber_clear) when it learns of
 * the close its own way. Nor may push call back into the channel (subscribe, unsubscribe,
 * clear): it runs in the middle of a publish, while the channel walks its subscribers. */
typedef struct sse_sink {
    int  (*push)(void *ctx, sse_chunk *c);
    void  *ctx;
} sse_sink;

typedef struct sse_held {
    uint64_t   seq;
    sse_chunk *chunk;
} sse_held;

/* How a subscriber's stream frames events (the channel keeps both forms). */
enum { SSE_FORMAT_SSE = 0, SSE_FORMAT_NDJSON = 1 };

typedef struct sse_pending {
    sse_channel *ch;
    sse_chunk   *gap;        /* sent first when events after the id are gone; or NULL */
    sse_held    *events;     /* the kept events after the id, taken at subscribe time so
                                that publishes before the flush cannot push them out */
    unsigned     nevents;
    int          unresolved; /* sse_subscribe_unresolved: events still to be taken */
} sse_pending;

/* One per stream: its subscriptions and its replay state. Embedded in the binding's
 * stream object; zero-initialised is valid, with the sink set before the first
 * subscription. */
typedef struct sse_subscriber {
    sse_sink     sink;
    int          format;     /* SSE_FORMAT_* */
    sse_sub     *subs;       /* this stream's subscriptions */
    sse_pending *pending;    /* replays to send at the next flush */
    unsigned     npending, pending_cap;
    sse_held    *held;       /* live publishes held back until the flush */
    unsigned     nheld, held_cap;
} sse_subscriber;

/* ids: the app-wide ids shared by all channels of an app. The history ring is
 * allocated with the first event kept. */
sse_channel *sse_channel_new(const char *name, unsigned history, sse_ids *ids);
void         sse_channel_free(sse_channel *ch);  /* no subscriber may remain */
const char  *sse_channel_name(const sse_channel *ch);
unsigned     sse_channel_subscribers(const sse_channel *ch);
unsigned     sse_channel_history(const sse_channel *ch);
uint64_t     sse_channel_published(const sse_channel *ch);   /* events delivered to it */
unsigned     sse_channel_kept(const sse_channel *ch);        /* events kept for replay now */
/* The sequence number of the newest event it was given (delivered or remembered), kept
 * or not: what a client of it may have missed once the channel is gone. 0: none. */
uint64_t     sse_channel_last(const sse_channel *ch);

/* The owner's hook: fn(ud, ch) runs when ch's last subscriber leaves (sse_unsubscribe,
 * sse_subscriber_clear), so that an owner freeing unused channels learns of it. It runs
 * in the middle of those calls: it may note the channel, not free it. */
typedef void (*sse_channel_idle)(void *ud, sse_channel *ch);
void         sse_channel_on_idle(sse_channel *ch, sse_channel_idle fn, void *ud);

/* Encodes ev once and queues it to every subscriber. An event without an id is sent
 * with the app's id for its sequence number. Returns the sequence number, 0 on ENOMEM.
 * ev must have passed sse_frame_validate. */
uint64_t sse_channel_publish(sse_channel *ch, const sse_event *ev);

/* The backend's half, for a broker (sse_broker.c) that appends and orders events
 * elsewhere. deliver: an event the backend has placed at seq (increasing across the
 * app), encoded in both forms (c, nd: the subscribers take their own references), is
 * kept and sent to every subscriber, as a publish would; ids->seq follows. broadcast:
 * sends c/nd to every subscriber now, kept nowhere (a gap event). forget: drops the
 * history (the backend lost it) and marks everything up to `dropped` as gone.
 * set_dropped: events up to `dropped` are no longer kept by the backend. */
void sse_channel_deliver(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd);
/* Keeps an event of the backend's history without sending it to anyone (a process
 * reading a channel's history when it starts using it). */
void sse_channel_remember(sse_channel *ch, uint64_t seq, sse_chunk *c, sse_chunk *nd);
void sse_channel_broadcast(sse_channel *ch, sse_chunk *c, sse_chunk *nd);
void sse_channel_forget(sse_channel *ch, uint64_t dropped);
void sse_channel_set_dropped(sse_channel *ch, uint64_t dropped);

/* What a subscription with this last event id would replay. last_id NULL: nothing
 * (a fresh client). *after receives the sequence number to replay after; the return
 * value is the count of kept events after it, and *missed is 1 when events after it
 * are no longer kept, or may be: an id of another epoch (an earlier run) or one this
 * app never issued; then everything kept is replayed. */
unsigned sse_channel_resume_point(const sse_channel *ch, const char *last_id, size_t len,
                                  uint64_t *after, int *missed);

/* For a subscriber without a last event id that asks for the recent past: the sequence
 * number after which the newest n kept events lie (0 when n covers all that is kept);
 * *count is how many that is. */
uint64_t sse_channel_newest_after(const sse_channel *ch, unsigned n, unsigned *count);

/* Subscribes (0, 1 if already subscribed, -ENOMEM). With replay set, the kept events
 * after `after` (and `gap` first, if not NULL; the subscriber takes a reference) are sent
 * at the next sse_subscriber_flush, merged in order with what is published meanwhile. */
int  sse_subscribe(sse_subscriber *sb, sse_channel *ch, int replay, uint64_t after,
                   sse_chunk *gap);
int  sse_unsubscribe(sse_subscriber *sb, sse_channel *ch);   /* 0, or -1 if not subscribed */
/* For a backend whose history is not known yet (a broker still reading it): subscribes
 * with a replay to be decided later. Until sse_subscriber_resolve, the subscriber's
 * flushes send nothing and what is published to it is held, as for any pending replay.
 * 0, 1 if already subscribed, -ENOMEM. */
int  sse_subscribe_unresolved(sse_subscriber *sb, sse_channel *ch);
/* The replay of that subscription: the kept events after `after` (gap first, if not
 * NULL), as sse_subscribe's. 0, -1 if sb has no unresolved subscription to ch, -ENOMEM. */
int  sse_subscriber_resolve(sse_subscriber *sb, sse_channel *ch, uint64_t after, sse_chunk *gap);
/* Sends pending replays and held events. 0 or -ENOMEM. */
int  sse_subscriber_flush(sse_subscriber *sb);
int  sse_subscriber_has_pending(const sse_subscriber *sb);
/* Drops every subscription and pending replay (the stream has ended). */
void sse_subscriber_clear(sse_subscriber *sb);

#endif
