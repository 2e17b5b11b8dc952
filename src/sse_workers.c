/* sse_workers: the supervisor (sse_workers.h). */
#include "sse_workers.h"
#include "sse_log.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RESTART_MAX_MS 5000
#define READY_WAIT_MS 10000
#define QUICK_DEATH_MS 1000
#define GRACE_MS 1000

typedef struct worker {
    pid_t    pid;          /* 0: not running */
    int64_t  started_ms;
    int64_t  restart_at;   /* ms; when not running */
    unsigned pause_ms;     /* the next restart's pause, while it keeps dying young */
} worker;

struct sse_workers {
    sse_workers_config cfg;
    worker            *ws;
    sigset_t           set, old;
};

/* In a worker started by sse_workers_start: where to say it is ready (-1: nobody asks). */
static int ready_fd = -1;

void sse_workers_ready(void)
{
    if (ready_fd >= 0) {
        char one = 1;
        ssize_t n = write(ready_fd, &one, 1);
        (void)n;
        close(ready_fd);
        ready_fd = -1;
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wlog(const sse_workers_config *cfg, int level, const char *fmt, ...)
{
    if (!cfg->log)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cfg->log(cfg->ud, level, msg);
}

static int start(const sse_workers_config *cfg, worker *w, unsigned index, const sigset_t *old,
                 int ready[2])
{
    fflush(NULL);                 /* nothing buffered is written twice */
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, old, NULL);
        if (ready) {
            close(ready[0]);
            ready_fd = ready[1];
        }
        int status = cfg->run(cfg->ud, index);
        fflush(NULL);
        _exit(status);            /* not exit(): the parent's atexit work is the parent's */
    }
    w->pid = pid;
    w->started_ms = now_ms();
    if (cfg->started)
        cfg->started(cfg->ud, index, pid);
    return 0;
}

static void describe(int status, char *out, size_t len)
{
    if (WIFEXITED(status))
        snprintf(out, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, len, "was killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(out, len, "ended (status %d)", status);
}

/* Collects the workers that have ended: 1 if any did. */
static int reap(const sse_workers_config *cfg, worker *ws, int stopping)
{
    int any = 0, status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (unsigned i = 0; i < cfg->n; i++) {
            worker *w = &ws[i];
            if (w->pid != pid)
                continue;
            any = 1;
            w->pid = 0;
            if (stopping)
                break;
            char what[96];
            describe(status, what, sizeof what);
            int64_t lived = now_ms() - w->started_ms;
            w->pause_ms = lived < QUICK_DEATH_MS
                ? (w->pause_ms ? (w->pause_ms * 2 > RESTART_MAX_MS ? RESTART_MAX_MS : w->pause_ms * 2) : 100)
                : 0;
            w->restart_at = now_ms() + w->pause_ms;
            wlog(cfg, SSE_LOG_WARN, "worker %u (pid %d) %s: restarting it%s", i + 1, (int)pid, what,
                 w->pause_ms ? " after a pause" : "");
            break;
        }
    }
    return any;
}

static unsigned running(const sse_workers_config *cfg, const worker *ws)
{
    unsigned n = 0;
    for (unsigned i = 0; i < cfg->n; i++)
        n += ws[i].pid != 0;
    return n;
}

static void stop_all(const sse_workers_config *cfg, worker *ws, const sigset_t *set)
{
    for (unsigned i = 0; i < cfg->n; i++)
        if (ws[i].pid)
            kill(ws[i].pid, SIGTERM);
    int64_t deadline = now_ms() + cfg->drain_ms + GRACE_MS;
    int killed = 0;
    while (running(cfg, ws)) {
        reap(cfg, ws, 1);
        if (!running(cfg, ws))
            break;
        if (now_ms() >= deadline && !killed) {
            wlog(cfg, SSE_LOG_WARN, "workers still running %u ms after SIGTERM: killing them", cfg->drain_ms + GRACE_MS);
            for (unsigned i = 0; i < cfg->n; i++)
                if (ws[i].pid)
                    kill(ws[i].pid, SIGKILL);
            killed = 1;
        }
        struct timespec ts = { 0, 50 * 1000000L };
        sigtimedwait(set, NULL, &ts);   /* SIGCHLD, or another SIGTERM: just look again */
    }
}

