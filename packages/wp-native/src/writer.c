/*
 * The native writer (vmsnap_writer.h): its threads and life cycle. The
 * writer thread loops: take the engine's next batches (pool pages first,
 * then a sweep: wp_engine_next_batch), encode them as records
 * (record_encode_iov: raw blocks are written from the batch's own buffer,
 * not copied) and append them (writer_append.c). While pages are protected
 * the guest pays for every one not yet saved, so this loop never waits for
 * compression with WP_WRITER_AUTO: a batch is handed to the compression
 * thread only when that thread is idle, and that thread runs SCHED_IDLE, so
 * it only gets CPU no other thread wants.
 */
#define _GNU_SOURCE
#include "writer_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE WP_PAGE_SIZE
/* Engine batches gathered into one writer batch: at most this many calls,
 * each after the first with at least MIN_TAKE pages of room. The engine
 * often hands a few pool pages or a partly saved sweep window; one encode
 * and one pwritev per writer batch, not per engine batch. */
#define MAX_TAKES 16
#define MIN_TAKE 64
/* auto: the writer compresses a batch itself only when the guest has taken
 * no write fault for this long (a guest writing now and then still pays for
 * every unsaved page: a batch compressed inline holds the sweep ~10x as long
 * as a raw one). An idle guest gets every batch compressed. */
#define QUIET_NS 20000000ull
/* wp_writer_destroy waits this long for a thread stuck in a write. */
#define JOIN_WAIT_S 2
/* Nothing to take yet but pages are still landing in the pool: nap. */
#define IDLE_NAP_NS 50000L

_Static_assert(sizeof(wp_writer_record) == WP_WRITER_RECORD_BYTES, "wp_writer_record layout");

/* Drops a reference; the last one frees the writer. */
static void release(wp_writer *w);

static bool stopping(wp_writer *w)
{
    return atomic_load(&w->stopping);
}

/* Every thread stops: set under `lock` so no waiter misses it. */
static void stop_all(wp_writer *w)
{
    pthread_mutex_lock(&w->lock);
    atomic_store(&w->stopping, true);
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
}

void wp_writer_fail(wp_writer *w, int32_t err, uint64_t source)
{
    int64_t none = 0;
    if (atomic_compare_exchange_strong(&w->error, &none, err))
        atomic_store(&w->error_source, source);
    atomic_store(&w->state, WP_WRITER_FAILED);
    stop_all(w);
}

static void free_batch(struct batch *b)
{
    free(b->data);
    free(b->regions);
    free(b->pages);
    free(b->flags);
    free(b->enc.meta);
    free(b->enc.blocks);
    free(b->enc.iov);
    free(b->enc.fields);
}

static bool alloc_batch(struct batch *b, uint32_t n, bool lz4)
{
    b->data = aligned_alloc(PAGE, (size_t)n * PAGE);
    b->regions = malloc((size_t)n * sizeof *b->regions);
    b->pages = malloc((size_t)n * sizeof *b->pages);
    b->flags = malloc(n);
    b->enc.meta = malloc((size_t)n * (WP_RECORD_HEADER_BYTES + WP_RECORD_PAGES_ENTRY_BYTES));
    b->enc.blocks = lz4 ? malloc((size_t)n * PAGE) : NULL;
    b->enc.iov = malloc((size_t)2 * n * sizeof *b->enc.iov);
    b->enc.fields = malloc((size_t)n * WP_RECORD_BATCH_FIELDS * sizeof *b->enc.fields);
    return b->data && b->regions && b->pages && b->flags && b->enc.meta && (b->enc.blocks || !lz4) && b->enc.iov &&
           b->enc.fields;
}

