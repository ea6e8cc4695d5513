/*
 * Lazy restore: serve a restoring guest's memory from a snapshot file (or a
 * raw memory image) through the guest's userfaultfd. A fault thread
 * resolves faults first; a fill thread installs the remaining records in
 * image order. When every page of every range is settled, the ranges are
 * unregistered. How pages are put in place: restore_uffd.c; hugetlbfs
 * ranges, whole huge pages assembled from the image: restore_huge.c; a
 * fault's own page first: restore_page.c; the uffd's events:
 * restore_events.c.
 *
 * The VMM's ranges are ranges of one concatenated memory image (regions of
 * the snapshot one after another, docs/format.md), any layout inside it: a
 * record may feed several ranges, a range several records.
 *
 * Failures are handled at the smallest scope they concern (docs/lazy-restore.md):
 *   a page the VMM mapped something else over (ENOENT): skipped;
 *   a record that cannot be produced (corrupt): its pages are never
 *     installed with anything else; they are poisoned where the VMM
 *     negotiated UFFD_FEATURE_POISON, else faults there stay blocked; the
 *     failure shows in the stats; every other page keeps being served;
 *   a fault on a registered page that no range covers: poisoned, counted;
 *   anything else (the VMM's memory gone, ENOMEM): the restorer stops.
 * No path unregisters a range that still has pages to install.
 *
 * (Over 500 lines: the fault thread, the fill thread, the per-record
 * failure handling and the restorer's life (create, ranges, owner check,
 * stop) share one state machine and its lock, kept in one file; the kernel
 * primitives are in restore_uffd.c, events in restore_events.c, the
 * one-page fault path in restore_page.c, huge pages in restore_huge.c.)
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

static void fail(wp_restorer *r, int32_t err)
{
    int32_t none = 0;
    atomic_compare_exchange_strong(&r->error, &none, err);
}

int rs_reserve(wp_restorer *r, struct rs_buffers *b, size_t bytes)
{
    if (bytes <= b->cap)
        return 0;
    b->decoded = -1;
    if (r->move && b->pages)
        munmap(b->pages, b->cap);
    else
        free(b->pages);
    free(b->scratch);
    b->cap = bytes;
    if (r->move) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        b->pages = p == MAP_FAILED ? NULL : p;
    } else {
        b->pages = malloc(bytes);
    }
    b->scratch = malloc(bytes + 1024);
    return b->pages && b->scratch ? 0 : -ENOMEM;
}

static void release(wp_restorer *r, struct rs_buffers *b)
{
    if (r->move && b->pages)
        munmap(b->pages, b->cap);
    else
        free(b->pages);
    free(b->scratch);
    free(b->huge);
}

/* The part of record rec that range g holds: range pages [*p, *p + *n) and
 * the offset of the first in the record; false if they do not overlap. */
static bool overlap(const struct rs_record *rec, const struct rs_range *g, uint64_t *p, uint64_t *n, uint64_t *skip)
{
    uint64_t lo = rec->image_page > g->image_page ? rec->image_page : g->image_page;
    uint64_t hi_rec = rec->image_page + rec->pages, hi_g = g->image_page + g->pages;
    uint64_t hi = hi_rec < hi_g ? hi_rec : hi_g;
    if (lo >= hi)
        return false;
    *p = lo - g->image_page;
    *n = hi - lo;
    *skip = lo - rec->image_page;
    return true;
}

/* The record's pages cannot be produced: never install anything else there
 * (in a hugetlbfs range: the whole huge pages that hold them). */
void rs_note_failure(wp_restorer *r, const struct rs_record *rec, int err, uint32_t why)
{
    if (!r->failed_records++) {
        r->failed_offset = rec->file_offset;
        r->failed_why = why;
        r->failed_errno = err;
    }
}

