/*
 * The lazy restorer against the real kernel, in this process (faults only,
 * no background fill, so which path serves each page is known):
 *   - two ranges at one hva are refused (-EEXIST);
 *   - a fault on a page that is registered but that no range covers gets a
 *     memory error (UFFDIO_POISON: process_vm_readv fails with EFAULT), is
 *     counted with its page, and never blocks the faulting thread;
 *   - a REMOVE event queued after the restorer stopped reading is read when
 *     it is destroyed (the guest's madvise waited for ever);
 *   - a fault on a page already settled (installed, then discarded) reads
 *     zero and its service time is measured from its own start (it was once
 *     taken from the previous fault: an underflow to ~2^64 ns);
 *   - one index serves several restorers, and outlives its creator's
 *     reference while a restorer uses it;
 *   - an UNMAP queued before the ranges are added (a VMM's remap as it sent
 *     the handshake) is read by wp_restorer_take_early_events: its pages
 *     are gone and left unregistered;
 *   - per-VMM setup (create, add_range, set_index) of an 8 GiB guest over a
 *     131,072-record index makes this process resident in less than 256 KiB:
 *     nothing in proportion to the image is copied or touched (set_index
 *     once copied the index, 4 MiB here, for every VMM).
 * Exit 0 pass, 1 fail, 77 skip (wp_test.h).
 */
#define _GNU_SOURCE
#include "vmsnap_restore.h"
#include "wp_test.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>

#define PAGE 4096u
#define REGISTERED 96u /* pages registered with the uffd */
#define IMAGE 64u      /* pages of the raw image */

static _Atomic int progress;

/* process_vm_readv on this process: a poisoned page is -EFAULT, not SIGBUS. */
static long read_self(uint8_t *dst, const uint8_t *src)
{
    struct iovec local = {dst, PAGE}, remote = {(void *)src, PAGE};
    long n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    atomic_fetch_add(&progress, 1);
    return n < 0 ? -errno : n;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void pattern(uint8_t *page, uint64_t p)
{
    for (unsigned i = 0; i < PAGE; i += 8)
        memcpy(page + i, &(uint64_t){p * 0x100000001ull + 7}, 8);
}

/* Discards memory (MADV_DONTNEED) from its own thread: blocks until the REMOVE event is read. */
static void *discard(void *page)
{
    madvise(page, PAGE, MADV_DONTNEED);
    atomic_fetch_add(&progress, 1);
    return NULL;
}

static void *touch(void *page)
{
    uint8_t got[PAGE];
    read_self(got, page); /* never answered here: the restorer fails first */
    return NULL;
}

/*
 * A REMOVE event queued after the restorer stopped reading (here: it failed
 * on an install) is read when it is destroyed, so the guest's madvise goes
 * on; before, it waited for ever (the VMM holds its own uffd).
 */
static int test_event_read_at_destroy(int file, wp_restore_index *idx)
{
    int memfd = memfd_create("restore-test", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, 32 * PAGE) < 0)
        return wp_test_fail("memfd", -errno);
    uint8_t *mem = mmap(NULL, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    int uffd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)mem, .len = 32 * PAGE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (mem == MAP_FAILED || uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return wp_test_fail("userfaultfd with EVENT_REMOVE on a memfd", -errno);
    /* UFFDIO_MOVE cannot put pages into shared memory: the first install fails and the restorer stops. */
    int32_t err;
    wp_restorer *r = wp_restorer_create(uffd, file, WP_RESTORE_RAW_IMAGE | WP_RESTORE_NO_FILL | WP_RESTORE_MOVE, &err);
    int rc;
    if (!r || (rc = wp_restorer_add_range(r, (uint64_t)(uintptr_t)mem, 32 * PAGE, 0, WP_RESTORE_RANGE_SHARED)) < 0 ||
        (rc = wp_restorer_set_index(r, idx)) < 0)
        return wp_test_fail("restorer", r ? rc : err);
    wp_restore_index_release(idx); /* the creator's reference: the restorer keeps its own */
    if ((rc = wp_restorer_start(r)) < 0)
        return wp_test_fail("restorer start", rc);
    pthread_t toucher, discarder;
    pthread_create(&toucher, NULL, touch, mem);
    while ((rc = wp_restorer_poll(r)) == 0)
        usleep(1000);
    /* Stopped. A discard now queues a REMOVE event that nobody reads... */
    pthread_create(&discarder, NULL, discard, mem + 20 * PAGE);
    struct pollfd ready = {.fd = uffd, .events = POLLIN};
    while (poll(&ready, 1, 1000) == 0)
        ;
    /* ...until the restorer is destroyed. */
    wp_restorer_destroy(r);
    pthread_join(discarder, NULL); /* the watchdog turns a wait for ever into a failure */
    printf("PASS: restore: a REMOVE event queued after the restorer stopped (%s) is read at destroy\n", strerror(-rc));
    return 0; /* the toucher stays blocked on its unserved page: it ends with the process */
}

/* Bytes resident in this process (/proc/self/statm). */
static uint64_t resident_bytes(void)
{
    unsigned long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%lu %lu", &size, &resident) != 2)
            resident = 0;
        fclose(f);
    }
    return (uint64_t)resident * (uint64_t)sysconf(_SC_PAGESIZE);
}

