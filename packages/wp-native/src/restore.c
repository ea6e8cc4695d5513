/*
 * Lazy restore: serve a restoring guest's memory from a snapshot file through
 * the guest's userfaultfd. A fault thread resolves faults first; a fill
 * thread streams the remaining records in file order until every page is
 * resident, then the ranges are unregistered.
 *
 *   anonymous memory: MISSING faults, UFFDIO_COPY (UFFDIO_ZEROPAGE for zero
 *                     records or ranges the guest discarded);
 *   memfd memory:     the page contents are pwritten into the memfd (page
 *                     cache) and mapped with UFFDIO_CONTINUE, which resolves
 *                     MISSING and MINOR faults alike (EEXIST: already mapped).
 *
 * A fault resolves the whole record around it (a record is one run of up to
 * a few hundred pages): one decode, one ioctl.
 */
#define _GNU_SOURCE
#include "record.h"
#include "uffd.h"
#include "vmsnap_restore.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define RS_MAX_REGIONS 64

/* UFFDIO_MOVE (Linux 6.8) is not in the 6.1 headers. */
struct uffdio_move {
    uint64_t dst, src, len, mode;
    int64_t move;
};
#define UFFDIO_MOVE_IOCTL _IOWR(UFFDIO, 0x05, struct uffdio_move)

struct rs_record {
    uint32_t region;
    uint32_t pages;
    uint64_t first_page;
    uint64_t file_offset;
};

struct rs_region {
    uint64_t hva, size, pages;
    int memfd; /* -1: anonymous (COPY) */
    uint64_t memfd_offset;
    uint8_t *resident; /* 1 byte per page; set by whoever installs it */
    uint8_t *removed;  /* discarded by the guest (REMOVE event): zero from now on */
    uint32_t *record_of; /* page -> index into records */
};

struct wp_restorer {
    int uffd, file, stop_fd;
    bool raw_image, move, no_fill;
    uint32_t region_count;
    struct rs_region regions[RS_MAX_REGIONS];
    struct rs_record *records;
    uint32_t record_count;
    pthread_t fault_thread, fill_thread;
    bool started;
    _Atomic bool stopping, done;
    _Atomic int32_t error;
    pthread_mutex_t install_lock; /* one installer at a time: no double decode races on EEXIST paths */
    _Atomic uint64_t pages_resident, pages_total;
    uint64_t faults, faults_zero, pages_by_fault, pages_by_fill, removed_pages;
    uint64_t fault_ns_total, fault_ns_max, first_fault_ns, start_ns, done_ns;
    uint64_t hist[WP_RESTORE_HIST_BUCKETS];
    struct record_codec codec;
};

static void fail(wp_restorer *r, int32_t err)
{
    int32_t none = 0;
    atomic_compare_exchange_strong(&r->error, &none, err);
}

static int install_range(wp_restorer *r, struct rs_region *g, uint64_t page, uint64_t count, const uint8_t *src, bool zero)
{
    uint64_t hva = g->hva + page * WP_RESTORE_PAGE_SIZE, len = count * WP_RESTORE_PAGE_SIZE;
    if (g->memfd >= 0) {
        /* Page cache first, then map it; CONTINUE also wakes MISSING waiters. */
        static const uint8_t zeros[64 * WP_RESTORE_PAGE_SIZE];
        off_t at = (off_t)(g->memfd_offset + page * WP_RESTORE_PAGE_SIZE);
        for (uint64_t done = 0; done < len;) {
            /* One pwrite per run (zeros: per 256 KiB); short writes continue. */
            size_t n = zero ? (len - done < sizeof zeros ? len - done : sizeof zeros) : len - done;
            ssize_t w = pwrite(g->memfd, zero ? zeros : src + done, n, at + (off_t)done);
            if (w <= 0)
                return w < 0 ? -errno : -EIO;
            done += (uint64_t)w;
        }
        struct uffdio_continue c = {.range = {.start = hva, .len = len}};
        if (ioctl(r->uffd, UFFDIO_CONTINUE, &c) < 0 && errno != EEXIST) /* EEXIST: already mapped */
            return -errno; /* -EAGAIN: a REMOVE event is pending; the caller retries after reading it */
        return 0;
    }
    for (uint64_t done = 0; done < len;) {
        int rc;
        int64_t got;
        if (r->move && !zero) {
            /* Hand the decoded pages over instead of copying them. */
            struct uffdio_move mv = {.dst = hva + done, .src = (uint64_t)(uintptr_t)(src + done), .len = len - done};
            rc = ioctl(r->uffd, UFFDIO_MOVE_IOCTL, &mv);
            got = mv.move;
        } else if (zero) {
            struct uffdio_zeropage z = {.range = {.start = hva + done, .len = len - done}};
            rc = ioctl(r->uffd, UFFDIO_ZEROPAGE, &z);
            got = z.zeropage;
        } else {
            struct uffdio_copy c = {.dst = hva + done, .src = (uint64_t)(uintptr_t)(src + done), .len = len - done};
            rc = ioctl(r->uffd, UFFDIO_COPY, &c);
            got = c.copy;
        }
        if (rc == 0) {
            done = len;
        } else if (got > 0) {
            done += (uint64_t)got;
        } else if (errno == EEXIST || got == -EEXIST) {
            done += WP_RESTORE_PAGE_SIZE; /* that page is already there: skip it */
        } else {
            /* -EAGAIN: a REMOVE event is pending. Never retry here, holding
             * the install lock: the event must be read first (by the fault
             * thread, which needs that lock), or neither side moves. */
            return -errno;
        }
    }
    return 0;
}

