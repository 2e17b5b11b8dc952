/* app:fetch(url, opts) in the binding: an outbound HTTP request (sse_http, libcurl on our
 * loop) made from an app coroutine, which waits (WAIT_IO) until the whole response is in:
 * the loop serves everything else meanwhile. The coroutine is resumed with the response
 * table, or nil, message, kind. If its owner goes first (a stream's client leaves), the
 * transfer is cancelled and the coroutine hears nil, "closed".
 *
 * With stream = true the coroutine is resumed as soon as the head is in, with a response
 * object (sse.response): res:read() waits for the next piece of the body (nil at the end,
 * or nil, message, kind), res:close() stops it; dropping the object stops it too. */
#include "lsse.h"
#include "sse_buf.h"
#include "sse_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REQUEST_HEADERS 64
#define RESPONSE_MT "sse.response"
/* Unread bytes a streamed response may hold before it is stopped ("response too large"):
 * curl cannot be paused through sse_http, so a reader that stops reading is cut off. */
#define STREAM_BUFFER_MAX (16u << 20)

/* One fetch in flight: owned by the server's list until done or cancelled. */
typedef struct lsse_fetch {
    lsse_server       *b;
    lsse_task         *task;
    sse_http_transfer *tr;
    long               status;
    sse_buf            head;      /* "Name: value\n" lines of the response */
    sse_buf            body;      /* whole; or, streamed, what is not read yet */
    int                streamed;  /* stream = true */
    int                done;      /* streamed: the transfer ended (tr is gone) */
    int                err;       /* ... with this error (0: the body is complete) */
    char               errmsg[160];
    struct lsse_response *res;    /* streamed: its object, once the head is in */
    lsse_task         *reader;    /* streamed: the coroutine waiting in res:read() */
    struct lsse_fetch *prev, *next;
} lsse_fetch;

/* The object of a streamed response; user values: { status, headers }, the server. */
typedef struct lsse_response {
    lsse_fetch *f;                /* NULL once closed */
} lsse_response;

static void fetch_unlink_free(lsse_fetch *f)
{
    lsse_server *b = f->b;
    if (f->prev)
        f->prev->next = f->next;
    else
        b->fetches = f->next;
    if (f->next)
        f->next->prev = f->prev;
    sse_buf_free(&f->head);
    sse_buf_free(&f->body);
    free(f);
}

static void push_response(lua_State *co, lsse_fetch *f);
static void streamed_head(lsse_fetch *f);
static void streamed_end(lsse_fetch *f, int err, const char *msg);

static void on_head(void *ud, long status, const char *const *headers, size_t n)
{
    lsse_fetch *f = ud;
    f->status = status;
    for (size_t i = 0; i < n; i++) {
        sse_buf_append(&f->head, headers[i], strlen(headers[i]));
        sse_buf_append(&f->head, "\n", 1);
    }
    if (f->streamed)
        streamed_head(f);
}

/* Gives the coroutine waiting in res:read() what is buffered. */
static void hand_to_reader(lsse_fetch *f)
{
    lsse_task *t = f->reader;
    if (!t || f->body.len == 0)
        return;
    f->reader = NULL;
    t->io = NULL;
    lua_pushlstring(t->co, f->body.data, f->body.len);
    f->body.len = 0;
    lsse_task_deliver(t, WAIT_IO, 1);
}

static int on_data(void *ud, const char *p, size_t n)
{
    lsse_fetch *f = ud;
    if (sse_buf_append(&f->body, p, n) != 0)
        return 1;                 /* out of memory: cancel */
    if (!f->streamed)
        return 0;
    if (f->body.len > STREAM_BUFFER_MAX) {
        streamed_end(f, SSE_HTTP_ETOOLARGE, "response too large");
        return 1;                 /* cancels the transfer: no done follows */
    }
    hand_to_reader(f);
    return 0;
}

/* Pushes { status, headers = { lower-case name = value (repeats joined ", ") }, body }. */
static void push_response(lua_State *co, lsse_fetch *f)
{
    lua_createtable(co, 0, 3);
    lua_pushinteger(co, f->status);
    lua_setfield(co, -2, "status");
    lua_newtable(co);
    const char *p = f->head.data, *end = p + f->head.len;
    while (p && p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *colon = memchr(p, ':', (size_t)(nl - p));
        if (colon) {
            luaL_Buffer name;
            luaL_buffinit(co, &name);
            for (const char *c = p; c < colon; c++)
                luaL_addchar(&name, (*c >= 'A' && *c <= 'Z') ? *c + 32 : *c);
            luaL_pushresult(&name);
            const char *v = colon + 1;
            while (v < nl && (*v == ' ' || *v == '\t'))
                v++;
            lua_pushvalue(co, -1);
            if (lua_rawget(co, -3) == LUA_TSTRING) {
                lua_pushliteral(co, ", ");
                lua_pushlstring(co, v, (size_t)(nl - v));
                lua_concat(co, 3);
            } else {
                lua_pop(co, 1);
                lua_pushlstring(co, v, (size_t)(nl - v));
            }
            lua_rawset(co, -3);
        }
        p = nl + 1;
    }
    lua_setfield(co, -2, "headers");
    lua_pushlstring(co, f->body.data ? f->body.data : "", f->body.len);
    lua_setfield(co, -2, "body");
}

