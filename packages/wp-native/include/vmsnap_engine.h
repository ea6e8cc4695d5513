/*
 * vmsnap_engine.h - live write-protect snapshot engine (userfaultfd-wp).
 *
 * Prefix: wp_ / WP_. The lazy restorer is in vmsnap_restore.h (wp_restore*),
 * the agent's socket helpers in vmsnap_transport.h (wp_transport_*).
 *
 * One opaque handle (wp_engine) per snapshot. Every function returns >= 0
 * (0 or a count) on success and -errno on failure, unless documented
 * otherwise. Addresses are host-virtual addresses (hva) as uint64_t; page
 * indices are relative to their region. Buffers are owned by the caller and
 * filled in place. No globals, no printing, no callbacks.
 *
 * Life cycle:
 *   wp_engine_create -> wp_engine_add_region (x N) -> wp_engine_start
 *   -> wp_engine_protect (the cut; caller pauses its vCPUs around it)
 *   -> wp_engine_next_batch until wp_engine_done
 *   -> wp_engine_destroy (always: removes all protection first).
 */
#ifndef VMSNAP_ENGINE_H
#define VMSNAP_ENGINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with -fvisibility=hidden: only the public headers'
 * declarations are exported. */
#pragma GCC visibility push(default)

#define WP_ABI_VERSION 7
#define WP_PAGE_SIZE 4096u

/* userfaultfd feature bits reported by wp_probe (kernel UFFD_FEATURE_*). */
#define WP_FEATURE_PAGEFAULT_FLAG_WP (1ull << 0)   /* Linux 5.7 */
#define WP_FEATURE_WP_HUGETLBFS_SHMEM (1ull << 12) /* Linux 5.19 */
#define WP_FEATURE_WP_UNPOPULATED (1ull << 13)     /* Linux 6.4 */
#define WP_FEATURE_WP_ASYNC (1ull << 15)           /* Linux 6.7 */
#define WP_FEATURE_MOVE (1ull << 16)               /* Linux 6.8 */

/* How wp_probe opened its userfaultfd (written to *open_path_out). */
#define WP_OPEN_SYSCALL 1
#define WP_OPEN_DEVICE 2

/* Flags of one captured page (wp_engine_next_batch's flags_out). */
#define WP_PAGE_DATA 0 /* content copied into the caller's buffer */
#define WP_PAGE_ZERO 1 /* all zero (or never populated): nothing copied */

/* Counters; read with wp_engine_stats. All in one plain struct of u64. */
/* Fault service time histogram: bucket 2k holds [2^k, 1.5 * 2^k) ns and
 * bucket 2k + 1 holds [1.5 * 2^k, 2^(k+1)) ns. */
#define WP_HIST_BUCKETS 64
typedef struct wp_stats {
    uint64_t faults;           /* write faults served by copying the page (a whole huge page for hugetlbfs) */
    uint64_t faults_spurious;  /* faults on a page already saved (woken only) */
    uint64_t fallbacks;        /* faults that waited for a free pool slot */
    uint64_t fallback_ns;      /* total time spent waiting in fallbacks */
    uint64_t overflow_pages;   /* slots allocated past the pool after a long fallback */
    uint64_t pool_slots;       /* pool capacity in pages */
    uint64_t pool_high_water;  /* most slots ever in use at once */
    uint64_t pool_used;        /* slots in use now */
    uint64_t pages_total;      /* pages in all regions */
    uint64_t pages_saved;      /* pages captured (by fault thread or sweep) */
    uint64_t pages_swept;      /* pages captured by the sweep */
    uint64_t pages_zero;       /* swept pages found zero or unpopulated */
    uint64_t fault_ns_max;     /* slowest fault service */
    uint64_t fault_ns_total;   /* sum of fault service times */
    uint64_t pages_fault_around; /* neighbours saved along with a faulting page */
    uint64_t arm_faults;       /* writes let through while armed (before the cut) */
    uint64_t cut_pages;        /* pages re-protected at the cut (written since arming) */
    uint64_t pages_steered;    /* pages swept where the guest had just faulted */
    uint64_t pages_discarded;  /* discarded by the guest before saved, content lost (-ENODATA) */
    uint64_t hist[WP_HIST_BUCKETS];
} wp_stats;

