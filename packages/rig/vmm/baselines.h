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
};

struct baseline_result {
    double pause_ms;        /* all vCPUs stopped */
    double duration_ms;     /* from the start until the output is complete */
    uint64_t output_bytes;
    uint64_t faults;        /* write faults served (floor) */
    uint64_t extra_memory_bytes;
    char error[160];
};

/* method: "floor", "fork", "stop-the-world" or "none". Returns 0 or -1 (error set). */
int baseline_snapshot(const char *method, const struct baseline_guest *g, const char *output,
                      struct baseline_result *out);

#endif
