/*
 * vmsnap-toyvmm: a toy VMM for tests, the demo and benchmarks.
 *
 * Guest RAM is a memfd (or anonymous memory with --anon). With /dev/kvm it
 * creates a VM whose vCPUs run guest_code.S in 64-bit ring 3 with no guest
 * kernel (identity page tables with 2 MiB user pages); without KVM (or with
 * --threads) it runs the same code on host threads and says so. Every write
 * is timed by the guest itself (rdtsc) into a histogram in guest memory.
 *
 * With --agent SOCK it hands its uffd and memory to a vmsnap agent
 * (docs/agent-protocol.md), obeys freeze/thaw, and at the freeze can write a
 * reference copy of guest memory (--reference FILE) for consistency checks.
 * --device forks a second process that maps the same memfd, writes into it
 * and connects to the agent as a device.
 *
 * Prints one JSON report on stdout when it exits (SIGTERM, SIGINT, --run-ms).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "baselines.h"

#define PAGE 4096ull
#define HUGE (2ull << 20)
#define SYSTEM_AREA HUGE /* page tables, code, control blocks */
#define PML4_GPA 0x1000ull
#define PDPT_GPA 0x2000ull
#define PD_GPA 0x3000ull /* one PD page per GiB */
#define CODE_GPA 0x100000ull
#define CTL_GPA 0x110000ull
#define MAX_VCPUS 32
#define HIST 64

extern const uint8_t toy_guest_start[], toy_guest_end[];

/* Shared with guest_code.S: keep the offsets in step. */
struct toy_ctl {
    uint64_t seed, area_base, area_pages, interval_tsc, writes, command, parked, max_tsc, total_tsc, next_tsc;
    uint64_t pattern; /* 0 random pages, 1 sequential */
    uint64_t pad[5];
    uint64_t hist[HIST];
};
_Static_assert(__builtin_offsetof(struct toy_ctl, command) == 40, "ctl layout");
_Static_assert(__builtin_offsetof(struct toy_ctl, pattern) == 80, "ctl layout");
_Static_assert(__builtin_offsetof(struct toy_ctl, hist) == 128, "ctl layout");

enum { CMD_RUN = 0, CMD_FREEZE = 1, CMD_RETURN = 2 };

struct phase {
    uint64_t writes, total_tsc, max_tsc, hist[HIST];
    double seconds;
};

