/* sse_http: libcurl's multi interface on sse_loop (see sse_http.h and docs/design.md,
 * "Outbound HTTP").
 *
 * Two rules of libcurl shape this file. Its callbacks (write, header, socket, timer) must
 * not call back into the multi handle, so a transfer cancelled or started from inside one
 * is only marked, and settled once curl has returned (`settle`). And a socket curl stops
 * caring about may still have an event later in the loop's current batch, so its watch is
 * unwatched at once but freed by a 0 ms timer, which runs after the batch (`reap`).
 */
#include "sse_http.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>

_Static_assert((int)SSE_HTTP_ETIMEOUT == (int)CURLE_OPERATION_TIMEDOUT, "err values are CURLcodes");
_Static_assert((int)SSE_HTTP_ETOOLARGE == (int)CURLE_FILESIZE_EXCEEDED, "err values are CURLcodes");

#define MAX_HEADER_BYTES (256 * 1024)   /* curl 7.88 bounds one line, not their sum */
/* Connections curl keeps alive for reuse: at most this many; and all of them are closed
 * once no transfer has run for idle_ms (curl would otherwise hold them, and their
 * descriptors, until its next transfer; a peer that closed its end leaves them in
 * CLOSE_WAIT). Without a bound curl keeps 4 per transfer it had at once. */
#define MAX_IDLE_CONNECTIONS 16L
#define IDLE_CLOSE_MS 5000

typedef struct http_sock {
    sse_watch         w;
    sse_http         *h;
    uint32_t          events;
    int               dead;       /* curl is done with it; freed by reap */
    struct http_sock *prev, *next;
} http_sock;

enum { T_PENDING, T_ACTIVE, T_DONE, T_DOOMED };

struct sse_http_transfer {
    sse_http          *h;
    CURL              *easy;
    struct curl_slist *hdrs;
    sse_http_handler   cb;
    void              *ud;
    int                state;     /* T_PENDING: not in the multi yet; T_DONE: in done */
    int                added;     /* in the multi handle */
    int                follow, head_sent, saw_location, too_large;
    size_t             max_size, received, header_bytes;
    char             **lines;     /* the current header block */
    size_t             nlines, caplines;
    char               errbuf[CURL_ERROR_SIZE];
    sse_http_transfer *prev, *next;
};

struct sse_http {
    sse_loop          *loop;
    CURLM             *multi;
    sse_timer          timer;     /* curl's one timeout */
    sse_timer          reap;      /* frees dead socket watches after the batch */
    sse_timer          idle;      /* no transfer for idle_ms: close what curl keeps */
    uint64_t           idle_ms;
    http_sock         *socks;
    sse_http_transfer *all;
    size_t             ntransfers, nwatches;
    int                depth;     /* > 0: inside curl or one of our callbacks */
    int                dirty;     /* a transfer is T_PENDING or T_DOOMED */
};

static void settle(sse_http *h);

/* ---- sockets: curl says what it wants, we watch it ---- */

static void on_sock_event(sse_watch *w, uint32_t ev);

static void sock_kill(sse_http *h, http_sock *s)
{
    sse_loop_unwatch(h->loop, &s->w);   /* fails harmlessly if curl closed it first */
    s->dead = 1;
    h->nwatches--;
    sse_timer_start(h->loop, &h->reap, 0, 0);
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    sse_http *h = userp;
    http_sock *s = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (s) {
            sock_kill(h, s);
            curl_multi_assign(h->multi, fd, NULL);
        }
        return 0;
    }
    uint32_t events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
    if (s) {
        if (events != s->events && sse_loop_rewatch(h->loop, &s->w, events) != 0)
            return -1;
        s->events = events;
        return 0;
    }
    s = calloc(1, sizeof *s);
    if (!s)
        return -1;
    s->w.fd = fd;
    s->w.cb = on_sock_event;
    s->h = h;
    s->events = events;
    if (sse_loop_watch(h->loop, &s->w, events) != 0) {
        free(s);
        return -1;
    }
    s->next = h->socks;
    if (h->socks)
        h->socks->prev = s;
    h->socks = s;
    h->nwatches++;
    curl_multi_assign(h->multi, fd, s);
    return 0;
}

static void sock_free(sse_http *h, http_sock *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        h->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s);
}

