/*
 * vmsnap-toyvmm: a toy VMM for tests, the demo and benchmarks.
 *
 * Guest RAM is a memfd (or anonymous memory with --anon), in 2 MiB hugetlbfs
 * pages with --hugetlb. With /dev/kvm it
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
#include "toyvmm.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

struct toyvmm vmm = {.mem_size = 256ull << 20, .vcpus = 1, .vm_id = "toy", .memfd = -1, .kvm = -1, .vm = -1};

void die(const char *what)
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

/* Keep the guest running until SIGTERM/SIGINT or deadline_ns (0: none),
 * printing --progress-ms lines. */
void run_until(uint64_t deadline_ns)
{
    while (!atomic_load(&vmm.stopping) && (!deadline_ns || now_ns() < deadline_ns)) {
        maybe_progress();
        usleep(10000);
    }
}

/* The line drivers (ToyVmm.ts, tests) wait for. */
void announce_ready(void)
{
    fprintf(stderr, "toyvmm: ready pid=%d kind=%s role=%s\n", getpid(), vmm.kvm_mode ? "kvm" : "threads",
            vmm.is_device ? "device" : "vmm");
}

static int freeze_for_baseline(void)
{
    int rc = freeze_guest();
    if (rc == 0 && !vmm.cut_ns)
        vmm.cut_ns = now_ns(), vmm.cut_writes = total_writes();
    return rc;
}

/* A baseline method (baselines.c) at --snapshot-at-ms, then --after-ms. */
static void run_local_snapshot(void)
{
    announce_ready();
    usleep((useconds_t)(vmm.snapshot_at_ms * 1000));
    next_phase();
    struct baseline_guest g = {
        .mem = vmm.mem, .size = vmm.mem_size, .freeze = freeze_for_baseline, .thaw = thaw_guest, .writes = total_writes};
    vmm.have_local = true;
    vmm.begin_ns = now_ns();
    if (baseline_snapshot(vmm.local_method, &g, vmm.output ? vmm.output : "/dev/null", &vmm.local) < 0)
        fprintf(stderr, "toyvmm: %s\n", vmm.local.error);
    if (!vmm.cut_ns) /* none: no freeze */
        vmm.cut_ns = vmm.local.saved_ns, vmm.cut_writes = vmm.local.saved_writes;
    vmm.saved_ns = vmm.local.saved_ns, vmm.saved_writes = vmm.local.saved_writes;
    next_phase();
    run_until(now_ns() + vmm.after_ms * 1000000ull);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vmsnap-toyvmm [--mem MiB] [--vcpus N] [--rate pages/s] [--pattern random|sequential|hot] [--anon] [--hugetlb] [--threads]\n"
            "                     [--agent SOCK] [--vm ID] [--device] [--balloon] [--alias-at-thaw] [--fork-at-thaw] [--reference FILE] [--run-ms N] [--fill PERCENT] [--progress-ms N]\n"
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
            if (!strcmp(v, "random")) vmm.pattern = PATTERN_RANDOM;
            else if (!strcmp(v, "sequential")) vmm.pattern = PATTERN_SEQUENTIAL;
            else if (!strcmp(v, "hot")) vmm.pattern = PATTERN_HOT;
            else usage();
            i++;
        }
        else if (!strcmp(a, "--anon")) vmm.anon = true;
        else if (!strcmp(a, "--hugetlb")) vmm.hugetlb = true;
        else if (!strcmp(a, "--threads")) vmm.force_threads = true;
        else if (!strcmp(a, "--device")) vmm.device = true;
        else if (!strcmp(a, "--balloon")) vmm.balloon = true;
        else if (!strcmp(a, "--alias-at-thaw")) vmm.alias_at_thaw = true;
        else if (!strcmp(a, "--fork-at-thaw")) vmm.fork_at_thaw = true;
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
    vmm.start_ns = now_ns();
    start_sampler();
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
    stop_sampler();
    stop_guest();
    if (vmm.device_pid > 0) {
        kill(vmm.device_pid, SIGTERM);
        waitpid(vmm.device_pid, NULL, 0);
    }
    report(stdout);
    return 0;
}
