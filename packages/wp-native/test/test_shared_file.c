/*
 * Shared guest memory (a memfd) is read through its file, never through a
 * mapping (issue 12 #5, issue 11 #7):
 *  - a memfd that shrinks in the middle of a snapshot fails that snapshot
 *    with -EIO; the process reading it is not killed by SIGBUS;
 *  - fault-around never reads a page that is not populated: during a
 *    snapshot the memfd grows by exactly what the guest writes.
 * Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "wp_test.h"

#define MIB (1ull << 20)

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static uint8_t take_buf[256 * WP_PAGE_SIZE];

static uint8_t *map_memfd(int *fd, uint64_t size)
{
    *fd = memfd_create("vmsnap-shared", MFD_CLOEXEC);
    if (*fd < 0 || ftruncate(*fd, (off_t)size) < 0)
        return NULL;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    return m == MAP_FAILED ? NULL : m;
}

struct writer {
    uint8_t *mem;
    uint64_t first, count, stride;
};

static void *write_pages(void *arg)
{
    const struct writer *w = arg;
    for (uint64_t k = 0; k < w->count; k++)
        w->mem[(w->first + k * w->stride) * WP_PAGE_SIZE] = 1;
    return NULL;
}

/* The agent's case: the region is read through a view of a memfd (sent by a
 * peer) that is not the guest's memory, and the peer shrinks it. */
static int test_shrink(void)
{
    const uint64_t size = 16 * MIB, pages = size / WP_PAGE_SIZE;
    int fd;
    uint8_t *view = map_memfd(&fd, size);
    uint8_t *guest = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!view || guest == MAP_FAILED)
        return wp_test_fail("memfd", -errno);
    memset(view, 0x5a, size);
    memset(guest, 0x5a, size);
    int32_t err;
    wp_engine *e = wp_engine_create(256, &err);
    long rc;
    if (!e || (rc = wp_engine_add_shared_region(e, (uint64_t)(uintptr_t)view, size)) < 0 ||
        (rc = wp_engine_map_region(e, 0, 0, (uint64_t)(uintptr_t)guest)) < 0 || (rc = wp_engine_start(e)) < 0 ||
        (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("engine", e ? rc : err);
    if (ftruncate(fd, (off_t)(4 * MIB)) < 0)
        return wp_test_fail("ftruncate", -errno);
    /* The guest writes pages past the new end: the engine reads them. */
    struct writer w = {.mem = guest, .first = pages / 2, .count = 64, .stride = 3};
    pthread_t t;
    pthread_create(&t, NULL, write_pages, &w);
    rc = wp_test_take_all(e, take_buf);
    int32_t process;
    int32_t failure = wp_engine_error(e, &process);
    wp_engine_destroy(e); /* unprotects whatever is left: the guest finishes */
    pthread_join(t, NULL);
    munmap(view, size);
    munmap(guest, size);
    close(fd);
    printf("shrunk memfd: snapshot %s (%s), this process still running\n", rc < 0 ? "failed" : "completed",
           strerror(-failure));
    /* EIO: a read past the new end; ESTALE: the truncate seen on the file's watch first. */
    if ((rc != -EIO && rc != -ESTALE) || (failure != -EIO && failure != -ESTALE))
        return wp_test_fail("a shrunk memfd must fail the snapshot with EIO or ESTALE", rc);
    return 0;
}

static uint64_t allocated(int fd)
{
    struct stat st;
    fstat(fd, &st);
    return (uint64_t)st.st_blocks * 512;
}

static int test_growth(void)
{
    const uint64_t size = 128 * MIB, populated = 2048, written = 2048, stride = 15;
    int fd;
    uint8_t *mem = map_memfd(&fd, size);
    if (!mem)
        return wp_test_fail("memfd", -errno);
    memset(mem, 0x33, populated * WP_PAGE_SIZE);
    int32_t err;
    wp_engine *e = wp_engine_create(4096, &err);
    long rc;
    if (!e || (rc = wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, size)) < 0 ||
        (rc = wp_engine_set_fault_around(e, 16)) < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_arm(e)) < 0 ||
        (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("engine", e ? rc : err);
    uint64_t before = allocated(fd);
    /* The guest writes new pages, one in each fault-around window, before
     * the sweep gets there: every write faults (the pool holds them all). */
    struct writer w = {.mem = mem, .first = populated, .count = written, .stride = stride};
    pthread_t t;
    pthread_create(&t, NULL, write_pages, &w);
    pthread_join(t, NULL);
    rc = wp_test_take_all(e, take_buf);
    wp_stats st;
    wp_engine_stats(e, &st);
    wp_engine_destroy(e);
    uint64_t growth = allocated(fd) - before;
    munmap(mem, size);
    close(fd);
    printf("memfd growth during the snapshot: %llu KiB, the guest wrote %llu KiB (faults %llu, fault-around %llu)\n",
           (unsigned long long)growth / 1024, (unsigned long long)written * 4, (unsigned long long)st.faults,
           (unsigned long long)st.pages_fault_around);
    if (rc < 0)
        return wp_test_fail("snapshot", rc);
    if (growth != written * WP_PAGE_SIZE)
        return wp_test_fail("the memfd grew by more than the guest's own writes", (long)(growth / WP_PAGE_SIZE));
    return 0;
}

int main(void)
{
    int skip = wp_test_need_wp_shared();
    if (skip)
        return skip;
    if (access("/proc/self/map_files", R_OK) != 0 || geteuid() != 0) {
        printf("SKIP: reading shared memory through its file needs /proc/self/map_files (root)\n");
        return 77;
    }
    int failed = test_shrink();
    failed |= test_growth();
    return failed;
}
