/*
 * The baselines of `vmsnap bench`, as simple as each idea allows:
 *   floor           a minimal C uffd-wp handler: protect everything, copy and
 *                   unprotect each faulting page, sweep the rest; nothing else
 *                   (no pool bound, no compression, no checksums, no file until
 *                   every page is captured);
 *   fork            pause, fork(), resume; the child writes the memory (the
 *                   Redis BGSAVE way; needs private memory: --anon);
 *   stop-the-world  pause, write all memory, resume (the Firecracker way);
 *   none            no snapshot for 2 s: the guest's own throughput, for ratios.
 */
#define _GNU_SOURCE
#include "baselines.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ull
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ull << 12)
#endif

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int write_all(const char *path, const uint8_t *mem, uint64_t size, char *error)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(error, 160, "open %s: %s", path, strerror(errno));
        return -1;
    }
    for (uint64_t off = 0; off < size;) {
        ssize_t w = pwrite(fd, mem + off, size - off > (64u << 20) ? (64u << 20) : size - off, (off_t)off);
        if (w <= 0) {
            snprintf(error, 160, "write %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
        off += (uint64_t)w;
    }
    fdatasync(fd);
    close(fd);
    return 0;
}

/* ---- floor ---- */

struct floor_ctx {
    int uffd;
    uint8_t *mem, *copy;
    uint8_t *state; /* 0 pending, 1 claimed, 2 saved */
    uint64_t pages;
    _Atomic bool done;
    uint64_t faults;
};

static void floor_unprotect(struct floor_ctx *c, uint64_t page, uint64_t count)
{
    struct uffdio_writeprotect wp = {.range = {.start = (uint64_t)(uintptr_t)(c->mem + page * PAGE), .len = count * PAGE}};
    while (ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == EAGAIN)
        ;
}

static bool floor_claim(struct floor_ctx *c, uint64_t page)
{
    uint8_t expected = 0;
    return __atomic_compare_exchange_n(&c->state[page], &expected, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void *floor_handler(void *arg)
{
    struct floor_ctx *c = arg;
    struct uffd_msg msgs[64];
    while (!atomic_load(&c->done)) {
        ssize_t n = read(c->uffd, msgs, sizeof msgs);
        if (n <= 0) {
            __builtin_ia32_pause(); /* poll: the floor never sleeps */
            continue;
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t page = (msgs[i].arg.pagefault.address - (uint64_t)(uintptr_t)c->mem) / PAGE;
            if (floor_claim(c, page)) {
                memcpy(c->copy + page * PAGE, c->mem + page * PAGE, PAGE);
                __atomic_store_n(&c->state[page], 2, __ATOMIC_RELEASE);
                c->faults++;
            } else {
                while (__atomic_load_n(&c->state[page], __ATOMIC_ACQUIRE) != 2)
                    __builtin_ia32_pause();
            }
            floor_unprotect(c, page, 1);
        }
    }
    return NULL;
}

static int floor_snapshot(const struct baseline_guest *g, const char *output, struct baseline_result *out)
{
    struct floor_ctx c = {.mem = g->mem, .pages = g->size / PAGE};
    c.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)g->mem, .len = g->size}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (c.uffd < 0 || ioctl(c.uffd, UFFDIO_API, &api) < 0 || ioctl(c.uffd, UFFDIO_REGISTER, &reg) < 0) {
        snprintf(out->error, sizeof out->error, "floor: userfaultfd: %s", strerror(errno));
        return -1;
    }
    c.copy = mmap(NULL, g->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    c.state = calloc(c.pages, 1);
    pthread_t handler;
    pthread_create(&handler, NULL, floor_handler, &c);
    pthread_setname_np(handler, "floor-fault"); /* ThreadCpu.ts */
    double t0 = now_ms();
    if (g->freeze() < 0) {
        snprintf(out->error, sizeof out->error, "floor: freeze timed out");
        return -1;
    }
    struct uffdio_writeprotect wp = {.range = reg.range, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    ioctl(c.uffd, UFFDIO_WRITEPROTECT, &wp);
    g->thaw();
    out->pause_ms = now_ms() - t0;
    for (uint64_t p = 0; p < c.pages; p += 256) {
        uint64_t end = p + 256 < c.pages ? p + 256 : c.pages;
        uint64_t run = p, len = 0;
        for (uint64_t q = p; q < end; q++) {
            bool mine = floor_claim(&c, q);
            if (mine) {
                memcpy(c.copy + q * PAGE, g->mem + q * PAGE, PAGE);
                __atomic_store_n(&c.state[q], 2, __ATOMIC_RELEASE);
                if (!len)
                    run = q;
                len++;
            }
            if ((!mine || q + 1 == end) && len) {
                floor_unprotect(&c, run, len);
                len = 0;
            }
        }
    }
    out->saved_ns = (uint64_t)(now_ms() * 1e6), out->saved_writes = g->writes();
    out->duration_ms = now_ms() - t0;
    atomic_store(&c.done, true);
    pthread_join(handler, NULL);
    out->faults = c.faults;
    out->extra_memory_bytes = g->size; /* it keeps a full copy */
    close(c.uffd);                     /* releases every protection */
    int rc = write_all(output, c.copy, g->size, out->error);
    out->output_bytes = g->size;
    munmap(c.copy, g->size);
    free(c.state);
    return rc;
}

/* ---- fork ---- */

/* Pages of the child that are no longer shared with the parent: the copies
 * the parent's writes forced. */
static uint64_t private_bytes(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid);
    FILE *f = fopen(path, "r");
    uint64_t kb = 0, v;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Private_Dirty: %lu kB", &v) == 1 || sscanf(line, "Private_Clean: %lu kB", &v) == 1)
            kb += v;
    fclose(f);
    return kb * 1024;
}

static int fork_snapshot(const struct baseline_guest *g, const char *output, struct baseline_result *out)
{
    int go[2], done[2];
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(done, O_CLOEXEC) < 0)
        return snprintf(out->error, sizeof out->error, "pipe: %s", strerror(errno)), -1;
    double t0 = now_ms();
    if (g->freeze() < 0)
        return snprintf(out->error, sizeof out->error, "fork: freeze timed out"), -1;
    pid_t child = fork();
    if (child == 0) {
        char b;
        if (read(go[0], &b, 1) != 1)
            _exit(1);
        char error[160];
        int rc = write_all(output, g->mem, g->size, error);
        /* Tell the parent we are done, then wait to be measured and reaped. */
        if (write(done[1], &rc, sizeof rc) < 0)
            _exit(1);
        if (read(go[0], &b, 1) < 0)
            _exit(1);
        _exit(rc ? 1 : 0);
    }
    g->thaw();
    out->pause_ms = now_ms() - t0;
    if (child < 0)
        return snprintf(out->error, sizeof out->error, "fork: %s", strerror(errno)), -1;
    char b = 1;
    int rc = -1;
    if (write(go[1], &b, 1) != 1 || read(done[0], &rc, sizeof rc) != sizeof rc)
        rc = -1;
    out->saved_ns = (uint64_t)(now_ms() * 1e6), out->saved_writes = g->writes(); /* copy-on-write ends with the child */
    out->duration_ms = now_ms() - t0;
    out->extra_memory_bytes = private_bytes(child);
    if (write(go[1], &b, 1) < 0)
        rc = -1;
    waitpid(child, NULL, 0);
    out->output_bytes = g->size;
    close(go[0]), close(go[1]), close(done[0]), close(done[1]);
    if (rc)
        snprintf(out->error, sizeof out->error, "fork: the child failed to write %s", output);
    return rc ? -1 : 0;
}

/* ---- stop-the-world ---- */

static int stw_snapshot(const struct baseline_guest *g, const char *output, struct baseline_result *out)
{
    double t0 = now_ms();
    if (g->freeze() < 0)
        return snprintf(out->error, sizeof out->error, "stop-the-world: freeze timed out"), -1;
    int rc = write_all(output, g->mem, g->size, out->error);
    g->thaw();
    out->saved_ns = (uint64_t)(now_ms() * 1e6), out->saved_writes = g->writes();
    out->pause_ms = out->duration_ms = now_ms() - t0;
    out->output_bytes = g->size;
    return rc;
}

int baseline_snapshot(const char *method, const struct baseline_guest *g, const char *output, struct baseline_result *out)
{
    memset(out, 0, sizeof *out);
    if (!strcmp(method, "floor"))
        return floor_snapshot(g, output, out);
    if (!strcmp(method, "fork"))
        return fork_snapshot(g, output, out);
    if (!strcmp(method, "stop-the-world"))
        return stw_snapshot(g, output, out);
    if (!strcmp(method, "none")) {
        /* No snapshot: the reference for the guest's throughput. */
        out->saved_ns = (uint64_t)(now_ms() * 1e6), out->saved_writes = g->writes();
        usleep(2000000);
        out->duration_ms = 2000;
        return 0;
    }
    snprintf(out->error, sizeof out->error, "unknown method %s", method);
    return -1;
}
