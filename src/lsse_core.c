/* luaopen_sse_core, the private C module behind require("sse"), and what every part of
 * the binding shares: how a class is built, anchors, the log path, protected calls. */
#include "lsse.h"

#include <stdio.h>

/* ---- classes ---- */

/* __index of a class with computed fields: methods first (upvalue 1), then the class's
 * getter (upvalue 2), called in this same frame so its errors read as the metamethod's. */
static int class_index(lua_State *L)
{
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL)
        return 1;
    lua_pop(L, 1);
    return lua_tocfunction(L, lua_upvalueindex(2))(L);
}

void lsse_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta)
{
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    if (lua_getfield(L, -2, "__index") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_setfield(L, -2, "__index");
    } else {
        lua_pushcclosure(L, class_index, 2);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
}

/* ---- anchors ---- */

/* Registry: a weak-valued table, server -> its anchors table. The server userdata holds
 * the table strongly (its user value), so this lookup never keeps anything alive. */
static const char anchors_key = 'a';

void lsse_open_anchors(lua_State *L)
{
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key) == LUA_TTABLE) {
        lua_pop(L, 1);
        return;
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &anchors_key);
}

static void push_anchors(lua_State *L, lsse_server *b)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_rawgetp(L, -1, b);
    lua_remove(L, -2);
}

void lsse_new_anchors(lua_State *L, lsse_server *b)
{
    lua_newtable(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &anchors_key);
    lua_pushvalue(L, -2);
    lua_rawsetp(L, -2, b);
    lua_pop(L, 1);
    lua_setiuservalue(L, -2, 1);
    /* A cycle through its own user value: it keeps nothing alive. */
    lua_pushvalue(L, -1);
    b->self_ref = lsse_anchor(L, b);
}

int lsse_anchor(lua_State *L, lsse_server *b)
{
    push_anchors(L, b);
    if (!lua_istable(L, -1)) {    /* the server is being collected */
        lua_pop(L, 2);
        return LUA_NOREF;
    }
    lua_insert(L, -2);
    int ref = luaL_ref(L, -2);
    lua_pop(L, 1);
    return ref;
}

void lsse_unanchor(lua_State *L, lsse_server *b, int *ref)
{
    if (*ref == LUA_NOREF)
        return;
    push_anchors(L, b);
    if (lua_istable(L, -1))
        luaL_unref(L, -1, *ref);
    lua_pop(L, 1);
    *ref = LUA_NOREF;
}

void lsse_push_anchored(lua_State *L, lsse_server *b, int ref)
{
    push_anchors(L, b);
    if (lua_istable(L, -1) && ref != LUA_NOREF)
        lua_rawgeti(L, -1, ref);
    else
        lua_pushnil(L);
    lua_remove(L, -2);
}

void lsse_push_server(lua_State *L, lsse_server *b)
{
    lsse_push_anchored(L, b, b->self_ref);
}

/* ---- errors and logging ---- */

static const char *level_names[] = { "error", "warn", "info", "debug" };

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg)
        msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

void lsse_log(lsse_server *b, int level, const char *msg)
{
    if (b->log_ref == LUA_NOREF || b->finalizing || !b->L)
        return;
    lua_State *L = b->L;
    lsse_push_anchored(L, b, b->log_ref);
    lua_pushstring(L, level_names[level < 0 || level > 3 ? 0 : level]);
    lua_pushstring(L, msg);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        fprintf(stderr, "sse: log function failed: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

int lsse_pcall(lsse_server *b, lua_State *L, int nargs, const char *what)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, 0, base);
    lua_remove(L, base);
    if (rc != LUA_OK) {
        lua_pushfstring(L, "%s: %s", what, lua_tostring(L, -1));
        lsse_log(b, SSE_LOG_ERROR, lua_tostring(L, -1));
        lua_pop(L, 2);
        return 0;
    }
    return 1;
}

/* core.methods(class) -> the table a class's objects find their methods in, so the
 * facade can add methods written in Lua (stream:join, ch:presence: lua/sse/presence.lua). */
static int class_methods(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    if (luaL_getmetatable(L, name) != LUA_TTABLE)
        return luaL_error(L, "no class '%s'", name);
    lua_getfield(L, -1, "__index");
    if (lua_iscfunction(L, -1))
        lua_getupvalue(L, -1, 1);   /* class_index: the methods, then the getter */
    if (!lua_istable(L, -1))
        return luaL_error(L, "class '%s' has no methods table", name);
    return 1;
}

int luaopen_sse_core(lua_State *L)
{
    lua_newtable(L);
    lsse_open_frame(L);
    lsse_open_server(L);
    lsse_open_file(L);
    lsse_open_workers(L);
    lua_pushcfunction(L, class_methods);
    lua_setfield(L, -2, "methods");
    lua_pushliteral(L, "0.2.0");
    lua_setfield(L, -2, "version");
    return 1;
}
