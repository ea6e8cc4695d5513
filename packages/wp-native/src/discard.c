/*
 * The guest discarding or moving its memory during a snapshot: the uffd
 * events REMOVE (MADV_DONTNEED, MADV_REMOVE: e.g. a balloon), UNMAP and
 * REMAP, which the engine asks for on every uffd it negotiates.
 *
 * A REMOVE is delivered before the kernel drops the pages, but the
 * discarding thread runs on as soon as the event is read, so the pages cannot
 * be copied first. For each page of the range:
 *  - armed, before the cut: the discard is part of the memory at the cut.
 *    The page is noted as written, so the cut re-protects it (anonymous
 *    memory comes back unprotected after a discard, and a later write would
 *    otherwise never be seen).
 *  - after the cut, every page of the range is marked discarded. A page
 *    saved before the discard began keeps its content. Whoever reads a page
 *    checks its mark after reading (wp_check_discarded): the discard may
 *    have started as soon as the fault thread read the event, before the
 *    mark, so the fault thread holds an odd epoch from before it reads
 *    events until it has marked their pages, and readers wait it out.
 *    A marked page of shared memory read through its file (backing.c) is
 *    kept if it is still write-protected in the discarding process: a
 *    MADV_DONTNEED leaves the page cache and a uffd-wp marker, so the page
 *    holds the content at the cut and a later write still faults; a punch
 *    (MADV_REMOVE, checked on this kernel) drops both. Otherwise the content
 *    at the cut is gone: an unclaimed anonymous page is claimed, so no later
 *    write is ever saved for it, and the snapshot fails with -ENODATA.
 *    Unless the page was known empty at the cut: private anonymous memory
 *    that held only a uffd-wp marker once armed (never populated, or
 *    discarded before arming) and was neither written nor discarded while
 *    armed (each is noted, and the cut looks at those pages again), or that
 *    the cut itself saw empty (discarded while armed and not written since).
 *    An allocator purging the same free pages again and again does this.
 *    Whoever saves such a page saves zero.
 * UNMAP and REMAP move guest memory under the snapshot: it fails (-EFAULT).
 * FORK: see wp_process_forked.
 * When the engine ends, the events still queued are read and dropped
 * (wp_drain_events), so no discarding thread waits on one.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGEMAP_PRESENT (1ull << 63) /* Documentation/admin-guide/mm/pagemap.rst */
#define PAGEMAP_SWAP (1ull << 62)    /* swapped, or a marker or migration entry */
#define PAGEMAP_FRAME ((1ull << 55) - 1)
/* A non-present entry's frame field is its swap type | offset << 5, shown to
 * CAP_SYS_ADMIN only (0 to others). The uffd-wp marker WP_UNPOPULATED puts
 * on an empty pte is type 31 (SWP_PTE_MARKER, the last of the 32 types,
 * include/linux/swapops.h) with offset PTE_MARKER_UFFD_WP (1): 0x3f, checked
 * on this kernel. A migration entry (a page with data) has another type. */
#define PAGEMAP_UFFD_WP_MARKER 0x3full

bool wp_zero_at_cut(const struct wp_region *r, uint64_t page)
{
    return r->zero_at_cut && r->zero_at_cut[page];
}

/* Which pages of [page, page + count) are empty in the pagemap: after arming,
 * those holding only a uffd-wp marker; at the cut, those whose pte is
 * empty (discarding anonymous memory drops the marker too). */
static int note_empty(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, bool armed_marker)
{
    struct wp_region *r = &e->regions[region];
    const struct wp_mapping *m = NULL;
    for (uint32_t i = 0; i < e->mapping_count && !m; i++)
        if (e->mappings[i].region == region)
            m = &e->mappings[i];
    int fd = m ? e->processes[m->process].pagemap : -1;
    if (!r->anonymous || fd < 0)
        return 0; /* not known: a discard after the cut is a loss */
    if (!r->zero_at_cut && !(r->zero_at_cut = calloc(r->pages, 1)))
        return -ENOMEM;
    uint64_t entries[512];
    for (uint64_t done = 0; done < count;) {
        uint64_t n = count - done < 512 ? count - done : 512;
        off_t at = (off_t)((m->hva / WP_PAGE_SIZE + page + done) * sizeof entries[0]);
        if (pread(fd, entries, n * sizeof entries[0], at) != (ssize_t)(n * sizeof entries[0])) {
            memset(r->zero_at_cut + page + done, 0, count - done); /* unreadable: not known zero */
            return 0;
        }
        for (uint64_t i = 0; i < n; i++) {
            uint64_t kind = entries[i] & (PAGEMAP_PRESENT | PAGEMAP_SWAP);
            r->zero_at_cut[page + done + i] =
                armed_marker ? kind == PAGEMAP_SWAP && (entries[i] & PAGEMAP_FRAME) == PAGEMAP_UFFD_WP_MARKER : kind == 0;
        }
        done += n;
    }
    return 0;
}

