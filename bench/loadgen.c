/* loadgen: the load generator of the SSE benchmarks (see bench/README.md).
 *
 * One thread, one epoll loop, non-blocking sockets, no dependencies. Every server
 * under test implements the same contract:
 *   GET  /sub        an SSE stream of every event published
 *   POST /pub        the request body becomes the data of one event to all subscribers
 *   GET  /count?n=K  K events, then the stream ends
 * Modes:
 *   fanout  N subscribers; M events of S bytes published at R/s (0: as fast as accepted);
 *           publish->receive latency of every delivery, throughput, server CPU and RSS
 *   idle    N subscribers held open; server RSS per connection
 *   count   N clients each read /count?n=M to its end; events/s and server CPU
 *
 * The payload of each publish starts with its send time (CLOCK_MONOTONIC ns, as text),
 * so a subscriber's latency needs no per-event bookkeeping here: the load generator and
 * the server must share the machine's monotonic clock, i.e. run on the same host.
 * Responses are read by a small incremental HTTP/1.1 parser (status, Content-Length,
 * chunked) feeding an incremental SSE parser that keeps only what it needs: whether an
 * event has data and the number at the start of its first data line. Any split of the
 * bytes gives the same result, so one shared read buffer serves every connection.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proc.h"

#define HEAD_MAX  8192
#define MAX_PUBS  16
#define STALL_NS  (10 * NS)      /* all published, nothing arriving: the rest is lost */
#define NS        1000000000LL
#define RETRY_NS  (NS / 10)      /* between publisher reconnects after a failure */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* ---- latency histogram: log-linear, < 0.8% error, fixed size whatever the count ---- */

#define HSUB  64                         /* sub-buckets per power of two */
#define HBUCKETS (2 * HSUB + 57 * HSUB)

typedef struct {
    uint64_t n, max, b[HBUCKETS];
} hist;

static int hist_index(uint64_t v)
{
    if (v < 2 * HSUB)
        return (int)v;
    int bit = 63 - __builtin_clzll(v);   /* >= 7 */
    int shift = bit - 6;
    return 2 * HSUB + (bit - 7) * HSUB + (int)((v >> shift) - HSUB);
}

static uint64_t hist_value(int i)        /* middle of bucket i */
{
    if (i < 2 * HSUB)
        return (uint64_t)i;
    int k = i - 2 * HSUB, shift = k / HSUB + 1;
    return ((uint64_t)(k % HSUB + HSUB) << shift) + (1ULL << shift) / 2;
}

static void hist_add(hist *h, uint64_t v)
{
    h->b[hist_index(v)]++;
    h->n++;
    if (v > h->max)
        h->max = v;
}

static double hist_ms(const hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t want = (uint64_t)(p * (double)h->n + 0.999999), seen = 0;
    if (want < 1)
        want = 1;
    for (int i = 0; i < HBUCKETS; i++)
        if ((seen += h->b[i]) >= want) {
            uint64_t v = hist_value(i);
            return (v > h->max ? h->max : v) / 1e6;
        }
    return h->max / 1e6;
}

/* ---- connections ---- */

enum kind { SUB, PUB, COUNT };
enum state { CONNECTING, HEAD, BODY, DONE, CLOSED };
enum framing { NONE, LENGTH, CHUNKED, TO_EOF };
enum chunk { CH_SIZE, CH_EXT, CH_DATA, CH_DATA_END, CH_TRAILER };

typedef struct conn {
    int fd;
    uint8_t kind, state, framing, chunk;
    uint8_t want_out, resolved, ok, close_after, inflight;
    int status;
    char *head;                 /* response head being read, freed once parsed */
    uint16_t headlen;
    const char *out;            /* request being written */
    size_t outlen, outoff;
    uint64_t left;              /* body bytes, chunk bytes or chunk size being read */
    uint32_t trailer_len;
    /* SSE: the line being read and the event being built */
    uint8_t cr, col, in_value, lead, fieldlen, is_data, has_data, digits_done, ndigits;
    char field[5];
    uint64_t num;
    uint64_t events;
    char *req;                  /* PUB: its own request buffer */
    int64_t retry_at;           /* PUB: not reopened before, after a failure */
} conn;

