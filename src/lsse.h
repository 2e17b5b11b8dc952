/* Shared declarations of the binding layer (lsse_*.c): Lua values <-> core calls. */
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
#define CHANNEL_MT "sse.channel"
#define FILE_MT    "sse.file"

/* The server userdata: one per app. */
typedef struct lsse_server {
    sse_loop     *loop;
    sse_server   *srv;
    lua_State    *L;           /* the thread running step(); hooks call Lua on it */
    int           dispatch_ref; /* these four are anchors (lsse_anchor) */
    int           admit_ref;
    int           log_ref;
    int           signal_ref;
    int           finalizing;  /* __gc: drop streams without running Lua */
    size_t        high_water;
    sse_ids       ids;         /* app-wide event ids shared by all channels */
    sse_channel **channels;    /* owned here: freed after the last stream is gone */
    unsigned      nchannels, channels_cap;
} lsse_server;

enum { WAIT_NONE, WAIT_SLEEP, WAIT_DRAIN, WAIT_FOREVER };

/* User values of a stream userdata. */
enum { UV_CO = 1, UV_REQ, UV_FN, UV_ONCLOSE, UV_FIELDS, UV_COUNT = UV_FIELDS };

/* What a stream's ud points at: both kinds start with their kind. */
enum { STREAM_LUA = 0, STREAM_CHANNEL = 1 };

/* The stream userdata: anchored by self_ref while the stream is open. */
typedef struct lsse_stream {
    int            kind;       /* STREAM_LUA */
    sse_stream    *st;         /* NULL once closed */
    lsse_server   *b;
    lua_State     *co;         /* the generator's coroutine (anchored in UV_CO) */
    int            self_ref;
    int            wait;
    int            started;
    int            told_closed; /* the generator has been given nil, "closed" once */
    sse_timer      sleep;
    sse_subscriber sub;        /* its channel subscriptions */
} lsse_stream;

/* A stream of app:stream(path, channel): a subscriber and nothing else, kept in C (no
 * coroutine, no Lua object), so that a held subscriber costs as little as possible. */
typedef struct lsse_substream {
    int            kind;       /* STREAM_CHANNEL */
    sse_subscriber sub;
} lsse_substream;

/* The bytes a stream starts with, so EventSource fires "open" at once and proxies pass
 * the headers on: "retry: N" when retry >= 0, else a ":ok" comment; nothing for NDJSON. */
void lsse_write_first(sse_stream *st, int format, long long retry);

/* Anchors: the Lua values C keeps for an app (its handlers, open streams, armed timers)
 * live in a table held by the server userdata, never in the registry, so that an app
 * nobody references any more is collected with everything it holds; a registry
 * reference to anything leading back to the app would keep it alive forever.
 * lsse_anchor pops the value on top and returns its ref (LUA_NOREF once the server is
 * being collected); lsse_unanchor releases *ref and sets it to LUA_NOREF;
 * lsse_push_anchored pushes the value (nil if gone). */
int  lsse_anchor(lua_State *L, lsse_server *b);
void lsse_unanchor(lua_State *L, lsse_server *b, int *ref);
void lsse_push_anchored(lua_State *L, lsse_server *b, int ref);

/* lsse_frame.c: adds encode, comment and parser to the table on top of the stack. */
void lsse_open_frame(lua_State *L);

/* Reads the event at idx (a string = data, or a table with data/event/id/retry/comment)
 * into ev, validating it. Raises "<fname>: <why>" on misuse. May push one value
 * (text converted from a number or a table) that must stay on the stack while ev is used. */
void lsse_check_event(lua_State *L, int idx, const char *fname, sse_event *ev);

/* lsse_server.c: adds the server constructor to the table on top of the stack. */
void lsse_open_server(lua_State *L);
lsse_server *lsse_check_server(lua_State *L, int idx);

/* lsse_channel.c: the channel class; server:channel and stream:subscribe/unsubscribe. */
void lsse_open_channel(lua_State *L);
int  lsse_server_channel(lua_State *L);
int  lsse_stream_subscribe(lua_State *L);
int  lsse_stream_unsubscribe(lua_State *L);
void lsse_free_channels(lsse_server *b);
/* Starts a channel stream for the channel at index ch, replaying after last_id (NULL:
 * none). Raises on failure. */
void lsse_channel_stream(lua_State *L, sse_request *r, int ch, const sse_stream_opts *so,
                         int format, long long retry, const char *last_id, size_t len);

/* lsse_file.c: adds open_file to the table on top of the stack. */
void lsse_open_file(lua_State *L);
/* Answers r with the sse.file at idx (its range, or all of it): the response takes the
 * file's descriptor, so the file object is closed afterwards. Raises if it is closed. */
void lsse_respond_file(lua_State *L, sse_request *r, int status, const sse_header *h, size_t nh,
                       int idx);

#endif
