/*
 * Internal: the engine's state, shared by engine.c (life cycle, regions,
 * protection), pool.c (slot ring), fault.c (fault thread) and sweep.c.
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
#define WP_SPIN_NS 5000ull         /* keep polling this long after an event */
#define WP_OVERFLOW_NS 200000000ull /* a fallback waiting longer overflows */
#define WP_SWEEP_MAX_PAGES 16384u   /* scratch size for one sweep call */

enum { PAGE_PENDING = 0, PAGE_COPYING = 1, PAGE_SAVED = 2 };

/* What a write fault means. ARMING: protection is on but the cut has not
 * happened: remember the page as written and let the writer go. CUTTING: the
 * guest is frozen and written pages are being re-protected; faults wait.
 * SNAPSHOT: save the page, then let the writer go. */
enum { MODE_IDLE = 0, MODE_ARMING = 1, MODE_CUTTING = 2, MODE_SNAPSHOT = 3 };

/* A range of guest memory; its pages are captured once, whoever maps them. */
struct wp_region {
    uint64_t size;
    uint64_t pages;
    uint8_t *state;      /* one PAGE_* per page, accessed atomically */
    uint8_t *written;    /* while arming: 1 if unprotected since arming (fault thread only) */
    const uint8_t *view; /* a mapping in this process for reading, or NULL */
    int32_t read_via;    /* with no view: mapping read with process_vm_readv; -1 none yet */
};

/* A process whose page tables are protected; it created `uffd`. */
struct wp_process {
    int uffd;
    int32_t pid;
    _Atomic bool dead; /* its address space is gone: skipped from now on */
};

/* Where one process maps one region. */
struct wp_mapping {
    uint32_t region;
    uint32_t process;
    uint64_t hva;
};

struct wp_overflow {
    struct wp_overflow *next;
    uint64_t key;
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
    _Atomic uint64_t batch_seq;    /* odd while the fault thread serves a batch */
    _Atomic uint64_t last_fault_key; /* where the guest last wrote (+1; 0: none), for the sweep */
    uint64_t *written_keys;        /* pages unprotected while arming (fault thread only) */
    size_t written_count, written_cap;

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
    uint64_t *slot_keys;
    _Atomic uint64_t head;
    _Atomic uint64_t tail;

    /* Fallback wait: the fault thread sleeps here until drain frees a slot. */
    pthread_mutex_t lock;
    pthread_cond_t freed;
    _Atomic bool producer_waiting;
    struct wp_overflow *overflow_head; /* under lock; FIFO via overflow_tail */
    struct wp_overflow **overflow_tail;
    _Atomic uint64_t overflow_count;

    /* Sweep scratch (one sweeper at a time). */
    unsigned char *residency;
    bool check_residency;

    /* Counters: each written by one thread, read racily by stats. */
    _Atomic uint64_t pages_saved;
    uint64_t faults, faults_spurious, fallbacks, fallback_ns, overflow_pages;
    uint64_t pool_high_water, pages_swept, pages_zero, fault_ns_max, fault_ns_total, pages_fault_around;
    uint64_t arm_faults, cut_pages;
    uint32_t fault_around; /* pages per fault-around window; 1 = off */
    uint64_t hist[WP_HIST_BUCKETS];
};

/* engine.c */
int wp_writeprotect(int uffd, uint64_t hva, uint64_t len, bool protect);
void wp_record_error(wp_engine *e, int32_t err, int32_t process);
bool wp_claim_page(struct wp_region *r, uint64_t page);
void wp_mark_saved(wp_engine *e, struct wp_region *r, uint64_t page);
int wp_read_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, uint8_t *dst);
void wp_unprotect_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count);

/* pool.c */
void wp_pool_store(wp_engine *e, uint32_t region, uint64_t page);
/* `count` claimed pages from `page` into consecutive slots, reading each
 * stretch with one call. The caller guarantees that many free slots. */
void wp_pool_store_run(wp_engine *e, uint32_t region, uint64_t page, uint64_t count);
uint64_t wp_pool_free_slots(wp_engine *e);

/* fault.c */
void *wp_fault_thread(void *arg);

static inline uint64_t wp_page_key(uint32_t region, uint64_t page)
{
    return ((uint64_t)region << 48) | page;
}

#endif
