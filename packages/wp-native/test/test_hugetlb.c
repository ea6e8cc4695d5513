/*
 * Issue 11 #2: hugetlbfs guests (memfd MFD_HUGETLB, anonymous MAP_HUGETLB).
 * The kernel protects and resolves such memory only in whole huge pages;
 * the engine reads the real page size from the mapping (/proc/PID/smaps),
 * whatever the caller believes, and protects, saves and unprotects whole
 * huge pages. Host threads write random pages during the snapshot, and the
 * pages taken from the engine must equal a reference copy taken at the cut:
 *  - not armed and armed, a 64-slot pool (a huge page goes through it in
 *    chunks), buffer 0 (synchronous), batches smaller than a huge page;
 *  - a huge page larger than a batch (2 MiB; 1 GiB) is swept over several
 *    calls and stays protected until the last: a write made meanwhile
 *    waits, is not in the snapshot, and goes through at the end;
 *  - a region not aligned to the huge page size is refused (EINVAL), with
 *    nothing left protected;
 *  - destroying the engine mid-snapshot, with writers blocked on huge pages,
 *    lets every writer run on (the watchdog turns a hang into a failure).
 * Exit 0 pass, 1 fail, 77 skip.
 *
 * Huge pages are reserved for the test (vm.nr_hugepages and the 1 GiB
 * pool in sysfs, as root) and the settings restored afterwards; without
 * 2 MiB pages the test skips, without a 1 GiB page that part does, saying why.
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
#define BATCH 1024 /* pages per next_batch: two huge pages */
#define RESERVE 12 /* huge pages: one 16 MiB guest at a time, plus margin */
#define NR_HUGEPAGES "/proc/sys/vm/nr_hugepages"
#define NR_1G "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
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

/* Adds `delta` huge pages to a pool setting, relative to its value now, not
 * to one read earlier (test runs of several checkouts at once each take back
 * only their own); returns how many the kernel added (it may find fewer),
 * or -errno. */
static long add_huge_pages(const char *path, long delta)
{
    long now = read_long(path);
    if (now < 0)
        return -ENOENT;
    int rc = write_long(path, now + delta > 0 ? now + delta : 0);
    return rc < 0 ? rc : read_long(path) - now;
}

static const char *kind_name(uint32_t kind)
{
    return kind == VG_MEM_HUGETLB ? "memfd MFD_HUGETLB" : kind == VG_MEM_HUGETLB_1G ? "memfd MFD_HUGETLB 1 GiB" : "anonymous MAP_HUGETLB";
}

