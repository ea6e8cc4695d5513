/*
 * Protection: arming ahead of the cut, the cut itself, and removing
 * protection from a run of pages or from everything, in every process that
 * maps the memory.
 *
 * Arming protects everything while the guest runs; a write while armed is
 * let through and noted (fault.c). The cut, with the guest paused,
 * re-protects only the noted pages, so the pause does not grow with the
 * guest.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define PAGEMAP_UFFD_WP (1ull << 57) /* Documentation/admin-guide/mm/pagemap.rst */

bool wp_still_protected(wp_engine *e, uint32_t process, uint64_t hva)
{
    uint64_t entry;
    int fd = e->processes[process].pagemap;
    return fd >= 0 && pread(fd, &entry, sizeof entry, (off_t)(hva / WP_PAGE_SIZE * sizeof entry)) == sizeof entry &&
           (entry & PAGEMAP_UFFD_WP);
}

static int writeprotect_once(int uffd, uint64_t hva, uint64_t len, bool protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = hva, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* EAGAIN: an event (REMOVE, UNMAP, REMAP) is pending on the uffd; it clears
 * once the fault thread reads it. Threads other than the fault thread retry. */
int wp_writeprotect(int uffd, uint64_t hva, uint64_t len, bool protect)
{
    int rc;
    while ((rc = writeprotect_once(uffd, hva, len, protect)) == -EAGAIN)
        __builtin_ia32_pause();
    return rc;
}

/* The fault thread must not wait for EAGAIN to clear: only it reads the
 * pending event. It keeps the range and retries after its next read. */
static void defer_unprotect(wp_engine *e, uint32_t process, uint64_t hva, uint64_t len)
{
    if (e->deferred_count == e->deferred_cap) {
        size_t cap = e->deferred_cap ? e->deferred_cap * 2 : 64;
        struct wp_deferred *grown = realloc(e->deferred, cap * sizeof *grown);
        if (!grown) {
            wp_record_error(e, -ENOMEM, (int32_t)process); /* the snapshot fails; destroy unprotects */
            return;
        }
        e->deferred = grown;
        e->deferred_cap = cap;
    }
    int mode = atomic_load(&e->mode);
    e->deferred[e->deferred_count++] =
        (struct wp_deferred){.process = process, .armed = mode == MODE_ARMING || mode == MODE_CUTTING, .hva = hva, .len = len};
}

/* An unprotect that failed for another reason than a pending event. ESRCH
 * (or ENOMEM): the process's address space is gone, skip it from now on.
 * Anything else (ENOENT: the range is no longer registered, it was
 * remapped) fails the snapshot, but the process lives on: wake whoever
 * faulted there (they write on, the snapshot is abandoned anyway) and keep
 * serving its other faults, so no thread stays blocked until the session
 * notices. */
static void unprotect_failed(wp_engine *e, uint32_t process, uint64_t hva, uint64_t len, int rc)
{
    if (rc == -ESRCH || rc == -ENOMEM) {
        wp_process_failed(e, process, rc);
        return;
    }
    wp_record_error(e, rc, (int32_t)process);
    struct uffdio_range wake = {.start = hva, .len = len};
    ioctl(e->processes[process].uffd, UFFDIO_WAKE, &wake);
}

#ifdef WP_TEST_HOOKS
/* test_hooks.h: an unprotect of a write let through before the cut finds an event pending until the cut has ended. */
static bool test_defer(wp_engine *e)
{
    int mode = atomic_load(&e->mode);
    return atomic_load(&e->test_defer_armed) && (mode == MODE_ARMING || mode == MODE_CUTTING);
}
#else
#define test_defer(e) false
#endif

void wp_unprotect_in(wp_engine *e, uint32_t process, uint64_t hva, uint64_t len)
{
    struct wp_process *p = &e->processes[process];
    if (atomic_load(&p->dead))
        return;
    bool fault_thread = e->thread_started && pthread_equal(pthread_self(), e->thread);
    int rc = fault_thread && test_defer(e) ? -EAGAIN
             : fault_thread                ? writeprotect_once(p->uffd, hva, len, false)
                                           : wp_writeprotect(p->uffd, hva, len, false);
    if (rc == -EAGAIN)
        defer_unprotect(e, process, hva, len);
    else if (rc < 0)
        unprotect_failed(e, process, hva, len, rc);
}

/*
 * The unprotect of a write let through before the cut, deferred: only while
 * still ARMING, under the handshake with the cut (`noting`, see
 * serve_write_fault), so the cut cannot re-protect the page in between. Kept
 * while the cut runs. After it, the cut has re-protected the page, and an
 * unprotect would let the writer's write (and any later one) in unseen
 * while the page waits to be saved: the snapshot would hold data from after
 * the cut. Its writer is woken instead: it writes again, faults, and its
 * page is saved first (a thread frozen for the cut, by ptrace or a vCPU
 * pause, gave up its fault and does this by itself when thawed).
 * 1: done, 0: keep it, -errno: failed.
 */
static int retry_armed(wp_engine *e, struct wp_deferred d)
{
    int fd = e->processes[d.process].uffd;
    atomic_store(&e->noting, true);
    int mode = atomic_load(&e->mode);
    if (mode == MODE_ARMING) {
        int rc = test_defer(e) ? -EAGAIN : writeprotect_once(fd, d.hva, d.len, false);
        atomic_store(&e->noting, false);
        return rc == -EAGAIN ? 0 : rc < 0 ? rc : 1;
    }
    atomic_store(&e->noting, false);
    if (mode == MODE_CUTTING)
        return 0;
    struct uffdio_range wake = {.start = d.hva, .len = d.len};
    ioctl(fd, UFFDIO_WAKE, &wake);
    return 1;
}

bool wp_retry_deferred(wp_engine *e)
{
    size_t kept = 0;
    for (size_t i = 0; i < e->deferred_count; i++) {
        struct wp_deferred d = e->deferred[i];
        if (atomic_load(&e->processes[d.process].dead))
            continue;
        if (d.armed && atomic_load(&e->mode) != MODE_IDLE) {
            int rc = retry_armed(e, d);
            if (rc == 0)
                e->deferred[kept++] = d;
            else if (rc < 0)
                unprotect_failed(e, d.process, d.hva, d.len, rc);
            continue;
        }
        int rc = d.armed && test_defer(e) ? -EAGAIN : writeprotect_once(e->processes[d.process].uffd, d.hva, d.len, false);
        if (rc == -EAGAIN)
            e->deferred[kept++] = d;
        else if (rc < 0)
            unprotect_failed(e, d.process, d.hva, d.len, rc);
    }
    e->deferred_count = kept;
    return kept > 0;
}

void wp_unprotect_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count)
{
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        if (m->region == region)
            wp_unprotect_in(e, m->process, m->hva + page * WP_PAGE_SIZE, count * WP_PAGE_SIZE);
    }
}

