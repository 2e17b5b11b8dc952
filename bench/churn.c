/* churn: connect/disconnect cycles against an SSE server, watching its memory and
 * descriptors (driven by bench/churn.sh; see bench/README.md).
 *
 * One thread, one epoll loop, non-blocking sockets. Up to --parallel cycles are in flight;
 * cycle i is of kind i % 5 (--only K: kind K alone):
 *   0 stream, RST    GET --path, read the head and the first body bytes, close with
 *                    SO_LINGER 0 (the server sees a reset)
 *   1 stream, clean  the same, then shutdown(SHUT_WR), read until the server closes, close
 *   2 head, FIN      half a request head, then close
 *   3 head, RST      half a request head, then a reset
 *   4 body, RST      POST /pub with Content-Length 4096 and 100 bytes of it, then a reset
 * Meanwhile one keep-alive connection POSTs an event to /pub --pub-rate times a second, so
 * the streams carry events while they come and go.
 * Every cycles/--samples cycles the churn pauses: the cycles in flight finish, the
 * server's descriptor count is left to settle (unchanged for 0.5 s, at most --settle-ms),
 * and its VmRSS and descriptor count (/proc/PID) are printed as one row of a table.
 * The first row (cycle 0) is taken before any churn, the publisher connected.
 *
 * Exit status: 0 when the descriptors did not grow and the RSS grew at most
 * --rss-growth-kb; 1 otherwise; 2 on usage errors; 3 when the server could not be
 * reached or cycles failed (unanswered streams, timeouts) beyond 1 %.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"

#define NS 1000000000LL
#define MS 1000000LL
#define CYCLE_TIMEOUT_NS (5 * NS)
#define NKINDS 5

enum { K_STREAM_RST, K_STREAM_CLEAN, K_HEAD_FIN, K_HEAD_RST, K_BODY_RST };
static const char *kind_names[NKINDS] = {
    "stream+RST", "stream+clean", "half head+FIN", "half head+RST", "half body+RST",
};

enum { S_FREE, S_CONNECTING, S_READING, S_DRAINING };

typedef struct {
    int      fd;
    int      state;
    int      kind;
    size_t   sent;
    char     head[2048];
    size_t   got;
    int64_t  deadline;
} slot;

static struct {
    int      port, pid, parallel, samples, pub_rate, settle_ms;
    long     cycles, rss_growth_kb;
    const char *path;
    int      only;                /* -1: every kind in turn; else only this kind */
} opt = { 0, 0, 64, 10, 20, 3000, 100000, 16384, "/sub", -1 };

static struct sockaddr_in server_addr;
static int ep;
static long started, finished, kind_done[NKINDS];
static long failed_connect, failed_answer, timeouts, clean_unfinished, resets_seen;
static long pub_sent, pub_acked, pub_reconnects;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* ---- the server, from /proc ---- */


