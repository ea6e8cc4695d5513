/*
 * Shared pieces of the engine's C tests (small programs: exit 0 pass,
 * 1 fail, 77 skip with the reason printed).
 */
#ifndef WP_TEST_H
#define WP_TEST_H

#include "vmsnap_engine.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Prints "FAIL: what (rc: strerror)" and returns 1. */
static inline int wp_test_fail(const char *what, long rc)
{
    fprintf(stderr, "FAIL: %s (%ld: %s)\n", what, rc, rc < 0 ? strerror((int)-rc) : "");
    return 1;
}

/* Takes everything the engine captures until the snapshot is complete or
 * fails; buf holds 256 pages. Returns 0 or the engine's -errno. */
static inline int wp_test_take_all(wp_engine *e, uint8_t *buf)
{
    uint32_t regions[256];
    uint64_t pages[256];
    uint8_t flags[256];
    while (!wp_engine_done(e)) {
        int n = wp_engine_next_batch(e, buf, regions, pages, flags, 256);
        if (n < 0)
            return n;
    }
    return 0;
}

/* Takes everything the engine captures until the snapshot is complete or
 * fails, copying each page of region 0 to out + page * 4096 (zero pages
 * written as zero); buf holds max_pages pages. 0 or the engine's -errno. */
static inline int wp_test_take_into(wp_engine *e, uint8_t *buf, uint8_t *out, uint32_t max_pages)
{
    uint32_t regions[max_pages];
    uint64_t pages[max_pages];
    uint8_t flags[max_pages];
    while (!wp_engine_done(e)) {
        int n = wp_engine_next_batch(e, buf, regions, pages, flags, max_pages);
        if (n < 0)
            return n;
        for (int i = 0, d = 0; i < n; i++) {
            uint8_t *dst = out + pages[i] * WP_PAGE_SIZE;
            if (flags[i] == WP_PAGE_DATA)
                memcpy(dst, buf + (size_t)d++ * WP_PAGE_SIZE, WP_PAGE_SIZE);
            else
                memset(dst, 0, WP_PAGE_SIZE);
        }
    }
    return 0;
}

/* How many of `pages` pages differ between a and b; the first in *first. */
static inline uint32_t wp_test_differing_pages(const uint8_t *a, const uint8_t *b, uint32_t pages, uint32_t *first)
{
    uint32_t wrong = 0;
    for (uint32_t p = 0; p < pages; p++)
        if (memcmp(a + (size_t)p * WP_PAGE_SIZE, b + (size_t)p * WP_PAGE_SIZE, WP_PAGE_SIZE) && !wrong++)
            *first = p;
    return wrong;
}

/* Test memory of `pages` pages: private anonymous, or a memfd mapped
 * shared; page p filled with the byte p % 251 + 1. With the reference,
 * image and batch buffers a snapshot test compares through. */
struct wp_test_memory {
    uint8_t *mem, *reference, *out, *buf; /* buf: 256 pages for wp_engine_next_batch */
    size_t size;
    int fd; /* the memfd, -1 for anonymous memory */
};

/* 0, or 1 after printing why. */
static inline int wp_test_memory_create(struct wp_test_memory *m, uint32_t pages, bool shared)
{
    m->size = (size_t)pages * WP_PAGE_SIZE;
    m->fd = shared ? (int)syscall(SYS_memfd_create, "vmsnap-test", MFD_CLOEXEC) : -1; /* without _GNU_SOURCE */
    if (shared && (m->fd < 0 || ftruncate(m->fd, (off_t)m->size) < 0))
        return perror("memfd"), 1;
    m->mem = mmap(NULL, m->size, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE | MAP_ANONYMOUS, m->fd, 0);
    if (m->mem == MAP_FAILED)
        return perror("mmap"), 1;
    for (uint32_t p = 0; p < pages; p++)
        memset(m->mem + (size_t)p * WP_PAGE_SIZE, (int)(p % 251) + 1, WP_PAGE_SIZE);
    m->reference = malloc(m->size);
    m->out = calloc(pages, WP_PAGE_SIZE);
    m->buf = malloc(256 * WP_PAGE_SIZE);
    return m->reference && m->out && m->buf ? 0 : (perror("malloc"), 1);
}

static inline void wp_test_memory_destroy(struct wp_test_memory *m)
{
    munmap(m->mem, m->size);
    if (m->fd >= 0)
        close(m->fd);
    free(m->reference);
    free(m->out);
    free(m->buf);
}

/* wp_test_take_all, printing the failure: 0 or 1. */
static inline int wp_test_finish_snapshot(wp_engine *e, uint8_t *buf)
{
    int rc = wp_test_take_all(e, buf);
    return rc < 0 ? wp_test_fail("next_batch", rc) : 0;
}

/* 0 when write-protect of unpopulated and shared (shmem, hugetlbfs) pages
 * works, else prints SKIP and returns 77. */
static inline int wp_test_need_wp_shared(void)
{
    uint64_t features;
    int32_t how;
    int rc = wp_probe(&features, &how);
    if (rc < 0 || !(features & WP_FEATURE_WP_UNPOPULATED) || !(features & WP_FEATURE_WP_HUGETLBFS_SHMEM)) {
        printf("SKIP: userfaultfd write-protect of unpopulated and shared pages is not available (%s)\n",
               rc < 0 ? strerror(-rc) : "needs Linux 6.4+");
        return 77;
    }
    return 0;
}

/* 0 when write-protect of unpopulated pages works, else prints SKIP and returns 77. */
static inline int wp_test_need_wp_unpopulated(void)
{
    uint64_t features;
    int32_t how;
    int rc = wp_probe(&features, &how);
    if (rc < 0 || !(features & WP_FEATURE_WP_UNPOPULATED)) {
        printf("SKIP: userfaultfd write-protect of unpopulated pages is not available (%s)\n",
               rc < 0 ? strerror(-rc) : "needs Linux 6.4+");
        return 77;
    }
    return 0;
}

/*
 * A liveness bound, not a timing assertion: every `seconds` the watchdog
 * checks that *progress moved; if not it prints "FAIL: <what> <n>: <why>"
 * and exits 1, turning a hang into a failure.
 */
struct wp_test_watchdog {
    _Atomic int *progress;
    int seconds;
    const char *what; /* "cut", "round" */
    const char *why;
};

static inline void *wp_test_watchdog_run(void *arg)
{
    const struct wp_test_watchdog *w = arg;
    int seen = -1;
    for (;;) {
        sleep((unsigned)w->seconds);
        int now = atomic_load(w->progress);
        if (now == seen) {
            fprintf(stderr, "FAIL: %s %d: %s (no progress in %d s)\n", w->what, now + 1, w->why, w->seconds);
            _exit(1);
        }
        seen = now;
    }
    return NULL;
}

#endif
