/*
 * vmsnap_restore.h - lazy restore of a snapshot through userfaultfd.
 *
 * Prefix: wp_restore / WP_RESTORE_. Same conventions as vmsnap_engine.h:
 * >= 0 or -errno, opaque handle, caller-owned buffers, no globals.
 *
 * Serves a restoring guest's memory from a snapshot through its userfaultfd,
 * which the guest's VMM created, negotiated and registered: MISSING mode for
 * anonymous memory (resolved with UFFDIO_COPY / UFFDIO_ZEROPAGE), MISSING |
 * MINOR for memfd memory (the page is pwritten into the memfd, then mapped
 * with UFFDIO_CONTINUE). A fault thread serves faults first; a fill thread
 * installs every remaining record in file order, then unregisters the
 * ranges. A REMOVE event (the guest discarding memory) makes later faults in
 * that range read zero. Every record's checksum is checked as it is read.
 */
#ifndef VMSNAP_RESTORE_H
#define VMSNAP_RESTORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with -fvisibility=hidden: only the public headers'
 * declarations are exported. */
#pragma GCC visibility push(default)

typedef struct wp_restorer wp_restorer;
#define WP_RESTORE_PAGE_SIZE 4096u
/* Fault service time histogram: same buckets as the engine's (wp_stats.hist). */
#define WP_RESTORE_HIST_BUCKETS 64
#define WP_RESTORE_RAW_IMAGE 1u /* snapshot_fd is a raw image: "records" are plain ranges */
#define WP_RESTORE_NO_FILL 2u   /* serve faults only, no background fill (benchmarks) */
#define WP_RESTORE_MOVE 4u      /* anonymous memory in this process: UFFDIO_MOVE decoded pages (Linux 6.8) */
#define WP_RESTORE_UFFD_MINOR 8u /* wp_restore_uffd_create: memfd memory (MISSING | MINOR) */

typedef struct wp_restore_stats {
    uint64_t pages_total, pages_resident;
    uint64_t faults, faults_zero;      /* faults served; of them, in discarded ranges */
    uint64_t pages_by_fault, pages_by_fill, removed_pages;
    uint64_t fault_ns_total, fault_ns_max;
    uint64_t first_fault_ns, done_ns;  /* since wp_restorer_start; 0 if not yet */
    uint64_t hist[WP_RESTORE_HIST_BUCKETS];
} wp_restore_stats;

wp_restorer *wp_restorer_create(int32_t uffd, int32_t snapshot_fd, uint32_t flags, int32_t *err_out);
/* A region of the guest: where the VMM maps it, and its memfd (-1: anonymous). */
int32_t wp_restorer_add_region(wp_restorer *r, uint64_t hva, uint64_t size, int32_t memfd, uint64_t memfd_offset);
/* The snapshot's index (n records, in file order), validated by the caller;
 * -ENODATA if a page of a region is covered by no record. */
int32_t wp_restorer_set_index(wp_restorer *r, const uint32_t *regions, const uint64_t *first_pages,
                              const uint32_t *page_counts, const uint64_t *file_offsets, uint32_t n);
int32_t wp_restorer_start(wp_restorer *r);
/* 1 when every page is resident (and the ranges unregistered), 0 while
 * serving, -errno after a failure (e.g. a corrupt record, the VMM gone). */
int32_t wp_restorer_poll(wp_restorer *r);
int32_t wp_restorer_stats(wp_restorer *r, wp_restore_stats *out);
int32_t wp_restorer_destroy(wp_restorer *r);

/* A userfaultfd of this process registered for restoring [hva, hva + size)
 * (in-process restores and benchmarks): MISSING, plus MINOR with
 * WP_RESTORE_UFFD_MINOR; asks for UFFD_FEATURE_MOVE with WP_RESTORE_MOVE.
 * Returns the fd or -errno. UFFDIO_MOVE moves pages within the uffd's own
 * process, so the MOVE mode serves memory of this process only. */
int32_t wp_restore_uffd_create(uint64_t hva, uint64_t size, uint32_t flags);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_RESTORE_H */