static struct {
    uint64_t mem_size;
    uint32_t vcpus;
    uint64_t rate;
    bool anon, force_threads, device, is_device, sequential;
    const char *agent, *vm_id, *reference;
    uint64_t run_ms;
    uint32_t fill_percent;
    uint64_t progress_ms;
    const char *local_method, *output;
    uint64_t snapshot_at_ms, after_ms;
    bool have_local;
    struct baseline_result local;
    const char *restore_from, *verify_image;
    double restore_first_write_ms;
    int64_t verify_mismatches; /* -1: not verified */
    uint64_t initial_seed;
    uint64_t last_progress_ns;
    uint8_t *mem;
    int memfd;
    int kvm, vm;
    bool kvm_mode;
    char why_threads[160];
    struct toy_ctl *ctl[MAX_VCPUS];
    pthread_t threads[MAX_VCPUS];
    int vcpu_fd[MAX_VCPUS];
    struct kvm_run *run[MAX_VCPUS];
    double tsc_hz;
    _Atomic bool stopping;
    pid_t device_pid;
    struct phase snap[4]; /* cumulative counters at phase starts */
    struct phase phases[3];
    int phase;
    uint64_t phase_start_ns;
    uint32_t snapshots_done, snapshots_failed;
} vmm = {.mem_size = 256ull << 20, .vcpus = 1, .vm_id = "toy", .memfd = -1, .kvm = -1, .vm = -1};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static void die(const char *what)
{
    fprintf(stderr, "toyvmm: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void on_signal(int sig)
{
    (void)sig;
    atomic_store(&vmm.stopping, true);
}

static void on_kick(int sig) { (void)sig; }

/* ---- guest memory and KVM ---- */

static void map_memory(void)
{
    if (vmm.anon) {
        vmm.mem = mmap(NULL, vmm.mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    } else {
        vmm.memfd = memfd_create("toyvmm-guest", MFD_CLOEXEC);
        if (vmm.memfd < 0 || ftruncate(vmm.memfd, (off_t)vmm.mem_size) < 0)
            die("memfd");
        vmm.mem = mmap(NULL, vmm.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, vmm.memfd, 0);
    }
    if (vmm.mem == MAP_FAILED)
        die("mmap guest memory");
}

/* Identity map all guest memory with 2 MiB user pages, accessed and dirty
 * preset so the CPU never writes the page tables. */
static void build_page_tables(void)
{
    uint64_t *pml4 = (uint64_t *)(vmm.mem + PML4_GPA), *pdpt = (uint64_t *)(vmm.mem + PDPT_GPA);
    const uint64_t P = 1, RW = 2, US = 4, A = 1 << 5, D = 1 << 6, PS = 1 << 7;
    pml4[0] = PDPT_GPA | P | RW | US | A;
    uint64_t gib = (vmm.mem_size + (1ull << 30) - 1) >> 30;
    for (uint64_t g = 0; g < gib; g++) {
        uint64_t *pd = (uint64_t *)(vmm.mem + PD_GPA + g * PAGE);
        pdpt[g] = (PD_GPA + g * PAGE) | P | RW | US | A;
        for (uint64_t i = 0; i < 512; i++) {
            uint64_t gpa = (g << 30) + i * HUGE;
            if (gpa < vmm.mem_size)
                pd[i] = gpa | P | RW | US | A | D | PS;
        }
    }
}

/* Like a booted guest: the first fill_percent of the work area holds data,
 * half random and half repeated (it compresses about 2x); the rest is zero. */
static void fill_memory(void)
{
    uint64_t pages = (vmm.mem_size - SYSTEM_AREA) / PAGE * vmm.fill_percent / 100, s = 0x2545F4914F6CDD1Dull;
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t *w = (uint64_t *)(vmm.mem + SYSTEM_AREA + p * PAGE);
        for (size_t i = 0; i < PAGE / 16; i++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            w[i] = s;
        }
        for (size_t i = PAGE / 16; i < PAGE / 8; i++)
            w[i] = p;
    }
}

static void set_segment(struct kvm_segment *s, uint16_t selector, uint8_t type, bool code)
{
    *s = (struct kvm_segment){.base = 0, .limit = 0xffffffff, .selector = selector, .type = type, .present = 1,
                              .dpl = 3, .db = code ? 0 : 1, .s = 1, .l = code ? 1 : 0, .g = 1};
}

static bool setup_kvm(void)
{
    vmm.kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vmm.kvm < 0) {
        snprintf(vmm.why_threads, sizeof vmm.why_threads, "/dev/kvm: %s", strerror(errno));
        return false;
    }
    vmm.vm = ioctl(vmm.kvm, KVM_CREATE_VM, 0);
    if (vmm.vm < 0) {
        snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM_CREATE_VM: %s", strerror(errno));
        return false;
    }
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = vmm.mem_size, .userspace_addr = (uint64_t)(uintptr_t)vmm.mem};
    if (ioctl(vmm.vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
        return false;
    }
    /* A restored guest's page tables and code come with its memory. */
    if (!vmm.restore_from) {
        build_page_tables();
        memcpy(vmm.mem + CODE_GPA, toy_guest_start, (size_t)(toy_guest_end - toy_guest_start));
    }
    int run_size = ioctl(vmm.kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        vmm.vcpu_fd[i] = ioctl(vmm.vm, KVM_CREATE_VCPU, i);
        if (vmm.vcpu_fd[i] < 0) {
            snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM_CREATE_VCPU: %s", strerror(errno));
            return false;
        }
        vmm.run[i] = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vmm.vcpu_fd[i], 0);
        struct kvm_sregs sregs;
        ioctl(vmm.vcpu_fd[i], KVM_GET_SREGS, &sregs);
        sregs.cr0 = 0x80000001ull; /* PE | PG */
        sregs.cr3 = PML4_GPA;
        sregs.cr4 = 0x20;     /* PAE */
        sregs.efer = 0x500;   /* LME | LMA */
        set_segment(&sregs.cs, 0x23, 0xb, true);
        set_segment(&sregs.ds, 0x1b, 0x3, false);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        if (ioctl(vmm.vcpu_fd[i], KVM_SET_SREGS, &sregs) < 0) {
            snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM_SET_SREGS: %s", strerror(errno));
            return false;
        }
        struct kvm_regs regs = {.rip = CODE_GPA, .rflags = 0x2, .rdi = CTL_GPA + i * PAGE};
        if (ioctl(vmm.vcpu_fd[i], KVM_SET_REGS, &regs) < 0) {
            snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM_SET_REGS: %s", strerror(errno));
            return false;
        }
    }
    return true;
}

