/* Internal: userfaultfd constants missing from Linux 6.1 uapi headers, and
 * the open/probe helpers shared by the engine. Not part of the public ABI. */
#ifndef VMSNAP_WP_UFFD_H
#define VMSNAP_WP_UFFD_H

#include <linux/userfaultfd.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ull << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ull << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ull << 16)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* Open a userfaultfd: the syscall first, then /dev/userfaultfd (which grants
 * kernel-mode faults to whoever may open the device). Returns fd or -errno;
 * *how is WP_OPEN_SYSCALL or WP_OPEN_DEVICE. */
int uffd_open_fd(int flags, int32_t *how);

/* UFFDIO_API handshake asking for `want`; returns 0 or -errno and writes the
 * features the kernel offers to *offered. */
int uffd_handshake(int fd, uint64_t want, uint64_t *offered);

/* ---- shared by the snapshot engine and the restorer ---- */

static inline uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Service-time histogram bucket: 2k for [2^k, 1.5 * 2^k) ns, 2k + 1 for
 * [1.5 * 2^k, 2^(k+1)) ns (WP_HIST_BUCKETS of them). */
static inline unsigned hist_bucket(uint64_t ns, unsigned buckets)
{
    if (ns < 1)
        return 0;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned b = 2 * msb + (msb > 0 ? (unsigned)((ns >> (msb - 1)) & 1u) : 0u);
    return b < buckets ? b : buckets - 1;
}

/* A finer histogram bucket (the lazy restorer's, the guest's): ns itself
 * below 8, else 8 * k + j for [2^k * (1 + j/8), 2^k * (1 + (j+1)/8)) ns,
 * 8 buckets per power of two (12.5 % wide). */
static inline unsigned hist_bucket8(uint64_t ns, unsigned buckets)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7u);
    return b < buckets ? b : buckets - 1;
}

/* Wake a worker thread out of poll() through its eventfd. */
static inline void signal_eventfd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) {
        /* full counter: it is readable already */
    }
}

#endif
