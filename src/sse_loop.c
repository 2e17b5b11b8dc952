#include "sse_loop.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#define SSE_LOOP_EVENTS 256

struct sse_loop {
    int        epfd;
    uint64_t   now;
    sse_timer **heap;     /* min-heap on (due, seq) */
    uint64_t   armed;     /* timers started so far: the next one's seq */
    unsigned   ntimers;
    unsigned   heapcap;
    /* signals */
    sse_watch  sigwatch;
    sigset_t   oldmask;
    sse_signal_cb sigcb;
    void      *sigud;
    struct epoll_event events[SSE_LOOP_EVENTS];
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

sse_loop *sse_loop_new(void)
{
    sse_loop *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (l->epfd < 0) {
        int e = errno;
        free(l);
        errno = e;
        return NULL;
    }
    l->sigwatch.fd = -1;
    l->now = mono_ms();
    return l;
}

void sse_loop_free(sse_loop *l)
{
    if (!l)
        return;
    if (l->sigwatch.fd >= 0)
        sse_loop_catch_signals(l, 0, NULL, NULL);
    for (unsigned i = 0; i < l->ntimers; i++)
        l->heap[i]->slot = SSE_TIMER_IDLE;
    close(l->epfd);
    free(l->heap);
    free(l);
}

int sse_loop_forked(sse_loop *l)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0)
        return -errno;
    close(l->epfd);
    l->epfd = fd;
    return 0;
}

uint64_t sse_loop_now(const sse_loop *l) { return l->now; }
int sse_loop_fd(const sse_loop *l) { return l->epfd; }
void sse_loop_now_update(sse_loop *l) { l->now = mono_ms(); }

int sse_loop_watch(sse_loop *l, sse_watch *w, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = w };
    return epoll_ctl(l->epfd, EPOLL_CTL_ADD, w->fd, &ev) == 0 ? 0 : -errno;
}

int sse_loop_unwatch(sse_loop *l, sse_watch *w)
{
    return epoll_ctl(l->epfd, EPOLL_CTL_DEL, w->fd, NULL) == 0 ? 0 : -errno;
}

int sse_loop_rewatch(sse_loop *l, sse_watch *w, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = w };
    return epoll_ctl(l->epfd, EPOLL_CTL_MOD, w->fd, &ev) == 0 ? 0 : -errno;
}

/* ---- timers: a binary min-heap; each timer knows its slot so stop is O(log n) ---- */

void sse_timer_init(sse_timer *t, sse_timer_cb cb)
{
    memset(t, 0, sizeof *t);
    t->slot = SSE_TIMER_IDLE;
    t->cb = cb;
}

/* Earlier due first; equal dues in the order they were started, so a timer started for
 * "now" during a pass sorts after every timer that was already due. */
