/*
 * The write-protect snapshot engine.
 *
 * Every page of every region has a state: PENDING (not captured, protected
 * after the cut), COPYING (claimed by the fault thread or the sweep) or SAVED.
 * Only the claimer of a page (a CAS from PENDING) copies it, and it copies
 * while the page is still write-protected, so each page is captured exactly
 * once with its content at the cut. Protection is removed only after SAVED.
 *
 * The pool is a single-producer (fault thread) single-consumer (drain) ring
 * of 4 KiB slots. When it is full the fault thread waits (the synchronous
 * fallback); after WP_OVERFLOW_NS it copies into a heap slot instead, so a
 * writer thread that itself touches guest memory can never deadlock us.
 */
#define _GNU_SOURCE
#include "uffd.h"
#include "vmsnap_wp.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#define WP_MAX_REGIONS 64
#define WP_SPIN_NS 50000ull          /* keep polling this long after an event */
#define WP_OVERFLOW_NS 200000000ull  /* a fallback waiting longer overflows */
#define WP_SWEEP_MAX_PAGES 16384u    /* scratch size for one sweep call */

enum { PAGE_PENDING = 0, PAGE_COPYING = 1, PAGE_SAVED = 2 };

struct wp_region {
    uint64_t hva;
    uint64_t size;
    uint64_t pages;
    uint8_t *state; /* one PAGE_* per page, accessed atomically */
};

struct wp_overflow {
    struct wp_overflow *next;
    uint64_t key;
    uint8_t data[WP_PAGE_SIZE];
};

struct wp_engine {
    int uffd;
    int stop_fd; /* eventfd: wakes the fault thread out of poll() */
    bool sync_mode;
    bool thread_started;
    bool protected_once;
    pthread_t thread;
    _Atomic bool stopping;

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
    struct wp_overflow *overflow_head; /* under lock; FIFO via tail pointer */
    struct wp_overflow **overflow_tail;
    _Atomic uint64_t overflow_count;

    /* Sweep scratch (one sweeper at a time). */
    unsigned char *residency;
    bool check_residency;

    /* Counters. Written by one thread each; read racily by stats (fine for counters). */
    _Atomic uint64_t pages_saved;
    uint64_t faults, faults_spurious, fallbacks, fallback_ns, overflow_pages;
    uint64_t pool_high_water, pages_swept, pages_zero, fault_ns_max, fault_ns_total, pages_fault_around;
    uint32_t fault_around; /* pages per fault-around window; 1 = off */
    uint64_t hist[WP_HIST_BUCKETS];
};

static int wp_writeprotect(int uffd, uint64_t hva, uint64_t len, bool protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = hva, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    while (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        if (errno != EAGAIN)
            return -errno;
    }
    return 0;
}

static unsigned hist_bucket(uint64_t ns)
{
    if (ns < 1)
        return 0;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned half = msb > 0 ? (unsigned)((ns >> (msb - 1)) & 1u) : 0u;
    unsigned b = 2 * msb + half;
    return b < WP_HIST_BUCKETS ? b : WP_HIST_BUCKETS - 1;
}

static struct wp_region *find_region(wp_engine *e, uint64_t hva, uint32_t *index)
{
    for (uint32_t i = 0; i < e->region_count; i++) {
        struct wp_region *r = &e->regions[i];
        if (hva >= r->hva && hva - r->hva < r->size) {
            *index = i;
            return r;
        }
    }
    return NULL;
}

