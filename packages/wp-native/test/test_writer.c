/*
 * The native writer (vmsnap_writer.h) against the real kernel: host threads
 * write random pages of a 32 MiB region all along; at the cut they pause, a
 * reference copy is taken, the region is protected and they go on writing
 * while the writer saves it into a real file. Every record the writer's
 * index lists is then read back with the one decoder (wp_record_check,
 * wp_record_decode) and must equal the reference, page for page, and the
 * records must cover every page exactly once: for each compression mode.
 * The same through a stream (WP_WRITER_SEQUENTIAL: a non-blocking pipe
 * drained slowly): its bytes must be the records in offset order.
 * Then the failure paths: a full disk (/dev/full: -ENOSPC, from the file)
 * must stop the writer with the cause, and destroying engine and writer
 * must let every guest writer finish (no guest left blocked); also when
 * the writer is stuck in a write to a stream nobody reads. And write-behind
 * (wp_writer_set_write_behind) with a lag of a few pages, so that writeback
 * and page-cache drops run all through the snapshot: the file must still
 * equal the reference; how much of it stayed cached is printed, not
 * checked (it depends on how fast the disk writes back: the writer waits
 * 2 ms after each batch there, to give it time).
 * Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "vmsnap_record.h"
#include "vmsnap_writer.h"
#include "wp_test.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE WP_PAGE_SIZE
#define PAGES 8192u /* 32 MiB */
#define WRITERS 2
#define HEADER 4096u /* where the records start: a file's header goes before */

static uint8_t *mem;
static _Atomic int phase; /* 0 write, 1 pause (for the cut), 2 stop */
static _Atomic int paused;
static _Atomic uint64_t writes;
static _Atomic size_t stream_expect; /* a stream's writer is done: this many bytes come (its own copy of the fd stays open) */
static int writers = WRITERS; /* guest threads of the next snapshot */
static uint64_t behind_lag;   /* write-behind of the next snapshot: lag bytes (step a quarter), 0 the default */
static size_t cached_pages, file_pages; /* with write-behind: the file's pages in the page cache when the writer was done */

/* How many of the first `len` bytes' pages of fd are in the page cache. */
static size_t pages_cached(int fd, size_t len)
{
    size_t n = 0, pages = (len + PAGE - 1) / PAGE;
    unsigned char *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    unsigned char *vec = malloc(pages);
    if (map != MAP_FAILED && vec && mincore(map, len, vec) == 0)
        for (size_t i = 0; i < pages; i++)
            n += vec[i] & 1;
    if (map != MAP_FAILED)
        munmap(map, len);
    free(vec);
    return n;
}

static void *guest(void *arg)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
    for (;;) {
        int p = atomic_load(&phase);
        if (p == 2)
            return NULL;
        if (p == 1) {
            atomic_fetch_add(&paused, 1);
            while (atomic_load(&phase) == 1)
                ;
            atomic_fetch_sub(&paused, 1);
            continue;
        }
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t page = x % PAGES;
        if (page % 7 == 0) /* leave every 7th page zero, for zero records */
            continue;
        ((volatile uint64_t *)(mem + page * PAGE))[x % 512] = x;
        atomic_fetch_add(&writes, 1);
    }
}

static void fill(void)
{
    for (uint64_t p = 0; p < PAGES; p++) {
        if (p % 7 == 0)
            memset(mem + p * PAGE, 0, PAGE);
        else if (p % 3 == 0) /* compressible */
            memset(mem + p * PAGE, (int)(p & 0xff) | 1, PAGE);
        else
            for (uint64_t i = 0; i < PAGE / 8; i++)
                ((uint64_t *)(mem + p * PAGE))[i] = p * 0x100000001b3ull ^ i * 0x9E3779B97F4A7C15ull;
    }
}