/* Decode buffers: page-aligned anonymous memory when pages are moved out of them. */
static uint8_t *alloc_buffer(wp_restorer *r, size_t bytes)
{
    if (!r->move)
        return malloc(bytes);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void release_buffer(wp_restorer *r, uint8_t *buf, size_t bytes)
{
    if (!buf)
        return;
    if (r->move)
        munmap(buf, bytes);
    else
        free(buf);
}

/* Makes every page of record `index` resident. by_fault: for the counters. */
static int resolve_record(wp_restorer *r, uint32_t index, bool by_fault, uint8_t **buf, size_t *cap, uint8_t **scratch)
{
    const struct rs_record *rec = &r->records[index];
    struct rs_region *g = &r->regions[rec->region];
    size_t bytes = (size_t)rec->pages * WP_RESTORE_PAGE_SIZE;
    if (bytes > *cap) {
        release_buffer(r, *buf, *cap);
        free(*scratch);
        *cap = bytes;
        *buf = alloc_buffer(r, bytes);
        *scratch = malloc(bytes + 1024);
        if (!*buf || !*scratch)
            return -ENOMEM;
    }
    uint64_t missing = 0;
    for (uint64_t p = rec->first_page; p < rec->first_page + rec->pages; p++)
        missing += !__atomic_load_n(&g->resident[p], __ATOMIC_ACQUIRE);
    if (!missing)
        return 0;
    /* Read and decode outside the lock: a fault never waits for the fill's
     * decode, only for an install in progress. Both may decode the same
     * record; whoever installs second finds the pages resident. */
    int encoding = record_read(&r->codec, r->file, r->raw_image, rec->file_offset, rec->first_page, rec->pages, *buf,
                               *scratch, *cap + 1024);
    if (encoding < 0)
        return encoding;
    int rc = 0;
    pthread_mutex_lock(&r->install_lock);
    /* Install runs of pages not yet resident; discarded ones become zero. */
    uint64_t p = rec->first_page, end = rec->first_page + rec->pages;
    while (rc == 0 && p < end) {
        if (g->resident[p]) {
            p++;
            continue;
        }
        bool removed = g->removed[p];
        uint64_t q = p + 1;
        while (q < end && !g->resident[q] && g->removed[q] == removed)
            q++;
        rc = install_range(r, g, p, q - p, *buf + (p - rec->first_page) * WP_RESTORE_PAGE_SIZE, removed || encoding == RECORD_ZERO);
        if (rc == 0) {
            memset(g->resident + p, 1, q - p);
            atomic_fetch_add(&r->pages_resident, q - p);
            if (by_fault)
                r->pages_by_fault += q - p;
            else
                r->pages_by_fill += q - p;
        }
        p = q;
    }
    pthread_mutex_unlock(&r->install_lock);
    return rc;
}

static int find_page(wp_restorer *r, uint64_t hva, uint32_t *region, uint64_t *page)
{
    for (uint32_t i = 0; i < r->region_count; i++) {
        struct rs_region *g = &r->regions[i];
        if (hva >= g->hva && hva - g->hva < g->size) {
            *region = i;
            *page = (hva - g->hva) / WP_RESTORE_PAGE_SIZE;
            return 0;
        }
    }
    return -EFAULT;
}

/* The guest discarded [start, end): later faults and the fill put zero pages
 * there. Called with install_lock held. */
static void mark_removed(wp_restorer *r, uint64_t start, uint64_t end)
{
    uint32_t region;
    uint64_t page;
    for (uint64_t a = start; a < end; a += WP_RESTORE_PAGE_SIZE) {
        if (find_page(r, a, &region, &page) < 0)
            continue;
        struct rs_region *g = &r->regions[region];
        g->removed[page] = 1;
        if (g->resident[page]) {
            g->resident[page] = 0;
            atomic_fetch_sub(&r->pages_resident, 1);
        }
        r->removed_pages++;
    }
}

/* Serves one fault; -EAGAIN if a discard is pending (retry after reading it). */
static int serve_fault(wp_restorer *r, uint64_t address, uint8_t **buf, size_t *cap, uint8_t **scratch)
{
    uint32_t region;
    uint64_t page;
    if (find_page(r, address, &region, &page) < 0)
        return 0;
    uint64_t t0 = monotonic_ns();
    if (!r->first_fault_ns)
        r->first_fault_ns = t0;
    struct rs_region *g = &r->regions[region];
    if (g->removed[page])
        r->faults_zero++; /* resolve_record installs a zero page there */
    int rc = resolve_record(r, g->record_of[page], true, buf, cap, scratch);
    if (rc == -EAGAIN)
        return rc;
    if (rc == 0 && g->resident[page]) {
        /* Resident but the fault raced us (a fill, or a MINOR fault on a
         * page already in the cache): make sure it is mapped and woken. */
        struct uffdio_range wake = {.start = g->hva + page * WP_RESTORE_PAGE_SIZE, .len = WP_RESTORE_PAGE_SIZE};
        if (g->memfd >= 0) {
            struct uffdio_continue c = {.range = wake};
            ioctl(r->uffd, UFFDIO_CONTINUE, &c);
        }
        ioctl(r->uffd, UFFDIO_WAKE, &wake);
    }
    if (rc < 0) {
        fail(r, rc);
        return rc;
    }
    uint64_t ns = monotonic_ns() - t0;
    r->faults++;
    r->fault_ns_total += ns;
    if (ns > r->fault_ns_max)
        r->fault_ns_max = ns;
    r->hist[hist_bucket(ns, WP_RESTORE_HIST_BUCKETS)]++;
    return 0;
}

static void *fault_main(void *arg)
{
    wp_restorer *r = arg;
    uint8_t *buf = NULL, *scratch = NULL;
    size_t cap = 0;
    struct uffd_msg msgs[64];
    /* Faults that met EAGAIN (a discard pending): served again after the next read. */
    uint64_t retry[256];
    size_t retry_count = 0;
    uint64_t last = 0;
    while (!atomic_load(&r->stopping) && !atomic_load(&r->done)) {
        /* Read under the install lock, and mark discarded ranges before
         * releasing it: once a REMOVE event is read the kernel lets the
         * discard proceed, so no install may slip in between (it would leave
         * snapshot data where the guest expects zeros). */
        pthread_mutex_lock(&r->install_lock);
        ssize_t n = read(r->uffd, msgs, sizeof msgs);
        int read_errno = n < 0 ? errno : 0;
        for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_REMOVE)
                mark_removed(r, msgs[i].arg.remove.start, msgs[i].arg.remove.end);
        pthread_mutex_unlock(&r->install_lock);
        size_t retrying = retry_count;
        retry_count = 0;
        for (size_t i = 0; i < retrying; i++)
            if (serve_fault(r, retry[i], &buf, &cap, &scratch) == -EAGAIN && retry_count < 256)
                retry[retry_count++] = retry[i];
        if (n <= 0) {
            if (retry_count)
                continue;
            if (n < 0 && read_errno != EAGAIN && read_errno != EINTR) {
                fail(r, -read_errno);
                break;
            }
            if (monotonic_ns() - last < 50000) { /* poll briefly after a fault: wake-ups are slow here */
                __builtin_ia32_pause();
                continue;
            }
            struct pollfd fds[2] = {{.fd = r->uffd, .events = POLLIN}, {.fd = r->stop_fd, .events = POLLIN}};
            poll(fds, 2, 20);
            continue;
        }
        last = monotonic_ns();
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            struct uffd_msg *m = &msgs[i];
            uint32_t region;
            uint64_t page;
            if (m->event == UFFD_EVENT_REMOVE)
                continue; /* marked above */
            if (m->event != UFFD_EVENT_PAGEFAULT || find_page(r, m->arg.pagefault.address, &region, &page) < 0)
                continue;
            if (serve_fault(r, m->arg.pagefault.address, &buf, &cap, &scratch) == -EAGAIN && retry_count < 256)
                retry[retry_count++] = m->arg.pagefault.address;
        }
    }
    release_buffer(r, buf, cap);
    free(scratch);
    return NULL;
}

