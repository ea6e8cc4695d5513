/*
 * The fault thread and the slot pool it fills.
 *
 * The fault thread reads write faults from every process's uffd, copies the
 * faulting page into a pool slot, marks it saved and unprotects it in every
 * process that maps it. It never waits on JS except in the synchronous
 * fallback, and never writes guest memory.
 *
 * The pool is a single-producer (fault thread) single-consumer (the writer,
 * through wp_pool_take) ring of 4 KiB slots; a huge page (hugetlbfs) goes in
 * as its 4 KiB pages, in chunks (pool_store_unit). When it is full the fault thread
 * waits (the synchronous fallback); after WP_OVERFLOW_NS it copies into a
 * heap slot instead, so a writer thread that itself touches guest memory can
 * never deadlock the snapshot.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- the slot pool ---- */

static uint64_t pool_free_slots(wp_engine *e)
{
    uint64_t used = atomic_load_explicit(&e->head, memory_order_relaxed) -
                    atomic_load_explicit(&e->tail, memory_order_acquire);
    return e->slots - used;
}

/* Wait until the pool has a free slot; false if the caller should overflow
 * instead (stuck too long, or stopping). Fault thread only. */
static bool wait_for_slot(wp_engine *e, uint64_t head)
{
    uint64_t start = monotonic_ns();
    e->fallbacks++;
    bool ok = true;
    while (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots) {
        uint64_t waited = monotonic_ns() - start;
        if (atomic_load(&e->stopping) || waited >= WP_OVERFLOW_NS) {
            ok = false;
            break;
        }
        /* Spin briefly: a drain in progress frees slots within microseconds. */
        if (waited < WP_SPIN_NS) {
            __builtin_ia32_pause();
            continue;
        }
        pthread_mutex_lock(&e->lock);
        atomic_store(&e->producer_waiting, true);
        if (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots) {
            /* Timed: a drain that raced past producer_waiting costs at most 1 ms. */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&e->freed, &e->lock, &ts);
        }
        atomic_store(&e->producer_waiting, false);
        pthread_mutex_unlock(&e->lock);
    }
    e->fallback_ns += monotonic_ns() - start;
    return ok;
}

static bool store_overflow(wp_engine *e, uint32_t region, uint64_t page)
{
    struct wp_overflow *o = malloc(sizeof *o);
    if (!o)
        return false;
    o->next = NULL;
    o->at = (struct wp_page_ref){.region = region, .page = page};
    wp_read_pages(e, region, page, 1, o->data);
    pthread_mutex_lock(&e->lock);
    *e->overflow_tail = o;
    e->overflow_tail = &o->next;
    pthread_mutex_unlock(&e->lock);
    atomic_fetch_add(&e->overflow_count, 1);
    e->overflow_pages++;
    return true;
}

/* Copy one claimed page into the pool (or an overflow slot). Fault thread only. */
static void pool_store(wp_engine *e, uint32_t region, uint64_t page)
{
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    if (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots && !wait_for_slot(e, head)) {
        if (store_overflow(e, region, page))
            return;
        /* Out of memory: keep waiting for the pool; correctness over latency.
         * Not past the engine's end: the writer may be gone for good. */
        while (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots) {
            if (atomic_load(&e->stopping))
                return;
            usleep(100);
        }
    }
    uint64_t slot = head % e->slots;
    wp_read_pages(e, region, page, 1, e->slot_data + slot * WP_PAGE_SIZE);
    e->slot_pages[slot] = (struct wp_page_ref){.region = region, .page = page};
    /* Release: slot content and key are visible before the consumer sees head. */
    atomic_store_explicit(&e->head, head + 1, memory_order_release);
    uint64_t used = head + 1 - atomic_load_explicit(&e->tail, memory_order_acquire);
    if (used > e->pool_high_water)
        e->pool_high_water = used;
    if (e->sync_mode) {
        /* No buffering: hold the writer until drain has taken the page. */
        uint64_t start = monotonic_ns();
        while (atomic_load_explicit(&e->tail, memory_order_acquire) < head + 1 && !atomic_load(&e->stopping) &&
               monotonic_ns() - start < WP_OVERFLOW_NS)
            __builtin_ia32_pause();
    }
}

/* `count` claimed pages from `page` into consecutive slots, reading each
 * stretch with one call. The caller guarantees that many free slots. */