void rs_record_failed(wp_restorer *r, uint32_t index, int err, uint32_t why)
{
    const struct rs_record *rec = &r->records[index];
    rs_note_failure(r, rec, err, why);
    for (uint32_t k = 0; k < r->range_count; k++) {
        struct rs_range *g = &r->ranges[k];
        uint64_t p, n, skip;
        if (!overlap(rec, g, &p, &n, &skip))
            continue;
        uint64_t end = (p + n + g->unit - 1) / g->unit * g->unit;
        p = p / g->unit * g->unit;
        n = end - p;
        for (uint64_t q = p; q < p + n; q++)
            if (!(g->state[q] & (PG_SETTLED | PG_FAILED))) {
                g->state[q] |= PG_FAILED;
                r->pages_failed++;
            }
        rs_poison(r, g, p, n); /* -EINVAL without the POISON feature: faults there stay blocked */
    }
}

/* Makes every page that record `index` feeds settled. A fault passes its
 * range and page (fault_g non-NULL): that page is installed first, so the
 * faulting thread resumes before the record's other pages go in. */
static int resolve_record(wp_restorer *r, uint32_t index, struct rs_range *fault_g, uint64_t fault_page, struct rs_buffers *b)
{
    bool by_fault = fault_g != NULL;
    const struct rs_record *rec = &r->records[index];
    bool pending = false;
    for (uint32_t k = 0; k < r->range_count && !pending; k++) {
        struct rs_range *g = &r->ranges[k];
        uint64_t p, n, skip;
        if (g->unit == 1 && overlap(rec, g, &p, &n, &skip)) /* hugetlbfs ranges: rs_resolve_huge */
            for (uint64_t q = p; q < p + n && !pending; q++)
                pending = !(__atomic_load_n(&g->state[q], __ATOMIC_ACQUIRE) & (PG_SETTLED | PG_FAILED));
    }
    if (!pending)
        return 0;
    /* A zero record needs no buffer: its pages are zero pages (a file's
     * zero record may hold 2^20 pages: never 4 GiB allocated for it). */
    bool zero = !r->raw_image && record_is_zero(r->file, rec->file_offset, rec->region, rec->first_page, rec->pages);
    int rc = zero ? 0 : rs_reserve(r, b, (size_t)rec->pages * RS_PAGE);
    if (rc < 0)
        return rc;
    b->decoded = -1; /* overwritten below; kept only by rs_resolve_huge */
    /* Read and decode outside the lock: a fault never waits for the fill's
     * decode, only for an install in progress. */
    uint32_t why = 0;
    int encoding = zero ? RECORD_ZERO
                        : record_read(r->codec, r->file, r->raw_image, rec->file_offset, rec->region, rec->first_page,
                                      rec->pages, b->pages, b->scratch, b->cap + 1024, &why);
    if ((encoding == -EBADMSG || encoding == -EIO) && !r->raw_image) {
        /* A record of encoding "pages" fails page by page: its good pages are still served. */
        int rc_pages = rs_resolve_by_page(r, index, b);
        if (rc_pages != -ENOTSUP)
            return rc_pages;
    }
    if (by_fault)
        rs_lock_fault(r);
    else
        pthread_mutex_lock(&r->install_lock);
    if (encoding == -EBADMSG || encoding == -EIO) {
        rs_record_failed(r, index, encoding, why);
        pthread_mutex_unlock(&r->install_lock);
        return 0;
    }
    rc = encoding < 0 ? encoding : 0;
    if (rc == 0 && fault_g && !(fault_g->state[fault_page] & (PG_SETTLED | PG_FAILED))) {
        uint64_t ip = fault_g->image_page + fault_page - rec->image_page; /* the page's place in the record */
        rc = rs_install(r, fault_g, fault_page, 1, encoding == RECORD_ZERO ? NULL : b->pages + ip * RS_PAGE);
        r->pages_by_fault += rc == 0;
        b->fault_installed_ns = monotonic_ns();
    }
    for (uint32_t k = 0; k < r->range_count && rc == 0; k++) {
        struct rs_range *g = &r->ranges[k];
        uint64_t p, n, skip;
        if (g->unit > 1 || !overlap(rec, g, &p, &n, &skip))
            continue;
        /* Install runs of pages with nothing settled on them. */
        for (uint64_t q = p; rc == 0 && q < p + n;) {
            if (g->state[q] & (PG_SETTLED | PG_FAILED)) {
                q++;
                continue;
            }
            uint64_t e = q + 1;
            while (e < p + n && (by_fault || e - q < RS_FILL_CHUNK) && !(g->state[e] & (PG_SETTLED | PG_FAILED)))
                e++;
            const uint8_t *src = encoding == RECORD_ZERO ? NULL : b->pages + (skip + q - p) * RS_PAGE;
            uint64_t before = atomic_load(&r->pages_settled);
            rc = rs_install(r, g, q, e - q, src);
            uint64_t installed = atomic_load(&r->pages_settled) - before;
            if (by_fault)
                r->pages_by_fault += installed;
            else
                r->pages_by_fill += installed;
            if (!by_fault)
                rs_fill_yield(r);
            q = e;
        }
    }
    pthread_mutex_unlock(&r->install_lock);
    return rc;
}

