/* The built-in demo guest: memory plus native writer threads (see vmsnap_guest.h). */
#define _GNU_SOURCE
#include "vmsnap_guest.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define VG_PAGE 4096ull
#define VG_MAX_WRITERS 64
#define VG_HUGE (2ull << 20)
#ifndef MFD_HUGE_1GB
#define MFD_HUGE_1GB (30u << 26) /* linux/memfd.h: log2 of the page size << MFD_HUGE_SHIFT */
#endif

struct vg_writer {
    vg_guest *g;
    pthread_t thread;
    uint32_t id;
    uint64_t seed;
    /* Per-writer counters: no sharing on the hot path. */
    uint64_t hist[VG_PHASES][VG_HIST_BUCKETS];
    uint64_t writes[VG_PHASES], max_ns[VG_PHASES], total_ns[VG_PHASES];
} __attribute__((aligned(64)));

struct vg_guest {
    uint64_t size, pages;
    uint32_t kind;
    uint8_t *mem;
    void *map_base;
    uint64_t map_len;
    int memfd;
    uint8_t *reference;
    uint8_t *unpopulated; /* one byte per page: non-resident at the cut */
    _Atomic uint64_t target_first, target_pages;
    _Atomic uint32_t phase;
    uint64_t phase_start_ns;
    uint64_t phase_ns[VG_PHASES];
    _Atomic bool frozen, stopping;
    _Atomic uint32_t parked;
    uint64_t interval_ns; /* per writer; 0 = flat out */
    uint32_t writer_count;
    bool joined;
    uint64_t stopped_ns;
    struct vg_writer *writers;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static unsigned bucket_of(uint64_t ns)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7u);
    return b < VG_HIST_BUCKETS ? b : VG_HIST_BUCKETS - 1;
}

vg_guest *vg_create(uint64_t size, uint32_t kind, int32_t *err_out)
{
    *err_out = 0;
    bool hugetlb = kind == VG_MEM_HUGETLB || kind == VG_MEM_HUGETLB_ANON || kind == VG_MEM_HUGETLB_1G;
    uint64_t huge = kind == VG_MEM_HUGETLB_1G ? 1ull << 30 : VG_HUGE;
    if (size == 0 || size % VG_PAGE || kind > VG_MEM_HUGETLB_1G || (hugetlb && size % huge)) {
        *err_out = -EINVAL;
        return NULL;
    }
    vg_guest *g = calloc(1, sizeof *g);
    if (!g) {
        *err_out = -ENOMEM;
        return NULL;
    }
    g->size = size;
    g->pages = size / VG_PAGE;
    g->kind = kind;
    g->memfd = -1;
    g->target_pages = g->pages;
    if (kind == VG_MEM_MEMFD || kind == VG_MEM_HUGETLB || kind == VG_MEM_HUGETLB_1G) {
        unsigned flags = kind == VG_MEM_HUGETLB ? MFD_HUGETLB : kind == VG_MEM_HUGETLB_1G ? MFD_HUGETLB | MFD_HUGE_1GB : 0;
        g->memfd = memfd_create("vmsnap-guest", MFD_CLOEXEC | flags);
        if (g->memfd < 0 || ftruncate(g->memfd, (off_t)size) < 0)
            goto fail;
        g->map_base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, g->memfd, 0);
        g->map_len = size;
        if (g->map_base == MAP_FAILED)
            goto fail;
        g->mem = g->map_base;
    } else if (kind == VG_MEM_HUGETLB_ANON) {
        g->map_len = size;
        g->map_base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
        if (g->map_base == MAP_FAILED)
            goto fail;
        g->mem = g->map_base;
    } else {
        /* Over-allocate to align on 2 MiB so THP can back it. */
        g->map_len = size + VG_HUGE;
        g->map_base = mmap(NULL, g->map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (g->map_base == MAP_FAILED)
            goto fail;
        g->mem = (uint8_t *)(((uintptr_t)g->map_base + VG_HUGE - 1) & ~(uintptr_t)(VG_HUGE - 1));
        if (madvise(g->mem, size, kind == VG_MEM_THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) < 0)
            goto fail;
    }
    return g;
fail:
    *err_out = -errno;
    if (g->map_base && g->map_base != MAP_FAILED)
        munmap(g->map_base, g->map_len);
    if (g->memfd >= 0)
        close(g->memfd);
    free(g);
    return NULL;
}

uint64_t vg_hva(vg_guest *g) { return (uint64_t)(uintptr_t)g->mem; }
uint64_t vg_size(vg_guest *g) { return g->size; }
int32_t vg_memfd(vg_guest *g) { return g->memfd; }

uint64_t vg_touch(uint64_t hva, uint64_t size)
{
    uint64_t sum = 0;
    for (uint64_t off = 0; off < size; off += VG_PAGE)
        sum += *(volatile const uint8_t *)(uintptr_t)(hva + off);
    return sum;
}