static void pool_store_run(wp_engine *e, uint32_t region, uint64_t page, uint64_t count)
{
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    for (uint64_t done = 0; done < count;) {
        /* Consecutive slots up to the end of the ring: one read each. */
        uint64_t slot = (head + done) % e->slots;
        uint64_t n = count - done < e->slots - slot ? count - done : e->slots - slot;
        wp_read_pages(e, region, page + done, n, e->slot_data + slot * WP_PAGE_SIZE);
        for (uint64_t k = 0; k < n; k++)
            e->slot_pages[slot + k] = (struct wp_page_ref){.region = region, .page = page + done + k};
        done += n;
    }
    /* Release: slot contents and keys are visible before the consumer sees head. */
    atomic_store_explicit(&e->head, head + count, memory_order_release);
    uint64_t used = head + count - atomic_load_explicit(&e->tail, memory_order_acquire);
    if (used > e->pool_high_water)
        e->pool_high_water = used;
}

/*
 * A claimed huge page (a unit of `count` pages): its 4 KiB pages go into the
 * pool as many at a time as there are free slots, and when there are none
 * one at a time through pool_store, which waits for the writer (the
 * synchronous fallback) or overflows. So a pool of any size holds a huge
 * page in chunks and the memory stays the pool's; the huge page stays
 * write-protected, its writer blocked, until every chunk is copied.
 */
static void pool_store_unit(wp_engine *e, uint32_t region, uint64_t page, uint64_t count)
{
    for (uint64_t done = 0; done < count;) {
        uint64_t free_slots = e->sync_mode ? 0 : pool_free_slots(e);
        if (free_slots == 0) {
            pool_store(e, region, page + done++);
            continue;
        }
        uint64_t n = count - done < free_slots ? count - done : free_slots;
        pool_store_run(e, region, page + done, n);
        done += n;
    }
}

uint32_t wp_pool_take(wp_engine *e, uint8_t *buf, uint32_t *regions_out, uint64_t *pages_out, uint32_t max_pages)
{
    uint32_t n = 0;
    if (atomic_load(&e->overflow_count) > 0) {
        pthread_mutex_lock(&e->lock);
        while (n < max_pages && e->overflow_head) {
            struct wp_overflow *o = e->overflow_head;
            e->overflow_head = o->next;
            if (!e->overflow_head)
                e->overflow_tail = &e->overflow_head;
            memcpy(buf + (size_t)n * WP_PAGE_SIZE, o->data, WP_PAGE_SIZE);
            regions_out[n] = o->at.region;
            pages_out[n++] = o->at.page;
            free(o);
            atomic_fetch_sub(&e->overflow_count, 1);
        }
        pthread_mutex_unlock(&e->lock);
    }
    uint64_t tail = atomic_load_explicit(&e->tail, memory_order_relaxed);
    /* Acquire: pairs with the fault thread's release of head. */
    uint64_t head = atomic_load_explicit(&e->head, memory_order_acquire);
    while (n < max_pages && tail < head) {
        uint64_t slot = tail % e->slots;
        memcpy(buf + (size_t)n * WP_PAGE_SIZE, e->slot_data + slot * WP_PAGE_SIZE, WP_PAGE_SIZE);
        regions_out[n] = e->slot_pages[slot].region;
        pages_out[n++] = e->slot_pages[slot].page;
        tail++;
    }
    /* Release: our reads of the slots are done before the producer reuses them. */
    atomic_store_explicit(&e->tail, tail, memory_order_release);
    if (atomic_load(&e->producer_waiting)) {
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->freed);
        pthread_mutex_unlock(&e->lock);
    }
    return n;
}

/* ---- the fault thread ---- */

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
    uint64_t free_slots = pool_free_slots(e);
    uint64_t budget = free_slots > e->slots / 2 ? free_slots - e->slots / 2 : 0;
    /* Never read a page that is not populated (a hole of shared memory's
     * file): holes stay for the sweep (zero, not read). Until the writer has
     * mapped the holes (sweep.c), no fault-around there. */
    const uint8_t *populated = NULL;
    if (r->fd >= 0 && !(populated = atomic_load_explicit(&r->populated, memory_order_acquire)))
        return;
    for (uint64_t p = w0; p < w1 && budget > 0;) {
        /* A run of populated pages we could claim: read into the pool in one
         * go, marked saved, unprotected with one ioctl. */
        uint64_t run = p;
        while (p < w1 && p - run < budget && p != page && (!populated || populated[p]) && wp_claim_page(r, p))
            p++;
        uint64_t n = p - run;
        if (n > 0) {
            pool_store_run(e, ri, run, n);
            e->pages_fault_around += n; /* before SAVED: counters add up once the engine is done */
            for (uint64_t q = run; q < p; q++)
                wp_mark_saved(e, r, q);
            wp_unprotect_pages(e, ri, run, n);
            budget -= n;
        }
        if (p < w1 && n == 0)
            p++; /* the faulting page, a hole, or one already taken */
    }
}

