/*
 * vmsnap_inject.h - freeze another process with ptrace and take a
 * userfaultfd of its address space (`vmsnap snapshot --pid`).
 *
 * One opaque handle (vi_target) per target process. Every function returns
 * >= 0 (0 or a count) on success and -errno on failure. No globals, no
 * printing. x86-64 only (other architectures: -ENOSYS from vi_take_uffd).
 *
 * ptrace binds a tracee to the calling *thread*: call every function of one
 * handle from the same thread (in Node: the main thread, synchronously).
 *
 * Life cycle:
 *   vi_open -> vi_freeze -> vi_take_uffd -> vi_thaw      (the uffd, target runs)
 *           -> ... register and arm on the uffd ...
 *           -> vi_freeze -> the cut -> vi_thaw           (a stop of a few ms)
 *           -> vi_close (always; thaws first if frozen).
 *
 * vi_freeze seizes every thread (PTRACE_SEIZE + PTRACE_INTERRUPT) and waits
 * until each has stopped, listing /proc/PID/task again until a pass finds no
 * new thread, so threads created meanwhile are frozen too. vi_thaw detaches
 * from every thread, giving back a signal that a stop had caught. If the
 * caller dies, the kernel detaches and the threads run on; a thread is never
 * left in a stop that would deliver a signal the target did not receive.
 */
#ifndef VMSNAP_INJECT_H
#define VMSNAP_INJECT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#pragma GCC visibility push(default)

typedef struct vi_target vi_target;

/* Most threads a target may have (a bound on what vi_freeze allocates). */
#define VI_MAX_THREADS 65536

/* A handle on process `pid` (a pidfd; nothing is attached yet). Returns NULL
 * and *err_out = -errno: -ESRCH no such process, -EINVAL pid is the caller. */
vi_target *vi_open(int32_t pid, int32_t *err_out);

/* Stop every thread of the target. timeout_ms bounds the wait for each pass
 * (a thread in uninterruptible sleep does not stop). Returns the number of
 * threads stopped. On failure every thread already stopped is detached again.
 * -EPERM: ptrace denied (another tracer, yama ptrace_scope, capabilities, a
 * target in another user namespace: the caller tells which); -ESRCH: the
 * target exited; -ETIMEDOUT: a thread did not stop; -EAGAIN: threads kept
 * appearing for too many passes. */
int32_t vi_freeze(vi_target *t, uint32_t timeout_ms);

/* While frozen: the address of the word each stopped thread's kernel
 * clears and wakes at its exit (CLONE_CHILD_CLEARTID, set_tid_address(2)),
 * read by running prctl(PR_GET_TID_ADDRESS) in that thread, signals blocked
 * meanwhile; threads in a signal-delivery-stop are left out, and at most
 * max are asked (each costs a system call run in it while it is stopped).
 * Their addresses into out (0: the thread has none); returns how many.
 * -EINVAL: the kernel has no PR_GET_TID_ADDRESS (CONFIG_CHECKPOINT_RESTORE);
 * -ENOSYS: not x86-64. See src/inject_tid.c for why. */
int32_t vi_tid_addresses(vi_target *t, uint64_t *out, uint32_t max);

/* Writes each 4-byte word at addrs[i] of the target back with its own value
 * (process_vm_readv, then process_vm_writev, which waits for a userfaultfd
 * write fault to be served: a write-protected page is saved and unprotected
 * first). Words no longer mapped are skipped. Returns how many were written. */
int32_t vi_rewrite_words(vi_target *t, const uint64_t *addrs, uint32_t n);

/* While frozen: create a userfaultfd(flags) inside the target by running the
 * syscall in one stopped thread (its registers restored exactly afterwards,
 * including a syscall it was interrupted in, which restarts as it would
 * have), copy it into this process with pidfd_getfd and close the target's
 * descriptor again the same way. Returns this process's fd (O_CLOEXEC).
 * -ENOEXEC: no thread runs 64-bit code; -EPERM etc.: the target's
 * userfaultfd(2) failed (its -errno); -ESRCH: the thread died meanwhile. */
int32_t vi_take_uffd(vi_target *t, int32_t flags);

/* Detach from every thread (they run on). Safe to call when not frozen. */
int32_t vi_thaw(vi_target *t);

/* Threads stopped now (0 when thawed). */
int32_t vi_frozen_threads(vi_target *t);

/* Thaw, close the pidfd, free. */
int32_t vi_close(vi_target *t);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_INJECT_H */
