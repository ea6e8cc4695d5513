/*
 * Putting restored pages in place through the VMM's userfaultfd, with
 * primitives that cannot replace a page that is already there:
 *
 *   UFFDIO_COPY / UFFDIO_ZEROPAGE fail with EEXIST on a present page (for
 *   memfd/shmem: a page in the page cache), so a guest write made before the
 *   install is never overwritten; UFFDIO_CONTINUE maps a page that is in
 *   the page cache but not mapped (a MINOR fault, e.g. after the guest's
 *   MADV_DONTNEED on shared memory, which keeps the data). Nothing is
 *   pwritten into a memfd.
 *   UFFDIO_MOVE (in-process anonymous memory) hands decoded pages over.
 *   UFFDIO_POISON (Linux 6.6, UFFD_FEATURE_POISON negotiated by the VMM)
 *   resolves a page that cannot be produced with a memory error.
 *
 * Also: checking a VMM's uffd at the handshake, and creating one in-process.
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

/* Linux 6.6+ and 6.8+ ioctls missing from the 6.1 headers. */
struct uffdio_move {
    uint64_t dst, src, len, mode;
    int64_t move;
};
#define UFFDIO_MOVE_IOCTL _IOWR(UFFDIO, 0x05, struct uffdio_move)
struct uffdio_poison {
    struct uffdio_range range;
    uint64_t mode;
    int64_t updated;
};
#define UFFDIO_POISON_IOCTL _IOWR(UFFDIO, 0x08, struct uffdio_poison)

void rs_set(wp_restorer *r, struct rs_range *g, uint64_t p, uint8_t bits)
{
    bool was = g->state[p] & PG_SETTLED;
    g->state[p] |= bits;
    if (!was && (g->state[p] & PG_SETTLED))
        atomic_fetch_add(&r->pages_settled, 1);
}

/* One ioctl over [hva, hva + len): bytes done (> 0), or -errno of the first page. */
static int64_t fill_once(wp_restorer *r, const struct rs_range *g, uint64_t hva, uint64_t len, const uint8_t *src)
{
    int rc;
    int64_t got;
    if (!src && g->unit > 1) {
        /* hugetlbfs has no UFFDIO_ZEROPAGE: a zero huge page is copied, one at a time. */
        for (uint64_t at = 0; at < len; at += WP_RESTORE_HUGE_PAGE_SIZE) {
            int64_t one = fill_once(r, g, hva + at, WP_RESTORE_HUGE_PAGE_SIZE, r->zero_huge);
            if (one < 0)
                return at ? (int64_t)at : one;
        }
        return (int64_t)len;
    }
    if (!src) {
        struct uffdio_zeropage z = {.range = {.start = hva, .len = len}};
        rc = ioctl(r->uffd, UFFDIO_ZEROPAGE, &z);
        got = z.zeropage;
    } else if (r->move) {
        struct uffdio_move mv = {.dst = hva, .src = (uint64_t)(uintptr_t)src, .len = len};
        rc = ioctl(r->uffd, UFFDIO_MOVE_IOCTL, &mv);
        got = mv.move;
    } else {
        struct uffdio_copy c = {.dst = hva, .src = (uint64_t)(uintptr_t)src, .len = len};
        rc = ioctl(r->uffd, UFFDIO_COPY, &c);
        got = c.copy;
    }
    if (rc == 0)
        return (int64_t)len;
    if (got > 0)
        return got; /* partial: the caller goes on from there */
    return got < 0 ? got : -errno;
}

