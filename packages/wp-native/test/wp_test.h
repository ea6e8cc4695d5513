/*
 * Shared pieces of the engine's C tests (small programs: exit 0 pass,
 * 1 fail, 77 skip with the reason printed).
 */
#ifndef WP_TEST_H
#define WP_TEST_H

#include "vmsnap_engine.h"

#include <pthread.h>
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
