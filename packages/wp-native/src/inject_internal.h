/*
 * What inject.c and inject_tid.c share: the handle's layout and running a
 * system call inside a stopped thread (x86-64).
 */
#ifndef VMSNAP_INJECT_INTERNAL_H
#define VMSNAP_INJECT_INTERNAL_H

#include "vmsnap_inject.h"

#include <stdbool.h>
#include <stdint.h>

/* Passes over /proc/PID/task before giving up on a target that keeps creating threads. */
#define VI_MAX_PASSES 100
#define VI_MAX_RESEND 4

struct vi_thread {
    int32_t tid;
    bool stopped;
    bool in_signal_stop;          /* stopped in a signal-delivery-stop for `sig` */
    int32_t sig;                  /* given back at PTRACE_DETACH */
    int32_t resend[VI_MAX_RESEND]; /* caught while running injected code: re-sent after detach */
    uint32_t nresend;
};

struct vi_target {
    int32_t pid;
    int pidfd;
    struct vi_thread *threads; /* sorted by tid */
    uint32_t count, cap;
};

#if defined(__x86_64__)
/* Runs syscall nr(a0, a1, a2) in stopped thread th, with every signal
 * blocked in it meanwhile (its mask put back after); its result in *ret.
 * 0 or -errno (-ESRCH: the thread was killed meanwhile). */
int vi_run_syscall(struct vi_thread *th, long nr, uint64_t a0, uint64_t a1, uint64_t a2, long *ret);
#endif

#endif
