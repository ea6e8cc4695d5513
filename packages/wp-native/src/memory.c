/* Helpers on guest memory outside a snapshot: copies to and from this
 * process's memory (eager restore, tests) and rebuilding transparent huge
 * pages after a snapshot (MADV_COLLAPSE). */
#define _GNU_SOURCE
#include "vmsnap_engine.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

int32_t wp_copy_to_hva(uint64_t hva, const uint8_t *src, uint64_t len)
{
    memcpy((void *)(uintptr_t)hva, src, len);
    return 0;
}

int32_t wp_copy_from_hva(uint8_t *dst, uint64_t hva, uint64_t len)
{
    memcpy(dst, (const void *)(uintptr_t)hva, len);
    return 0;
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif

int32_t wp_collapse(int32_t pid, uint64_t hva, uint64_t size)
{
    if (pid == 0 || pid == getpid())
        return madvise((void *)(uintptr_t)hva, size, MADV_COLLAPSE) < 0 ? -errno : 0;
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        return -errno;
    struct iovec iov = {.iov_base = (void *)(uintptr_t)hva, .iov_len = size};
    long rc = syscall(SYS_process_madvise, pidfd, &iov, 1, MADV_COLLAPSE, 0);
    int err = errno;
    close(pidfd);
    return rc < 0 ? -err : 0;
}
