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

/* In the parent: forks the workers and supervises them until SIGTERM or SIGINT, then
 * stops them. 0, or -errno when not even the first worker could be forked. Signals are
 * blocked in the parent meanwhile and restored (in the workers too) before it returns. */
int sse_workers_supervise(const sse_workers_config *cfg);

/* The number of CPUs this process may run on ("auto"). */
unsigned sse_workers_cpus(void);

#endif
