/* sse_channel: publish/subscribe with replay.
 *
 * A publish encodes the event once into a reference-counted chunk; every subscriber's
 * queue gets a pointer to that chunk (no copy, no Lua call per subscriber), and the
 * channel keeps the last `history` chunks for replay. Every publish takes the next
 * number of an app-wide sequence; an event without an id is sent with the id
 * "<epoch>-<number>" (sse_ids), so one Last-Event-ID resumes any set of channels, and an
 * id from an earlier run of the server (another epoch) is always recognised as one. Each publish is encoded in
 * both stream formats (SSE and NDJSON): once each, whatever the subscribers.
 *
 * Replay without a seam: a subscription made with a last event id is "pending" until
 * sse_subscriber_flush. Until then live publishes to that subscriber are held; the
 * flush sends, in sequence order and once each, the kept events after the id from every
 * pending channel together with the held ones. The binding flushes when the stream's
 * generator yields or returns, so subscribing to several channels in one turn replays
 * them merged in publish order.
 * Plain C, no Lua.
 */
#ifndef SSE_CHANNEL_H
#define SSE_CHANNEL_H

#include <stddef.h>
#include <stdint.h>
#include "sse_frame.h"
#include "sse_queue.h"
#include "sse_server.h"

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
} sse_pending;

/* One per stream: its subscriptions and its replay state. Embedded in the binding's
 * stream object; zero-initialised is valid. */
typedef struct sse_subscriber {
    sse_stream  *st;
    int          format;     /* SSE_FORMAT_* */
    sse_sub     *subs;       /* this stream's subscriptions */
    sse_pending *pending;    /* replays to send at the next flush */
    unsigned     npending, pending_cap;
    sse_held    *held;       /* live publishes held back until the flush */
    unsigned     nheld, held_cap;
} sse_subscriber;

/* ids: the app-wide ids shared by all channels of an app. */
sse_channel *sse_channel_new(const char *name, unsigned history, sse_ids *ids);
void         sse_channel_free(sse_channel *ch);  /* no subscriber may remain */
const char  *sse_channel_name(const sse_channel *ch);
unsigned     sse_channel_subscribers(const sse_channel *ch);
unsigned     sse_channel_history(const sse_channel *ch);

/* Encodes ev once and queues it to every subscriber. An event without an id is sent
 * with the app's id for its sequence number. Returns the sequence number, 0 on ENOMEM.
 * ev must have passed sse_frame_validate. */
uint64_t sse_channel_publish(sse_channel *ch, const sse_event *ev);

/* What a subscription with this last event id would replay. last_id NULL: nothing
 * (a fresh client). *after receives the sequence number to replay after; the return
 * value is the count of kept events after it, and *missed is 1 when events after it
 * are no longer kept, or may be: an id of another epoch (an earlier run) or one this
 * app never issued; then everything kept is replayed. */
unsigned sse_channel_resume_point(const sse_channel *ch, const char *last_id, size_t len,
                                  uint64_t *after, int *missed);

/* Subscribes (0, 1 if already subscribed, -ENOMEM). With replay set, the kept events
 * after `after` (and `gap` first, if not NULL; the subscriber takes a reference) are sent
 * at the next sse_subscriber_flush, merged in order with what is published meanwhile. */
int  sse_subscribe(sse_subscriber *sb, sse_channel *ch, int replay, uint64_t after,
                   sse_chunk *gap);
int  sse_unsubscribe(sse_subscriber *sb, sse_channel *ch);   /* 0, or -1 if not subscribed */
/* Sends pending replays and held events. 0 or -ENOMEM. */
int  sse_subscriber_flush(sse_subscriber *sb);
int  sse_subscriber_has_pending(const sse_subscriber *sb);
/* Drops every subscription and pending replay (the stream has ended). */
void sse_subscriber_clear(sse_subscriber *sb);

#endif