static bool claim_page(struct wp_region *r, uint64_t page)
{
    uint8_t expected = PAGE_PENDING;
    return __atomic_compare_exchange_n(&r->state[page], &expected, PAGE_COPYING, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void mark_saved(wp_engine *e, struct wp_region *r, uint64_t page)
{
    /* Release: the page's copy (slot or sweep buffer) is complete before SAVED. */
    __atomic_store_n(&r->state[page], PAGE_SAVED, __ATOMIC_RELEASE);
    atomic_fetch_add_explicit(&e->pages_saved, 1, memory_order_relaxed);
}

/* Wait until the pool has a free slot; returns false if the caller should
 * overflow instead (stuck too long) or stop. Only the fault thread calls it. */
static bool wait_for_slot(wp_engine *e, uint64_t head)
{
    uint64_t start = monotonic_ns();
    e->fallbacks++;
    bool ok = true;
    /* Spin briefly: a drain in progress frees slots within microseconds. */
    while (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots) {
        uint64_t waited = monotonic_ns() - start;
        if (atomic_load(&e->stopping) || waited >= WP_OVERFLOW_NS) {
            ok = false;
            break;
        }
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

/* Copy one page into the pool (or an overflow slot). Fault thread only. */
static void store_page(wp_engine *e, uint64_t key, const void *src)
{
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    if (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots &&
        !wait_for_slot(e, head)) {
        struct wp_overflow *o = malloc(sizeof *o);
        if (o) {
            o->next = NULL;
            o->key = key;
            memcpy(o->data, src, WP_PAGE_SIZE);
            pthread_mutex_lock(&e->lock);
            *e->overflow_tail = o;
            e->overflow_tail = &o->next;
            pthread_mutex_unlock(&e->lock);
            atomic_fetch_add(&e->overflow_count, 1);
            e->overflow_pages++;
            return;
        }
        /* Out of memory: keep waiting for the pool; correctness over latency. */
        while (head - atomic_load_explicit(&e->tail, memory_order_acquire) >= e->slots)
            usleep(100);
    }
    uint64_t slot = head % e->slots;
    memcpy(e->slot_data + slot * WP_PAGE_SIZE, src, WP_PAGE_SIZE);
    e->slot_keys[slot] = key;
    /* Release: slot content and key are visible before the consumer sees head. */
    atomic_store_explicit(&e->head, head + 1, memory_order_release);
    uint64_t used = head + 1 - atomic_load_explicit(&e->tail, memory_order_acquire);
    if (used > e->pool_high_water)
        e->pool_high_water = used;
    if (e->sync_mode) {
        /* No buffering: hold the writer until drain has taken the page. */
        uint64_t start = monotonic_ns();
        while (atomic_load_explicit(&e->tail, memory_order_acquire) < head + 1 &&
               !atomic_load(&e->stopping) && monotonic_ns() - start < WP_OVERFLOW_NS)
            __builtin_ia32_pause();
    }
}

/*
 * Fault-around: a guest that wrote one page tends to write its neighbours
 * next, and each of those would be another ~40 us fault. With the faulting
 * writer already woken, save the still-pending pages of its aligned window
 * too, using at most the free half of the pool: this must never wait.
 */
static void save_neighbours(wp_engine *e, struct wp_region *r, uint32_t ri, uint64_t page)
{
    uint64_t w0 = page - page % e->fault_around;
    uint64_t w1 = w0 + e->fault_around < r->pages ? w0 + e->fault_around : r->pages;
    uint64_t used = atomic_load_explicit(&e->head, memory_order_relaxed) -
                    atomic_load_explicit(&e->tail, memory_order_acquire);
    /* Keep half the pool for pages whose writers are waiting. */
    uint64_t free_slots = used < e->slots / 2 ? e->slots / 2 - used : 0;
    uint64_t run_start = 0, run_len = 0;
    for (uint64_t p = w0; p < w1; p++) {
        bool claimed = p != page && free_slots > 0 && claim_page(r, p);
        if (claimed) {
            store_page(e, ((uint64_t)ri << 48) | p, (const void *)(uintptr_t)(r->hva + p * WP_PAGE_SIZE));
            e->pages_fault_around++;
            mark_saved(e, r, p);
            free_slots--;
            if (run_len == 0)
                run_start = p;
            run_len++;
        }
        if (!claimed || p + 1 == w1) {
            /* Unprotect exactly the pages we claimed, one ioctl per run. */
            if (run_len > 0)
                wp_writeprotect(e->uffd, r->hva + run_start * WP_PAGE_SIZE, run_len * WP_PAGE_SIZE, false);
            run_len = 0;
        }
    }
}

static void serve_write_fault(wp_engine *e, uint64_t fault_hva)
{
    uint64_t start = monotonic_ns();
    uint32_t ri;
    struct wp_region *r = find_region(e, fault_hva, &ri);
    if (!r)
        return;
    uint64_t page = (fault_hva - r->hva) / WP_PAGE_SIZE;
    uint64_t page_hva = r->hva + page * WP_PAGE_SIZE;
    if (claim_page(r, page)) {
        store_page(e, ((uint64_t)ri << 48) | page, (const void *)(uintptr_t)page_hva);
        e->faults++; /* before SAVED: counters add up once wp_engine_done says so */
        mark_saved(e, r, page);
        wp_writeprotect(e->uffd, page_hva, WP_PAGE_SIZE, false);
        uint64_t ns = monotonic_ns() - start;
        e->fault_ns_total += ns;
        if (ns > e->fault_ns_max)
            e->fault_ns_max = ns;
        e->hist[hist_bucket(ns)]++;
        if (e->fault_around > 1)
            save_neighbours(e, r, ri, page);
        return;
    }
    /* The sweep owns it (or it is already saved): wait for SAVED, then make
     * sure the writer is woken. Unprotecting a saved page is harmless. */
    while (__atomic_load_n(&r->state[page], __ATOMIC_ACQUIRE) != PAGE_SAVED)
        __builtin_ia32_pause();
    wp_writeprotect(e->uffd, page_hva, WP_PAGE_SIZE, false);
    e->faults_spurious++;
}

static void *fault_thread(void *arg)
{
    wp_engine *e = arg;
    struct uffd_msg msgs[64];
    uint64_t last_event = 0;
    while (!atomic_load(&e->stopping)) {
        ssize_t n = read(e->uffd, msgs, sizeof msgs);
        if (n > 0) {
            for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
                if (msgs[i].event == UFFD_EVENT_PAGEFAULT &&
                    (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
                    serve_write_fault(e, msgs[i].arg.pagefault.address);
            }
            last_event = monotonic_ns();
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            break;
        /* Wake-ups cost ~50 us here: poll a little longer before sleeping. */
        if (monotonic_ns() - last_event < WP_SPIN_NS) {
            __builtin_ia32_pause();
            continue;
        }
        struct pollfd fds[2] = {{.fd = e->uffd, .events = POLLIN}, {.fd = e->stop_fd, .events = POLLIN}};
        poll(fds, 2, -1);
        last_event = monotonic_ns();
    }
    return NULL;
}

wp_engine *wp_engine_create(uint32_t pool_slots, int32_t *err_out)
{
    int32_t how;
    *err_out = 0;
    wp_engine *e = calloc(1, sizeof *e);
    if (!e) {
        *err_out = -ENOMEM;
        return NULL;
    }
    e->uffd = -1;
    e->stop_fd = -1;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->freed, NULL);
    e->overflow_tail = &e->overflow_head;

    int fd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (fd < 0) {
        *err_out = fd;
        goto fail;
    }
    e->uffd = fd;
    uint64_t offered = 0;
    int rc = uffd_handshake(fd, 0, &offered); /* fd is spent by this; reopen below */
    close(fd);
    e->uffd = -1;
    if (rc < 0) {
        *err_out = rc;
        goto fail;
    }
    uint64_t need = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
    if ((offered & need) != need) {
        *err_out = -EOPNOTSUPP;
        goto fail;
    }
    uint64_t want = need | (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    e->uffd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (e->uffd < 0) {
        *err_out = e->uffd;
        goto fail;
    }
    rc = uffd_handshake(e->uffd, want, &offered);
    if (rc < 0) {
        *err_out = rc;
        goto fail;
    }
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->stop_fd < 0) {
        *err_out = -errno;
        goto fail;
    }
    e->sync_mode = pool_slots == 0;
    e->fault_around = 1;
    e->slots = pool_slots == 0 ? 1 : pool_slots;
    size_t bytes = (size_t)e->slots * WP_PAGE_SIZE;
    /* mmap: slots cost memory only once used. */
    void *data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        *err_out = -errno;
        goto fail;
    }
    e->slot_data = data;
    e->slot_keys = calloc(e->slots, sizeof *e->slot_keys);
    e->residency = malloc(WP_SWEEP_MAX_PAGES);
    if (!e->slot_keys || !e->residency) {
        *err_out = -ENOMEM;
        goto fail;
    }
    /* Non-resident pages read as zero only if they cannot be in swap. */
    struct sysinfo si;
    e->check_residency = sysinfo(&si) == 0 && si.totalswap == 0;
    return e;
fail:
    wp_engine_destroy(e);
    return NULL;
}

int32_t wp_engine_add_region(wp_engine *e, uint64_t hva, uint64_t size)
{
    if (e->thread_started)
        return -EBUSY;
    if (e->region_count >= WP_MAX_REGIONS)
        return -E2BIG;
    if (size == 0 || hva % WP_PAGE_SIZE || size % WP_PAGE_SIZE)
        return -EINVAL;
    for (uint32_t i = 0; i < e->region_count; i++) {
        struct wp_region *o = &e->regions[i];
        if (hva < o->hva + o->size && o->hva < hva + size)
            return -EEXIST;
    }
    struct uffdio_register reg = {.range = {.start = hva, .len = size}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(e->uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (!(reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT))) {
        struct uffdio_range range = {.start = hva, .len = size};
        ioctl(e->uffd, UFFDIO_UNREGISTER, &range);
        return -EOPNOTSUPP;
    }
    struct wp_region *r = &e->regions[e->region_count];
    r->hva = hva;
    r->size = size;
    r->pages = size / WP_PAGE_SIZE;
    r->state = calloc(r->pages, 1);
    if (!r->state) {
        struct uffdio_range range = {.start = hva, .len = size};
        ioctl(e->uffd, UFFDIO_UNREGISTER, &range);
        return -ENOMEM;
    }
    e->pages_total += r->pages;
    return (int32_t)e->region_count++;
}

int32_t wp_engine_set_fault_around(wp_engine *e, uint32_t pages)
{
    if (e->thread_started)
        return -EBUSY;
    if (pages == 0 || pages > 512 || (pages & (pages - 1)))
        return -EINVAL;
    /* Synchronous mode saves exactly the faulting page, as QEMU does. */
    e->fault_around = e->sync_mode ? 1 : pages;
    return 0;
}

int32_t wp_engine_start(wp_engine *e)
{
    if (e->thread_started)
        return -EBUSY;
    int rc = pthread_create(&e->thread, NULL, fault_thread, e);
    if (rc)
        return -rc;
    e->thread_started = true;
    return 0;
}

int32_t wp_engine_protect(wp_engine *e)
{
    if (!e->thread_started)
        return -EINVAL; /* nobody would serve the faults */
    e->protected_once = true;
    for (uint32_t i = 0; i < e->region_count; i++) {
        int rc = wp_writeprotect(e->uffd, e->regions[i].hva, e->regions[i].size, true);
        if (rc < 0) {
            wp_engine_unprotect_all(e);
            return rc;
        }
    }
    return 0;
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

static bool page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (size_t i = 0; i < WP_PAGE_SIZE / 8; i += 8)
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
    return acc == 0;
}

int32_t wp_engine_sweep(wp_engine *e, uint32_t region, uint64_t first_page, uint32_t max_pages,
                        uint8_t *buf, uint64_t *pages_out, uint8_t *flags_out)
{
    if (region >= e->region_count)
        return -EINVAL;
    struct wp_region *r = &e->regions[region];
    if (first_page >= r->pages)
        return 0;
    if (max_pages > WP_SWEEP_MAX_PAGES)
        max_pages = WP_SWEEP_MAX_PAGES;
    uint64_t end = first_page + max_pages < r->pages ? first_page + max_pages : r->pages;
    uint64_t count = end - first_page;
    uint64_t run_hva = r->hva + first_page * WP_PAGE_SIZE;

    /* Claim first, so the residency check and the copies see frozen pages. */
    uint32_t n = 0;
    for (uint64_t p = first_page; p < end; p++)
        if (claim_page(r, p))
            pages_out[n++] = p;
    if (n == 0)
        return 0;
    bool residency = e->check_residency &&
                     mincore((void *)(uintptr_t)run_hva, count * WP_PAGE_SIZE, e->residency) == 0;
    size_t data_pages = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t p = pages_out[i];
        const uint8_t *src = (const uint8_t *)(uintptr_t)(r->hva + p * WP_PAGE_SIZE);
        if ((residency && !(e->residency[p - first_page] & 1)) || page_is_zero(src)) {
            flags_out[i] = WP_PAGE_ZERO;
            e->pages_zero++;
        } else {
            flags_out[i] = WP_PAGE_DATA;
            memcpy(buf + data_pages++ * WP_PAGE_SIZE, src, WP_PAGE_SIZE);
        }
    }
    for (uint32_t i = 0; i < n; i++)
        mark_saved(e, r, pages_out[i]);
    e->pages_swept += n;
    /* Unprotect each contiguous run of pages we claimed with one ioctl. */
    uint32_t i = 0;
    while (i < n) {
        uint32_t j = i + 1;
        while (j < n && pages_out[j] == pages_out[j - 1] + 1)
            j++;
        int rc = wp_writeprotect(e->uffd, r->hva + pages_out[i] * WP_PAGE_SIZE,
                                 (uint64_t)(j - i) * WP_PAGE_SIZE, false);
        if (rc < 0)
            return rc;
        i = j;
    }
    return (int32_t)n;
}

int32_t wp_engine_done(wp_engine *e)
{
    uint64_t saved = atomic_load(&e->pages_saved);
    if (saved < e->pages_total)
        return 0;
    return atomic_load(&e->head) == atomic_load(&e->tail) && atomic_load(&e->overflow_count) == 0;
}

int32_t wp_engine_stats(wp_engine *e, wp_stats *out)
{
    memset(out, 0, sizeof *out);
    out->faults = e->faults;
    out->faults_spurious = e->faults_spurious;
    out->fallbacks = e->fallbacks;
    out->fallback_ns = e->fallback_ns;
    out->overflow_pages = e->overflow_pages;
    out->pool_slots = e->sync_mode ? 0 : e->slots;
    out->pool_high_water = e->pool_high_water;
    out->pool_used = atomic_load(&e->head) - atomic_load(&e->tail) + atomic_load(&e->overflow_count);
    out->pages_total = e->pages_total;
    out->pages_saved = atomic_load(&e->pages_saved);
    out->pages_swept = e->pages_swept;
    out->pages_zero = e->pages_zero;
    out->fault_ns_max = e->fault_ns_max;
    out->fault_ns_total = e->fault_ns_total;
    out->pages_fault_around = e->pages_fault_around;
    memcpy(out->hist, e->hist, sizeof out->hist);
    return 0;
}

int32_t wp_engine_unprotect_all(wp_engine *e)
{
    int32_t first_error = 0;
    if (e->uffd < 0)
        return 0;
    for (uint32_t i = 0; i < e->region_count; i++) {
        int rc = wp_writeprotect(e->uffd, e->regions[i].hva, e->regions[i].size, false);
        if (rc < 0 && !first_error)
            first_error = rc;
    }
    return first_error;
}

int32_t wp_engine_destroy(wp_engine *e)
{
    if (!e)
        return 0;
    atomic_store(&e->stopping, true);
    if (e->stop_fd >= 0) {
        uint64_t one = 1;
        ssize_t ignored = write(e->stop_fd, &one, sizeof one);
        (void)ignored;
    }
    pthread_mutex_lock(&e->lock);
    pthread_cond_broadcast(&e->freed);
    pthread_mutex_unlock(&e->lock);
    /* Unprotect before joining: it wakes every writer the thread has not served. */
    int32_t rc = wp_engine_unprotect_all(e);
    if (e->thread_started)
        pthread_join(e->thread, NULL);
    rc = rc ? rc : wp_engine_unprotect_all(e);
    for (uint32_t i = 0; i < e->region_count; i++) {
        struct uffdio_range range = {.start = e->regions[i].hva, .len = e->regions[i].size};
        if (e->uffd >= 0)
            ioctl(e->uffd, UFFDIO_UNREGISTER, &range);
        free(e->regions[i].state);
    }
    if (e->uffd >= 0)
        close(e->uffd);
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    while (e->overflow_head) {
        struct wp_overflow *o = e->overflow_head;
        e->overflow_head = o->next;
        free(o);
    }
    if (e->slot_data)
        munmap(e->slot_data, (size_t)e->slots * WP_PAGE_SIZE);
    free(e->slot_keys);
    free(e->residency);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->freed);
    free(e);
    return rc;
}

int32_t wp_copy_to_hva(uint64_t hva, const uint8_t *src, uint64_t len)
{
    memcpy((void *)(uintptr_t)hva, src, len);
    return 0;
}

int32_t wp_copy_from_hva(uint8_t *dst, uint64_t hva, uint64_t len)
{
    memcpy(dst, (const void *)(uintptr_t)hva, len);
    return 0;
}
