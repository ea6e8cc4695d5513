/*
 * The sweep: captures runs of not-yet-saved pages for the writer, in large
 * batches (one claim pass, one copy pass, one unprotect ioctl per contiguous
 * run per process).
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

static bool page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (size_t i = 0; i < WP_PAGE_SIZE / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

/* Without a residency map every page must be read. */
static inline bool resident(const wp_engine *e, bool residency, uint64_t offset)
{
    return !residency || (e->residency[offset] & 1);
}

int32_t wp_engine_sweep(wp_engine *e, uint32_t region, uint64_t first_page, uint32_t max_pages, uint8_t *buf,
                        uint64_t *pages_out, uint8_t *flags_out)
{
    if (region >= e->region_count)
        return -EINVAL;
    struct wp_region *r = &e->regions[region];
    if (first_page >= r->pages)
        return 0;
    if (max_pages > WP_SWEEP_MAX_PAGES)
        max_pages = WP_SWEEP_MAX_PAGES;
    uint64_t end = first_page + max_pages < r->pages ? first_page + max_pages : r->pages;
    uint64_t count = end - first_page;

    /* Claim first, so the residency check and the copies see frozen pages. */
    uint32_t n = 0;
    for (uint64_t p = first_page; p < end; p++)
        if (wp_claim_page(r, p))
            pages_out[n++] = p;
    if (n == 0)
        return 0;
    /* Pages not resident in our view were never populated: zero at the cut. */
    bool residency = r->view && e->check_residency &&
                     mincore((void *)(r->view + first_page * WP_PAGE_SIZE), count * WP_PAGE_SIZE, e->residency) == 0;
    /* Each run of consecutive resident claimed pages is read with one call
     * (for a remote process, one process_vm_readv), into buf at the end of
     * the data kept so far; zero pages are then dropped and the rest packed. */
    size_t data_pages = 0;
    for (uint32_t i = 0; i < n;) {
        if (!resident(e, residency, pages_out[i] - first_page)) {
            flags_out[i++] = WP_PAGE_ZERO;
            e->pages_zero++;
            continue;
        }
        uint32_t j = i + 1;
        while (j < n && pages_out[j] == pages_out[j - 1] + 1 && resident(e, residency, pages_out[j] - first_page))
            j++;
        uint8_t *run = buf + data_pages * WP_PAGE_SIZE;
        wp_read_pages(e, region, pages_out[i], j - i, run);
        for (uint32_t k = i; k < j; k++) {
            const uint8_t *src = run + (size_t)(k - i) * WP_PAGE_SIZE;
            if (page_is_zero(src)) {
                flags_out[k] = WP_PAGE_ZERO;
                e->pages_zero++;
                continue;
            }
            flags_out[k] = WP_PAGE_DATA;
            uint8_t *dst = buf + data_pages++ * WP_PAGE_SIZE;
            if (dst != src)
                memmove(dst, src, WP_PAGE_SIZE);
        }
        i = j;
    }
    for (uint32_t i = 0; i < n; i++)
        wp_mark_saved(e, r, pages_out[i]);
    e->pages_swept += n;
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = i + 1;
        while (j < n && pages_out[j] == pages_out[j - 1] + 1)
            j++;
        wp_unprotect_pages(e, region, pages_out[i], j - i);
        i = j;
    }
    int32_t err = atomic_load(&e->error);
    return err < 0 ? err : (int32_t)n;
}

int32_t wp_engine_hint(wp_engine *e, uint64_t *key_out)
{
    uint64_t key = atomic_exchange_explicit(&e->last_fault_key, 0, memory_order_relaxed);
    if (!key)
        return 0;
    *key_out = key - 1;
    return 1;
}
