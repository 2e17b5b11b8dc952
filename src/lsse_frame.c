/* Lua binding of the encoder and the parser: sse.encode, sse.comment, sse.parser. */
#include "lsse.h"
#include "sse_parser.h"

#include <errno.h>
#include <string.h>

/* Registry key of the cached cjson.encode: its address is the key. */
static const char cjson_encode_key = 0;

/* Leaves cjson.encode on the stack. It is required on first use only, so lua-cjson
 * stays optional for programs that never send a table as data. */
static void push_json_encoder(lua_State *L, const char *fname)
{
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &cjson_encode_key) == LUA_TFUNCTION)
        return;
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "cjson");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK)
        luaL_error(L, "%s: field 'data' is a table, which needs lua-cjson: %s", fname,
                   lua_tostring(L, -1));
    if (lua_getfield(L, -1, "encode") != LUA_TFUNCTION)
        luaL_error(L, "%s: cjson.encode is not a function", fname);
    lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &cjson_encode_key);
}

/* A field whose text exists only as a new Lua string (a converted number, a JSON
 * text): ev points into it, so it must stay on the stack while ev is used. */
typedef struct anchored {
    const char **p;
    size_t      *len;
    size_t       n;
} anchored;

/* Replaces the value on top with its text as a string; returns 1 if it had to be
 * converted (and so must be anchored), 0 for strings, which the table itself keeps
 * alive. Raises for other types. */
static int to_text(lua_State *L, const char *fname, const char *field, const char **p, size_t *len)
{
    switch (lua_type(L, -1)) {
    case LUA_TSTRING:
        *p = lua_tolstring(L, -1, len);
        return 0;
    case LUA_TNUMBER: {
        /* "nan" or "inf" on the wire is never what was meant. */
        lua_Number x = lua_tonumber(L, -1);
        if (x != x || x - x != 0)
            return luaL_error(L, "%s: field '%s' must be a finite number", fname, field);
        /* In place: the value on top is our copy, not the table's, so converting it
         * does not disturb the table or the traversal. Integers print as "%d", floats
         * as tostring does. */
        *p = lua_tolstring(L, -1, len);
        return 1;
    }
    default:
        return luaL_error(L, "%s: field '%s' must be a string or a number", fname, field);
    }
}

static int data_to_text(lua_State *L, const char *fname, sse_event *ev)
{
    switch (lua_type(L, -1)) {
    case LUA_TBOOLEAN:
        /* Literals live forever: nothing to anchor. */
        ev->data = lua_toboolean(L, -1) ? "true" : "false";
        ev->data_len = strlen(ev->data);
        ev->data_json = 1;
        return 0;
    case LUA_TTABLE:
        push_json_encoder(L, fname);
        lua_insert(L, -2);
        if (lua_pcall(L, 1, 1, 0) != LUA_OK)
            luaL_error(L, "%s: field 'data': %s", fname, lua_tostring(L, -1));
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: field 'data': cjson.encode did not return a string", fname);
        ev->data = lua_tolstring(L, -1, &ev->data_len);
        ev->data_json = 1;
        return 1;
    case LUA_TNUMBER:
        /* Finite numbers (the only ones to_text takes) print as valid JSON numbers. */
        ev->data_json = 1;
        return to_text(L, fname, "data", &ev->data, &ev->data_len);
    case LUA_TSTRING:
        return to_text(L, fname, "data", &ev->data, &ev->data_len);
    default:
        return luaL_error(L, "%s: field 'data' must be a string, number, boolean or table", fname);
    }
}

static void check_retry(lua_State *L, const char *fname, sse_event *ev)
{
    int ok = 0;
    lua_Integer r = 0;
    /* lua_tointegerx alone would also accept numeric strings such as "10". A float
     * is accepted when its value is an exact integer (3000.0). */
    if (lua_type(L, -1) == LUA_TNUMBER)
        r = lua_tointegerx(L, -1, &ok);
    if (!ok || r < 0)
        luaL_error(L, "%s: field 'retry' must be a non-negative integer", fname);
    ev->retry = (long long)r;
}

/* ev points into Lua strings, never into C copies, so encoding costs no extra copy:
 *  - the table's own strings, alive as long as the caller keeps the table (it is an
 *    argument, so it stays on the stack) and does not change it while ev is in use;
 *  - texts made here (the JSON of a table data, a converted number), which exist
 *    nowhere else: they are left on the stack, as one value at most, and must stay
 *    there while ev is in use. Callers restore their stack top afterwards. */
