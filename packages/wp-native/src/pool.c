/*
 * The slot pool: a single-producer (fault thread) single-consumer (drain)
 * ring of 4 KiB slots. When it is full the fault thread waits (the
 * synchronous fallback); after WP_OVERFLOW_NS it copies into a heap slot
 * instead, so a writer thread that itself touches guest memory can never
 * deadlock the snapshot.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t wp_pool_free_slots(wp_engine *e)
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
    o->key = wp_page_key(region, page);
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
void wp_pool_store(wp_engine *e, uint32_t region, uint64_t page)
{
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    if (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots && !wait_for_slot(e, head)) {
        if (store_overflow(e, region, page))
            return;
        /* Out of memory: keep waiting for the pool; correctness over latency. */
        while (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots)
            usleep(100);
    }
    uint64_t slot = head % e->slots;
    wp_read_pages(e, region, page, 1, e->slot_data + slot * WP_PAGE_SIZE);
    e->slot_keys[slot] = wp_page_key(region, page);
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

void wp_pool_store_run(wp_engine *e, uint32_t region, uint64_t page, uint64_t count)
{
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    for (uint64_t done = 0; done < count;) {
        /* Consecutive slots up to the end of the ring: one read each. */
        uint64_t slot = (head + done) % e->slots;
        uint64_t n = count - done < e->slots - slot ? count - done : e->slots - slot;
        wp_read_pages(e, region, page + done, n, e->slot_data + slot * WP_PAGE_SIZE);
        for (uint64_t k = 0; k < n; k++)
            e->slot_keys[slot + k] = wp_page_key(region, page + done + k);
        done += n;
    }
    /* Release: slot contents and keys are visible before the consumer sees head. */
    atomic_store_explicit(&e->head, head + count, memory_order_release);
    uint64_t used = head + count - atomic_load_explicit(&e->tail, memory_order_acquire);
    if (used > e->pool_high_water)
        e->pool_high_water = used;
}

int32_t wp_engine_drain(wp_engine *e, uint8_t *buf, uint64_t *keys_out, uint32_t max_pages)
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
            keys_out[n++] = o->key;
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
        keys_out[n++] = e->slot_keys[slot];
        tail++;
    }
    /* Release: our reads of the slots are done before the producer reuses them. */
    atomic_store_explicit(&e->tail, tail, memory_order_release);
    if (atomic_load(&e->producer_waiting)) {
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->freed);
        pthread_mutex_unlock(&e->lock);
    }
    return (int32_t)n;
}