int wp_note_zero_when_armed(wp_engine *e)
{
    for (uint32_t i = 0; i < e->region_count; i++) {
        int rc = note_empty(e, i, 0, e->regions[i].pages, true);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int wp_note_zero_at_cut(wp_engine *e, uint32_t region, uint64_t page, uint64_t count)
{
    return note_empty(e, region, page, count, false);
}

/* After the cut: one page of a discarded range; false if its content is
 * known lost now. Marked first: whoever is saving it checks the mark after
 * reading (wp_check_discarded), once the epoch is even again. */
static bool discard_page(struct wp_region *r, uint32_t process, uint64_t page)
{
    atomic_store((_Atomic uint8_t *)&r->discarded[page], (uint8_t)(process + 1));
    page = wp_unit_head(r, page); /* its state: the unit's (a huge page's) */
    uint8_t state = __atomic_load_n(&r->state[page], __ATOMIC_SEQ_CST);
    if (state != PAGE_PENDING || r->fd >= 0 || wp_zero_at_cut(r, page))
        return true; /* saved before the discard, or its saver checks the mark (and saves zero if it was zero at the cut) */
    /* Anonymous memory: the content at the cut is gone. Claimed, so no
     * later write is ever saved for it, and marked lost, so a write fault
     * there (a huge page keeps its uffd-wp marker) is let through, not
     * waited on; if someone else claimed it first, they see the mark. */
    if (!wp_claim_page(r, page))
        return true;
    __atomic_store_n(&r->state[page], PAGE_LOST, __ATOMIC_RELEASE);
    return false;
}

void wp_discard_range(wp_engine *e, uint32_t process, uint64_t start, uint64_t end, bool armed)
{
    /* Read while the cut runs (a thread the VMM did not pause): it counts as
     * after the cut, and is never waited out here. The cut may be
     * re-protecting, and the kernel refuses that (EAGAIN) while the
     * discarder's next event is unread: waiting for the cut would hold the
     * only reader of that event (test_cut_discard). Anonymous pages are then
     * lost unless the cut saw them empty, which it may not have looked at
     * yet: the snapshot fails (-ENODATA) rather than guess. */
    int mode = armed ? MODE_ARMING : atomic_load(&e->mode);
    if (mode == MODE_IDLE)
        return; /* before the snapshot: nothing to keep */
    uint64_t lost = 0;
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        struct wp_region *r = &e->regions[m->region];
        if (m->process != process || end <= m->hva || start >= m->hva + r->size)
            continue;
        uint64_t from = start > m->hva ? (start - m->hva) / WP_PAGE_SIZE : 0;
        uint64_t to = end < m->hva + r->size ? (end - m->hva + WP_PAGE_SIZE - 1) / WP_PAGE_SIZE : r->pages;
        for (uint64_t p = from; p < to; p++) {
            if (armed)
                wp_note_armed_write(e, m->region, p); /* notes the unit holding p */
            else if (!discard_page(r, process, p))
                lost++;
        }
    }
    if (lost > 0) {
        atomic_fetch_add(&e->pages_discarded, lost);
        wp_record_error(e, -ENODATA, (int32_t)process);
    }
}

void wp_memory_moved(wp_engine *e, uint32_t process)
{
    if (atomic_load(&e->mode) != MODE_IDLE)
        wp_record_error(e, -EFAULT, (int32_t)process);
}

/*
 * A process forked while its memory was registered (UFFD_EVENT_FORK, asked
 * for so that a fork is never silent): the kernel gave the child a copy of
 * the registration, on a new uffd installed in this process. Closing it
 * lets the child go unprotected. Its private memory is its own copy
 * (copy-on-write, and the parent's writes still fault), but it writes
 * shared memory (a memfd, shmem, hugetlbfs, a private huge page is counted
 * with them) without a fault and can exit before the snapshot ends, so a
 * snapshot of shared memory the parent maps fails (-ECHILD) rather than
 * save the child's writes after the cut.
 */
void wp_process_forked(wp_engine *e, uint32_t process, int child_uffd)
{
    if (child_uffd >= 0)
        close(child_uffd);
    /* This very process (an in-process guest): its forks are its own
     * helpers (a spawn, which execs at once), never the guest. */
    if (atomic_load(&e->mode) == MODE_IDLE || e->processes[process].pid == getpid())
        return;
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        if (m->process == process && !wp_private_anonymous(e->processes[process].pid, m->hva)) {
            wp_record_error(e, -ECHILD, (int32_t)process);
            return;
        }
    }
}

void wp_drop_messages(const struct uffd_msg *msgs, ssize_t bytes)
{
    for (ssize_t i = 0; bytes > 0 && i < bytes / (ssize_t)sizeof msgs[0]; i++)
        if (msgs[i].event == UFFD_EVENT_FORK)
            close((int)msgs[i].arg.fork.ufd);
}

/*
 * After the ranges are unregistered: read and drop every event still queued
 * on the processes' uffds. A discard or unmap in a registered range queues
 * an event (UFFD_EVENT_REMOVE, _UNMAP, _REMAP) and holds the thread that
 * made it until the event is read (the kernel's
 * userfaultfd_event_wait_completion), and with the fault thread gone nobody
 * reads it: the guest thread would stay blocked until the next snapshot or
 * until the uffd is closed by everyone (break8 H2). The kernel checks the
 * range under the mmap lock but queues the event after dropping it, so an
 * event can still come just after the unregister: reading goes on until
 * none came for WP_DRAIN_QUIET_NS. Unregistered ranges make no new events,
 * so this ends; WP_DRAIN_MAX_NS bounds it anyway.
 */
void wp_drain_events(wp_engine *e)
{
    struct pollfd fds[WP_MAX_PROCESSES];
    nfds_t n = 0;
    for (uint32_t i = 0; i < e->process_count; i++)
        if (e->processes[i].uffd >= 0)
            fds[n++] = (struct pollfd){.fd = e->processes[i].uffd, .events = POLLIN};
    uint64_t start = monotonic_ns(), last = start;
    while (n > 0) {
        uint64_t now = monotonic_ns();
        if (now - last >= WP_DRAIN_QUIET_NS || now - start >= WP_DRAIN_MAX_NS)
            break;
        if (poll(fds, n, 1) <= 0)
            continue;
        for (nfds_t i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            struct uffd_msg msgs[16];
            ssize_t got = read(fds[i].fd, msgs, sizeof msgs);
            if (got > 0) {
                wp_drop_messages(msgs, got);
                last = monotonic_ns();
            }
        }
    }
}
