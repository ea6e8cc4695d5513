/*
 * Liveness of write faults: a write to a protected page is answered by the
 * fault thread alone. Host threads write random pages before arming, while
 * armed, across the cut and after it, and nobody sweeps or drains until
 * every writer has made WRITES_AFTER_CUT writes after the cut. A write fault
 * that is read but never answered (a lost wake-up in the fault thread, the
 * pool or the arm -> cut handshake) leaves its writer blocked until the
 * engine is destroyed, and this test then hangs; the watchdog turns that into
 * a failure. The pool holds every page, so no fault ever waits for a drain.
 * Exit 0 pass, 1 fail, 77 skip.
 *
 * The watchdog is a liveness bound, not a timing assertion: a healthy run
 * finishes each round in milliseconds.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "wp_test.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define SIZE (16 * MIB)
#define PAGES (SIZE / WP_PAGE_SIZE)
#define ROUNDS 20
#define WRITERS 3
#define WRITES_AFTER_CUT 256 /* per writer; WRITERS * this stays under half the pool */
#ifndef HANG_SECONDS
#define HANG_SECONDS 60
#endif

static _Atomic int progress; /* rounds finished; the watchdog checks it moves */
static _Atomic int phase;    /* 0 before the cut, 1 after wp_engine_protect returned, 2 stop */
static _Atomic uint64_t after_cut_writes;
static uint8_t *mem;

static struct wp_test_watchdog dog_spec = {&progress, HANG_SECONDS, "round", "a writer stayed blocked in a write fault with nobody sweeping"};

static void *writer(void *arg)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1), mine = 0;
    while (atomic_load(&phase) != 2) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        bool after = atomic_load(&phase) == 1;
        ((volatile uint64_t *)(mem + (x % PAGES) * WP_PAGE_SIZE))[x % 512] = x;
        if (after && ++mine == WRITES_AFTER_CUT)
            atomic_fetch_add(&after_cut_writes, mine);
        if (mine >= WRITES_AFTER_CUT)
            break;
    }
    return NULL;
}

int main(void)
{
    int rc = wp_test_need_wp_unpopulated();
    if (rc)
        return rc;
    mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return wp_test_fail("mmap", -1);
    memset(mem, 0x5a, SIZE);
    pthread_t dog;
    pthread_create(&dog, NULL, wp_test_watchdog_run, &dog_spec);
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    uint64_t faults = 0;
    for (int round = 0; round < ROUNDS; round++) {
        int32_t err;
        wp_engine *e = wp_engine_create(PAGES, &err);
        if (!e)
            return wp_test_fail("wp_engine_create", err);
        if ((rc = wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, SIZE)) < 0 || (rc = wp_engine_start(e)) < 0)
            return wp_test_fail("register/start", rc);
        atomic_store(&phase, 0);
        atomic_store(&after_cut_writes, 0);
        pthread_t w[WRITERS];
        for (uintptr_t i = 0; i < WRITERS; i++)
            pthread_create(&w[i], NULL, writer, (void *)(i + (uintptr_t)round * WRITERS));
        if ((rc = wp_engine_arm(e)) < 0)
            return wp_test_fail("arm", rc);
        usleep(1000 + (useconds_t)(round % 5) * 1000); /* writes while armed */
        /* No freeze: writers that fault during the cut wait for it (fault.c). */
        if ((rc = wp_engine_protect(e)) < 0)
            return wp_test_fail("cut", rc);
        atomic_store(&phase, 1);
        /* Nobody sweeps or drains: only the fault thread can let the writers go. */
        for (int i = 0; i < WRITERS; i++)
            pthread_join(w[i], NULL);
        wp_stats st;
        wp_engine_stats(e, &st);
        if (st.pages_swept != 0)
            return wp_test_fail("something swept while the writers ran: the test did not test the fault thread alone", (long)st.pages_swept);
        faults += st.faults;
        atomic_store(&phase, 2);
        if (wp_test_finish_snapshot(e, buf))
            return 1;
        wp_engine_stats(e, &st);
        if (st.pages_saved != st.pages_total)
            return wp_test_fail("pages saved != pages total", (long)st.pages_saved);
        if (st.overflow_pages != 0)
            return wp_test_fail("a fault overflowed although the pool holds every page", (long)st.overflow_pages);
        wp_engine_destroy(e);
        atomic_fetch_add(&progress, 1);
    }
    free(buf);
    munmap(mem, SIZE);
    printf("fault liveness: %d rounds, %d writers, %d writes each after the cut, %llu write faults answered by the fault thread alone\n",
           ROUNDS, WRITERS, WRITES_AFTER_CUT, (unsigned long long)faults);
    if (faults == 0)
        return wp_test_fail("no write faulted after the cut: the test did not test the fault thread", 0);
    return 0;
}