/*
 * Per-VMM setup of an 8 GiB guest (nothing touched: MAP_NORESERVE) over an
 * index of 131,072 records of 16 pages built once: for each of 4 VMMs,
 * create + add_range + set_index must leave this process less than 256 KiB
 * more resident (the page-state array, 2 MiB, is mapped on first touch; the
 * index is shared, not copied).
 */
static int test_setup_is_small(int file)
{
    const uint64_t guest = 8ull << 30, pages = guest / PAGE;
    const uint32_t n = (uint32_t)(pages / 16);
    uint32_t *regions = calloc(n, 4), *counts = calloc(n, 4);
    uint64_t *first = calloc(n, 8), *offsets = calloc(n, 8), *image_pages = calloc(n, 8);
    if (!regions || !counts || !first || !offsets || !image_pages)
        return wp_test_fail("calloc", -ENOMEM);
    for (uint32_t i = 0; i < n; i++) {
        counts[i] = 16;
        first[i] = image_pages[i] = (uint64_t)i * 16;
        offsets[i] = (uint64_t)i * 16 * PAGE;
    }
    int32_t err;
    wp_restore_index *idx = wp_restore_index_create(regions, first, counts, offsets, image_pages, n, &err);
    if (!idx)
        return wp_test_fail("index of 131072 records", err);
    free(regions), free(counts), free(first), free(offsets), free(image_pages);
    uint8_t *mem = mmap(NULL, guest, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        return wp_test_fail("mmap 8 GiB (MAP_NORESERVE)", -errno);
    uint64_t most = 0;
    for (int vmm = 0; vmm < 4; vmm++) {
        int uffd = wp_restore_uffd_create((uint64_t)(uintptr_t)mem, guest, 0);
        if (uffd < 0)
            return wp_test_fail("userfaultfd over 8 GiB", uffd);
        uint64_t before = resident_bytes();
        wp_restorer *r = wp_restorer_create(uffd, file, WP_RESTORE_RAW_IMAGE | WP_RESTORE_NO_FILL, &err);
        int rc = r ? wp_restorer_add_range(r, (uint64_t)(uintptr_t)mem, guest, 0, 0) : err;
        if (rc >= 0)
            rc = wp_restorer_set_index(r, idx);
        uint64_t grown = resident_bytes() - before;
        if (rc < 0)
            return wp_test_fail("restorer over 8 GiB", rc);
        most = grown > most ? grown : most;
        wp_restorer_destroy(r);
        close(uffd);
    }
    wp_restore_index_release(idx);
    munmap(mem, guest);
    if (most >= 256 * 1024) {
        fprintf(stderr, "FAIL: per-VMM setup of an 8 GiB guest made this process %llu KiB more resident (at most 256 KiB: nothing in proportion to the image)\n",
                (unsigned long long)(most / 1024));
        return 1;
    }
    printf("PASS: restore: per-VMM setup of an 8 GiB guest over a shared 131072-record index: at most %llu KiB more resident\n",
           (unsigned long long)(most / 1024));
    return 0;
}

struct remap_arg {
    uint8_t *at;
};

/* mmap(MAP_FIXED) fresh memory over 4 pages: with EVENT_UNMAP it waits until the UNMAP event is read. */
static void *remap(void *arg)
{
    struct remap_arg *a = arg;
    mmap(a->at, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    atomic_fetch_add(&progress, 1);
    return NULL;
}

/*
 * A VMM (UFFD_FEATURE_EVENT_UNMAP) maps fresh memory over pages [8, 12) of
 * its registered range as it sends the handshake: before the ranges are
 * added, wp_restorer_take_early_events reads the queued UNMAP (its mmap
 * then returns) and names the span; add_range leaves it unregistered (a
 * read there reads zero with no handler, never blocks); set_index marks
 * those 4 pages gone (settled, counted); wp_restorer_stop ends the threads
 * and the stats stay readable until destroy.
 */
static int test_early_unmap(int file)
{
    uint8_t *mem = mmap(NULL, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int uffd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_UNMAP};
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)mem, .len = 32 * PAGE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (mem == MAP_FAILED || uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return wp_test_fail("userfaultfd with EVENT_UNMAP", -errno);
    struct remap_arg a = {.at = mem + 8 * PAGE};
    pthread_t remapper;
    pthread_create(&remapper, NULL, remap, &a);
    struct pollfd ready = {.fd = uffd, .events = POLLIN};
    while (poll(&ready, 1, 1000) == 0) /* until the UNMAP event is queued (the watchdog bounds this) */
        ;
    int32_t err;
    wp_restorer *r = wp_restorer_create(uffd, file, WP_RESTORE_RAW_IMAGE | WP_RESTORE_NO_FILL, &err);
    if (!r)
        return wp_test_fail("wp_restorer_create", err);
    uint64_t gone[4] = {0};
    int rc = wp_restorer_take_early_events(r, (uint64_t)(uintptr_t)mem, 100, gone, 2);
    if (rc != 1 || gone[0] != (uint64_t)(uintptr_t)(mem + 8 * PAGE) || gone[1] != (uint64_t)(uintptr_t)(mem + 12 * PAGE)) {
        fprintf(stderr, "FAIL: early events: %d span(s), first [%#llx, %#llx) (expected 1, [%p, %p))\n", rc,
                (unsigned long long)gone[0], (unsigned long long)gone[1], (void *)(mem + 8 * PAGE), (void *)(mem + 12 * PAGE));
        return 1;
    }
    pthread_join(remapper, NULL); /* its mmap returned: the event was read */
    uint32_t regions[2] = {0, 0}, counts[2] = {16, 16};
    uint64_t first[2] = {0, 16}, offsets[2] = {0, 16 * PAGE}, image_pages[2] = {0, 16};
    wp_restore_index *idx = wp_restore_index_create(regions, first, counts, offsets, image_pages, 2, &err);
    if (!idx)
        return wp_test_fail("index", err);
    if ((rc = wp_restorer_add_range(r, (uint64_t)(uintptr_t)mem, 32 * PAGE, 0, 0)) < 0 || (rc = wp_restorer_set_index(r, idx)) < 0)
        return wp_test_fail("add_range / set_index after early events", rc);
    wp_restore_index_release(idx);
    if ((rc = wp_restorer_take_early_events(r, (uint64_t)(uintptr_t)mem, 0, gone, 2)) != -EBUSY)
        return wp_test_fail("early events after add_range must be refused with -EBUSY", rc);
    uint8_t got[PAGE];
    if ((rc = (int)read_self(got, mem + 9 * PAGE)) != PAGE || got[0] != 0) /* unregistered: zero, no handler needed */
        return wp_test_fail("the fresh mapping must not be registered (read it)", rc);
    wp_restore_stats s;
    wp_restorer_stats(r, &s);
    if (s.pages_gone != 4 || s.pages_settled != 4) {
        fprintf(stderr, "FAIL: after an early unmap of 4 pages: %llu gone, %llu settled (expected 4, 4)\n",
                (unsigned long long)s.pages_gone, (unsigned long long)s.pages_settled);
        return 1;
    }
    if ((rc = wp_restorer_start(r)) < 0 || (rc = wp_restorer_stop(r)) < 0 || (rc = wp_restorer_stats(r, &s)) < 0)
        return wp_test_fail("start / stop / stats after stop", rc);
    wp_restorer_destroy(r);
    close(uffd);
    printf("PASS: restore: an unmap queued before the ranges were added is read early, its 4 pages gone and left unregistered\n");
    return 0;
}

int main(void)
{
    char path[] = "/tmp/vmsnap-test-restore-XXXXXX";
    int file = mkstemp(path);
    if (file < 0)
        return wp_test_fail("mkstemp", -errno);
    unlink(path);
    uint8_t page[PAGE], got[PAGE];
    for (uint64_t p = 0; p < IMAGE; p++) {
        pattern(page, p);
        if (pwrite(file, page, PAGE, (off_t)(p * PAGE)) != PAGE)
            return wp_test_fail("pwrite image", -errno);
    }
    uint8_t *mem = mmap(NULL, REGISTERED * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return wp_test_fail("mmap", -errno);
    int uffd = wp_restore_uffd_create((uint64_t)(uintptr_t)mem, REGISTERED * PAGE, WP_RESTORE_UFFD_POISON);
    if (uffd < 0) {
        printf("SKIP: a userfaultfd for lazy restore cannot be had here (%s)\n", strerror(-uffd));
        return 77;
    }
    int32_t err;
    wp_restorer *r = wp_restorer_create(uffd, file, WP_RESTORE_RAW_IMAGE | WP_RESTORE_NO_FILL, &err);
    if (!r)
        return wp_test_fail("wp_restorer_create", err);
    /* Declared: pages [0, 32) = image [0, 32) and [64, 96) = image [32, 64); [32, 64) registered, not declared. */
    uint64_t base = (uint64_t)(uintptr_t)mem;
    int rc = wp_restorer_add_range(r, base, 32 * PAGE, 0, 0);
    if (rc < 0)
        return wp_test_fail("add_range 0", rc);
    rc = wp_restorer_add_range(r, base + 16 * PAGE, 8 * PAGE, 40 * PAGE, 0);
    if (rc != -EEXIST)
        return wp_test_fail("a range overlapping another must be refused with -EEXIST", rc);
    rc = wp_restorer_add_range(r, base + 64 * PAGE, 32 * PAGE, 32 * PAGE, 0);
    if (rc < 0)
        return wp_test_fail("add_range 1", rc);
    uint32_t regions[IMAGE / 16], counts[IMAGE / 16];
    uint64_t first[IMAGE / 16], offsets[IMAGE / 16], image_pages[IMAGE / 16];
    for (unsigned i = 0; i < IMAGE / 16; i++) {
        regions[i] = 0;
        counts[i] = 16;
        first[i] = image_pages[i] = i * 16;
        offsets[i] = i * 16 * PAGE;
    }
    wp_restore_index *idx = wp_restore_index_create(regions, first, counts, offsets, image_pages, IMAGE / 16, &err);
    if (!idx)
        return wp_test_fail("wp_restore_index_create", err);
    counts[1] = 15; /* a gap: records must tile the image */
    wp_restore_index *bad = wp_restore_index_create(regions, first, counts, offsets, image_pages, IMAGE / 16, &err);
    if (bad || err != -EINVAL)
        return wp_test_fail("an index with a gap must be refused with -EINVAL", bad ? 0 : err);
    counts[1] = 16;
    if ((rc = wp_restorer_set_index(r, idx)) < 0)
        return wp_test_fail("set_index", rc);
    if ((rc = wp_restorer_set_index(r, idx)) != -EBUSY)
        return wp_test_fail("a second set_index must be refused with -EBUSY", rc);
    /* A hang below is a failure, not a stuck test. */
    pthread_t dog;
    struct wp_test_watchdog w = {&progress, 10, "step", "a fault or a discard was never answered"};
    pthread_create(&dog, NULL, wp_test_watchdog_run, &w);
    uint64_t t0 = now_ns();
    if ((rc = wp_restorer_start(r)) < 0)
        return wp_test_fail("start", rc);

    /* A fault served from the image: page 0 (its record's other pages follow). */
    if ((rc = (int)read_self(got, mem)) != PAGE)
        return wp_test_fail("read page 0", rc);
    pattern(page, 0);
    if (memcmp(got, page, PAGE))
        return wp_test_fail("page 0 is not the image's", 0);
    /* Page 5 comes in with page 0's record, after page 0; then the guest discards it: a settled page faults again. */
    wp_restore_stats s;
    for (wp_restorer_stats(r, &s); s.pages_settled < 16; wp_restorer_stats(r, &s))
        usleep(1000);
    if (madvise(mem + 5 * PAGE, PAGE, MADV_DONTNEED) < 0)
        return wp_test_fail("madvise", -errno);
    if ((rc = (int)read_self(got, mem + 5 * PAGE)) != PAGE)
        return wp_test_fail("read discarded page 5", rc);
    for (unsigned i = 0; i < PAGE; i++)
        if (got[i])
            return wp_test_fail("a discarded anonymous page must read zero", got[i]);
    /* Page 70 of the second range: image page 38. */
    if ((rc = (int)read_self(got, mem + 70 * PAGE)) != PAGE)
        return wp_test_fail("read page 70", rc);
    pattern(page, 38);
    if (memcmp(got, page, PAGE))
        return wp_test_fail("page 70 is not image page 38", 0);

    /* Page 40: registered, declared by no range. Never zero, never blocked. */
    rc = (int)read_self(got, mem + 40 * PAGE);
    if (rc != -EFAULT)
        return wp_test_fail("a registered page no range covers must read as a memory error (EFAULT)", rc);
    uint64_t elapsed = now_ns() - t0;

    wp_restorer_stats(r, &s);
    if (s.faults_outside != 1 || s.outside_poisoned != 1 || s.outside_hva != base + 40 * PAGE) {
        fprintf(stderr, "FAIL: outside faults %llu, poisoned %llu, first at %#llx (expected 1, 1, %#llx)\n",
                (unsigned long long)s.faults_outside, (unsigned long long)s.outside_poisoned,
                (unsigned long long)s.outside_hva, (unsigned long long)(base + 40 * PAGE));
        return 1;
    }
    if (s.faults < 3 || s.fault_ns_max > elapsed || s.fault_ns_total > elapsed * s.faults) {
        fprintf(stderr, "FAIL: %llu faults served, longest %llu ns, total %llu ns, in a run of %llu ns\n",
                (unsigned long long)s.faults, (unsigned long long)s.fault_ns_max, (unsigned long long)s.fault_ns_total,
                (unsigned long long)elapsed);
        return 1;
    }
    wp_restorer_destroy(r);
    close(uffd);
    if (test_event_read_at_destroy(file, idx) || test_early_unmap(file) || test_setup_is_small(file))
        return 1;
    printf("PASS: restore: overlap refused, outside fault poisoned (not blocked), %llu faults, longest %llu ns\n",
           (unsigned long long)s.faults, (unsigned long long)s.fault_ns_max);
    return 0;
}