/* Reads back every record the index lists; 0 when they are the reference exactly, once per page. */
static int check_file(int fd, const wp_writer_record *index, int64_t records, const uint8_t *reference, uint64_t end)
{
    wp_record_codec *codec = wp_record_codec_create();
    uint8_t *seen = calloc(PAGES, 1);
    uint8_t *out = malloc((size_t)WP_RECORD_PAGES_MAX_PAGES * PAGE);
    uint8_t *payload = malloc(WP_RECORD_PAGES_BOUND(WP_RECORD_PAGES_MAX_PAGES));
    int rc = 0;
    for (int64_t r = 0; r < records && rc == 0; r++) {
        const wp_writer_record *x = &index[r];
        uint8_t h[WP_RECORD_HEADER_BYTES];
        uint32_t info[2];
        if (x->region != 0 || x->first_page + x->page_count > PAGES || x->file_offset < HEADER ||
            pread(fd, h, sizeof h, (off_t)x->file_offset) != (ssize_t)sizeof h ||
            wp_record_check(h, 0, x->first_page, x->page_count, info) < 0 ||
            x->file_offset + sizeof h + info[0] > end ||
            pread(fd, payload, info[0], (off_t)(x->file_offset + sizeof h)) != (ssize_t)info[0]) {
            rc = wp_test_fail("a record the index lists does not check", (long)r);
            break;
        }
        uint32_t why = 0;
        int enc = wp_record_decode(codec, h, payload, info[0], out, (uint64_t)x->page_count * PAGE, &why);
        if (enc < 0 || (enc != WP_RECORD_PAGES && enc != WP_RECORD_ZERO)) {
            rc = wp_test_fail("record decode", enc < 0 ? enc : -EPROTO);
            break;
        }
        for (uint32_t k = 0; k < x->page_count; k++) {
            uint64_t p = x->first_page + k;
            static const uint8_t zero[PAGE];
            const uint8_t *got = enc == WP_RECORD_ZERO ? zero : out + (size_t)k * PAGE;
            if (seen[p]++) {
                rc = wp_test_fail("a page is in two records", (long)p);
                break;
            }
            if (memcmp(got, reference + p * PAGE, PAGE)) {
                rc = wp_test_fail("a page differs from its content at the cut", (long)p);
                break;
            }
        }
    }
    for (uint64_t p = 0; p < PAGES && rc == 0; p++)
        if (!seen[p])
            rc = wp_test_fail("a page is in no record", (long)p);
    free(seen);
    free(out);
    free(payload);
    wp_record_codec_destroy(codec);
    return rc;
}

/* One snapshot while the guest writes: the writer into fd (compression c,
 * pool pool_slots, flags). Returns 0, 1 (failed), or with expect_error the
 * writer must fail with it, from the file. The records are checked in fd,
 * or in the file readback() returns (a stream's bytes, laid in a file). */
