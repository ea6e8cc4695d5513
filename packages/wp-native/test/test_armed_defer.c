/*
 * A write let through while armed whose unprotect had to wait (EAGAIN: the
 * kernel refuses write-protect changes while a discard's event is unread)
 * until after the cut. The retry unprotected the page the cut had just
 * re-protected: the writer's write, made after the cut, went in unseen and
 * the sweep saved it, a snapshot silently holding data from after the cut.
 * Seen with snapshot --pid of a process that discards (threads exiting)
 * under load: the freeze interrupts the blocked writer, the cut
 * re-protects, the retry comes after. The test build defers such unprotects
 * through the cut on demand (src/test_hooks.h). Every page of the snapshot
 * must equal the memory at the cut, in anonymous and shared memory.
 * Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "test_hooks.h"
#include "vmsnap_engine.h"
#include "wp_test.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 1024u
#define WRITTEN 100u /* the page written while armed */

static void *write_page(void *arg)
{
    memset((uint8_t *)arg + (size_t)WRITTEN * WP_PAGE_SIZE, 0xEE, WP_PAGE_SIZE);
    return NULL;
}

static int run(const char *name, bool shared)
{
    struct wp_test_memory m;
    if (wp_test_memory_create(&m, PAGES, shared))
        return 1;
    uint8_t *mem = m.mem, *reference = m.reference, *out = m.out, *buf = m.buf;
    size_t size = m.size;
    int32_t err;
    long rc;
    wp_engine *e = wp_engine_create(256, &err);
    if (!e)
        return wp_test_fail("wp_engine_create", err);
    if ((rc = wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, size)) < 0 || (rc = wp_engine_start(e)) < 0)
        return wp_test_fail("register/start", rc);
    wp_test_set_defer_armed(e, true);
    if ((rc = wp_engine_arm(e)) < 0)
        return wp_test_fail("arm", rc);
    pthread_t writer;
    pthread_create(&writer, NULL, write_page, mem);
    wp_stats st;
    for (int i = 0; i < 10000; i++) { /* until the write is noted: its unprotect is now deferred */
        wp_engine_stats(e, &st);
        if (st.arm_faults > 0)
            break;
        usleep(100);
    }
    if (st.arm_faults == 0)
        return wp_test_fail("the write while armed never faulted", 0);
    usleep(2000);
    memcpy(reference, mem, size); /* the writer is blocked: this is the memory at the cut */
    if (reference[(size_t)WRITTEN * WP_PAGE_SIZE] == 0xEE)
        return wp_test_fail("the write went in before the cut: nothing was deferred", 0);
    if ((rc = wp_engine_protect(e)) < 0)
        return wp_test_fail("cut", rc);
    pthread_join(writer, NULL); /* its write is after the cut */
    if ((rc = wp_test_take_into(e, buf, out, 256)) < 0)
        return wp_test_fail("snapshot", rc);
    wp_engine_destroy(e);
    uint32_t first = 0, wrong = wp_test_differing_pages(out, reference, PAGES, &first);
    int result = 0;
    if (wrong) {
        fprintf(stderr, "FAIL %s: %u pages differ from the memory at the cut, the first page %u holds 0x%02x, 0x%02x at the cut\n",
                name, wrong, first, out[(size_t)first * WP_PAGE_SIZE], reference[(size_t)first * WP_PAGE_SIZE]);
        result = 1;
    } else {
        printf("%s: a write let through while armed, its unprotect deferred past the cut: the snapshot equals the cut\n", name);
    }
    wp_test_memory_destroy(&m);
    return result;
}

int main(void)
{
    int skip = wp_test_need_wp_shared();
    if (skip)
        return skip;
    int failed = 0;
    for (int round = 0; round < 5; round++) { /* the retry races the cut's re-protect: several rounds */
        failed |= run("anonymous", false);
        failed |= run("memfd", true);
    }
    return failed;
}
