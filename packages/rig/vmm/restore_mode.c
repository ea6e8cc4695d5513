/* The toy VMM in restore mode: a Firecracker-style VMM whose memory a
 * page-fault handler (`vmsnap serve`) serves. */
#include "toyvmm.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int restore_handshake(void)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        die("userfaultfd");
    const uint64_t MINOR_SHMEM = 1ull << 10, EVENT_REMOVE = 1ull << 3;
    struct uffdio_api api = {.api = UFFD_API, .features = EVENT_REMOVE | (vmm.anon ? 0 : MINOR_SHMEM)};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)vmm.mem, .len = vmm.mem_size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING | (vmm.anon ? 0 : UFFDIO_REGISTER_MODE_MINOR)};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");
    int s = connect_unix(vmm.restore_from, "connect to the page-fault handler");
    /* Firecracker's handshake: one message, a JSON array of regions, the uffd
     * as the only fd (a memfd guest adds its memfd as a second fd). */
    char body[512];
    int n = snprintf(body, sizeof body,
                     "[{\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":0,\"page_size\":4096,\"page_size_kib\":4096}]",
                     (unsigned long long)(uintptr_t)vmm.mem, (unsigned long long)vmm.mem_size);
    int fds[2] = {uffd, vmm.memfd};
    int nfds = vmm.anon ? 1 : 2;
    if (send_with_fds(s, body, (size_t)n, fds, nfds) < 0)
        die("send the handshake");
    close(uffd);
    return s; /* kept open, as Firecracker does */
}

/* Replays vCPU 0's writes over the image it was restored from and compares
 * the work area: every page must equal the snapshot or hold what the guest
 * wrote since. Also counts the pages the guest changed, and how many of them
 * are in the hot set (the first tenth of the area; see PATTERN_HOT). */
static void verify_restored(void)
{
    uint64_t area = vmm.mem_size - SYSTEM_AREA;
    uint8_t *expected = malloc(area);
    int fd = open(vmm.verify_image, O_RDONLY | O_CLOEXEC);
    if (!expected || fd < 0 || pread(fd, expected, area, (off_t)SYSTEM_AREA) != (ssize_t)area)
        die("read the verify image");
    close(fd);
    struct toy_ctl *c = vmm.ctl[0];
    vmm.changed_pages = vmm.changed_hot_pages = 0;
    for (uint64_t p = 0; p < area / PAGE; p++)
        if (memcmp(expected + p * PAGE, vmm.mem + SYSTEM_AREA + p * PAGE, PAGE)) {
            vmm.changed_pages++;
            vmm.changed_hot_pages += p < c->hot_pages;
        }
    uint64_t s = vmm.initial_seed;
    for (uint64_t w = 0; w < c->writes; w++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        uint64_t page = toy_page_of(c, w, s);
        memcpy(expected + page * PAGE + (s & 0xff8), &s, 8);
    }
    vmm.verify_mismatches = 0;
    for (uint64_t p = 0; p < area / PAGE; p++)
        if (memcmp(expected + p * PAGE, vmm.mem + SYSTEM_AREA + p * PAGE, PAGE))
            vmm.verify_mismatches++;
    free(expected);
}

void run_restored(void)
{
    prepare_guest();
    int sock = restore_handshake();
    uint64_t t0 = now_ns();
    start_guest();
    while (__atomic_load_n(&vmm.ctl[0]->writes, __ATOMIC_ACQUIRE) == 0 && !atomic_load(&vmm.stopping))
        __builtin_ia32_pause();
    vmm.restore_first_write_ms = (double)(now_ns() - t0) / 1e6;
    announce_ready();
    run_until(vmm.run_ms ? now_ns() + vmm.run_ms * 1000000ull : 0);
    /* Park the vCPUs between two writes, so the count matches the memory. */
    freeze_guest();
    if (vmm.verify_image)
        verify_restored();
    close(sock);
}