static int32_t protect_all(wp_engine *e)
{
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        int rc = wp_writeprotect(e->processes[m->process].uffd, m->hva, e->regions[m->region].size, true);
        if (rc < 0) {
            wp_engine_unprotect_all(e);
            wp_record_error(e, rc, (int32_t)m->process);
            return rc;
        }
    }
    return 0;
}

int32_t wp_engine_arm(wp_engine *e)
{
    if (!e->thread_started)
        return -EINVAL; /* nobody would serve the faults */
    if (atomic_load(&e->mode) != MODE_IDLE)
        return -EBUSY;
    for (uint32_t i = 0; i < e->region_count; i++) {
        e->regions[i].written = calloc(e->regions[i].pages, 1);
        if (!e->regions[i].written)
            return -ENOMEM;
    }
    /* Arming before protecting: a write during the sweep is only noted. */
    atomic_store(&e->mode, MODE_ARMING);
    int32_t rc = protect_all(e);
    if (rc == 0)
        rc = wp_note_zero_when_armed(e); /* which pages are empty now (discard.c) */
    if (rc < 0)
        atomic_store(&e->mode, MODE_IDLE);
    return rc;
}

static int compare_refs(const void *a, const void *b)
{
    const struct wp_page_ref *x = a, *y = b;
    if (x->region != y->region)
        return x->region < y->region ? -1 : 1;
    return x->page < y->page ? -1 : x->page > y->page;
}

/* Re-protect what was written since arming: runs of consecutive units of a
 * region (pages, or whole huge pages), one ioctl per run per process. */