static void on_reap(sse_timer *tm)
{
    sse_http *h = (sse_http *)((char *)tm - offsetof(sse_http, reap));
    for (http_sock *s = h->socks, *next; s; s = next) {
        next = s->next;
        if (s->dead)
            sock_free(h, s);
    }
}

/* ---- driving curl ---- */

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    sse_http *h = userp;
    if (timeout_ms < 0)
        sse_timer_stop(h->loop, &h->timer);
    else
        sse_timer_start(h->loop, &h->timer, (uint64_t)timeout_ms, 0);
    return 0;
}

static void release(sse_http_transfer *t)
{
    sse_http *h = t->h;
    if (t->added)
        curl_multi_remove_handle(h->multi, t->easy);
    curl_easy_cleanup(t->easy);
    curl_slist_free_all(t->hdrs);
    for (size_t i = 0; i < t->nlines; i++)
        free(t->lines[i]);
    free(t->lines);
    if (t->prev)
        t->prev->next = t->next;
    else
        h->all = t->next;
    if (t->next)
        t->next->prev = t->prev;
    h->ntransfers--;
    free(t);
    if (h->ntransfers == 0)
        sse_timer_start(h->loop, &h->idle, h->idle_ms, 0);
}

static void emit_head(sse_http_transfer *t);

/* The one place done runs: it maps curl's result to our err and message. */
static void finish(sse_http_transfer *t, CURLcode rc)
{
    sse_http *h = t->h;
    const char *msg = NULL;
    int err = (int)rc;
    if (rc == CURLE_OUT_OF_MEMORY && t->header_bytes && !t->head_sent)
        t->too_large = 2;           /* one header line past curl's own bound (100 KB) */
    if (t->too_large || rc == CURLE_FILESIZE_EXCEEDED) {
        err = SSE_HTTP_ETOOLARGE;
        msg = t->too_large == 2 ? "response headers too large" : "response too large";
    } else if (rc != CURLE_OK) {
        msg = t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc);
    } else if (!t->head_sent) {
        emit_head(t);               /* e.g. a 3xx we did not follow after all */
    }
    t->state = T_DONE;
    h->depth++;
    if (t->cb.done)
        t->cb.done(t->ud, err, msg);
    h->depth--;
    t->state = T_DOOMED;
    h->dirty = 1;
}

static void drain(sse_http *h)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(h->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        sse_http_transfer *t = NULL;
        CURLcode rc = m->data.result;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&t);
        /* Out of the multi now, so a cancel from done has nothing left to stop. */
        curl_multi_remove_handle(h->multi, t->easy);
        t->added = 0;
        if (t->state == T_ACTIVE)
            finish(t, rc);
        t->state = T_DOOMED;
        h->dirty = 1;
    }
}

static void act(sse_http *h, curl_socket_t fd, int mask)
{
    int running;
    h->depth++;
    curl_multi_socket_action(h->multi, fd, mask, &running);
    drain(h);
    h->depth--;
    if (h->depth == 0)
        settle(h);
}

static void on_sock_event(sse_watch *w, uint32_t ev)
{
    http_sock *s = (http_sock *)w;
    if (s->dead)
        return;
    int mask = ((ev & (EPOLLIN | EPOLLHUP)) ? CURL_CSELECT_IN : 0)
             | ((ev & EPOLLOUT) ? CURL_CSELECT_OUT : 0)
             | ((ev & EPOLLERR) ? CURL_CSELECT_ERR : 0);
    act(s->h, w->fd, mask);
}

static void on_timer(sse_timer *tm)
{
    sse_http *h = (sse_http *)((char *)tm - offsetof(sse_http, timer));
    act(h, CURL_SOCKET_TIMEOUT, 0);
}

/* Outside every callback: add what was started and release what was cancelled or done
 * while curl or a callback was running. */
static void settle(sse_http *h)
{
    while (h->dirty) {
        h->dirty = 0;
        for (sse_http_transfer *t = h->all, *next; t; t = next) {
            next = t->next;
            if (t->state == T_DOOMED) {
                release(t);
            } else if (t->state == T_PENDING) {
                if (curl_multi_add_handle(h->multi, t->easy) == CURLM_OK) {
                    t->added = 1;
                    t->state = T_ACTIVE;
                } else {
                    finish(t, CURLE_OUT_OF_MEMORY);
                }
            }
        }
    }
}

