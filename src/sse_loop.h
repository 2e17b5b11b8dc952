/* sse_loop: the event loop (in the spirit of Redis's ae): one epoll instance for file
 * descriptors, a binary heap of millisecond timers, and optionally a signalfd.
 * Watches and timers are embedded in their owners' structs (container_of style), so the
 * loop allocates nothing per watch or timer. Plain C, no Lua, single-threaded.
 */
#ifndef SSE_LOOP_H
#define SSE_LOOP_H

#include <stdint.h>

typedef struct sse_loop sse_loop;

typedef struct sse_watch sse_watch;
typedef void (*sse_watch_cb)(sse_watch *w, uint32_t events);
struct sse_watch {
    int          fd;
    sse_watch_cb cb;
};

typedef struct sse_timer sse_timer;
typedef void (*sse_timer_cb)(sse_timer *t);
struct sse_timer {
    uint64_t     due;       /* loop clock, ms */
    uint64_t     repeat;    /* ms; 0 = one shot */
    uint64_t     seq;       /* when it was started: orders equal dues */
    unsigned     slot;      /* index in the heap; SSE_TIMER_IDLE when not scheduled */
    sse_timer_cb cb;
};
#define SSE_TIMER_IDLE 0xffffffffu

sse_loop *sse_loop_new(void);          /* NULL with errno set */
void      sse_loop_free(sse_loop *l);  /* watches and timers must be gone (they are not freed) */
/* In a child after fork(): an epoll instance of its own (the parent's is shared with
 * it, and so with every sibling). Only while nothing is watched: timers stay. 0 or -errno. */
int       sse_loop_forked(sse_loop *l);

/* Millisecond monotonic clock, refreshed at each poll (sse_loop_now_update forces it). */
uint64_t sse_loop_now(const sse_loop *l);
void     sse_loop_now_update(sse_loop *l);

int sse_loop_watch(sse_loop *l, sse_watch *w, uint32_t events);   /* EPOLL_CTL_ADD; 0 or -errno */
int sse_loop_unwatch(sse_loop *l, sse_watch *w);                  /* EPOLL_CTL_DEL; 0 or -errno */
/* Changes the events of a watched descriptor (EPOLL_CTL_MOD; 0 or -errno): a client such
 * as libcurl switches a socket between reading and writing without a DEL/ADD pair. */
int sse_loop_rewatch(sse_loop *l, sse_watch *w, uint32_t events);

void sse_timer_init(sse_timer *t, sse_timer_cb cb);
/* (Re)schedules t to fire after `after_ms`, then every `repeat_ms` if non-zero. */
int  sse_timer_start(sse_loop *l, sse_timer *t, uint64_t after_ms, uint64_t repeat_ms);
void sse_timer_stop(sse_loop *l, sse_timer *t);
static inline int sse_timer_active(const sse_timer *t) { return t->slot != SSE_TIMER_IDLE; }

/* The epoll descriptor: readable when a watched descriptor is ready (a host loop waits
 * on it, with sse_loop_next_timeout for the timers, then polls with timeout 0). */
int sse_loop_fd(const sse_loop *l);

/* Milliseconds until the next timer is due (0 if overdue), or -1 with no timer. */
int sse_loop_next_timeout(const sse_loop *l);

/* Waits up to timeout_us microseconds (-1: until something happens), runs the callbacks
 * of ready descriptors, then of every due timer. Returns the number of callbacks run or
 * -errno. EINTR counts as 0. A callback may stop or start any timer and unwatch any
 * descriptor except one whose event is later in the same batch and whose memory it frees. */
int sse_loop_poll(sse_loop *l, int64_t timeout_us);

/* Monotonic clock in microseconds (not cached). */
int64_t sse_loop_now_us(void);

/* SIGINT/SIGTERM: when enabled they are blocked and delivered through a signalfd as
 * cb(signo); disabling restores the previous mask. 0 or -errno. */
typedef void (*sse_signal_cb)(void *ud, int signo);
int sse_loop_catch_signals(sse_loop *l, int enable, sse_signal_cb cb, void *ud);

#endif