/* The record holding image page ip (records tile the image, sorted). */
uint32_t rs_record_at(const wp_restorer *r, uint64_t ip)
{
    uint32_t lo = 0, hi = r->record_count;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (r->records[mid].image_page <= ip)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Serves one fault; -EAGAIN if a discard is pending (retry after reading it). */
static int serve_fault(wp_restorer *r, uint64_t address, struct rs_buffers *b)
{
    uint64_t page;
    struct rs_range *g = rs_find_page(r, address, &page);
    if (!g) {
        rs_serve_outside(r, address);
        return 0;
    }
    uint64_t t0 = monotonic_ns();
    b->fault_installed_ns = 0; /* set by resolve_record when it installs this fault's page */
    if (!r->first_fault_ns)
        r->first_fault_ns = t0;
    uint8_t state = __atomic_load_n(&g->state[page], __ATOMIC_ACQUIRE);
    int rc;
    if (state & PG_FAILED) {
        /* Never anything else. Poisoned before, the guest has discarded it
         * since (MADV_DONTNEED drops the poison marker): poisoned again.
         * Without the POISON feature: left blocked. */
        if (state & PG_POISONED) {
            uint64_t unit = page / g->unit * g->unit;
            rs_lock_fault(r);
            int prc = rs_poison_hva(r, g->hva + unit * RS_PAGE, (uint64_t)g->unit * RS_PAGE);
            if (prc == -EEXIST) { /* still poisoned (raced): the thread only needs waking */
                struct uffdio_range wake = {.start = g->hva + unit * RS_PAGE, .len = (uint64_t)g->unit * RS_PAGE};
                ioctl(r->uffd, UFFDIO_WAKE, &wake);
            }
            pthread_mutex_unlock(&r->install_lock);
        }
        return 0;
    } else if (state & PG_SETTLED) {
        /* Discarded by the guest, or raced with an install: zero where
         * nothing is, or map what is (a shared page that survived). */
        if (state & PG_REMOVED)
            r->faults_zero++;
        rs_lock_fault(r);
        rc = rs_install_zero_or_keep(r, g, page / g->unit * g->unit);
        pthread_mutex_unlock(&r->install_lock);
    } else {
        if (g->unit > 1)
            rc = rs_resolve_huge(r, g, page, true, b);
        else if ((rc = rs_fault_page(r, g, page, b)) == -ENOTSUP) /* the page alone; its record's others follow in the fill */
            rc = resolve_record(r, rs_record_at(r, g->image_page + page), g, page, b);
        if (rc == 0 && (__atomic_load_n(&g->state[page], __ATOMIC_ACQUIRE) & PG_SETTLED)) {
            uint64_t unit = page / g->unit * g->unit;
            struct uffdio_range wake = {.start = g->hva + unit * RS_PAGE, .len = (uint64_t)g->unit * RS_PAGE};
            ioctl(r->uffd, UFFDIO_WAKE, &wake); /* in case an install by the fill raced the fault */
        }
    }
    if (rc == -EAGAIN)
        return rc;
    if (rc < 0) {
        fail(r, rc);
        return rc;
    }
    /* Service time: until the faulting page was installed (the faulting
     * thread resumes then; the record's other pages follow). */
    uint64_t end = b->fault_installed_ns >= t0 ? b->fault_installed_ns : monotonic_ns();
    uint64_t ns = end - t0;
    if (!r->first_page_ns)
        r->first_page_ns = end;
    r->faults++;
    r->fault_ns_total += ns;
    if (ns > r->fault_ns_max)
        r->fault_ns_max = ns;
    r->hist[hist_bucket8(ns, WP_RESTORE_HIST_BUCKETS)]++;
    return 0;
}

static void *fault_main(void *arg)
{
    wp_restorer *r = arg;
    struct rs_buffers b = {.decoded = -1};
    struct uffd_msg msgs[64];
    /* Faults that met EAGAIN (a discard pending): served again after the next read. */
    uint64_t retry[256];
    size_t retry_count = 0;
    uint64_t last = 0;
    while (!atomic_load(&r->stopping) && !atomic_load(&r->error)) {
        /* read() never blocks: the uffd is O_NONBLOCK (checked at create). */
        rs_lock_fault(r);
        ssize_t n = read(r->uffd, msgs, sizeof msgs);
        int read_errno = n < 0 ? errno : 0;
        for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++)
            rs_apply_event(r, &msgs[i]);
        pthread_mutex_unlock(&r->install_lock);
        size_t retrying = retry_count;
        retry_count = 0;
        for (size_t i = 0; i < retrying; i++)
            if (serve_fault(r, retry[i], &b) == -EAGAIN && retry_count < 256)
                retry[retry_count++] = retry[i];
        if (n <= 0) {
            if (retry_count)
                continue;
            if (n == 0 || (read_errno != EAGAIN && read_errno != EINTR)) {
                fail(r, n == 0 ? -EPIPE : -read_errno);
                break;
            }
            if (monotonic_ns() - last < 50000) {
                /* Spin 50 us after a fault before sleeping (wake-ups are slow
                 * here), asking without install_lock whether a message came:
                 * the fill keeps the lock between its chunks meanwhile. */
                struct pollfd ready = {.fd = r->uffd, .events = POLLIN};
                while (monotonic_ns() - last < 50000 && poll(&ready, 1, 0) == 0 && !atomic_load(&r->stopping))
                    __builtin_ia32_pause();
                continue;
            }
            struct pollfd fds[2] = {{.fd = r->uffd, .events = POLLIN}, {.fd = r->stop_fd, .events = POLLIN}};
            poll(fds, 2, 20);
            continue;
        }
        last = monotonic_ns();
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT && serve_fault(r, msgs[i].arg.pagefault.address, &b) == -EAGAIN &&
                retry_count < 256)
                retry[retry_count++] = msgs[i].arg.pagefault.address;
    }
    release(r, &b);
    return NULL;
}

