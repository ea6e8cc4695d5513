/*
 * The words the kernel writes for a thread as it exits (vmsnap_inject.h).
 *
 * At a thread's exit the kernel clears the word set with
 * CLONE_CHILD_CLEARTID or set_tid_address(2) and wakes its futex: what
 * pthread_join and its kin wait for. It does so as the exiting task, and a
 * userfaultfd does not serve an exiting task's faults (Linux's
 * handle_userfault, PF_EXITING): while the word's page is write-protected
 * the clear is dropped and the waiter never wakes (break9: 3 of 3 threads
 * made with a raw clone). So `snapshot --pid` reads each thread's word
 * address while the target is frozen to take its userfaultfd
 * (prctl(PR_GET_TID_ADDRESS) run in that thread), and at the cut rewrites
 * each word with its own value through process_vm_writev, which waits for
 * the page's write fault to be served: the page is saved and unprotected
 * before any thread runs again. Threads made later are not asked.
 */
#define _GNU_SOURCE
#include "inject_internal.h"

#include <errno.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <unistd.h>

#ifndef PR_GET_TID_ADDRESS
#define PR_GET_TID_ADDRESS 40
#endif

#if defined(__x86_64__)

int32_t vi_tid_addresses(vi_target *t, uint64_t *out, uint32_t max)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < t->count && n < max; i++) {
        struct vi_thread *th = &t->threads[i];
        if (th->in_signal_stop)
            continue; /* its signal would have to wait in resend: not worth it */
        struct user_regs_struct regs;
        if (ptrace(PTRACE_GETREGS, th->tid, 0, &regs) < 0)
            return -errno;
        /* Where the kernel puts the answer: below the thread's stack red zone (128 bytes), 8-aligned. */
        uint64_t scratch = (regs.rsp - 128 - 16) & ~7ull;
        errno = 0;
        long kept = ptrace(PTRACE_PEEKDATA, th->tid, scratch, 0);
        if (errno)
            return -errno;
        long rc = 0;
        int err = vi_run_syscall(th, SYS_prctl, PR_GET_TID_ADDRESS, scratch, 0, &rc);
        if (err < 0)
            return err;
        if (rc < 0)
            return (int32_t)rc; /* -EINVAL: a kernel without CONFIG_CHECKPOINT_RESTORE */
        errno = 0;
        long address = ptrace(PTRACE_PEEKDATA, th->tid, scratch, 0);
        int peek_err = errno;
        ptrace(PTRACE_POKEDATA, th->tid, scratch, kept); /* what was below its stack */
        if (peek_err)
            return -peek_err;
        out[n++] = (uint64_t)address; /* 0: none */
    }
    return (int32_t)n;
}

#else

int32_t vi_tid_addresses(vi_target *t, uint64_t *out, uint32_t max)
{
    (void)t, (void)out, (void)max;
    return -ENOSYS;
}

#endif

int32_t vi_rewrite_words(vi_target *t, const uint64_t *addrs, uint32_t n)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t word;
        struct iovec local = {.iov_base = &word, .iov_len = sizeof word};
        struct iovec remote = {.iov_base = (void *)(uintptr_t)addrs[i], .iov_len = sizeof word};
        if (process_vm_readv(t->pid, &local, 1, &remote, 1, 0) != (ssize_t)sizeof word)
            continue; /* unmapped since: nothing to write */
        if (process_vm_writev(t->pid, &local, 1, &remote, 1, 0) == (ssize_t)sizeof word)
            done++;
    }
    return (int32_t)done;
}
