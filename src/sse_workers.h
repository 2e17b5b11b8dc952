/* sse_workers: N worker processes sharing one port, supervised by the parent. Plain C.
 *
 * The parent forks the workers and then only supervises: it restarts one that dies
 * (after a pause that grows, up to 5 s, while workers die within a second of starting),
 * and on SIGTERM or SIGINT sends SIGTERM to every worker (each drains its streams as a
 * single process does), waits for them at most drain_ms plus a grace second, then
 * SIGKILLs what is left. Each worker runs cfg->run(ud, index) and exits with its value.
 * The port is shared with SO_REUSEPORT: each worker opens its own listening socket, and
 * the kernel spreads new connections over them. */
#ifndef SSE_WORKERS_H
#define SSE_WORKERS_H

#include <sys/types.h>

typedef struct sse_workers_config {
    unsigned n;                                   /* at least 1 */
    unsigned drain_ms;                            /* a worker's time to stop after SIGTERM */
    int  (*run)(void *ud, unsigned index);        /* in the worker (index 1..n) */
    void (*log)(void *ud, int level, const char *msg);
    void (*started)(void *ud, unsigned index, pid_t pid);   /* optional, in the parent */
    void  *ud;
} sse_workers_config;

/* In the parent: forks the workers and returns once each has called sse_workers_ready
 * (it is serving) or ended, at most 10 s. NULL with *err (-errno, or -ECHILD when a
 * worker ended before it was ready) on failure; the workers started are stopped then.
 * Signals (SIGCHLD, SIGTERM, SIGINT) stay blocked in the parent until supervise returns. */
typedef struct sse_workers sse_workers;
sse_workers *sse_workers_start(const sse_workers_config *cfg, int *err);
/* Supervises them until SIGTERM or SIGINT, then stops them; frees w. 0 or -errno. */
int  sse_workers_supervise(sse_workers *w);
/* In a worker, once it listens: tells the parent. */
void sse_workers_ready(void);

/* The number of CPUs this process may run on ("auto"). */
unsigned sse_workers_cpus(void);

#endif