/* Whether range g can be unregistered: nothing left to install, and no
 * page that needs a handler. A failed page that was poisoned keeps its
 * poison marker without a handler (the kernel answers the fault itself) in
 * private memory, so such a range is unregistered too: then nothing in it
 * waits for a handler, and the guest's later MADV_DONTNEED there (a balloon)
 * never waits on a REMOVE event nobody reads; the discarded page reads zero,
 * as any discarded private page. In shared memory a discarded poisoned page
 * would read the page cache's hole (zero, not the guest's discard), and an
 * unpoisoned failed page (no POISON feature) would read zero: those ranges
 * stay registered, and must be served until the VMM leaves. */
static bool range_clean(const struct rs_range *g)
{
    for (uint64_t p = 0; p < g->pages; p++) {
        uint8_t st = g->state[p];
        if (!(st & PG_SETTLED))
            return false;
        if ((st & PG_FAILED) && (g->shared || !(st & PG_POISONED)))
            return false;
    }
    return true;
}

static void *fill_main(void *arg)
{
    wp_restorer *r = arg;
    struct rs_buffers b = {.decoded = -1};
    /* The fill (fault-around, then image order) runs at nice 19: it takes
     * only CPU the guest's vCPUs and the fault thread leave. It holds
     * install_lock for one chunk at a time only, so a fault that finds it
     * held waits for that chunk, which the fill (then alone runnable among
     * them) finishes at once. */
    setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
    /* Records a fault touched first (their other pages: fault-around), then
     * image order; with no_fill (benchmarks: faults only), fault-around only,
     * until every page is settled. */
    for (uint32_t i = 0; !atomic_load(&r->stopping) && !atomic_load(&r->error);) {
        int64_t hot = rs_hot_take(r, r->no_fill ? 10 : 0);
        bool in_order = hot < 0;
        if (in_order && (r->no_fill || i >= r->record_count)) {
            if (!r->no_fill || atomic_load(&r->pages_settled) >= atomic_load(&r->pages_total))
                break;
            continue;
        }
        int rc = resolve_record(r, in_order ? i : (uint32_t)hot, NULL, 0, &b);
        if (rc == -EAGAIN) { /* a discard is in flight: let the fault thread read it, then retry */
            if (!in_order)
                rs_hot_push(r, (uint32_t)hot);
            usleep(100);
            continue;
        }
        if (rc < 0) {
            fail(r, rc);
            break;
        }
        i += in_order;
    }
    /* hugetlbfs ranges, huge page by huge page in image order (records read once each where they are shared). */
    for (uint32_t k = 0; !r->no_fill && k < r->range_count; k++) {
        struct rs_range *g = &r->ranges[k];
        for (uint64_t p = 0; g->unit > 1 && p < g->pages && !atomic_load(&r->stopping) && !atomic_load(&r->error);) {
            int rc = rs_resolve_huge(r, g, p, false, &b);
            if (rc == -EAGAIN) {
                usleep(100);
                continue;
            }
            if (rc < 0) {
                fail(r, rc);
                break;
            }
            p += g->unit;
        }
    }
    release(r, &b);
    if (atomic_load(&r->error) == 0 && !atomic_load(&r->stopping) &&
        atomic_load(&r->pages_settled) == atomic_load(&r->pages_total)) {
        /* Nothing left to install: unregister every range whose pages are
         * all there (a range with failed pages stays registered). */
        pthread_mutex_lock(&r->install_lock);
        for (uint32_t i = 0; i < r->range_count; i++) {
            if (range_clean(&r->ranges[i])) {
                struct uffdio_range range = {.start = r->ranges[i].hva, .len = r->ranges[i].size};
                ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
            } else {
                r->left_registered = true; /* the fault thread must keep reading until the VMM leaves */
            }
        }
        pthread_mutex_unlock(&r->install_lock);
        r->done_ns = monotonic_ns();
        atomic_store(&r->done, true);
    }
    return NULL;
}

