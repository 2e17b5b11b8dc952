/* The binding of sse_channel: the channel class (server:channel, publish), subscribing
 * a subscriber to a channel (for stream:subscribe, in lsse_stream.c), and channel streams
 * (app:stream(path, channel)). Channels belong to the server object (freed after its
 * last stream); a channel userdata keeps the server userdata alive through its user
 * value. Nothing here knows a generator stream: only subscribers (sse_subscriber). */
#include "lsse.h"
#include "sse_stream.h"

#include <stdlib.h>
#include <string.h>

typedef struct lsse_channel {
    sse_channel *ch;
    lsse_server *b;
} lsse_channel;

static lsse_channel *check_channel(lua_State *L, int idx)
{
    lsse_channel *c = luaL_checkudata(L, idx, CHANNEL_MT);
    if (!c->b->loop)
        luaL_error(L, "attempt to use a channel of a closed app");
    return c;
}

/* server:channel(name, history) -> a new channel (the facade keeps one per name). */
int lsse_server_channel(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    const char *name = luaL_checkstring(L, 2);
    lua_Integer history = luaL_optinteger(L, 3, 100);
    luaL_argcheck(L, history >= 0 && history <= 1000000, 3, "history must be 0 to 1000000");
    if (b->nchannels == b->channels_cap) {
        unsigned ncap = b->channels_cap ? b->channels_cap * 2 : 8;
        sse_channel **a = realloc(b->channels, ncap * sizeof *a);
        if (!a)
            return luaL_error(L, "out of memory");
        b->channels = a;
        b->channels_cap = ncap;
    }
    lsse_channel *c = lua_newuserdatauv(L, sizeof *c, 1);
    c->b = b;
    c->ch = sse_channel_new(name, (unsigned)history, &b->ids);
    if (!c->ch)
        return luaL_error(L, "out of memory");
    b->channels[b->nchannels++] = c->ch;
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, CHANNEL_MT);
    return 1;
}

void lsse_free_channels(lsse_server *b)
{
    for (unsigned i = 0; i < b->nchannels; i++)
        sse_channel_free(b->channels[i]);
    free(b->channels);
    b->channels = NULL;
    b->nchannels = b->channels_cap = 0;
}

/* ch:publish(ev) -> id */
static int channel_publish(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    sse_event ev;
    lsse_check_event(L, 2, "channel:publish", &ev);
    uint64_t seq = sse_channel_publish(c->ch, &ev);
    if (!seq)
        return luaL_error(L, "channel:publish: out of memory");
    if (ev.id)
        lua_pushlstring(L, ev.id, ev.id_len);
    else
        lua_pushfstring(L, "%I-%I", (lua_Integer)c->b->ids.epoch, (lua_Integer)seq);
    return 1;
}

/* Computed fields: subscribers, name, history. */
static int channel_get(lua_State *L)
{
    lsse_channel *c = check_channel(L, 1);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "subscribers") == 0)
        lua_pushinteger(L, sse_channel_subscribers(c->ch));
    else if (strcmp(k, "name") == 0)
        lua_pushstring(L, sse_channel_name(c->ch));
    else if (strcmp(k, "history") == 0)
        lua_pushinteger(L, sse_channel_history(c->ch));
    else
        lua_pushnil(L);
    return 1;
}

static int channel_tostring(lua_State *L)
{
    lsse_channel *c = luaL_checkudata(L, 1, CHANNEL_MT);
    lua_pushfstring(L, "sse.channel (%s)", c->b->loop ? sse_channel_name(c->ch) : "closed");
    return 1;
}

/* The event a client gets first when events after its id are no longer kept:
 *   event: gap
 *   data: {"channel":"<name>","last_event_id":"<id>"}
 * It has no id, so the client's last event id stays as it was. */
static sse_chunk *gap_event(lua_State *L, int format, const char *channel,
                            const char *last_id, size_t len)
{
    int top = lua_gettop(L);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "gap");
    lua_setfield(L, -2, "event");
    lua_createtable(L, 0, 2);
    lua_pushstring(L, channel);
    lua_setfield(L, -2, "channel");
    lua_pushlstring(L, last_id, len);
    lua_setfield(L, -2, "last_event_id");
    lua_setfield(L, -2, "data");
    sse_event ev;
    lsse_check_event(L, top + 1, "stream:subscribe", &ev);
    int nd = format == SSE_FORMAT_NDJSON;
    sse_chunk *c = sse_chunk_new(nd ? sse_frame_ndjson_size(&ev) : sse_frame_size(&ev));
    if (c)
        c->len = nd ? sse_frame_ndjson_write(&ev, c->data) : sse_frame_write(&ev, c->data);
    lua_settop(L, top);
    return c;
}

sse_channel *lsse_check_channel(lua_State *L, int idx)
{
    return check_channel(L, idx)->ch;
}

int lsse_channel_subscribe(lua_State *L, sse_channel *ch, sse_subscriber *sb,
                           const char *last, size_t len, unsigned *n, int *missed)
{
    uint64_t after;
    *n = sse_channel_resume_point(ch, last, len, &after, missed);
    sse_chunk *gap = *missed ? gap_event(L, sb->format, sse_channel_name(ch), last, len) : NULL;
    int rc = sse_subscribe(sb, ch, last != NULL, after, gap);
    sse_chunk_unref(gap);
    return rc;
}

void lsse_channel_stream(lua_State *L, sse_request *r, int ch, const sse_stream_opts *so,
                         int format, long long retry, const char *last_id, size_t len)
{
    lsse_channel *c = check_channel(L, ch);
    lsse_substream *s = calloc(1, sizeof *s);
    if (!s) {
        luaL_error(L, "out of memory");
        return;
    }
    s->kind = STREAM_CHANNEL;
    s->sub.format = format;
    sse_stream *st = sse_request_stream(r, so);
    if (!st) {
        free(s);
        luaL_error(L, "could not start the stream");
        return;
    }
    s->sub.sink = lsse_stream_sink(st);
    sse_stream_set_ud(st, s);
    lsse_write_first(st, format, retry);
    /* From here s belongs to the stream (freed by stream_closed), so a failure just
     * ends the stream cleanly. */
    unsigned n;
    int missed;
    if (lsse_channel_subscribe(L, c->ch, &s->sub, last_id, len, &n, &missed) < 0)
        sse_stream_close(st);
    sse_subscriber_flush(&s->sub);
}

void lsse_channel_stream_closed(sse_stream *st)
{
    lsse_substream *s = sse_stream_ud(st);
    sse_subscriber_clear(&s->sub);
    sse_stream_release(st);
    free(s);
}

void lsse_open_channel(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "publish", channel_publish },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", channel_get },
        { "__tostring", channel_tostring },
        { NULL, NULL },
    };
    lsse_class(L, CHANNEL_MT, methods, meta);
}
