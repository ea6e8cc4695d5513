/*
 * The toy VMM's shared declarations. The program runs one VM, so its state
 * is one struct, `vmm` (defined in main.c), shared by the program's files:
 * the vmsnap libraries have no globals; this test program keeps one.
 *
 *   main.c          options, the run modes, the exit report's trigger
 *   vm.c            guest memory, KVM (or host threads), vCPUs, freeze/thaw
 *   phases.c        the guest's own counters per phase, the JSON report
 *   sock.c          Unix socket connect-with-retry, sending fds
 *   agent_client.c  the vmsnap agent protocol (docs/agent-protocol.md), the device process
 *   restore_mode.c  lazy restore through a page-fault handler (Firecracker's handshake)
 *   baselines.c     the snapshot methods vmsnap is measured against
 */
#ifndef TOYVMM_H
#define TOYVMM_H

#define _GNU_SOURCE
#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <time.h>

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
    uint64_t pattern;   /* PATTERN_* */
    uint64_t hot_pages; /* PATTERN_HOT: the hot set, the first hot_pages of the area */
    uint64_t pad[4];
    uint64_t hist[HIST];
};
_Static_assert(__builtin_offsetof(struct toy_ctl, command) == 40, "ctl layout");
_Static_assert(__builtin_offsetof(struct toy_ctl, pattern) == 80, "ctl layout");
_Static_assert(__builtin_offsetof(struct toy_ctl, hot_pages) == 88, "ctl layout");
_Static_assert(__builtin_offsetof(struct toy_ctl, hist) == 128, "ctl layout");

/* Which page each write goes to (guest_code.S; toy_page_of replays it). */
enum { PATTERN_RANDOM = 0, PATTERN_SEQUENTIAL = 1, PATTERN_HOT = 2 };
/* PATTERN_HOT: a write goes to the hot set when the top byte of its random
 * number is below this (230 of 256, about 90 % of writes). */
#define HOT_THRESHOLD 230

/* The page the guest's write number w (0-based) with random number r goes to. */
static inline uint64_t toy_page_of(const struct toy_ctl *c, uint64_t w, uint64_t r)
{
    if (c->pattern == PATTERN_SEQUENTIAL)
        return w % c->area_pages;
    if (c->pattern == PATTERN_HOT && (r >> 56) < HOT_THRESHOLD)
        return (r >> 12) % c->hot_pages;
    return (r >> 12) % c->area_pages;
}

/* The guest's total writes at a moment (CLOCK_MONOTONIC ns), sampled by a
 * thread of the VMM every SAMPLE_MS; benchmarks cut their windows from it. */
struct sample {
    uint64_t t_ns, writes;
};
#define SAMPLE_MS 10
#define MAX_SAMPLES 60000 /* 10 minutes; later samples are dropped */
enum { CMD_RUN = 0, CMD_FREEZE = 1, CMD_RETURN = 2 };

struct phase {
    uint64_t writes, total_tsc, max_tsc, hist[HIST];
    double seconds;
};

/* The VM: options, guest memory, vCPUs and the guest's counters per phase. */
struct toyvmm {
    uint64_t mem_size;
    uint32_t vcpus;
    uint64_t rate;
    bool anon, force_threads, device, is_device;
    bool hugetlb; /* guest RAM in 2 MiB hugetlbfs pages (memfd MFD_HUGETLB, or MAP_HUGETLB with anon) */
    bool balloon;                      /* --balloon: keep discarding guest pages; held from prepare to done */
    _Atomic uint64_t balloon_discards; /* pages the balloon discarded */
    bool alias_at_thaw;                /* --alias-at-thaw: at the first thaw, map the memfd again and write every page through it */
    bool fork_at_thaw;                 /* --fork-at-thaw: at the first thaw, fork a child that writes every page and exits */
    uint32_t pattern; /* PATTERN_* */
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
    uint64_t changed_pages, changed_hot_pages;
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
    /* Moments (CLOCK_MONOTONIC ns, 0: none): the guest started, the first
     * snapshot was begun, its cut (all vCPUs frozen), and its last page saved
     * (the local methods; an agent's driver knows its own). */
    uint64_t start_ns, begin_ns, cut_ns, saved_ns;
    uint64_t cut_writes, saved_writes; /* the guest's total writes at the cut and at saved_ns */
    struct sample *samples;
    _Atomic size_t nsamples;
    pthread_t sampler;
    _Atomic bool sampling;
};

extern struct toyvmm vmm;

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* main.c */
void die(const char *what);
void announce_ready(void);
void run_until(uint64_t deadline_ns);

/* vm.c */
void map_memory(void);
void fill_memory(void);
void measure_tsc(void);
void prepare_guest(void);
void start_guest(void);
void stop_guest(void);
int freeze_guest(void);
void thaw_guest(void);
void init_ctl(struct toy_ctl *c, uint32_t i, uint64_t area_base, uint32_t writers);
void *thread_main(void *arg);

/* phases.c */
uint64_t total_writes(void);
void start_sampler(void);
void stop_sampler(void);
void next_phase(void);
void maybe_progress(void);
void report(FILE *out);

/* sock.c */
int connect_unix(const char *path, const char *what);
int send_with_fds(int sock, const char *body, size_t len, const int *fds, int nfds);

/* agent_client.c */
void agent_session(void);

/* restore_mode.c */
void run_restored(void);

#endif