void lsse_check_event(lua_State *L, int idx, const char *fname, sse_event *ev)
{
    static const sse_event empty = SSE_EVENT_INIT;
    *ev = empty;
    idx = lua_absindex(L, idx);

    int t = lua_type(L, idx);
    if (t == LUA_TSTRING) {
        ev->data = lua_tolstring(L, idx, &ev->data_len);
        return;
    }
    if (t == LUA_TNUMBER || t == LUA_TBOOLEAN) {   /* the data, as { data = x } takes it */
        lua_pushvalue(L, idx);
        if (!data_to_text(L, fname, ev))
            lua_pop(L, 1);
        return;
    }
    if (t != LUA_TTABLE) {
        luaL_typeerror(L, idx, "string, number, boolean or table");
        return;
    }

    /* One raw traversal does both jobs: it rejects unknown keys (typos such as
     * "evnet" would otherwise be silently dropped) and reads the fields. Raw access
     * matters: a string reached through __index might be referenced by nothing once
     * popped, while the table's own strings live as long as the table.
     * Converted texts are moved below the key (the traversal needs the key on top),
     * so they pile up on the stack in the order they were made. */
    anchored anchors[3];
    int nanchors = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t klen = 0;
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &klen) : NULL;
        const char **p = NULL;
        size_t *len = NULL;
        int conv = 0;
        if (!k) {
            luaL_error(L, "%s: unknown field [%s]", fname, luaL_tolstring(L, -2, NULL));
        } else if (klen == 4 && memcmp(k, "data", 4) == 0) {
            conv = data_to_text(L, fname, ev);
            p = &ev->data;
            len = &ev->data_len;
        } else if (klen == 5 && memcmp(k, "event", 5) == 0) {
            conv = to_text(L, fname, "event", &ev->event, &ev->event_len);
            p = &ev->event;
            len = &ev->event_len;
        } else if (klen == 2 && memcmp(k, "id", 2) == 0) {
            conv = to_text(L, fname, "id", &ev->id, &ev->id_len);
            p = &ev->id;
            len = &ev->id_len;
        } else if (klen == 5 && memcmp(k, "retry", 5) == 0) {
            check_retry(L, fname, ev);
        } else if (klen == 7 && memcmp(k, "comment", 7) == 0) {
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "%s: field 'comment' must be a string", fname);
            ev->comment = lua_tolstring(L, -1, &ev->comment_len);
        } else {
            luaL_error(L, "%s: unknown field '%s'", fname, k);
        }
        if (conv) {
            anchors[nanchors].p = p;
            anchors[nanchors].len = len;
            anchors[nanchors].n = *len;
            nanchors++;
            lua_insert(L, -2); /* [.. text key] */
        } else {
            lua_pop(L, 1);
        }
    }

    /* The header promises at most one pushed value, so that callers only need to
     * restore their stack top. Two or more conversions ({data = {...}, id = 7}) are
     * joined into one string and the fields point into it; the copy costs no more
     * than the JSON encoding that made it. */
    if (nanchors > 1) {
        lua_concat(L, nanchors);
        const char *s = lua_tostring(L, -1);
        for (int i = 0; i < nanchors; i++) {
            *anchors[i].p = s;
            *anchors[i].len = anchors[i].n;
            s += anchors[i].n;
        }
    }

    /* {} would go out as a stray blank line: an event with nothing in it is misuse. */
    if (!ev->data && !ev->comment && !ev->event && !ev->id && ev->retry < 0)
        luaL_error(L, "%s: the event is empty (give data, comment, event, id or retry)", fname);
    const char *why;
    if (sse_frame_validate(ev, &why))
        luaL_error(L, "%s: %s", fname, why);
}

static int l_encode(lua_State *L)
{
    sse_event ev;
    lsse_check_event(L, 1, "sse.encode", &ev);
    size_t size = sse_frame_size(&ev);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, size);
    luaL_pushresultsize(&b, sse_frame_write(&ev, out));
    return 1;
}

static int l_comment(lua_State *L)
{
    size_t len;
    /* Optional like stream:comment's: sse.comment() is the bare ":" heartbeat. */
    const char *text = luaL_optlstring(L, 1, "", &len);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, sse_frame_comment_size(text, len));
    luaL_pushresultsize(&b, sse_frame_comment_write(text, len, out));
    return 1;
}