typedef struct wp_engine wp_engine;

/* ABI version of the loaded library; bindings refuse a mismatch. */
int32_t wp_abi_version(void);

/* Probe the kernel on a throw-away userfaultfd (UFFDIO_API may be issued only
 * once per fd). Writes the offered feature bits and how the fd was opened.
 * -EPERM: userfaultfd denied (see vm.unprivileged_userfaultfd, /dev/userfaultfd);
 * -ENOSYS: kernel built without userfaultfd. */
int32_t wp_probe(uint64_t *features_out, int32_t *open_path_out);

/* Create an engine with a pool of pool_slots 4 KiB slots (0 = synchronous:
 * every faulting writer waits for the writer to take its page). A huge page
 * goes through the pool as its 4 KiB pages, so the pool bounds memory
 * whatever the page size; a pool smaller than a huge page (512 slots for
 * 2 MiB, 262144 for 1 GiB) makes every such fault wait for the writer (a
 * fallback).
 * Returns NULL and sets *err_out to -errno on failure. */
wp_engine *wp_engine_create(uint32_t pool_slots, int32_t *err_out);

/* Register [hva, hva + size) of this process for write-protect: a region
 * read through that same mapping (shared file memory: through its file, as
 * for wp_engine_add_shared_region). hva and size must be page aligned.
 * Returns the region index. Must be called before wp_engine_start. */
int32_t wp_engine_add_region(wp_engine *e, uint64_t hva, uint64_t size);

/* Other processes (a VMM, a device process): the translation-table model.
 * A region is guest memory; each process that maps it has its own uffd and
 * host-virtual base. A page is protected in every mapping at the cut and,
 * once saved, unprotected in every mapping.
 *
 * wp_uffd_negotiate: issue UFFDIO_API on a userfaultfd received from another
 * process (once per uffd, so its creator must not have): -EINVAL if it is
 * not a uffd or its API was already issued.
 *
 * wp_engine_add_process: adopt such a negotiated userfaultfd, created by
 * process `pid`; the engine keeps a dup of it. Returns the process index
 * (0 is this process).
 *
 * wp_engine_add_shared_region: a region of `size` bytes, read through this
 * process's mapping at view_hva (e.g. an mmap of the guest memfd), or with
 * view_hva 0 through process_vm_readv of its first mapping. When the view is
 * a shared file mapping (memfd, shmem) the engine reads that file with
 * pread instead, never the mapping (a file that shrinks gives an error, not
 * SIGBUS), skips its holes, and tells discarded pages whose data survived;
 * -ENXIO if the file is shorter than the region. Returns its index.
 *
 * wp_engine_map_region: `process` maps `region` at `hva`; registers it for
 * write-protect on that process's uffd. Returns the mapping index;
 * -EFAULT if nothing is mapped at hva. The region's page size is the
 * mapping's real one (KernelPageSize in /proc/PID/smaps), never a caller's
 * belief: hugetlbfs memory (2 MiB or 1 GiB pages) is protected, saved and
 * unprotected in whole huge pages, and a write fault on one holds its
 * writer until all of its 4 KiB pages are copied (into the pool, in chunks
 * as slots free up). -EINVAL if hva or the region's size is not a multiple
 * of that page size, or another process maps the region with another one.
 * Nothing is protected when it fails.
 *
 * All three must be called before wp_engine_start. */
int32_t wp_uffd_negotiate(int32_t uffd);
int32_t wp_engine_add_process(wp_engine *e, int32_t uffd, int32_t pid);
int32_t wp_engine_add_shared_region(wp_engine *e, uint64_t view_hva, uint64_t size);
int32_t wp_engine_map_region(wp_engine *e, uint32_t region, uint32_t process, uint64_t hva);