/* ---- the response: header block, head, body ---- */

static void clear_lines(sse_http_transfer *t)
{
    for (size_t i = 0; i < t->nlines; i++)
        free(t->lines[i]);
    t->nlines = 0;
    t->saw_location = 0;
}

static void emit_head(sse_http_transfer *t)
{
    long status = 0;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    t->head_sent = 1;
    if (t->cb.head)
        t->cb.head(t->ud, status, (const char *const *)t->lines, t->nlines);
    clear_lines(t);
}

static int add_line(sse_http_transfer *t, const char *p, size_t n)
{
    if (n && (p[0] == ' ' || p[0] == '\t') && t->nlines) {
        /* An obsolete folded line continues the previous header. */
        char *prev = t->lines[t->nlines - 1];
        size_t plen = strlen(prev);
        char *joined = realloc(prev, plen + n + 1);
        if (!joined)
            return -1;
        memcpy(joined + plen, p, n);
        joined[plen + n] = '\0';
        t->lines[t->nlines - 1] = joined;
        return 0;
    }
    if (t->nlines == t->caplines) {
        size_t cap = t->caplines ? t->caplines * 2 : 16;
        char **l = realloc(t->lines, cap * sizeof *l);
        if (!l)
            return -1;
        t->lines = l;
        t->caplines = cap;
    }
    char *s = malloc(n + 1);
    if (!s)
        return -1;
    memcpy(s, p, n);
    s[n] = '\0';
    t->lines[t->nlines++] = s;
    if (n >= 9 && strncasecmp(s, "location:", 9) == 0)
        t->saw_location = 1;
    return 0;
}

/* Lines of every header block come here; head gets the final response's block only. */
static size_t on_header(char *p, size_t size, size_t nmemb, void *ud)
{
    sse_http_transfer *t = ud;
    size_t len = size * nmemb, n = len;
    if (t->state != T_ACTIVE)
        return 0;
    if (t->head_sent)
        return len;                 /* trailers */
    if ((t->header_bytes += len) > MAX_HEADER_BYTES) {
        t->too_large = 2;
        return 0;
    }
    while (n && (p[n - 1] == '\n' || p[n - 1] == '\r'))
        n--;
    if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        clear_lines(t);             /* a new response begins: 1xx, redirect, CONNECT */
        return len;
    }
    if (n > 0)
        return add_line(t, p, n) == 0 ? len : 0;
    long status = 0;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status < 200 || (t->follow && status / 100 == 3 && t->saw_location)) {
        clear_lines(t);             /* curl goes on to the next response */
        return len;
    }
    emit_head(t);
    return t->state == T_ACTIVE ? len : 0;
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *ud)
{
    sse_http_transfer *t = ud;
    size_t len = size * nmemb;
    if (t->state != T_ACTIVE)
        return 0;
    if (!t->head_sent)
        emit_head(t);
    if (t->state != T_ACTIVE)
        return 0;
    t->received += len;
    if (t->max_size && t->received > t->max_size) {
        t->too_large = 1;
        return 0;                   /* curl ends it with CURLE_WRITE_ERROR; finish says why */
    }
    if (t->cb.data && t->cb.data(t->ud, p, len))
        sse_http_cancel(t);
    return t->state == T_ACTIVE ? len : 0;
}

/* ---- public ---- */

static CURLM *new_multi(sse_http *h)
{
    CURLM *m = curl_multi_init();
    if (!m)
        return NULL;
    curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(m, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(m, CURLMOPT_TIMERDATA, h);
    curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, MAX_IDLE_CONNECTIONS);
    return m;
}

/* Nothing has run for idle_ms: a fresh multi handle, so the old one closes the
 * connections it kept alive (curl has no call to close only those). */
static void on_idle(sse_timer *tm)
{
    sse_http *h = (sse_http *)((char *)tm - offsetof(sse_http, idle));
    if (h->ntransfers || h->depth)
        return;
    CURLM *fresh = new_multi(h);
    if (!fresh)
        return;                     /* keep the old one; the next idle period tries again */
    curl_multi_cleanup(h->multi);   /* REMOVEs still come to on_socket with h->multi */
    h->multi = fresh;
    sse_timer_stop(h->loop, &h->timer);
    for (http_sock *sk = h->socks; sk; sk = sk->next)
        if (!sk->dead)              /* none should be left: nothing runs */
            sock_kill(h, sk);
}

