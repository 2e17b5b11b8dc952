/* Shared declarations of the binding layer (lsse_*.c): Lua values <-> core calls.
 *
 *   lsse_core.c     luaopen_sse_core; lsse_class (how every class is built); anchors;
 *                   the log path and protected calls every hook uses
 *   lsse_task.c     the scheduler of app coroutines: resume, errors, what each waits for
 *   lsse_server.c   the server object
 *   lsse_request.c  requests: the req table, responses, handlers as coroutines
 *   lsse_stream.c   the stream class and a stream's life in the binding
 *   lsse_timer.c    the timer class (server:timer)
 *   lsse_channel.c  the channel class and channel streams (app:stream(path, channel))
 *   lsse_frame.c    encode, comment, and the parser class
 *   lsse_file.c     the file class (core.open_file, file responses)
 *   lsse_workers.c  worker processes (core.workers, core.reserve_port)
 *
 * Ownership: one rule for every binding object. Lua runs only inside server:step (or
 * server:close) on the server's thread, and the C objects of an app (loop, server,
 * streams, channels) are freed only when the server userdata is closed or collected. So
 * every object that points at the server (a `b` field) keeps the server userdata alive
 * through a user value, which makes `b` valid memory for as long as the object exists;
 * and every object whose C side may end before it does is made inert then (its pointer
 * to that C side set to NULL, or the server's b->loop NULL once the server is closed),
 * its methods checking that first. Per class:
 *   server   owns the loop, the sse_server and the channels; b->loop = NULL once closed
 *            (every method raises "attempt to use a closed server")
 *   stream   keeps the server in UV_SERVER; made inert when its stream ends (s->st = NULL
 *            in lsse_stream_closed): methods then answer nil, "closed"
 *   timer    keeps the server in a user value; inert once the server is closed (cancel
 *            only releases it: the loop and its timers are gone)
 *   channel  keeps the server in a user value; inert once the server is closed (raises
 *            "attempt to use a channel of a closed app"). The userdata is a handle on
 *            a record of lsse_channel.c, which owns the sse_channel: freed once no
 *            handle and no subscriber is left (and, without a broker, no history)
 *   parser, file   no server: each owns its C object (parser state, descriptor)
 *   channel stream (lsse_substream) is no Lua object: C memory owned by its sse_stream,
 *            freed by its closed hook.
 * While the C side may still call back (stream open, timer armed), a Lua object is also
 * anchored (lsse_anchor) so it is not collected under it.
 */
#ifndef LSSE_H
#define LSSE_H

#include <lua.h>
#include <lauxlib.h>
#include "sse_channel.h"
#include "sse_frame.h"
#include "sse_loop.h"
#include "sse_server.h"

#define SERVER_MT  "sse.server"
#define STREAM_MT  "sse.stream"
#define TIMER_MT   "sse.timer"
#define CHANNEL_MT "sse.channel"
#define PARSER_MT  "sse.parser"
#define FILE_MT    "sse.file"

/* ---- lsse_core.c ---- */

/* The server userdata: one per app. */
typedef struct lsse_server {
    sse_loop     *loop;        /* NULL once closed */
    sse_server   *srv;
    lua_State    *L;           /* the thread running step(); hooks call Lua on it */
    int           self_ref;    /* the server userdata itself, for lsse_push_server */
    int           dispatch_ref; /* these four are anchors (lsse_anchor) */
    int           admit_ref;
    int           log_ref;
    int           signal_ref;
    int           finalizing;  /* __gc: drop streams without running Lua */
    size_t        high_water;
    sse_ids       ids;         /* app-wide event ids shared by all channels */
    struct lsse_chans *chans;  /* the channels by name (lsse_channel.c), made on first use */
    unsigned      max_channels; /* 0: no limit */
    struct lsse_task *running; /* the app coroutine being resumed now, or NULL */
    struct sse_http  *http;    /* outbound HTTP (lsse_http.c), made on first use */
    struct lsse_fetch *fetches; /* fetches in flight, freed with the server */
    struct sse_broker *broker; /* channels on Redis (app option broker), or NULL */
    struct lsse_waiter *waiters; /* resumes waiting for a channel's history (lsse_channel.c) */
    int64_t       created_us;  /* when the server was made (app:stats' uptime) */
    unsigned      timer_nesting; /* while a timer's callback runs (until it first waits):
                                    that timer's nesting level + 1 (lsse_timer.c) */
} lsse_server;

