/*
 * The writer's next batch (wp_engine_next_batch): the engine decides what
 * the writer saves next. First the pages the fault thread put in the pool
 * (that frees the memory a faulting vCPU may wait for), then a sweep of
 * not-yet-saved pages: where the guest last faulted (so it meets saved pages
 * instead of faulting on each), else the next run in address order. A sweep
 * is one claim pass, one copy pass and one unprotect ioctl per contiguous run
 * per process. Called from one thread at a time (the writer's).
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

bool wp_page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (size_t i = 0; i < WP_PAGE_SIZE / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

/* Is a page worth reading? map[page - base] & 1; without a map, always. */
static inline bool resident(const uint8_t *map, uint64_t base, uint64_t page)
{
    return !map || (map[page - base] & 1);
}

/* After the cut, once: which pages of each shared-memory region's file hold
 * data (the rest are holes: zero, never read). Pages that are holes now were
 * holes at the cut or were discarded since (discard.c checks those), and a
 * guest write into a hole after the cut is a fault that claims the page
 * first, so the map stays right for every page the sweep still claims. A
 * file that shrank gets no map: reading it then fails the snapshot. */
static void build_populated_maps(wp_engine *e)
{
    e->populated_built = true;
    for (uint32_t i = 0; i < e->region_count; i++) {
        struct wp_region *r = &e->regions[i];
        if (r->fd < 0)
            continue;
        uint8_t *map = malloc(r->pages);
        if (map && wp_backing_data_map(r->fd, r->fd_offset, r->pages, map) == 0)
            atomic_store_explicit(&r->populated, map, memory_order_release);
        else
            free(map);
    }
}

/* The pages a sweep of `region` covers from `first_page` on: whole units
 * (huge pages), as many as fit in max_pages, or one unit larger than that
 * (taken over several calls: sweep_big). */
static uint64_t sweep_span(const struct wp_region *r, uint32_t max_pages)
{
    return r->unit > max_pages ? r->unit : max_pages - max_pages % r->unit;
}

static void capture(wp_engine *e, uint32_t region, uint64_t first_page, uint64_t count, uint32_t n, uint8_t *buf,
                    const uint64_t *pages_out, uint8_t *flags_out);

/* The next max_pages pages of the unit being swept over several calls; once
 * all of it is taken, it is saved and unprotected whole, which wakes the
 * writers that faulted on it meanwhile (the fault thread does not wait for
 * it). It stays write-protected until then, so every chunk is its content
 * at the cut. */
static uint32_t sweep_big(wp_engine *e, uint32_t max_pages, uint8_t *buf, uint32_t *regions_out, uint64_t *pages_out,
                          uint8_t *flags_out)
{
    struct wp_region *r = &e->regions[e->big_region];
    uint64_t first = e->big_head + e->big_done, left = r->unit - e->big_done;
    uint32_t n = left < max_pages ? (uint32_t)left : max_pages;
    for (uint32_t i = 0; i < n; i++) {
        regions_out[i] = e->big_region;
        pages_out[i] = first + i;
    }
    capture(e, e->big_region, first, n, n, buf, pages_out, flags_out);
    e->pages_swept += n;
    e->big_done += n;
    if (e->big_done == r->unit) {
        e->big_active = false;
        wp_mark_saved(e, r, e->big_head);
        wp_unprotect_pages(e, e->big_region, e->big_head, r->unit);
    }
    return n;
}

/* Capture every not-yet-saved unit of [first_page, first_page + span) of a
 * region (first_page rounded down to its unit); returns the number of
 * entries, one per 4 KiB page (see wp_engine_next_batch). */
static uint32_t sweep(wp_engine *e, uint32_t region, uint64_t first_page, uint32_t max_pages, uint8_t *buf,
                      uint32_t *regions_out, uint64_t *pages_out, uint8_t *flags_out)
{
    struct wp_region *r = &e->regions[region];
    first_page = wp_unit_head(r, first_page);
    if (first_page >= r->pages)
        return 0;
    if (r->unit > max_pages) {
        if (!wp_claim_page(r, first_page))
            return 0;
        e->big_active = true;
        e->big_region = region;
        e->big_head = first_page;
        e->big_done = 0;
        return sweep_big(e, max_pages, buf, regions_out, pages_out, flags_out);
    }
    uint64_t span = sweep_span(r, max_pages);
    uint64_t end = first_page + span < r->pages ? first_page + span : r->pages;
    uint64_t count = end - first_page;

    /* Claim first, so the residency check and the copies see frozen pages. */
    uint32_t n = 0;
    for (uint64_t p = first_page; p < end; p += r->unit)
        if (wp_claim_page(r, p))
            for (uint64_t k = 0; k < r->unit; k++) {
                regions_out[n] = region;
                pages_out[n++] = p + k;
            }
    if (n == 0)
        return 0;
    capture(e, region, first_page, count, n, buf, pages_out, flags_out);
    for (uint32_t i = 0; i < n; i += (uint32_t)r->unit)
        wp_mark_saved(e, r, pages_out[i]); /* a unit's head */
    e->pages_swept += n;
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = i + 1;
        while (j < n && pages_out[j] == pages_out[j - 1] + 1)
            j++;
        wp_unprotect_pages(e, region, pages_out[i], j - i);
        i = j;
    }
    return n;
}

/* Copy the n claimed pages pages_out[] (all within [first_page, first_page
 * + count) of a region) into buf, packed, with flags_out[] saying which are
 * zero. They are still write-protected. */
