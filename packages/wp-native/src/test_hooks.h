/*
 * Test-only hooks into the engine. They exist only in the test build of the
 * engine (compiled with -DWP_TEST_HOOKS into the test programs), never in
 * libvmsnap_wp.so. Per engine: no globals.
 */
#ifndef VMSNAP_WP_TEST_HOOKS_H
#define VMSNAP_WP_TEST_HOOKS_H

#include "vmsnap_engine.h"

#include <stdbool.h>

#ifdef WP_TEST_HOOKS
/* The fault thread sleeps `us` microseconds before each message of a batch
 * but the first: a fault thread preempted in mid-batch, on demand. */
void wp_test_set_message_delay(wp_engine *e, uint32_t us);
/* The fault thread's unprotect of a write let through while armed finds an
 * event pending (EAGAIN) until the cut has ended: deferred past the cut, on
 * demand, as a discarding thread makes happen by chance while a writer
 * frozen for the cut (ptrace, a vCPU pause) has given up its fault. */
void wp_test_set_defer_armed(wp_engine *e, bool on);
#endif

#endif
