/*
 * Internal: the engine's state, shared by engine.c (life cycle, regions,
 * reading pages), protect.c (arm, cut, unprotect), fault.c (fault thread and
 * slot pool) and sweep.c (the writer's next batch: pool pages, then sweeps).
 *
 * Every page of every region has a state: PENDING (not captured, protected
 * after the cut), COPYING (claimed by the fault thread or the sweep) or SAVED.
 * Only the claimer of a page (a CAS from PENDING) copies it, and it copies
 * while the page is still write-protected in every process, so each page is
 * captured exactly once with its content at the cut. Protection is removed
 * (in every process mapping the page) only after SAVED.
 */
#ifndef VMSNAP_WP_ENGINE_INTERNAL_H
#define VMSNAP_WP_ENGINE_INTERNAL_H

#include "uffd.h"
#include "vmsnap_engine.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define WP_MAX_REGIONS 64
#define WP_MAX_PROCESSES 16
#define WP_MAX_MAPPINGS 256
#define WP_SPIN_NS 5000ull         /* fault thread and full pool: poll 5 us before sleeping */
#define WP_OVERFLOW_NS 200000000ull /* a fallback waiting longer overflows */
#define WP_SWEEP_MAX_PAGES 16384u   /* scratch size for one sweep call */
#define WP_DRAIN_QUIET_NS 5000000ull /* wp_engine_destroy reads events until none came for 5 ms */
#define WP_DRAIN_MAX_NS 1000000000ull /* and for 1 s at most */
#define WP_STOP_UNPROTECT_NS 10000000ull /* wp_engine_unprotect_all at the end: EAGAIN for 10 ms, the unregister does it */

/* A unit's state. LOST: claimed by a discard after the cut (anonymous
 * memory whose content at the cut is gone, discard.c): never saved, the
 * snapshot has failed; whoever waits for the unit to be saved stops
 * waiting, as for SAVED. */
enum { PAGE_PENDING = 0, PAGE_COPYING = 1, PAGE_SAVED = 2, PAGE_LOST = 3 };

/* What a write fault means. ARMING: protection is on but the cut has not
 * happened: remember the page as written and let the writer go. CUTTING: the
 * guest is frozen and written pages are being re-protected; faults wait.
 * SNAPSHOT: save the page, then let the writer go. */
enum { MODE_IDLE = 0, MODE_ARMING = 1, MODE_CUTTING = 2, MODE_SNAPSHOT = 3 };

/* A range of guest memory; its pages are captured once, whoever maps them. */
struct wp_region {
    uint64_t size;
    uint64_t pages;
    /* 4 KiB pages per protection unit, a power of two: 1, or 512 for 2 MiB
     * hugetlbfs pages (the kernel protects and resolves hugetlbfs memory only
     * in whole huge pages). A unit is claimed, copied, saved and unprotected
     * whole; only the state (and `written`) of its first page, its head, is
     * used. Read from the first mapping's KernelPageSize (wp_engine_map_region);
     * 0 until then. */
    uint64_t unit;
    uint8_t *state;      /* one PAGE_* per page (unit heads only), accessed atomically */
    uint8_t *written;    /* while arming: 1 if unprotected since arming (fault thread only; unit heads) */
    const uint8_t *view; /* a mapping in this process for reading, or NULL */
    int32_t read_via;    /* with no view: mapping read with process_vm_readv; -1 none yet */
    int fd;              /* shared memory: the file behind the view, read with pread (backing.c); -1 none */
    uint64_t fd_offset;  /* where the region starts in it */
    uint8_t *discarded;  /* after the cut, the process that discarded the page + 1, else 0 (discard.c); atomic */
    /* Private anonymous memory (one process maps it): a page not populated
     * is zero. zero_at_cut: 1 per page known empty at the cut (discard.c),
     * written while arming and at the cut, read after; NULL if none. */
    bool anonymous;
    uint8_t *zero_at_cut;
    /* Shared memory: 1 per page where its file held data when the writer
     * first looked after the cut, 0 for a hole (sweep.c); NULL until then.
     * Built once: a SEEK_HOLE scans to the end of the data it starts in, so
     * asking per batch cost O(region) each time (the demo ran 5x slower). */
    uint8_t *_Atomic populated;
};

/* An unprotect the fault thread could not do yet (EAGAIN: an event pending).
 * armed: a write let through before the cut (ARMING or CUTTING when it was
 * deferred), which the cut re-protects: once the cut has happened it must
 * never be unprotected, only its writer woken (wp_retry_deferred). */
struct wp_deferred {
    uint32_t process;
    bool armed;
    uint64_t hva, len;
};

/* A write fault read while the cut runs, served once it has ended. */
struct wp_held_fault {
    uint32_t process;
    uint64_t hva;
    uint64_t since_ns; /* when it was read: its wait counts in the fault's time */
};

/* A process whose page tables are protected; it created `uffd`. */
struct wp_process {
    int uffd;
    int32_t pid;
    int pagemap;       /* its /proc/PID/pagemap (discard.c), -1 if it cannot be read */
    _Atomic bool dead; /* its address space is gone: skipped from now on */
};