static int32_t reprotect_written(wp_engine *e)
{
    struct wp_page_ref *w = e->armed_writes;
    size_t n = e->armed_count;
    qsort(w, n, sizeof *w, compare_refs);
    uint64_t pages = 0;
    for (size_t i = 0; i < n;) {
        uint64_t unit = e->regions[w[i].region].unit;
        size_t j = i + 1;
        while (j < n && w[j].region == w[i].region && w[j].page == w[j - 1].page + unit)
            j++;
        uint64_t len = (w[j - 1].page + unit - w[i].page) * WP_PAGE_SIZE;
        pages += len / WP_PAGE_SIZE;
        /* Before re-protecting: which of these pages, written or discarded
         * while armed, are empty now, zero at the cut (discard.c). */
        int noted = wp_note_zero_at_cut(e, w[i].region, w[i].page, len / WP_PAGE_SIZE);
        if (noted < 0)
            return noted;
        for (uint32_t k = 0; k < e->mapping_count; k++) {
            const struct wp_mapping *m = &e->mappings[k];
            struct wp_process *p = &e->processes[m->process];
            if (m->region != w[i].region || atomic_load(&p->dead))
                continue;
            int rc = wp_writeprotect(p->uffd, m->hva + w[i].page * WP_PAGE_SIZE, len, true);
            if (rc < 0)
                return rc;
        }
        i = j;
    }
    e->cut_pages = pages;
    return 0;
}

int32_t wp_engine_protect(wp_engine *e)
{
    if (!e->thread_started)
        return -EINVAL; /* nobody would serve the faults */
    int mode = atomic_load(&e->mode);
    if (mode == MODE_SNAPSHOT || mode == MODE_CUTTING)
        return -EBUSY;
    /* Changes to the memory's files before the cut are part of the cut. */
    if (e->file_watch >= 0)
        wp_backing_changed(e->file_watch);
    if (mode == MODE_IDLE) {
        atomic_store(&e->mode, MODE_SNAPSHOT);
        return protect_all(e);
    }
    /* Armed: the pause costs only the pages written since arming. A write
     * the fault thread is noting finishes first; it never waits for us while
     * noting (see serve_write_fault in fault.c). */
    atomic_store(&e->mode, MODE_CUTTING);
    while (atomic_load(&e->noting))
        __builtin_ia32_pause();
    int32_t rc = reprotect_written(e);
    if (e->file_watch >= 0)
        wp_backing_changed(e->file_watch);
    atomic_store(&e->mode, MODE_SNAPSHOT);
    if (rc < 0) {
        wp_engine_unprotect_all(e);
        wp_record_error(e, rc, -1);
    }
    return rc;
}

int32_t wp_engine_unprotect_all(wp_engine *e)
{
    int32_t first_error = 0;
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        struct wp_process *p = &e->processes[m->process];
        if (p->uffd < 0 || atomic_load(&p->dead))
            continue;
        int rc;
        uint64_t since = 0;
        while ((rc = writeprotect_once(p->uffd, m->hva, e->regions[m->region].size, false)) == -EAGAIN) {
            /* An event is pending. While the engine runs, the fault thread
             * reads it; once it is stopping nobody will, so read and drop
             * what is queued here (waiting writers are woken by this very
             * unprotect). A thread that discards without pause queues the
             * next event as soon as one is read, and the kernel refuses
             * every unprotect meanwhile: seen to last for ever on two
             * loaded cores (test_cut_discard). The engine's end gives up
             * after WP_STOP_UNPROTECT_NS: the unregister that follows
             * (wp_engine_destroy) needs no quiet moment, removes the
             * protection and wakes the writers. */
            if (atomic_load(&e->stopping)) {
                struct uffd_msg msgs[16];
                ssize_t n = read(p->uffd, msgs, sizeof msgs);
                if (n < 0 && errno != EAGAIN)
                    break;
                wp_drop_messages(msgs, n);
                uint64_t now = monotonic_ns();
                if (!since)
                    since = now;
                else if (now - since > WP_STOP_UNPROTECT_NS) {
                    rc = 0; /* left to the unregister */
                    break;
                }
            }
            __builtin_ia32_pause();
        }
        if (rc < 0 && !first_error)
            first_error = rc;
    }
    return first_error;
}
