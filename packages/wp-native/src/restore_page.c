/*
 * Lazy restore, one page at a time: how a fault is served when the file
 * lets one page be read alone, and how its neighbours follow.
 *
 * A fault is served with its own page only: from a raw memory image, the
 * page's 4 KiB; from a record of encoding "pages" (docs/format.md), the
 * record's table and the page's block, each checked against its CRC-32, the
 * block decoded. The faulting thread resumes as soon as that page is in.
 * The record it belongs to is then handed to the fill thread (the "hot"
 * queue), which installs the record's other pages before it goes on in
 * image order: fault-around happens, but never on the faulting vCPU's time.
 *
 * A record whose one block is corrupt fails that page alone: it is poisoned
 * (or, without the POISON feature, its faults stay blocked), never installed
 * with anything else, and the record's other pages are served. A bad header
 * or table fails the whole record.
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

/* Image page ip cannot be produced: failed in every range that holds it,
 * and poisoned where the kernel allows. Under install_lock. */
static void page_failed(wp_restorer *r, const struct rs_record *rec, uint64_t ip, int err, uint32_t why)
{
    rs_note_failure(r, rec, err, why);
    for (uint32_t k = 0; k < r->range_count; k++) {
        struct rs_range *g = &r->ranges[k];
        if (g->unit > 1 || ip < g->image_page || ip - g->image_page >= g->pages)
            continue;
        uint64_t p = ip - g->image_page;
        if (g->state[p] & (PG_SETTLED | PG_FAILED))
            continue;
        g->state[p] |= PG_FAILED;
        r->pages_failed++;
        rs_poison(r, g, p, 1); /* -EINVAL without the POISON feature: faults there stay blocked */
    }
}

/* Reads image page ip, page k of record rec, into b->pages (4096 bytes).
 * Returns RECORD_ZERO (not written), RECORD_RAW / RECORD_LZ4, -ENOTSUP (the
 * record must be read whole), -EBADMSG / -EIO (why; whole: the record's
 * header or table, not only this page's block). */
static int read_page(wp_restorer *r, const struct rs_record *rec, uint32_t k, struct rs_buffers *b, uint32_t *why,
                     bool *whole)
{
    *why = 0;
    *whole = false;
    if (r->raw_image) {
        ssize_t got = pread(r->file, b->pages, RS_PAGE, (off_t)(rec->file_offset + (uint64_t)k * RS_PAGE));
        if (got < 0)
            return -errno;
        /* Short: the image shrank since serve measured it (its size is a
         * whole number of pages, checked then). Never zeros in its place. */
        return got == RS_PAGE ? RECORD_RAW : -EIO;
    }
    return record_read_page(r->codec, r->file, rec->file_offset, rec->region, rec->first_page, rec->pages, k, b->pages,
                            b->scratch, b->cap + 1024, why, whole);
}

int rs_fault_page(wp_restorer *r, struct rs_range *g, uint64_t page, struct rs_buffers *b)
{
    uint64_t ip = g->image_page + page;
    uint32_t index = rs_record_at(r, ip);
    const struct rs_record *rec = &r->records[index];
    /* A page, and in scratch (bytes + 1024) the record's header and table and a page's block. */
    int rc = rs_reserve(r, b, RS_PAGE + (size_t)rec->pages * 8);
    if (rc < 0)
        return rc;
    b->decoded = -1; /* b->pages now holds one page, not a record */
    uint32_t why;
    bool whole;
    int encoding = read_page(r, rec, (uint32_t)(ip - rec->image_page), b, &why, &whole);
    if (encoding == -ENOTSUP)
        return encoding;
    rs_lock_fault(r);
    if (encoding == -EBADMSG || encoding == -EIO) {
        if (whole)
            rs_record_failed(r, index, encoding, why);
        else
            page_failed(r, rec, ip, encoding, why);
        pthread_mutex_unlock(&r->install_lock);
        return 0;
    }
    rc = encoding < 0 ? encoding : 0;
    if (rc == 0 && !(g->state[page] & (PG_SETTLED | PG_FAILED))) {
        uint64_t before = atomic_load(&r->pages_settled);
        rc = rs_install(r, g, page, 1, encoding == RECORD_ZERO ? NULL : b->pages);
        r->pages_by_fault += atomic_load(&r->pages_settled) - before;
        b->fault_installed_ns = monotonic_ns();
    }
    pthread_mutex_unlock(&r->install_lock);
    if (rc == 0 && rec->pages > 1)
        rs_hot_push(r, index);
    return rc;
}