void wp_note_armed_write(wp_engine *e, uint32_t ri, uint64_t page)
{
    struct wp_region *r = &e->regions[ri];
    page = wp_unit_head(r, page);
    if (r->written[page])
        return;
    if (e->armed_count == e->armed_cap) {
        size_t cap = e->armed_cap ? e->armed_cap * 2 : 4096;
        struct wp_page_ref *grown = realloc(e->armed_writes, cap * sizeof *grown);
        if (!grown) {
            /* Cannot remember it: the cut would miss it, so the snapshot fails. */
            wp_record_error(e, -ENOMEM, -1);
            return;
        }
        e->armed_writes = grown;
        e->armed_cap = cap;
    }
    r->written[page] = 1;
    e->armed_writes[e->armed_count++] = (struct wp_page_ref){.region = ri, .page = page};
}

/* Before the cut: let the writer go and remember the page, which the cut
 * re-protects. Costs one fault per page written while arming. */
static void note_written(wp_engine *e, uint32_t ri, uint64_t page)
{
    wp_note_armed_write(e, ri, page);
    e->arm_faults++;
    wp_unprotect_pages(e, ri, page, e->regions[ri].unit);
}

/* A write fault read while the cut runs: held until it has ended
 * (serve_held_faults). Its writer stays blocked meanwhile, as it would
 * if the cut had frozen it. Without memory to hold it, it is let through:
 * its page is not saved, and the snapshot fails. */
static void hold_fault(wp_engine *e, uint32_t process, uint64_t fault_hva, uint64_t since_ns, const struct wp_mapping *m,
                       uint64_t page)
{
    if (e->held_count == e->held_cap) {
        size_t cap = e->held_cap ? e->held_cap * 2 : 64;
        struct wp_held_fault *grown = realloc(e->held, cap * sizeof *grown);
        if (!grown) {
            wp_record_error(e, -ENOMEM, (int32_t)process);
            wp_unprotect_in(e, process, m->hva + page * WP_PAGE_SIZE, e->regions[m->region].unit * WP_PAGE_SIZE);
            return;
        }
        e->held = grown;
        e->held_cap = cap;
    }
    e->held[e->held_count++] = (struct wp_held_fault){.process = process, .hva = fault_hva, .since_ns = since_ns};
}

static void serve_write_fault(wp_engine *e, uint32_t process, uint64_t fault_hva, uint64_t start)
{
    const struct wp_mapping *m = find_mapping(e, process, fault_hva);
    if (!m)
        return;
    uint32_t ri = m->region;
    struct wp_region *r = &e->regions[ri];
    /* The unit (page or huge page) holding the fault. */
    uint64_t page = wp_unit_head(r, (fault_hva - m->hva) / WP_PAGE_SIZE);
    /* The handshake with the cut (wp_engine_protect): `noting` is set only
     * while one armed write is noted, and the fault thread never waits for
     * anything while it is set. The cut sets CUTTING, then waits for
     * `noting` to clear; both sides use sequentially consistent atomics, so
     * either the cut sees `noting` or this thread sees CUTTING. */
    atomic_store(&e->noting, true);
    int mode = atomic_load(&e->mode);
    if (mode == MODE_ARMING) {
        note_written(e, ri, page);
        atomic_store(&e->noting, false);
        return;
    }
    atomic_store(&e->noting, false);
    /* A fault during the cut (a writer that was not frozen) is held, not
     * waited on here: the cut may need this thread to read an event first
     * (the kernel refuses to re-protect, EAGAIN, while one is unread), and
     * waiting would hang both (test_cut_discard). */
    if (mode == MODE_CUTTING) {
        hold_fault(e, process, fault_hva, start, m, page);
        return;
    }
    if (wp_claim_page(r, page)) {
        if (r->unit == 1)
            pool_store(e, ri, page);
        else
            pool_store_unit(e, ri, page, r->unit);
        e->faults++; /* before SAVED: counters add up once wp_engine_done says so */
        wp_mark_saved(e, r, page);
        wp_unprotect_pages(e, ri, page, r->unit);
        uint64_t ns = monotonic_ns() - start;
        e->fault_ns_total += ns;
        if (ns > e->fault_ns_max)
            e->fault_ns_max = ns;
        e->hist[hist_bucket(ns, WP_HIST_BUCKETS)]++;
        if (e->fault_around > 1 && r->unit == 1) /* a huge page is its own fault-around */
            save_neighbours(e, ri, page);
        /* Tell the sweep where the guest writes: it goes there next. */
        atomic_store_explicit(&e->steer_at, ((uint64_t)ri << 48 | page) + 1, memory_order_relaxed);
        return;
    }
    /* The sweep owns it (or it is already saved): wait for SAVED, then make
     * sure the writer is woken. Unprotecting a saved page is harmless. A
     * huge page the sweep takes over several calls (sweep_big) is not waited
     * for: its unprotect, once it is all taken, wakes this writer. */
    if (r->unit > 1 && __atomic_load_n(&r->state[page], __ATOMIC_ACQUIRE) < PAGE_SAVED) {
        e->faults_spurious++;
        return;
    }
    /* SAVED or LOST (discard.c): both are final. */
    while (__atomic_load_n(&r->state[page], __ATOMIC_ACQUIRE) < PAGE_SAVED && !atomic_load(&e->stopping))
        __builtin_ia32_pause();
    wp_unprotect_in(e, process, m->hva + page * WP_PAGE_SIZE, r->unit * WP_PAGE_SIZE);
    e->faults_spurious++;
}

