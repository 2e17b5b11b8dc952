/* Files as response bodies: core.open_file(path) -> file, and the handler path that hands
 * such a file to sse_request_respond_file.
 *
 * The file is opened and checked here, on the loop, but never read: its descriptor goes to
 * libmicrohttpd, which sends it a block of the connection's write buffer at a time as the
 * socket drains (sendfile() when the daemon says SIGPIPE is handled). Validators
 * (size, mtime, ETag, Last-Modified) come from the one fstat of the descriptor that is
 * sent, so they describe exactly the bytes the client gets.
 */
#include "lsse.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct lsse_file {
    int      fd;        /* -1 once closed or handed to a response */
    uint64_t size;
    uint64_t ino;
    int64_t  mtime;     /* seconds */
    long     mtime_ns;  /* nanoseconds within that second */
    uint64_t offset;    /* what a response sends: the whole file unless file:range() */
    uint64_t length;
} lsse_file;

static const char *errno_code(int e)
{
    switch (e) {
    case ENOENT: return "ENOENT";
    case ENOTDIR: return "ENOTDIR";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ELOOP: return "ELOOP";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENXIO: return "ENXIO";     /* a socket, or a device with no driver */
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOMEM: return "ENOMEM";
    default: return "EIO";
    }
}

static int fail(lua_State *L, const char *path, const char *why, const char *code)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, why);
    lua_pushstring(L, code);
    return 3;
}

/* core.open_file(path) -> file | nil, message, code. Only regular files: a directory gives
 * "EISDIR", anything else that is not a regular file (FIFO, device, socket) "ENOTREG". */
static int l_open_file(lua_State *L)
{
    size_t plen;
    const char *path = luaL_checklstring(L, 1, &plen);
    luaL_argcheck(L, strlen(path) == plen, 1, "path must not contain NUL");
    /* O_NONBLOCK: opening a FIFO would otherwise wait for a writer and stall every
     * client. O_NOCTTY: a terminal device must not become our controlling terminal. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        return fail(L, path, strerror(e), errno_code(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fail(L, path, strerror(e), errno_code(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        if (S_ISDIR(st.st_mode))
            return fail(L, path, strerror(EISDIR), "EISDIR");
        return fail(L, path, S_ISFIFO(st.st_mode) ? "not a regular file (a FIFO)"
                             : S_ISSOCK(st.st_mode) ? "not a regular file (a socket)"
                             : "not a regular file (a device)", "ENOTREG");
    }
    lsse_file *f = lua_newuserdatauv(L, sizeof *f, 0);
    f->fd = fd;
    f->size = (uint64_t)st.st_size;
    f->ino = (uint64_t)st.st_ino;
    f->mtime = (int64_t)st.st_mtim.tv_sec;
    f->mtime_ns = st.st_mtim.tv_nsec;
    f->offset = 0;
    f->length = f->size;
    luaL_setmetatable(L, FILE_MT);
    return 1;
}

static lsse_file *check_open(lua_State *L, int idx)
{
    lsse_file *f = luaL_checkudata(L, idx, FILE_MT);
    if (f->fd < 0)
        luaL_error(L, "attempt to use a closed file");
    return f;
}

/* file:range(offset, length) -> file: a response sends only these bytes. */
static int file_range(lua_State *L)
{
    lsse_file *f = check_open(L, 1);
    lua_Integer off = luaL_checkinteger(L, 2);
    lua_Integer len = luaL_checkinteger(L, 3);
    luaL_argcheck(L, off >= 0 && (uint64_t)off <= f->size, 2, "offset outside the file");
    luaL_argcheck(L, len >= 0 && (uint64_t)len <= f->size - (uint64_t)off, 3,
                  "length past the end of the file");
    f->offset = (uint64_t)off;
    f->length = (uint64_t)len;
    lua_settop(L, 1);
    return 1;
}

/* close, __close and __gc: closes the descriptor once (none left after a response took it). */
static int file_close(lua_State *L)
{
    lsse_file *f = luaL_checkudata(L, 1, FILE_MT);
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    return 0;
}

/* An IMF-fixdate (RFC 9110 5.6.7) by hand: strftime's names follow the locale. */
static void imf_fixdate(int64_t t, char *out, size_t outlen)
{
    static const char days[][4] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
    static const char months[][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                      "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
    time_t tt = (time_t)t;
    struct tm tm;
    if (!gmtime_r(&tt, &tm)) {
        tt = 0;
        gmtime_r(&tt, &tm);
    }
    snprintf(out, outlen, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* Computed fields: size, mtime, etag, last_modified, offset, length, closed. */
static int file_get(lua_State *L)
{
    lsse_file *f = luaL_checkudata(L, 1, FILE_MT);
    const char *k = luaL_checkstring(L, 2);
    char buf[80];
    if (strcmp(k, "size") == 0) {
        lua_pushinteger(L, (lua_Integer)f->size);
    } else if (strcmp(k, "mtime") == 0) {
        lua_pushinteger(L, (lua_Integer)f->mtime);
    } else if (strcmp(k, "etag") == 0) {
        /* Strong: a change of content changes size or mtime (to the nanosecond), and a
         * file replaced by another (rename over it) changes the inode. */
        uint64_t ns = (uint64_t)f->mtime * 1000000000u + (uint64_t)f->mtime_ns;
        snprintf(buf, sizeof buf, "\"%" PRIx64 "-%" PRIx64 "-%" PRIx64 "\"", f->ino, f->size, ns);
        lua_pushstring(L, buf);
    } else if (strcmp(k, "last_modified") == 0) {
        imf_fixdate(f->mtime, buf, sizeof buf);
        lua_pushstring(L, buf);
    } else if (strcmp(k, "offset") == 0) {
        lua_pushinteger(L, (lua_Integer)f->offset);
    } else if (strcmp(k, "length") == 0) {
        lua_pushinteger(L, (lua_Integer)f->length);
    } else if (strcmp(k, "closed") == 0) {
        lua_pushboolean(L, f->fd < 0);
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static int file_tostring(lua_State *L)
{
    lsse_file *f = luaL_checkudata(L, 1, FILE_MT);
    lua_pushfstring(L, "sse.file (%I bytes%s)", (lua_Integer)f->size, f->fd < 0 ? ", closed" : "");
    return 1;
}

void lsse_respond_file(lua_State *L, sse_request *r, int status, const sse_header *h, size_t nh,
                       int idx)
{
    lsse_file *f = check_open(L, idx);
    int fd = f->fd;
    f->fd = -1;   /* the response owns it now, whatever happens */
    sse_request_respond_file(r, status, h, nh, fd, f->offset, f->length);
}

void lsse_open_file(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "range", file_range },
        { "close", file_close },
        { NULL, NULL },
    };
    static const luaL_Reg meta[] = {
        { "__index", file_get },
        { "__gc", file_close },
        { "__close", file_close },
        { "__tostring", file_tostring },
        { NULL, NULL },
    };
    lsse_class(L, FILE_MT, methods, meta);
    lua_pushcfunction(L, l_open_file);
    lua_setfield(L, -2, "open_file");
}