static void *vcpu_main(void *arg)
{
    uint32_t i = (uint32_t)(uintptr_t)arg;
    while (!atomic_load(&vmm.stopping)) {
        int rc = ioctl(vmm.vcpu_fd[i], KVM_RUN, 0);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0 || vmm.run[i]->exit_reason != KVM_EXIT_INTR) {
            fprintf(stderr, "toyvmm: vcpu %u stopped: KVM_RUN rc=%d exit_reason=%u\n", i, rc,
                    rc < 0 ? 0 : vmm.run[i]->exit_reason);
            break;
        }
    }
    return NULL;
}

typedef void (*guest_fn)(struct toy_ctl *);

static void *thread_main(void *arg)
{
    /* The same guest code, called on a host thread. */
    ((guest_fn)(uintptr_t)toy_guest_start)(arg);
    return NULL;
}

static void init_ctl(struct toy_ctl *c, uint32_t i, uint64_t area_base, uint32_t writers)
{
    memset(c, 0, sizeof *c);
    c->seed = 0x9E3779B97F4A7C15ull * (i + 1) + (uint64_t)getpid();
    if (i == 0)
        vmm.initial_seed = c->seed;
    c->area_base = area_base;
    c->area_pages = (vmm.mem_size - SYSTEM_AREA) / PAGE;
    c->interval_tsc = vmm.rate ? (uint64_t)(vmm.tsc_hz * writers / (double)vmm.rate) : 0;
    c->next_tsc = rdtsc();
    c->pattern = vmm.sequential ? 1 : 0;
}

static void measure_tsc(void)
{
    uint64_t t0 = now_ns(), c0 = rdtsc();
    usleep(20000);
    vmm.tsc_hz = (double)(rdtsc() - c0) * 1e9 / (double)(now_ns() - t0);
}

/* The VM and its vCPUs, touching no guest memory when restoring: like
 * Firecracker, set up before the page-fault handler's handshake. */
static bool prepared, prepared_kvm;
static void prepare_guest(void)
{
    prepared_kvm = !vmm.force_threads && setup_kvm();
    if (vmm.force_threads)
        snprintf(vmm.why_threads, sizeof vmm.why_threads, "--threads");
    prepared = true;
}

static void start_guest(void)
{
    if (!prepared)
        prepare_guest();
    bool kvm = prepared_kvm;
    vmm.kvm_mode = kvm;
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        vmm.ctl[i] = (struct toy_ctl *)(vmm.mem + CTL_GPA + i * PAGE);
        init_ctl(vmm.ctl[i], i, kvm ? SYSTEM_AREA : (uint64_t)(uintptr_t)(vmm.mem + SYSTEM_AREA), vmm.vcpus);
        int rc = pthread_create(&vmm.threads[i], NULL, kvm ? vcpu_main : thread_main,
                                kvm ? (void *)(uintptr_t)i : (void *)vmm.ctl[i]);
        if (rc)
            die("pthread_create");
    }
    if (!kvm)
        return;
    /* Check that the vCPUs really run guest code; fall back if they do not.
     * (Generous: a lazily restored guest's first pages come from a handler.) */
    for (int i = 0; i < 400; i++) {
        if (__atomic_load_n(&vmm.ctl[0]->writes, __ATOMIC_ACQUIRE) > 0)
            return;
        usleep(5000);
    }
    snprintf(vmm.why_threads, sizeof vmm.why_threads, "KVM vCPUs made no progress");
    atomic_store(&vmm.stopping, true);
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        pthread_kill(vmm.threads[i], SIGUSR1);
        pthread_join(vmm.threads[i], NULL);
    }
    atomic_store(&vmm.stopping, false);
    vmm.kvm_mode = false;
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        init_ctl(vmm.ctl[i], i, (uint64_t)(uintptr_t)(vmm.mem + SYSTEM_AREA), vmm.vcpus);
        pthread_create(&vmm.threads[i], NULL, thread_main, vmm.ctl[i]);
    }
}