/* Where one process maps one region. */
struct wp_mapping {
    uint32_t region;
    uint32_t process;
    uint64_t hva;
};

/* One page of one region. */
struct wp_page_ref {
    uint32_t region;
    uint64_t page;
};

struct wp_overflow {
    struct wp_overflow *next;
    struct wp_page_ref at;
    uint8_t data[WP_PAGE_SIZE];
};

struct wp_engine {
    int stop_fd;            /* eventfd: wakes the fault thread out of poll() */
    uint64_t uffd_features; /* negotiated on every uffd */
    bool sync_mode;
    bool thread_started;
    pthread_t thread;
    _Atomic bool stopping;
    _Atomic int32_t error;         /* first failure (-errno), 0 if none */
    _Atomic int32_t error_process; /* the process it concerns, -1 if none */
    _Atomic int mode;              /* MODE_* */
    struct wp_deferred *deferred;  /* fault thread only: unprotects to retry after its next read */
    size_t deferred_count, deferred_cap;
    struct wp_held_fault *held;    /* fault thread only: write faults read during the cut */
    size_t held_count, held_cap;
    _Atomic bool noting;           /* the fault thread is noting one armed write: the cut waits */
    struct wp_page_ref *armed_writes; /* pages unprotected while arming (fault thread only) */
    size_t armed_count, armed_cap;

    /* What the sweep takes next (the writer's thread only). */
    bool steer;                    /* sweep where the guest last faulted first */
    _Atomic uint64_t steer_at;     /* that place: region << 48 | page, plus 1; 0 none (C only) */
    uint32_t sweep_region;         /* the in-order sweep's cursor */
    uint64_t sweep_page;
    /* A unit larger than one batch (a 1 GiB huge page) swept over several
     * calls: claimed once, kept protected until all of it is taken. */
    bool big_active;
    uint32_t big_region;
    uint64_t big_head, big_done; /* its first page; pages taken so far */

    uint32_t process_count;
    struct wp_process processes[WP_MAX_PROCESSES]; /* [0] is this process */
    uint32_t mapping_count;
    struct wp_mapping mappings[WP_MAX_MAPPINGS];
    uint32_t region_count;
    struct wp_region regions[WP_MAX_REGIONS];
    uint64_t pages_total;

    /* Slot ring. head is written only by the fault thread, tail only by drain. */
    uint32_t slots;
    uint8_t *slot_data;
    struct wp_page_ref *slot_pages; /* which page each slot holds */
    _Atomic uint64_t head;
    _Atomic uint64_t tail;

    /* Fallback wait: the fault thread sleeps here until drain frees a slot. */
    pthread_mutex_t lock;
    pthread_cond_t freed;
    _Atomic bool producer_waiting;
    struct wp_overflow *overflow_head; /* under lock; FIFO via overflow_tail */
    struct wp_overflow **overflow_tail;
    _Atomic uint64_t overflow_count;

    bool populated_built;          /* the writer built every region's `populated` map */
    int file_watch;                /* inotify on every region's file (backing.c), -1 none */

    /* Sweep scratch (one sweeper at a time). */
    unsigned char *residency;
    bool check_residency;

    /* Counters: each written by one thread, read racily by stats. */
    _Atomic uint64_t pages_saved;
    uint64_t faults, faults_spurious, fallbacks, fallback_ns, overflow_pages;
    uint64_t pool_high_water, pages_swept, pages_zero, fault_ns_max, fault_ns_total, pages_fault_around;
    uint64_t arm_faults, cut_pages, pages_steered;
    _Atomic uint64_t pages_discarded; /* discarded before saved, content lost */
    _Atomic uint64_t discard_epoch;   /* odd while the fault thread reads events and marks discards */
    uint32_t fault_around; /* pages per fault-around window; 1 = off */
    uint64_t hist[WP_HIST_BUCKETS];
#ifdef WP_TEST_HOOKS
    _Atomic uint32_t test_message_delay_us; /* test_hooks.h */
    _Atomic bool test_defer_armed;          /* test_hooks.h */
#endif
};

/* The first page of the unit holding `page`. */
static inline uint64_t wp_unit_head(const struct wp_region *r, uint64_t page)
{
    return page & ~(r->unit - 1);
}

/* engine.c */
void wp_record_error(wp_engine *e, int32_t err, int32_t process);
/* After the cut: a region's file changed through the file (backing.c's
 * watch) fails the snapshot with -ESTALE. Asked by wp_engine_error, which
 * the writer calls every turn and once more before it commits. */
void wp_check_files(wp_engine *e);
/* A page just read as all zero: if the hole map says its file held data
 * there after the cut and it is a hole now, a hole was punched through the
 * file (fallocate), which no write fault or uffd event reports: its content
 * at the cut is gone, the snapshot fails with -ESTALE. (A punch the guest
 * has written over again is not seen: docs/design.md.) Called where zero
 * pages are found (sweep.c), so no page is checked twice. */
