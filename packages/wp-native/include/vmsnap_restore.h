/*
 * vmsnap_restore.h - lazy restore of a snapshot through userfaultfd.
 *
 * Prefix: wp_restore / WP_RESTORE_. Same conventions as vmsnap_engine.h:
 * >= 0 or -errno, opaque handle, caller-owned buffers, no globals.
 *
 * Serves a restoring guest's memory from a snapshot (or a raw memory image)
 * through its userfaultfd, which the guest's VMM created (O_NONBLOCK),
 * negotiated and registered: MISSING mode for anonymous memory, MISSING |
 * MINOR for memfd/shmem. Pages are installed with UFFDIO_COPY /
 * UFFDIO_ZEROPAGE, which never replace a present page (EEXIST), and pages in
 * a memfd's page cache but unmapped are mapped with UFFDIO_CONTINUE. A fault
 * thread serves faults first; a fill thread installs the other records.
 * The VMM's ranges may be any ranges of the concatenated memory image.
 * hugetlbfs ranges (2 MiB pages) get whole huge pages, each assembled
 * from the image's small pages (WP_RESTORE_RANGE_HUGE_2M).
 * A REMOVE event (the guest discarding memory) makes a later fault there
 * read zero, or what a shared mapping kept. Every record is checked by the
 * one decoder (vmsnap_record.h) as it is read. Failures stay as small as
 * they are: a page the VMM mapped something else over (ENOENT) is skipped;
 * a record that cannot be produced is never replaced by anything: its pages
 * are poisoned (UFFDIO_POISON) if the VMM negotiated UFFD_FEATURE_POISON,
 * else faults there stay blocked; both show in the stats. No range with
 * pages left to install is ever unregistered. docs/lazy-restore.md.
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
#define WP_RESTORE_HUGE_PAGE_SIZE (2u << 20)
/* Fault service time histogram: bucket b < 8 holds b ns; bucket 8k + j holds
 * [2^k (1 + j/8), 2^k (1 + (j+1)/8)) ns (8 per power of two, 12.5 % wide, so
 * a ratio of 1.5 against the bare handler can be told from 2). */
#define WP_RESTORE_HIST_BUCKETS 256
#define WP_RESTORE_RAW_IMAGE 1u /* snapshot_fd is a raw image: "records" are plain ranges */
#define WP_RESTORE_NO_FILL 2u   /* serve faults only, no background fill (benchmarks) */
#define WP_RESTORE_MOVE 4u      /* anonymous memory in this process: UFFDIO_MOVE decoded pages (Linux 6.8) */
#define WP_RESTORE_UFFD_MINOR 8u /* wp_restore_uffd_create: memfd memory (MISSING | MINOR) */

#define WP_RESTORE_UFFD_POISON 16u /* wp_restore_uffd_create: also negotiate UFFD_FEATURE_POISON (Linux 6.6) */

/* wp_restorer_add_range flags */
#define WP_RESTORE_RANGE_SHARED 1u /* memfd/shmem memory: pages may sit in the page cache unmapped */
/* hugetlbfs memory with 2 MiB pages (MAP_HUGETLB, or a hugetlbfs memfd with
 * WP_RESTORE_RANGE_SHARED): hva and size are multiples of 2 MiB, and each
 * huge page is assembled from the image's 512 pages (any record layout)
 * and installed with one UFFDIO_COPY (UFFDIO_CONTINUE for a page already in
 * the hugetlbfs page cache), poisoned whole if one of its records cannot
 * be produced. Not with WP_RESTORE_MOVE. */
#define WP_RESTORE_RANGE_HUGE_2M 2u

