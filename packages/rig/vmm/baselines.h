/* The snapshot methods vmsnap is measured against, run inside the toy VMM
 * (see baselines.c). */
#ifndef TOYVMM_BASELINES_H
#define TOYVMM_BASELINES_H

#include <stdint.h>

struct baseline_guest {
    uint8_t *mem;
    uint64_t size;
    int (*freeze)(void);
    void (*thaw)(void);
    uint64_t (*writes)(void); /* the guest's total writes so far */
};

struct baseline_result {
    double pause_ms;        /* all vCPUs stopped */
    double duration_ms;     /* from the start until the output is complete */
    uint64_t output_bytes;
    uint64_t faults;        /* write faults served (floor) */
    uint64_t extra_memory_bytes;
    /* CLOCK_MONOTONIC ns at which the guest stopped paying for the snapshot:
     * every page saved and unprotected (floor), the child done (fork), thawed
     * (stop-the-world), at once (none). */
    uint64_t saved_ns, saved_writes; /* and the guest's total writes then */
    char error[160];
};

/* method: "floor", "fork", "stop-the-world" or "none". Returns 0 or -1 (error set). */
int baseline_snapshot(const char *method, const struct baseline_guest *g, const char *output,
                      struct baseline_result *out);

#endif