typedef struct {
    /* options */
    const char *mode, *host, *label;
    int port, pub_port, pid, json, pubconns, batch, settle_ms;
    long conns, events, size;
    double rate, timeout;
    /* state */
    int ep;
    struct sockaddr_in addr, pub_addr;   /* subscribers' and publishers' server */
    conn *c, pubs[MAX_PUBS];
    long opened, resolved, connected, failed, ended;   /* SUB and COUNT connections */
    long published, responses, accepted, pub_errors;
    uint64_t delivered, unstamped, count_events;
    int64_t now, deadline, t_first_pub, t_last_delivery, t_progress, t_start;
    hist lat;
    char sub_req[256];
    int sub_reqlen;
} run;

static char rbuf[1 << 16];

static void die(const char *msg)
{
    perror(msg);
    exit(2);
}

static void watch(run *r, conn *c, int op)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (c->want_out ? EPOLLOUT : 0),
                              .data.ptr = c };
    if (epoll_ctl(r->ep, op, c->fd, &ev) != 0)
        die("epoll_ctl");
}

/* A SUB or COUNT connection got its answer (ok) or failed before it: frees a slot
 * of the connect window. */
static void resolve(run *r, conn *c, int ok)
{
    if (c->resolved)
        return;
    c->resolved = 1;
    c->ok = (uint8_t)ok;
    r->resolved++;
    if (ok)
        r->connected++;
    else
        r->failed++;
}

static void conn_close(conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = CLOSED;
    free(c->head);
    c->head = NULL;
}

/* The connection ended: cleanly at the end of a response, or not. */
static void conn_end(run *r, conn *c, int clean)
{
    if (c->state == CLOSED)
        return;
    if (c->kind == PUB) {
        c->retry_at = now_ns() + RETRY_NS;
        if (c->inflight) {
            r->pub_errors++;
            r->responses++;
        }
        c->inflight = 0;
    } else if (!c->resolved) {
        resolve(r, c, 0);
    } else if (c->ok) {
        r->ended++;               /* SUB: ended early; COUNT: counted below */
        if (c->kind == COUNT && !clean)
            c->ok = 0;
    }
    conn_close(c);
}