typedef struct wp_restore_stats {
    uint64_t pages_total, pages_settled; /* settled: installed, discarded, gone or poisoned */
    uint64_t faults, faults_zero;      /* faults served; of them, on discarded pages */
    uint64_t pages_by_fault, pages_by_fill, removed_pages;
    uint64_t fault_ns_total, fault_ns_max;
    uint64_t first_fault_ns, done_ns;  /* since wp_restorer_start; 0 if not yet */
    uint64_t pages_gone;               /* ENOENT: the VMM mapped something else there */
    uint64_t pages_failed;             /* cannot be produced (their record) or installed (pages_unallocated) */
    uint64_t pages_poisoned;           /* of those, resolved with UFFDIO_POISON */
    uint64_t failed_records;           /* records that could not be produced */
    uint64_t failed_offset;            /* file offset of the first of them */
    uint64_t failed_why;               /* its WP_RECORD_* reason (vmsnap_record.h) */
    uint64_t failed_errno;             /* its error as int64: -EBADMSG (corrupt) or -EIO (short read) */
    uint64_t faults_outside;           /* faults on registered pages that no range covers (nothing to serve there) */
    uint64_t outside_poisoned;         /* of those, answered with UFFDIO_POISON (the others stay blocked) */
    uint64_t outside_hva;              /* the page of the first of them */
    uint64_t pages_unallocated;        /* of pages_failed, those no huge page could be allocated for (pool or hugetlbfs size= quota exhausted) */
    uint64_t started_at_ns;            /* CLOCK_MONOTONIC at wp_restorer_start (what the times above count from); 0 before */
    uint64_t first_page_ns;            /* since wp_restorer_start: the first fault's page installed (its thread may resume); 0 if not yet */
    uint64_t hist[WP_RESTORE_HIST_BUCKETS];
} wp_restore_stats;

/* -ENOTTY: uffd is not a userfaultfd; -EBADFD: it was opened without
 * O_NONBLOCK (the fault thread must never block in read()). */
wp_restorer *wp_restorer_create(int32_t uffd, int32_t snapshot_fd, uint32_t flags, int32_t *err_out);
/* A range the VMM maps at hva: image bytes [image_offset, image_offset + size)
 * (image_offset a multiple of 4096 whatever the range's page size).
 * Returns its index; -EEXIST if it overlaps a range added before (a page of
 * the VMM's memory is declared once); -EINVAL if not aligned to its pages;
 * -EBUSY if another userfaultfd than uffd registered it (faults there would
 * go to a uffd nobody reads). It is registered MISSING with uffd: a no-op
 * where the VMM did so already. */
int32_t wp_restorer_add_range(wp_restorer *r, uint64_t hva, uint64_t size, uint64_t image_offset, uint32_t range_flags);
/* Before wp_restorer_add_range, when the VMM's mappings disagree with its
 * handshake (a declared range found unmapped or not registered): the VMM
 * may have changed them right after sending it (mmap MAP_FIXED over part
 * of its memory, munmap, mremap), which it cannot tell apart from "after
 * the handshake". Where it negotiated UFFD_FEATURE_EVENT_UNMAP (REMAP for
 * mremap) the kernel queued an event for that change: this reads what the
 * uffd has queued, waiting up to wait_ms for changes still in flight (the
 * kernel answers the ioctls that change memory with EAGAIN from a change
 * until its event is read; asked with an unprotect of the page at
 * probe_hva, which changes nothing in memory registered MISSING). Every
 * event read is kept and applied by wp_restorer_set_index (a discard, an
 * unmap: those pages are gone, counted in pages_gone, never installed;
 * add_range does not register what an unmap made gone); a fault read is
 * woken (its thread faults again); a fork's uffd is closed. Writes the
 * spans unmapped or moved away as [start, end) pairs into gone (cap pairs)
 * and returns how many there were; -EBUSY after add_range; -errno. */
