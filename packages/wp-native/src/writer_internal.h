/*
 * Internal: the native writer's state (vmsnap_writer.h), shared by writer.c
 * (its threads, the sweep's calls into the engine, life cycle) and
 * writer_append.c (appending a batch's records to the file or stream).
 */
#ifndef VMSNAP_WP_WRITER_INTERNAL_H
#define VMSNAP_WP_WRITER_INTERNAL_H

#include "record.h"
#include "vmsnap_writer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Write-behind (wp_writer_set_write_behind) by default: its lag and step,
 * and the size above which it is on when the kernel's dirty limit cannot
 * be read. */
#define WP_WRITER_BEHIND_LAG (256ull << 20)
#define WP_WRITER_BEHIND_STEP (64ull << 20)
#define WP_WRITER_BEHIND_FALLBACK_BYTES (2ull << 30)

struct batch {
    uint8_t *data; /* the data pages, packed (batch_pages x 4 KiB) */
    uint32_t *regions;
    uint64_t *pages;
    uint8_t *flags;
    uint32_t n;
    struct record_iov enc;
    struct batch *next; /* free list or compression queue */
};

struct wp_writer {
    wp_engine *engine;
    int fd;
    uint32_t batch_pages, record_pages, compression, delay_us, nbatches;
    struct batch *batches;
    pthread_t thread, compressor;
    bool thread_started, compressor_started;

    bool sequential;             /* WP_WRITER_SEQUENTIAL */
    pthread_mutex_t append_lock; /* sequential: one batch written at a time, in offset order */

    /* Threads and the owner each hold a reference; the last one frees the
     * writer. A thread stuck in a write (a stream nobody reads, a hung
     * file system) is not waited for by wp_writer_destroy: it frees the
     * writer when its write returns, or never (the writer's memory stays). */
    _Atomic int refs;
    /* wp_writer_destroy or a failure: set under `lock` (its waits read it
     * there); no write and no engine call starts once it is seen. */
    _Atomic bool stopping;
    pthread_mutex_t engine_lock; /* the sweep thread holds it in every engine call */

    pthread_mutex_t lock; /* everything below up to the counters */
    pthread_cond_t changed;
    struct batch *free_list, *queue_head, *queue_tail;
    bool compressing; /* the compression thread holds a batch */
    uint64_t offset;
    wp_writer_record *index;
    uint64_t index_count, index_cap;

    /* Write-behind (writer_append.c): lag 0 is off; `behind` is how far
     * writeback has been started. */
    uint64_t behind_lag, behind_step;
    _Atomic uint64_t behind;

    _Atomic uint64_t state;
    _Atomic int64_t error;
    _Atomic uint64_t error_source;
    _Atomic uint64_t pages_written, batches_raw, batches_lz4, batches_lz4_inline;
};

/* The first failure (-errno, WP_WRITER_FROM_*) ends the writer: its state
 * becomes FAILED and every thread stops. */
void wp_writer_fail(wp_writer *w, int32_t err, uint64_t source);

/* Appends b's encoded records (b->enc): their file offset and index
 * entries, then their bytes. 0, or -errno after wp_writer_fail (-ECANCELED:
 * the writer is stopping, nothing failed). */
int wp_writer_append(wp_writer *w, struct batch *b);

/* wp_writer_create's choice of write-behind: on (WP_WRITER_BEHIND_LAG and
 * _STEP) for file output of regions larger than the kernel's dirty limit. */
void wp_writer_default_write_behind(wp_writer *w);

#endif
