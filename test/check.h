/* The C tests' one assertion: counts, and prints a line for each failure. Each test
 * prints "<name>: N passed, N failed" at the end and exits non-zero on any failure.
 * Also what several tests check leaks with: the process's open descriptors. */
#ifndef SSE_TEST_CHECK_H
#define SSE_TEST_CHECK_H

#include <dirent.h>
#include <stdio.h>

static int passed, failed;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (cond) {                                                       \
            passed++;                                                     \
        } else {                                                          \
            failed++;                                                     \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                   \
            printf(__VA_ARGS__);                                          \
            printf("\n");                                                 \
        }                                                                 \
    } while (0)

static inline int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    for (struct dirent *e; d && (e = readdir(d));)
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

#endif