/* Registers the class `name`: meta holds its metamethods; methods are what obj.name
 * finds (obj:send(...)). A meta "__index" is the getter of the class's computed fields
 * (stream.closed, server.port): it is asked only for keys that are not methods, as
 * getter(obj, key). Without one, __index is the methods table. */
void lsse_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta);

/* Anchors: the Lua values C keeps for an app (its handlers, open streams, armed timers)
 * live in a table held by the server userdata, never in the registry, so that an app
 * nobody references any more is collected with everything it holds; a registry
 * reference to anything leading back to the app would keep it alive forever.
 * lsse_open_anchors creates the registry's weak map server -> anchors (once);
 * lsse_new_anchors gives the server userdata on top its anchors table, and anchors the
 * server itself (b->self_ref, for lsse_push_server).
 * lsse_anchor pops the value on top and returns its ref (LUA_NOREF once the server is
 * being collected); lsse_unanchor releases *ref and sets it to LUA_NOREF;
 * lsse_push_anchored pushes the value (nil if gone). */
void lsse_open_anchors(lua_State *L);
void lsse_new_anchors(lua_State *L, lsse_server *b);
int  lsse_anchor(lua_State *L, lsse_server *b);
void lsse_unanchor(lua_State *L, lsse_server *b, int *ref);
void lsse_push_anchored(lua_State *L, lsse_server *b, int ref);
void lsse_push_server(lua_State *L, lsse_server *b);   /* its userdata (nil if being collected) */

/* The one log path: the app's log function (level names as in sse_log.h), silent while
 * the server is being collected. */
void lsse_log(lsse_server *b, int level, const char *msg);
/* Calls the function below the nargs values on top under a traceback handler; a failure
 * is logged as "<what>: <error and traceback>". Leaves nothing; returns 1 on success. */
int  lsse_pcall(lsse_server *b, lua_State *L, int nargs, const char *what);

/* ---- lsse_task.c: the scheduler of app coroutines ---- */

/* What a task's coroutine waits for while it is suspended. */
enum {
    WAIT_NONE,     /* running, not started, or suspended by nothing we know of */
    WAIT_SLEEP,    /* its timer (lsse_task_sleep, or a bare coroutine.yield: 0 ms) */
    WAIT_DRAIN,    /* its owner's lsse_task_wake (a stream: the client caught up) */
    WAIT_IO,       /* an outbound request (lsse_task_deliver brings the result) */
    WAIT_FOREVER,  /* finished, or told once it was cancelled: never resumed again */
};

typedef struct lsse_task lsse_task;

/* What a task's owner is told; any may be NULL. */
typedef struct lsse_task_ops {
    const char *what;                    /* names it in the log: "<what> <label>: error" */
    const char *(*label)(lsse_task *t);  /* e.g. the stream's peer */
    void (*resumed)(lsse_task *t);       /* after each resume, before anything else */
    void (*ended)(lsse_task *t, int ok); /* the function returned (1) or raised (0, logged) */
} lsse_task_ops;

/* An app coroutine, embedded in its owner (the stream). The owner anchors the coroutine
 * (a user value) and its own userdata while the task may be resumed. */
struct lsse_task {
    lsse_server         *b;
    lua_State           *co;
    const lsse_task_ops *ops;
    int                  wait;         /* WAIT_* */
    int                  started;
    int                  cancelled;    /* its owner is gone: no more timer wake-ups */
    int                  told_closed;  /* it was given nil, "closed" once */
    int                  start_nargs;  /* >= 0: its first resume is due on the timer */
    void                *io;           /* WAIT_IO: what it waits on, and how to stop it */
    void               (*io_cancel)(void *io);
    sse_timer            timer;        /* WAIT_SLEEP's wake-up (and a later start) */
};

void lsse_task_init(lsse_task *t, lsse_server *b, lua_State *co, const lsse_task_ops *ops);
/* The first resume: fn and its nargs arguments are on top of b->L; they are moved. */
void lsse_task_start(lsse_task *t, int nargs);
/* Called from the task's own coroutine L: suspends it until the timer (WAIT_SLEEP,
 * resumed with true), until lsse_task_wake (WAIT_DRAIN, resumed with true), or forever.
 * They return what lua_yield does: return their result from the C function. */
