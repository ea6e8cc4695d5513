/*
 * Issue 11 #2: hugetlbfs guests (memfd MFD_HUGETLB, anonymous MAP_HUGETLB).
 * The kernel protects and resolves such memory only in whole huge pages;
 * the engine reads the real page size from the mapping (/proc/PID/smaps),
 * whatever the caller believes, and protects, saves and unprotects whole
 * 2 MiB pages. Host threads write random pages during the snapshot, and the
 * pages taken from the engine must equal a reference copy taken at the cut:
 *  - not armed and armed, a 64-slot pool (a huge page goes through it in
 *    chunks) and buffer 0 (synchronous);
 *  - a region not aligned to the huge page size is refused (EINVAL), a
 *    sweep batch smaller than a huge page too, with nothing left protected;
 *  - destroying the engine mid-snapshot, with writers blocked on huge pages,
 *    lets every writer run on (the watchdog turns a hang into a failure).
 * Exit 0 pass, 1 fail, 77 skip.
 *
 * Huge pages are reserved for the test (vm.nr_hugepages, as root) and the
 * setting restored afterwards; without them the test skips, saying why.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "wp_test_guest.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define HUGE (2 * MIB)
#define SIZE (16 * MIB)
#define PAGES (SIZE / WP_PAGE_SIZE)
#define BATCH 1024 /* pages per next_batch: at least one huge page */
#define RESERVE 12 /* huge pages: one 16 MiB guest at a time, plus margin */
#define NR_HUGEPAGES "/proc/sys/vm/nr_hugepages"
#ifndef HANG_SECONDS
#define HANG_SECONDS 60
#endif

static _Atomic int progress; /* steps finished; the watchdog checks it moves */
static struct wp_test_watchdog dog_spec = {&progress, HANG_SECONDS, "step",
                                           "a writer stayed blocked on a huge page (or the snapshot never ended)"};

static long read_long(const char *path)
{
    FILE *f = fopen(path, "r");
    long v = -1;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = -1;
        fclose(f);
    }
    return v;
}

static int write_long(const char *path, long v)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    int rc = fprintf(f, "%ld\n", v) < 0 ? -EIO : 0;
    return fclose(f) == 0 ? rc : -errno;
}

static const char *kind_name(uint32_t kind)
{
    return kind == VG_MEM_HUGETLB ? "memfd MFD_HUGETLB" : "anonymous MAP_HUGETLB";
}

/* Writers race a snapshot of a hugetlbfs guest; it must equal the reference at the cut. */
static int snapshot_while_writing(uint32_t kind, uint32_t pool_slots, bool arm)
{
    struct wp_test_race t = {.kind = kind, .size = SIZE, .pool_slots = pool_slots, .arm = arm, .batch = BATCH, .seed = 11};
    if (wp_test_race_snapshot(&t))
        return 1;
    const wp_stats *st = &t.stats;
    printf("%s pool=%u arm=%d: faults=%llu fallbacks=%llu swept=%llu zero=%llu arm_faults=%llu cut_pages=%llu "
           "written-unpopulated=%lld\n",
           kind_name(kind), pool_slots, arm, (unsigned long long)st->faults, (unsigned long long)st->fallbacks,
           (unsigned long long)st->pages_swept, (unsigned long long)st->pages_zero, (unsigned long long)st->arm_faults,
           (unsigned long long)st->cut_pages, (long long)t.written_unpopulated);
    if (t.diff >= 0)
        return wp_test_fail("the snapshot differs from the reference at the cut at page", t.diff);
    if (st->pages_saved != PAGES || st->faults * (HUGE / WP_PAGE_SIZE) + st->pages_swept != PAGES)
        return wp_test_fail("pages captured != pages (whole huge pages, once each)", (long)st->pages_saved);
    if (arm && st->cut_pages % (HUGE / WP_PAGE_SIZE))
        return wp_test_fail("the cut re-protected part of a huge page", (long)st->cut_pages);
    if (st->faults == 0)
        return wp_test_fail("no write fault raced the snapshot", 0);
    atomic_fetch_add(&progress, 1);
    return 0;
}