/* A bound of sse.parser's options: nil (none), or a positive integer. */
static size_t parser_bound(lua_State *L, int idx, const char *name)
{
    if (lua_getfield(L, idx, name) == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    int isint;
    lua_Integer n = lua_tointegerx(L, -1, &isint);
    if (!isint || n < 1)
        luaL_error(L, "sse.parser: option '%s' must be a positive integer (bytes)", name);
    lua_pop(L, 1);
    return (size_t)n;
}

/* sse.parser([opts]): opts.max_line, opts.max_event (bytes; none by default),
 * opts.last_event_id (the id in force from the start; "" by default).
 * The parser is held by value in its userdata: unlike a stream it is never shared
 * with libmicrohttpd, so nothing can outlive the Lua object. */
static int l_parser(lua_State *L)
{
    size_t max_line = 0, max_event = 0, id_len = 0;
    const char *id = NULL;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, 1)) {
            const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            if (!k || (strcmp(k, "max_line") != 0 && strcmp(k, "max_event") != 0 &&
                       strcmp(k, "last_event_id") != 0))
                luaL_error(L, "sse.parser: unknown option '%s'", luaL_tolstring(L, -2, NULL));
            lua_pop(L, 1);
        }
        max_line = parser_bound(L, 1, "max_line");
        max_event = parser_bound(L, 1, "max_event");
        if (lua_getfield(L, 1, "last_event_id") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "sse.parser: option 'last_event_id' must be a string");
            id = lua_tolstring(L, -1, &id_len);   /* the options table keeps it alive */
            if (memchr(id, '\0', id_len) || memchr(id, '\r', id_len) || memchr(id, '\n', id_len))
                luaL_error(L, "sse.parser: option 'last_event_id' must not contain CR, LF or NUL");
        }
        lua_pop(L, 1);
    }
    sse_parser *p = lua_newuserdatauv(L, sizeof *p, 0);
    sse_parser_init(p);
    p->max_line = max_line;
    p->max_event = max_event;
    luaL_setmetatable(L, PARSER_MT);   /* from here __gc frees what the parser holds */
    if (id_len && sse_parser_set_last_id(p, id, id_len))
        return luaL_error(L, "sse.parser: not enough memory");
    return 1;
}

typedef struct feed_ctx {
    lua_State  *L;
    lua_Integer n;
} feed_ctx;

/* If pushing raises (out of memory), the rest of that feed is lost but the parser
 * stays consistent: it resets the event before calling back. */
static int push_event(void *ud, const char *event, size_t event_len, const char *data,
                      size_t data_len, const char *id, size_t id_len)
{
    feed_ctx *c = ud;
    lua_State *L = c->L;
    lua_createtable(L, 0, 3);
    lua_pushlstring(L, event, event_len);
    lua_setfield(L, -2, "event");
    lua_pushlstring(L, data, data_len);
    lua_setfield(L, -2, "data");
    lua_pushlstring(L, id, id_len);
    lua_setfield(L, -2, "id");
    lua_rawseti(L, -2, ++c->n);
    return 0;
}

static int l_parser_feed(lua_State *L)
{
    sse_parser *p = luaL_checkudata(L, 1, PARSER_MT);
    size_t len;
    const char *bytes = luaL_checklstring(L, 2, &len);
    feed_ctx c = { L, 0 };
    lua_newtable(L);
    int rc = sse_parser_feed(p, bytes, len, push_event, &c);
    if (rc == -ENOMEM)
        return luaL_error(L, "parser:feed: not enough memory");
    /* A bound that failed: the events before it, then why (this feed and every later one). */
    if (rc == SSE_PARSER_ELINE) {
        lua_pushfstring(L, "line longer than %I bytes", (lua_Integer)p->max_line);
        return 2;
    }
    if (rc == SSE_PARSER_EEVENT) {
        lua_pushfstring(L, "event data longer than %I bytes", (lua_Integer)p->max_event);
        return 2;
    }
    return 1;
}

/* Computed fields: retry (nil until the stream set one), last_event_id, max_line and
 * max_event (nil: none), failed (true once a bound failed). */
static int l_parser_get(lua_State *L)
{
    sse_parser *p = luaL_checkudata(L, 1, PARSER_MT);
    const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "";
    if (strcmp(k, "retry") == 0) {
        if (p->retry < 0)
            lua_pushnil(L);
        else
            lua_pushinteger(L, (lua_Integer)p->retry);
    } else if (strcmp(k, "last_event_id") == 0) {
        lua_pushlstring(L, p->last_id.len ? p->last_id.data : "", p->last_id.len);
    } else if (strcmp(k, "max_line") == 0 || strcmp(k, "max_event") == 0) {
        size_t n = k[4] == 'l' ? p->max_line : p->max_event;
        if (n)
            lua_pushinteger(L, (lua_Integer)n);
        else
            lua_pushnil(L);
    } else if (strcmp(k, "failed") == 0) {
        lua_pushboolean(L, p->error != 0);
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static int l_parser_gc(lua_State *L)
{
    sse_parser_free(luaL_checkudata(L, 1, PARSER_MT));
    return 0;
}

void lsse_open_frame(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "encode", l_encode },
        { "comment", l_comment },
        { "parser", l_parser },
        { NULL, NULL },
    };
    static const luaL_Reg parser_methods[] = {
        { "feed", l_parser_feed },
        { NULL, NULL },
    };
    static const luaL_Reg parser_meta[] = {
        { "__index", l_parser_get },
        { "__gc", l_parser_gc },
        { NULL, NULL },
    };
    luaL_setfuncs(L, funcs, 0);
    lsse_class(L, PARSER_MT, parser_methods, parser_meta);
}
