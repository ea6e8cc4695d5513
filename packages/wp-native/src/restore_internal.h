/* Internal: the lazy restorer's state (restore.c) and how pages are put in
 * place (restore_uffd.c). Not part of the public ABI. */
#ifndef VMSNAP_WP_RESTORE_INTERNAL_H
#define VMSNAP_WP_RESTORE_INTERNAL_H

#include "record.h"
#include "uffd.h"
#include "vmsnap_restore.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define RS_MAX_RANGES 64
#define RS_PAGE WP_RESTORE_PAGE_SIZE

/* Per-page state of a range (one byte a page). A page is "settled" when
 * nothing is left to install there: resident, discarded by the guest,
 * gone (the VMM mapped something else over it) or poisoned. */
enum {
    PG_RESIDENT = 1, /* installed (or found present: never replaced) */
    PG_REMOVED = 2,  /* discarded by the guest (REMOVE event): a fault gets zero, or the shared page that survived */
    PG_GONE = 4,     /* ENOENT: the VMM mapped something else over it; skipped */
    PG_FAILED = 8,   /* its record cannot be produced: never installed */
    PG_POISONED = 16 /* failed and resolved with UFFDIO_POISON (a memory error the guest sees) */
};
#define PG_SETTLED (PG_RESIDENT | PG_REMOVED | PG_GONE | PG_POISONED)

/* One record of the snapshot: where it is (for the decoder's checks) and
 * which pages of the concatenated memory image it holds. */
struct rs_record {
    uint32_t region, pages;
    uint64_t first_page, file_offset, image_page;
};

/* wp_restore_index (restore_index.c): immutable once created. */
struct wp_restore_index {
    _Atomic uint32_t refs;
    uint32_t count;
    uint64_t image_pages;
    struct rs_record *records;
};
/* Takes a reference for a restorer (dropped with wp_restore_index_release). */
void rs_index_hold(wp_restore_index *idx);

/* One range the VMM declared: [hva, hva + size) holds the image's pages
 * from image_page on. */
struct rs_range {
    uint64_t hva, size, pages, image_page;
    bool shared;   /* memfd/shmem: a page may be in the page cache and not mapped (MINOR fault) */
    uint32_t unit; /* pages per kernel page: 1, or RS_HUGE_PAGES for hugetlbfs (states change a whole unit at once) */
    uint8_t *state;
};
#define RS_HUGE_PAGES (WP_RESTORE_HUGE_PAGE_SIZE / RS_PAGE)
#define RS_HOT_SLOTS 256

struct wp_restorer {
    int uffd, file, stop_fd;
    bool raw_image, move, no_fill;
    uint32_t range_count;
    struct rs_range ranges[RS_MAX_RANGES];
    wp_restore_index *index;         /* shared with every restorer of the same file (a reference held) */
    const struct rs_record *records; /* index->records: sorted by image page, tiling the image */
    uint32_t record_count;
    uint64_t image_pages;
    pthread_t fault_thread, fill_thread;
    bool started, joined; /* joined: wp_restorer_stop ended both threads */
    _Atomic bool stopping, done;
    bool left_registered; /* set before done: a range stayed registered at done (failed pages needing a handler) */
    _Atomic int32_t error;
    /* One installer at a time, and events are read and marked under it too.
     * Never held across a call that can block: the uffd is non-blocking
     * (checked at create) and every ioctl under it returns at once. */
    pthread_mutex_t install_lock;
    _Atomic uint32_t fault_waiting; /* the fault thread wants install_lock: the fill lets it in between chunks */
    _Atomic uint64_t pages_settled, pages_total;
    /* Counters below change under install_lock (or in the fault thread only). */
    uint64_t faults, faults_zero, pages_by_fault, pages_by_fill, removed_pages;
    uint64_t pages_gone, pages_failed, pages_poisoned, failed_records;
    uint64_t failed_offset;
    uint64_t faults_outside, outside_poisoned, outside_hva;
    uint64_t pages_unallocated; /* failed for want of a huge page (counted in pages_failed too) */
    uint32_t failed_why;
    int32_t failed_errno;
    uint64_t fault_ns_total, fault_ns_max, first_fault_ns, start_ns, done_ns;
    uint64_t first_page_ns; /* the first fault's page installed (CLOCK_MONOTONIC) */
    uint64_t hist[WP_RESTORE_HIST_BUCKETS];
    wp_record_codec *codec;
    /* Records a fault touched, for the fill to complete first (restore_page.c). */
    pthread_mutex_t hot_lock;
    pthread_cond_t hot_cond;
    uint32_t hot[RS_HOT_SLOTS], hot_head, hot_tail;
    uint8_t *zero_huge; /* one zero huge page: hugetlbfs has no UFFDIO_ZEROPAGE */
    /* Events read before the ranges were added (wp_restorer_take_early_events),
     * applied by wp_restorer_set_index; NULL when none were read. */
    struct uffd_msg *early;
    uint32_t early_count;
};
/* At most this many events are kept before the ranges are added. */
#define RS_EARLY_EVENTS 256

