/*
 * Freezing another process with ptrace and running a system call inside it
 * (vmsnap_inject.h): how `vmsnap snapshot --pid` gets a userfaultfd of an
 * unmodified process's address space.
 *
 * Stops. A seized thread stops either in a PTRACE_EVENT_STOP (our interrupt,
 * or a group stop) or, if a signal arrived first, in a signal-delivery-stop
 * for that signal. The signal is kept and handed back at PTRACE_DETACH, so
 * the target receives it as if we had never been there. After running a
 * system call in a thread we interrupt it once more and resume it from the
 * single-step SIGTRAP stop with no signal: it then waits in an event stop,
 * from which neither our detach nor our death (the kernel detaches) delivers
 * a SIGTRAP the target never had.
 *
 * Registers. The injected call runs from a `syscall` instruction: the one the
 * thread was interrupted after (when it was in a system call and the bytes
 * before its rip are 0f 05), else two bytes poked over its rip and put back.
 * orig_rax is set to -1 so the kernel does not try to restart anything on
 * our behalf; the saved registers (rax = -ERESTART..., orig_rax = the
 * syscall number) are restored afterwards, so when the thread resumes the
 * kernel restarts its interrupted call exactly as it would have.
 */
#define _GNU_SOURCE
#include "inject_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

vi_target *vi_open(int32_t pid, int32_t *err_out)
{
    *err_out = 0;
    if (pid <= 0 || pid == getpid()) {
        *err_out = -EINVAL;
        return NULL;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        *err_out = -errno;
        return NULL;
    }
    vi_target *t = calloc(1, sizeof *t);
    if (!t) {
        close(pidfd);
        *err_out = -ENOMEM;
        return NULL;
    }
    t->pid = pid;
    t->pidfd = pidfd;
    return t;
}

static int cmp_tid(const void *a, const void *b)
{
    int32_t x = ((const struct vi_thread *)a)->tid, y = ((const struct vi_thread *)b)->tid;
    return (x > y) - (x < y);
}

/* 'Z'/'X' threads (an exited leader waiting for the group) never stop. */
static bool thread_is_dead(int32_t pid, int32_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return true;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return true;
    buf[n] = 0;
    char *paren = strrchr(buf, ')');
    return !paren || paren[1] == 0 || paren[2] == 'Z' || paren[2] == 'X';
}

/* Seizes and interrupts the threads not yet known. Returns how many were new. */
static int seize_new(vi_target *t)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", t->pid);
    DIR *d = opendir(path);
    if (!d)
        return -ESRCH;
    int added = 0, rc = 0;
    uint32_t known = t->count;
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end;
        long tid = strtol(de->d_name, &end, 10);
        if (*end || tid <= 0)
            continue;
        struct vi_thread key = {.tid = (int32_t)tid};
        if (bsearch(&key, t->threads, known, sizeof key, cmp_tid) || thread_is_dead(t->pid, (int32_t)tid))
            continue;
        if (t->count == t->cap) {
            if (t->cap >= VI_MAX_THREADS) {
                rc = -E2BIG;
                break;
            }
            uint32_t cap = t->cap ? t->cap * 2 : 64;
            struct vi_thread *grown = realloc(t->threads, cap * sizeof *grown);
            if (!grown) {
                rc = -ENOMEM;
                break;
            }
            t->threads = grown;
            t->cap = cap;
        }
        if (ptrace(PTRACE_SEIZE, (pid_t)tid, 0, 0) < 0) {
            if (errno == ESRCH)
                continue; /* exited since the listing */
            rc = -errno;
            break;
        }
        t->threads[t->count++] = (struct vi_thread){.tid = (int32_t)tid};
        if (ptrace(PTRACE_INTERRUPT, (pid_t)tid, 0, 0) < 0 && errno != ESRCH) {
            rc = -errno;
            break;
        }
        added++;
    }
    closedir(d);
    qsort(t->threads, t->count, sizeof *t->threads, cmp_tid);
    return rc < 0 ? rc : added;
}

