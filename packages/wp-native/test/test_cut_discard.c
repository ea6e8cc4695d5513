/*
 * A guest thread that discards memory while the cut runs (a balloon or an
 * allocator thread the VMM did not pause) must not hang the cut. The fault
 * thread read such a discard (UFFD_EVENT_REMOVE) and waited for the cut to
 * end before marking its pages; the cut, re-protecting the pages written
 * while armed, got EAGAIN from the kernel for the discarder's next event,
 * which only the fault thread reads: both waited for ever, every writer
 * blocked. Many cuts with a thread discarding without pause and writers
 * making the cut re-protect many pages; each cut must finish, and each
 * snapshot must then complete or fail with -ENODATA (the discard took pages
 * not saved yet). Exit 0 pass, 1 fail, 77 skip.
 *
 * A watchdog turns a hang into a failure: a liveness bound, not a timing
 * assertion.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "vmsnap_guest.h"
#include "wp_test.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define CUTS 30
#define WRITERS 2
#define DISCARD_PAGES 16u
#define HANG_SECONDS 30

static _Atomic int progress; /* cuts finished; the watchdog checks it moves */
static _Atomic int stop;
static _Atomic uint64_t discards;
static uint8_t *discarded_range;

static struct wp_test_watchdog dog_spec = {&progress, HANG_SECONDS, "cut",
                                           "the cut and the fault thread wait for each other over a discard"};

static void *discard_loop(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        if (madvise(discarded_range, DISCARD_PAGES * WP_PAGE_SIZE, MADV_DONTNEED) == 0)
            atomic_fetch_add(&discards, 1);
    }
    return NULL;
}

int main(void)
{
    int rc = wp_test_need_wp_unpopulated();
    if (rc)
        return rc;
    const uint64_t size = 64 * MIB;
    int32_t err;
    vg_guest *g = vg_create(size, VG_MEM_ANON, &err);
    if (!g)
        return wp_test_fail("vg_create", err);
    vg_fill(g, 0, size / WP_PAGE_SIZE, 5);
    discarded_range = (uint8_t *)(uintptr_t)vg_hva(g) + size - DISCARD_PAGES * WP_PAGE_SIZE;
    if ((rc = vg_start(g, WRITERS, 0, 9)) < 0)
        return wp_test_fail("vg_start", rc);
    pthread_t dog, discarder;
    pthread_create(&dog, NULL, wp_test_watchdog_run, &dog_spec);
    pthread_create(&discarder, NULL, discard_loop, NULL);
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    int exact = 0, lost = 0;
    for (int cut = 0; cut < CUTS; cut++) {
        wp_engine *e = wp_engine_create(1024, &err);
        if (!e)
            return wp_test_fail("wp_engine_create", err);
        if ((rc = wp_engine_add_region(e, vg_hva(g), size)) < 0 || (rc = wp_engine_start(e)) < 0)
            return wp_test_fail("register/start", rc);
        if ((rc = wp_engine_arm(e)) < 0)
            return wp_test_fail("arm", rc);
        usleep(3000 + (useconds_t)(cut % 5) * 1000); /* writers fault while armed: the cut re-protects their pages */
        if ((rc = wp_engine_protect(e)) < 0)
            return wp_test_fail("cut", rc);
        rc = wp_test_take_all(e, buf);
        if (rc == -ENODATA)
            lost++;
        else if (rc < 0)
            return wp_test_fail("snapshot: expected success or -ENODATA", rc);
        else
            exact++;
        wp_engine_destroy(e);
        atomic_fetch_add(&progress, 1);
    }
    atomic_store(&stop, 1);
    pthread_join(discarder, NULL);
    vg_stop(g);
    vg_destroy(g);
    free(buf);
    printf("cut with a discarding thread: %d cuts, %d exact, %d failed naming the discard, %llu discards\n", CUTS, exact,
           lost, (unsigned long long)atomic_load(&discards));
    if (atomic_load(&discards) < (uint64_t)CUTS)
        return wp_test_fail("the thread hardly discarded: the test did not test the cut against discards",
                            (long)atomic_load(&discards));
    return 0;
}
