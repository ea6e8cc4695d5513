/*
 * The engine's life cycle: processes (each with its own uffd), regions,
 * mappings (a region in a process), reading page contents, counters.
 * Protection is in protect.c, the fault thread in fault.c, the writer's
 * batches in sweep.c. See engine_internal.h for the page-state invariant.
 *
 * The translation-table model: a region is guest memory, keyed by index;
 * each process that maps it has its own host-virtual base and its own uffd.
 * A page is protected in every process at the cut and, once saved,
 * unprotected (and its waiters woken) in every process.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

void wp_record_error(wp_engine *e, int32_t err, int32_t process)
{
    int32_t none = 0;
    if (atomic_compare_exchange_strong(&e->error, &none, err))
        atomic_store(&e->error_process, process);
}

/* A process whose address space is gone answers ESRCH (or ENOMEM): skip it. */
/* After reading pages into `read` (NULL: not read, a hole), before they
 * count as saved: was any of them discarded by the guest meanwhile
 * (discard.c)? First wait until the fault thread has marked every discard it
 * may have let start (an odd epoch: between reading events and marking their
 * pages). A marked page of shared memory read through its file is kept only
 * if all of this holds after the read: it is still write-protected in the
 * process that discarded it (a uffd-wp marker), its file still holds data
 * there, and what was read is not all zero. MADV_DONTNEED in some mapping
 * leaves all three (the page cache keeps the content at the cut); a punch
 * (MADV_REMOVE) leaves a hole, and while it runs a read gives zeros. So a
 * page that was all zero at the cut and then discarded fails the snapshot
 * too: never a silent zero. Anonymous memory keeps nothing, but a page the
 * cut saw unpopulated was zero then: it is saved as zero, whatever was read.
 * Returns 0, or -ENODATA if a page is lost. */
int wp_check_discarded(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, uint8_t *read)
{
    struct wp_region *r = &e->regions[region];
    while (atomic_load(&e->discard_epoch) & 1)
        __builtin_ia32_pause();
    for (uint64_t i = 0; i < count; i++) {
        uint8_t by = atomic_load((_Atomic uint8_t *)&r->discarded[page + i]);
        if (!by)
            continue;
        if (wp_zero_at_cut(r, page + i)) {
            if (read)
                memset(read + i * WP_PAGE_SIZE, 0, WP_PAGE_SIZE); /* what the discarder wrote since */
            continue;
        }
        if (r->fd >= 0 && read && !wp_page_is_zero(read + i * WP_PAGE_SIZE)) {
            uint32_t process = by - 1u;
            const struct wp_mapping *m = NULL;
            for (uint32_t k = 0; k < e->mapping_count && !m; k++)
                if (e->mappings[k].region == region && e->mappings[k].process == process)
                    m = &e->mappings[k];
            if (m && wp_still_protected(e, process, m->hva + (page + i) * WP_PAGE_SIZE) &&
                wp_backing_has_data(r->fd, r->fd_offset + (page + i) * WP_PAGE_SIZE) == 1)
                continue;
        }
        atomic_fetch_add(&e->pages_discarded, 1);
        wp_record_error(e, -ENODATA, -1);
        return -ENODATA;
    }
    return 0;
}

void wp_process_failed(wp_engine *e, uint32_t process, int err)
{
    atomic_store(&e->processes[process].dead, true);
    wp_record_error(e, err, (int32_t)process);
}