sse_http *sse_http_new(sse_loop *loop)
{
    static int global_ok;
    if (!global_ok) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return NULL;
        global_ok = 1;              /* never cleaned up: other users may share libcurl */
    }
    sse_http *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->loop = loop;
    h->idle_ms = IDLE_CLOSE_MS;
    sse_timer_init(&h->timer, on_timer);
    sse_timer_init(&h->reap, on_reap);
    sse_timer_init(&h->idle, on_idle);
    h->multi = new_multi(h);
    if (!h->multi) {
        free(h);
        return NULL;
    }
    return h;
}

void sse_http_set_idle(sse_http *h, unsigned ms)
{
    h->idle_ms = ms;
    if (sse_timer_active(&h->idle))
        sse_timer_start(h->loop, &h->idle, h->idle_ms, 0);
}

void sse_http_free(sse_http *h)
{
    if (!h)
        return;
    while (h->all)
        release(h->all);
    curl_multi_cleanup(h->multi);   /* closes cached connections: their REMOVEs come here */
    sse_timer_stop(h->loop, &h->timer);
    sse_timer_stop(h->loop, &h->reap);
    sse_timer_stop(h->loop, &h->idle);
    while (h->socks) {
        if (!h->socks->dead)
            sse_loop_unwatch(h->loop, &h->socks->w);
        sock_free(h, h->socks);
    }
    free(h);
}

static int valid_token(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!strchr("!#$%&'*+-.^_`|~", *s) && !((*s >= '0' && *s <= '9') ||
            (*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z')))
            return 0;
    return 1;
}

/* Why a request cannot be sent, or NULL. curl would accept more (other schemes, CR/LF
 * in headers) than a caller handing us untrusted input should get. */
static const char *check_request(const sse_http_request *rq)
{
    if (!rq || !rq->url)
        return "no url";
    if (strncasecmp(rq->url, "http://", 7) != 0 && strncasecmp(rq->url, "https://", 8) != 0)
        return "url must be http:// or https://";
    if (strpbrk(rq->url, "\r\n \t"))
        return "url has white space";
    CURLU *u = curl_url();
    int bad = !u || curl_url_set(u, CURLUPART_URL, rq->url, 0) != CURLUE_OK;
    curl_url_cleanup(u);
    if (bad)
        return "malformed url";
    if (rq->method && !valid_token(rq->method))
        return "invalid method";
    for (size_t i = 0; i < rq->nheaders; i++) {
        const char *hd = rq->headers[i];
        const char *colon = hd ? strchr(hd, ':') : NULL;
        if (!colon || colon == hd || strpbrk(hd, "\r\n"))
            return "header must be \"Name: value\" without CR or LF";
    }
    if (rq->body_len && !rq->body)
        return "body_len without body";
    if (rq->timeout_ms < 0)
        return "negative timeout";
    return NULL;
}

static int set_method(CURL *e, const sse_http_request *rq)
{
    const char *m = rq->method ? rq->method : "GET";
    int rc = 0;
    if (rq->body || strcmp(m, "POST") == 0) {
        rc |= curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
        rc |= curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, rq->body ? rq->body : "");
    }
    if (strcmp(m, "HEAD") == 0)
        rc |= curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else if (strcmp(m, "POST") != 0 && !(strcmp(m, "GET") == 0 && !rq->body))
        rc |= curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m);
    return rc;
}

static int set_options(sse_http_transfer *t, const sse_http_request *rq)
{
    CURL *e = t->easy;
    int rc = 0;
    rc |= curl_easy_setopt(e, CURLOPT_URL, rq->url);
    rc |= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    rc |= curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    rc |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);    /* a loop thread takes no SIGALRM */