int  lsse_task_sleep(lua_State *L, lsse_task *t, uint64_t ms);
int  lsse_task_wait(lua_State *L, lsse_task *t, int wait);
/* Resumes it with true if it waits for `wait` (WAIT_DRAIN: the owner's event came). */
void lsse_task_wake(lsse_task *t, int wait);
/* Resumes it with the nargs values on top of t->co if it waits for `wait`; else drops them. */
void lsse_task_deliver(lsse_task *t, int wait, int nargs);
/* What a call on a closed object returns to L: nil, "closed" the first time the task
 * hears it (or always, when L is not the task's coroutine); from the task a later call
 * never returns, so a loop that ignores the result ends instead of spinning. */
int  lsse_task_closed(lua_State *L, lsse_task *t);
/* Its owner is gone: the timer stops and is never re-armed (lsse_task_cancel); then the
 * owner tells it (lsse_task_tell_closed): if it waits in a sleep or drain it is resumed
 * with nil, "closed". Split in two so the owner's on_close callbacks run in between. */
void lsse_task_cancel(lsse_task *t);
void lsse_task_tell_closed(lsse_task *t);
int  lsse_task_finished(const lsse_task *t);   /* the function has returned or raised */
int  lsse_task_is(const lsse_task *t, lua_State *L);   /* L is the task's coroutine */
/* Where app coroutines run: what the error of a wait called anywhere else names. */
#define LSSE_APP_COROUTINES "(a handler, a before hook, a stream's generator or accept, " \
                            "a timer callback, a function given to app:spawn)"
/* The task whose coroutine is L, if L is the app coroutine running now; else NULL
 * (the main thread, or a plain coroutine of the user's: they cannot wait on the loop). */
lsse_task *lsse_task_current(lsse_server *b, lua_State *L);
/* server:spawn(fn, ...): fn(...) as an app coroutine, first resumed in the next turn.
 * server:sleep(seconds): the current app coroutine waits; raises outside of one. */
int  lsse_server_spawn(lua_State *L);
int  lsse_server_sleep(lua_State *L);
/* A timer's callback and its nargs arguments, on top of b->L, run now as an app coroutine
 * (so it may wait: app:sleep, app:fetch); an error is logged as "timer: ...". */
void lsse_task_run_timer(lsse_server *b, int nargs);
void lsse_open_task(lua_State *L);   /* registers the spawned coroutines' class */

/* ---- lsse_http.c: app:fetch ---- */
int  lsse_server_fetch(lua_State *L);
void lsse_free_fetches(lsse_server *b);   /* the server is going: cancel them all */
void lsse_open_http(lua_State *L);        /* registers the streamed responses' class */

/* ---- lsse_stream.c ---- */

/* User values of a stream userdata. */
enum { UV_CO = 1, UV_REQ, UV_FN, UV_ONCLOSE, UV_FIELDS, UV_SERVER, UV_COUNT = UV_SERVER };

/* What a stream's ud points at: both kinds start with their kind. */
enum { STREAM_LUA = 0, STREAM_CHANNEL = 1 };

/* The stream userdata: anchored by self_ref while the stream is open. */
typedef struct lsse_stream {
    int            kind;       /* STREAM_LUA */
    sse_stream    *st;         /* NULL once closed */
    lsse_server   *b;          /* kept alive by UV_SERVER */
    int            self_ref;
    lsse_task      gen;        /* its generator */
    sse_subscriber sub;        /* its channel subscriptions */
} lsse_stream;

/* A stream of app:stream(path, channel): a subscriber and nothing else, kept in C (no
 * coroutine, no Lua object), so that a held subscriber costs as little as possible. */
typedef struct lsse_substream {
    int            kind;       /* STREAM_CHANNEL */
    sse_subscriber sub;
} lsse_substream;

void lsse_open_stream(lua_State *L);
/* Starts a generator stream on r: fn and req at those indices, run as fn(stream, req)
 * once the response is queued. Raises on failure. */
void lsse_stream_start(lua_State *L, lsse_server *b, sse_request *r, int fn, int req,
                       const sse_stream_opts *so, int format, long long retry);
/* The sse_server hooks of every stream (both kinds). */
void lsse_stream_ready(void *ud, sse_stream *st);
void lsse_stream_closed(void *ud, sse_stream *st);
/* The bytes a stream starts with, so EventSource fires "open" at once and proxies pass
 * the headers on: "retry: N" when retry >= 0, else a ":ok" comment; nothing for NDJSON. */