static long proc_fds(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ---- sockets ---- */

static int tcp_open(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) != 0 &&
        errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static void close_rst(int fd)
{
    struct linger lg = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* ---- cycles ---- */

static slot *slots;
static int inflight;

static void slot_done(slot *s, int rst)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    if (rst)
        close_rst(s->fd);
    else
        close(s->fd);
    s->fd = -1;
    s->state = S_FREE;
    kind_done[s->kind]++;
    finished++;
    inflight--;
}

static const char *request_for(int kind, size_t *len)
{
    static char buf[512];
    switch (kind) {
    case K_STREAM_RST:
    case K_STREAM_CLEAN:
        snprintf(buf, sizeof buf,
                 "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n",
                 opt.path, opt.port);
        break;
    case K_HEAD_FIN:
    case K_HEAD_RST:
        snprintf(buf, sizeof buf, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAcc", opt.path, opt.port);
        break;
    default:
        snprintf(buf, sizeof buf,
                 "POST /pub HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 4096\r\n\r\n%.100s",
                 opt.port,
                 "partial body partial body partial body partial body partial body partial body "
                 "partial body partial body");
    }
    *len = strlen(buf);
    return buf;
}

static void start_cycle(slot *s)
{
    s->kind = opt.only >= 0 ? opt.only : (int)(started % NKINDS);
    started++;
    s->fd = tcp_open();
    if (s->fd < 0) {
        failed_connect++;
        kind_done[s->kind]++;
        finished++;
        return;
    }
    s->state = S_CONNECTING;
    s->sent = s->got = 0;
    s->deadline = now_ns() + CYCLE_TIMEOUT_NS;
    inflight++;
    struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = s };
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

/* The head and the first bytes after it have arrived (a 200). */
static int first_bytes(slot *s, int *bad)
{
    char *end = memmem(s->head, s->got, "\r\n\r\n", 4);
    if (!end)
        return 0;
    if (s->got < 12 || memcmp(s->head + 9, "200", 3) != 0) {
        *bad = 1;
        return 1;
    }
    return (size_t)(end + 4 - s->head) < s->got;
}

static void on_slot(slot *s, uint32_t events)
{
    if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            failed_connect++;
            slot_done(s, 0);
            return;
        }
        if (!(events & EPOLLOUT))
            return;
        size_t len;
        const char *req = request_for(s->kind, &len);
        ssize_t n = send(s->fd, req + s->sent, len - s->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            failed_connect++;
            slot_done(s, 1);
            return;
        }
        s->sent += (size_t)n;
        if (s->sent < len)
            return;
        if (s->kind == K_HEAD_FIN) {
            slot_done(s, 0);
            return;
        }
        if (s->kind == K_HEAD_RST || s->kind == K_BODY_RST) {
            slot_done(s, 1);
            return;
        }
        s->state = S_READING;
        struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = s };
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        return;
    }
    char buf[4096];
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            if (s->state == S_READING)
                failed_answer++;
            else
                resets_seen++;
            slot_done(s, 0);
            return;
        }
        if (n == 0) {
            if (s->state == S_READING)
                failed_answer++;   /* closed before its first bytes */
            slot_done(s, 0);
            return;
        }
        if (s->state == S_DRAINING)
            continue;
        size_t room = sizeof s->head - s->got;
        size_t take = (size_t)n < room ? (size_t)n : room;
        memcpy(s->head + s->got, buf, take);
        s->got += take;
        int bad = 0;
        if (first_bytes(s, &bad) || s->got == sizeof s->head) {
            if (bad || s->got == sizeof s->head) {
                failed_answer++;
                slot_done(s, 1);
                return;
            }
            if (s->kind == K_STREAM_RST) {
                slot_done(s, 1);
                return;
            }
            shutdown(s->fd, SHUT_WR);
            s->state = S_DRAINING;
        }
    }
}

static void expire(int64_t now)
{
    for (int i = 0; i < opt.parallel; i++) {
        slot *s = &slots[i];
        if (s->state != S_FREE && now > s->deadline) {
            if (s->state == S_DRAINING)
                clean_unfinished++;
            else
                timeouts++;
            slot_done(s, 1);
        }
    }
}

/* ---- the publisher: one keep-alive connection, POST /pub at pub_rate ---- */

static int pub_fd = -1, pub_connected;
static int64_t pub_next;
static char pub_tail[16];

static void pub_open(void)
{
    pub_fd = tcp_open();
    pub_connected = 0;
    if (pub_fd < 0)
        return;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = NULL };
    epoll_ctl(ep, EPOLL_CTL_ADD, pub_fd, &ev);
}

static void pub_reset(void)
{
    if (pub_fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, pub_fd, NULL);
        close(pub_fd);
    }
    pub_reconnects++;
    pub_open();
}

