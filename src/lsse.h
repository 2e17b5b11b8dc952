/* Shared declarations of the binding layer (lsse_*.c): Lua values <-> core calls. */
#ifndef LSSE_H
#define LSSE_H

#include <lua.h>
#include <lauxlib.h>
#include "sse_frame.h"

/* lsse_frame.c: adds encode, comment and parser to the table on top of the stack. */
void lsse_open_frame(lua_State *L);

/* Reads the event at idx (a string = data, or a table with data/event/id/retry/comment)
 * into ev, validating it. Raises "<fname>: <why>" on misuse. May push one value
 * (text converted from a number or a table) that must stay on the stack while ev is used. */
void lsse_check_event(lua_State *L, int idx, const char *fname, sse_event *ev);

/* lsse_server.c: adds the server constructor to the table on top of the stack. */
void lsse_open_server(lua_State *L);

#endif