#if LIBCURL_VERSION_NUM >= 0x075700
    /* A transfer that ends (timeout, cancel, free) while its name is being resolved must
     * not wait for the resolver thread: without this curl joins it, and the loop stops
     * until getaddrinfo gives up (seconds, with a resolver that does not answer). The
     * thread is left to finish and free itself. An older curl ignores the option. */
    curl_easy_setopt(e, CURLOPT_QUICK_EXIT, 1L);
#endif
    rc |= curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    rc |= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->errbuf);
    rc |= curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    rc |= curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
    rc |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    rc |= curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
    rc |= curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, rq->timeout_ms);
    if (rq->max_size)   /* refuses a too long Content-Length before any body is read */
        rc |= curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)rq->max_size);
    if (rq->insecure) {
        rc |= curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        rc |= curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (rq->ca_file)
        rc |= curl_easy_setopt(e, CURLOPT_CAINFO, rq->ca_file);
    if (rq->follow_redirects) {
        rc |= curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
        rc |= curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
    }
    for (size_t i = 0; i < rq->nheaders; i++) {
        struct curl_slist *l = curl_slist_append(t->hdrs, rq->headers[i]);
        if (!l)
            return -1;
        t->hdrs = l;
    }
    if (t->hdrs)
        rc |= curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->hdrs);
    return rc | set_method(e, rq);
}

sse_http_transfer *sse_http_start(sse_http *h, const sse_http_request *rq,
                                  const sse_http_handler *cb, void *ud, const char **err)
{
    const char *why = check_request(rq);
    sse_http_transfer *t = why ? NULL : calloc(1, sizeof *t);
    if (!why && !t)
        why = "out of memory";
    if (t) {
        t->h = h;
        t->cb = *cb;
        t->ud = ud;
        t->follow = rq->follow_redirects;
        t->max_size = rq->max_size;
        t->easy = curl_easy_init();
        if (!t->easy || set_options(t, rq) != 0)
            why = "cannot set up the transfer";
        t->state = T_PENDING;
        t->next = h->all;
        if (h->all)
            h->all->prev = t;
        h->all = t;
        h->ntransfers++;
    }
    if (t)
        sse_timer_stop(h->loop, &h->idle);
    if (t && !why && h->depth == 0) {
        if (curl_multi_add_handle(h->multi, t->easy) == CURLM_OK) {
            t->added = 1;
            t->state = T_ACTIVE;
        } else {
            why = "cannot add the transfer";
        }
    } else if (t && !why) {
        h->dirty = 1;               /* inside curl or a callback: settle adds it */
    }
    if (why) {
        if (t)
            release(t);
        if (err)
            *err = why;
        return NULL;
    }
    return t;
}

void sse_http_cancel(sse_http_transfer *t)
{
    if (!t || t->state == T_DONE || t->state == T_DOOMED)
        return;
    sse_http *h = t->h;
    if (h->depth == 0) {
        release(t);
        return;
    }
    t->state = T_DOOMED;            /* its curl callbacks now refuse, settle releases it */
    h->dirty = 1;
}

size_t sse_http_transfers(const sse_http *h) { return h->ntransfers; }
size_t sse_http_watches(const sse_http *h) { return h->nwatches; }

const char *sse_http_error_kind(int err)
{
    switch (err) {
    case CURLE_OK: return NULL;
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_COULDNT_RESOLVE_HOST: case CURLE_COULDNT_RESOLVE_PROXY: return "dns";
    case CURLE_COULDNT_CONNECT: return "connect";
    case CURLE_SSL_CONNECT_ERROR: case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM: case CURLE_SSL_CIPHER: case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR: case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS: case CURLE_SSL_SHUTDOWN_FAILED: return "tls";
    case CURLE_FILESIZE_EXCEEDED: return "too_large";
    case CURLE_SSL_CRL_BADFILE: case CURLE_SSL_CLIENTCERT: return "tls";
    case CURLE_UNSUPPORTED_PROTOCOL:    /* a reply that is not HTTP (0.9), a redirect elsewhere */
    case CURLE_WEIRD_SERVER_REPLY: case CURLE_PARTIAL_FILE: case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR: case CURLE_RECV_ERROR: case CURLE_HTTP2: case CURLE_HTTP2_STREAM:
    case CURLE_TOO_MANY_REDIRECTS: case CURLE_BAD_CONTENT_ENCODING: return "http";
    default: return "other";
    }
}
