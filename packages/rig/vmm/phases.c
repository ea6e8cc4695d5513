/* The toy VMM's phases (before, during and after a snapshot): latency as the
 * guest measured it; the guest's write counter sampled over time; and the
 * JSON report printed at exit. */
#include "toyvmm.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
void next_phase(void)
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

void report(FILE *out)
{
    while (vmm.phase <= 2)
        next_phase();
    fprintf(out, "{\"role\":\"%s\",\"kind\":\"%s\",\"whyThreads\":\"%s\",\"vcpus\":%u,\"memBytes\":%llu,\"memory\":\"%s\","
           "\"tscHz\":%.0f,\"snapshots\":%u,\"snapshotsFailed\":%u,\"balloonDiscards\":%llu,\"phases\":{",
           vmm.is_device ? "device" : "vmm", vmm.kvm_mode ? "kvm" : "threads", vmm.kvm_mode ? "" : vmm.why_threads,
           vmm.vcpus, (unsigned long long)vmm.mem_size, vmm.hugetlb ? (vmm.anon ? "hugetlb-anon" : "hugetlb-memfd") : vmm.anon ? "anon" : "memfd", vmm.tsc_hz, vmm.snapshots_done,
           vmm.snapshots_failed, (unsigned long long)atomic_load(&vmm.balloon_discards));
    /* phases: before the first freeze, during the snapshot, after it */
    print_phase(out, "before", &vmm.phases[0], false);
    print_phase(out, "during", &vmm.phases[1], false);
    print_phase(out, "after", &vmm.phases[2], true);
    fprintf(out, "}");
    if (vmm.restore_from)
        fprintf(out, ",\"restore\":{\"firstWriteMs\":%.3f,\"verifyMismatches\":%lld,\"changedPages\":%llu,\"changedHotPages\":%llu}",
                vmm.restore_first_write_ms, (long long)vmm.verify_mismatches, (unsigned long long)vmm.changed_pages,
                (unsigned long long)vmm.changed_hot_pages);
    if (vmm.have_local)
        fprintf(out, ",\"snapshot\":{\"method\":\"%s\",\"ok\":%s,\"error\":\"%s\",\"pauseMs\":%.3f,\"durationMs\":%.1f,"
                "\"outputBytes\":%llu,\"faults\":%llu,\"extraMemoryBytes\":%llu}",
                vmm.local_method, vmm.local.error[0] ? "false" : "true", vmm.local.error, vmm.local.pause_ms,
                vmm.local.duration_ms, (unsigned long long)vmm.local.output_bytes, (unsigned long long)vmm.local.faults,
                (unsigned long long)vmm.local.extra_memory_bytes);
    fprintf(out, ",\"startNs\":%llu,\"beginNs\":%llu,\"cutNs\":%llu,\"savedNs\":%llu,\"cutWrites\":%llu,\"savedWrites\":%llu,\"series\":[",
            (unsigned long long)vmm.start_ns, (unsigned long long)vmm.begin_ns, (unsigned long long)vmm.cut_ns,
            (unsigned long long)vmm.saved_ns, (unsigned long long)vmm.cut_writes, (unsigned long long)vmm.saved_writes);
    size_t n = atomic_load(&vmm.nsamples);
    for (size_t i = 0; i < n; i++)
        fprintf(out, "%s[%llu,%llu]", i ? "," : "", (unsigned long long)vmm.samples[i].t_ns,
                (unsigned long long)vmm.samples[i].writes);
    fprintf(out, "]}\n");
    fflush(out);
}

/* Total guest writes (each vCPU's counter is a naturally aligned u64 the
 * guest increments; x86-64 reads it whole). */
uint64_t total_writes(void)
{
    uint64_t writes = 0;
    for (uint32_t i = 0; i < vmm.vcpus; i++)
        writes += __atomic_load_n(&vmm.ctl[i]->writes, __ATOMIC_RELAXED);
    return writes;
}

/* With --progress-ms: a line of total guest writes so far, for watchers. */
void maybe_progress(void)
{
    if (!vmm.progress_ms || now_ns() - vmm.last_progress_ns < vmm.progress_ms * 1000000ull)
        return;
    vmm.last_progress_ns = now_ns();
    fprintf(stderr, "toyvmm: progress pid=%d writes=%llu\n", getpid(), (unsigned long long)total_writes());
}

static void *sampler_main(void *arg)
{
    (void)arg;
    while (atomic_load(&vmm.sampling)) {
        size_t n = atomic_load(&vmm.nsamples);
        if (n < MAX_SAMPLES) {
            vmm.samples[n] = (struct sample){.t_ns = now_ns(), .writes = total_writes()};
            atomic_store(&vmm.nsamples, n + 1);
        }
        usleep(SAMPLE_MS * 1000);
    }
    return NULL;
}

/* Samples the guest's total writes every SAMPLE_MS until stop_sampler. */
void start_sampler(void)
{
    vmm.samples = calloc(MAX_SAMPLES, sizeof *vmm.samples);
    if (!vmm.samples)
        die("calloc samples");
    atomic_store(&vmm.sampling, true);
    if (pthread_create(&vmm.sampler, NULL, sampler_main, NULL))
        die("pthread_create sampler");
}

void stop_sampler(void)
{
    if (!atomic_load(&vmm.sampling))
        return;
    atomic_store(&vmm.sampling, false);
    pthread_join(vmm.sampler, NULL);
}