static int conn_open(run *r, conn *c, enum kind kind, const char *req, size_t len)
{
    conn keep = { .req = c->req, .retry_at = c->retry_at };
    *c = keep;
    c->kind = (uint8_t)kind;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -1;
    if (kind == PUB) {
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    const struct sockaddr_in *to = kind == PUB ? &r->pub_addr : &r->addr;
    if (connect(c->fd, (const struct sockaddr *)to, sizeof *to) != 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        c->state = CLOSED;
        return -1;
    }
    c->state = CONNECTING;
    c->out = req;
    c->outlen = len;
    c->want_out = 1;
    watch(r, c, EPOLL_CTL_ADD);
    return 0;
}

static void conn_write(run *r, conn *c)
{
    while (c->outoff < c->outlen) {
        ssize_t n = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
        if (n < 0 && errno == EAGAIN)
            break;
        if (n <= 0) {
            conn_end(r, c, 0);
            return;
        }
        c->outoff += (size_t)n;
    }
    int want = c->outoff < c->outlen;
    if (want != c->want_out) {
        c->want_out = (uint8_t)want;
        watch(r, c, EPOLL_CTL_MOD);
    }
}

/* ---- publishing ---- */

/* The payload: the send time as text, padded with 'x' to the requested size. */
static void publish(run *r, conn *c)
{
    char ts[24];
    int64_t t = now_ns();
    int tl = snprintf(ts, sizeof ts, "%lld", (long long)t);
    size_t size = (size_t)r->size > (size_t)tl ? (size_t)r->size : (size_t)tl;
    int hl = sprintf(c->req, "POST /pub HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: text/plain\r\n"
                     "Content-Length: %zu\r\n\r\n", r->host, r->port, size);
    memcpy(c->req + hl, ts, (size_t)tl);
    memset(c->req + hl + tl, 'x', size - (size_t)tl);
    if (!r->t_first_pub)
        r->t_first_pub = t;
    r->published++;
    c->inflight = 1;
    c->out = c->req;
    c->outlen = (size_t)hl + size;
    c->outoff = 0;
    conn_write(r, c);
}

static int64_t next_due(const run *r)
{
    if (r->rate <= 0 || !r->t_first_pub)
        return 0;
    return r->t_first_pub + (int64_t)((double)r->published * 1e9 / r->rate);
}

/* Reopens closed publisher connections and sends what is due on idle ones. */
static void pump_publishers(run *r)
{
    for (int i = 0; i < r->pubconns; i++) {
        conn *c = &r->pubs[i];
        if (c->state == CLOSED && r->published < r->events && r->now >= c->retry_at)
            conn_open(r, c, PUB, NULL, 0);
        if (c->state == HEAD && !c->inflight && r->published < r->events && r->now >= next_due(r))
            publish(r, c);
    }
}

/* ---- response parsing ---- */

static void event_dispatched(run *r, conn *c)
{
    c->events++;
    if (c->kind == COUNT) {
        r->count_events++;
        return;
    }
    r->delivered++;
    r->t_last_delivery = r->t_progress = r->now;
    if (c->ndigits)
        hist_add(&r->lat, r->now > (int64_t)c->num ? (uint64_t)(r->now - (int64_t)c->num) : 0);
    else
        r->unstamped++;
}

/* The WHATWG line rules, reduced to what is counted: CR, LF or CRLF end a line; a blank
 * line dispatches an event if it had a data line; "data" with or without ':' is a data
 * line; one leading space of a value is dropped. */
static void end_line(run *r, conn *c)
{
    if (c->col == 0) {
        if (c->has_data)
            event_dispatched(r, c);
        c->has_data = c->digits_done = c->ndigits = 0;
        c->num = 0;
    } else if (c->in_value ? c->is_data : (c->fieldlen == 4 && !memcmp(c->field, "data", 4))) {
        c->has_data = 1;
    }
    c->col = c->in_value = c->fieldlen = c->is_data = 0;
}

static void sse_feed(run *r, conn *c, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (c->cr) {
            c->cr = 0;
            if (ch == '\n')
                continue;
        }
        if (ch == '\r' || ch == '\n') {
            c->cr = ch == '\r';
            end_line(r, c);
            continue;
        }
        c->col = 1;
        if (!c->in_value) {
            if (ch == ':') {
                c->in_value = c->lead = 1;
                c->is_data = c->fieldlen == 4 && !memcmp(c->field, "data", 4);
            } else if (c->fieldlen < sizeof c->field) {
                c->field[c->fieldlen++] = ch;
            } else {
                c->fieldlen = sizeof c->field + 1;   /* too long for "data" */
            }
            continue;
        }
        if (c->lead) {
            c->lead = 0;
            if (ch == ' ')
                continue;
        }
        if (c->is_data && !c->has_data && !c->digits_done) {
            if (ch >= '0' && ch <= '9' && c->ndigits < 19) {
                c->num = c->num * 10 + (uint64_t)(ch - '0');
                c->ndigits++;
                continue;
            }
            c->digits_done = 1;
        }
        /* the rest of the value is not looked at: skip to the end of the line */
        while (i + 1 < n && p[i + 1] != '\n' && p[i + 1] != '\r')
            i++;
    }
}

