/*
 * Engine tests that drive the rig's demo guest (link libvmsnap_guest): a
 * snapshot raced by writer threads, compared with a reference copy taken at
 * the cut.
 */
#ifndef WP_TEST_GUEST_H
#define WP_TEST_GUEST_H

#include "vmsnap_guest.h"
#include "wp_test.h"

#include <stdbool.h>
#include <stdlib.h>

/* wp_test_take_into an image at hva `out`: 0, or 1 after printing FAIL. */
static inline int wp_test_take_image(wp_engine *e, uint8_t *buf, uint64_t out, uint32_t max_pages)
{
    int rc = wp_test_take_into(e, buf, (uint8_t *)(uintptr_t)out, max_pages);
    return rc < 0 ? wp_test_fail("next_batch", rc) : 0;
}

/* One raced snapshot: what to run, and what came of it. */
struct wp_test_race {
    uint32_t kind;       /* VG_MEM_* */
    uint64_t size;       /* bytes of guest memory */
    uint32_t pool_slots; /* 0: synchronous */
    bool arm;            /* arm before the cut */
    uint32_t batch;      /* pages per wp_engine_next_batch */
    uint64_t seed;
    wp_stats stats;              /* out: the engine's counters at the end */
    int64_t diff;                /* out: first page differing from the reference, -1 if none */
    int64_t written_unpopulated; /* out: pages untouched at the cut and written since */
};

/* Two writers race a snapshot of a fresh guest: its first half filled and
 * written until the cut, all of it after. The reference copy is taken while
 * the writers are frozen at the cut; the taking waits until a writer has
 * faulted (every page is protected and they write without pause, so this
 * does not hang) so that faults race the sweep for sure. Returns 0 (see
 * t->diff), or 1 after printing FAIL. */
static inline int wp_test_race_snapshot(struct wp_test_race *t)
{
    const uint64_t pages = t->size / WP_PAGE_SIZE;
    int32_t err;
    vg_guest *g = vg_create(t->size, t->kind, &err);
    if (!g)
        return wp_test_fail("vg_create", err);
    vg_fill(g, 0, pages / 2, t->seed); /* second half: never touched before the cut */
    vg_set_target(g, 0, pages / 2);
    vg_start(g, 2, 0, t->seed);
    wp_engine *e = wp_engine_create(t->pool_slots, &err);
    if (!e)
        return wp_test_fail("wp_engine_create", err);
    long rc = wp_engine_add_region(e, vg_hva(g), t->size);
    if (rc < 0)
        return wp_test_fail("add_region", rc);
    if ((rc = wp_engine_start(e)) < 0 || (t->arm && (rc = wp_engine_arm(e)) < 0))
        return wp_test_fail("start/arm", rc);
    if ((rc = vg_freeze(g, 10000)) < 0)
        return wp_test_fail("freeze", rc);
    vg_take_reference(g);
    vg_set_target(g, 0, pages);
    if ((rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("protect", rc);
    vg_thaw(g);
    do
        wp_engine_stats(e, &t->stats);
    while (t->stats.pool_used == 0);
    uint64_t out = vg_map(t->size);
    uint8_t *buf = malloc((size_t)t->batch * WP_PAGE_SIZE);
    if (!buf || wp_test_take_image(e, buf, out, t->batch))
        return 1;
    wp_engine_stats(e, &t->stats);
    if ((rc = wp_engine_destroy(e)) < 0)
        return wp_test_fail("destroy", rc);
    t->written_unpopulated = vg_count_written_unpopulated(g);
    vg_stop(g);
    t->diff = vg_compare(out, vg_reference_hva(g), t->size);
    vg_unmap(out, t->size);
    vg_destroy(g);
    free(buf);
    return 0;
}

#endif