static void *fill_main(void *arg)
{
    wp_restorer *r = arg;
    uint8_t *buf = NULL, *scratch = NULL;
    size_t cap = 0;
    if (r->no_fill) { /* faults only (benchmarks): wait until every page faulted in */
        while (atomic_load(&r->pages_resident) < atomic_load(&r->pages_total) && !atomic_load(&r->stopping))
            usleep(1000);
    }
    for (uint32_t i = 0; !r->no_fill && i < r->record_count && !atomic_load(&r->stopping);) {
        int rc = resolve_record(r, i, false, &buf, &cap, &scratch);
        if (rc == -EAGAIN) { /* a discard is in flight: let the fault thread read it, then retry */
            usleep(100);
            continue;
        }
        if (rc < 0) {
            fail(r, rc);
            break;
        }
        i++;
    }
    release_buffer(r, buf, cap);
    free(scratch);
    if (atomic_load(&r->error) == 0 && !atomic_load(&r->stopping)) {
        /* Every page is resident: nothing left to serve. */
        for (uint32_t i = 0; i < r->region_count; i++) {
            struct uffdio_range range = {.start = r->regions[i].hva, .len = r->regions[i].size};
            ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
        }
        r->done_ns = monotonic_ns();
        atomic_store(&r->done, true);
    }
    return NULL;
}