static void body_done(run *r, conn *c)
{
    c->state = DONE;
    if (c->kind != PUB) {
        conn_end(r, c, 1);
        return;
    }
    r->responses++;
    r->t_progress = r->now;
    if (c->status >= 200 && c->status < 300)
        r->accepted++;
    else
        r->pub_errors++;
    c->inflight = 0;
    if (c->close_after) {
        conn_close(c);          /* reopened by pump_publishers */
        return;
    }
    c->state = HEAD;
    pump_publishers(r);
}

static void content(run *r, conn *c, const char *p, size_t n)
{
    if (c->kind != PUB)
        sse_feed(r, c, p, n);
}

static size_t body_feed(run *r, conn *c, const char *p, size_t n)
{
    if (c->framing == TO_EOF) {
        content(r, c, p, n);
        return n;
    }
    if (c->framing == LENGTH) {
        size_t k = n < c->left ? n : (size_t)c->left;
        content(r, c, p, k);
        if (!(c->left -= k))
            body_done(r, c);
        return k;
    }
    size_t i = 0;
    while (i < n && c->state == BODY) {
        char ch = p[i];
        switch (c->chunk) {
        case CH_SIZE:
        case CH_EXT:
            i++;
            if (ch == '\n') {
                c->chunk = c->left ? CH_DATA : CH_TRAILER;
                c->trailer_len = 0;
            } else if (c->chunk == CH_SIZE && isxdigit((unsigned char)ch)) {
                c->left = c->left * 16 + (uint64_t)(ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10);
            } else {
                c->chunk = CH_EXT;         /* extensions, CR */
            }
            break;
        case CH_DATA: {
            size_t k = n - i < c->left ? n - i : (size_t)c->left;
            content(r, c, p + i, k);
            i += k;
            if (!(c->left -= k))
                c->chunk = CH_DATA_END;
            break;
        }
        case CH_DATA_END:
            i++;
            if (ch == '\n')
                c->chunk = CH_SIZE;
            break;
        case CH_TRAILER:
            i++;
            if (ch == '\n') {
                if (!c->trailer_len)
                    body_done(r, c);
                c->trailer_len = 0;
            } else if (ch != '\r') {
                c->trailer_len++;
            }
            break;
        }
    }
    return i;
}

static const char *header_value(const char *line, const char *name)
{
    size_t n = strlen(name);
    if (strncasecmp(line, name, n) || line[n] != ':')
        return NULL;
    return line + n + 1;
}

static void head_done(run *r, conn *c)
{
    int minor = 1;
    c->status = 0;
    sscanf(c->head, "HTTP/1.%d %d", &minor, &c->status);
    c->close_after = minor == 0;
    c->framing = TO_EOF;
    c->left = 0;
    for (char *line = strchr(c->head, '\n'); line && *++line; line = strchr(line, '\n')) {
        const char *v;
        if ((v = header_value(line, "transfer-encoding")) && strcasestr(v, "chunked"))
            c->framing = CHUNKED, c->chunk = CH_SIZE;
        else if ((v = header_value(line, "content-length")) && c->framing != CHUNKED)
            c->framing = LENGTH, c->left = strtoull(v, NULL, 10);
        else if ((v = header_value(line, "connection")) && strcasestr(v, "close"))
            c->close_after = 1;
    }
    if (c->status == 204 || c->status == 304 || (c->framing == LENGTH && !c->left))
        c->framing = NONE;
    free(c->head);
    c->head = NULL;
    c->headlen = 0;
    c->state = BODY;
    if (c->kind != PUB) {
        int ok = c->status >= 200 && c->status < 300;
        resolve(r, c, ok);
        if (!ok) {
            conn_end(r, c, 0);
            return;
        }
    }
    if (c->framing == NONE)
        body_done(r, c);
}