static void on_pub(uint32_t events)
{
    if (!pub_connected) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(pub_fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            pub_reset();
            return;
        }
        if (events & EPOLLOUT) {
            pub_connected = 1;
            struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = NULL };
            epoll_ctl(ep, EPOLL_CTL_MOD, pub_fd, &ev);
        }
        return;
    }
    char buf[4096 + 16];
    for (;;) {
        size_t keep = strlen(pub_tail);
        memcpy(buf, pub_tail, keep);
        ssize_t n = recv(pub_fd, buf + keep, 4096, 0);
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            pub_reset();
            return;
        }
        size_t len = keep + (size_t)n;
        /* count the status lines of the answers; keep a tail for a split "HTTP/1.1 2" */
        for (size_t i = 0; i + 10 <= len; i++)
            if (memcmp(buf + i, "HTTP/1.1 2", 10) == 0)
                pub_acked++;
        size_t t = len < 9 ? len : 9;
        memcpy(pub_tail, buf + len - t, t);
        pub_tail[t] = '\0';
    }
}

static void pub_tick(int64_t now)
{
    if (opt.pub_rate <= 0 || now < pub_next)
        return;
    pub_next = now + NS / opt.pub_rate;
    if (pub_fd < 0) {
        pub_reset();
        return;
    }
    if (!pub_connected)
        return;
    char req[256], body[64];
    int blen = snprintf(body, sizeof body, "churn event %ld", pub_sent + 1);
    int len = snprintf(req, sizeof req,
                       "POST /pub HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n%s",
                       opt.port, blen, body);
    if (send(pub_fd, req, (size_t)len, MSG_NOSIGNAL) == len)
        pub_sent++;
    else
        pub_reset();
}

/* ---- the loop ---- */

static void turn(int timeout_ms)
{
    struct epoll_event evs[256];
    int n = epoll_wait(ep, evs, 256, timeout_ms);
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == NULL)
            on_pub(evs[i].events);
        else
            on_slot(evs[i].data.ptr, evs[i].events);
    }
    int64_t now = now_ns();
    pub_tick(now);
    expire(now);
}

/* Lets the server settle: its descriptor count unchanged for 0.5 s (at most settle_ms). */
static long settle(void)
{
    int64_t end = now_ns() + opt.settle_ms * MS, stable_since = now_ns();
    long last = proc_fds(opt.pid);
    while (now_ns() < end) {
        int64_t until = now_ns() + 50 * MS;
        while (now_ns() < until)
            turn(10);
        long n = proc_fds(opt.pid);
        if (n != last) {
            last = n;
            stable_since = now_ns();
        } else if (now_ns() - stable_since >= 500 * MS) {
            break;
        }
    }
    return last;
}

static void row(long cycles, long *rss, long *fds, int64_t t0)
{
    *fds = settle();
    *rss = proc_rss_kb(opt.pid);
    printf("%9ld %10ld %6ld %9.1f %8ld\n", cycles, *rss, *fds, (double)(now_ns() - t0) / NS,
           failed_connect + failed_answer + timeouts);
    fflush(stdout);
}