static void stop_guest(void)
{
    atomic_store(&vmm.stopping, true);
    /* Host threads return from the guest loop; vCPUs are kicked out of KVM_RUN. */
    if (!vmm.kvm_mode)
        for (uint32_t i = 0; i < vmm.vcpus; i++)
            vmm.ctl[i]->command = CMD_RETURN;
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        if (vmm.kvm_mode)
            for (int k = 0; k < 100 && pthread_tryjoin_np(vmm.threads[i], NULL) == EBUSY; k++) {
                pthread_kill(vmm.threads[i], SIGUSR1);
                usleep(1000);
            }
        else
            pthread_join(vmm.threads[i], NULL);
    }
}

/* Pause every vCPU between two writes; returns once all are parked. */
static int freeze_guest(void)
{
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        __atomic_store_n(&vmm.ctl[i]->command, CMD_FREEZE, __ATOMIC_RELEASE);
    uint64_t deadline = now_ns() + 5000000000ull;
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        while (__atomic_load_n(&vmm.ctl[i]->parked, __ATOMIC_ACQUIRE) != 1)
            if (now_ns() > deadline)
                return -ETIMEDOUT;
    return 0;
}

static void thaw_guest(void)
{
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        __atomic_store_n(&vmm.ctl[i]->command, CMD_RUN, __ATOMIC_RELEASE);
}

/* ---- phases: latency as the guest saw it ---- */

static void read_counters(struct phase *out)
{
    memset(out, 0, sizeof *out);
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        struct toy_ctl *c = vmm.ctl[i];
        out->writes += c->writes;
        out->total_tsc += c->total_tsc;
        for (int b = 0; b < HIST; b++)
            out->hist[b] += c->hist[b];
    }
}

/* Close the current phase (0 before, 1 during, 2 after) and start the next. */
static void next_phase(void)
{
    if (vmm.phase > 2)
        return;
    struct phase now;
    read_counters(&now);
    struct phase *p = &vmm.phases[vmm.phase];
    p->writes = now.writes - vmm.snap[vmm.phase].writes;
    p->total_tsc = now.total_tsc - vmm.snap[vmm.phase].total_tsc;
    for (int b = 0; b < HIST; b++)
        p->hist[b] = now.hist[b] - vmm.snap[vmm.phase].hist[b];
    p->max_tsc = 0;
    for (uint32_t i = 0; i < vmm.vcpus; i++) {
        if (vmm.ctl[i]->max_tsc > p->max_tsc)
            p->max_tsc = vmm.ctl[i]->max_tsc;
        vmm.ctl[i]->max_tsc = 0;
    }
    uint64_t t = now_ns();
    p->seconds = (double)(t - vmm.phase_start_ns) / 1e9;
    vmm.phase_start_ns = t;
    vmm.phase++;
    vmm.snap[vmm.phase] = now;
}

static double bucket_upper_ns(int b)
{
    double lower = (double)(1ull << (b / 2)) * (b % 2 ? 1.5 : 1.0);
    double upper = b % 2 ? (double)(1ull << (b / 2 + 1)) : lower * 1.5;
    return upper * 1e9 / vmm.tsc_hz;
}

static double quantile_us(const struct phase *p, double q)
{
    uint64_t total = 0, seen = 0;
    for (int b = 0; b < HIST; b++)
        total += p->hist[b];
    if (!total)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)total + 0.999999);
    for (int b = 0; b < HIST; b++) {
        seen += p->hist[b];
        if (seen >= rank) {
            double us = bucket_upper_ns(b) / 1000.0, max = (double)p->max_tsc * 1e6 / vmm.tsc_hz;
            return us < max ? us : max;
        }
    }
    return 0;
}