wp_writer *wp_writer_create(wp_engine *e, int32_t fd, uint64_t offset, uint32_t batch_pages, uint32_t record_pages,
                            uint32_t compression, uint32_t buffers, uint32_t delay_us, uint32_t flags, int32_t *err_out)
{
    *err_out = -EINVAL;
    if (!e || fd < 0 || batch_pages == 0 || batch_pages > 16384 || record_pages == 0 ||
        record_pages > WP_RECORD_PAGES_MAX_PAGES || compression > WP_WRITER_AUTO || buffers < 2 || buffers > 64 ||
        (flags & ~WP_WRITER_SEQUENTIAL))
        return NULL;
    *err_out = -ENOMEM;
    wp_writer *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    /* Its own descriptor: the caller may close theirs while a write of ours is stuck. */
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) {
        *err_out = -errno;
        free(w);
        return NULL;
    }
    fd = own;
    *w = (wp_writer){.engine = e, .fd = fd, .batch_pages = batch_pages, .record_pages = record_pages,
                     .compression = compression, .delay_us = delay_us, .offset = offset,
                     .sequential = flags & WP_WRITER_SEQUENTIAL, .refs = 1};
    wp_writer_default_write_behind(w);
    pthread_mutex_init(&w->engine_lock, NULL);
    pthread_mutex_init(&w->append_lock, NULL);
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->changed, NULL);
    /* Without compression one batch is all the writer uses. */
    w->nbatches = compression == WP_WRITER_NONE ? 1 : buffers;
    w->batches = calloc(w->nbatches, sizeof *w->batches);
    if (!w->batches) {
        wp_writer_destroy(w);
        return NULL;
    }
    for (uint32_t i = 0; i < w->nbatches; i++) {
        if (!alloc_batch(&w->batches[i], batch_pages, compression != WP_WRITER_NONE)) {
            wp_writer_destroy(w);
            return NULL;
        }
        w->batches[i].next = w->free_list;
        w->free_list = &w->batches[i];
    }
    *err_out = 0;
    return w;
}

/* The engine's next batches, packed into b (see MAX_TAKES). */
static int32_t gather(wp_writer *w, struct batch *b)
{
    int32_t process;
    int32_t err = wp_engine_error(w->engine, &process); /* also notices a memory file changed through the file */
    if (err < 0)
        return err;
    uint32_t n = 0, packed = 0;
    for (int calls = 0; calls < MAX_TAKES && n < w->batch_pages && (calls == 0 || w->batch_pages - n >= MIN_TAKE);
         calls++) {
        int32_t got = wp_engine_next_batch(w->engine, b->data + (size_t)packed * PAGE, b->regions + n, b->pages + n,
                                           b->flags + n, w->batch_pages - n);
        if (got < 0)
            return got;
        if (got == 0)
            break;
        for (uint32_t i = n; i < n + (uint32_t)got; i++)
            packed += b->flags[i] != WP_PAGE_ZERO;
        n += (uint32_t)got;
    }
    b->n = n;
    return (int32_t)n;
}

static int encode_and_write(wp_writer *w, struct batch *b, bool lz4)
{
    int32_t rc = record_encode_iov(b->regions, b->pages, b->flags, b->n, b->data, w->record_pages, lz4, &b->enc);
    if (rc < 0) {
        wp_writer_fail(w, rc, WP_WRITER_FROM_FILE);
        return rc;
    }
    return wp_writer_append(w, b);
}

static void give_back(wp_writer *w, struct batch *b)
{
    pthread_mutex_lock(&w->lock);
    b->next = w->free_list;
    w->free_list = b;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
}

static void *compressor_main(void *arg)
{
    wp_writer *w = arg;
    if (w->compression == WP_WRITER_AUTO) {
        struct sched_param idle = {0};
        pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle); /* best effort: without it, still never waited for */
    }
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (!w->queue_head && !stopping(w))
            pthread_cond_wait(&w->changed, &w->lock);
        if (stopping(w))
            break;
        struct batch *b = w->queue_head;
        w->queue_head = b->next;
        if (!w->queue_head)
            w->queue_tail = NULL;
        w->compressing = true;
        pthread_mutex_unlock(&w->lock);
        bool ok = encode_and_write(w, b, true) == 0;
        if (ok)
            atomic_fetch_add(&w->batches_lz4, 1);
        pthread_mutex_lock(&w->lock);
        w->compressing = false;
        b->next = w->free_list;
        w->free_list = b;
        pthread_cond_broadcast(&w->changed);
    }
    pthread_mutex_unlock(&w->lock);
    release(w);
    return NULL;
}

/* A free batch, waiting while all are with the compression thread; NULL
 * once stopped. */