int32_t vg_fill(vg_guest *g, uint64_t first_page, uint64_t pages, uint64_t seed)
{
    if (first_page > g->pages || pages > g->pages - first_page)
        return -EINVAL;
    uint64_t s = seed | 1;
    for (uint64_t p = first_page; p < first_page + pages; p++) {
        uint64_t *w = (uint64_t *)(g->mem + p * VG_PAGE);
        /* First half random, second half a repeated stamp: compresses ~2x. */
        for (size_t i = 0; i < VG_PAGE / 16; i++)
            w[i] = xorshift(&s);
        for (size_t i = VG_PAGE / 16; i < VG_PAGE / 8; i++)
            w[i] = p;
    }
    return 0;
}

int32_t vg_set_target(vg_guest *g, uint64_t first_page, uint64_t pages)
{
    if (pages == 0 || first_page > g->pages || pages > g->pages - first_page)
        return -EINVAL;
    atomic_store(&g->target_pages, pages);
    atomic_store(&g->target_first, first_page);
    return 0;
}

static void *writer_main(void *arg)
{
    struct vg_writer *w = arg;
    vg_guest *g = w->g;
    uint64_t s = w->seed | 1;
    uint64_t next = now_ns();
    uint64_t seq = 0;
    while (!atomic_load_explicit(&g->stopping, memory_order_relaxed)) {
        if (atomic_load_explicit(&g->frozen, memory_order_acquire)) {
            atomic_fetch_add(&g->parked, 1);
            while (atomic_load(&g->frozen) && !atomic_load(&g->stopping))
                __builtin_ia32_pause();
            atomic_fetch_sub(&g->parked, 1);
            next = now_ns();
            continue;
        }
        uint64_t r = xorshift(&s);
        uint64_t first = atomic_load_explicit(&g->target_first, memory_order_relaxed);
        uint64_t span = atomic_load_explicit(&g->target_pages, memory_order_relaxed);
        uint64_t page = first + (r >> 9) % span;
        uint64_t offset = (r & 511) * 8;
        volatile uint64_t *slot = (volatile uint64_t *)(g->mem + page * VG_PAGE + offset);
        uint32_t phase = atomic_load_explicit(&g->phase, memory_order_relaxed);
        uint64_t t0 = now_ns();
        *slot = ((uint64_t)w->id << 56) | ++seq;
        uint64_t ns = now_ns() - t0;
        w->hist[phase][bucket_of(ns)]++;
        w->writes[phase]++;
        w->total_ns[phase] += ns;
        if (ns > w->max_ns[phase])
            w->max_ns[phase] = ns;
        if (g->interval_ns) {
            next += g->interval_ns;
            uint64_t now = t0 + ns;
            if (next > now + 50000) {
                struct timespec ts = {0, (long)(next - now)};
                nanosleep(&ts, NULL);
            } else if (now > next + 100000000ull) {
                next = now; /* fell far behind (e.g. frozen): do not burst */
            }
        }
    }
    return NULL;
}

int32_t vg_start(vg_guest *g, uint32_t writers, uint64_t rate_pages_per_s, uint64_t seed)
{
    if (g->writers || writers == 0 || writers > VG_MAX_WRITERS)
        return -EINVAL;
    g->writers = aligned_alloc(64, sizeof *g->writers * writers);
    if (!g->writers)
        return -ENOMEM;
    memset(g->writers, 0, sizeof *g->writers * writers);
    g->interval_ns = rate_pages_per_s ? (uint64_t)writers * 1000000000ull / rate_pages_per_s : 0;
    /* Phase wall time counts from the writers' start. */
    memset(g->phase_ns, 0, sizeof g->phase_ns);
    g->phase_start_ns = now_ns();
    for (uint32_t i = 0; i < writers; i++) {
        struct vg_writer *w = &g->writers[i];
        w->g = g;
        w->id = i;
        w->seed = seed * 0x9E3779B97F4A7C15ull + i + 1;
        int rc = pthread_create(&w->thread, NULL, writer_main, w);
        if (rc) {
            vg_stop(g);
            return -rc;
        }
        g->writer_count++;
    }
    return 0;
}

int32_t vg_set_phase(vg_guest *g, uint32_t phase)
{
    if (phase >= VG_PHASES)
        return -EINVAL;
    uint64_t now = now_ns();
    uint32_t old = atomic_exchange(&g->phase, phase);
    if (g->phase_start_ns && !g->joined)
        g->phase_ns[old] += now - g->phase_start_ns;
    g->phase_start_ns = now;
    return 0;
}

/* Waits for every writer to park: spins for the first 50 us, then sleeps
 * 20 us between checks, so that with few cores the writers (and a fault
 * thread serving one of them) get the CPU they need to reach their park. */
int32_t vg_freeze(vg_guest *g, uint32_t timeout_ms)
{
    atomic_store_explicit(&g->frozen, true, memory_order_release);
    uint64_t start = now_ns(), deadline = start + (uint64_t)timeout_ms * 1000000ull;
    while (atomic_load(&g->parked) < g->writer_count) {
        uint64_t t = now_ns();
        if (t > deadline)
            return -ETIMEDOUT;
        if (t - start < 50000)
            __builtin_ia32_pause();
        else
            nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
    }
    return 0;
}

