/*
 * Lazy restore: what the VMM's uffd says besides faults, and faults no range
 * covers. A discard (REMOVE), an unmap or a move (UNMAP, REMAP), a fork
 * (FORK: the child's uffd, closed), read by the fault thread (rs_apply_event,
 * under install_lock in the critical section of the read), before it runs
 * (rs_take_events: the owner check met a pending discard), before any range
 * is added (wp_restorer_take_early_events: a remap the VMM made as it sent
 * the handshake), and at the end (rs_drain_events: messages nobody will
 * read hold their senders). Split from restore.c, which serves the pages.
 */
#define _GNU_SOURCE
#include "restore_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

struct rs_range *rs_find_page(wp_restorer *r, uint64_t hva, uint64_t *page)
{
    for (uint32_t i = 0; i < r->range_count; i++) {
        struct rs_range *g = &r->ranges[i];
        if (hva >= g->hva && hva - g->hva < g->size) {
            *page = (hva - g->hva) / RS_PAGE;
            return g;
        }
    }
    return NULL;
}

/* The guest discarded [start, end). Called with install_lock held, in the
 * same critical section as the read of the event: once it is read the
 * kernel lets the discard go on, so no install may slip in between. */
static void mark_removed(wp_restorer *r, uint64_t start, uint64_t end)
{
    for (uint64_t a = start & ~(uint64_t)(RS_PAGE - 1); a < end; a += RS_PAGE) {
        uint64_t page;
        struct rs_range *g = rs_find_page(r, a, &page);
        if (!g || (g->state[page] & (PG_GONE | PG_FAILED)))
            continue;
        /* hugetlbfs: the kernel discards whole huge pages only; a unit is marked only when all of it is discarded */
        if (g->unit > 1 && (g->hva + page / g->unit * g->unit * RS_PAGE < start ||
                            g->hva + (page / g->unit + 1) * g->unit * RS_PAGE > end))
            continue;
        /* Shared memory: MADV_DONTNEED keeps the page cache, MADV_REMOVE
         * punches a hole, and the event does not say which. A page not yet
         * installed stays pending (its content is still the snapshot's); an
         * installed one is zero or kept on its next fault, as the page cache
         * then says (rs_install_zero_or_keep). */
        if (g->shared && !(g->state[page] & PG_RESIDENT))
            continue;
        rs_set(r, g, page, PG_REMOVED);
        r->removed_pages++;
    }
}

/* The VMM unmapped [start, end) (UFFD_EVENT_UNMAP: munmap, or an mmap
 * MAP_FIXED over it) or moved it away (UFFD_EVENT_REMAP: mremap), where it
 * negotiated those events. Whatever is mapped there next is the VMM's, not
 * the snapshot's: its pages are gone, and nothing is installed there again,
 * even once the VMM registers the new mapping with the uffd (Firecracker up
 * to 1.10 remaps balloon memory and registers it again). Pages not
 * installed by then are counted gone (the restore is not whole); a fault
 * in the new mapping gets zero (or keeps what is there). Called with
 * install_lock held, in the critical section of the event's read. */
static void mark_gone(wp_restorer *r, uint64_t start, uint64_t end)
{
    for (uint64_t a = start & ~(uint64_t)(RS_PAGE - 1); a < end; a += RS_PAGE) {
        uint64_t page;
        struct rs_range *g = rs_find_page(r, a, &page);
        if (!g || (g->state[page] & PG_GONE))
            continue;
        if (!(g->state[page] & PG_SETTLED) || (g->state[page] & PG_FAILED))
            r->pages_gone++;
        g->state[page] &= (uint8_t)~PG_FAILED; /* nothing of the snapshot's is owed there any more */
        rs_set(r, g, page, PG_GONE);
    }
}

/* A fault on a page registered with the uffd that no range covers (the VMM
 * registered more than it declared): there is nothing to serve there, and
 * zero would be wrong. The faulting thread gets a memory error
 * (UFFDIO_POISON) where the kernel allows it, else stays blocked; either
 * way the fault is counted, with the first one's page, for the VMM's log. */