/* Refusals leave nothing protected: the memory stays writable at once. */
static int refusals(uint32_t kind)
{
    int32_t err;
    vg_guest *g = vg_create(SIZE, kind, &err);
    wp_engine *e = g ? wp_engine_create(64, &err) : NULL;
    if (!e)
        return wp_test_fail("create", err);
    uint8_t *mem = (uint8_t *)(uintptr_t)vg_hva(g);
    long half = wp_engine_add_region(e, vg_hva(g) + WP_PAGE_SIZE, HUGE);
    long part = wp_engine_add_region(e, vg_hva(g), HUGE + WP_PAGE_SIZE);
    printf("%s: region at +4 KiB -> %s, 2 MiB + 4 KiB -> %s\n", kind_name(kind), strerror((int)-half),
           strerror((int)-part));
    if (half != -EINVAL || part != -EINVAL)
        return wp_test_fail("a region not aligned to its huge pages was not refused with EINVAL", half != -EINVAL ? half : part);
    long rc = wp_engine_add_region(e, vg_hva(g), SIZE);
    if (rc < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("register/protect", rc);
    uint8_t buf[256 * WP_PAGE_SIZE];
    uint32_t regions[256];
    uint64_t pages[256];
    uint8_t flags[256];
    rc = wp_engine_next_batch(e, buf, regions, pages, flags, 256);
    if (rc != -EINVAL)
        return wp_test_fail("a batch smaller than a huge page was not refused with EINVAL", rc);
    wp_engine_destroy(e);
    mem[5 * WP_PAGE_SIZE] = 1; /* blocks forever if anything stayed protected (watchdog) */
    vg_destroy(g);
    atomic_fetch_add(&progress, 1);
    return 0;
}

/* Destroyed mid-snapshot (a failure path): writers blocked on huge pages,
 * including one whose huge page is half copied into a full pool, run on. */
static int destroy_mid_snapshot(uint32_t kind)
{
    int32_t err;
    vg_guest *g = vg_create(SIZE, kind, &err);
    wp_engine *e = g ? wp_engine_create(16, &err) : NULL;
    if (!e)
        return wp_test_fail("create", err);
    vg_fill(g, 0, PAGES, 3);
    vg_start(g, 2, 0, 9);
    long rc = wp_engine_add_region(e, vg_hva(g), SIZE);
    if (rc < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("register/protect", rc);
    /* Nobody takes pages: the 16-slot pool fills within the first huge page
     * and the fault thread waits for the writer, its writers blocked. */
    wp_stats st;
    do
        wp_engine_stats(e, &st);
    while (st.fallbacks == 0);
    wp_engine_destroy(e);
    vg_stop(g); /* joins the writers: hangs (watchdog) if one stayed blocked */
    printf("%s: destroyed with the pool full mid huge page: writers ran on\n", kind_name(kind));
    vg_destroy(g);
    atomic_fetch_add(&progress, 1);
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int skip = wp_test_need_wp_unpopulated();
    if (skip)
        return skip;
    long before = read_long(NR_HUGEPAGES);
    if (before < 0) {
        printf("SKIP: %s cannot be read: no hugetlbfs here\n", NR_HUGEPAGES);
        return 77;
    }
    if (write_long(NR_HUGEPAGES, before + RESERVE) < 0) {
        printf("SKIP: cannot reserve huge pages (writing %s needs root)\n", NR_HUGEPAGES);
        return 77;
    }
    int32_t err;
    vg_guest *probe = vg_create(SIZE, VG_MEM_HUGETLB, &err);
    if (!probe) {
        printf("SKIP: no %llu MiB of 2 MiB huge pages could be mapped (%s; nr_hugepages %ld -> %ld)\n",
               (unsigned long long)(SIZE / MIB), strerror(-err), before, read_long(NR_HUGEPAGES));
        write_long(NR_HUGEPAGES, before);
        return 77;
    }
    vg_destroy(probe);
    /* The tests run in a child, so the setting is put back whatever becomes
     * of it (the watchdog exits at once). */
    pid_t child = fork();
    if (child == 0) {
        pthread_t dog;
        pthread_create(&dog, NULL, wp_test_watchdog_run, &dog_spec);
        int failed = 0;
        for (uint32_t kind = VG_MEM_HUGETLB; kind <= VG_MEM_HUGETLB_ANON && !failed; kind++)
            failed = snapshot_while_writing(kind, 64, false) || snapshot_while_writing(kind, 64, true) ||
                     snapshot_while_writing(kind, 0, false) || snapshot_while_writing(kind, 2048, true) ||
                     refusals(kind) || destroy_mid_snapshot(kind);
        _exit(failed);
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) < 0)
        status = 1 << 8;
    write_long(NR_HUGEPAGES, before);
    int failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    printf(failed ? "FAIL\n" : "PASS\n");
    return failed;
}