/* The first failure seen by the fault thread or the sweep (-errno), 0 if
 * none; *process_out gets the process index it concerns, or -1. A failed
 * process is skipped from then on, so the others keep running unprotected.
 *   -ESRCH (or -ENOMEM): a process exited mid-snapshot;
 *   -ENODATA: the guest discarded pages (MADV_DONTNEED, MADV_REMOVE) before
 *             they were saved and their content at the cut is gone
 *             (wp_stats.pages_discarded says how many);
 *   -EFAULT:  guest memory was unmapped or moved (munmap, mremap);
 *   -EIO:     guest memory could not be read (its file shrank). */
int32_t wp_engine_error(wp_engine *e, int32_t *process_out);

/* Fault-around window in pages (a power of two, 1..512; default 1 = off):
 * after serving a write fault, also save the not-yet-saved pages of the
 * aligned window around it, as far as the pool has free slots. Ignored in
 * synchronous mode. Must be called before wp_engine_start. */
int32_t wp_engine_set_fault_around(wp_engine *e, uint32_t pages);

/* Start the fault-service thread. */
int32_t wp_engine_start(wp_engine *e);

/* Optional, while the guest runs: write-protect every region ahead of the
 * cut. Until wp_engine_protect, a write fault only notes its page and lets
 * the writer go. Makes the cut's pause independent of guest size. */
int32_t wp_engine_arm(wp_engine *e);

/* The cut (the caller's vCPUs are paused): without arming, write-protect
 * every registered region, including pages never populated; after
 * wp_engine_arm, re-protect only the pages written since arming. From here
 * on every page is captured with its content now. */
int32_t wp_engine_protect(wp_engine *e);

/* The writer's next batch of up to max_pages captured pages (at most 16384
 * per call). The engine decides what comes next: first pages the fault
 * thread saved into the pool, oldest first; else it sweeps a run of
 * not-yet-saved pages (where the guest last faulted, unless steering is off,
 * else the next run in address order), captures them and unprotects them.
 * Entry i is page pages_out[i] of region regions_out[i] with flag
 * flags_out[i] (WP_PAGE_DATA or WP_PAGE_ZERO); the contents of the DATA
 * entries are packed into buf (max_pages * 4096 bytes) in entry order.
 * Entries are 4 KiB pages whatever the region's page size. A sweep takes
 * whole huge pages; one larger than max_pages is taken over several calls
 * (it stays protected, its writers blocked, until the last), so batches of
 * at least one huge page (512 for 2 MiB) are better.
 * Returns the number of entries; 0 when nothing is left to sweep right now
 * (pages the fault thread is saving may still arrive: loop until
 * wp_engine_done); -errno after a failure (see wp_engine_error). Call from
 * one thread at a time. */
int32_t wp_engine_next_batch(wp_engine *e, uint8_t *buf, uint32_t *regions_out, uint64_t *pages_out,
                             uint8_t *flags_out, uint32_t max_pages);

/* Steering (default on): the sweep goes first where the guest last took a
 * write fault, so the guest meets saved pages instead of faulting on each;
 * off: front to back. Must be called before wp_engine_start. */
int32_t wp_engine_set_steering(wp_engine *e, int32_t on);

/* 1 when every page is saved and the pool is empty, else 0. */
int32_t wp_engine_done(wp_engine *e);

/* Copy the counters into *out. */
int32_t wp_engine_stats(wp_engine *e, wp_stats *out);

/* Remove write protection from every region (wakes every waiting writer).
 * Safe to call at any time and more than once. */
int32_t wp_engine_unprotect_all(wp_engine *e);

/* Stop the fault thread, remove all protection, unregister, close, free. */
int32_t wp_engine_destroy(wp_engine *e);

/* Rebuild transparent huge pages that 4 KiB unprotects split (MADV_COLLAPSE,
 * Linux 6.1+) in [hva, hva + size) of process pid (0: this one, else through
 * process_madvise). Call it once the range is no longer registered. */
int32_t wp_collapse(int32_t pid, uint64_t hva, uint64_t size);

/* Copy len bytes from src to the host-virtual address hva of this process
 * (eager restore into a live region). */
int32_t wp_copy_to_hva(uint64_t hva, const uint8_t *src, uint64_t len);

/* Copy len bytes from hva of this process to dst. */
int32_t wp_copy_from_hva(uint8_t *dst, uint64_t hva, uint64_t len);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_ENGINE_H */
