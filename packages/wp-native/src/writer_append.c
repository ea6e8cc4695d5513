/*
 * Appending a batch's records (writer_internal.h): the file offset and the
 * index entries are taken under `lock`, then the bytes are written at that
 * offset outside it, so the writer and the compression thread append in
 * whatever order their batches are ready (the index says where each record
 * is). A stream (WP_WRITER_SEQUENTIAL: standard output) cannot seek: there
 * each batch takes its offset and is written under `append_lock`, one at a
 * time, in offset order, and a full non-blocking stream is waited for with
 * poll. No write starts once the writer is stopping (wp_writer_destroy may
 * already have returned). Also write-behind: file output past the kernel's
 * dirty limit is written back as it goes (wp_writer_set_write_behind).
 */
#define _GNU_SOURCE
#include "writer_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* A stream that is full (EAGAIN on a non-blocking fd): waits until it takes
 * more, or the writer is stopped. */
static bool wait_writable(wp_writer *w)
{
    struct pollfd p = {.fd = w->fd, .events = POLLOUT};
    while (!atomic_load(&w->stopping))
        if (poll(&p, 1, 100) != 0)
            return true;
    return false;
}

/* Writes iov in full at `at` (sequential: at the stream's position). */
static int write_all(wp_writer *w, struct iovec *iov, uint32_t left, uint64_t at)
{
    while (left > 0) {
        if (atomic_load(&w->stopping))
            return -ECANCELED;
        int n = left < IOV_MAX ? (int)left : IOV_MAX;
        ssize_t put = w->sequential ? writev(w->fd, iov, n) : pwritev(w->fd, iov, n, (off_t)at);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0 && errno == EAGAIN && w->sequential) {
            if (!wait_writable(w))
                return -ECANCELED;
            continue;
        }
        if (put <= 0)
            return put < 0 ? -errno : -EIO;
        at += (uint64_t)put;
        /* drop what went out; a partly written iovec keeps its rest */
        size_t done = (size_t)put;
        while (left > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            left--;
        }
        if (left > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

/* One number from a /proc file (after `key` in it, if given); 0 if none. */
static uint64_t proc_number(const char *path, const char *key)
{
    char text[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = 0;
    const char *at = key ? strstr(text, key) : text;
    return at ? strtoull(at + (key ? strlen(key) : 0), NULL, 10) : 0;
}

/* The dirty bytes past which the kernel throttles writers: vm.dirty_bytes,
 * else vm.dirty_ratio percent of MemAvailable (an estimate of the kernel's
 * "dirtyable" memory); WP_WRITER_BEHIND_FALLBACK_BYTES if unreadable. */
static uint64_t dirty_limit_bytes(void)
{
    uint64_t bytes = proc_number("/proc/sys/vm/dirty_bytes", NULL);
    if (bytes > 0)
        return bytes;
    uint64_t ratio = proc_number("/proc/sys/vm/dirty_ratio", NULL);
    uint64_t available_kib = proc_number("/proc/meminfo", "MemAvailable:");
    if (ratio == 0 || available_kib == 0)
        return WP_WRITER_BEHIND_FALLBACK_BYTES;
    return available_kib * 1024 / 100 * ratio;
}

void wp_writer_default_write_behind(wp_writer *w)
{
    wp_stats st;
    if (!w->sequential && wp_engine_stats(w->engine, &st) == 0 && st.pages_total * WP_PAGE_SIZE > dirty_limit_bytes()) {
        w->behind_lag = WP_WRITER_BEHIND_LAG;
        w->behind_step = WP_WRITER_BEHIND_STEP;
    }
}

int32_t wp_writer_set_write_behind(wp_writer *w, uint64_t lag_bytes, uint64_t step_bytes)
{
    if (!w)
        return -EINVAL;
    if (w->thread_started)
        return -EALREADY;
    if (w->sequential)
        return -ENOTSUP;
    if (lag_bytes > 0 && (step_bytes == 0 || step_bytes > lag_bytes))
        return -EINVAL;
    w->behind_lag = lag_bytes;
    w->behind_step = step_bytes;
    return 0;
}

/*
 * Write-behind (file output, wp_writer_set_write_behind). Once the file is
 * `lag` past the last mark, writeback starts for its bytes up to `lag` from
 * the end (sync_file_range: started, not waited for), and the range marked
 * one lag before is dropped from the page cache (POSIX_FADV_DONTNEED: only
 * pages already on disk go; any still dirty or in flight stay, so no data
 * is lost). A snapshot then takes about 2 x lag of page cache instead of
 * its file's size. Without it, a file larger than the kernel's dirty limit
 * has its writer throttled to the disk's buffered speed
 * (balance_dirty_pages) while pages are still protected, and takes new
 * memory for every page it writes: on a VM whose free memory goes back to
 * its host (free page reporting, as on this project's test machine) each
 * such page costs a host fault, and an 8 GiB guest's sweep took 21-24 s
 * instead of 6.5 s (docs/BENCHMARKS.md).
 */
static void write_behind(wp_writer *w, uint64_t end)
{
    uint64_t lag = w->behind_lag, step = w->behind_step;
    if (lag == 0)
        return;
    uint64_t from = atomic_load(&w->behind);
    if (end < from + lag + step)
        return;
    uint64_t to = (end - lag) / step * step;
    if (!atomic_compare_exchange_strong(&w->behind, &from, to))
        return; /* another thread took this step */
    /* Advice only: a file system without these calls keeps its pages cached. */
    (void)sync_file_range(w->fd, (off_t)from, (off_t)(to - from), SYNC_FILE_RANGE_WRITE);
    if (from >= lag)
        (void)posix_fadvise(w->fd, (off_t)(from - lag), (off_t)(to - from), POSIX_FADV_DONTNEED);
}

/* Appends b's encoded records: the offset and index entries under the
 * lock, the bytes outside it (sequential: under append_lock, so batches go
 * out in offset order). */
int wp_writer_append(wp_writer *w, struct batch *b)
{
    struct record_iov *enc = &b->enc;
    if (w->sequential)
        pthread_mutex_lock(&w->append_lock);
    pthread_mutex_lock(&w->lock);
    int rc = 0;
    if (w->index_count + enc->records > w->index_cap) {
        uint64_t cap = w->index_cap ? w->index_cap * 2 : 4096;
        while (cap < w->index_count + enc->records)
            cap *= 2;
        wp_writer_record *grown = realloc(w->index, cap * sizeof *grown);
        if (grown) {
            w->index = grown;
            w->index_cap = cap;
        } else {
            rc = -ENOMEM;
        }
    }
    uint64_t at = w->offset, end;
    for (uint32_t r = 0; rc == 0 && r < enc->records; r++) {
        const uint32_t *f = enc->fields + (size_t)r * WP_RECORD_BATCH_FIELDS;
        w->index[w->index_count++] = (wp_writer_record){
            .region = f[0], .page_count = f[3], .first_page = f[1] | (uint64_t)f[2] << 32, .file_offset = w->offset};
        w->offset += f[5];
    }
    end = w->offset;
    pthread_mutex_unlock(&w->lock);
    if (rc == 0) {
        rc = write_all(w, enc->iov, enc->count, at);
        if (rc < 0 && rc != -ECANCELED)
            wp_writer_fail(w, rc, WP_WRITER_FROM_FILE);
        else if (rc == 0)
            write_behind(w, end);
    } else {
        wp_writer_fail(w, rc, WP_WRITER_FROM_MEMORY);
    }
    if (w->sequential)
        pthread_mutex_unlock(&w->append_lock);
    if (rc == 0)
        atomic_fetch_add(&w->pages_written, b->n);
    return rc;
}
