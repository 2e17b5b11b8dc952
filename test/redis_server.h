/* redis-server processes for the C tests that need a real one (test_redis.c,
 * test_broker.c): whether one is installed, a free loopback port, and a server started on
 * it as a child (killed with the test if the test dies) and stopped by PID. */
#ifndef TEST_REDIS_SERVER_H
#define TEST_REDIS_SERVER_H

#include "sse_loop.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

/* Is redis-server on the PATH? (The tests say SKIPPED and pass when it is not.) */
static int redis_installed(void)
{
    const char *path = getenv("PATH");
    char d[4096], file[4200];
    while (path && *path) {
        size_t n = strcspn(path, ":");
        snprintf(d, sizeof d, "%.*s", (int)n, path);
        snprintf(file, sizeof file, "%s/redis-server", *d ? d : ".");
        if (access(file, X_OK) == 0)
            return 1;
        path += n + (path[n] == ':');
    }
    return 0;
}

/* A loopback port nobody listens on now (-1 on failure). */
static int redis_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    int p = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &al) == 0)
        p = ntohs(a.sin_port);
    close(fd);
    return p;
}

/* PING with a blocking socket of the test's own (never the loop's): the reply's first
 * bytes in out, or -1. */
static int redis_ping(int port, char *out, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct timeval tv = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int n = -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        send(fd, "PING\r\n", 6, MSG_NOSIGNAL) == 6) {
        ssize_t r = recv(fd, out, cap - 1, 0);
        if (r > 0) {
            out[r] = '\0';
            n = (int)r;
        }
    }
    close(fd);
    return n;
}

/* Starts redis-server on port, without persistence unless extra (a NULL-terminated list
 * of "--name", "value" words, at most 16) says otherwise; waits (10 s at most) until it
 * answers PING (or NOAUTH, with requirepass). -1 on failure. */
static pid_t redis_start(int port, const char *const *extra)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);   /* a test that crashes takes its servers along */
        int nul = open("/dev/null", O_RDWR);
        dup2(nul, 1);
        dup2(nul, 2);
        const char *argv[32] = { "redis-server", "--port", ps, "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                                 "--protected-mode", "no" };
        int k = 13;
        for (int i = 0; extra && extra[i] && k < 30; i++)
            argv[k++] = extra[i];   /* later words win: "--appendonly yes" overrides */
        argv[k] = NULL;
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    int64_t end = sse_loop_now_us() + 10000000;
    char buf[256];
    while (sse_loop_now_us() < end) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return -1;
        if (redis_ping(port, buf, sizeof buf) > 0 &&
            (strncmp(buf, "+PONG", 5) == 0 || strncmp(buf, "-NOAUTH", 7) == 0))
            return pid;
        usleep(10000);              /* polling a child we started, not the code under test */
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

static void redis_stop(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

#endif
