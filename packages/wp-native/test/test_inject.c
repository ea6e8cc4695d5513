/*
 * vmsnap_inject.h against real processes: a userfaultfd taken from a child
 * that is (a) spinning in user code with every general register holding a
 * pattern it checks (the poked-syscall path), (b) blocked in read(2), which
 * must complete normally afterwards (the interrupted-syscall path); the
 * child keeps no uffd of its own; (c) a child already traced by another
 * process is refused with -EPERM and runs on. Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "vmsnap_inject.h"
#include "vmsnap_engine.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop_flag;

static void on_usr1(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* Spins with known values in 14 registers; returns 1 if any ever changed. */
static long spin_checking_registers(void)
{
    long bad;
    __asm__ volatile(
        "movabs $0x1111111111111111, %%rbx\n movabs $0x2222222222222222, %%rcx\n"
        "movabs $0x3333333333333333, %%rdx\n movabs $0x4444444444444444, %%rsi\n"
        "movabs $0x5555555555555555, %%rdi\n movabs $0x6666666666666666, %%r8\n"
        "movabs $0x7777777777777777, %%r9\n movabs $0x8888888888888888, %%r10\n"
        "movabs $0x9999999999999999, %%r11\n movabs $0xaaaaaaaaaaaaaaaa, %%r12\n"
        "movabs $0xbbbbbbbbbbbbbbbb, %%r13\n movabs $0xcccccccccccccccc, %%r14\n"
        "movabs $0xdddddddddddddddd, %%r15\n"
        "1:\n"
        "cmpl $0, %[flag]\n jne 2f\n"
        "movabs $0x1111111111111111, %%rax\n cmp %%rax, %%rbx\n jne 3f\n"
        "movabs $0x2222222222222222, %%rax\n cmp %%rax, %%rcx\n jne 3f\n"
        "movabs $0x3333333333333333, %%rax\n cmp %%rax, %%rdx\n jne 3f\n"
        "movabs $0x4444444444444444, %%rax\n cmp %%rax, %%rsi\n jne 3f\n"
        "movabs $0x5555555555555555, %%rax\n cmp %%rax, %%rdi\n jne 3f\n"
        "movabs $0x6666666666666666, %%rax\n cmp %%rax, %%r8\n jne 3f\n"
        "movabs $0x7777777777777777, %%rax\n cmp %%rax, %%r9\n jne 3f\n"
        "movabs $0x8888888888888888, %%rax\n cmp %%rax, %%r10\n jne 3f\n"
        "movabs $0x9999999999999999, %%rax\n cmp %%rax, %%r11\n jne 3f\n"
        "movabs $0xaaaaaaaaaaaaaaaa, %%rax\n cmp %%rax, %%r12\n jne 3f\n"
        "movabs $0xbbbbbbbbbbbbbbbb, %%rax\n cmp %%rax, %%r13\n jne 3f\n"
        "movabs $0xcccccccccccccccc, %%rax\n cmp %%rax, %%r14\n jne 3f\n"
        "movabs $0xdddddddddddddddd, %%rax\n cmp %%rax, %%r15\n jne 3f\n"
        "jmp 1b\n"
        "3: mov $1, %%rax\n jmp 4f\n"
        "2: xor %%eax, %%eax\n"
        "4:\n"
        : "=a"(bad)
        : [flag] "m"(stop_flag)
        : "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "cc", "memory");
    return bad;
}

static int fail(const char *what, long rc)
{
    fprintf(stderr, "FAIL: %s (%ld: %s)\n", what, rc, rc < 0 ? strerror((int)-rc) : "");
    return 1;
}

/* Descriptors of pid that are userfaultfds. */
static int count_uffds(pid_t pid)
{
    char dir[64], path[384], link[128];
    snprintf(dir, sizeof dir, "/proc/%d/fd", pid);
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        ssize_t len = readlink(path, link, sizeof link - 1);
        if (len > 0 && (link[len] = 0, strstr(link, "userfaultfd")))
            n++;
    }
    if (d)
        closedir(d);
    return n;
}

/* Freeze, take a uffd, check it, thaw. */
static int take(pid_t pid)
{
    int32_t err;
    vi_target *t = vi_open(pid, &err);
    if (!t)
        return fail("vi_open", err);
    int rc = vi_freeze(t, 2000);
    if (rc < 1)
        return fail("vi_freeze", rc);
    int uffd = vi_take_uffd(t, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return fail("vi_take_uffd", uffd);
    if (count_uffds(pid) != 0)
        return fail("the target still holds a userfaultfd", count_uffds(pid));
    if ((rc = wp_uffd_negotiate(uffd)) < 0)
        return fail("UFFDIO_API on the taken fd", rc);
    vi_close(t);
    close(uffd);
    return 0;
}

static int test_spinning(void)
{
    pid_t child = fork();
    if (child == 0) {
        signal(SIGUSR1, on_usr1);
        _exit(spin_checking_registers() ? 4 : 0);
    }
    usleep(50000);
    for (int i = 0; i < 3; i++) /* three times: a stale stop would show */
        if (take(child))
            return 1;
    usleep(50000);
    kill(child, SIGUSR1);
    int status;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return fail("spinning child: registers changed or it died (status)", status);
    return 0;
}

static int test_blocked_read(void)
{
    int p[2];
    if (pipe(p) < 0)
        return fail("pipe", -errno);
    pid_t child = fork();
    if (child == 0) {
        close(p[1]);
        char c;
        ssize_t n = read(p[0], &c, 1);
        _exit(n == 1 && c == 'x' ? 0 : n < 0 && errno == EINTR ? 3 : 5);
    }
    close(p[0]);
    usleep(50000);
    if (take(child))
        return 1;
    usleep(20000);
    if (write(p[1], "x", 1) != 1)
        return fail("write", -errno);
    int status;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return fail("blocked child: read did not complete normally (status)", status);
    close(p[1]);
    return 0;
}

static int test_other_tracer(void)
{
    pid_t target = fork();
    if (target == 0) {
        for (;;)
            pause();
    }
    int ready[2];
    if (pipe(ready) < 0)
        return fail("pipe", -errno);
    pid_t tracer = fork();
    if (tracer == 0) {
        if (ptrace(PTRACE_SEIZE, target, 0, 0) < 0)
            _exit(1);
        if (write(ready[1], "r", 1) != 1)
            _exit(1);
        for (;;)
            pause();
    }
    char c;
    if (read(ready[0], &c, 1) != 1)
        return fail("the helper tracer could not attach", 0);
    int32_t err;
    vi_target *t = vi_open(target, &err);
    int rc = t ? vi_freeze(t, 1000) : err;
    vi_close(t);
    kill(tracer, SIGKILL);
    waitpid(tracer, NULL, 0);
    int alive = kill(target, 0) == 0;
    kill(target, SIGKILL);
    waitpid(target, NULL, 0);
    if (rc != -EPERM)
        return fail("freezing a traced process: expected -EPERM", rc);
    if (!alive)
        return fail("the traced target died", 0);
    return 0;
}

int main(void)
{
#if !defined(__x86_64__)
    printf("SKIP: syscall injection is implemented for x86-64 only\n");
    return 77;
#endif
    if (geteuid() != 0) {
        printf("SKIP: needs root (ptrace of children works, but userfaultfd in them needs privilege)\n");
        return 77;
    }
    if (test_spinning() || test_blocked_read() || test_other_tracer())
        return 1;
    printf("inject: spinning, blocked-read and other-tracer targets ok\n");
    return 0;
}