/* Drops the SIGCHLDs of workers that ended, before the mask is restored. */
static void drain_sigchld(void)
{
    struct timespec zero = { 0, 0 };
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    while (sigtimedwait(&chld, NULL, &zero) > 0) {
    }
}

static void finish(sse_workers *w)
{
    drain_sigchld();
    sigprocmask(SIG_SETMASK, &w->old, NULL);
    free(w->ws);
    free(w);
}

sse_workers *sse_workers_start(const sse_workers_config *cfg, int *err)
{
    *err = -EINVAL;
    if (cfg->n < 1 || !cfg->run)
        return NULL;
    sse_workers *w = calloc(1, sizeof *w);
    worker *ws = w ? calloc(cfg->n, sizeof *ws) : NULL;
    int ready[2] = { -1, -1 };
    if (!ws || pipe2(ready, O_CLOEXEC) != 0) {
        *err = ws ? -errno : -ENOMEM;
        free(ws);
        free(w);
        return NULL;
    }
    w->cfg = *cfg;
    w->ws = ws;
    sigemptyset(&w->set);
    sigaddset(&w->set, SIGCHLD);
    sigaddset(&w->set, SIGTERM);
    sigaddset(&w->set, SIGINT);
    sigprocmask(SIG_BLOCK, &w->set, &w->old);
    int rc = 0;
    for (unsigned i = 0; i < cfg->n && !rc; i++)
        rc = start(cfg, &ws[i], i + 1, &w->old, ready);
    close(ready[1]);
    /* Each worker writes one byte once it listens; one that ends first closes its end,
     * and when every end is closed the read sees EOF. */
    unsigned n = 0;
    int64_t deadline = now_ms() + READY_WAIT_MS;
    while (!rc && n < cfg->n) {
        struct pollfd p = { .fd = ready[0], .events = POLLIN };
        if (now_ms() >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
        if (poll(&p, 1, 100) > 0) {
            char buf[64];
            ssize_t got = read(ready[0], buf, sizeof buf);
            if (got > 0)
                n += (unsigned)got;
        }
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {             /* a worker ended before it was serving */
            for (unsigned i = 0; i < cfg->n; i++)
                if (ws[i].pid == pid)
                    ws[i].pid = 0;
            rc = -ECHILD;
        }
    }
    close(ready[0]);
    if (rc) {
        wlog(cfg, SSE_LOG_ERROR, "workers: %s", rc == -ECHILD ? "a worker ended before it listened"
             : rc == -ETIMEDOUT ? "the workers did not listen within 10 s" : strerror(-rc));
        stop_all(cfg, ws, &w->set);
        finish(w);
        *err = rc;
        return NULL;
    }
    wlog(cfg, SSE_LOG_INFO, "%u workers serving", cfg->n);
    return w;
}

int sse_workers_supervise(sse_workers *w)
{
    const sse_workers_config *cfg = &w->cfg;
    worker *ws = w->ws;
    for (;;) {
        int64_t next = -1;
        for (unsigned i = 0; i < cfg->n; i++)
            if (!ws[i].pid && (next < 0 || ws[i].restart_at < next))
                next = ws[i].restart_at;
        int64_t wait = next < 0 ? 1000 : next - now_ms();
        if (wait < 0)
            wait = 0;
        struct timespec ts = { (time_t)(wait / 1000), (long)(wait % 1000) * 1000000L };
        siginfo_t info;
        int sig = sigtimedwait(&w->set, &info, &ts);
        if (sig == SIGTERM || sig == SIGINT) {
            wlog(cfg, SSE_LOG_INFO, "stopping %u workers (%s)", running(cfg, ws), strsignal(sig));
            stop_all(cfg, ws, &w->set);
            break;
        }
        reap(cfg, ws, 0);
        int64_t now = now_ms();
        for (unsigned i = 0; i < cfg->n; i++) {
            if (ws[i].pid || ws[i].restart_at > now)
                continue;
            if (start(cfg, &ws[i], i + 1, &w->old, NULL) != 0) {
                ws[i].pause_ms = ws[i].pause_ms ? ws[i].pause_ms : 100;
                ws[i].restart_at = now + ws[i].pause_ms;
            }
        }
    }
    finish(w);
    return 0;
}

unsigned sse_workers_cpus(void)
{
    cpu_set_t cs;
    if (sched_getaffinity(0, sizeof cs, &cs) == 0 && CPU_COUNT(&cs) > 0)
        return (unsigned)CPU_COUNT(&cs);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}
