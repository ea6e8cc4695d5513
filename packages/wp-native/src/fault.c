/*
 * The fault-service thread: reads write faults from every process's uffd,
 * copies the faulting page into the pool, marks it saved and unprotects it in
 * every process that maps it. It never waits on JS except in the synchronous
 * fallback, and never writes guest memory.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

static const struct wp_mapping *find_mapping(wp_engine *e, uint32_t process, uint64_t hva)
{
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        if (m->process == process && hva >= m->hva && hva - m->hva < e->regions[m->region].size)
            return m;
    }
    return NULL;
}

/*
 * Fault-around: a guest that wrote one page tends to write its neighbours
 * next, and each of those would be another ~40 us fault. With the faulting
 * writer already woken, save the still-pending pages of its aligned window
 * too, using at most the free half of the pool: this must never wait.
 */
static void save_neighbours(wp_engine *e, uint32_t ri, uint64_t page)
{
    struct wp_region *r = &e->regions[ri];
    uint64_t w0 = page - page % e->fault_around;
    uint64_t w1 = w0 + e->fault_around < r->pages ? w0 + e->fault_around : r->pages;
    uint64_t free_slots = wp_pool_free_slots(e);
    uint64_t budget = free_slots > e->slots / 2 ? free_slots - e->slots / 2 : 0;
    for (uint64_t p = w0; p < w1 && budget > 0;) {
        /* A run of pages we could claim: read into the pool in one go,
         * marked saved, unprotected with one ioctl. */
        uint64_t run = p;
        while (p < w1 && p - run < budget && p != page && wp_claim_page(r, p))
            p++;
        uint64_t n = p - run;
        if (n > 0) {
            wp_pool_store_run(e, ri, run, n);
            e->pages_fault_around += n; /* before SAVED: counters add up once the engine is done */
            for (uint64_t q = run; q < p; q++)
                wp_mark_saved(e, r, q);
            wp_unprotect_pages(e, ri, run, n);
            budget -= n;
        }
        if (p < w1 && n == 0)
            p++; /* the faulting page, or one already taken */
    }
}

/* Before the cut: let the writer go and remember the page, which the cut
 * re-protects. Costs one fault per page written while arming. */
static void note_written(wp_engine *e, uint32_t ri, uint64_t page)
{
    struct wp_region *r = &e->regions[ri];
    if (!r->written[page]) {
        if (e->written_count == e->written_cap) {
            size_t cap = e->written_cap ? e->written_cap * 2 : 4096;
            uint64_t *keys = realloc(e->written_keys, cap * sizeof *keys);
            if (!keys) {
                /* Cannot remember it: keep it protected and let the cut find it saved later. */
                wp_record_error(e, -ENOMEM, -1);
                return;
            }
            e->written_keys = keys;
            e->written_cap = cap;
        }
        r->written[page] = 1;
        e->written_keys[e->written_count++] = wp_page_key(ri, page);
    }
    e->arm_faults++;
    wp_unprotect_pages(e, ri, page, 1);
}

static void serve_write_fault(wp_engine *e, uint32_t process, uint64_t fault_hva)
{
    uint64_t start = monotonic_ns();
    const struct wp_mapping *m = find_mapping(e, process, fault_hva);
    if (!m)
        return;
    uint32_t ri = m->region;
    struct wp_region *r = &e->regions[ri];
    uint64_t page = (fault_hva - m->hva) / WP_PAGE_SIZE;
    int mode = atomic_load(&e->mode);
    if (mode == MODE_ARMING)
        return note_written(e, ri, page);
    /* A fault during the cut (a writer that was not frozen) waits for it. */
    while (mode == MODE_CUTTING && !atomic_load(&e->stopping))
        mode = atomic_load(&e->mode);
    if (wp_claim_page(r, page)) {
        wp_pool_store(e, ri, page);
        e->faults++; /* before SAVED: counters add up once wp_engine_done says so */
        wp_mark_saved(e, r, page);
        wp_unprotect_pages(e, ri, page, 1);
        uint64_t ns = monotonic_ns() - start;
        e->fault_ns_total += ns;
        if (ns > e->fault_ns_max)
            e->fault_ns_max = ns;
        e->hist[hist_bucket(ns, WP_HIST_BUCKETS)]++;
        if (e->fault_around > 1)
            save_neighbours(e, ri, page);
        /* Tell the sweep where the guest writes: it goes there next. */
        atomic_store_explicit(&e->last_fault_key, wp_page_key(ri, page) + 1, memory_order_relaxed);
        return;
    }
    /* The sweep owns it (or it is already saved): wait for SAVED, then make
     * sure the writer is woken. Unprotecting a saved page is harmless. */
    while (__atomic_load_n(&r->state[page], __ATOMIC_ACQUIRE) != PAGE_SAVED && !atomic_load(&e->stopping))
        __builtin_ia32_pause();
    wp_writeprotect(e->processes[process].uffd, m->hva + page * WP_PAGE_SIZE, WP_PAGE_SIZE, false);
    e->faults_spurious++;
}

/* Read and serve what is queued on one process's uffd; true if anything was. */
static bool serve_process(wp_engine *e, uint32_t process)
{
    struct uffd_msg msgs[64];
    struct wp_process *p = &e->processes[process];
    if (p->uffd < 0 || atomic_load(&p->dead))
        return false;
    ssize_t n = read(p->uffd, msgs, sizeof msgs);
    if (n <= 0)
        return false;
    /* Odd while serving: the cut waits for an even count before re-protecting. */
    atomic_fetch_add(&e->batch_seq, 1);
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT && (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
            serve_write_fault(e, process, msgs[i].arg.pagefault.address);
    }
    atomic_fetch_add(&e->batch_seq, 1);
    return true;
}

void *wp_fault_thread(void *arg)
{
    wp_engine *e = arg;
    uint64_t last_event = 0;
    while (!atomic_load(&e->stopping)) {
        bool any = false;
        for (uint32_t p = 0; p < e->process_count; p++)
            any |= serve_process(e, p);
        if (any) {
            last_event = monotonic_ns();
            continue;
        }
        /* Wake-ups cost ~50 us here: poll a little longer before sleeping. */
        if (monotonic_ns() - last_event < WP_SPIN_NS) {
            __builtin_ia32_pause();
            continue;
        }
        struct pollfd fds[WP_MAX_PROCESSES + 1];
        nfds_t n = 0;
        fds[n++] = (struct pollfd){.fd = e->stop_fd, .events = POLLIN};
        for (uint32_t p = 0; p < e->process_count; p++)
            if (e->processes[p].uffd >= 0 && !atomic_load(&e->processes[p].dead))
                fds[n++] = (struct pollfd){.fd = e->processes[p].uffd, .events = POLLIN};
        /* Timed: a process registered after we slept is picked up within 10 ms. */
        poll(fds, n, 10);
        last_event = monotonic_ns();
    }
    return NULL;
}