wp_restorer *wp_restorer_create(int32_t uffd, int32_t snapshot_fd, uint32_t flags, int32_t *err_out)
{
    *err_out = 0;
    wp_restorer *r = calloc(1, sizeof *r);
    if (!r) {
        *err_out = -ENOMEM;
        return NULL;
    }
    r->uffd = dup(uffd);
    r->file = dup(snapshot_fd);
    r->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->raw_image = flags & WP_RESTORE_RAW_IMAGE;
    r->move = flags & WP_RESTORE_MOVE;
    r->no_fill = flags & WP_RESTORE_NO_FILL;
    pthread_mutex_init(&r->install_lock, NULL);
    record_codec_init(&r->codec);
    if (r->uffd < 0 || r->file < 0 || r->stop_fd < 0) {
        *err_out = -errno;
        wp_restorer_destroy(r);
        return NULL;
    }
    return r;
}

int32_t wp_restorer_add_region(wp_restorer *r, uint64_t hva, uint64_t size, int32_t memfd, uint64_t memfd_offset)
{
    if (r->started)
        return -EBUSY;
    if (r->region_count >= RS_MAX_REGIONS)
        return -E2BIG;
    if (!size || size % WP_RESTORE_PAGE_SIZE || hva % WP_RESTORE_PAGE_SIZE || memfd_offset % WP_RESTORE_PAGE_SIZE)
        return -EINVAL;
    struct rs_region *g = &r->regions[r->region_count];
    g->hva = hva;
    g->size = size;
    g->pages = size / WP_RESTORE_PAGE_SIZE;
    g->memfd = memfd >= 0 ? dup(memfd) : -1;
    g->memfd_offset = memfd_offset;
    g->resident = calloc(g->pages, 1);
    g->removed = calloc(g->pages, 1);
    g->record_of = malloc(g->pages * sizeof *g->record_of);
    if (!g->resident || !g->removed || !g->record_of || (memfd >= 0 && g->memfd < 0))
        return -ENOMEM;
    memset(g->record_of, 0xff, g->pages * sizeof *g->record_of);
    atomic_fetch_add(&r->pages_total, g->pages);
    return (int32_t)r->region_count++;
}