static int snapshot(int fd, uint32_t c, uint32_t pool_slots, int32_t expect_error, wp_writer_stats *st_out, uint32_t flags,
                    int (*readback)(void))
{
    int32_t err;
    wp_engine *e = wp_engine_create(pool_slots, &err);
    if (!e)
        return wp_test_fail("wp_engine_create", err);
    int rc;
    if ((rc = wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, (uint64_t)PAGES * PAGE)) < 0 ||
        (rc = wp_engine_set_fault_around(e, 8)) < 0 || (rc = wp_engine_start(e)) < 0)
        return wp_test_fail("engine setup", rc);
    pthread_t t[WRITERS];
    atomic_store(&phase, 0);
    for (uintptr_t i = 0; i < (uintptr_t)writers; i++)
        pthread_create(&t[i], NULL, guest, (void *)i);
    usleep(20000);
    atomic_store(&phase, 1);
    while (atomic_load(&paused) < writers)
        ;
    uint8_t *reference = malloc((size_t)PAGES * PAGE);
    memcpy(reference, mem, (size_t)PAGES * PAGE);
    if ((rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("wp_engine_protect", rc);
    /* With write-behind, 2 ms after each batch: time for writeback, so drops happen (printed, not checked). */
    wp_writer *w = wp_writer_create(e, fd, HEADER, 256, 16, c, 4, behind_lag ? 2000 : 0, flags, &err);
    if (w && behind_lag && (rc = wp_writer_set_write_behind(w, behind_lag, behind_lag / 4)) < 0)
        return wp_test_fail("wp_writer_set_write_behind", rc);
    if (w && (flags & WP_WRITER_SEQUENTIAL) && (rc = wp_writer_set_write_behind(w, 1u << 20, 1u << 18)) != -ENOTSUP)
        return wp_test_fail("write-behind on a stream", rc);
    if (w && !(flags & WP_WRITER_SEQUENTIAL) && ((rc = wp_writer_set_write_behind(w, 1u << 20, 0)) != -EINVAL ||
              (rc = wp_writer_set_write_behind(w, 1u << 12, 1u << 13)) != -EINVAL))
        return wp_test_fail("write-behind with a step of 0 or over the lag", rc);
    if (!w || (rc = wp_writer_start(w)) < 0)
        return wp_test_fail("wp_writer_create/start", w ? rc : err);
    if ((rc = wp_writer_set_write_behind(w, 0, 0)) != -EALREADY)
        return wp_test_fail("write-behind changed after start", rc);
    uint64_t writes_at_cut = atomic_load(&writes);
    atomic_store(&phase, 0);
    wp_writer_stats st;
    for (;;) {
        wp_writer_poll(w, &st);
        if (st.state != WP_WRITER_RUNNING)
            break;
        usleep(1000);
    }
    int result = 0;
    if (expect_error) {
        if (st.state != WP_WRITER_FAILED || st.error != expect_error || st.error_source != WP_WRITER_FROM_FILE)
            result = wp_test_fail("the writer did not fail with the file's error", (long)st.error);
    } else if (st.state != WP_WRITER_DONE) {
        result = wp_test_fail("the writer failed", (long)st.error);
    } else if (writers > 0 && atomic_load(&writes) == writes_at_cut) {
        result = wp_test_fail("the guest wrote nothing while the snapshot ran", 0);
    } else {
        int64_t n = wp_writer_index(w, NULL, 0);
        wp_writer_record *index = malloc((size_t)n * sizeof *index);
        if (wp_writer_index(w, index, (uint64_t)n) != n || (uint64_t)n != st.records)
            result = wp_test_fail("the index changed after done", n);
        else {
            if (behind_lag) { /* before the read-back below fills the page cache again */
                file_pages = (st.end_offset + PAGE - 1) / PAGE;
                cached_pages = pages_cached(fd, st.end_offset);
            }
            atomic_store(&stream_expect, st.end_offset - HEADER);
            result = check_file(readback ? readback() : fd, index, n, reference, st.end_offset);
        }
        free(index);
    }
    *st_out = st;
    /* Whatever happened: destroying the writer, then the engine, lets every guest writer go on. */
    wp_writer_destroy(w);
    wp_engine_destroy(e);
    atomic_store(&phase, 2);
    for (int i = 0; i < writers; i++)
        pthread_join(t[i], NULL); /* a writer left blocked in a write fault hangs here */
    free(reference);
    return result;
}

/* A stream: the read end of a pipe, drained slowly by a thread (so the
 * writer meets a full pipe, EAGAIN on its non-blocking end). */
static int pipe_fds[2];
static uint8_t *streamed;
static size_t streamed_len;
static pthread_t reader;


static void *drain_pipe(void *arg)
{
    (void)arg;
    size_t cap = (size_t)PAGES * PAGE * 2;
    streamed = malloc(cap);
    for (;;) {
        size_t expect = atomic_load(&stream_expect);
        if (expect && streamed_len >= expect)
            return NULL;
        struct pollfd in = {.fd = pipe_fds[0], .events = POLLIN};
        if (poll(&in, 1, 10) == 0)
            continue;
        ssize_t n = read(pipe_fds[0], streamed + streamed_len, 65536 < cap - streamed_len ? 65536 : cap - streamed_len);
        if (n <= 0)
            return NULL;
        streamed_len += (size_t)n;
        usleep(200);
    }
}

/* The streamed bytes, after a header's worth of zeros (record offsets count from the header), as a file. */
static int streamed_file(void)
{
    char path[] = "/tmp/vmsnap-test-writer-XXXXXX";
    int fd = mkstemp(path);
    unlink(path);
    pthread_join(reader, NULL);
    if (pwrite(fd, streamed, streamed_len, HEADER) != (ssize_t)streamed_len)
        return -1;
    return fd;
}

/* A stream nobody reads (a blocking pipe, full): the writer blocks in its
 * write, the pool fills, the guest waits in its write faults. Destroying
 * the writer must still return, and the engine then let the guest go. */
static int stuck_stream(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return wp_test_fail("pipe", -errno);
    fill();
    int32_t err;
    wp_engine *e = wp_engine_create(64, &err);
    int rc;
    if (!e || (rc = wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, (uint64_t)PAGES * PAGE)) < 0 ||
        (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("engine setup", e ? rc : err);
    pthread_t t[WRITERS];
    atomic_store(&phase, 0);
    for (uintptr_t i = 0; i < WRITERS; i++)
        pthread_create(&t[i], NULL, guest, (void *)i);
    wp_writer *w = wp_writer_create(e, p[1], HEADER, 256, 16, WP_WRITER_NONE, 4, 0, WP_WRITER_SEQUENTIAL, &err);
    if (!w || (rc = wp_writer_start(w)) < 0)
        return wp_test_fail("wp_writer_create/start", w ? rc : err);
    usleep(300000);
    wp_writer_stats st;
    wp_writer_poll(w, &st);
    if (st.state != WP_WRITER_RUNNING)
        return wp_test_fail("a writer blocked in its write should still be running", (long)st.state);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    alarm(30); /* a destroy that waits for the stuck write never returns: SIGALRM fails the test */
    wp_writer_destroy(w); /* returns although its thread is stuck in writev */
    wp_engine_destroy(e);
    alarm(0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    atomic_store(&phase, 2);
    for (int i = 0; i < WRITERS; i++)
        pthread_join(t[i], NULL); /* a guest writer left blocked hangs here */
    close(p[0]);                   /* the stuck write ends with EPIPE; its thread frees the writer */
    close(p[1]);
    printf("ok: stream nobody reads: writer destroyed in %.1f s with its thread stuck in writev, no guest writer left blocked\n",
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    usleep(100000);
    return 0;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as in Node: a write to a closed pipe is EPIPE */
    int rc = wp_test_need_wp_unpopulated();
    if (rc)
        return rc;
    int32_t err;
    if (wp_writer_create(NULL, 0, 0, 256, 16, 0, 4, 0, 0, &err) != NULL || err != -EINVAL)
        return wp_test_fail("a writer without an engine", err);
    mem = mmap(NULL, (size_t)PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const char *names[] = {"none", "lz4", "auto"};
    for (uint32_t c = WP_WRITER_NONE; c <= WP_WRITER_AUTO; c++)
        for (uint32_t pool = 0; pool <= 1024; pool += 1024) {
            fill();
            char path[] = "/tmp/vmsnap-test-writer-XXXXXX";
            int fd = mkstemp(path);
            unlink(path);
            wp_writer_stats st;
            if (fd < 0 || snapshot(fd, c, pool, 0, &st, 0, NULL))
                return wp_test_fail(names[c], pool);
            printf("ok: compression %s, pool %u: %lu records, %lu bytes, batches raw %lu lz4 %lu inline %lu\n",
                   names[c], pool, (unsigned long)st.records, (unsigned long)(st.end_offset - HEADER),
                   (unsigned long)st.batches_raw, (unsigned long)st.batches_lz4, (unsigned long)st.batches_lz4_inline);
            if (c == WP_WRITER_NONE && (st.batches_lz4 || st.batches_lz4_inline))
                return wp_test_fail("compression none compressed", 0);
            if (c == WP_WRITER_LZ4 && (st.batches_raw || !st.batches_lz4))
                return wp_test_fail("compression lz4 wrote raw batches", 0);
            close(fd);
        }
    for (uint32_t c = WP_WRITER_NONE; c <= WP_WRITER_AUTO; c++) {
        fill();
        int fd = open("/dev/full", O_WRONLY | O_CLOEXEC);
        wp_writer_stats st;
        if (fd < 0)
            return wp_test_fail("open /dev/full", -errno);
        if (snapshot(fd, c, 1024, -ENOSPC, &st, 0, NULL))
            return wp_test_fail(names[c], 0);
        close(fd);
        printf("ok: compression %s, disk full: failed with ENOSPC from the file, no guest writer left blocked\n", names[c]);
    }
    /* auto with an idle guest: nobody waits for the writer, so every batch is compressed (by the compression
     * thread or the writer itself); none is written raw. */
    {
        fill();
        writers = 0;
        char path[] = "/tmp/vmsnap-test-writer-XXXXXX";
        int fd = mkstemp(path);
        unlink(path);
        wp_writer_stats st;
        if (fd < 0 || snapshot(fd, WP_WRITER_AUTO, 1024, 0, &st, 0, NULL))
            return wp_test_fail("auto, idle guest", 0);
        if (st.batches_raw != 0 || st.batches_lz4 + st.batches_lz4_inline == 0)
            return wp_test_fail("auto wrote raw batches while no guest write faulted", (long)st.batches_raw);
        printf("ok: compression auto, idle guest: batches lz4 %lu, inline %lu, raw 0\n", (unsigned long)st.batches_lz4,
               (unsigned long)st.batches_lz4_inline);
        close(fd);
        writers = WRITERS;
    }
    /* Write-behind all through the snapshot (a 256 KiB lag, 64 KiB steps): each mode still exact. */
    for (uint32_t c = WP_WRITER_NONE; c <= WP_WRITER_AUTO; c++) {
        fill();
        char path[] = "/var/tmp/vmsnap-test-writer-XXXXXX"; /* a disk, where /tmp may be tmpfs */
        int fd = mkstemp(path);
        unlink(path);
        wp_writer_stats st;
        behind_lag = 256u << 10;
        if (fd < 0 || snapshot(fd, c, 1024, 0, &st, 0, NULL))
            return wp_test_fail(names[c], 2);
        behind_lag = 0;
        printf("ok: compression %s, write-behind: exact; %zu of %zu pages of the file were cached when the writer was done\n",
               names[c], cached_pages, file_pages);
        close(fd);
    }
    /* A stream (standard output): every mode, the bytes in offset order, through a full non-blocking pipe. */
    for (uint32_t c = WP_WRITER_NONE; c <= WP_WRITER_AUTO; c++) {
        fill();
        streamed_len = 0;
        atomic_store(&stream_expect, 0);
        if (pipe2(pipe_fds, O_CLOEXEC) < 0 || fcntl(pipe_fds[1], F_SETFL, O_NONBLOCK) < 0)
            return wp_test_fail("pipe", -errno);
        pthread_create(&reader, NULL, drain_pipe, NULL);
        wp_writer_stats st;
        if (snapshot(pipe_fds[1], c, 1024, 0, &st, WP_WRITER_SEQUENTIAL, streamed_file))
            return wp_test_fail(names[c], 1);
        if (streamed_len != st.end_offset - HEADER)
            return wp_test_fail("the stream's length differs from the records' end", (long)streamed_len);
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        free(streamed);
        printf("ok: compression %s, stream: %zu bytes in offset order through a non-blocking pipe\n", names[c], streamed_len);
    }
    if (stuck_stream())
        return 1;
    puts("PASS");
    return 0;
}