int rs_resolve_by_page(wp_restorer *r, uint32_t index, struct rs_buffers *b)
{
    const struct rs_record *rec = &r->records[index];
    int rc = 0;
    for (uint32_t k = 0; k < rec->pages && rc == 0; k++) {
        uint64_t ip = rec->image_page + k;
        /* Whether a range still wants this page. */
        bool wanted = false;
        for (uint32_t i = 0; i < r->range_count && !wanted; i++) {
            const struct rs_range *g = &r->ranges[i];
            wanted = g->unit == 1 && ip >= g->image_page && ip - g->image_page < g->pages &&
                     !(__atomic_load_n(&g->state[ip - g->image_page], __ATOMIC_ACQUIRE) & (PG_SETTLED | PG_FAILED));
        }
        if (!wanted)
            continue;
        uint32_t why;
        bool whole;
        int encoding = read_page(r, rec, k, b, &why, &whole);
        if (encoding < 0 && encoding != -EBADMSG && encoding != -EIO)
            return encoding;
        pthread_mutex_lock(&r->install_lock);
        if (encoding < 0 && whole) {
            rs_record_failed(r, index, encoding, why);
            pthread_mutex_unlock(&r->install_lock);
            return 0;
        }
        if (encoding < 0) {
            page_failed(r, rec, ip, encoding, why);
        } else {
            for (uint32_t i = 0; i < r->range_count && rc == 0; i++) {
                struct rs_range *g = &r->ranges[i];
                if (g->unit > 1 || ip < g->image_page || ip - g->image_page >= g->pages ||
                    (g->state[ip - g->image_page] & (PG_SETTLED | PG_FAILED)))
                    continue;
                uint64_t before = atomic_load(&r->pages_settled);
                rc = rs_install(r, g, ip - g->image_page, 1, encoding == RECORD_ZERO ? NULL : b->pages);
                r->pages_by_fill += atomic_load(&r->pages_settled) - before;
            }
        }
        pthread_mutex_unlock(&r->install_lock);
    }
    return rc;
}

void rs_hot_push(wp_restorer *r, uint32_t index)
{
    pthread_mutex_lock(&r->hot_lock);
    uint32_t n = r->hot_tail - r->hot_head;
    if ((n == 0 || r->hot[(r->hot_tail - 1) % RS_HOT_SLOTS] != index) && n < RS_HOT_SLOTS) {
        r->hot[r->hot_tail++ % RS_HOT_SLOTS] = index;
        pthread_cond_signal(&r->hot_cond);
    } /* full: the fill gets there in image order, or faults serve those pages themselves */
    pthread_mutex_unlock(&r->hot_lock);
}

int64_t rs_hot_take(wp_restorer *r, uint32_t wait_ms)
{
    pthread_mutex_lock(&r->hot_lock);
    if (r->hot_head == r->hot_tail && wait_ms) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        uint64_t ns = (uint64_t)until.tv_nsec + (uint64_t)wait_ms * 1000000u;
        until.tv_sec += (time_t)(ns / 1000000000u);
        until.tv_nsec = (long)(ns % 1000000000u);
        pthread_cond_timedwait(&r->hot_cond, &r->hot_lock, &until);
    }
    int64_t index = r->hot_head == r->hot_tail ? -1 : (int64_t)r->hot[r->hot_head++ % RS_HOT_SLOTS];
    pthread_mutex_unlock(&r->hot_lock);
    return index;
}