int32_t wp_restorer_set_index(wp_restorer *r, const uint32_t *regions, const uint64_t *first_pages,
                              const uint32_t *page_counts, const uint64_t *file_offsets, uint32_t n)
{
    if (r->started)
        return -EBUSY;
    r->records = calloc(n ? n : 1, sizeof *r->records);
    if (!r->records)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        struct rs_record *rec = &r->records[i];
        *rec = (struct rs_record){.region = regions[i], .pages = page_counts[i], .first_page = first_pages[i], .file_offset = file_offsets[i]};
        if (rec->region >= r->region_count || !rec->pages || rec->pages > RECORD_MAX_PAGES)
            return -EINVAL;
        struct rs_region *g = &r->regions[rec->region];
        if (rec->first_page + rec->pages > g->pages)
            return -EINVAL;
        for (uint64_t p = rec->first_page; p < rec->first_page + rec->pages; p++)
            g->record_of[p] = i;
    }
    r->record_count = n;
    for (uint32_t i = 0; i < r->region_count; i++)
        for (uint64_t p = 0; p < r->regions[i].pages; p++)
            if (r->regions[i].record_of[p] == UINT32_MAX)
                return -ENODATA; /* a page no record covers */
    return 0;
}

int32_t wp_restorer_start(wp_restorer *r)
{
    if (r->started || !r->records)
        return -EINVAL;
    r->start_ns = monotonic_ns();
    if (pthread_create(&r->fault_thread, NULL, fault_main, r))
        return -EAGAIN;
    if (pthread_create(&r->fill_thread, NULL, fill_main, r)) {
        atomic_store(&r->stopping, true);
        pthread_join(r->fault_thread, NULL);
        return -EAGAIN;
    }
    r->started = true;
    return 0;
}

int32_t wp_restorer_poll(wp_restorer *r)
{
    int32_t err = atomic_load(&r->error);
    if (err < 0)
        return err;
    return atomic_load(&r->done) ? 1 : 0;
}

int32_t wp_restorer_stats(wp_restorer *r, wp_restore_stats *out)
{
    memset(out, 0, sizeof *out);
    out->pages_total = atomic_load(&r->pages_total);
    out->pages_resident = atomic_load(&r->pages_resident);
    out->faults = r->faults;
    out->faults_zero = r->faults_zero;
    out->pages_by_fault = r->pages_by_fault;
    out->pages_by_fill = r->pages_by_fill;
    out->removed_pages = r->removed_pages;
    out->fault_ns_total = r->fault_ns_total;
    out->fault_ns_max = r->fault_ns_max;
    out->first_fault_ns = r->first_fault_ns ? r->first_fault_ns - r->start_ns : 0;
    out->done_ns = r->done_ns ? r->done_ns - r->start_ns : 0;
    memcpy(out->hist, r->hist, sizeof out->hist);
    return 0;
}

int32_t wp_restorer_destroy(wp_restorer *r)
{
    if (!r)
        return 0;
    atomic_store(&r->stopping, true);
    signal_eventfd(r->stop_fd);
    if (r->started) {
        pthread_join(r->fill_thread, NULL);
        pthread_join(r->fault_thread, NULL);
    }
    for (uint32_t i = 0; i < r->region_count; i++) {
        struct rs_region *g = &r->regions[i];
        if (!atomic_load(&r->done) && r->uffd >= 0) {
            struct uffdio_range range = {.start = g->hva, .len = g->size};
            ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
        }
        if (g->memfd >= 0)
            close(g->memfd);
        free(g->resident);
        free(g->removed);
        free(g->record_of);
    }
    free(r->records);
    if (r->uffd >= 0)
        close(r->uffd);
    if (r->file >= 0)
        close(r->file);
    if (r->stop_fd >= 0)
        close(r->stop_fd);
    pthread_mutex_destroy(&r->install_lock);
    free(r);
    return 0;
}

int32_t wp_restore_uffd_create(uint64_t hva, uint64_t size, uint32_t flags)
{
    int32_t how;
    int fd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (fd < 0)
        return fd;
    bool shmem = flags & WP_RESTORE_UFFD_MINOR;
    uint64_t features = (shmem ? (1ull << 10) /* MINOR_SHMEM */ : 0) | ((flags & WP_RESTORE_MOVE) ? (1ull << 16) /* MOVE */ : 0);
    uint64_t offered;
    int rc = uffd_handshake(fd, features, &offered);
    struct uffdio_register reg = {.range = {.start = hva, .len = size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING | (shmem ? UFFDIO_REGISTER_MODE_MINOR : 0)};
    if (rc == 0 && ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        rc = -errno;
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}