static size_t head_feed(run *r, conn *c, const char *p, size_t n)
{
    if (!c->head && !(c->head = malloc(HEAD_MAX)))
        die("malloc");
    for (size_t i = 0; i < n; i++) {
        if (c->headlen == HEAD_MAX - 1) {
            conn_end(r, c, 0);
            return n;
        }
        c->head[c->headlen++] = p[i];
        if (p[i] == '\n' && c->headlen >= 2 &&
            (c->head[c->headlen - 2] == '\n' ||
             (c->headlen >= 3 && c->head[c->headlen - 2] == '\r' && c->head[c->headlen - 3] == '\n'))) {
            c->head[c->headlen] = 0;
            head_done(r, c);
            return i + 1;
        }
    }
    return n;
}

static void conn_feed(run *r, conn *c, const char *p, size_t n)
{
    while (n) {
        size_t k;
        if (c->state == HEAD)
            k = head_feed(r, c, p, n);
        else if (c->state == BODY)
            k = body_feed(r, c, p, n);
        else
            return;                    /* bytes after a finished stream: not ours to count */
        p += k;
        n -= k;
    }
}

static void on_event(run *r, conn *c, uint32_t ev)
{
    if (c->state == CLOSED)
        return;
    if (c->state == CONNECTING && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            conn_end(r, c, 0);
            return;
        }
        c->state = HEAD;
        if (c->kind == PUB)
            pump_publishers(r);
    }
    if (c->state != CONNECTING && c->want_out)
        conn_write(r, c);
    if (c->state == CLOSED || !(ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        return;
    ssize_t n = read(c->fd, rbuf, sizeof rbuf);
    if (n < 0 && errno == EAGAIN)
        return;
    r->now = now_ns();
    if (n <= 0) {
        if (c->state == BODY && c->framing == TO_EOF) {
            c->close_after = 1;        /* the body was delimited by the close */
            body_done(r, c);
        } else {
            conn_end(r, c, 0);
        }
        return;
    }
    conn_feed(r, c, rbuf, (size_t)n);
}

/* ---- the loop ---- */

typedef int (*done_fn)(run *);

/* Opens SUB/COUNT connections keeping at most `batch` waiting for their answer. */
static void open_more(run *r, enum kind kind, const char *req, size_t len)
{
    while (r->opened < r->conns && r->opened - r->resolved < r->batch) {
        conn *c = &r->c[r->opened++];
        if (conn_open(r, c, kind, req, len) != 0)
            resolve(r, c, 0);
    }
}

/* Runs the loop until done(r) or `until` (ns, monotonic); returns done(r). */
static int loop(run *r, done_fn done, int64_t until, enum kind kind, const char *req, size_t len)
{
    struct epoll_event evs[512];
    if (until > r->deadline)
        until = r->deadline;
    for (;;) {
        r->now = now_ns();
        if (req)
            open_more(r, kind, req, len);
        if (r->t_first_pub || kind == PUB)
            pump_publishers(r);
        if (done && done(r))
            return 1;
        if (r->now >= until)
            return done ? done(r) : 1;
        int64_t wake = until, due = next_due(r);
        if (due && r->published < r->events && due < wake)
            wake = due;
        int ms = (int)((wake - r->now + 999999) / 1000000);
        int n = epoll_wait(r->ep, evs, 512, ms < 0 ? 0 : ms > 100 ? 100 : ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++)
            on_event(r, evs[i].data.ptr, evs[i].events);
    }
}

static int all_resolved(run *r) { return r->resolved == r->conns; }

static int all_ended(run *r) { return r->resolved == r->conns && r->ended + r->failed == r->conns; }

static int fanout_done(run *r)
{
    if (r->ended == r->connected)
        return 1;                                /* no subscriber left to deliver to */
    if (r->responses < r->events)
        return 0;
    if (r->delivered >= (uint64_t)r->connected * (uint64_t)r->accepted)
        return 1;                                /* all that can come has come */
    return r->now - r->t_progress > STALL_NS;    /* nothing more will come */
}

/* ---- the server's resources, from /proc ---- */

static double proc_cpu_s(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* the command name may hold spaces */
    unsigned long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}


static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- reporting: a JSON object or a line for people; absent numbers are null ---- */

static void out_num(const run *r, const char *key, double v, int ok)
{
    const char *fmt = v == (double)(long long)v || v >= 1e5 ? "%.0f" : "%.6g";
    if (r->json) {
        printf(",\"%s\":", key);
        if (ok)
            printf(fmt, v);
        else
            printf("null");
    } else if (ok) {
        printf(" %s=", key);
        printf(fmt, v);
    }
}

#define NUM(key, v, ok) out_num(r, key, (double)(v), ok)
#define INT(key, v) out_num(r, key, (double)(v), 1)

static void out_begin(const run *r)
{
    if (r->json)
        printf("{\"mode\":\"%s\",\"label\":\"%s\"", r->mode, r->label);
    else
        printf("%s %s:", r->mode, r->label);
}

static void out_end(const run *r, int ok)
{
    printf(r->json ? ",\"ok\":%s}\n" : " ok=%s\n", ok ? "true" : "false");
}

/* ---- modes ---- */

/* Opens every subscriber; returns whether all got their answer, and in *secs how long it took. */
static int connect_subs(run *r, double *secs)
{
    int64_t t0 = now_ns();
    r->c = calloc((size_t)r->conns, sizeof *r->c);
    if (!r->c)
        die("calloc");
    r->sub_reqlen = snprintf(r->sub_req, sizeof r->sub_req,
        "GET /sub HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n\r\n", r->host, r->port);
    int ok = loop(r, all_resolved, r->deadline, SUB, r->sub_req, (size_t)r->sub_reqlen);
    *secs = (double)(now_ns() - t0) / 1e9;
    /* let late subscriptions settle on servers that answer before they subscribe */
    loop(r, NULL, now_ns() + r->settle_ms * 1000000LL, SUB, NULL, 0);
    return ok && r->failed == 0;
}

static int mode_fanout(run *r)
{
    double connect_s;
    int conns_ok = connect_subs(r, &connect_s);
    double cpu0 = r->pid ? proc_cpu_s(r->pid) : -1, self0 = self_cpu_s();
    for (int i = 0; i < r->pubconns; i++) {
        r->pubs[i].fd = -1;
        r->pubs[i].state = CLOSED;
        if (!(r->pubs[i].req = malloc((size_t)r->size + 512)))
            die("malloc");
    }
    r->t_progress = now_ns();
    if (r->connected)
        loop(r, fanout_done, r->deadline, PUB, NULL, 0);
    double cpu = r->pid ? proc_cpu_s(r->pid) - cpu0 : -1, self = self_cpu_s() - self0;
    long rss = r->pid ? proc_rss_kb(r->pid) : -1;
    uint64_t expected = (uint64_t)r->conns * (uint64_t)r->events;
    double window = r->t_last_delivery > r->t_first_pub ? (double)(r->t_last_delivery - r->t_first_pub) / 1e9 : 0;
    /* a gap event or any other unstamped one is not one of ours: not a delivery */
    int ok = conns_ok && r->delivered - r->unstamped >= expected && r->ended == 0 &&
             r->pub_errors == 0;

    out_begin(r);
    INT("conns", r->conns); INT("connected", r->connected); INT("conn_failed", r->failed);
    INT("sub_ended", r->ended);
    INT("events", r->events); INT("size", r->size); NUM("rate", r->rate, 1);
    INT("published", r->published); INT("pub_errors", r->pub_errors);
    INT("expected", expected); INT("delivered", r->delivered); INT("unstamped", r->unstamped);
    NUM("connect_s", connect_s, 1);
    NUM("window_s", window, window > 0);
    NUM("deliveries_per_s", r->delivered / window, window > 0);
    NUM("p50_ms", hist_ms(&r->lat, .50), r->lat.n);
    NUM("p90_ms", hist_ms(&r->lat, .90), r->lat.n);
    NUM("p99_ms", hist_ms(&r->lat, .99), r->lat.n);
    NUM("max_ms", r->lat.max / 1e6, r->lat.n);
    /* one event: from its publish to its last delivery among all subscribers */
    NUM("fanout_time_ms", window * 1e3, r->events == 1 && window > 0);
    NUM("server_cpu_s", cpu, cpu >= 0);
    NUM("server_cpu_s_per_M", cpu / ((double)r->delivered / 1e6), cpu >= 0 && r->delivered);
    NUM("server_rss_kb", rss, rss >= 0);
    NUM("loadgen_cpu_s", self, 1);
    out_end(r, ok);
    return ok;
}

static int mode_idle(run *r)
{
    long rss0 = r->pid ? proc_rss_kb(r->pid) : -1;
    double cpu0 = r->pid ? proc_cpu_s(r->pid) : -1;
    double connect_s;
    int ok = connect_subs(r, &connect_s);
    long rss1 = r->pid ? proc_rss_kb(r->pid) : -1;
    double cpu = r->pid ? proc_cpu_s(r->pid) - cpu0 : -1;

    out_begin(r);
    INT("conns", r->conns); INT("connected", r->connected); INT("conn_failed", r->failed);
    INT("sub_ended", r->ended);
    NUM("connect_s", connect_s, 1);
    NUM("rss_before_kb", rss0, rss0 >= 0);
    NUM("rss_after_kb", rss1, rss1 >= 0);
    NUM("bytes_per_conn", (double)(rss1 - rss0) * 1024 / (double)r->connected, rss0 >= 0 && r->connected);
    NUM("server_cpu_s", cpu, cpu >= 0);
    ok = ok && r->ended == 0;
    out_end(r, ok);
    return ok;
}

static int mode_count(run *r)
{
    char req[256];
    int len = snprintf(req, sizeof req, "GET /count?n=%ld HTTP/1.1\r\nHost: %s:%d\r\n"
                       "Accept: text/event-stream\r\n\r\n", r->events, r->host, r->port);
    r->c = calloc((size_t)r->conns, sizeof *r->c);
    if (!r->c)
        die("calloc");
    double cpu0 = r->pid ? proc_cpu_s(r->pid) : -1, self0 = self_cpu_s();
    int64_t t0 = now_ns();
    loop(r, all_ended, r->deadline, COUNT, req, (size_t)len);
    double elapsed = (double)(now_ns() - t0) / 1e9;
    double cpu = r->pid ? proc_cpu_s(r->pid) - cpu0 : -1, self = self_cpu_s() - self0;
    long rss = r->pid ? proc_rss_kb(r->pid) : -1;
    long clean = 0, short_streams = 0;
    for (long i = 0; i < r->conns; i++) {
        conn *c = &r->c[i];
        if (c->resolved && c->ok && c->state == CLOSED && c->events >= (uint64_t)r->events)
            clean++;
        else if (c->resolved && c->ok)
            short_streams++;
    }
    uint64_t expected = (uint64_t)r->conns * (uint64_t)r->events;
    int ok = clean == r->conns && r->count_events >= expected;

    out_begin(r);
    INT("conns", r->conns); INT("conn_failed", r->failed);
    INT("events", r->events);
    INT("expected", expected); INT("received", r->count_events);
    INT("clean_ends", clean); INT("short_or_broken", short_streams);
    NUM("elapsed_s", elapsed, 1);
    NUM("events_per_s", r->count_events / elapsed, elapsed > 0);
    NUM("server_cpu_s", cpu, cpu >= 0);
    NUM("server_cpu_s_per_M", cpu / ((double)r->count_events / 1e6), cpu >= 0 && r->count_events);
    NUM("server_rss_kb", rss, rss >= 0);
    NUM("loadgen_cpu_s", self, 1);
    out_end(r, ok);
    return ok;
}

static void usage(void)
{
    fprintf(stderr,
        "usage: loadgen fanout|idle|count [options]\n"
        "  --host ADDR       server IPv4 address (127.0.0.1)\n"
        "  --port P          server port (8080)\n"
        "  --pub-port P      port the publishers POST /pub to (default: --port), e.g. the\n"
        "                    upstream of a relay whose subscribers read --port\n"
        "  --pid PID         server process: CPU and RSS from /proc\n"
        "  --conns N         subscribers (fanout, idle) or clients (count) (100)\n"
        "  --events M        events published (fanout) or per client (count) (100)\n"
        "  --size S          payload bytes per published event (64)\n"
        "  --rate R          publishes per second, 0 = as fast as accepted (0)\n"
        "  --pubconns P      publisher connections, one request in flight each (2)\n"
        "  --batch B         connections at most waiting for their answer (500)\n"
        "  --settle MS       pause after all subscribers are in, before measuring (200)\n"
        "  --timeout SECONDS bound on the whole run (60)\n"
        "  --label NAME      server name in the report (server)\n"
        "  --json            one JSON object per run instead of a line for people\n"
        "Exits 1 when deliveries are missing or connections failed, 2 on usage errors.\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static run rr;
    run *r = &rr;
    *r = (run){ .host = "127.0.0.1", .label = "server", .port = 8080, .pubconns = 2,
                .batch = 500, .settle_ms = 200, .conns = 100, .events = 100, .size = 64,
                .timeout = 60 };
    static const struct option opts[] = {
        { "host", 1, 0, 'h' }, { "port", 1, 0, 'p' }, { "pid", 1, 0, 'P' }, { "pub-port", 1, 0, 'U' },
        { "conns", 1, 0, 'c' }, { "events", 1, 0, 'e' }, { "size", 1, 0, 's' },
        { "rate", 1, 0, 'r' }, { "pubconns", 1, 0, 'u' }, { "batch", 1, 0, 'b' },
        { "settle", 1, 0, 'S' }, { "timeout", 1, 0, 't' }, { "label", 1, 0, 'l' },
        { "json", 0, 0, 'j' }, { 0, 0, 0, 0 } };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': r->host = optarg; break;
        case 'p': r->port = atoi(optarg); break;
        case 'U': r->pub_port = atoi(optarg); break;
        case 'P': r->pid = atoi(optarg); break;
        case 'c': r->conns = atol(optarg); break;
        case 'e': r->events = atol(optarg); break;
        case 's': r->size = atol(optarg); break;
        case 'r': r->rate = atof(optarg); break;
        case 'u': r->pubconns = atoi(optarg); break;
        case 'b': r->batch = atoi(optarg); break;
        case 'S': r->settle_ms = atoi(optarg); break;
        case 't': r->timeout = atof(optarg); break;
        case 'l': r->label = optarg; break;
        case 'j': r->json = 1; break;
        default: usage();
        }
    }
    if (optind != argc - 1 || r->conns < 1 || r->events < 0 || r->size < 0 || r->rate < 0 ||
        r->pubconns < 1 || r->pubconns > MAX_PUBS || r->batch < 1 || r->timeout <= 0)
        usage();
    r->mode = argv[optind];
    r->addr.sin_family = AF_INET;
    r->addr.sin_port = htons((uint16_t)r->port);
    if (inet_pton(AF_INET, r->host, &r->addr.sin_addr) != 1)
        usage();
    r->pub_addr = r->addr;
    if (r->pub_port > 0)
        r->pub_addr.sin_port = htons((uint16_t)r->pub_port);
    /* every subscriber is a descriptor */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if ((r->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        die("epoll_create1");
    r->t_start = now_ns();
    r->deadline = r->t_start + (int64_t)(r->timeout * 1e9);
    int ok;
    if (!strcmp(r->mode, "fanout"))
        ok = mode_fanout(r);
    else if (!strcmp(r->mode, "idle"))
        ok = mode_idle(r);
    else if (!strcmp(r->mode, "count"))
        ok = mode_count(r);
    else
        usage();
    fflush(stdout);
    return ok ? 0 : 1;
}