static void on_done(void *ud, int err, const char *msg)
{
    lsse_fetch *f = ud;
    if (f->res) {                 /* streamed, head delivered: the reader learns it */
        streamed_end(f, err, msg);
        return;
    }
    lsse_task *t = f->task;
    t->io = NULL;
    int n;
    if (err == SSE_HTTP_OK) {
        push_response(t->co, f);
        n = 1;
    } else {
        lua_pushnil(t->co);
        lua_pushstring(t->co, msg ? msg : "request failed");   /* "response too large", ... */
        lua_pushstring(t->co, sse_http_error_kind(err));
        n = 3;
    }
    fetch_unlink_free(f);
    lsse_task_deliver(t, WAIT_IO, n);
}

/* The task's owner is gone while it waits: stop the transfer (no callback follows). */
static void cancel_fetch(void *io)
{
    lsse_fetch *f = io;
    f->task->io = NULL;
    sse_http_cancel(f->tr);
    fetch_unlink_free(f);
}

static const sse_http_handler handler = { on_head, on_data, on_done };

/* ---- streamed responses ---- */

static void push_error(lua_State *co, int err, const char *msg)
{
    lua_pushnil(co);
    lua_pushstring(co, msg);
    lua_pushstring(co, sse_http_error_kind(err));
}

/* The head is in: the fetch returns a response object to its coroutine. */
static void streamed_head(lsse_fetch *f)
{
    lsse_task *t = f->task;
    lua_State *co = t->co;
    lsse_response *r = lua_newuserdatauv(co, sizeof *r, 2);
    r->f = f;
    push_response(co, f);
    lua_pushnil(co);
    lua_setfield(co, -2, "body");
    lua_setiuservalue(co, -2, 1);
    lsse_push_server(co, f->b);
    lua_setiuservalue(co, -2, 2);
    luaL_setmetatable(co, RESPONSE_MT);
    f->res = r;
    f->body.len = 0;
    t->io = NULL;
    lsse_task_deliver(t, WAIT_IO, 1);
}

/* The transfer ended (err 0: the whole body came): a waiting reader gets what is left,
 * or the end. */
static void streamed_end(lsse_fetch *f, int err, const char *msg)
{
    f->done = 1;
    f->tr = NULL;
    f->err = err;
    snprintf(f->errmsg, sizeof f->errmsg, "%s", msg ? msg : "");
    if (f->body.len) {
        hand_to_reader(f);
        return;
    }
    lsse_task *t = f->reader;
    if (!t)
        return;
    f->reader = NULL;
    t->io = NULL;
    if (err) {
        push_error(t->co, err, f->errmsg);
        lsse_task_deliver(t, WAIT_IO, 3);
    } else {
        lua_pushnil(t->co);
        lsse_task_deliver(t, WAIT_IO, 1);
    }
}

/* The reader's owner is gone while it waits in res:read(): the body is of no use. */
static void cancel_read(void *io)
{
    lsse_fetch *f = io;
    f->reader = NULL;
    if (f->tr)
        sse_http_cancel(f->tr);
    f->tr = NULL;
    f->done = 1;
    f->err = -1;
    snprintf(f->errmsg, sizeof f->errmsg, "closed");
}

static lsse_response *check_response(lua_State *L)
{
    return luaL_checkudata(L, 1, RESPONSE_MT);
}

/* res:read() -> piece | nil (the end) | nil, message, kind */
static int response_read(lua_State *L)
{
    lsse_response *r = check_response(L);
    lsse_fetch *f = r->f;
    if (!f) {
        lua_pushnil(L);
        lua_pushliteral(L, "closed");
        return 2;
    }
    if (f->body.len) {
        lua_pushlstring(L, f->body.data, f->body.len);
        f->body.len = 0;
        return 1;
    }
    if (f->done) {
        if (!f->err) {
            lua_pushnil(L);
            return 1;
        }
        push_error(L, f->err > 0 ? f->err : 0, f->errmsg);
        return 3;
    }
    lsse_task *t = lsse_task_current(f->b, L);
    if (!t)
        return luaL_error(L, "res:read: not in an app coroutine: nothing here can wait on the loop");
    if (f->reader)
        return luaL_error(L, "res:read: another coroutine is already reading this response");
    f->reader = t;
    t->io = f;
    t->io_cancel = cancel_read;
    return lsse_task_wait(L, t, WAIT_IO);
}

/* res:close(): stops the transfer (idempotent); also when the object is collected. */
static int response_close(lua_State *L)
{
    lsse_response *r = check_response(L);
    lsse_fetch *f = r->f;
    if (!f)
        return 0;
    r->f = NULL;
    if (f->tr)
        sse_http_cancel(f->tr);
    lsse_task *t = f->reader;
    if (t) {                      /* another coroutine waits in read: it ends now */
        f->reader = NULL;
        t->io = NULL;
        lua_pushnil(t->co);
        lua_pushliteral(t->co, "closed");
        lsse_task_deliver(t, WAIT_IO, 2);
    }
    fetch_unlink_free(f);
    return 0;
}