static struct batch *take_free(wp_writer *w)
{
    pthread_mutex_lock(&w->lock);
    while (!w->free_list && !stopping(w))
        pthread_cond_wait(&w->changed, &w->lock);
    struct batch *b = stopping(w) ? NULL : w->free_list;
    if (b)
        w->free_list = b->next;
    pthread_mutex_unlock(&w->lock);
    return b;
}

/* Hands b to the compression thread: with LZ4 always (queued), with AUTO
 * only when that thread is idle. False when the writer keeps b. */
static bool hand_over(wp_writer *w, struct batch *b)
{
    if (w->compression == WP_WRITER_NONE)
        return false;
    pthread_mutex_lock(&w->lock);
    bool take = w->compression == WP_WRITER_LZ4 || (!w->compressing && !w->queue_head);
    if (take) {
        b->next = NULL;
        if (w->queue_tail)
            w->queue_tail->next = b;
        else
            w->queue_head = b;
        w->queue_tail = b;
        pthread_cond_broadcast(&w->changed);
    }
    pthread_mutex_unlock(&w->lock);
    return take;
}

/* Every page taken: waits until the compression thread has written what it holds. */
static void drain(wp_writer *w)
{
    pthread_mutex_lock(&w->lock);
    while ((w->queue_head || w->compressing) && !stopping(w))
        pthread_cond_wait(&w->changed, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void nap(long ns)
{
    struct timespec t = {.tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L};
    nanosleep(&t, NULL);
}

/* Write faults the guest took so far (served, waited for a slot, or spurious). */
static uint64_t guest_faults(wp_engine *e)
{
    wp_stats s;
    wp_engine_stats(e, &s);
    return s.faults + s.faults_spurious + s.fallbacks;
}

/* The sweep's calls into the engine, under engine_lock, and never once the
 * writer is stopping (wp_writer_destroy sets that, then takes engine_lock
 * once: after that the engine can go while a write of ours is stuck): the
 * next batches into b; when there are none, whether every page is saved
 * (*done); with them, the guest's write faults so far (*faults).
 * -ECANCELED once the writer is being destroyed. */
static int32_t take_from_engine(wp_writer *w, struct batch *b, bool *done, uint64_t *faults)
{
    pthread_mutex_lock(&w->engine_lock);
    int32_t got = -ECANCELED;
    if (!stopping(w)) {
        got = gather(w, b);
        if (got == 0)
            *done = wp_engine_done(w->engine);
        if (got > 0 && w->compression == WP_WRITER_AUTO)
            *faults = guest_faults(w->engine);
    }
    pthread_mutex_unlock(&w->engine_lock);
    return got;
}

/* Every page is saved: nobody waits for the capture any more, so the
 * compression thread may have a normal share of CPU to finish its batch. */
static void compressor_to_normal_priority(wp_writer *w)
{
    if (w->compressor_started) {
        struct sched_param normal = {0};
        pthread_setschedparam(w->compressor, SCHED_OTHER, &normal);
    }
}

static void *writer_main(void *arg)
{
    wp_writer *w = arg;
    uint64_t faults_before = 0, faults = 0;
    uint64_t quiet_since = now_ns() - QUIET_NS; /* the last time the guest was seen to fault; an idle guest from the start */
    pthread_mutex_lock(&w->engine_lock);
    if (!stopping(w))
        faults_before = guest_faults(w->engine);
    pthread_mutex_unlock(&w->engine_lock);
    for (;;) {
        struct batch *b = take_free(w);
        if (!b)
            break;
        bool done = false;
        int32_t got = take_from_engine(w, b, &done, &faults);
        if (got < 0) {
            give_back(w, b);
            if (got != -ECANCELED)
                wp_writer_fail(w, got, WP_WRITER_FROM_ENGINE);
            break;
        }
        if (got == 0) {
            give_back(w, b);
            if (done) {
                compressor_to_normal_priority(w);
                drain(w);
                uint64_t running = WP_WRITER_RUNNING;
                atomic_compare_exchange_strong(&w->state, &running, WP_WRITER_DONE);
                break;
            }
            nap(IDLE_NAP_NS); /* pages the fault thread is saving are still landing */
            continue;
        }
        if (!hand_over(w, b)) {
            uint64_t now = now_ns();
            if (faults != faults_before)
                quiet_since = now;
            faults_before = faults;
            bool inline_lz4 = w->compression == WP_WRITER_AUTO && now - quiet_since >= QUIET_NS;
            int rc = encode_and_write(w, b, inline_lz4);
            give_back(w, b);
            if (rc < 0)
                break;
            atomic_fetch_add(inline_lz4 ? &w->batches_lz4_inline : &w->batches_raw, 1);
        }
        if (w->delay_us)
            nap((long)w->delay_us * 1000L);
    }
    release(w);
    return NULL;
}

/* Starts a thread holding a reference. */
static int start_thread(wp_writer *w, pthread_t *t, void *(*main)(void *), const char *name)
{
    atomic_fetch_add(&w->refs, 1);
    int rc = pthread_create(t, NULL, main, w);
    if (rc) {
        atomic_fetch_sub(&w->refs, 1);
        return -rc;
    }
    pthread_setname_np(*t, name);
    return 0;
}

int32_t wp_writer_start(wp_writer *w)
{
    if (w->thread_started)
        return -EALREADY;
    if (w->compression != WP_WRITER_NONE) {
        int rc = start_thread(w, &w->compressor, compressor_main, "vmsnap-lz4");
        if (rc)
            return rc;
        w->compressor_started = true;
    }
    int rc = start_thread(w, &w->thread, writer_main, "vmsnap-writer");
    if (rc)
        return rc;
    w->thread_started = true;
    return 0;
}

int32_t wp_writer_poll(wp_writer *w, wp_writer_stats *out)
{
    memset(out, 0, sizeof *out);
    out->state = atomic_load(&w->state);
    out->error = atomic_load(&w->error);
    out->error_source = atomic_load(&w->error_source);
    wp_stats engine;
    wp_engine_stats(w->engine, &engine);
    out->pages_saved = engine.pages_saved;
    out->pages_written = atomic_load(&w->pages_written);
    out->batches_raw = atomic_load(&w->batches_raw);
    out->batches_lz4 = atomic_load(&w->batches_lz4);
    out->batches_lz4_inline = atomic_load(&w->batches_lz4_inline);
    pthread_mutex_lock(&w->lock);
    out->end_offset = w->offset;
    out->records = w->index_count;
    pthread_mutex_unlock(&w->lock);
    return 0;
}

int64_t wp_writer_index(wp_writer *w, wp_writer_record *out, uint64_t cap)
{
    pthread_mutex_lock(&w->lock);
    uint64_t n = w->index_count;
    if (cap > 0)
        memcpy(out, w->index, (size_t)(n < cap ? n : cap) * sizeof *out);
    pthread_mutex_unlock(&w->lock);
    return (int64_t)n;
}

static void free_writer(wp_writer *w)
{
    for (uint32_t i = 0; w->batches && i < w->nbatches; i++)
        free_batch(&w->batches[i]);
    free(w->batches);
    free(w->index);
    if (w->fd >= 0)
        close(w->fd);
    pthread_cond_destroy(&w->changed);
    pthread_mutex_destroy(&w->lock);
    pthread_mutex_destroy(&w->append_lock);
    pthread_mutex_destroy(&w->engine_lock);
    free(w);
}

static void release(wp_writer *w)
{
    if (atomic_fetch_sub(&w->refs, 1) == 1)
        free_writer(w);
}

/* Waits for a thread up to JOIN_WAIT_S seconds; one still writing then is
 * left to finish on its own (it holds a reference). */
static void join_or_leave(pthread_t t)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += JOIN_WAIT_S;
    if (pthread_timedjoin_np(t, NULL, &until) != 0)
        pthread_detach(t);
}

int32_t wp_writer_destroy(wp_writer *w)
{
    if (!w)
        return 0;
    stop_all(w);
    /* The sweep checks `stopping` under engine_lock: once we have held it, no
     * thread of ours calls the engine again, and the caller may destroy it. */
    pthread_mutex_lock(&w->engine_lock);
    pthread_mutex_unlock(&w->engine_lock);
    compressor_to_normal_priority(w); /* SCHED_IDLE may get no CPU on a busy machine */
    if (w->thread_started)
        join_or_leave(w->thread);
    if (w->compressor_started)
        join_or_leave(w->compressor);
    release(w);
    return 0;
}
