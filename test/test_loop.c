/* C tests of the event loop: timer order and cancellation, repeating timers,
 * descriptor callbacks, and signals through signalfd. */
#include "sse_loop.h"
#include "check.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>


static sse_loop *loop;
static char order[64];
static int norder;

typedef struct { sse_timer t; char name; sse_timer *victim; } named_timer;

static void fire(sse_timer *t)
{
    named_timer *nt = (named_timer *)t;
    order[norder++] = nt->name;
    if (nt->victim)
        sse_timer_stop(loop, nt->victim);
}

static void run_for(int ms)
{
    sse_loop_now_update(loop);
    uint64_t end = sse_loop_now(loop) + (uint64_t)ms;
    while (sse_loop_now(loop) < end) {
        int wait = (int)(end - sse_loop_now(loop));
        int t = sse_loop_next_timeout(loop);
        sse_loop_poll(loop, (t >= 0 && t < wait ? t : wait) * 1000);
    }
}

static void test_timer_order(void)
{
    named_timer t[6];
    const char *names = "abcdef";
    const int after[] = { 30, 10, 20, 10, 50, 40 };
    norder = 0;
    for (int i = 0; i < 6; i++) {
        sse_timer_init(&t[i].t, fire);
        t[i].name = names[i];
        t[i].victim = NULL;
        sse_timer_start(loop, &t[i].t, (uint64_t)after[i], 0);
    }
    t[1].victim = &t[4].t;      /* b stops e before it fires */
    sse_timer_stop(loop, &t[5].t);
    run_for(80);
    order[norder] = '\0';
    /* b and d are due together: either order is right. */
    int ok = norder == 4 && (strcmp(order, "bdca") == 0 || strcmp(order, "dbca") == 0);
    CHECK(ok, "fired in due order, stopped ones never: got '%s'", order);
    CHECK(sse_loop_next_timeout(loop) == -1, "no timer left: %d", sse_loop_next_timeout(loop));
}

static int ticks;
static void tick(sse_timer *t)
{
    if (++ticks == 5)
        sse_timer_stop(loop, t);
}

static void test_repeat(void)
{
    sse_timer t;
    sse_timer_init(&t, tick);
    ticks = 0;
    sse_timer_start(loop, &t, 5, 5);
    run_for(100);
    CHECK(ticks == 5, "a repeating timer stops itself after 5 ticks: %d", ticks);
    CHECK(!sse_timer_active(&t), "stopped from its own callback");
}

static int readable;
static void on_read(sse_watch *w, uint32_t ev)
{
    char c;
    if (read(w->fd, &c, 1) == 1)
        readable++;
}

static void test_watch(void)
{
    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    sse_watch w = { p[0], on_read };
    CHECK(sse_loop_watch(loop, &w, EPOLLIN) == 0, "watch");
    CHECK(write(p[1], "x", 1) == 1, "write");
    readable = 0;
    sse_loop_poll(loop, 100000);
    CHECK(readable == 1, "callback ran for a readable fd: %d", readable);
    CHECK(sse_loop_unwatch(loop, &w) == 0, "unwatch");
    CHECK(write(p[1], "y", 1) == 1, "write");
    sse_loop_poll(loop, 20000);
    CHECK(readable == 1, "no callback once unwatched: %d", readable);
    close(p[0]);
    close(p[1]);
}

static int writable;
static void on_write(sse_watch *w, uint32_t ev)
{
    if (ev & EPOLLOUT)
        writable++;
    if (ev & EPOLLIN)
        on_read(w, ev);
}

/* A socket moves between "wants to read" and "wants to write" with one call. */
static void test_rewatch(void)
{
    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    sse_watch w = { p[1], on_write };
    CHECK(sse_loop_watch(loop, &w, EPOLLIN) == 0, "watch the write end for input");
    writable = 0;
    sse_loop_poll(loop, 20000);
    CHECK(writable == 0, "no output event while only input is watched: %d", writable);
    CHECK(sse_loop_rewatch(loop, &w, EPOLLOUT) == 0, "rewatch for output");
    sse_loop_poll(loop, 100000);
    CHECK(writable == 1, "an empty pipe is writable once rewatched: %d", writable);
    CHECK(sse_loop_rewatch(loop, &w, 0) == 0, "rewatch for nothing");
    sse_loop_poll(loop, 20000);
    CHECK(writable == 1, "no event with no events asked: %d", writable);
    CHECK(sse_loop_unwatch(loop, &w) == 0, "unwatch");
    sse_watch never = { p[0], on_write };
    CHECK(sse_loop_rewatch(loop, &never, EPOLLIN) == -ENOENT, "rewatch of an unwatched fd: -ENOENT");
    close(p[0]);
    close(p[1]);
}

static int got_signal;
static void on_sig(void *ud, int signo) { got_signal = signo; }

static void test_signals(void)
{
    CHECK(sse_loop_catch_signals(loop, 1, on_sig, NULL) == 0, "catch");
    kill(getpid(), SIGTERM);
    sse_loop_poll(loop, 100000);
    CHECK(got_signal == SIGTERM, "SIGTERM delivered as a callback: %d", got_signal);
    CHECK(sse_loop_catch_signals(loop, 0, NULL, NULL) == 0, "release");
    sigset_t now;
    sigprocmask(SIG_BLOCK, NULL, &now);
    CHECK(!sigismember(&now, SIGTERM), "mask restored");
}

/* Issue 8, defect 5: a timer that re-arms itself for 0 ms ran again in the same pass,
 * forever, so one poll never returned to I/O. Now each poll runs it once. */
static int rearms;
static sse_timer rearm_t, other_t;
static int other_ran;

static void rearm(sse_timer *t)
{
    rearms++;
    if (rearms < 1000)
        sse_timer_start(loop, t, 0, 0);
}

static void other(sse_timer *t) { other_ran++; }

static void test_zero_rearm_waits_for_next_turn(void)
{
    rearms = other_ran = 0;
    sse_timer_init(&rearm_t, rearm);
    sse_timer_init(&other_t, other);
    sse_timer_start(loop, &rearm_t, 0, 0);
    sse_timer_start(loop, &other_t, 0, 0);
    sse_loop_poll(loop, 0);
    CHECK(rearms == 1, "one poll ran the re-arming timer once: %d", rearms);
    CHECK(other_ran == 1, "the timer due with it ran in the same pass: %d", other_ran);
    CHECK(sse_loop_next_timeout(loop) == 0, "the re-armed timer is due at once");
    sse_loop_poll(loop, 0);
    CHECK(rearms == 2, "the next poll ran it again: %d", rearms);
    sse_timer_stop(loop, &rearm_t);
}

int main(void)
{
    loop = sse_loop_new();
    test_timer_order();
    test_repeat();
    test_watch();
    test_rewatch();
    test_signals();
    test_zero_rearm_waits_for_next_turn();
    sse_loop_free(loop);
    printf("test_loop: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