void rs_serve_outside(wp_restorer *r, uint64_t address)
{
    uint64_t page = address & ~(uint64_t)(RS_PAGE - 1);
    rs_lock_fault(r);
    if (!r->faults_outside++)
        r->outside_hva = page;
    int rc = rs_poison_hva(r, page, RS_PAGE);
    if (rc == -EINVAL) { /* hugetlbfs memory takes whole huge pages */
        page = address & ~(uint64_t)(WP_RESTORE_HUGE_PAGE_SIZE - 1);
        rc = rs_poison_hva(r, page, WP_RESTORE_HUGE_PAGE_SIZE);
    }
    if (rc == 0) {
        r->outside_poisoned++;
    } else if (rc == -EEXIST) { /* a page is there: the thread only needs waking */
        struct uffdio_range wake = {.start = address & ~(uint64_t)(WP_RESTORE_HUGE_PAGE_SIZE - 1), .len = WP_RESTORE_HUGE_PAGE_SIZE};
        ioctl(r->uffd, UFFDIO_WAKE, &wake);
    }
    pthread_mutex_unlock(&r->install_lock);
}

/* A discard, unmap or move the guest's VMM made (not a fault). Under
 * install_lock, in the critical section of the event's read. A fork (a VMM
 * that negotiated UFFD_FEATURE_EVENT_FORK) hands this process a new uffd,
 * the child's: it is closed at once (serve restores the VMM's memory, not
 * its children's; the child's ranges are unregistered with it), else every
 * fork would leave an fd here for as long as serve runs. */
void rs_apply_event(wp_restorer *r, const struct uffd_msg *m)
{
    if (m->event == UFFD_EVENT_FORK)
        close((int)m->arg.fork.ufd);
    else if (m->event == UFFD_EVENT_REMOVE)
        mark_removed(r, m->arg.remove.start, m->arg.remove.end);
    else if (m->event == UFFD_EVENT_UNMAP)
        mark_gone(r, m->arg.remove.start, m->arg.remove.end);
    else if (m->event == UFFD_EVENT_REMAP)
        mark_gone(r, m->arg.remap.from, m->arg.remap.from + m->arg.remap.len);
}

/* Before the fault thread runs (wp_restorer_check_owner met EAGAIN: a
 * discard pending): reads what is queued, applies the events, and wakes the
 * faults read, whose threads fault again once the fault thread runs. */
void rs_take_events(wp_restorer *r)
{
    struct uffd_msg msgs[64];
    pthread_mutex_lock(&r->install_lock);
    ssize_t n = read(r->uffd, msgs, sizeof msgs);
    for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++) {
        rs_apply_event(r, &msgs[i]);
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
            struct uffdio_range wake = {.start = msgs[i].arg.pagefault.address & ~(uint64_t)(RS_PAGE - 1), .len = RS_PAGE};
            ioctl(r->uffd, UFFDIO_WAKE, &wake);
        }
    }
    pthread_mutex_unlock(&r->install_lock);
}

/* Whether a mapping change of the VMM's is in flight: between the kernel's
 * prep of an UNMAP, REMAP, REMOVE or FORK event (under the VMM's mmap lock,
 * before the change is visible in its mappings) and the event being read,
 * the uffd's ioctls that change memory answer EAGAIN. Asked with
 * UFFDIO_WRITEPROTECT (unprotect) over one page at probe_hva: EAGAIN while a
 * change is in flight, ENOENT when nothing there is registered for
 * write-protect (what serve's ranges are: MISSING), so nothing changes. */