/* Writes that took at least 1 ms (buckets wholly above 1 ms). */
static uint64_t stalls_over_1ms(const struct phase *p)
{
    uint64_t n = 0;
    for (int b = 0; b < HIST; b++) {
        double lower_ns = (double)(1ull << (b / 2)) * (b % 2 ? 1.5 : 1.0) * 1e9 / vmm.tsc_hz;
        if (lower_ns >= 1e6)
            n += p->hist[b];
    }
    return n;
}

static void print_phase(FILE *out, const char *name, const struct phase *p, bool last)
{
    fprintf(out, "\"%s\":{\"writes\":%llu,\"seconds\":%.3f,\"writesPerSecond\":%.0f,\"blockedMs\":%.1f,"
           "\"stallsOver1ms\":%llu,\"latencyUs\":{\"p50\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"max\":%.2f}}%s",
           name, (unsigned long long)p->writes, p->seconds, p->seconds > 0 ? (double)p->writes / p->seconds : 0,
           (double)p->total_tsc * 1e3 / vmm.tsc_hz, (unsigned long long)stalls_over_1ms(p), quantile_us(p, 0.5),
           quantile_us(p, 0.99), quantile_us(p, 0.999), (double)p->max_tsc * 1e6 / vmm.tsc_hz, last ? "" : ",");
}

static void report(FILE *out)
{
    while (vmm.phase <= 2)
        next_phase();
    fprintf(out, "{\"role\":\"%s\",\"kind\":\"%s\",\"whyThreads\":\"%s\",\"vcpus\":%u,\"memBytes\":%llu,\"memory\":\"%s\","
           "\"tscHz\":%.0f,\"snapshots\":%u,\"snapshotsFailed\":%u,\"phases\":{",
           vmm.is_device ? "device" : "vmm", vmm.kvm_mode ? "kvm" : "threads", vmm.kvm_mode ? "" : vmm.why_threads,
           vmm.vcpus, (unsigned long long)vmm.mem_size, vmm.anon ? "anon" : "memfd", vmm.tsc_hz, vmm.snapshots_done,
           vmm.snapshots_failed);
    /* phases: before the first freeze, during the snapshot, after it */
    print_phase(out, "before", &vmm.phases[0], false);
    print_phase(out, "during", &vmm.phases[1], false);
    print_phase(out, "after", &vmm.phases[2], true);
    fprintf(out, "}");
    if (vmm.restore_from)
        fprintf(out, ",\"restore\":{\"firstWriteMs\":%.3f,\"verifyMismatches\":%lld}", vmm.restore_first_write_ms,
                (long long)vmm.verify_mismatches);
    if (vmm.have_local)
        fprintf(out, ",\"snapshot\":{\"method\":\"%s\",\"ok\":%s,\"error\":\"%s\",\"pauseMs\":%.3f,\"durationMs\":%.1f,"
                "\"outputBytes\":%llu,\"faults\":%llu,\"extraMemoryBytes\":%llu}",
                vmm.local_method, vmm.local.error[0] ? "false" : "true", vmm.local.error, vmm.local.pause_ms,
                vmm.local.duration_ms, (unsigned long long)vmm.local.output_bytes, (unsigned long long)vmm.local.faults,
                (unsigned long long)vmm.local.extra_memory_bytes);
    fprintf(out, "}\n");
    fflush(out);
}

/* ---- the agent connection (docs/agent-protocol.md) ---- */

/* Connect to a Unix socket, waiting up to 5 s for its server to listen. */
static int connect_unix(const char *path, const char *what)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    for (int attempt = 0; connect(s, (struct sockaddr *)&addr, sizeof addr) < 0; attempt++) {
        if (attempt > 200)
            die(what);
        usleep(25000);
    }
    return s;
}

