/*
 * vmsnap_guest.h - the built-in demo guest: guest memory plus native writer
 * threads that play the vCPUs, timing each of their own writes.
 *
 * Used by `vmsnap demo` and the tests. Returns >= 0 or -errno like
 * vmsnap_wp.h. The writers talk to the host only through this handle.
 */
#ifndef VMSNAP_GUEST_H
#define VMSNAP_GUEST_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with -fvisibility=hidden: only this header is exported. */
#pragma GCC visibility push(default)

#define VG_MEM_ANON 0  /* private anonymous, 4 KiB pages */
#define VG_MEM_THP 1   /* private anonymous, MADV_HUGEPAGE */
#define VG_MEM_MEMFD 2 /* memfd (shmem), MAP_SHARED */
#define VG_MEM_HUGETLB 3      /* memfd MFD_HUGETLB (hugetlbfs, 2 MiB pages), MAP_SHARED */
#define VG_MEM_HUGETLB_ANON 4 /* private anonymous MAP_HUGETLB (2 MiB pages) */
#define VG_MEM_HUGETLB_1G 5   /* memfd MFD_HUGETLB with 1 GiB pages, MAP_SHARED */

#define VG_PHASES 4 /* latency histograms, selected with vg_set_phase */
/* Write latency histogram: 8 buckets per power of two; bucket b covers
 * [2^(b/8) * (1 + (b%8)/8)) ns upward to the next bucket. */
#define VG_HIST_BUCKETS 512

typedef struct vg_guest vg_guest;

/* Map size bytes of guest memory (page aligned; a multiple of the huge page
 * for the hugetlbfs kinds, which need free huge pages of that size:
 * vm.nr_hugepages, /sys/kernel/mm/hugepages) of the given VG_MEM_* kind. */
vg_guest *vg_create(uint64_t size, uint32_t kind, int32_t *err_out);
uint64_t vg_hva(vg_guest *g);
/* The memfd of a VG_MEM_MEMFD or VG_MEM_HUGETLB guest, -1 otherwise. */
int32_t vg_memfd(vg_guest *g);
/* Read one byte of every page of [hva, hva + size), in order: each missing
 * page faults in (restore benchmarks). Returns a checksum of what it read. */
uint64_t vg_touch(uint64_t hva, uint64_t size);
uint64_t vg_size(vg_guest *g);

/* Fill pages [first_page, first_page + pages) with half-compressible data. */
int32_t vg_fill(vg_guest *g, uint64_t first_page, uint64_t pages, uint64_t seed);

/* Pages the writers pick from (uniformly at random). Default: all. */
int32_t vg_set_target(vg_guest *g, uint64_t first_page, uint64_t pages);

/* Start `writers` threads writing 8 bytes to a random page each iteration,
 * at rate_pages_per_s in total (0: as fast as they can). */
int32_t vg_start(vg_guest *g, uint32_t writers, uint64_t rate_pages_per_s, uint64_t seed);

/* Latency and write counts go to histogram set `phase` from now on. */
int32_t vg_set_phase(vg_guest *g, uint32_t phase);

/* Pause every writer between two writes (returns once all are parked, or
 * -ETIMEDOUT after timeout_ms), and let them go again. */
int32_t vg_freeze(vg_guest *g, uint32_t timeout_ms);
int32_t vg_thaw(vg_guest *g);

/* Allocate the reference copy ahead of the freeze (optional). */
int32_t vg_prepare_reference(vg_guest *g);

/* While frozen: copy guest memory into the reference copy (pages not
 * resident stay zero there and are remembered as unpopulated at the cut). */
int32_t vg_take_reference(vg_guest *g);
uint64_t vg_reference_hva(vg_guest *g);

/* Pages unpopulated at the reference cut that are non-zero now. */
int64_t vg_count_written_unpopulated(vg_guest *g);

/* Summed histogram of phase into hist_out[VG_HIST_BUCKETS]; summary_out gets
 * {writes, max_ns, total_ns, phase_ns (wall time spent in that phase)}. */
int32_t vg_latency(vg_guest *g, uint32_t phase, uint64_t *hist_out, uint64_t *summary_out);

/* Stop and join the writers. */
int32_t vg_stop(vg_guest *g);
int32_t vg_destroy(vg_guest *g);

/* Plain anonymous mapping (a restore target) and comparison helpers. */
uint64_t vg_map(uint64_t size);
int32_t vg_unmap(uint64_t hva, uint64_t size);
/* First differing page index of two ranges, or -1 when equal. */
int64_t vg_compare(uint64_t hva_a, uint64_t hva_b, uint64_t size);

/* The floor of `bench --restore` (bare_restore.c): registers [hva, hva +
 * size) of this process (MISSING, fresh anonymous memory), serves each fault
 * with one 4 KiB UFFDIO_COPY from the raw image at image_hva (a polling
 * handler thread), and touches every page in order. hist_out gets the fault
 * service times (VG_BARE_HIST_BUCKETS, the restorer's buckets:
 * WP_RESTORE_HIST_BUCKETS, 8 per power of two); summary_out[4]: faults, max ns, touch ns, a checksum.
 * Returns 0 or -errno. */
#define VG_BARE_HIST_BUCKETS 256
int32_t vg_bare_restore(uint64_t hva, uint64_t size, uint64_t image_hva, uint64_t *hist_out, uint64_t *summary_out);
/* Copy len bytes at hva (this process) into dst. */
int32_t vg_read(uint8_t *dst, uint64_t hva, uint64_t len);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_GUEST_H */