static bool change_in_flight(wp_restorer *r, uint64_t probe_hva)
{
    struct uffdio_writeprotect wp = {.range = {.start = probe_hva & ~(uint64_t)(RS_PAGE - 1), .len = RS_PAGE}};
    return ioctl(r->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == EAGAIN;
}

int32_t wp_restorer_take_early_events(wp_restorer *r, uint64_t probe_hva, uint32_t wait_ms, uint64_t *gone, uint32_t cap)
{
    if (r->started || r->range_count || r->index)
        return -EBUSY;
    if (!r->early && !(r->early = calloc(RS_EARLY_EVENTS, sizeof *r->early)))
        return -ENOMEM;
    uint64_t deadline = monotonic_ns() + (uint64_t)wait_ms * 1000000u;
    while (r->early_count < RS_EARLY_EVENTS) {
        /* No more than there is room for: an event read is never dropped. */
        struct uffd_msg msgs[64];
        size_t room = RS_EARLY_EVENTS - r->early_count;
        ssize_t n = read(r->uffd, msgs, (room < 64 ? room : 64) * sizeof msgs[0]);
        for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof msgs[0]; i++) {
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT) { /* its thread faults again, for the fault thread */
                struct uffdio_range wake = {.start = msgs[i].arg.pagefault.address & ~(uint64_t)(RS_PAGE - 1), .len = RS_PAGE};
                ioctl(r->uffd, UFFDIO_WAKE, &wake);
            } else if (msgs[i].event == UFFD_EVENT_FORK) {
                close((int)msgs[i].arg.fork.ufd); /* the child's uffd (apply_event) */
            } else {
                r->early[r->early_count++] = msgs[i];
            }
        }
        if (n > 0)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -errno;
        if (!change_in_flight(r, probe_hva) || monotonic_ns() >= deadline)
            break;
        usleep(100); /* the VMM's thread queues its event (or, once it is read, returns from its mmap) */
    }
    uint32_t count = 0;
    for (uint32_t i = 0; i < r->early_count; i++) {
        const struct uffd_msg *m = &r->early[i];
        if (m->event != UFFD_EVENT_UNMAP && m->event != UFFD_EVENT_REMAP)
            continue;
        if (count < cap) {
            gone[2 * count] = m->event == UFFD_EVENT_UNMAP ? m->arg.remove.start : m->arg.remap.from;
            gone[2 * count + 1] = m->event == UFFD_EVENT_UNMAP ? m->arg.remove.end : m->arg.remap.from + m->arg.remap.len;
        }
        count++;
    }
    return (int32_t)count;
}

/* Whether [start, end) lies in a span an early UNMAP/REMAP event made gone. */
bool rs_early_gone(const wp_restorer *r, uint64_t start, uint64_t end)
{
    for (uint32_t i = 0; i < r->early_count; i++) {
        const struct uffd_msg *m = &r->early[i];
        uint64_t a = m->event == UFFD_EVENT_UNMAP ? m->arg.remove.start : m->arg.remap.from;
        uint64_t b = m->event == UFFD_EVENT_UNMAP ? m->arg.remove.end : m->arg.remap.from + m->arg.remap.len;
        if ((m->event == UFFD_EVENT_UNMAP || m->event == UFFD_EVENT_REMAP) && a <= start && end <= b)
            return true;
    }
    return false;
}

/* Messages nobody will read hold their senders: a REMOVE event blocks the
 * guest's madvise until it is read, and the fault thread may have stopped
 * (serving done, or stopped) just after one was queued. Reads what is
 * queued, a bounded number of times: a discard goes on; a fault is woken,
 * so its thread retries the access (and, in a range still registered,
 * faults again and waits for a handler, as unread it would have). */
void rs_drain_events(wp_restorer *r)
{
    struct uffd_msg msgs[64];
    for (int round = 0; r->uffd >= 0 && round < 64; round++) {
        ssize_t n = read(r->uffd, msgs, sizeof msgs);
        if (n <= 0)
            return;
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
                struct uffdio_range wake = {.start = msgs[i].arg.pagefault.address & ~(uint64_t)(RS_PAGE - 1), .len = RS_PAGE};
                ioctl(r->uffd, UFFDIO_WAKE, &wake);
            } else if (msgs[i].event == UFFD_EVENT_FORK) {
                close((int)msgs[i].arg.fork.ufd); /* the child's uffd (apply_event) */
            }
    }
}