void lsse_write_first(sse_stream *st, int format, long long retry);
/* The sink that queues a channel's shared chunks on st. */
sse_sink lsse_stream_sink(sse_stream *st);

/* ---- lsse_request.c: the request hooks of sse_server ---- */
void lsse_admit_hook(void *ud, sse_request *r);     /* admit(req), before the body */
void lsse_request_hook(void *ud, sse_request *r);   /* dispatch(req) as a handler task */
void lsse_request_gone(void *ud, sse_request *r);   /* a waiting handler's client left */
void lsse_open_request(lua_State *L);               /* registers the handler tasks' class */
/* ---- lsse_server.c ---- */

/* Adds the server constructor, and every class, to the table on top of the stack. */
void lsse_open_server(lua_State *L);
lsse_server *lsse_check_server(lua_State *L, int idx);

/* ---- lsse_timer.c ---- */

void lsse_open_timer(lua_State *L);
int  lsse_server_timer(lua_State *L);   /* server:timer(after, every, fn) */

/* ---- lsse_channel.c: the channel class, server:channel, channel streams ---- */

void lsse_open_channel(lua_State *L);
int  lsse_server_channel(lua_State *L);
void lsse_free_channels(lsse_server *b);
/* Sets channels, subscribers, publishes, channels_evicted, channels_refused and
 * channel_list ({ name, subscribers, publishes, history } each) in the table at t
 * (app:stats), after freeing the channels nothing uses any more. */
void lsse_channel_stats(lua_State *L, lsse_server *b, int t);
/* The channel at idx (raises if it is not one, or its app is closed). */
sse_channel *lsse_check_channel(lua_State *L, int idx);
/* Subscribes sb to ch with a replay after last, the gap event first when events after it
 * are no longer kept; without last, with the newest `first` kept events (0: none, as a
 * fresh client; UINT_MAX: all). Returns what sse_subscribe does (0, 1 if
 * already subscribed, -ENOMEM), or 2: a channel on a broker whose history has not been
 * read yet; the subscription is made (and flushed) once it has. *n and *missed are what
 * sse_channel_resume_point says (0 when deferred). */
int  lsse_channel_subscribe(lua_State *L, lsse_server *b, sse_channel *ch, sse_subscriber *sb,
                            const char *last, size_t len, unsigned first, unsigned *n,
                            int *missed);
/* sb's stream has ended: its subscriptions still waiting for a history are dropped. */
void lsse_channel_unwait(lsse_server *b, sse_subscriber *sb);
/* server:redis(arg, ...): a command on the broker's Redis from an app coroutine. */
int  lsse_server_redis(lua_State *L);
/* Connects the app's channels to Redis: core.server's broker option at idx. Raises. */
void lsse_open_broker(lua_State *L, lsse_server *b, int idx);
/* Starts a channel stream for the channel at index ch, replaying after last_id (NULL:
 * none). Raises on failure. */
void lsse_channel_stream(lua_State *L, sse_request *r, int ch, const sse_stream_opts *so,
                         int format, long long retry, const char *last_id, size_t len,
                         unsigned first);
/* The `first` option at idx: nil (0), "newest" (1), "oldest" (UINT_MAX) or a count. */
unsigned lsse_check_first(lua_State *L, int idx);
/* The closed hook of a channel stream: frees it. */
void lsse_channel_stream_closed(lsse_server *b, sse_stream *st);

/* ---- lsse_frame.c: adds encode, comment and parser to the table on top ---- */

void lsse_open_frame(lua_State *L);
/* Reads the event at idx (a string = data, or a table with data/event/id/retry/comment)
 * into ev, validating it. Raises "<fname>: <why>" on misuse. May push one value
 * (text converted from a number or a table) that must stay on the stack while ev is used. */
void lsse_check_event(lua_State *L, int idx, const char *fname, sse_event *ev);

/* ---- lsse_workers.c: adds workers, reserve_port and cpus to the table on top ---- */
void lsse_open_workers(lua_State *L);
/* ---- lsse_file.c: adds open_file to the table on top ---- */

void lsse_open_file(lua_State *L);
/* Answers r with the sse.file at idx (its range, or all of it): the response takes the
 * file's descriptor, so the file object is closed afterwards. Raises if it is closed. */
void lsse_respond_file(lua_State *L, sse_request *r, int status, const sse_header *h, size_t nh,
                       int idx);

#endif