/* One message with fds attached (SCM_RIGHTS). */
static int send_with_fds(int sock, const char *body, size_t len, const int *fds, int nfds)
{
    char control[CMSG_SPACE(sizeof(int) * 4)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = (void *)body, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

static void send_hello(int sock)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        die("userfaultfd");
    char body[1024];
    int fds[2] = {uffd, vmm.memfd};
    int nfds = vmm.anon ? 1 : 2;
    int n = snprintf(body, sizeof body,
                     "{\"type\":\"hello\",\"version\":1,\"vm\":\"%s\",\"role\":\"%s\",\"pid\":%d,\"uffd\":0,"
                     "\"regions\":[{\"gpa\":\"0x0\",\"size\":%llu,\"pageSize\":4096,\"fd\":%s,\"offset\":0,"
                     "\"hva\":\"0x%llx\"}]}\n",
                     vmm.vm_id, vmm.is_device ? "device" : "vmm", getpid(), (unsigned long long)vmm.mem_size,
                     vmm.anon ? "null" : "1", (unsigned long long)(uintptr_t)vmm.mem);
    if (send_with_fds(sock, body, (size_t)n, fds, nfds) < 0)
        die("send hello");
    /* The agent now holds the only reference: if it dies, the uffd is
     * released, which removes all protection and wakes every vCPU. */
    close(uffd);
}

static void send_line(int sock, const char *line)
{
    size_t len = strlen(line);
    if (send(sock, line, len, MSG_NOSIGNAL) != (ssize_t)len)
        fprintf(stderr, "toyvmm: agent connection lost while replying\n");
}

static void take_reference(void)
{
    int fd = open(vmm.reference, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("open reference");
    for (uint64_t off = 0; off < vmm.mem_size;) {
        ssize_t w = pwrite(fd, vmm.mem + off, vmm.mem_size - off > (64 << 20) ? (64 << 20) : vmm.mem_size - off, (off_t)off);
        if (w <= 0)
            die("write reference");
        off += (uint64_t)w;
    }
    close(fd);
}

static bool has_type(const char *line, const char *type)
{
    char want[64];
    snprintf(want, sizeof want, "\"type\":\"%s\"", type);
    return strstr(line, want) != NULL;
}

static void spawn_device(int vmm_sock);

/* With --progress-ms: a line of total guest writes so far, for watchers. */
static void maybe_progress(void)
{
    if (!vmm.progress_ms || now_ns() - vmm.last_progress_ns < vmm.progress_ms * 1000000ull)
        return;
    vmm.last_progress_ns = now_ns();
    uint64_t writes = 0;
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        writes += vmm.ctl[i]->writes;
    fprintf(stderr, "toyvmm: progress pid=%d writes=%llu\n", getpid(), (unsigned long long)writes);
}

/* Keep the guest running until SIGTERM/SIGINT or deadline_ns (0: none),
 * printing --progress-ms lines. */
static void run_until(uint64_t deadline_ns)
{
    while (!atomic_load(&vmm.stopping) && (!deadline_ns || now_ns() < deadline_ns)) {
        maybe_progress();
        usleep(10000);
    }
}

/* The line drivers (ToyVmm.ts, tests) wait for. */
static void announce_ready(void)
{
    fprintf(stderr, "toyvmm: ready pid=%d kind=%s role=%s\n", getpid(), vmm.kvm_mode ? "kvm" : "threads",
            vmm.is_device ? "device" : "vmm");
}

/* Serve the agent's messages until it goes away or we are told to stop. */
static void agent_loop(int sock)
{
    char buf[65536];
    size_t used = 0;
    uint64_t deadline = vmm.run_ms ? now_ns() + vmm.run_ms * 1000000ull : 0;
    while (!atomic_load(&vmm.stopping)) {
        if (deadline && now_ns() > deadline)
            break;
        maybe_progress();
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        if (poll(&pfd, 1, 20) <= 0)
            continue;
        ssize_t n = recv(sock, buf + used, sizeof buf - used - 1, 0);
        if (n <= 0) {
            fprintf(stderr, "toyvmm: agent connection closed; guest keeps running\n");
            break;
        }
        used += (size_t)n;
        buf[used] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            if (has_type(line, "welcome")) {
                announce_ready();
                if (vmm.device && vmm.device_pid == 0)
                    spawn_device(sock);
            } else if (has_type(line, "freeze")) {
                int rc = freeze_guest();
                if (vmm.phase == 0)
                    next_phase();
                if (rc == 0 && vmm.reference && !vmm.is_device)
                    take_reference();
                send_line(sock, rc == 0 ? "{\"type\":\"frozen\"}\n" : "{\"type\":\"error\",\"message\":\"freeze timed out\"}\n");
            } else if (has_type(line, "thaw")) {
                thaw_guest();
                send_line(sock, "{\"type\":\"thawed\"}\n");
            } else if (has_type(line, "done") || has_type(line, "failed")) {
                if (has_type(line, "done"))
                    vmm.snapshots_done++;
                else
                    vmm.snapshots_failed++;
                if (vmm.phase == 1)
                    next_phase();
                if (vmm.after_ms) /* measure the after phase, then exit */
                    deadline = now_ns() + vmm.after_ms * 1000000ull;
            } else if (has_type(line, "error")) {
                fprintf(stderr, "toyvmm: agent refused us: %s\n", line);
            }
            line = nl + 1;
        }
        used = (size_t)(buf + used - line);
        memmove(buf, line, used);
    }
    /* Whatever happened, the guest must not stay frozen. */
    thaw_guest();
    run_until(deadline);
}

static void agent_session(void);

/* The device process: same memfd, its own writer thread, uffd and agent
 * connection. Forked once the VMM is welcomed (a device must join a VMM). */
static void spawn_device(int vmm_sock)
{
    vmm.device_pid = fork();
    if (vmm.device_pid < 0)
        die("fork");
    if (vmm.device_pid > 0)
        return;
    close(vmm_sock);
    vmm.is_device = true;
    vmm.device = false;
    vmm.vcpus = 1;
    vmm.kvm_mode = false;
    vmm.phase = 0;
    vmm.phase_start_ns = now_ns();
    snprintf(vmm.why_threads, sizeof vmm.why_threads, "device process");
    struct toy_ctl *c = aligned_alloc(PAGE, PAGE);
    vmm.ctl[0] = c;
    init_ctl(c, 7, (uint64_t)(uintptr_t)(vmm.mem + SYSTEM_AREA), 1);
    pthread_create(&vmm.threads[0], NULL, thread_main, c);
    agent_session();
    stop_guest();
    /* The device's report goes to stderr: stdout belongs to the VMM. */
    report(stderr);
    exit(0);
}

static void agent_session(void)
{
    int sock = connect_unix(vmm.agent, "connect to the agent");
    send_hello(sock);
    agent_loop(sock);
    close(sock);
}

/* ---- restore mode: a Firecracker-style VMM whose memory a page-fault handler serves ---- */

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
 * wrote since. */
static void verify_restored(void)
{
    uint64_t area = vmm.mem_size - SYSTEM_AREA;
    uint8_t *expected = malloc(area);
    int fd = open(vmm.verify_image, O_RDONLY | O_CLOEXEC);
    if (!expected || fd < 0 || pread(fd, expected, area, (off_t)SYSTEM_AREA) != (ssize_t)area)
        die("read the verify image");
    close(fd);
    struct toy_ctl *c = vmm.ctl[0];
    uint64_t s = vmm.initial_seed;
    for (uint64_t w = 0; w < c->writes; w++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        uint64_t page = (c->pattern ? w : s >> 12) % c->area_pages;
        memcpy(expected + page * PAGE + (s & 0xff8), &s, 8);
    }
    vmm.verify_mismatches = 0;
    for (uint64_t p = 0; p < area / PAGE; p++)
        if (memcmp(expected + p * PAGE, vmm.mem + SYSTEM_AREA + p * PAGE, PAGE))
            vmm.verify_mismatches++;
    free(expected);
}

static void run_restored(void)
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

static int freeze_for_baseline(void) { return freeze_guest(); }

/* A baseline method (baselines.c) at --snapshot-at-ms, then --after-ms. */
static void run_local_snapshot(void)
{
    announce_ready();
    usleep((useconds_t)(vmm.snapshot_at_ms * 1000));
    next_phase();
    struct baseline_guest g = {.mem = vmm.mem, .size = vmm.mem_size, .freeze = freeze_for_baseline, .thaw = thaw_guest};
    vmm.have_local = true;
    if (baseline_snapshot(vmm.local_method, &g, vmm.output ? vmm.output : "/dev/null", &vmm.local) < 0)
        fprintf(stderr, "toyvmm: %s\n", vmm.local.error);
    next_phase();
    run_until(now_ns() + vmm.after_ms * 1000000ull);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vmsnap-toyvmm [--mem MiB] [--vcpus N] [--rate pages/s] [--pattern random|sequential] [--anon] [--threads]\n"
            "                     [--agent SOCK] [--vm ID] [--device] [--reference FILE] [--run-ms N] [--fill PERCENT] [--progress-ms N]\n"
            "                     [--local floor|fork|stop-the-world --output FILE --snapshot-at-ms N] [--after-ms N]\n"
            "                     [--restore-from SOCK [--verify-image RAW]]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--mem") && v) vmm.mem_size = strtoull(v, NULL, 0) << 20, i++;
        else if (!strcmp(a, "--vcpus") && v) vmm.vcpus = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--rate") && v) vmm.rate = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--agent") && v) vmm.agent = v, i++;
        else if (!strcmp(a, "--vm") && v) vmm.vm_id = v, i++;
        else if (!strcmp(a, "--reference") && v) vmm.reference = v, i++;
        else if (!strcmp(a, "--run-ms") && v) vmm.run_ms = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--fill") && v) vmm.fill_percent = (uint32_t)atoi(v), i++;
        else if (!strcmp(a, "--progress-ms") && v) vmm.progress_ms = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--local") && v) vmm.local_method = v, i++;
        else if (!strcmp(a, "--output") && v) vmm.output = v, i++;
        else if (!strcmp(a, "--snapshot-at-ms") && v) vmm.snapshot_at_ms = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--after-ms") && v) vmm.after_ms = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--restore-from") && v) vmm.restore_from = v, i++;
        else if (!strcmp(a, "--verify-image") && v) vmm.verify_image = v, i++;
        else if (!strcmp(a, "--pattern") && v) {
            if (strcmp(v, "random") && strcmp(v, "sequential"))
                usage();
            vmm.sequential = !strcmp(v, "sequential"), i++;
        }
        else if (!strcmp(a, "--anon")) vmm.anon = true;
        else if (!strcmp(a, "--threads")) vmm.force_threads = true;
        else if (!strcmp(a, "--device")) vmm.device = true;
        else usage();
    }
    if (vmm.vcpus < 1 || vmm.vcpus > MAX_VCPUS || vmm.mem_size < 2 * SYSTEM_AREA || vmm.mem_size % HUGE)
        usage();
    if (vmm.device && vmm.anon) {
        fprintf(stderr, "toyvmm: --device needs memfd memory (not --anon)\n");
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct sigaction kick = {.sa_handler = on_kick};
    sigaction(SIGUSR1, &kick, NULL);
    signal(SIGPIPE, SIG_IGN);
    measure_tsc();
    map_memory();
    vmm.verify_mismatches = -1;
    if (vmm.restore_from) {
        /* Guest memory comes from the page-fault handler: touch nothing before the handshake. */
        vmm.phase_start_ns = now_ns();
        run_restored();
        stop_guest();
        report(stdout);
        return 0;
    }
    fill_memory();
    vmm.phase_start_ns = now_ns();

    start_guest();
    if (!vmm.kvm_mode)
        fprintf(stderr, "toyvmm: running the guest on host threads (%s)\n", vmm.why_threads);
    if (vmm.local_method) {
        run_local_snapshot();
    } else if (vmm.agent) {
        agent_session();
    } else {
        announce_ready();
        run_until(vmm.run_ms ? now_ns() + vmm.run_ms * 1000000ull : 0);
    }
    stop_guest();
    if (vmm.device_pid > 0) {
        kill(vmm.device_pid, SIGTERM);
        waitpid(vmm.device_pid, NULL, 0);
    }
    report(stdout);
    return 0;
}
