/* luaopen_sse_core: the private C module behind require("sse"). */
#include "lsse.h"

int luaopen_sse_core(lua_State *L)
{
    lua_newtable(L);
    lsse_open_frame(L);
    lsse_open_server(L);
    lsse_open_file(L);
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "version");
    return 1;
}