static int response_get(lua_State *L)
{
    check_response(L);
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

void lsse_open_http(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "read", response_read },
        { "close", response_close },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", response_get },
        { "__gc", response_close },
        { "__close", response_close },
        { NULL, NULL },
    };
    lsse_class(L, RESPONSE_MT, methods, meta);
}

/* Reads opts (a table at idx, or nil) into rq and *streamed; header lines are made on
 * the stack. */
static void check_fetch_opts(lua_State *L, int idx, sse_http_request *rq, const char **lines,
                             int *streamed)
{
    *streamed = 0;
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    if (lua_getfield(L, idx, "method") != LUA_TNIL)
        rq->method = luaL_checkstring(L, -1);
    if (lua_getfield(L, idx, "body") != LUA_TNIL)
        rq->body = luaL_checklstring(L, -1, &rq->body_len);
    if (lua_getfield(L, idx, "timeout") != LUA_TNIL) {
        lua_Number s = luaL_checknumber(L, -1);
        luaL_argcheck(L, s >= 0 && s < 1e6, idx, "timeout must be seconds from 0 to 1e6");
        rq->timeout_ms = (long)(s * 1000 + 0.5);
    }
    int has_max = lua_getfield(L, idx, "max_size") != LUA_TNIL;
    if (has_max) {
        lua_Integer m = luaL_checkinteger(L, -1);
        luaL_argcheck(L, m >= 0, idx, "max_size must be a number of bytes, 0 or more");
        rq->max_size = (size_t)m;
    }
    rq->insecure = lua_getfield(L, idx, "insecure") != LUA_TNIL && lua_toboolean(L, -1);
    if (lua_getfield(L, idx, "ca_file") != LUA_TNIL)
        rq->ca_file = luaL_checkstring(L, -1);
    rq->follow_redirects = lua_getfield(L, idx, "redirects") != LUA_TNIL && lua_toboolean(L, -1);
    if (lua_getfield(L, idx, "stream") != LUA_TNIL && lua_toboolean(L, -1)) {
        *streamed = 1;
        if (lua_getfield(L, idx, "timeout") == LUA_TNIL)
            rq->timeout_ms = 0;   /* a stream lasts as long as it lasts */
        if (!has_max)
            rq->max_size = 0;     /* bounded by what is unread instead; a max_size given
                                   * bounds the whole body, as without stream */
    }
    if (lua_getfield(L, idx, "headers") == LUA_TTABLE) {
        int t = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, t)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "app:fetch: headers must be strings");
            if (rq->nheaders == MAX_REQUEST_HEADERS)
                luaL_error(L, "app:fetch: more than %d headers", MAX_REQUEST_HEADERS);
            lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
            lua_insert(L, t);          /* kept below the walk, alive while rq is used */
            t++;
            lines[rq->nheaders++] = lua_tostring(L, t - 1);
            lua_pop(L, 1);
        }
    }
}

/* server:fetch(url [, opts]) -> response | nil, message, kind (waits in an app coroutine) */
int lsse_server_fetch(lua_State *L)
{
    lsse_server *b = lsse_check_server(L, 1);
    sse_http_request rq = { .url = luaL_checkstring(L, 2), .timeout_ms = 30000,
                            .max_size = 16u << 20 };
    const char *lines[MAX_REQUEST_HEADERS];
    int streamed;
    check_fetch_opts(L, 3, &rq, lines, &streamed);
    rq.headers = lines;
    lsse_task *t = lsse_task_current(b, L);
    if (!t)
        return luaL_error(L, "app:fetch: not in an app coroutine " LSSE_APP_COROUTINES
                             ": nothing here can wait on the loop");
    if (!b->http && !(b->http = sse_http_new(b->loop)))
        return luaL_error(L, "app:fetch: libcurl could not start");
    lsse_fetch *f = calloc(1, sizeof *f);
    if (!f)
        return luaL_error(L, "app:fetch: out of memory");
    f->b = b;
    f->task = t;
    f->streamed = streamed;
    const char *err = NULL;
    f->tr = sse_http_start(b->http, &rq, &handler, f, &err);
    if (!f->tr) {
        free(f);
        lua_pushnil(L);
        lua_pushstring(L, err ? err : "could not start the request");
        lua_pushliteral(L, "other");
        return 3;
    }
    f->next = b->fetches;
    if (b->fetches)
        b->fetches->prev = f;
    b->fetches = f;
    t->io = f;
    t->io_cancel = cancel_fetch;
    return lsse_task_wait(L, t, WAIT_IO);
}

void lsse_free_fetches(lsse_server *b)
{
    sse_http_free(b->http);      /* cancels every transfer: no callback runs */
    b->http = NULL;
    while (b->fetches) {
        if (b->fetches->res)
            b->fetches->res->f = NULL;   /* the object turns inert: read says "closed" */
        fetch_unlink_free(b->fetches);
    }
}