static void capture(wp_engine *e, uint32_t region, uint64_t first_page, uint64_t count, uint32_t n, uint8_t *buf,
                    const uint64_t *pages_out, uint8_t *flags_out)
{
    struct wp_region *r = &e->regions[region];
    /* Shared memory: holes of its file. Otherwise pages not resident in our
     * view, trusted only without swap (a swapped-out page is not resident). */
    const uint8_t *map = NULL;
    uint64_t base = 0;
    if (r->fd >= 0)
        map = atomic_load_explicit(&r->populated, memory_order_relaxed); /* built by this thread */
    else if (r->view && e->check_residency &&
             mincore((void *)(r->view + first_page * WP_PAGE_SIZE), count * WP_PAGE_SIZE, e->residency) == 0) {
        map = e->residency;
        base = first_page;
    }
    /* Each run of consecutive resident claimed pages is read with one call
     * (for a remote process, one process_vm_readv), into buf at the end of
     * the data kept so far; zero pages are then dropped and the rest packed. */
    size_t data_pages = 0;
    for (uint32_t i = 0; i < n;) {
        if (!resident(map, base, pages_out[i])) {
            wp_check_discarded(e, region, pages_out[i], 1, NULL); /* a hole: not read, maybe discarded */
            flags_out[i++] = WP_PAGE_ZERO;
            e->pages_zero++;
            continue;
        }
        uint32_t j = i + 1;
        while (j < n && pages_out[j] == pages_out[j - 1] + 1 && resident(map, base, pages_out[j]))
            j++;
        uint8_t *run = buf + data_pages * WP_PAGE_SIZE;
        wp_read_pages(e, region, pages_out[i], j - i, run);
        for (uint32_t k = i; k < j; k++) {
            const uint8_t *src = run + (size_t)(k - i) * WP_PAGE_SIZE;
            if (wp_page_is_zero(src)) {
                flags_out[k] = WP_PAGE_ZERO;
                e->pages_zero++;
                wp_check_punched(e, region, pages_out[k]);
                continue;
            }
            flags_out[k] = WP_PAGE_DATA;
            uint8_t *dst = buf + data_pages++ * WP_PAGE_SIZE;
            if (dst != src)
                memmove(dst, src, WP_PAGE_SIZE);
        }
        i = j;
    }
}

/* Pool pages: drop the zero ones' data (fault-around saves untouched
 * neighbours too) and pack the rest in entry order. */
static uint32_t pack_pool_pages(wp_engine *e, uint8_t *buf, const uint32_t *regions, const uint64_t *pages,
                                uint8_t *flags_out, uint32_t n)
{
    size_t data_pages = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *src = buf + (size_t)i * WP_PAGE_SIZE;
        if (wp_page_is_zero(src)) {
            flags_out[i] = WP_PAGE_ZERO;
            wp_check_punched(e, regions[i], pages[i]);
            continue;
        }
        flags_out[i] = WP_PAGE_DATA;
        uint8_t *dst = buf + data_pages++ * WP_PAGE_SIZE;
        if (dst != src)
            memmove(dst, src, WP_PAGE_SIZE);
    }
    return n;
}

/* The place the guest last faulted, once: its region and page. */
static bool take_steer(wp_engine *e, uint32_t *region, uint64_t *page)
{
    uint64_t at = atomic_exchange_explicit(&e->steer_at, 0, memory_order_relaxed);
    if (!at)
        return false;
    *region = (uint32_t)((at - 1) >> 48);
    *page = (at - 1) & 0xffffffffffffull;
    return *region < e->region_count;
}

int32_t wp_engine_next_batch(wp_engine *e, uint8_t *buf, uint32_t *regions_out, uint64_t *pages_out,
                             uint8_t *flags_out, uint32_t max_pages)
{
    int32_t err = atomic_load(&e->error);
    if (err < 0)
        return err;
    if (max_pages == 0)
        return -EINVAL;
    if (max_pages > WP_SWEEP_MAX_PAGES)
        max_pages = WP_SWEEP_MAX_PAGES;
    if (!e->populated_built && atomic_load(&e->mode) == MODE_SNAPSHOT)
        build_populated_maps(e);
    uint32_t n = wp_pool_take(e, buf, regions_out, pages_out, max_pages);
    if (n > 0)
        return (int32_t)pack_pool_pages(e, buf, regions_out, pages_out, flags_out, n);
    if (e->big_active)
        return (int32_t)sweep_big(e, max_pages, buf, regions_out, pages_out, flags_out);
    uint32_t region;
    uint64_t page;
    if (e->steer && take_steer(e, &region, &page)) {
        n = sweep(e, region, page - page % max_pages, max_pages, buf, regions_out, pages_out, flags_out);
        e->pages_steered += n;
        if (n > 0)
            return (int32_t)n;
    }
    while (e->sweep_region < e->region_count) {
        if (e->sweep_page >= e->regions[e->sweep_region].pages) {
            e->sweep_region++;
            e->sweep_page = 0;
            continue;
        }
        n = sweep(e, e->sweep_region, e->sweep_page, max_pages, buf, regions_out, pages_out, flags_out);
        e->sweep_page += sweep_span(&e->regions[e->sweep_region], max_pages); /* stays unit aligned */
        if (n > 0)
            return (int32_t)n;
    }
    return 0;
}