bool wp_claim_page(struct wp_region *r, uint64_t page)
{
    uint8_t expected = PAGE_PENDING;
    return __atomic_compare_exchange_n(&r->state[page], &expected, PAGE_COPYING, false, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

void wp_mark_saved(wp_engine *e, struct wp_region *r, uint64_t page)
{
    /* Release: the unit's copy (slots or sweep buffer) is complete before SAVED. */
    __atomic_store_n(&r->state[page], PAGE_SAVED, __ATOMIC_RELEASE);
    atomic_fetch_add_explicit(&e->pages_saved, r->unit, memory_order_relaxed);
}

void wp_check_punched(wp_engine *e, uint32_t region, uint64_t page)
{
    const struct wp_region *r = &e->regions[region];
    const uint8_t *populated = r->fd >= 0 ? atomic_load_explicit(&r->populated, memory_order_acquire) : NULL;
    if (populated && populated[page] && wp_backing_has_data(r->fd, r->fd_offset + page * WP_PAGE_SIZE) == 0)
        wp_record_error(e, -ESTALE, -1);
}

int wp_read_pages(wp_engine *e, uint32_t region, uint64_t page, uint64_t count, uint8_t *dst)
{
    struct wp_region *r = &e->regions[region];
    size_t len = count * WP_PAGE_SIZE;
    if (r->fd >= 0) {
        int rc = wp_backing_read(r->fd, r->fd_offset + page * WP_PAGE_SIZE, dst, len);
        if (rc == 0)
            return wp_check_discarded(e, region, page, count, dst);
        wp_record_error(e, rc, -1);
    } else if (r->view) {
        memcpy(dst, r->view + page * WP_PAGE_SIZE, len);
        return wp_check_discarded(e, region, page, count, dst);
    } else if (r->read_via >= 0) {
        const struct wp_mapping *m = &e->mappings[r->read_via];
        struct iovec local = {.iov_base = dst, .iov_len = len};
        struct iovec remote = {.iov_base = (void *)(uintptr_t)(m->hva + page * WP_PAGE_SIZE), .iov_len = len};
        ssize_t got = process_vm_readv(e->processes[m->process].pid, &local, 1, &remote, 1, 0);
        if (got == (ssize_t)len)
            return wp_check_discarded(e, region, page, count, dst);
        wp_process_failed(e, m->process, got < 0 ? -errno : -EIO);
    }
    memset(dst, 0, len); /* the snapshot fails through e->error */
    return -EIO;
}

static int negotiate(int uffd, uint64_t features)
{
    uint64_t offered = 0;
    return uffd_handshake(uffd, features, &offered);
}

/* The features every engine asks for: write-protect, including never
 * populated pages, and shmem when the kernel has it. */
static int wanted_features(uint64_t *features)
{
    int32_t how;
    uint64_t offered = 0;
    int fd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    int rc = fd < 0 ? fd : uffd_handshake(fd, 0, &offered);
    if (fd >= 0)
        close(fd);
    if (rc < 0)
        return rc;
    uint64_t need = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
    if ((offered & need) != need)
        return -EOPNOTSUPP;
    /* Discards, moves and forks of guest memory during a snapshot (discard.c). */
    uint64_t events = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_FORK;
    *features = need | (offered & (UFFD_FEATURE_WP_HUGETLBFS_SHMEM | events));
    return 0;
}

int32_t wp_uffd_negotiate(int32_t uffd)
{
    uint64_t features;
    int rc = wanted_features(&features);
    return rc < 0 ? rc : negotiate(uffd, features);
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
    e->stop_fd = -1;
    e->file_watch = -1;
    e->processes[0].uffd = -1;
    e->process_count = 1;
    e->processes[0].pid = getpid();
    e->processes[0].pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    atomic_store(&e->error_process, -1);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->freed, NULL);
    e->overflow_tail = &e->overflow_head;

    /* Probe on a throw-away fd: UFFDIO_API can be issued once per fd. */
    int rc = wanted_features(&e->uffd_features);
    if (rc < 0) {
        *err_out = rc;
        goto fail;
    }
    e->processes[0].uffd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (e->processes[0].uffd < 0) {
        *err_out = e->processes[0].uffd;
        goto fail;
    }
    if ((rc = negotiate(e->processes[0].uffd, e->uffd_features)) < 0) {
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
    e->steer = true;
    e->slots = pool_slots == 0 ? 1 : pool_slots;
    size_t bytes = (size_t)e->slots * WP_PAGE_SIZE;
    /* mmap: slots cost memory only once used. */
    void *data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        *err_out = -errno;
        goto fail;
    }
    e->slot_data = data;
    e->slot_pages = calloc(e->slots, sizeof *e->slot_pages);
    e->residency = malloc(WP_SWEEP_MAX_PAGES);
    if (!e->slot_pages || !e->residency) {
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

int32_t wp_engine_add_process(wp_engine *e, int32_t uffd, int32_t pid)
{
    if (e->thread_started)
        return -EBUSY;
    if (e->process_count >= WP_MAX_PROCESSES)
        return -E2BIG;
    int fd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    struct wp_process *p = &e->processes[e->process_count];
    p->uffd = fd;
    char path[48];
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    p->pagemap = open(path, O_RDONLY | O_CLOEXEC);
    p->pid = pid;
    atomic_store(&p->dead, false);
    return (int32_t)e->process_count++;
}

int32_t wp_engine_add_shared_region(wp_engine *e, uint64_t view_hva, uint64_t size)
{
    if (e->thread_started)
        return -EBUSY;
    if (e->region_count >= WP_MAX_REGIONS)
        return -E2BIG;
    if (size == 0 || size % WP_PAGE_SIZE || view_hva % WP_PAGE_SIZE)
        return -EINVAL;
    struct wp_region *r = &e->regions[e->region_count];
    r->size = size;
    r->pages = size / WP_PAGE_SIZE;
    r->view = view_hva ? (const uint8_t *)(uintptr_t)view_hva : NULL;
    r->read_via = -1;
    r->fd = -1;
    /* Shared memory viewed here: read its file instead (backing.c). */
    uint64_t file_size;
    if (r->view && wp_backing_open(0, view_hva, size, &r->fd, &r->fd_offset) == 0 &&
        (wp_backing_size(r->fd, &file_size) < 0 || file_size < r->fd_offset + size)) {
        close(r->fd);
        r->fd = -1;
        return -ENXIO; /* the file is shorter than the region */
    }
    r->state = calloc(r->pages, 1);
    r->discarded = calloc(r->pages, 1);
    if (!r->state || !r->discarded) {
        free(r->state);
        free(r->discarded);
        if (r->fd >= 0)
            close(r->fd);
        return -ENOMEM;
    }
    e->pages_total += r->pages;
    return (int32_t)e->region_count++;
}

int32_t wp_engine_map_region(wp_engine *e, uint32_t region, uint32_t process, uint64_t hva)
{
    if (e->thread_started)
        return -EBUSY;
    if (region >= e->region_count || process >= e->process_count || hva % WP_PAGE_SIZE)
        return -EINVAL;
    if (e->mapping_count >= WP_MAX_MAPPINGS)
        return -E2BIG;
    struct wp_region *r = &e->regions[region];
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *o = &e->mappings[i];
        if (o->process == process && hva < o->hva + e->regions[o->region].size && o->hva < hva + r->size)
            return -EEXIST;
    }
    /* hugetlbfs memory is protected and resolved only in whole huge pages:
     * the region becomes units of that many 4 KiB pages. The real page size
     * comes from the process's mapping, never from what the caller declared;
     * every process must map the region with the same one. */
    uint64_t page_size;
    int rc = wp_kernel_page_size(e->processes[process].pid, hva, &page_size);
    if (rc < 0)
        return rc == -ENOENT ? -EFAULT : rc; /* nothing mapped there */
    uint64_t unit = page_size / WP_PAGE_SIZE;
    if (page_size % WP_PAGE_SIZE || (unit & (unit - 1)))
        return -EOPNOTSUPP;
    if (hva % page_size || r->size % page_size || (r->unit && r->unit != unit))
        return -EINVAL;
    struct uffdio_register reg = {.range = {.start = hva, .len = r->size}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(e->processes[process].uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    if (!(reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT))) {
        struct uffdio_range range = {.start = hva, .len = r->size};
        ioctl(e->processes[process].uffd, UFFDIO_UNREGISTER, &range);
        return -EOPNOTSUPP;
    }
    /* Shared memory with no view here (a process snapshot): read through its
     * file too, as add_shared_region does, never through the mapping
     * (process_vm_readv of a hole allocates it; a shrunk file faults). */
    uint64_t file_size;
    if (!r->view && r->fd < 0 &&
        wp_backing_open(e->processes[process].pid, hva, r->size, &r->fd, &r->fd_offset) == 0 &&
        (wp_backing_size(r->fd, &file_size) < 0 || file_size < r->fd_offset + r->size)) {
        close(r->fd);
        r->fd = -1;
        struct uffdio_range range = {.start = hva, .len = r->size};
        ioctl(e->processes[process].uffd, UFFDIO_UNREGISTER, &range);
        return -ENXIO; /* the file is shorter than the region */
    }
    r->unit = unit;
    /* Private anonymous memory has one mapping; a second one means shared. */
    bool first = true;
    for (uint32_t i = 0; i < e->mapping_count; i++)
        first = first && e->mappings[i].region != region;
    r->anonymous = first && unit == 1 && r->fd < 0 && wp_private_anonymous(e->processes[process].pid, hva);
    e->mappings[e->mapping_count] = (struct wp_mapping){.region = region, .process = process, .hva = hva};
    if (!r->view && r->read_via < 0)
        r->read_via = (int32_t)e->mapping_count;
    return (int32_t)e->mapping_count++;
}

int32_t wp_engine_add_region(wp_engine *e, uint64_t hva, uint64_t size)
{
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *o = &e->mappings[i];
        if (o->process == 0 && hva < o->hva + e->regions[o->region].size && o->hva < hva + size)
            return -EEXIST;
    }
    int32_t region = wp_engine_add_shared_region(e, hva, size);
    if (region < 0)
        return region;
    int32_t rc = wp_engine_map_region(e, (uint32_t)region, 0, hva);
    if (rc < 0) {
        /* Undo: the region was the last one added. */
        free(e->regions[region].state);
        free(e->regions[region].discarded);
        if (e->regions[region].fd >= 0)
            close(e->regions[region].fd);
        e->pages_total -= e->regions[region].pages;
        e->region_count--;
        return rc;
    }
    return region;
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

int32_t wp_engine_set_steering(wp_engine *e, int32_t on)
{
    if (e->thread_started)
        return -EBUSY;
    e->steer = on != 0;
    return 0;
}

int32_t wp_engine_start(wp_engine *e)
{
    if (e->thread_started)
        return -EBUSY;
    for (uint32_t r = 0; r < e->region_count; r++) {
        if (!e->regions[r].view && e->regions[r].read_via < 0)
            return -EINVAL; /* a region nobody maps cannot be read */
        if (!e->regions[r].unit)
            e->regions[r].unit = 1; /* viewed here, mapped (protected) nowhere */
    }
    /* Shared memory changed through its file (write(2), a hole punch or
     * MADV_REMOVE, a truncate) takes no write fault: watch the files, so such
     * a change during the snapshot fails it (wp_engine_error) instead of
     * saving zeros or later data. */
    for (uint32_t r = 0; r < e->region_count; r++) {
        if (e->regions[r].fd < 0)
            continue;
        if (e->file_watch < 0 && (e->file_watch = inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) < 0)
            return -errno;
        int err = wp_backing_watch(e->file_watch, e->regions[r].fd);
        if (err < 0)
            return err;
    }
    int rc = pthread_create(&e->thread, NULL, wp_fault_thread, e);
    if (rc)
        return -rc;
    pthread_setname_np(e->thread, "vmsnap-fault"); /* for top -H and vmsnap bench */
    e->thread_started = true;
    return 0;
}

int32_t wp_engine_done(wp_engine *e)
{
    uint64_t saved = atomic_load(&e->pages_saved);
    if (saved < e->pages_total)
        return 0;
    return atomic_load(&e->head) == atomic_load(&e->tail) && atomic_load(&e->overflow_count) == 0;
}

void wp_check_files(wp_engine *e)
{
    if (e->file_watch >= 0 && atomic_load(&e->mode) == MODE_SNAPSHOT && wp_backing_changed(e->file_watch))
        wp_record_error(e, -ESTALE, -1);
}

int32_t wp_engine_error(wp_engine *e, int32_t *process_out)
{
    wp_check_files(e);
    *process_out = atomic_load(&e->error_process);
    return atomic_load(&e->error);
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
    out->arm_faults = e->arm_faults;
    out->cut_pages = e->cut_pages;
    out->pages_steered = e->pages_steered;
    out->pages_discarded = atomic_load(&e->pages_discarded);
    memcpy(out->hist, e->hist, sizeof out->hist);
    return 0;
}

int32_t wp_engine_destroy(wp_engine *e)
{
    if (!e)
        return 0;
    atomic_store(&e->stopping, true);
    signal_eventfd(e->stop_fd);
    pthread_mutex_lock(&e->lock);
    pthread_cond_broadcast(&e->freed);
    pthread_mutex_unlock(&e->lock);
    /* Unprotect before joining: it wakes every writer the thread has not served. */
    int32_t rc = wp_engine_unprotect_all(e);
    if (e->thread_started)
        pthread_join(e->thread, NULL);
    int32_t again = wp_engine_unprotect_all(e);
    rc = rc ? rc : again;
    for (uint32_t i = 0; i < e->mapping_count; i++) {
        const struct wp_mapping *m = &e->mappings[i];
        struct uffdio_range range = {.start = m->hva, .len = e->regions[m->region].size};
        if (e->processes[m->process].uffd >= 0)
            ioctl(e->processes[m->process].uffd, UFFDIO_UNREGISTER, &range);
    }
    wp_drain_events(e);
    for (uint32_t i = 0; i < e->region_count; i++) {
        free(e->regions[i].state);
        free(e->regions[i].written);
        free(e->regions[i].discarded);
        free(e->regions[i].zero_at_cut);
        free(atomic_load(&e->regions[i].populated));
        if (e->regions[i].fd >= 0)
            close(e->regions[i].fd);
    }
    free(e->armed_writes);
    free(e->deferred);
    free(e->held);
    /* Closing a uffd also clears whatever protection is left in its process. */
    for (uint32_t i = 0; i < e->process_count; i++) {
        if (e->processes[i].uffd >= 0)
            close(e->processes[i].uffd);
        if (e->processes[i].pagemap >= 0)
            close(e->processes[i].pagemap);
    }
    if (e->stop_fd >= 0)
        close(e->stop_fd);
    if (e->file_watch >= 0)
        close(e->file_watch);
    while (e->overflow_head) {
        struct wp_overflow *o = e->overflow_head;
        e->overflow_head = o->next;
        free(o);
    }
    if (e->slot_data)
        munmap(e->slot_data, (size_t)e->slots * WP_PAGE_SIZE);
    free(e->slot_pages);
    free(e->residency);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->freed);
    free(e);
    return rc;
}