wp_restorer *wp_restorer_create(int32_t uffd, int32_t snapshot_fd, uint32_t flags, int32_t *err_out)
{
    *err_out = rs_check_uffd(uffd);
    if (*err_out < 0)
        return NULL;
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
    pthread_mutex_init(&r->hot_lock, NULL);
    pthread_cond_init(&r->hot_cond, NULL);
    r->codec = wp_record_codec_create();
    if (r->uffd < 0 || r->file < 0 || r->stop_fd < 0 || !r->codec) {
        *err_out = r->codec ? -errno : -ENOMEM;
        wp_restorer_destroy(r);
        return NULL;
    }
    return r;
}

int32_t wp_restorer_add_range(wp_restorer *r, uint64_t hva, uint64_t size, uint64_t image_offset, uint32_t range_flags)
{
    if (r->started || r->index)
        return -EBUSY;
    if (r->range_count >= RS_MAX_RANGES)
        return -E2BIG;
    uint32_t unit = range_flags & WP_RESTORE_RANGE_HUGE_2M ? RS_HUGE_PAGES : 1;
    uint64_t bytes = (uint64_t)unit * RS_PAGE;
    if (!size || size % bytes || hva % bytes || image_offset % RS_PAGE || hva + size < hva || (unit > 1 && r->move))
        return -EINVAL;
    for (uint32_t i = 0; i < r->range_count; i++)
        if (hva < r->ranges[i].hva + r->ranges[i].size && r->ranges[i].hva < hva + size)
            return -EEXIST; /* two ranges at one hva: which image page goes there would be ambiguous */
    /* The range must be registered with this uffd: faults in a range that
     * another uffd holds (the VMM sent the wrong one) would go where nobody
     * reads them, while installs through this one still work. Registering
     * MISSING again is a no-op where this uffd has it already, and fails
     * with EBUSY where another uffd holds the range. */
    /* Parts an early UNMAP/REMAP made gone (wp_restorer_take_early_events)
     * are not registered: what is mapped there now is the VMM's. */
    for (uint64_t at = hva; at < hva + size;) {
        uint64_t end = at + bytes;
        bool gone = r->early_count && rs_early_gone(r, at, end);
        while (end < hva + size && (r->early_count && rs_early_gone(r, end, end + bytes)) == gone)
            end += bytes;
        struct uffdio_register reg = {.range = {.start = at, .len = end - at}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (!gone && ioctl(r->uffd, UFFDIO_REGISTER, &reg) < 0)
            return -errno;
        at = end;
    }
    struct rs_range *g = &r->ranges[r->range_count];
    *g = (struct rs_range){.hva = hva, .size = size, .pages = size / RS_PAGE, .image_page = image_offset / RS_PAGE,
                           .shared = range_flags & WP_RESTORE_RANGE_SHARED, .unit = unit};
    /* Zero pages mapped on first touch: O(1) here whatever the range's size
     * (calloc may memset memory glibc reuses: 2 MiB for an 8 GiB range). */
    void *state = mmap(NULL, g->pages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (state == MAP_FAILED)
        return -ENOMEM;
    g->state = state;
    if (unit > 1 && !r->zero_huge && !(r->zero_huge = calloc(1, WP_RESTORE_HUGE_PAGE_SIZE))) {
        munmap(state, g->pages);
        g->state = NULL;
        return -ENOMEM;
    }
    atomic_fetch_add(&r->pages_total, g->pages);
    return (int32_t)r->range_count++;
}

int32_t wp_restorer_set_index(wp_restorer *r, wp_restore_index *idx)
{
    if (r->started || r->index)
        return -EBUSY;
    for (uint32_t i = 0; i < r->range_count; i++)
        if (r->ranges[i].image_page + r->ranges[i].pages > idx->image_pages)
            return -ERANGE; /* a range past the end of the image */
    rs_index_hold(idx);
    r->index = idx;
    r->records = idx->records;
    r->record_count = idx->count;
    r->image_pages = idx->image_pages;
    /* Events read before the ranges were known, in the order they came
     * (nothing was installed since: no install can slip in between). */
    pthread_mutex_lock(&r->install_lock);
    for (uint32_t i = 0; i < r->early_count; i++)
        rs_apply_event(r, &r->early[i]);
    pthread_mutex_unlock(&r->install_lock);
    return 0;
}

int32_t wp_restorer_check_owner(wp_restorer *r, int32_t pid)
{
    if (r->started || !r->records || pid <= 0)
        return -EINVAL;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct rs_buffers b = {.decoded = -1};
    int rc = 0;
    bool checked = false;
    /* The first page not present in the VMM (pagemap bits 63 present, 62
     * swapped), within each range's first 512 pages, is served now, as it
     * would be anyway; then the VMM's pagemap must show it present. */
    for (uint32_t k = 0; k < r->range_count && !checked && rc == 0; k++) {
        struct rs_range *g = &r->ranges[k];
        uint64_t entries[512];
        uint64_t n = g->pages < 512 ? g->pages : 512;
        if (pread(fd, entries, n * 8, (off_t)(g->hva / RS_PAGE * 8)) != (ssize_t)(n * 8)) {
            rc = -EIO;
            break;
        }
        for (uint64_t p = 0, tries = 0; p < n && rc == 0; p += g->unit) {
            if (entries[p] & (3ull << 62))
                continue;
            rc = g->unit > 1 ? rs_resolve_huge(r, g, p, false, &b) : resolve_record(r, rs_record_at(r, g->image_page + p), NULL, 0, &b);
            if (rc == -EAGAIN && tries++ < 1000) { /* a discard pending: read it, try again */
                rs_take_events(r);
                rc = 0;
                p -= g->unit;
                continue;
            }
            if (rc == -EAGAIN) { /* discards keep coming: left unchecked rather than refused */
                rc = 0;
                checked = true;
                break;
            }
            if (rc < 0 || !(g->state[p] & PG_RESIDENT))
                continue; /* failed, gone or discarded: another page */
            uint64_t e = 0;
            if (pread(fd, &e, 8, (off_t)((g->hva / RS_PAGE + p) * 8)) != 8)
                rc = -EIO;
            else if (!(e & (1ull << 63)))
                rc = -EXDEV;
            checked = true;
            break;
        }
    }
    release(r, &b);
    close(fd);
    return rc;
}

int32_t wp_restorer_start(wp_restorer *r)
{
    if (r->started || !r->records || !r->record_count)
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
    if (!atomic_load(&r->done))
        return 0;
    return r->left_registered ? 2 : 1;
}

int32_t wp_restorer_stats(wp_restorer *r, wp_restore_stats *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&r->install_lock);
    out->pages_total = atomic_load(&r->pages_total);
    out->pages_settled = atomic_load(&r->pages_settled);
    out->faults = r->faults;
    out->faults_zero = r->faults_zero;
    out->pages_by_fault = r->pages_by_fault;
    out->pages_by_fill = r->pages_by_fill;
    out->removed_pages = r->removed_pages;
    out->fault_ns_total = r->fault_ns_total;
    out->fault_ns_max = r->fault_ns_max;
    out->first_fault_ns = r->first_fault_ns ? r->first_fault_ns - r->start_ns : 0;
    out->done_ns = r->done_ns ? r->done_ns - r->start_ns : 0;
    out->pages_gone = r->pages_gone;
    out->pages_failed = r->pages_failed;
    out->pages_poisoned = r->pages_poisoned;
    out->failed_records = r->failed_records;
    out->failed_offset = r->failed_offset;
    out->failed_why = r->failed_why;
    out->failed_errno = (uint64_t)(int64_t)r->failed_errno;
    out->faults_outside = r->faults_outside;
    out->outside_poisoned = r->outside_poisoned;
    out->outside_hva = r->outside_hva;
    out->pages_unallocated = r->pages_unallocated;
    out->started_at_ns = r->start_ns;
    out->first_page_ns = r->first_page_ns ? r->first_page_ns - r->start_ns : 0;
    memcpy(out->hist, r->hist, sizeof out->hist);
    pthread_mutex_unlock(&r->install_lock);
    return 0;
}

int32_t wp_restorer_stop(wp_restorer *r)
{
    atomic_store(&r->stopping, true);
    signal_eventfd(r->stop_fd);
    if (r->started && !r->joined) {
        pthread_join(r->fill_thread, NULL);
        pthread_join(r->fault_thread, NULL);
        r->joined = true;
    }
    return 0;
}

int32_t wp_restorer_destroy(wp_restorer *r)
{
    if (!r)
        return 0;
    wp_restorer_stop(r);
    for (uint32_t i = 0; i < r->range_count; i++) {
        struct rs_range *g = &r->ranges[i];
        /* Only a range with nothing left to install is unregistered: an
         * unregistered page not yet installed would read as zero (or a
         * memfd hole). Other ranges stay registered to the VMM's uffd, and
         * its faults there wait, visibly, rather than read wrong memory. */
        if (!atomic_load(&r->done) && r->uffd >= 0 && g->state && range_clean(g)) {
            struct uffdio_range range = {.start = g->hva, .len = g->size};
            ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
        }
        if (g->state)
            munmap(g->state, g->pages);
    }
    rs_drain_events(r);
    wp_restore_index_release(r->index);
    free(r->early);
    free(r->zero_huge);
    wp_record_codec_destroy(r->codec);
    if (r->uffd >= 0)
        close(r->uffd);
    if (r->file >= 0)
        close(r->file);
    if (r->stop_fd >= 0)
        close(r->stop_fd);
    pthread_mutex_destroy(&r->install_lock);
    pthread_mutex_destroy(&r->hot_lock);
    pthread_cond_destroy(&r->hot_cond);
    free(r);
    return 0;
}
