/* sse_redis: a Redis client on hiredis's async API, driven by sse_loop. No thread of
 * ours, no polling, and nothing that blocks the loop: connecting is non-blocking and the
 * host must be a numeric address (or "localhost"), so no DNS lookup runs on the loop.
 * Plain C, no Lua, single-threaded: every call on the loop's thread.
 *
 * Two connections to one server: one for commands and scripts, one for SUBSCRIBE (a
 * connection in subscribe mode cannot send other commands). Each reconnects on its own
 * when it drops or fails to connect, with backoff on the loop's timers (100 ms doubling
 * to 5 s, with jitter). The link is "up" when both are connected and set up: AUTH and
 * SELECT answered on the command connection, AUTH and the SUBSCRIBE of every topic
 * answered on the subscriber.
 *
 * Callbacks:
 *   - on_state(ud, up, why): the link came up (why NULL) or went down (why says what
 *     happened: "Connection refused", "Server closed the connection", "AUTH failed: ...").
 *     Calls alternate, never two ups or two downs in a row, so a caller can log an outage
 *     once and the recovery once. The first call is up, or down when the first attempt
 *     fails. Up is reported once the subscriptions are restored (every topic's SUBSCRIBE
 *     is confirmed), so a message published after on_state(up) reaches on_message.
 *   - on_message(ud, topic, tlen, payload, plen): a message on a subscribed topic, in
 *     the order the server sent them. Both strings are valid during the call only and
 *     binary-safe (their lengths count, not NULs).
 *   - a command's sse_redis_cb(cbud, reply, err): exactly once per accepted command.
 *     Either reply is the server's answer (an error reply, REDIS_REPLY_ERROR, is a reply:
 *     err is NULL) and valid during the call only; or reply is NULL and err says why
 *     there is none: "redis unavailable" (the command connection was not up when the
 *     command was given), "disconnected" (the connection dropped with the command in
 *     flight: it may or may not have run) or "closed" (sse_redis_free).
 * A callback never runs from inside the call that gave the command: a command refused
 * because the link is down is answered from a 0 ms timer, on the next loop turn (after
 * the current batch of events), in the order such commands were given.
 *
 * Any callback may call any function here, sse_redis_free included.
 */
#ifndef SSE_REDIS_H
#define SSE_REDIS_H

#include <stddef.h>
#include <hiredis/hiredis.h>

#include "sse_loop.h"

typedef struct sse_redis sse_redis;

typedef void (*sse_redis_cb)(void *cbud, const redisReply *reply, const char *err);

typedef struct sse_redis_config {
    const char *host;       /* numeric IPv4/IPv6 address or "localhost"; NULL: 127.0.0.1 */
    int         port;       /* 0: 6379 */
    int         db;         /* SELECT after connecting (commands only: pub/sub ignores it) */
    const char *username;   /* AUTH username password (Redis 6 ACL); NULL: AUTH password */
    const char *password;   /* NULL or "": no AUTH */
    int         timeout_ms; /* connect and set up (AUTH, SELECT, SUBSCRIBE); 0: 3000 */
    void       *ud;
    void (*on_state)(void *ud, int up, const char *why);
    void (*on_message)(void *ud, const char *topic, size_t tlen, const char *payload, size_t plen);
} sse_redis_config;

/* Starts connecting (the first attempt runs from a 0 ms timer, so no callback runs
 * before this returns). cfg's strings are copied. On bad input returns NULL and sets
 * *err (if err is not NULL) to a static message; NULL with *err "out of memory" too. */
sse_redis *sse_redis_new(sse_loop *loop, const sse_redis_config *cfg, const char **err);

/* Disconnects and releases everything. Every pending callback (commands in flight or
 * waiting to be refused) runs before this returns, with reply NULL and err "closed";
 * meanwhile commands and subscriptions are refused (-ESHUTDOWN) and another
 * sse_redis_free is a no-op. on_state and on_message do not run again.
 * Called from one of this sse_redis's callbacks, the memory itself is released by a
 * 0 ms timer after the current batch of events (run the loop once more before
 * sse_loop_free). Like any owner of watches (sse_loop.h), not from another descriptor's
 * callback of the same loop turn while one of ours could still be in that batch: from
 * outside the loop's callbacks, a timer callback or our own callbacks it is safe. */
void sse_redis_free(sse_redis *r);

/* 1 when the link is up (both connections ready), else 0. */
int sse_redis_up(const sse_redis *r);

/* Sends a command: argv[0..argc-1] with lengths argvlen (NULL: strlen of each), copied
 * before this returns. 0: accepted, cb runs exactly once (see above). Negative errno:
 * refused and cb never runs: -EINVAL (argc < 1, no argv), -ENOMEM, -ESHUTDOWN (inside
 * sse_redis_free). Replies come in the order commands were given, on one connection. */
int sse_redis_command(sse_redis *r, sse_redis_cb cb, void *cbud,
                      int argc, const char **argv, const size_t *argvlen);

/* A Lua script and its SHA1 (computed here, as Redis does). Reference-counted: an eval
 * in flight keeps it, so the caller may free it at any time after giving its evals. */
typedef struct sse_redis_script sse_redis_script;
sse_redis_script *sse_redis_script_new(const char *text, size_t len);   /* NULL: no memory */
void              sse_redis_script_free(sse_redis_script *s);
const char       *sse_redis_script_sha(const sse_redis_script *s);     /* 40 hex digits */

/* EVALSHA sha nkeys argv...: argv holds the nkeys keys, then the other arguments. When
 * the server answers NOSCRIPT (a restart, SCRIPT FLUSH), sends EVAL with the text once,
 * which also loads it again; the caller sees only the final reply. Like
 * sse_redis_command otherwise, except that a retried eval's reply comes after those of
 * commands given meanwhile. -EINVAL also for nkeys < 0 or > argc. */
int sse_redis_eval(sse_redis *r, sse_redis_script *s, sse_redis_cb cb, void *cbud,
                   int nkeys, int argc, const char **argv, const size_t *argvlen);

/* Adds topic to the subscribed set (a no-op if it is there) and, when the subscriber
 * connection is up, sends SUBSCRIBE. The set is kept here: after a reconnect every
 * topic in it is subscribed again. Messages of the topic go to on_message until
 * sse_redis_unsubscribe; those already on the way then are dropped. 0, -EINVAL (topic
 * NULL with len > 0), -ENOMEM or -ESHUTDOWN. */
int sse_redis_subscribe(sse_redis *r, const char *topic, size_t len);
/* Removes topic from the set (a no-op if it is not there) and sends UNSUBSCRIBE when
 * connected; no message of it reaches on_message after this returns. 0, -EINVAL or
 * -ESHUTDOWN. */
int sse_redis_unsubscribe(sse_redis *r, const char *topic, size_t len);

/* For tests and diagnostics: accepted commands whose callback has not run yet, and the
 * number of subscribed topics. */
size_t sse_redis_pending(const sse_redis *r);
size_t sse_redis_topics(const sse_redis *r);

#endif
