/*
 * Lazy restore into hugetlbfs memory (2 MiB pages): the kernel resolves a
 * fault there only with a whole huge page (UFFDIO_COPY / UFFDIO_CONTINUE /
 * UFFDIO_POISON of 2 MiB at a 2 MiB boundary; 4 KiB requests fail with
 * EINVAL). The image is indexed in 4 KiB pages (docs/format.md), and its
 * records need not line up with huge pages: a huge page is assembled from
 * the 512 image pages it holds, from every record that has some of them,
 * then installed with one ioctl. A record that cannot be produced fails the
 * whole huge page: it is poisoned, never installed with anything else in
 * that record's place.
 *
 * Reading and decoding happen outside install_lock (a fault never waits for
 * the fill's decode); the last record decoded is kept (b->decoded), so the
 * fill, going through huge pages in order, decodes a record shared by two
 * huge pages once.
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Copies record `index`'s part of image pages [ip, ip + RS_HUGE_PAGES) into
 * the assembly buffer; 0, -EBADMSG / -EIO (with *why) or -ENOMEM. */
static int assemble(wp_restorer *r, uint32_t index, uint64_t ip, struct rs_buffers *b, uint32_t *why)
{
    const struct rs_record *rec = &r->records[index];
    uint64_t lo = rec->image_page > ip ? rec->image_page : ip;
    uint64_t hi = rec->image_page + rec->pages < ip + RS_HUGE_PAGES ? rec->image_page + rec->pages : ip + RS_HUGE_PAGES;
    if (!r->raw_image && record_is_zero(r->file, rec->file_offset, rec->region, rec->first_page, rec->pages)) {
        memset(b->huge + (lo - ip) * RS_PAGE, 0, (hi - lo) * RS_PAGE); /* no buffer for a zero record, whatever its size */
        return 0;
    }
    if (b->decoded != (int64_t)index) {
        int rc = rs_reserve(r, b, (size_t)rec->pages * RS_PAGE);
        if (rc < 0)
            return rc;
        b->decoded = -1;
        int encoding = record_read(r->codec, r->file, r->raw_image, rec->file_offset, rec->region, rec->first_page,
                                   rec->pages, b->pages, b->scratch, b->cap + 1024, why);
        if (encoding < 0)
            return encoding;
        b->decoded = index;
    }
    memcpy(b->huge + (lo - ip) * RS_PAGE, b->pages + (lo - rec->image_page) * RS_PAGE, (hi - lo) * RS_PAGE);
    return 0;
}

int rs_resolve_huge(wp_restorer *r, struct rs_range *g, uint64_t p, bool fault, struct rs_buffers *b)
{
    uint64_t unit = p / g->unit * g->unit;
    if (__atomic_load_n(&g->state[unit], __ATOMIC_ACQUIRE) & (PG_SETTLED | PG_FAILED))
        return 0;
    if (!b->huge && !(b->huge = malloc(WP_RESTORE_HUGE_PAGE_SIZE)))
        return -ENOMEM;
    /* The image pages this huge page holds, and the records that have them. */
    uint64_t ip = g->image_page + unit;
    for (uint32_t i = rs_record_at(r, ip); i < r->record_count && r->records[i].image_page < ip + RS_HUGE_PAGES; i++) {
        uint32_t why = 0;
        int rc = assemble(r, i, ip, b, &why);
        if (rc == -EBADMSG || rc == -EIO) {
            pthread_mutex_lock(&r->install_lock);
            rs_record_failed(r, i, rc, why); /* poisons this huge page (and the record's others) */
            pthread_mutex_unlock(&r->install_lock);
            return 0;
        }
        if (rc < 0)
            return rc;
    }
    if (fault)
        rs_lock_fault(r);
    else
        pthread_mutex_lock(&r->install_lock);
    int rc = 0;
    if (!(g->state[unit] & (PG_SETTLED | PG_FAILED))) {
        uint64_t before = atomic_load(&r->pages_settled);
        rc = rs_install(r, g, unit, g->unit, b->huge);
        uint64_t installed = atomic_load(&r->pages_settled) - before;
        if (fault) {
            r->pages_by_fault += installed;
            b->fault_installed_ns = monotonic_ns();
        } else {
            r->pages_by_fill += installed;
        }
    }
    pthread_mutex_unlock(&r->install_lock);
    return rc;
}