static void usage(void)
{
    fprintf(stderr, "usage: churn --port P --pid SERVER_PID [--cycles 100000] [--parallel 64]\n"
                    "             [--samples 10] [--pub-rate 20] [--path /sub] [--settle-ms 3000]\n"
                    "             [--rss-growth-kb 16384] [--only KIND (0-4)]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "port", 1, 0, 'p' }, { "pid", 1, 0, 'P' }, { "cycles", 1, 0, 'n' },
        { "parallel", 1, 0, 'c' }, { "samples", 1, 0, 's' }, { "pub-rate", 1, 0, 'r' },
        { "path", 1, 0, 'u' }, { "settle-ms", 1, 0, 'S' }, { "rss-growth-kb", 1, 0, 'R' },
        { "only", 1, 0, 'k' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'p': opt.port = atoi(optarg); break;
        case 'P': opt.pid = atoi(optarg); break;
        case 'n': opt.cycles = atol(optarg); break;
        case 'c': opt.parallel = atoi(optarg); break;
        case 's': opt.samples = atoi(optarg); break;
        case 'r': opt.pub_rate = atoi(optarg); break;
        case 'u': opt.path = optarg; break;
        case 'S': opt.settle_ms = atoi(optarg); break;
        case 'R': opt.rss_growth_kb = atol(optarg); break;
        case 'k': opt.only = atoi(optarg); break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.pid <= 0 || opt.cycles <= 0 || opt.parallel <= 0 || opt.samples <= 0 ||
        opt.only >= NKINDS)
        usage();
    if (proc_fds(opt.pid) < 0) {
        fprintf(stderr, "churn: cannot read /proc/%d/fd\n", opt.pid);
        return 3;
    }
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt.port);
    server_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ep = epoll_create1(EPOLL_CLOEXEC);
    slots = calloc((size_t)opt.parallel, sizeof *slots);
    for (int i = 0; i < opt.parallel; i++)
        slots[i].fd = -1;

    pub_open();
    if (opt.pub_rate > 0) {
        int64_t end = now_ns() + 5 * NS;
        while (pub_acked == 0 && now_ns() < end)
            turn(10);
        if (pub_acked == 0) {
            fprintf(stderr, "churn: the publisher got no answer from 127.0.0.1:%d\n", opt.port);
            return 3;
        }
    }

    int64_t t0 = now_ns();
    long step = opt.cycles / opt.samples > 0 ? opt.cycles / opt.samples : 1;
    long rss0, fds0, rss, fds;
    printf("%9s %10s %6s %9s %8s\n", "cycles", "rss_kb", "fds", "elapsed_s", "failures");
    row(0, &rss0, &fds0, t0);
    long next_sample = step;
    for (;;) {
        long limit = next_sample < opt.cycles ? next_sample : opt.cycles;
        for (int i = 0; i < opt.parallel && started < limit; i++)
            if (slots[i].state == S_FREE)
                start_cycle(&slots[i]);
        if (finished >= limit && inflight == 0) {
            row(finished, &rss, &fds, t0);
            if (finished >= opt.cycles)
                break;
            next_sample += step;
            continue;
        }
        turn(inflight ? 50 : 0);
    }
    double secs = (double)(now_ns() - t0) / NS;

    printf("\nbefore: rss %ld KB, %ld fds;  after %ld cycles: rss %ld KB (%+ld KB), %ld fds (%+ld)\n",
           rss0, fds0, finished, rss, rss - rss0, fds, fds - fds0);
    printf("cycles:");
    for (int k = 0; k < NKINDS; k++)
        printf(" %s %ld%s", kind_names[k], kind_done[k], k + 1 < NKINDS ? "," : "\n");
    printf("failures: %ld connects, %ld streams not answered 200 with first bytes, %ld timeouts, "
           "%ld clean closes the server did not finish in %lld s; %ld resets while draining\n",
           failed_connect, failed_answer, timeouts, clean_unfinished,
           (long long)(CYCLE_TIMEOUT_NS / NS), resets_seen);
    printf("publisher: %ld events posted, %ld answered 2xx, %ld reconnects; "
           "%.0f cycles/s over %.1f s (pauses for the samples included)\n",
           pub_sent, pub_acked, pub_reconnects, (double)finished / secs, secs);
    int status = 0;
    if (fds > fds0) {
        printf("FAIL: the server holds %ld more descriptors than before\n", fds - fds0);
        status = 1;
    }
    if (rss - rss0 > opt.rss_growth_kb) {
        printf("FAIL: RSS grew by %ld KB (allowed %ld KB)\n", rss - rss0, opt.rss_growth_kb);
        status = 1;
    }
    long failures = failed_connect + failed_answer + timeouts + clean_unfinished;
    if (status == 0 && failures * 100 > finished) {
        printf("FAIL: %ld of %ld cycles failed\n", failures, finished);
        status = 3;
    }
    if (status == 0)
        printf("ok: no descriptor growth, RSS growth within %ld KB\n", opt.rss_growth_kb);
    return status;
}