/* Writers race a snapshot of a hugetlbfs guest; it must equal the reference at the cut. */
static int snapshot_while_writing(uint32_t kind, uint32_t pool_slots, bool arm, uint32_t batch)
{
    struct wp_test_race t = {.kind = kind, .size = SIZE, .pool_slots = pool_slots, .arm = arm, .batch = batch, .seed = 11};
    if (wp_test_race_snapshot(&t))
        return 1;
    const wp_stats *st = &t.stats;
    printf("%s pool=%u arm=%d batch=%u: faults=%llu fallbacks=%llu swept=%llu zero=%llu arm_faults=%llu cut_pages=%llu "
           "written-unpopulated=%lld\n",
           kind_name(kind), pool_slots, arm, batch, (unsigned long long)st->faults, (unsigned long long)st->fallbacks,
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
    wp_engine_destroy(e);
    mem[5 * WP_PAGE_SIZE] = 1; /* blocks forever if anything stayed protected (watchdog) */
    vg_destroy(g);
    atomic_fetch_add(&progress, 1);
    return 0;
}

/* A writer blocked on a huge page the sweep takes over several calls. */
struct blocked_write {
    volatile uint64_t *at;
    _Atomic bool done;
};

static void *write_once(void *arg)
{
    struct blocked_write *w = arg;
    *w->at = 0xB10CCEDull;
    atomic_store(&w->done, true);
    return NULL;
}

/* A huge page larger than one batch (2 MiB in 256-page batches, 1 GiB in
 * 1024-page ones) is swept over several calls: it stays protected until the
 * last, so a write to its last page, made after the first batch, waits and
 * is not in the snapshot; the last call's unprotect lets it through. */
static int swept_over_calls(uint32_t kind, uint64_t size, uint32_t batch)
{
    const uint64_t pages = size / WP_PAGE_SIZE;
    int32_t err;
    vg_guest *g = vg_create(size, kind, &err);
    wp_engine *e = g ? wp_engine_create(64, &err) : NULL;
    if (!e)
        return wp_test_fail("create", err);
    vg_fill(g, 0, pages, 21);
    vg_take_reference(g); /* no writer runs: the memory at the cut */
    long rc = wp_engine_add_region(e, vg_hva(g), size);
    if (rc < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("register/protect", rc);
    uint8_t *buf = malloc((size_t)batch * WP_PAGE_SIZE);
    uint64_t out = vg_map(size);
    uint32_t regions[batch];
    uint64_t page_of[batch];
    uint8_t flags[batch];
    int n = wp_engine_next_batch(e, buf, regions, page_of, flags, batch);
    if (n != (int)batch || page_of[0] != 0)
        return wp_test_fail("the first batch was not the first pages of the first huge page", n);
    for (int i = 0, d = 0; i < n; i++)
        memcpy((uint8_t *)(uintptr_t)(out + page_of[i] * WP_PAGE_SIZE),
               flags[i] == WP_PAGE_DATA ? buf + (size_t)d++ * WP_PAGE_SIZE : (uint8_t[WP_PAGE_SIZE]){0}, WP_PAGE_SIZE);
    uint64_t unit = kind == VG_MEM_HUGETLB_1G ? (1ull << 30) / WP_PAGE_SIZE : HUGE / WP_PAGE_SIZE;
    struct blocked_write w = {.at = (volatile uint64_t *)(uintptr_t)(vg_hva(g) + (unit - 1) * WP_PAGE_SIZE)};
    pthread_t t;
    pthread_create(&t, NULL, write_once, &w);
    usleep(20000); /* lets the write fault; whether it has or not, it must not be through */
    bool through_early = atomic_load(&w.done);
    if (wp_test_take_image(e, buf, out, batch))
        return 1;
    pthread_join(t, NULL); /* hangs (watchdog) if the last unprotect did not wake it */
    wp_stats st;
    wp_engine_stats(e, &st);
    wp_engine_destroy(e);
    int64_t diff = vg_compare(out, vg_reference_hva(g), size);
    printf("%s %llu MiB, %u-page batches: swept=%llu faults=%llu spurious=%llu, the write waited: %s\n", kind_name(kind),
           (unsigned long long)(size / MIB), batch, (unsigned long long)st.pages_swept, (unsigned long long)st.faults,
           (unsigned long long)st.faults_spurious, through_early ? "no" : "yes");
    if (through_early)
        return wp_test_fail("a write went through a huge page the sweep had not finished", 0);
    if (diff >= 0)
        return wp_test_fail("the snapshot differs from the memory at the cut at page", diff);
    if (*w.at != 0xB10CCEDull || st.pages_swept != pages)
        return wp_test_fail("the write was lost, or the sweep did not take every page", (long)st.pages_swept);
    vg_unmap(out, size);
    vg_destroy(g);
    free(buf);
    atomic_fetch_add(&progress, 1);
    return 0;
}

/* 1 GiB pages: one reserved for the test (sysfs), its setting put back. */
static int one_gib_pages(void)
{
    long before = read_long(NR_1G), added = before < 0 ? -1 : add_huge_pages(NR_1G, 1);
    if (added < 0) {
        printf("SKIP the 1 GiB part: %s cannot be written (no 1 GiB pages here, or not root)\n", NR_1G);
        return 0;
    }
    int32_t err;
    vg_guest *probe = vg_create(1ull << 30, VG_MEM_HUGETLB_1G, &err);
    int failed = 0;
    if (!probe)
        printf("SKIP the 1 GiB part: no 1 GiB page could be mapped (%s; %s %ld -> %ld)\n", strerror(-err), NR_1G,
               before, read_long(NR_1G));
    else {
        vg_destroy(probe);
        failed = swept_over_calls(VG_MEM_HUGETLB_1G, 1ull << 30, 1024);
    }
    add_huge_pages(NR_1G, -added);
    return failed;
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
    long added = add_huge_pages(NR_HUGEPAGES, RESERVE);
    if (added < 0) {
        printf("SKIP: cannot reserve huge pages (writing %s needs root)\n", NR_HUGEPAGES);
        return 77;
    }
    int32_t err;
    vg_guest *probe = vg_create(SIZE, VG_MEM_HUGETLB, &err);
    if (!probe) {
        printf("SKIP: no %llu MiB of 2 MiB huge pages could be mapped (%s; nr_hugepages %ld -> %ld)\n",
               (unsigned long long)(SIZE / MIB), strerror(-err), before, read_long(NR_HUGEPAGES));
        add_huge_pages(NR_HUGEPAGES, -added);
        return 77;
    }
    vg_destroy(probe);
    /* The tests run in a child, so the reservation is taken back whatever
     * becomes of it (the watchdog exits at once). */
    pid_t child = fork();
    if (child == 0) {
        pthread_t dog;
        pthread_create(&dog, NULL, wp_test_watchdog_run, &dog_spec);
        int failed = 0;
        for (uint32_t kind = VG_MEM_HUGETLB; kind <= VG_MEM_HUGETLB_ANON && !failed; kind++)
            failed = snapshot_while_writing(kind, 64, false, BATCH) || snapshot_while_writing(kind, 64, true, BATCH) ||
                     snapshot_while_writing(kind, 0, false, BATCH) || snapshot_while_writing(kind, 2048, true, BATCH) ||
                     snapshot_while_writing(kind, 256, false, 256) || swept_over_calls(kind, SIZE, 256) ||
                     refusals(kind) || destroy_mid_snapshot(kind);
        _exit(failed || one_gib_pages());
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) < 0)
        status = 1 << 8;
    add_huge_pages(NR_HUGEPAGES, -added);
    int failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    printf(failed ? "FAIL\n" : "PASS\n");
    return failed;
}