/* Notes how a thread stopped. */
static void note_stop(struct vi_thread *th, int status)
{
    th->stopped = true;
    if ((status >> 16) == PTRACE_EVENT_STOP) {
        th->in_signal_stop = false;
        return;
    }
    th->in_signal_stop = true;
    th->sig = WSTOPSIG(status);
}

static void drop_thread(vi_target *t, struct vi_thread *th)
{
    size_t i = (size_t)(th - t->threads);
    memmove(th, th + 1, (t->count - i - 1) * sizeof *th);
    t->count--;
}

/* One thread's next stop, bounded: 1 stopped (*status), 0 exited, -errno. */
static int wait_thread(int32_t tid, uint64_t deadline, int *status)
{
    for (uint32_t spins = 0;; spins++) {
        pid_t r = waitpid(tid, status, __WALL | WNOHANG);
        if (r == tid) {
            if (WIFSTOPPED(*status))
                return 1;
            if (WIFEXITED(*status) || WIFSIGNALED(*status))
                return 0;
            continue;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == ECHILD ? 0 : -errno;
        }
        if (now_ns() > deadline)
            return -ETIMEDOUT;
        if (spins > 64) {
            struct timespec ts = {0, 50000}; /* 50 us between polls once the first spins failed */
            nanosleep(&ts, NULL);
        }
    }
}

/* Waits until every seized thread has stopped; exited ones are dropped. */
static int wait_all(vi_target *t, uint64_t deadline)
{
    for (uint32_t i = 0; i < t->count;) {
        struct vi_thread *th = &t->threads[i];
        if (th->stopped) {
            i++;
            continue;
        }
        int status;
        int rc = wait_thread(th->tid, deadline, &status);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            drop_thread(t, th);
            continue;
        }
        note_stop(th, status);
        i++;
    }
    return 0;
}

int32_t vi_thaw(vi_target *t)
{
    /* A seized thread must be stopped before PTRACE_DETACH: wait (bounded) for
     * the ones whose interrupt has not landed yet. */
    (void)wait_all(t, now_ns() + 2000000000ull);
    for (uint32_t i = 0; i < t->count; i++) {
        struct vi_thread *th = &t->threads[i];
        if (!th->stopped)
            continue; /* still running after 2 s: the kernel detaches it when we exit */
        ptrace(PTRACE_DETACH, th->tid, 0, th->in_signal_stop ? th->sig : 0);
        for (uint32_t k = 0; k < th->nresend; k++)
            syscall(SYS_tgkill, t->pid, th->tid, th->resend[k]);
    }
    t->count = 0;
    return 0;
}

int32_t vi_freeze(vi_target *t, uint32_t timeout_ms)
{
    if (t->count > 0)
        return -EBUSY;
    if (syscall(SYS_pidfd_send_signal, t->pidfd, 0, NULL, 0) < 0)
        return -errno; /* ESRCH: gone (the pidfd makes sure /proc/PID is still ours) */
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    int rc = 0;
    for (int pass = 0;; pass++) {
        if (pass == VI_MAX_PASSES) {
            rc = -EAGAIN;
            break;
        }
        int added = seize_new(t);
        if (added < 0) {
            rc = added;
            break;
        }
        if ((rc = wait_all(t, deadline)) < 0)
            break;
        /* Every known thread is stopped: a clone they made is already listed. */
        if (added == 0)
            break;
    }
    if (rc == 0 && t->count == 0)
        rc = -ESRCH;
    if (rc < 0) {
        vi_thaw(t);
        return rc;
    }
    return (int32_t)t->count;
}

int32_t vi_frozen_threads(vi_target *t)
{
    return (int32_t)t->count;
}

#if defined(__x86_64__)

/* Resumes th with `request` and waits for its next stop, collecting signals
 * that are not the one expected. Returns 1 stopped (*regs filled), 0 exited. */
