/* The C tests' one assertion: counts, and prints a line for each failure. Each test
 * prints "<name>: N passed, N failed" at the end and exits non-zero on any failure. */
#ifndef SSE_TEST_CHECK_H
#define SSE_TEST_CHECK_H

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

#endif