void wp_check_punched(wp_engine *e, uint32_t region, uint64_t page);
void wp_process_failed(wp_engine *e, uint32_t process, int err);
/* Claim (PENDING -> COPYING) and mark saved the unit whose head is `page`. */
bool wp_claim_page(struct wp_region *r, uint64_t page);
void wp_mark_saved(wp_engine *e, struct wp_region *r, uint64_t page);
int wp_read_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, uint8_t *dst);
int wp_check_discarded(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, uint8_t *read);
bool wp_page_is_zero(const uint8_t *page);

/* backing.c: the file behind shared memory. */
/* The shared file mapping(s) of process pid (0: this one) covering
 * [hva, hva + size), as one file: a new fd and the file offset of hva;
 * -ENOENT if not one. */
int wp_backing_open(int32_t pid, uint64_t hva, uint64_t size, int *fd_out, uint64_t *offset_out);
/* pread all of it; -EIO if the file ends first (it shrank). */
int wp_backing_read(int fd, uint64_t offset, uint8_t *dst, size_t len);
/* map[i] = 1 if page i of `pages` from offset holds data, 0 if a hole. */
int wp_backing_data_map(int fd, uint64_t offset, uint64_t pages, uint8_t *map);
/* Adds fd's file to an inotify instance, for IN_MODIFY: a write(2), a
 * fallocate (a hole punch, MADV_REMOVE) or a truncate changes the file
 * without any write fault. */
int wp_backing_watch(int watch, int fd);
/* Was any watched file modified since the last call? Drains the events. */
bool wp_backing_changed(int watch);
/* Does the file hold data (not a hole) in the page at offset? 1, 0 or -errno. */
int wp_backing_has_data(int fd, uint64_t offset);
int wp_backing_size(int fd, uint64_t *size_out);
int wp_kernel_page_size(int32_t pid, uint64_t hva, uint64_t *size_out);
/* Is [hva] in process pid private anonymous memory (no file, not shared)? */
bool wp_private_anonymous(int32_t pid, uint64_t hva);

/* protect.c */
int wp_writeprotect(int uffd, uint64_t hva, uint64_t len, bool protect);
/* Unprotect [hva, hva + len) in one process, all processes mapping the
 * pages. On the fault thread an EAGAIN defers it (wp_retry_deferred). */
void wp_unprotect_in(wp_engine *e, uint32_t process, uint64_t hva, uint64_t len);
void wp_unprotect_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count);
/* Fault thread: retry deferred unprotects; true if some still wait. */
bool wp_retry_deferred(wp_engine *e);

/* discard.c: the guest discarding or moving memory during a snapshot. */
/* A REMOVE event for [start, end) of a process's memory; `armed`: read
 * while arming, with `noting` set (the discard belongs before the cut). */
void wp_discard_range(wp_engine *e, uint32_t process, uint64_t start, uint64_t end, bool armed);
void wp_memory_moved(wp_engine *e, uint32_t process);
/* A FORK event: the child's uffd (given to this process) is closed; a
 * snapshot of shared memory the parent maps fails (-ECHILD). */
void wp_process_forked(wp_engine *e, uint32_t process, int child_uffd);
/* Messages read only to be dropped (the engine is ending): a FORK's uffd
 * is closed, so the child is not left registered with nobody reading. */
void wp_drop_messages(const struct uffd_msg *msgs, ssize_t bytes);
/* wp_engine_destroy, after the unregister: reads the events still queued on
 * every process's uffd, so no thread stays blocked on one (discard.c). */
void wp_drain_events(wp_engine *e);
/* Once armed (everything protected, the guest running): note which pages of
 * private anonymous memory are empty. Every later change to them is a noted
 * write or discard, which the cut looks at again. 0 or -errno. */
int wp_note_zero_when_armed(wp_engine *e);
/* At the cut, frozen, before re-protecting [page, page + count) of a region
 * (the pages noted while armed): note which of them are empty now. With the
 * above: which pages were zero at the cut, so that a discard of them after
 * it loses nothing. 0 or -errno. */
int wp_note_zero_at_cut(wp_engine *e, uint32_t region, uint64_t page, uint64_t count);
/* Was the page zero at the cut, as far as the cut saw? */
bool wp_zero_at_cut(const struct wp_region *r, uint64_t page);

/* Is the page still write-protected (a uffd-wp pte or marker) in the
 * process's page table? From /proc/PID/pagemap bit 57. */
bool wp_still_protected(wp_engine *e, uint32_t process, uint64_t hva);

/* fault.c: the fault thread and the slot pool it fills. */
void *wp_fault_thread(void *arg);
/* While arming: remember that the unit whose head is `page` must be
 * re-protected at the cut. Fault thread only, with `noting` set. */
void wp_note_armed_write(wp_engine *e, uint32_t region, uint64_t page);
/* Take up to max pages out of the pool, oldest first: contents to buf (one
 * page each), their region and page index to regions_out / pages_out. The
 * writer's thread only. */
uint32_t wp_pool_take(wp_engine *e, uint8_t *buf, uint32_t *regions_out, uint64_t *pages_out, uint32_t max);

#endif