int32_t wp_restorer_take_early_events(wp_restorer *r, uint64_t probe_hva, uint32_t wait_ms, uint64_t *gone, uint32_t cap);
/* The records of a memory image (n), sorted by image page and tiling the
 * image from page 0 with no gap or overlap: record i holds page_counts[i]
 * pages from image page image_pages[i]; in the file it is at
 * file_offsets[i] and says region regions[i], first page first_pages[i]
 * (the decoder checks both). Raw images: one "record" per run of pages, at
 * its image offset. Built and checked once per served file and shared,
 * read-only, by every restorer of that file (reference counted: each
 * wp_restorer_set_index takes a reference, wp_restorer_destroy drops it).
 * NULL with *err_out -EINVAL (no record, a record of 0 or more than
 * RECORD_MAX_PAGES pages, records not tiling the image) or -ENOMEM. */
typedef struct wp_restore_index wp_restore_index;
wp_restore_index *wp_restore_index_create(const uint32_t *regions, const uint64_t *first_pages,
                                          const uint32_t *page_counts, const uint64_t *file_offsets,
                                          const uint64_t *image_pages, uint32_t n, int32_t *err_out);
/* Drops the creator's reference: the index is freed with its last user. 0. */
int32_t wp_restore_index_release(wp_restore_index *idx);
/* The restorer serves from idx (a reference is taken: O(1), nothing is
 * copied). -ERANGE if a range lies past the image's end; -EBUSY if an
 * index was set already or serving started. */
int32_t wp_restorer_set_index(wp_restorer *r, wp_restore_index *idx);
/* Checks that the uffd fills process pid's memory (its ctx is pid's mm),
 * after set_index, before start: a uffd of another process that has the
 * same addresses registered (a child's) passes the registration check, and
 * then fills that process while pid's faults wait. Serves one page that pid
 * lacks (per /proc/PID/pagemap), as it would be served anyway, and reads
 * pid's pagemap again: 0 (present, or no page lacking among the first 512
 * of each range), -EXDEV (it went elsewhere), -errno (pagemap unreadable). */
int32_t wp_restorer_check_owner(wp_restorer *r, int32_t pid);
int32_t wp_restorer_start(wp_restorer *r);
/* 1 when every page is settled and every range unregistered (private
 * ranges whose failed pages were all poisoned included: the poison stays);
 * 2 when every page is settled but a range stays registered (failed pages
 * in shared memory, or not poisoned): keep the restorer, whose fault thread
 * reads that range's events, until the VMM leaves, else the guest's
 * faults and discards (MADV_DONTNEED) there wait for ever; 0 while serving
 * (failed pages: see the stats); -errno when the restorer stopped (the
 * VMM's memory gone: -ESRCH; the uffd closed: -EPIPE). */
int32_t wp_restorer_poll(wp_restorer *r);
/* A fault on a registered page that no range covers is never answered with
 * zero: it gets UFFDIO_POISON (a memory error the faulting thread sees) or,
 * where the kernel refuses that, stays blocked; both show in the stats
 * (faults_outside). */
int32_t wp_restorer_stats(wp_restorer *r, wp_restore_stats *out);
/* Stops serving: the fault and fill threads are ended (joined) and nothing
 * is installed after it returns, so wp_restorer_stats then gives the
 * restorer's final state (a VMM's outcome is decided from it). Registration
 * is left as it is, for wp_restorer_destroy. 0. */
int32_t wp_restorer_stop(wp_restorer *r);
/* Stops serving (wp_restorer_stop); unregisters only ranges with nothing left to install. */
int32_t wp_restorer_destroy(wp_restorer *r);

/* A userfaultfd of this process registered for restoring [hva, hva + size)
 * (in-process restores and benchmarks): MISSING, plus MINOR with
 * WP_RESTORE_UFFD_MINOR; asks for UFFD_FEATURE_MOVE with WP_RESTORE_MOVE and
 * UFFD_FEATURE_POISON with WP_RESTORE_UFFD_POISON.
 * Returns the fd or -errno. UFFDIO_MOVE moves pages within the uffd's own
 * process, so the MOVE mode serves memory of this process only. */
int32_t wp_restore_uffd_create(uint64_t hva, uint64_t size, uint32_t flags);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_RESTORE_H */
