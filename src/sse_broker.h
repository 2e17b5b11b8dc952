/* sse_broker: channels shared by every process that uses the same Redis and prefix.
 * Plain C (no Lua, no HTTP), on sse_redis (hiredis on sse_loop).
 *
 * Redis is the backend half of a channel (sse_channel.h, "The seam for brokers"):
 *   - append: one script per publish (EVALSHA) increments the app-wide sequence and the
 *     channel's own count, XADDs the event (both encoded forms) to the channel's stream
 *     with the sequence as its id, trimmed to `history`, and PUBLISHes it. Appending and
 *     publishing in one script keeps pub/sub order equal to stream order;
 *   - notify: each process SUBSCRIBEs to the topic of every channel it uses;
 *   - range: a sync script reads what the stream keeps after a sequence number.
 * The local sse_channel stays the core: fan-out, history for resumes, replay without a
 * seam, the gap decision. Its history is a copy of the stream's, filled by what this
 * process delivers, so a resume is answered locally without a round trip.
 *
 * Exactly once, in order: every event carries its channel's count n (1, 2, 3...). An
 * event is delivered only as n == last + 1; one that comes early (pub/sub and the
 * publisher's own reply race, or pub/sub dropped a message) waits while a sync reads
 * the missing ones from the stream; one already delivered is dropped. What the stream no
 * longer has is announced with a `gap` event. A periodic sync per channel with
 * subscribers finds a lost last message.
 *
 * Ids are "<epoch>-<seq>" with Redis's epoch (created with the sequence, so it is new
 * whenever Redis lost its data): ids survive restarts of the app, and an id from before
 * Redis lost its data resumes with the gap. When the epoch changes under a running
 * process, every subscriber gets a gap event and the channels start again. */
#ifndef SSE_BROKER_H
#define SSE_BROKER_H

#include <stddef.h>
#include <stdint.h>
#include "sse_channel.h"
#include "sse_loop.h"

typedef struct sse_broker sse_broker;

typedef struct sse_broker_hooks {
    void (*log)(void *ud, int level, const char *msg);
    /* A channel's history has been read from Redis: subscriptions with a resume may be
     * made now (sse_broker_ready). Runs from the loop. */
    void (*ready)(void *ud, sse_channel *ch);
    void *ud;
} sse_broker_hooks;

typedef struct sse_broker_config {
    const char *host;            /* numeric address or "localhost" */
    int         port;
    int         db;
    const char *password;        /* NULL: none */
    const char *prefix;          /* keys are "<prefix>:..." */
    unsigned    check_ms;        /* periodic sync of channels with subscribers (0: 30 s) */
} sse_broker_config;

/* ids: the app's ids, which follow Redis's from now on. NULL on ENOMEM or a bad host
 * (err says which). */
sse_broker *sse_broker_new(sse_loop *loop, const sse_broker_config *cfg, sse_ids *ids,
                           const sse_broker_hooks *hooks, char *err, size_t errlen);
void        sse_broker_free(sse_broker *br);
int         sse_broker_up(const sse_broker *br);

/* The channel lives in Redis from now on (it must be used with this broker for the rest
 * of its life): its topic is subscribed and its history read. 0 or -ENOMEM. */
int  sse_broker_attach(sse_broker *br, sse_channel *ch);
/* The channel is about to be freed (nobody uses it here): its topic is unsubscribed
 * and everything this broker keeps of it dropped. A publish to it still waiting for its
 * reply is answered "channel freed". */
void sse_broker_detach(sse_broker *br, sse_channel *ch);
/* Its history has been read once: a resume point may be computed. */
int  sse_broker_ready(const sse_broker *br, const sse_channel *ch);

/* Publishes ev (validated) to ch: cb(ud, id, idlen, NULL) once Redis has stored it (it
 * has been delivered here already), or cb(ud, NULL, 0, err) ("redis unavailable"...,
 * on a later loop turn at the earliest). Returns 0, or -ENOMEM (cb is not called). */
typedef void (*sse_broker_published)(void *ud, const char *id, size_t idlen, const char *err);
int  sse_broker_publish(sse_broker *br, sse_channel *ch, const sse_event *ev,
                        sse_broker_published cb, void *ud);
/* Its Redis client, for other commands of the app's (presence). */
struct sse_redis *sse_broker_redis(sse_broker *br);

/* A publish whose caller went away: its callback will not be called. */
void sse_broker_forget(sse_broker *br, void *ud);

#endif
