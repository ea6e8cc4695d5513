/*
 * The records of a memory image, as the lazy restorer looks them up: built
 * and checked once per served file (serve: when it opens the file, before
 * it listens), then shared read-only by every restorer serving that file.
 * A restorer takes a reference (wp_restorer_set_index): per-VMM setup costs
 * O(1) whatever the image's size, where copying the index cost O(records)
 * (100,379 records, 3.2 MB, about 1.7 ms for an 8 GiB snapshot).
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <stdlib.h>

wp_restore_index *wp_restore_index_create(const uint32_t *regions, const uint64_t *first_pages,
                                          const uint32_t *page_counts, const uint64_t *file_offsets,
                                          const uint64_t *image_pages, uint32_t n, int32_t *err_out)
{
    *err_out = 0;
    if (!n) {
        *err_out = -EINVAL; /* an image holds at least one page */
        return NULL;
    }
    wp_restore_index *idx = calloc(1, sizeof *idx);
    struct rs_record *records = calloc(n, sizeof *records);
    if (!idx || !records) {
        free(idx);
        free(records);
        *err_out = -ENOMEM;
        return NULL;
    }
    uint64_t next = 0;
    for (uint32_t i = 0; i < n; i++) {
        records[i] = (struct rs_record){.region = regions[i], .pages = page_counts[i], .first_page = first_pages[i],
                                        .file_offset = file_offsets[i], .image_page = image_pages[i]};
        if (!records[i].pages || records[i].pages > RECORD_MAX_PAGES || records[i].image_page != next) {
            free(records); /* records must tile the image in order: no page twice, none missing */
            free(idx);
            *err_out = -EINVAL;
            return NULL;
        }
        next += records[i].pages;
    }
    idx->records = records;
    idx->count = n;
    idx->image_pages = next;
    atomic_init(&idx->refs, 1);
    return idx;
}

void rs_index_hold(wp_restore_index *idx)
{
    atomic_fetch_add_explicit(&idx->refs, 1, memory_order_relaxed);
}

int32_t wp_restore_index_release(wp_restore_index *idx)
{
    if (idx && atomic_fetch_sub_explicit(&idx->refs, 1, memory_order_acq_rel) == 1) {
        free(idx->records);
        free(idx);
    }
    return 0;
}

