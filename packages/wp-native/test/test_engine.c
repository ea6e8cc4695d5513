/*
 * The engine's core promise, without any TypeScript: writers keep writing
 * during the snapshot, and the pages taken from the pool and the sweep equal
 * a reference copy taken at the cut. Exit 0 pass, 1 fail, 77 skip.
 */
#include "vmsnap_guest.h"
#include "vmsnap_engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1ull << 20)

static int fail(const char *what, long rc)
{
    fprintf(stderr, "FAIL: %s (%ld: %s)\n", what, rc, rc < 0 ? strerror((int)-rc) : "");
    return 1;
}

/* One batch from the engine, copied to out at each page's offset (region 0). */
static int take_batch(wp_engine *e, uint8_t *buf, uint64_t out)
{
    uint32_t regions[256];
    uint64_t pages[256];
    uint8_t flags[256];
    int n = wp_engine_next_batch(e, buf, regions, pages, flags, 256);
    for (int i = 0, d = 0; i < n; i++) {
        uint8_t *dst = (uint8_t *)(uintptr_t)(out + pages[i] * WP_PAGE_SIZE);
        if (flags[i] == WP_PAGE_DATA)
            memcpy(dst, buf + (size_t)d++ * WP_PAGE_SIZE, WP_PAGE_SIZE);
        else
            memset(dst, 0, WP_PAGE_SIZE);
    }
    return n;
}

static int run(uint32_t kind, uint32_t pool_slots)
{
    const uint64_t size = 64 * MIB, pages = size / WP_PAGE_SIZE;
    int32_t err;
    vg_guest *g = vg_create(size, kind, &err);
    if (!g)
        return fail("vg_create", err);
    vg_fill(g, 0, pages / 2, 7); /* second half: never touched before the cut */
    vg_set_target(g, 0, pages / 2);
    vg_start(g, 2, 0, 1);
    wp_engine *e = wp_engine_create(pool_slots, &err);
    if (!e)
        return fail("wp_engine_create", err);
    long rc = wp_engine_add_region(e, vg_hva(g), size);
    if (rc < 0)
        return fail("add_region", rc);
    if ((rc = wp_engine_start(e)) < 0)
        return fail("start", rc);

    if ((rc = vg_freeze(g, 10000)) < 0)
        return fail("freeze", rc);
    vg_take_reference(g);
    vg_set_target(g, 0, pages);
    if ((rc = wp_engine_protect(e)) < 0)
        return fail("protect", rc);
    vg_thaw(g);

    /* Let the writers race the sweep for sure: wait until one of them has
     * faulted (its page is in the pool) before taking anything. Every page
     * is protected and they write without pause, so this does not hang. */
    wp_stats st;
    do
        wp_engine_stats(e, &st);
    while (st.pool_used == 0);
    uint64_t out = vg_map(size);
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    while (!wp_engine_done(e)) {
        int n = take_batch(e, buf, out);
        if (n < 0)
            return fail("next_batch", n);
    }
    wp_engine_stats(e, &st);
    wp_engine_destroy(e);
    int64_t written_unpopulated = vg_count_written_unpopulated(g);
    vg_stop(g);
    int64_t diff = vg_compare(out, vg_reference_hva(g), size);
    printf("kind=%u pool=%u faults=%llu fallbacks=%llu swept=%llu zero=%llu written-unpopulated=%lld\n", kind,
           pool_slots, (unsigned long long)st.faults, (unsigned long long)st.fallbacks,
           (unsigned long long)st.pages_swept, (unsigned long long)st.pages_zero, (long long)written_unpopulated);
    if (diff >= 0)
        return fail("snapshot differs from the reference at page", diff);
    if (st.pages_saved != pages || st.faults + st.pages_swept != pages)
        return fail("pages captured != pages", (long)st.pages_saved);
    if (st.faults == 0 || written_unpopulated <= 0)
        return fail("the writers never raced the snapshot", 0);
    vg_unmap(out, size);
    vg_destroy(g);
    free(buf);
    return 0;
}

/* Arming: a write while armed is let through and noted; the cut re-protects
 * that page, so a write after the cut is captured with the value at the cut. */
static int test_arm_cut(void)
{
    const uint64_t size = 4 * MIB, pages = size / WP_PAGE_SIZE;
    int32_t err;
    vg_guest *g = vg_create(size, VG_MEM_ANON, &err);
    wp_engine *e = g ? wp_engine_create(64, &err) : NULL;
    if (!e)
        return fail("create", err);
    vg_fill(g, 0, pages, 3);
    volatile uint64_t *word = (volatile uint64_t *)(uintptr_t)(vg_hva(g) + 3 * WP_PAGE_SIZE);
    long rc;
    if ((rc = wp_engine_add_region(e, vg_hva(g), size)) < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_arm(e)) < 0)
        return fail("arm", rc);
    *word = 0xA; /* armed: noted, let through */
    if ((rc = wp_engine_protect(e)) < 0)
        return fail("cut", rc);
    *word = 0xB; /* after the cut: page 3 must be saved holding 0xA */
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    uint64_t out = vg_map(size);
    while (!wp_engine_done(e))
        if ((rc = take_batch(e, buf, out)) < 0)
            return fail("next_batch", rc);
    uint64_t seen;
    memcpy(&seen, (const void *)(uintptr_t)(out + 3 * WP_PAGE_SIZE), 8);
    vg_unmap(out, size);
    wp_stats st;
    wp_engine_stats(e, &st);
    wp_engine_destroy(e);
    printf("arm/cut: arm_faults=%llu cut_pages=%llu page3=%#llx now=%#llx\n", (unsigned long long)st.arm_faults,
           (unsigned long long)st.cut_pages, (unsigned long long)seen, (unsigned long long)*word);
    if (seen != 0xA || *word != 0xB || st.cut_pages != 1 || st.arm_faults != 1)
        return fail("a write while armed was not captured at the cut", 0);
    vg_destroy(g);
    free(buf);
    return 0;
}

int main(void)
{
    uint64_t features;
    int32_t how;
    int32_t rc = wp_probe(&features, &how);
    if (rc == -EPERM || rc == -ENOSYS) {
        printf("SKIP: userfaultfd unavailable: %s\n", strerror(-rc));
        return 77;
    }
    if (rc < 0)
        return fail("wp_probe", rc);
    if (!(features & WP_FEATURE_WP_UNPOPULATED)) {
        printf("SKIP: kernel lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)\n");
        return 77;
    }
    for (uint32_t kind = VG_MEM_ANON; kind <= VG_MEM_MEMFD; kind++)
        if (run(kind, 64) || run(kind, 0))
            return 1;
    if (test_arm_cut())
        return 1;
    printf("PASS\n");
    return 0;
}
