/* The toy VMM's guest: memory, KVM (or host threads), vCPUs, freeze/thaw. */
#include "toyvmm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

extern const uint8_t toy_guest_start[], toy_guest_end[];

void map_memory(void)
{
    /* --hugetlb: 2 MiB hugetlbfs pages (vm.nr_hugepages must hold the guest). */
    if (vmm.anon) {
        vmm.mem = mmap(NULL, vmm.mem_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | (vmm.hugetlb ? MAP_HUGETLB : MAP_NORESERVE), -1, 0);
    } else {
        vmm.memfd = memfd_create("toyvmm-guest", MFD_CLOEXEC | (vmm.hugetlb ? MFD_HUGETLB : 0));
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
void fill_memory(void)
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

void *thread_main(void *arg)
{
    /* The same guest code, called on a host thread. */
    ((guest_fn)(uintptr_t)toy_guest_start)(arg);
    return NULL;
}

void init_ctl(struct toy_ctl *c, uint32_t i, uint64_t area_base, uint32_t writers)
{
    memset(c, 0, sizeof *c);
    c->seed = 0x9E3779B97F4A7C15ull * (i + 1) + (uint64_t)getpid();
    if (i == 0)
        vmm.initial_seed = c->seed;
    c->area_base = area_base;
    c->area_pages = (vmm.mem_size - SYSTEM_AREA) / PAGE;
    c->interval_tsc = vmm.rate ? (uint64_t)(vmm.tsc_hz * writers / (double)vmm.rate) : 0;
    c->next_tsc = rdtsc();
    c->pattern = vmm.pattern;
    c->hot_pages = c->area_pages / 10 ? c->area_pages / 10 : 1;
}

void measure_tsc(void)
{
    uint64_t t0 = now_ns(), c0 = rdtsc();
    usleep(20000);
    vmm.tsc_hz = (double)(rdtsc() - c0) * 1e9 / (double)(now_ns() - t0);
}

/* The VM and its vCPUs, touching no guest memory when restoring: like
 * Firecracker, set up before the page-fault handler's handshake. */
static bool prepared, prepared_kvm;
void prepare_guest(void)
{
    prepared_kvm = !vmm.force_threads && setup_kvm();
    if (vmm.force_threads)
        snprintf(vmm.why_threads, sizeof vmm.why_threads, "--threads");
    prepared = true;
}

/* Threads named by role, so `vmsnap bench` can say where CPU went (ThreadCpu.ts). */
static void name_vcpu(pthread_t t, uint32_t i)
{
    char name[16];
    snprintf(name, sizeof name, "vcpu%u", i);
    pthread_setname_np(t, name);
}

void start_guest(void)
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
        name_vcpu(vmm.threads[i], i);
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
        name_vcpu(vmm.threads[i], i);
    }
}

void stop_guest(void)
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

/* Pause every vCPU between two writes; returns once all are parked (or
 * -ETIMEDOUT after 5 s). Spins for the first 50 us, then sleeps 20 us
 * between checks so that with few cores the vCPUs get the CPU to park. */
int freeze_guest(void)
{
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        __atomic_store_n(&vmm.ctl[i]->command, CMD_FREEZE, __ATOMIC_RELEASE);
    uint64_t start = now_ns(), deadline = start + 5000000000ull;
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        while (__atomic_load_n(&vmm.ctl[i]->parked, __ATOMIC_ACQUIRE) != 1) {
            uint64_t t = now_ns();
            if (t > deadline)
                return -ETIMEDOUT;
            if (t - start >= 50000)
                nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
        }
    return 0;
}

void thaw_guest(void)
{
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        __atomic_store_n(&vmm.ctl[i]->command, CMD_RUN, __ATOMIC_RELEASE);
}
