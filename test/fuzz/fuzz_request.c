/* Fuzzes the request path end to end: each input is the raw bytes a client sends on one
 * TCP connection to a real in-process sse_server (libmicrohttpd in our loop). The input
 * is written, the write side shut down, and the loop run while the reply is read, until
 * the server closes or a time bound passes. Then the connection must be gone from the
 * server within a bound: a connection the server never lets go of is a leak that would
 * pile up in production, so it aborts like a crash. ASan and UBSan watch the rest.
 *
 * Routes (any method):
 *   /stream  a stream: one event and a shared chunk, then closed
 *   /gzip    the same, gzip-compressed (the shared chunk goes as a spliced twin)
 *   /open    a stream with a 1 ms heartbeat that is never closed: it ends only
 *            when the server notices the client hang up
 *   /echo    200 with the request body
 *   /        200 "ok"; anything else 404 */
#include "sse_loop.h"
#include "sse_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* Per input: at most this long to read the reply, then this long for the server to
 * drop the connection after the client has closed it. */
#define READ_MS   300
#define LEAK_MS  2000

static sse_loop   *loop;
static sse_server *srv;
static sse_chunk  *shared;   /* a channel event: at least SSE_GZIP_SPLICE_MIN, so spliced */

static void count_kv(void *ud, const char *key, const char *value, size_t value_len)
{
    /* Touch every byte, so ASan checks what MHD hands out. */
    size_t *n = ud;
    *n += strlen(key) + value_len + (value_len ? (unsigned char)value[value_len - 1] : 0);
}

static void start_stream(sse_request *r, int gzip, int open)
{
    static const sse_header gz[] = { { "Content-Encoding", "gzip" } };
    sse_stream_opts o = {
        .headers = gzip ? gz : NULL,
        .nheaders = gzip ? 1 : 0,
        .heartbeat_ms = open ? 1 : 0,
        .gzip = gzip,
    };
    sse_stream *st = sse_request_stream(r, &o);
    if (!st)
        return;
    sse_stream_write(st, "data: hello\n\n", 13);
    if (open)
        return;
    sse_stream_push(st, shared);
    sse_stream_close(st);
}

static void on_request(void *ud, sse_request *r)
{
    const char *path = sse_request_path(r);
    size_t n = 0, blen;
    sse_request_headers(r, count_kv, &n);
    sse_request_query(r, count_kv, &n);
    const char *body = sse_request_body(r, &blen);
    (void)sse_request_method(r);
    (void)sse_request_peer(r);
    static const sse_header text[] = { { "Content-Type", "text/plain" } };
    if (!path)
        sse_request_respond(r, 400, NULL, 0, "no path\n", 8);
    else if (strcmp(path, "/stream") == 0)
        start_stream(r, 0, 0);
    else if (strcmp(path, "/gzip") == 0)
        start_stream(r, 1, 0);
    else if (strcmp(path, "/open") == 0)
        start_stream(r, 0, 1);
    else if (strcmp(path, "/echo") == 0)
        sse_request_respond(r, 200, text, 1, body, body ? blen : 0);
    else if (strcmp(path, "/") == 0)
        sse_request_respond(r, 200, text, 1, "ok\n", 3);
    else
        sse_request_respond(r, 404, text, 1, "not found\n", 10);
}

static void on_ready(void *ud, sse_stream *st) {}

/* The binding's reference is dropped when the stream ends, as the Lua binding does. */
static void on_closed(void *ud, sse_stream *st) { sse_stream_release(st); }

static const sse_server_hooks hooks = {
    .request = on_request,
    .stream_ready = on_ready,
    .stream_closed = on_closed,
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    signal(SIGPIPE, SIG_IGN);
    loop = sse_loop_new();
    if (!loop)
        abort();
    sse_server_config cfg = {
        .host = "127.0.0.1",
        .port = 0,
        .max_body = 4096,           /* small, so 413 is reachable from small inputs */
        .queue_limit = 1 << 20,
        .conn_memory = 4096,        /* small, so headers can overflow the pool */
        /* Timeouts and other new fields stay 0 ("none"): a connection whose client has
         * gone must still be let go of without a deadline doing it. */
        .hooks = &hooks,
    };
    srv = sse_server_new(loop, &cfg);
    char err[256];
    if (!srv || sse_server_listen(srv, NULL, NULL, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_request: cannot start the server: %s\n", srv ? err : "ENOMEM");
        abort();
    }
    shared = sse_chunk_new(2048);
    for (size_t i = 0; i < 2048; i += 16)
        memcpy(shared->data + i, "data: 0123456\n\n\n", 16);
    shared->len = 2048;
    return 0;
}

/* One loop turn, as the binding's server:step does, but never longer than max_us. */
static void turn(int64_t max_us)
{
    int64_t t = sse_server_timeout(srv);
    int ms = sse_loop_next_timeout(loop);
    if (ms >= 0 && (t < 0 || (int64_t)ms * 1000 < t))
        t = (int64_t)ms * 1000;
    if (t < 0 || t > max_us)
        t = max_us;
    sse_loop_poll(loop, t);
    sse_server_run(srv);
}

static void on_client(sse_watch *w, uint32_t events) {}   /* it only wakes the poll */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(sse_server_port(srv)) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* Blocking connect: on loopback the kernel completes it from the backlog. A signal
     * (libFuzzer's timer) can interrupt it while a handshake is retried (a reused port);
     * the handshake goes on, so wait for it rather than report the harness's failure. */
    int rc = fd < 0 ? -1 : connect(fd, (struct sockaddr *)&a, sizeof a);
    if (rc != 0 && fd >= 0 && errno == EINTR) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int err = 0;
        socklen_t len = sizeof err;
        while ((rc = poll(&p, 1, 5000)) < 0 && errno == EINTR)
            ;
        rc = rc == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && !err ? 0 : -1;
    }
    if (rc != 0) {
        perror("fuzz_request: connect");
        abort();
    }
    sse_watch w = { .fd = fd, .cb = on_client };
    if (sse_loop_watch(loop, &w, EPOLLIN | EPOLLRDHUP) != 0)
        abort();

    size_t off = 0;
    int wr_done = 0, closed = 0;
    int64_t until = sse_loop_now_us() + READ_MS * 1000;
    while (!closed && sse_loop_now_us() < until) {
        if (!wr_done) {
            ssize_t n = send(fd, data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0)
                off += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != EINTR)
                wr_done = 1;   /* the server has closed already */
            if (off == size) {
                shutdown(fd, SHUT_WR);
                wr_done = 1;
            }
        }
        turn(1000);
        char buf[16384];
        for (;;) {
            ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0)
                continue;
            if (n == 0 || (errno != EAGAIN && errno != EINTR))
                closed = 1;
            break;
        }
    }
    sse_loop_unwatch(loop, &w);
    close(fd);

    until = sse_loop_now_us() + LEAK_MS * 1000;
    while (sse_server_connections(srv) > 0) {
        if (sse_loop_now_us() > until) {
            fprintf(stderr, "fuzz_request: %u connection(s) still open %d ms after the "
                    "client closed (%s by the server)\n", sse_server_connections(srv),
                    LEAK_MS, closed ? "it was closed" : "never closed");
            abort();
        }
        turn(1000);
    }
    return 0;
}
