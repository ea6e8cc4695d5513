/*
 * The floor of `bench --restore`: the barest lazy-restore handler, against
 * which vmsnap's fault service is measured. It registers [hva, hva + size)
 * of this process (MISSING), and a polling handler thread serves each fault
 * with one 4 KiB UFFDIO_COPY from an in-memory raw image, while the calling
 * thread touches every page in order. No file, no decode, no fill.
 */
#define _GNU_SOURCE
#include "vmsnap_guest.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BARE_PAGE 4096u

struct bare_ctx {
    int uffd;
    uint64_t hva, size, image;
    _Atomic bool stop;
    uint64_t faults, ns_max;
    uint64_t *hist;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The restorer's buckets (vmsnap_restore.h): ns below 8, else 8k + j for
 * [2^k (1 + j/8), 2^k (1 + (j+1)/8)) ns. */
static unsigned bucket(uint64_t ns)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7u);
    return b < VG_BARE_HIST_BUCKETS ? b : VG_BARE_HIST_BUCKETS - 1;
}

static void *bare_handler(void *arg)
{
    struct bare_ctx *c = arg;
    struct uffd_msg m;
    while (!atomic_load(&c->stop)) {
        if (read(c->uffd, &m, sizeof m) != (ssize_t)sizeof m) {
            __builtin_ia32_pause(); /* poll: the floor never sleeps */
            continue;
        }
        if (m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t t0 = now_ns();
        uint64_t at = (m.arg.pagefault.address - c->hva) & ~(uint64_t)(BARE_PAGE - 1);
        struct uffdio_copy cp = {.dst = c->hva + at, .src = c->image + at, .len = BARE_PAGE};
        ioctl(c->uffd, UFFDIO_COPY, &cp); /* EEXIST: raced, fine */
        uint64_t ns = now_ns() - t0;
        c->faults++;
        if (ns > c->ns_max)
            c->ns_max = ns;
        c->hist[bucket(ns)]++;
    }
    return NULL;
}

int32_t vg_bare_restore(uint64_t hva, uint64_t size, uint64_t image_hva, uint64_t *hist_out, uint64_t *summary_out)
{
    memset(hist_out, 0, VG_BARE_HIST_BUCKETS * sizeof *hist_out);
    struct bare_ctx c = {.hva = hva, .size = size, .image = image_hva, .hist = hist_out};
    c.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (c.uffd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API};
    struct uffdio_register reg = {.range = {.start = hva, .len = size}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(c.uffd, UFFDIO_API, &api) < 0 || ioctl(c.uffd, UFFDIO_REGISTER, &reg) < 0) {
        int err = -errno;
        close(c.uffd);
        return err;
    }
    pthread_t handler;
    if (pthread_create(&handler, NULL, bare_handler, &c)) {
        close(c.uffd);
        return -EAGAIN;
    }
    uint64_t t0 = now_ns();
    volatile const uint8_t *p = (const uint8_t *)(uintptr_t)hva;
    uint64_t sum = 0;
    for (uint64_t off = 0; off < size; off += BARE_PAGE)
        sum += p[off];
    uint64_t elapsed = now_ns() - t0;
    atomic_store(&c.stop, true);
    pthread_join(handler, NULL);
    close(c.uffd);
    summary_out[0] = c.faults;
    summary_out[1] = c.ns_max;
    summary_out[2] = elapsed;
    summary_out[3] = sum;
    return 0;
}