/* Pages the fill installs under one hold of install_lock: a fault waits at
 * most for that many (64 KiB, ~10 us of UFFDIO_COPY here). */
#define RS_FILL_CHUNK 16

/* install_lock, taken by the fault thread: it says it is waiting, so the
 * fill, which lets go between chunks, lets it in first. */
static inline void rs_lock_fault(wp_restorer *r)
{
    atomic_fetch_add(&r->fault_waiting, 1);
    pthread_mutex_lock(&r->install_lock);
    atomic_fetch_sub(&r->fault_waiting, 1);
}

/* The fill, holding install_lock between two chunks: if the fault thread
 * waits for it, lets it go until the fault thread has it (a bounded spin;
 * a mutex handed back at once would stay with the fill), then takes it again. */
static inline void rs_fill_yield(wp_restorer *r)
{
    if (!atomic_load(&r->fault_waiting))
        return;
    pthread_mutex_unlock(&r->install_lock);
    for (int spin = 0; spin < 100000 && atomic_load(&r->fault_waiting); spin++)
        __builtin_ia32_pause();
    pthread_mutex_lock(&r->install_lock);
}

/* A thread's decode buffers: page-aligned anonymous memory when pages are
 * moved out of them; a huge page being assembled, and which record `pages`
 * holds decoded (so consecutive huge pages decode a shared record once). */
struct rs_buffers {
    uint8_t *pages, *scratch, *huge;
    size_t cap;
    int64_t decoded; /* index of the record in `pages`, or -1 */
    uint64_t fault_installed_ns; /* when the faulting page was installed (0: it was not) */
};

/* Grows b to hold `bytes` of decoded pages; 0 or -ENOMEM. */
int rs_reserve(wp_restorer *r, struct rs_buffers *b, size_t bytes);
/* The record holding image page ip. */
uint32_t rs_record_at(const wp_restorer *r, uint64_t ip);
/* A record (or one page of it) cannot be produced: counted, and the first
 * one's place and reason kept for the VMM's log. Under install_lock. */
void rs_note_failure(wp_restorer *r, const struct rs_record *rec, int err, uint32_t why);
/* Record `index` cannot be produced (err, why): its pages in every range are
 * marked failed and poisoned where the kernel allows. Under install_lock. */
void rs_record_failed(wp_restorer *r, uint32_t index, int err, uint32_t why);

/* restore_huge.c: hugetlbfs ranges. Makes the huge page holding page p of g
 * settled: assembled from its records (read and decoded outside the lock),
 * installed whole. fault: a thread waits on it (counted by fault, and
 * b->fault_installed_ns set). 0, -EAGAIN (a discard pending) or -errno. */
