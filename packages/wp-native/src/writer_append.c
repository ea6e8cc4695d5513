/*
 * Appending a batch's records (writer_internal.h): the file offset and the
 * index entries are taken under `lock`, then the bytes are written at that
 * offset outside it, so the writer and the compression thread append in
 * whatever order their batches are ready (the index says where each record
 * is). A stream (WP_WRITER_SEQUENTIAL: standard output) cannot seek: there
 * each batch takes its offset and is written under `append_lock`, one at a
 * time, in offset order, and a full non-blocking stream is waited for with
 * poll. No write starts once the writer is stopping (wp_writer_destroy may
 * already have returned).
 */
#define _GNU_SOURCE
#include "writer_internal.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
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
    uint64_t at = w->offset;
    for (uint32_t r = 0; rc == 0 && r < enc->records; r++) {
        const uint32_t *f = enc->fields + (size_t)r * WP_RECORD_BATCH_FIELDS;
        w->index[w->index_count++] = (wp_writer_record){
            .region = f[0], .page_count = f[3], .first_page = f[1] | (uint64_t)f[2] << 32, .file_offset = w->offset};
        w->offset += f[5];
    }
    pthread_mutex_unlock(&w->lock);
    if (rc == 0) {
        rc = write_all(w, enc->iov, enc->count, at);
        if (rc < 0 && rc != -ECANCELED)
            wp_writer_fail(w, rc, WP_WRITER_FROM_FILE);
    } else {
        wp_writer_fail(w, rc, WP_WRITER_FROM_MEMORY);
    }
    if (w->sequential)
        pthread_mutex_unlock(&w->append_lock);
    if (rc == 0)
        atomic_fetch_add(&w->pages_written, b->n);
    return rc;
}
