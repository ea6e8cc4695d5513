/*
 * The engine's core promise, without any TypeScript: writers keep writing
 * during the snapshot, and the pages taken from the pool and the sweep equal
 * a reference copy taken at the cut. Exit 0 pass, 1 fail, 77 skip.
 */
#include "vmsnap_engine.h"
#include "wp_test_guest.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1ull << 20)

static int run(uint32_t kind, uint32_t pool_slots)
{
    const uint64_t size = 64 * MIB, pages = size / WP_PAGE_SIZE;
    struct wp_test_race t = {.kind = kind, .size = size, .pool_slots = pool_slots, .batch = 256, .seed = 7};
    if (wp_test_race_snapshot(&t))
        return 1;
    const wp_stats *st = &t.stats;
    printf("kind=%u pool=%u faults=%llu fallbacks=%llu swept=%llu zero=%llu written-unpopulated=%lld\n", kind,
           pool_slots, (unsigned long long)st->faults, (unsigned long long)st->fallbacks,
           (unsigned long long)st->pages_swept, (unsigned long long)st->pages_zero, (long long)t.written_unpopulated);
    if (t.diff >= 0)
        return wp_test_fail("snapshot differs from the reference at page", t.diff);
    if (st->pages_saved != pages || st->faults + st->pages_swept != pages)
        return wp_test_fail("pages captured != pages", (long)st->pages_saved);
    if (st->faults == 0 || t.written_unpopulated <= 0)
        return wp_test_fail("the writers never raced the snapshot", 0);
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
        return wp_test_fail("create", err);
    vg_fill(g, 0, pages, 3);
    volatile uint64_t *word = (volatile uint64_t *)(uintptr_t)(vg_hva(g) + 3 * WP_PAGE_SIZE);
    long rc;
    if ((rc = wp_engine_add_region(e, vg_hva(g), size)) < 0 || (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_arm(e)) < 0)
        return wp_test_fail("arm", rc);
    *word = 0xA; /* armed: noted, let through */
    if ((rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("cut", rc);
    *word = 0xB; /* after the cut: page 3 must be saved holding 0xA */
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    uint64_t out = vg_map(size);
    if (wp_test_take_image(e, buf, out, 256))
        return 1;
    uint64_t seen;
    memcpy(&seen, (const void *)(uintptr_t)(out + 3 * WP_PAGE_SIZE), 8);
    vg_unmap(out, size);
    wp_stats st;
    wp_engine_stats(e, &st);
    wp_engine_destroy(e);
    printf("arm/cut: arm_faults=%llu cut_pages=%llu page3=%#llx now=%#llx\n", (unsigned long long)st.arm_faults,
           (unsigned long long)st.cut_pages, (unsigned long long)seen, (unsigned long long)*word);
    if (seen != 0xA || *word != 0xB || st.cut_pages != 1 || st.arm_faults != 1)
        return wp_test_fail("a write while armed was not captured at the cut", 0);
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
        return wp_test_fail("wp_probe", rc);
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