/* Read and serve what is queued on one process's uffd; true if anything was. */
static bool serve_process(wp_engine *e, uint32_t process)
{
    struct uffd_msg msgs[64];
    struct wp_process *p = &e->processes[process];
    if (p->uffd < 0 || atomic_load(&p->dead))
        return false;
    /* Reading a REMOVE event lets the discard begin: the epoch is odd from
     * before the read until its pages are marked (discard.c). A discard read
     * while armed belongs before the cut: `noting` holds the cut off until
     * its pages are noted (the handshake of serve_write_fault). */
    atomic_fetch_add(&e->discard_epoch, 1);
    atomic_store(&e->noting, true);
    bool armed = atomic_load(&e->mode) == MODE_ARMING;
    if (!armed)
        atomic_store(&e->noting, false);
    ssize_t n = read(p->uffd, msgs, sizeof msgs);
    size_t count = n > 0 ? (size_t)n / sizeof msgs[0] : 0;
    for (size_t i = 0; i < count; i++) {
        const struct uffd_msg *msg = &msgs[i];
        if (msg->event == UFFD_EVENT_REMOVE)
            wp_discard_range(e, process, msg->arg.remove.start, msg->arg.remove.end, armed);
        else if (msg->event == UFFD_EVENT_UNMAP || msg->event == UFFD_EVENT_REMAP)
            wp_memory_moved(e, process);
        else if (msg->event == UFFD_EVENT_FORK)
            wp_process_forked(e, process, (int)msg->arg.fork.ufd);
    }
    if (armed)
        atomic_store(&e->noting, false);
    atomic_fetch_add(&e->discard_epoch, 1);
    for (size_t i = 0; i < count; i++) {
#ifdef WP_TEST_HOOKS
        uint32_t delay_us = atomic_load(&e->test_message_delay_us);
        if (i > 0 && delay_us)
            usleep(delay_us);
#endif
        const struct uffd_msg *msg = &msgs[i];
        if (msg->event == UFFD_EVENT_PAGEFAULT && (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
            serve_write_fault(e, process, msg->arg.pagefault.address, monotonic_ns());
    }
    return count > 0;
}

/* Once the cut has ended: serve the write faults held during it. True if
 * any is still held (the cut runs on). */
static bool serve_held_faults(wp_engine *e)
{
    if (atomic_load(&e->mode) == MODE_CUTTING)
        return true;
    size_t n = e->held_count;
    e->held_count = 0; /* the cut has ended: none is held again */
    for (size_t i = 0; i < n; i++)
        serve_write_fault(e, e->held[i].process, e->held[i].hva, e->held[i].since_ns);
    return false;
}

void *wp_fault_thread(void *arg)
{
    wp_engine *e = arg;
    uint64_t last_event = 0;
    while (!atomic_load(&e->stopping)) {
        bool any = false;
        for (uint32_t p = 0; p < e->process_count; p++)
            any |= serve_process(e, p);
        if (e->deferred_count > 0)
            any |= wp_retry_deferred(e); /* the events just read let them through */
        if (e->held_count > 0)
            any |= serve_held_faults(e); /* polled, not slept on, until the cut ends */
        if (any) {
            last_event = monotonic_ns();
            continue;
        }
        /* A sleeping thread's wake-up costs ~55 us here, against ~17 us for a
         * polling one (docs/design.md): keep polling WP_SPIN_NS (5 us) after
         * the last event before sleeping in poll(). */
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

#ifdef WP_TEST_HOOKS
#include "test_hooks.h"
void wp_test_set_message_delay(wp_engine *e, uint32_t us)
{
    atomic_store(&e->test_message_delay_us, us);
}

void wp_test_set_defer_armed(wp_engine *e, bool on)
{
    atomic_store(&e->test_defer_armed, on);
}
#endif