/* Maps page (unit) p if it sits in the page cache unmapped; EEXIST: mapped already. */
static int map_cached(wp_restorer *r, struct rs_range *g, uint64_t p)
{
    struct uffdio_continue c = {.range = {.start = g->hva + p * RS_PAGE, .len = (uint64_t)g->unit * RS_PAGE}};
    if (ioctl(r->uffd, UFFDIO_CONTINUE, &c) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* A hugetlbfs install of unit p failed with EEXIST. The kernel says EEXIST
 * for two things there: a page is present (mapped, or in the page cache of
 * shared memory), and no huge page could be allocated (the pool or the
 * mount's size= quota exhausted: hugetlb_mfill_atomic_pte answers EEXIST
 * when the allocation fails and a page table entry exists, as it does once
 * the ioctl allocated the table). Told apart by what is there: a page in
 * the page cache is mapped (UFFDIO_CONTINUE: 0 or EEXIST), a mapped page
 * refuses UFFDIO_POISON (EEXIST). Else nothing is there: the page cannot be
 * installed, and it is poisoned (a poison marker needs no huge page), or,
 * without the POISON feature, left failed with its faults blocked.
 * 0: a page is there (kept); 1: failed for want of a huge page; -errno. */
static int huge_eexist(wp_restorer *r, struct rs_range *g, uint64_t p)
{
    uint64_t hva = g->hva + p * RS_PAGE;
    if (g->shared) {
        struct uffdio_continue c = {.range = {.start = hva, .len = WP_RESTORE_HUGE_PAGE_SIZE}};
        if (ioctl(r->uffd, UFFDIO_CONTINUE, &c) == 0 || errno == EEXIST)
            return 0;
        if (errno != EFAULT) /* EFAULT: no page in the page cache */
            return -errno;
    }
    int rc = rs_poison_hva(r, hva, WP_RESTORE_HUGE_PAGE_SIZE);
    if (rc == -EEXIST)
        return 0;
    if (rc < 0 && rc != -EINVAL)
        return rc;
    for (uint32_t k = 0; k < g->unit; k++) {
        if (!(g->state[p + k] & PG_FAILED))
            r->pages_failed++;
        g->state[p + k] |= PG_FAILED;
        if (rc == 0)
            rs_set(r, g, p + k, PG_POISONED);
    }
    r->pages_unallocated += g->unit;
    if (rc == 0)
        r->pages_poisoned += g->unit;
    return 1;
}

int rs_install(wp_restorer *r, struct rs_range *g, uint64_t p, uint64_t n, const uint8_t *src)
{
    uint64_t done = 0;
    /* A run that crosses from one VMA into the next (a range the VMM mapped
     * in two, or split by madvise/mprotect) fails whole with ENOENT, which
     * says nothing about its first page: then the run goes page by page. */
    bool one_by_one = false;
    uint32_t u = g->unit;
    while (done < n) {
        uint64_t len = one_by_one ? u : n - done;
        int64_t got = fill_once(r, g, g->hva + (p + done) * RS_PAGE, len * RS_PAGE, src ? src + done * RS_PAGE : NULL);
        if (got > 0) {
            for (uint64_t k = 0; k < (uint64_t)got / RS_PAGE; k++)
                rs_set(r, g, p + done + k, PG_RESIDENT);
            done += (uint64_t)got / RS_PAGE;
            continue;
        }
        if (got == -ENOENT && len > u) {
            one_by_one = true;
            continue;
        }
        uint64_t q = p + done;
        if ((got == -EEXIST || got == -ENOMEM) && u > 1) {
            int rc = huge_eexist(r, g, q); /* present (kept), or no huge page to be had (failed) */
            if (rc < 0)
                return rc;
            for (uint32_t k = 0; k < u && rc == 0; k++)
                rs_set(r, g, q + k, PG_RESIDENT);
        } else if (got == -EEXIST) {
            /* Present already (the guest's own data, or installed before): kept. */
            int rc = g->shared ? map_cached(r, g, q) : 0;
            if (rc < 0 && rc != -EINVAL)
                return rc;
            for (uint32_t k = 0; k < u; k++)
                rs_set(r, g, q + k, PG_RESIDENT);
        } else if (got == -ENOENT) {
            /* The VMM mapped something else here: that page is not ours to serve. */
            for (uint32_t k = 0; k < u; k++)
                rs_set(r, g, q + k, PG_GONE);
            r->pages_gone += u;
        } else {
            return (int)got; /* -EAGAIN: a discard is pending; others: the caller decides */
        }
        done += u;
    }
    return 0;
}

int rs_install_zero_or_keep(wp_restorer *r, struct rs_range *g, uint64_t p)
{
    int64_t got = fill_once(r, g, g->hva + p * RS_PAGE, (uint64_t)g->unit * RS_PAGE, NULL);
    if (got == -EEXIST && g->unit > 1) {
        int rc = huge_eexist(r, g, p); /* kept, or poisoned for want of a huge page (never blocked for ever if POISON) */
        if (rc < 0)
            return rc;
    } else if (got == -EEXIST && g->shared) {
        int rc = map_cached(r, g, p);
        if (rc < 0)
            return rc;
    } else if (got < 0 && got != -EEXIST && got != -ENOENT) {
        return (int)got;
    }
    struct uffdio_range wake = {.start = g->hva + p * RS_PAGE, .len = (uint64_t)g->unit * RS_PAGE};
    ioctl(r->uffd, UFFDIO_WAKE, &wake);
    return 0;
}

int rs_poison_hva(wp_restorer *r, uint64_t hva, uint64_t len)
{
    struct uffdio_poison po = {.range = {.start = hva, .len = len}};
    return ioctl(r->uffd, UFFDIO_POISON_IOCTL, &po) == 0 ? 0 : -errno;
}

int rs_poison(wp_restorer *r, struct rs_range *g, uint64_t p, uint64_t n)
{
    uint32_t u = g->unit; /* p and n: whole units */
    for (uint64_t q = p; q < p + n; q += u) {
        if (g->state[q] & PG_SETTLED)
            continue;
        int rc = rs_poison_hva(r, g->hva + q * RS_PAGE, (uint64_t)u * RS_PAGE);
        if (rc == 0) {
            for (uint32_t k = 0; k < u; k++)
                rs_set(r, g, q + k, PG_POISONED);
            r->pages_poisoned += u;
        } else if (rc == -EEXIST) {
            for (uint32_t k = 0; k < u; k++)
                rs_set(r, g, q + k, PG_RESIDENT); /* something is there already: kept */
        } else {
            return rc; /* -EINVAL: the kernel refuses it (before 6.6) */
        }
    }
    return 0;
}

/* A userfaultfd, and a non-blocking one: -ENOTTY / -EBADFD otherwise. */
int rs_check_uffd(int fd)
{
    char path[64], target[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n < 0)
        return -errno;
    target[n] = 0;
    if (strcmp(target, "anon_inode:[userfaultfd]") != 0)
        return -ENOTTY;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    return fl & O_NONBLOCK ? 0 : -EBADFD;
}

int32_t wp_restore_uffd_create(uint64_t hva, uint64_t size, uint32_t flags)
{
    int32_t how;
    int fd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (fd < 0)
        return fd;
    bool shmem = flags & WP_RESTORE_UFFD_MINOR;
    uint64_t features = (shmem ? (1ull << 10) /* MINOR_SHMEM */ : 0) | ((flags & WP_RESTORE_MOVE) ? (1ull << 16) /* MOVE */ : 0) |
                        ((flags & WP_RESTORE_UFFD_POISON) ? (1ull << 14) /* POISON */ : 0);
    uint64_t offered;
    int rc = uffd_handshake(fd, features, &offered);
    struct uffdio_register reg = {.range = {.start = hva, .len = size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING | (shmem ? UFFDIO_REGISTER_MODE_MINOR : 0)};
    if (rc == 0 && ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        rc = -errno;
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}