int32_t vg_thaw(vg_guest *g)
{
    atomic_store_explicit(&g->frozen, false, memory_order_release);
    return 0;
}

int32_t vg_prepare_reference(vg_guest *g)
{
    if (!g->reference) {
        /* MAP_POPULATE: allocating it page by page would lengthen the freeze. */
        void *m = mmap(NULL, g->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (m == MAP_FAILED)
            return -errno;
        g->reference = m;
        g->unpopulated = calloc(g->pages, 1);
        if (!g->unpopulated)
            return -ENOMEM;
    }
    return 0;
}

int32_t vg_take_reference(vg_guest *g)
{
    int32_t rc = vg_prepare_reference(g);
    if (rc < 0)
        return rc;
    /* mincore rather than reading: a read would populate the page. */
    const uint64_t chunk = 16384;
    unsigned char vec[16384];
    for (uint64_t p = 0; p < g->pages; p += chunk) {
        uint64_t n = g->pages - p < chunk ? g->pages - p : chunk;
        if (mincore(g->mem + p * VG_PAGE, n * VG_PAGE, vec) < 0)
            return -errno;
        for (uint64_t i = 0; i < n; i++) {
            if (vec[i] & 1) {
                memcpy(g->reference + (p + i) * VG_PAGE, g->mem + (p + i) * VG_PAGE, VG_PAGE);
                g->unpopulated[p + i] = 0;
            } else {
                memset(g->reference + (p + i) * VG_PAGE, 0, VG_PAGE);
                g->unpopulated[p + i] = 1;
            }
        }
    }
    return 0;
}

uint64_t vg_reference_hva(vg_guest *g) { return (uint64_t)(uintptr_t)g->reference; }

int64_t vg_count_written_unpopulated(vg_guest *g)
{
    if (!g->unpopulated)
        return -EINVAL;
    int64_t n = 0;
    static const uint8_t zero[VG_PAGE];
    for (uint64_t p = 0; p < g->pages; p++)
        if (g->unpopulated[p] && memcmp(g->mem + p * VG_PAGE, zero, VG_PAGE) != 0)
            n++;
    return n;
}

int32_t vg_latency(vg_guest *g, uint32_t phase, uint64_t *hist_out, uint64_t *summary_out)
{
    if (phase >= VG_PHASES)
        return -EINVAL;
    memset(hist_out, 0, sizeof(uint64_t) * VG_HIST_BUCKETS);
    uint64_t writes = 0, max_ns = 0, total = 0;
    for (uint32_t i = 0; i < g->writer_count; i++) {
        struct vg_writer *w = &g->writers[i];
        for (unsigned b = 0; b < VG_HIST_BUCKETS; b++)
            hist_out[b] += w->hist[phase][b];
        writes += w->writes[phase];
        total += w->total_ns[phase];
        if (w->max_ns[phase] > max_ns)
            max_ns = w->max_ns[phase];
    }
    uint64_t phase_ns = g->phase_ns[phase];
    if (atomic_load(&g->phase) == phase && g->phase_start_ns)
        phase_ns += (g->joined ? g->stopped_ns : now_ns()) - g->phase_start_ns;
    summary_out[0] = writes;
    summary_out[1] = max_ns;
    summary_out[2] = total;
    summary_out[3] = phase_ns;
    return 0;
}

int32_t vg_stop(vg_guest *g)
{
    if (g->joined)
        return 0;
    atomic_store(&g->stopping, true);
    for (uint32_t i = 0; i < g->writer_count; i++)
        pthread_join(g->writers[i].thread, NULL);
    g->stopped_ns = now_ns();
    g->joined = true; /* writer_count stays: their counters remain readable */
    return 0;
}

int32_t vg_destroy(vg_guest *g)
{
    if (!g)
        return 0;
    vg_stop(g);
    free(g->writers);
    munmap(g->map_base, g->map_len);
    if (g->memfd >= 0)
        close(g->memfd);
    if (g->reference)
        munmap(g->reference, g->size);
    free(g->unpopulated);
    free(g);
    return 0;
}

uint64_t vg_map(uint64_t size)
{
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return m == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)m;
}

int32_t vg_unmap(uint64_t hva, uint64_t size)
{
    return munmap((void *)(uintptr_t)hva, size) < 0 ? -errno : 0;
}

int64_t vg_compare(uint64_t hva_a, uint64_t hva_b, uint64_t size)
{
    const uint8_t *a = (const uint8_t *)(uintptr_t)hva_a, *b = (const uint8_t *)(uintptr_t)hva_b;
    for (uint64_t off = 0; off < size; off += VG_PAGE) {
        uint64_t n = size - off < VG_PAGE ? size - off : VG_PAGE;
        if (memcmp(a + off, b + off, n) != 0)
            return (int64_t)(off / VG_PAGE);
    }
    return -1;
}

int32_t vg_read(uint8_t *dst, uint64_t hva, uint64_t len)
{
    memcpy(dst, (const void *)(uintptr_t)hva, len);
    return 0;
}
