/*
 * break8 H2: a guest thread that discards memory (MADV_DONTNEED, as a
 * balloon or an allocator does) while a snapshot ends must not stay
 * blocked after it. The agent's case: the uffd belongs to the VMM and the
 * agent keeps its copy between snapshots, so it is not released when the
 * engine ends; an event (UFFD_EVENT_REMOVE) queued after the fault thread
 * stopped reading held the discarding thread until the next snapshot
 * (the kernel's userfaultfd_event_wait_completion). Here this process plays
 * the VMM: it makes the uffd (blocking, as a VMM may), hands the engine a
 * copy and keeps its own; a thread discards pages of the guest memfd
 * without pause through several snapshots. After each, the thread must go
 * on discarding; SIGALRM fails the test if it stays blocked.
 * Exit 0 pass, 1 fail, 77 skip.
 */
#define _GNU_SOURCE
#include "vmsnap_engine.h"
#include "wp_test.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SIZE (16u << 20)
#define ROUNDS 8

static uint8_t take_buf[256 * WP_PAGE_SIZE];
static uint8_t *guest;
static _Atomic uint64_t discards;
static _Atomic int stop;

static void *discard(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        for (uint32_t p = 0; p < 64 && !atomic_load(&stop); p += 16) {
            guest[(size_t)p * WP_PAGE_SIZE] = 1;
            madvise(guest + (size_t)p * WP_PAGE_SIZE, 16 * WP_PAGE_SIZE, MADV_DONTNEED);
            atomic_fetch_add(&discards, 1);
        }
    }
    return NULL;
}

int main(void)
{
    int rc = wp_test_need_wp_shared();
    if (rc)
        return rc;
    int fd = memfd_create("vmsnap-discard-end", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, SIZE) < 0)
        return wp_test_fail("memfd", -errno);
    uint8_t *view = mmap(NULL, SIZE, PROT_READ, MAP_SHARED, fd, 0);
    guest = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (view == MAP_FAILED || guest == MAP_FAILED)
        return wp_test_fail("mmap", -errno);
    memset(guest, 0x5a, SIZE);
    /* The VMM's uffd: blocking, kept open here across snapshots. */
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0)
        return wp_test_fail("userfaultfd", -errno);
    if ((rc = wp_uffd_negotiate(uffd)) < 0)
        return wp_test_fail("wp_uffd_negotiate", rc);
    pthread_t t;
    pthread_create(&t, NULL, discard, NULL);
    alarm(60); /* a discarding thread left blocked never gets past the wait below */
    for (int round = 0; round < ROUNDS; round++) {
        int32_t err;
        wp_engine *e = wp_engine_create(256, &err);
        int32_t process = e ? wp_engine_add_process(e, uffd, getpid()) : -1;
        if (!e || process < 0 || (rc = wp_engine_add_shared_region(e, (uint64_t)(uintptr_t)view, SIZE)) < 0 ||
            (rc = wp_engine_map_region(e, 0, (uint32_t)process, (uint64_t)(uintptr_t)guest)) < 0 ||
            (rc = wp_engine_start(e)) < 0 || (rc = wp_engine_protect(e)) < 0)
            return wp_test_fail("engine", !e ? err : process < 0 ? process : rc);
        /* Exact, or failed naming the discard: either way the snapshot ends. */
        long taken = wp_test_take_all(e, take_buf);
        wp_engine_destroy(e);
        uint64_t before = atomic_load(&discards);
        while (atomic_load(&discards) < before + 32)
            usleep(1000);
        printf("round %d: snapshot %s; the discarding thread went on after it\n", round,
               taken < 0 ? "failed (a discarded page)" : "exact");
    }
    alarm(0);
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    close(uffd);
    puts("PASS");
    return 0;
}