static int step(struct vi_thread *th, int request, struct user_regs_struct *regs, int *status)
{
    if (ptrace(request, th->tid, 0, 0) < 0)
        return -errno;
    int rc = wait_thread(th->tid, now_ns() + 5000000000ull, status);
    if (rc <= 0)
        return rc;
    if (ptrace(PTRACE_GETREGS, th->tid, 0, regs) < 0)
        return -errno;
    return 1;
}

static void keep_signal(struct vi_thread *th, int sig)
{
    if (th->nresend < VI_MAX_RESEND)
        th->resend[th->nresend++] = sig;
}

/* Runs syscall nr(a0, a1, a2) in stopped thread th; its result in *ret. */
static int inject(struct vi_thread *th, long nr, uint64_t a0, uint64_t a1, uint64_t a2, long *ret)
{
    struct user_regs_struct saved, r;
    if (ptrace(PTRACE_GETREGS, th->tid, 0, &saved) < 0)
        return -errno;
    if (saved.cs != 0x33)
        return -ENOEXEC; /* not 64-bit user code */
    uint64_t at = saved.rip;
    long orig = 0;
    bool poked = false;
    errno = 0;
    long before = ptrace(PTRACE_PEEKTEXT, th->tid, saved.rip - 2, 0);
    if ((long)saved.orig_rax >= 0 && errno == 0 && ((unsigned long)before >> 48) == 0x050f) {
        at = saved.rip - 2; /* the syscall instruction it was interrupted in */
    } else {
        errno = 0;
        orig = ptrace(PTRACE_PEEKTEXT, th->tid, saved.rip, 0);
        if (errno)
            return -errno;
        long patched = (long)(((unsigned long)orig & ~0xffffUL) | 0x050fUL);
        if (ptrace(PTRACE_POKETEXT, th->tid, saved.rip, patched) < 0)
            return -errno;
        poked = true;
    }
    r = saved;
    r.rax = (unsigned long long)nr;
    r.orig_rax = (unsigned long long)-1;
    r.rdi = a0;
    r.rsi = a1;
    r.rdx = a2;
    r.rip = at;
    int rc = ptrace(PTRACE_SETREGS, th->tid, 0, &r) < 0 ? -errno : 0;
    struct user_regs_struct now;
    int status = 0;
    bool done = false;
    while (rc == 0 && !done) {
        rc = step(th, PTRACE_SINGLESTEP, &now, &status);
        if (rc == 0)
            rc = -ESRCH; /* exited (killed) while we ran it */
        if (rc < 0)
            break;
        rc = 0;
        bool event = (status >> 16) != 0;
        int sig = WSTOPSIG(status);
        if (now.rip == at + 2 && !event && sig == SIGTRAP) {
            done = true;
        } else if (now.rip == at + 2) {
            /* Past the call but stopped for something else first: the step's
             * SIGTRAP is still queued and comes next without running code. */
            if (!event)
                keep_signal(th, sig);
            rc = step(th, PTRACE_CONT, &now, &status);
            if (rc == 0)
                rc = -ESRCH;
            else if (rc > 0 && WSTOPSIG(status) == SIGTRAP && (status >> 16) == 0 && now.rip == at + 2)
                rc = 0, done = true;
            else if (rc > 0)
                rc = -EIO;
        } else if (now.rip == at) {
            if (!event && sig != SIGTRAP)
                keep_signal(th, sig); /* arrived before the call ran: give it back later */
        } else {
            rc = -EIO; /* somewhere we did not send it */
        }
    }
    if (done)
        *ret = (long)now.rax;
    /* Put everything back, whatever happened. */
    if (poked)
        ptrace(PTRACE_POKETEXT, th->tid, saved.rip, orig);
    if (ptrace(PTRACE_SETREGS, th->tid, 0, &saved) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0)
        return rc;
    /* Leave the SIGTRAP stop for an event stop (see the file comment). */
    if (ptrace(PTRACE_INTERRUPT, th->tid, 0, 0) < 0)
        return -errno;
    for (;;) {
        rc = step(th, PTRACE_CONT, &now, &status);
        if (rc <= 0)
            return rc == 0 ? -ESRCH : rc;
        if ((status >> 16) == PTRACE_EVENT_STOP)
            break;
        keep_signal(th, WSTOPSIG(status)); /* a signal that was queued meanwhile */
    }
    th->in_signal_stop = false;
    return 0;
}

