/*
 * vmsnap_writer.h - the native snapshot writer: a thread that takes an
 * engine's captured pages (wp_engine_next_batch), encodes them as records
 * (vmsnap_record.h, docs/format.md) and appends them to a file with
 * pwritev, without returning to its caller per batch (issue 14: in Node
 * the per-batch turn cost more CPU than the copies and the compression).
 *
 * Prefix: wp_writer_. One opaque handle per snapshot. Functions return >= 0
 * on success and -errno on failure. No globals, no printing.
 *
 * Life cycle: wp_writer_create (after wp_engine_protect) -> wp_writer_start
 * -> wp_writer_poll until it says done or failed -> wp_writer_index (the
 * records, for the file's index) -> wp_writer_destroy (always, and before
 * wp_engine_destroy and before the file is closed).
 *
 * Memory: `buffers` batches of batch_pages pages, each about
 * 2 x batch_pages x 4 KiB (data, and lz4 blocks), allocated at create and
 * reused; plus the index, 24 bytes per record.
 */
#ifndef VMSNAP_WRITER_H
#define VMSNAP_WRITER_H

#include <stdint.h>

#include "vmsnap_engine.h"

#ifdef __cplusplus
extern "C" {
#endif

#pragma GCC visibility push(default)

/* Compression of data records (wp_writer_create). */
#define WP_WRITER_NONE 0 /* raw blocks */
#define WP_WRITER_LZ4 1  /* every batch compressed, by one extra thread; the sweep waits for it when it is behind */
/* Compressed only with CPU nobody else wants, never waited for: a batch
 * goes to the compression thread (SCHED_IDLE) when it is idle; else the
 * writer compresses it itself if the guest has taken no write fault for
 * 20 ms; else it is written raw. */
#define WP_WRITER_AUTO 2

/* Flags (wp_writer_create): fd is a stream (a pipe, a socket: standard
 * output): batches are written with writev, strictly in order, one at a
 * time, and a non-blocking fd that is full is waited for (poll). */
#define WP_WRITER_SEQUENTIAL 1u

/* What wp_writer_poll reports. */
#define WP_WRITER_RUNNING 0
#define WP_WRITER_DONE 1   /* every page saved and written */
#define WP_WRITER_FAILED 2 /* see error and error_source */

#define WP_WRITER_FROM_ENGINE 1 /* wp_engine_next_batch failed: wp_engine_error says why */
#define WP_WRITER_FROM_FILE 2   /* a pwritev failed (-ENOSPC, -EIO, ...) */
#define WP_WRITER_FROM_MEMORY 3 /* the index could not grow (-ENOMEM) */

typedef struct wp_writer_stats {
    uint64_t state;         /* WP_WRITER_* */
    int64_t error;          /* -errno of the first failure, 0 if none */
    uint64_t error_source;  /* WP_WRITER_FROM_*, 0 if none */
    uint64_t pages_saved;   /* the engine's pages_saved (captured, no longer protected): for progress */
    uint64_t pages_written; /* pages whose records are written */
    uint64_t end_offset;    /* the file's next free byte (records end here) */
    uint64_t records;
    uint64_t batches_raw;
    uint64_t batches_lz4;        /* compressed by the compression thread */
    uint64_t batches_lz4_inline; /* compressed by the writer (auto: no write fault meanwhile) */
} wp_writer_stats;

/* One record of the index (wp_writer_index), in file order: 24 bytes, the
 * layout of an index entry of the file (docs/format.md). */
#define WP_WRITER_RECORD_BYTES 24u
typedef struct wp_writer_record {
    uint32_t region;
    uint32_t page_count;
    uint64_t first_page;
    uint64_t file_offset;
} wp_writer_record;

typedef struct wp_writer wp_writer;

/* A writer of engine e's pages into fd from byte `offset` on (the file's
 * header is before it; with WP_WRITER_SEQUENTIAL, the stream's position
 * now). batch_pages: pages per batch (1..16384; at least a huge page, 512,
 * with hugetlbfs regions); record_pages: pages per data record (1..256);
 * compression: WP_WRITER_NONE/LZ4/AUTO; buffers: batches in flight
 * (2..64); delay_us: sleep after each batch (tests of the fallback; 0);
 * flags: WP_WRITER_SEQUENTIAL or 0. The writer writes through its own
 * duplicate of fd (the caller's is neither closed nor written after
 * wp_writer_destroy). NULL and *err_out = -EINVAL, -ENOMEM or -EBADF. */
wp_writer *wp_writer_create(wp_engine *e, int32_t fd, uint64_t offset, uint32_t batch_pages, uint32_t record_pages,
                            uint32_t compression, uint32_t buffers, uint32_t delay_us, uint32_t flags, int32_t *err_out);

/* Write-behind, for file output: once the file is lag_bytes past the last
 * mark, writeback starts for its bytes up to lag_bytes from its end, in
 * steps of step_bytes, and the range marked one lag before is dropped from
 * the page cache (only pages already on disk; nothing is lost). lag_bytes 0
 * turns it off. wp_writer_create turns it on (lag 256 MiB, step 64 MiB)
 * when the regions hold more than the kernel lets be dirty before it
 * throttles writers (vm.dirty_bytes, else vm.dirty_ratio of MemAvailable;
 * 2 GiB if those cannot be read), and off for a stream. Before
 * wp_writer_start: -EALREADY after it, -EINVAL for a step of 0 or over lag,
 * -ENOTSUP on a stream. */
int32_t wp_writer_set_write_behind(wp_writer *w, uint64_t lag_bytes, uint64_t step_bytes);

/* Starts the writer thread ("vmsnap-writer"; with compression, also
 * "vmsnap-lz4"). -EALREADY if started. */
int32_t wp_writer_start(wp_writer *w);

/* Its state and counters into *out. */
int32_t wp_writer_poll(wp_writer *w, wp_writer_stats *out);

/* Copies up to cap records of the index into out; returns how many there
 * are in all (call with cap 0 to size). Complete once the writer is done. */
int64_t wp_writer_index(wp_writer *w, wp_writer_record *out, uint64_t cap);

/* Stops the threads and frees the writer; what it wrote stays in the file.
 * When it returns no thread of the writer calls the engine again, so the
 * engine may be destroyed (which removes every protection). A thread stuck
 * in a write (a stream nobody reads, a hung file system) is waited for 2 s
 * at most, then left to finish on its own: it writes nothing more, and
 * frees the writer when its write returns. */
int32_t wp_writer_destroy(wp_writer *w);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_WRITER_H */
