/*
 * Issue 11 #1: the arm -> cut handshake must never deadlock. Several host
 * threads write random pages while the engine is armed; the cut comes while
 * the fault thread is in the middle of a batch of messages (the test build
 * sleeps 2 ms between the messages of one batch, see src/test_hooks.h).
 * The fault thread must never wait for the cut with a batch open, or the cut
 * (waiting for that batch) and the fault thread (waiting for the cut) hang
 * with every writer blocked. Many cuts; each must finish, and each snapshot
 * must then complete. Exit 0 pass, 1 fail, 77 skip.
 *
 * A watchdog thread turns a hang into a failure (exit 1) instead of a stuck
 * test: it is a liveness bound, not a timing assertion.
 */
#define _GNU_SOURCE
#include "test_hooks.h"
#include "vmsnap_engine.h"
#include "wp_test.h"
#include "vmsnap_guest.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define CUTS 40
#define WRITERS 4
#define HANG_SECONDS 60

static _Atomic int progress; /* cuts finished; the watchdog checks it moves */

static struct wp_test_watchdog dog_spec = {&progress, HANG_SECONDS, "cut", "the cut and the fault thread wait for each other"};

int main(void)
{
    int rc = wp_test_need_wp_unpopulated();
    if (rc)
        return rc;
    const uint64_t size = 64 * MIB;
    int32_t err;
    vg_guest *g = vg_create(size, VG_MEM_ANON, &err);
    if (!g)
        return wp_test_fail("vg_create", err);
    vg_fill(g, 0, size / WP_PAGE_SIZE, 5);
    if ((rc = vg_start(g, WRITERS, 0, 9)) < 0)
        return wp_test_fail("vg_start", rc);
    pthread_t dog;
    pthread_create(&dog, NULL, wp_test_watchdog_run, &dog_spec);
    uint8_t *buf = malloc(256 * WP_PAGE_SIZE);
    uint64_t arm_faults = 0;
    for (int cut = 0; cut < CUTS; cut++) {
        wp_engine *e = wp_engine_create(1024, &err);
        if (!e)
            return wp_test_fail("wp_engine_create", err);
        if ((rc = wp_engine_add_region(e, vg_hva(g), size)) < 0 || (rc = wp_engine_start(e)) < 0)
            return wp_test_fail("register/start", rc);
        wp_test_set_message_delay(e, 2000);
        if ((rc = wp_engine_arm(e)) < 0)
            return wp_test_fail("arm", rc);
        usleep(3000 + (useconds_t)(cut % 7) * 1000); /* writers fault while armed */
        if ((rc = wp_engine_protect(e)) < 0)
            return wp_test_fail("cut", rc);
        wp_test_set_message_delay(e, 0);
        if (wp_test_finish_snapshot(e, buf))
            return 1;
        wp_stats st;
        wp_engine_stats(e, &st);
        arm_faults += st.arm_faults;
        if (st.pages_saved != st.pages_total)
            return wp_test_fail("pages saved != pages total", (long)st.pages_saved);
        wp_engine_destroy(e);
        atomic_fetch_add(&progress, 1);
    }
    vg_stop(g);
    vg_destroy(g);
    free(buf);
    printf("cut handshake: %d cuts with %d writer threads, %llu writes let through while armed\n", CUTS, WRITERS,
           (unsigned long long)arm_faults);
    if (arm_faults == 0)
        return wp_test_fail("the writers never faulted while armed: the test did not test the handshake", 0);
    return 0;
}
