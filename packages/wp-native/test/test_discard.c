/*
 * Issue 11 #3 and #4: the guest discards memory during a snapshot. A host
 * thread plays the guest: after the cut (or while armed) it discards pages
 * with MADV_DONTNEED or MADV_REMOVE and writes new data to them. Every
 * snapshot must either equal the memory at the cut or fail with -ENODATA
 * naming the discard; never hold data written after the cut, nor zeros
 * where the cut had data. Shared memory whose page cache survives a
 * MADV_DONTNEED must give the exact snapshot. Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "wp_test.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGES 4096u
#define FIRST 1000u /* the discarded pages */
#define COUNT 100u

/* ARMED_AND_AFTER, BEFORE_AND_AFTER: while armed, or before arming, then
 * the same pages again after the cut (an allocator purging its free pages
 * again and again, break2 finding 4): empty at the cut, so nothing is lost
 * and the snapshot must be exact. */
enum when { AFTER_CUT, WHILE_ARMED, ARMED_AND_AFTER, BEFORE_AND_AFTER };
struct guest {
    uint8_t *mem;
    int advice;
};

static void discard(const struct guest *g)
{
    if (madvise(g->mem + (size_t)FIRST * WP_PAGE_SIZE, (size_t)COUNT * WP_PAGE_SIZE, g->advice) < 0)
        perror("madvise");
}

static void *write_after_cut(void *arg)
{
    const struct guest *g = arg;
    discard(g);
    memset(g->mem + (size_t)FIRST * WP_PAGE_SIZE, 0xEE, (size_t)COUNT * WP_PAGE_SIZE);
    return NULL;
}

static void *write_only(void *arg)
{
    const struct guest *g = arg;
    memset(g->mem + (size_t)FIRST * WP_PAGE_SIZE, 0xDD, (size_t)COUNT * WP_PAGE_SIZE);
    return NULL;
}

/* One snapshot; 0 pass, 1 fail. must_be_exact: a failure is not allowed. */
static int run(const char *name, bool shared, int advice, enum when when, bool must_be_exact)
{
    struct wp_test_memory m;
    if (wp_test_memory_create(&m, PAGES, shared))
        return 1;
    uint8_t *mem = m.mem, *reference = m.reference, *out = m.out, *buf = m.buf;
    size_t size = m.size;
    struct guest g = {.mem = mem, .advice = advice};
    int32_t err;
    wp_engine *e = wp_engine_create(4096, &err);
    if (!e || wp_engine_add_region(e, (uint64_t)(uintptr_t)mem, size) < 0 || wp_engine_start(e) < 0)
        return fprintf(stderr, "FAIL %s: engine setup\n", name), 1;
    if (when == BEFORE_AND_AFTER)
        discard(&g); /* registered, not armed yet */
    if (wp_engine_arm(e) < 0)
        return fprintf(stderr, "FAIL %s: arm\n", name), 1;
    if (when == WHILE_ARMED || when == ARMED_AND_AFTER)
        discard(&g); /* before the cut: part of the memory at the cut */
    if (wp_engine_protect(e) < 0)
        return fprintf(stderr, "FAIL %s: cut\n", name), 1;
    memcpy(reference, mem, size); /* nothing writes between the cut and here */
    pthread_t t;
    pthread_create(&t, NULL, when == WHILE_ARMED ? write_only : write_after_cut, &g);
    wp_test_take_into(e, buf, out, 256); /* a failure is read from the engine below */
    int32_t process;
    int32_t failure = wp_engine_error(e, &process);
    wp_stats st;
    wp_engine_stats(e, &st);
    wp_engine_destroy(e); /* unprotects: the guest thread can finish */
    pthread_join(t, NULL);
    int result = 0;
    if (failure < 0) {
        printf("%s: snapshot failed: %s, %llu discarded pages lost\n", name, strerror(-failure),
               (unsigned long long)st.pages_discarded);
        if (must_be_exact || failure != -ENODATA || st.pages_discarded == 0) {
            fprintf(stderr, "FAIL %s: expected %s\n", name, must_be_exact ? "an exact snapshot" : "-ENODATA naming the discard");
            result = 1;
        }
    } else {
        uint32_t first = 0, wrong = wp_test_differing_pages(out, reference, PAGES, &first);
        printf("%s: snapshot complete, %u pages differ from the cut\n", name, wrong);
        if (wrong) {
            fprintf(stderr, "FAIL %s: page %u holds 0x%02x, 0x%02x at the cut\n", name, first, out[(size_t)first * WP_PAGE_SIZE],
                    reference[(size_t)first * WP_PAGE_SIZE]);
            result = 1;
        }
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
    failed |= run("anon + MADV_DONTNEED after the cut", false, MADV_DONTNEED, AFTER_CUT, false);
    failed |= run("anon + MADV_DONTNEED while armed", false, MADV_DONTNEED, WHILE_ARMED, true);
    failed |= run("anon + MADV_DONTNEED while armed, again after the cut", false, MADV_DONTNEED, ARMED_AND_AFTER, true);
    /* Telling a page that was empty before arming needs the pagemap's swap
     * fields (the uffd-wp marker), shown to CAP_SYS_ADMIN only. */
    bool admin = geteuid() == 0;
    if (!admin)
        printf("note: not root, so pages empty before arming are not known empty: -ENODATA is the right outcome\n");
    failed |= run("anon + MADV_DONTNEED before arming, again after the cut", false, MADV_DONTNEED, BEFORE_AND_AFTER, admin);
    failed |= run("memfd + MADV_REMOVE after the cut", true, MADV_REMOVE, AFTER_CUT, false);
    failed |= run("memfd + MADV_REMOVE while armed", true, MADV_REMOVE, WHILE_ARMED, true);
    failed |= run("memfd + MADV_DONTNEED after the cut (page cache survives)", true, MADV_DONTNEED, AFTER_CUT, true);
    return failed;
}
