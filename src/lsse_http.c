/* app:fetch(url, opts) in the binding: an outbound HTTP request (sse_http, libcurl on our
 * loop) made from an app coroutine, which waits (WAIT_IO) until the whole response is in:
 * the loop serves everything else meanwhile. The coroutine is resumed with the response
 * table, or nil, message, kind. If its owner goes first (a stream's client leaves), the
 * transfer is cancelled and the coroutine hears nil, "closed". */
#include "lsse.h"
#include "sse_buf.h"
#include "sse_http.h"

#include <stdlib.h>
#include <string.h>

#define MAX_REQUEST_HEADERS 64

/* One fetch in flight: owned by the server's list until done or cancelled. */
typedef struct lsse_fetch {
    lsse_server       *b;
    lsse_task         *task;
    sse_http_transfer *tr;
    long               status;
    sse_buf            head;      /* "Name: value\n" lines of the response */
    sse_buf            body;
    struct lsse_fetch *prev, *next;
} lsse_fetch;

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

static void on_head(void *ud, long status, const char *const *headers, size_t n)
{
    lsse_fetch *f = ud;
    f->status = status;
    for (size_t i = 0; i < n; i++) {
        sse_buf_append(&f->head, headers[i], strlen(headers[i]));
        sse_buf_append(&f->head, "\n", 1);
    }
}

static int on_data(void *ud, const char *p, size_t n)
{
    lsse_fetch *f = ud;
    return sse_buf_append(&f->body, p, n) != 0;   /* out of memory: cancel */
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
    lsse_task *t = f->task;
    t->io = NULL;
    int n;
    if (err == SSE_HTTP_OK) {
        push_response(t->co, f);
        n = 1;
    } else {
        lua_pushnil(t->co);
        lua_pushstring(t->co, err == SSE_HTTP_ETOOLARGE ? "response too large" : msg);
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

/* Reads opts (a table at idx, or nil) into rq; header lines are made on the stack. */
static void check_fetch_opts(lua_State *L, int idx, sse_http_request *rq, const char **lines)
{
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
    if (lua_getfield(L, idx, "max_size") != LUA_TNIL)
        rq->max_size = (size_t)luaL_checkinteger(L, -1);
    rq->insecure = lua_getfield(L, idx, "insecure") != LUA_TNIL && lua_toboolean(L, -1);
    if (lua_getfield(L, idx, "ca_file") != LUA_TNIL)
        rq->ca_file = luaL_checkstring(L, -1);
    rq->follow_redirects = lua_getfield(L, idx, "redirects") != LUA_TNIL && lua_toboolean(L, -1);
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
    check_fetch_opts(L, 3, &rq, lines);
    rq.headers = lines;
    lsse_task *t = lsse_task_current(b, L);
    if (!t)
        return luaL_error(L, "app:fetch: not in an app coroutine (a stream's generator or a "
                             "function given to app:spawn): nothing here can wait on the loop");
    if (!b->http && !(b->http = sse_http_new(b->loop)))
        return luaL_error(L, "app:fetch: libcurl could not start");
    lsse_fetch *f = calloc(1, sizeof *f);
    if (!f)
        return luaL_error(L, "app:fetch: out of memory");
    f->b = b;
    f->task = t;
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
    while (b->fetches)
        fetch_unlink_free(b->fetches);
}