/*
 * While our code runs in a thread, every signal is blocked in it
 * (PTRACE_SETSIGMASK; SIGKILL and SIGSTOP cannot be): one that arrives, or
 * was already pending, stays queued in the kernel with its siginfo and, for
 * a real-time signal, its count, and is delivered after the thaw as if we
 * had never been there. Unblocked, each stopped the thread on the way (a
 * signal-delivery-stop) and was taken off its queue; it could only be sent
 * again with tgkill, without its value or sender, and at most VI_MAX_RESEND
 * of them (break9: of 30 000 sigqueue'd signals during 8 snapshots, 36 were
 * lost and 16 arrived from vmsnap with value 0). Like the poked
 * instruction, the mask is put back before we let go; vmsnap keeps the OOM
 * killer off itself meanwhile (oomScore.ts).
 */
int vi_run_syscall(struct vi_thread *th, long nr, uint64_t a0, uint64_t a1, uint64_t a2, long *ret)
{
    uint64_t mask, all = ~0ull;
    if (ptrace(PTRACE_GETSIGMASK, th->tid, sizeof mask, &mask) < 0)
        return -errno;
    if (ptrace(PTRACE_SETSIGMASK, th->tid, sizeof all, &all) < 0)
        return -errno;
    int rc = inject(th, nr, a0, a1, a2, ret);
    /* The thread is in an event stop again whatever happened: its mask goes back now. */
    ptrace(PTRACE_SETSIGMASK, th->tid, sizeof mask, &mask);
    return rc;
}

int32_t vi_take_uffd(vi_target *t, int32_t flags)
{
    if (t->count == 0)
        return -EINVAL; /* not frozen */
    /* Prefer a thread in an event stop: it keeps no signal to give back. */
    struct vi_thread *th = NULL;
    for (uint32_t i = 0; i < t->count && !th; i++)
        if (!t->threads[i].in_signal_stop)
            th = &t->threads[i];
    if (!th)
        th = &t->threads[0];
    /* The thread's signal, if it had one, now waits in resend (our steps resume it without). */
    if (th->in_signal_stop) {
        keep_signal(th, th->sig);
        th->in_signal_stop = false;
    }
    long fd = -1;
    int rc = vi_run_syscall(th, SYS_userfaultfd, (uint64_t)flags, 0, 0, &fd);
    if (rc < 0)
        return rc;
    if (fd < 0)
        return (int32_t)fd; /* the target's userfaultfd(2) failed: its -errno */
    int ours = (int)syscall(SYS_pidfd_getfd, t->pidfd, (int)fd, 0);
    int getfd_err = errno;
    long closed = -1;
    rc = vi_run_syscall(th, SYS_close, (uint64_t)fd, 0, 0, &closed);
    if (ours < 0)
        return -getfd_err;
    if (rc < 0 || closed < 0) {
        /* The target would keep a reference to the uffd: refuse to use it. */
        close(ours);
        return rc < 0 ? rc : (int32_t)closed;
    }
    return ours;
}

#else

int32_t vi_take_uffd(vi_target *t, int32_t flags)
{
    (void)t;
    (void)flags;
    return -ENOSYS;
}

#endif

int32_t vi_close(vi_target *t)
{
    if (!t)
        return 0;
    vi_thaw(t);
    close(t->pidfd);
    free(t->threads);
    free(t);
    return 0;
}