int rs_resolve_huge(wp_restorer *r, struct rs_range *g, uint64_t p, bool fault, struct rs_buffers *b);

/* restore_events.c: the range and page of a registered hva (NULL: no
 * range covers it); a fault there (rs_serve_outside: poisoned, counted);
 * an event read from the uffd (rs_apply_event, under install_lock in the
 * critical section of its read); the queue read before the fault thread
 * runs (rs_take_events) and at the end (rs_drain_events); whether
 * [start, end) is in a span an early UNMAP/REMAP made gone. */
struct rs_range *rs_find_page(wp_restorer *r, uint64_t hva, uint64_t *page);
void rs_serve_outside(wp_restorer *r, uint64_t address);
void rs_apply_event(wp_restorer *r, const struct uffd_msg *m);
void rs_take_events(wp_restorer *r);
void rs_drain_events(wp_restorer *r);
bool rs_early_gone(const wp_restorer *r, uint64_t start, uint64_t end);

/* restore_page.c: a fault served with its page alone. Reads page `page` of
 * range g (a 4 KiB range) from the raw image, or from its record when the
 * record has encoding "pages", installs it (the faulting thread resumes),
 * then queues the record for the fill thread. 0 (served, or failed and
 * poisoned), -ENOTSUP (the record must be read whole: resolve it so),
 * -EAGAIN (a discard pending) or another -errno. */
int rs_fault_page(wp_restorer *r, struct rs_range *g, uint64_t page, struct rs_buffers *b);
/* Installs record `index`'s pages that are still wanted, one page at a
 * time: a page whose block is corrupt fails alone. 0, -EAGAIN or -errno;
 * -ENOTSUP when the record cannot be read page by page. */
int rs_resolve_by_page(wp_restorer *r, uint32_t index, struct rs_buffers *b);
/* The hot queue: records a fault touched, for the fill thread to complete
 * before it goes on in image order (bounded; full: dropped). take waits up
 * to wait_ms for one; -1 if none. */
void rs_hot_push(wp_restorer *r, uint32_t index);
int64_t rs_hot_take(wp_restorer *r, uint32_t wait_ms);

/* Sets the state bits of page p of g (under install_lock), counting pages
 * that become settled. */
void rs_set(wp_restorer *r, struct rs_range *g, uint64_t p, uint8_t bits);

/* Installs pages [p, p + n) of range g from src (n pages; NULL: zero pages;
 * p and n whole units of g: huge pages in a hugetlbfs range),
 * page by page where the kernel says so: a present page is never replaced
 * (EEXIST: kept, and mapped with UFFDIO_CONTINUE if it is in the page cache
 * only), ENOENT marks the page gone. Marks what it installs resident.
 * Returns 0, -EAGAIN (a discard event is pending: retry after reading it) or
 * another -errno. Called with install_lock held. */
int rs_install(wp_restorer *r, struct rs_range *g, uint64_t p, uint64_t n, const uint8_t *src);

/* A fault on a settled page (discarded, or raced): zero if nothing is
 * there, else map what is (never replaces); a whole huge page in a hugetlbfs
 * range. Then wakes the faulting thread. */
int rs_install_zero_or_keep(wp_restorer *r, struct rs_range *g, uint64_t p);

/* 0 if fd is a userfaultfd opened O_NONBLOCK; -ENOTTY: not a userfaultfd;
 * -EBADFD: a blocking one (its read() would block the fault thread). */
int rs_check_uffd(int fd);

/* UFFDIO_POISON over [hva, hva + len): 0 or -errno (-EEXIST: a page is there). */
int rs_poison_hva(wp_restorer *r, uint64_t hva, uint64_t len);

/* Resolves pages [p, p + n) with UFFDIO_POISON where the VMM negotiated it;
 * returns 0 or -errno (-EINVAL: not negotiated). */
int rs_poison(wp_restorer *r, struct rs_range *g, uint64_t p, uint64_t n);

#endif
