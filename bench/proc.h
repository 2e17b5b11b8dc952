/* What the bench programs read of the server process from /proc (loadgen, churn). */
#ifndef BENCH_PROC_H
#define BENCH_PROC_H

#include <stdio.h>

/* The process's resident memory in KB (VmRSS), or -1. */
static long proc_rss_kb(int pid)
{
    char path[64], line[256];
    long kb = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

#endif