static int earlier(const sse_timer *a, const sse_timer *b)
{
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_set(sse_loop *l, unsigned i, sse_timer *t)
{
    l->heap[i] = t;
    t->slot = i;
}

static void sift_up(sse_loop *l, unsigned i)
{
    sse_timer *t = l->heap[i];
    while (i > 0) {
        unsigned parent = (i - 1) / 2;
        if (!earlier(t, l->heap[parent]))
            break;
        heap_set(l, i, l->heap[parent]);
        i = parent;
    }
    heap_set(l, i, t);
}

static void sift_down(sse_loop *l, unsigned i)
{
    sse_timer *t = l->heap[i];
    for (;;) {
        unsigned c = 2 * i + 1;
        if (c >= l->ntimers)
            break;
        if (c + 1 < l->ntimers && earlier(l->heap[c + 1], l->heap[c]))
            c++;
        if (!earlier(l->heap[c], t))
            break;
        heap_set(l, i, l->heap[c]);
        i = c;
    }
    heap_set(l, i, t);
}

static void heap_remove(sse_loop *l, sse_timer *t)
{
    unsigned i = t->slot;
    t->slot = SSE_TIMER_IDLE;
    l->ntimers--;
    if (i == l->ntimers)
        return;
    sse_timer *moved = l->heap[l->ntimers];
    heap_set(l, i, moved);
    sift_up(l, i);
    sift_down(l, moved->slot);
}

int sse_timer_start(sse_loop *l, sse_timer *t, uint64_t after_ms, uint64_t repeat_ms)
{
    if (sse_timer_active(t))
        heap_remove(l, t);
    if (l->ntimers == l->heapcap) {
        unsigned ncap = l->heapcap ? l->heapcap * 2 : 64;
        sse_timer **h = realloc(l->heap, ncap * sizeof *h);
        if (!h)
            return -ENOMEM;
        l->heap = h;
        l->heapcap = ncap;
    }
    t->due = l->now + after_ms;
    t->seq = l->armed++;
    t->repeat = repeat_ms;
    heap_set(l, l->ntimers++, t);
    sift_up(l, t->slot);
    return 0;
}

void sse_timer_stop(sse_loop *l, sse_timer *t)
{
    if (sse_timer_active(t))
        heap_remove(l, t);
}

int sse_loop_next_timeout(const sse_loop *l)
{
    if (l->ntimers == 0)
        return -1;
    uint64_t now = mono_ms();
    uint64_t due = l->heap[0]->due;
    if (due <= now)
        return 0;
    uint64_t d = due - now;
    return d > 86400000u ? 86400000 : (int)d;
}

static int run_timers(sse_loop *l)
{
    int ran = 0;
    /* Only timers started before this pass run in it: one started (or re-armed) by a
     * callback, even for 0 ms, waits for the next turn, after I/O, so a timer that
     * re-arms itself at once cannot starve the descriptors. Such a timer is never due
     * earlier than `now`, so it sorts after every timer of this pass. */
    uint64_t now = l->now;
    uint64_t first_new = l->armed;
    while (l->ntimers && l->heap[0]->due <= now && l->heap[0]->seq < first_new) {
        sse_timer *t = l->heap[0];
        heap_remove(l, t);
        if (t->repeat) {
            /* Re-arm before the callback so it may stop or restart the timer. */
            uint64_t due = t->due + t->repeat;
            sse_timer_start(l, t, due > now ? due - now : 0, t->repeat);
        }
        t->cb(t);
        ran++;
    }
    return ran;
}

int64_t sse_loop_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int sse_loop_poll(sse_loop *l, int64_t timeout_us)
{
    int n;
    if (timeout_us < 0) {
        n = epoll_wait(l->epfd, l->events, SSE_LOOP_EVENTS, -1);
    } else {
        /* Microseconds matter: the server batches sends in windows shorter than 1 ms. */
        struct timespec ts = { (time_t)(timeout_us / 1000000), (long)(timeout_us % 1000000) * 1000 };
        n = epoll_pwait2(l->epfd, l->events, SSE_LOOP_EVENTS, &ts, NULL);
        if (n < 0 && errno == ENOSYS)   /* kernels before 5.11 */
            n = epoll_wait(l->epfd, l->events, SSE_LOOP_EVENTS, (int)((timeout_us + 999) / 1000));
    }
    l->now = mono_ms();
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        sse_watch *w = l->events[i].data.ptr;
        w->cb(w, l->events[i].events);
    }
    return n + run_timers(l);
}

/* ---- signals ---- */

static void on_signalfd(sse_watch *w, uint32_t events)
{
    sse_loop *l = (sse_loop *)((char *)w - offsetof(sse_loop, sigwatch));
    struct signalfd_siginfo si;
    while (read(w->fd, &si, sizeof si) == (ssize_t)sizeof si)
        if (l->sigcb)
            l->sigcb(l->sigud, (int)si.ssi_signo);
}

int sse_loop_catch_signals(sse_loop *l, int enable, sse_signal_cb cb, void *ud)
{
    if (!enable) {
        if (l->sigwatch.fd < 0)
            return 0;
        sse_loop_unwatch(l, &l->sigwatch);
        close(l->sigwatch.fd);
        l->sigwatch.fd = -1;
        sigprocmask(SIG_SETMASK, &l->oldmask, NULL);
        return 0;
    }
    l->sigcb = cb;
    l->sigud = ud;
    if (l->sigwatch.fd >= 0)
        return 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &set, &l->oldmask) != 0)
        return -errno;
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        sigprocmask(SIG_SETMASK, &l->oldmask, NULL);
        return -e;
    }
    l->sigwatch.fd = fd;
    l->sigwatch.cb = on_signalfd;
    int rc = sse_loop_watch(l, &l->sigwatch, EPOLLIN);
    if (rc) {
        close(fd);
        l->sigwatch.fd = -1;
        sigprocmask(SIG_SETMASK, &l->oldmask, NULL);
    }
    return rc;
}
