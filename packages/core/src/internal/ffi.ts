/**
 * The raw ffi-rs bindings, 1:1 with the public headers of packages/wp-native/include:
 * `vmsnap_engine.h`, `vmsnap_writer.h`, `vmsnap_restore.h`, `vmsnap_record.h`, `vmsnap_transport.h`,
 * `vmsnap_inject.h` (library vmsnap_wp).
 * No logic here: callers in WpNative.ts turn results into errors.
 * Addresses are bound as BigInt (ffi-rs `U64` would be a lossy number);
 * out-parameters are caller-owned Buffers passed as U8Array (by pointer).
 * @internal
 */
import { DataType, define, open, type JsExternal } from "ffi-rs"
import { existsSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"

export type { JsExternal }

const nativeDir = (): string => {
  const require = createRequire(import.meta.url)
  return join(dirname(require.resolve("@vmsnap/wp-native/package.json")), "build")
}

export const libraryPath = (name: "libvmsnap_wp.so"): string => join(nativeDir(), name)

const B = DataType.U8Array
const I32 = DataType.I32
const U32 = DataType.U32
const BIG = DataType.BigInt
const EXT = DataType.External

/** vmsnap_engine.h (prefix wp_). */
const engineTable = {
  wp_abi_version: { library: "vmsnap_wp", retType: I32, paramsType: [] },
  wp_probe: { library: "vmsnap_wp", retType: I32, paramsType: [B, B] },
  wp_engine_create: { library: "vmsnap_wp", retType: EXT, paramsType: [U32, B] },
  wp_engine_add_region: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, BIG, BIG] },
  wp_uffd_negotiate: { library: "vmsnap_wp", retType: I32, paramsType: [I32] },
  wp_engine_add_process: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, I32, I32] },
  wp_engine_add_shared_region: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, BIG, BIG] },
  wp_engine_map_region: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, U32, U32, BIG] },
  wp_engine_error: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B] },
  wp_engine_set_fault_around: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, U32] },
  wp_engine_start: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_engine_arm: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_engine_protect: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_engine_next_batch: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B, B, B, B, U32] },
  wp_engine_set_steering: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, I32] },
  wp_engine_done: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_engine_stats: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B] },
  wp_engine_unprotect_all: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_engine_destroy: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_collapse: { library: "vmsnap_wp", retType: I32, paramsType: [I32, BIG, BIG] },
  wp_copy_to_hva: { library: "vmsnap_wp", retType: I32, paramsType: [BIG, B, BIG] },
  wp_copy_from_hva: { library: "vmsnap_wp", retType: I32, paramsType: [B, BIG, BIG] }
} as const

/** vmsnap_writer.h (prefix wp_writer_): the native writer thread. */
const writerTable = {
  wp_writer_create: { library: "vmsnap_wp", retType: EXT, paramsType: [EXT, I32, BIG, U32, U32, U32, U32, U32, U32, B] },
  wp_writer_set_write_behind: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, BIG, BIG] },
  wp_writer_start: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_writer_poll: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B] },
  wp_writer_index: { library: "vmsnap_wp", retType: BIG, paramsType: [EXT, B, BIG] },
  wp_writer_destroy: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] }
} as const

/** vmsnap_record.h (prefix wp_record_): the one decoder of records. */
const recordTable = {
  wp_record_codec_create: { library: "vmsnap_wp", retType: EXT, paramsType: [] },
  wp_record_check: { library: "vmsnap_wp", retType: I32, paramsType: [B, U32, BIG, U32, B] },
  wp_record_codec_destroy: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_record_decode: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B, B, BIG, B, BIG, B] },
  wp_record_encode_pages: { library: "vmsnap_wp", retType: BIG, paramsType: [U32, BIG, U32, B, U32, B, BIG] },
  wp_record_encode_batch: { library: "vmsnap_wp", retType: I32, paramsType: [B, B, B, U32, B, U32, U32, B, BIG, B, U32] }
} as const

/** vmsnap_restore.h (prefix wp_restore). */
const restoreTable = {
  wp_restorer_create: { library: "vmsnap_wp", retType: EXT, paramsType: [I32, I32, U32, B] },
  wp_restorer_add_range: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, BIG, BIG, BIG, U32] },
  wp_restore_index_create: { library: "vmsnap_wp", retType: EXT, paramsType: [B, B, B, B, B, U32, B] },
  wp_restore_index_release: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_restorer_take_early_events: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, BIG, U32, B, U32] },
  wp_restorer_set_index: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, EXT] },
  wp_restorer_check_owner: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, I32] },
  wp_restorer_start: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_restorer_poll: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_restorer_stats: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B] },
  wp_restorer_stop: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_restorer_destroy: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  wp_restore_uffd_create: { library: "vmsnap_wp", retType: I32, paramsType: [BIG, BIG, U32] }
} as const

/** vmsnap_transport.h (prefix wp_transport_). */
const transportTable = {
  wp_transport_recv_fds: { library: "vmsnap_wp", retType: I32, paramsType: [I32, B, U32, B, U32, B] },
  wp_transport_peer_pid: { library: "vmsnap_wp", retType: I32, paramsType: [I32] },
  wp_transport_peer_cred: { library: "vmsnap_wp", retType: I32, paramsType: [I32, B, U32] },
  wp_transport_epoll_create: { library: "vmsnap_wp", retType: I32, paramsType: [] },
  wp_transport_epoll_watch: { library: "vmsnap_wp", retType: I32, paramsType: [I32, I32, I32] },
  wp_transport_epoll_wait_one: { library: "vmsnap_wp", retType: I32, paramsType: [I32, I32] },
  wp_transport_map_fd: { library: "vmsnap_wp", retType: BIG, paramsType: [I32, BIG, BIG, B] },
  wp_transport_unmap: { library: "vmsnap_wp", retType: I32, paramsType: [BIG, BIG] }
} as const

/** vmsnap_inject.h (prefix vi_): ptrace freeze and a userfaultfd taken from another process. */
const injectTable = {
  vi_open: { library: "vmsnap_wp", retType: EXT, paramsType: [I32, B] },
  vi_freeze: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, U32] },
  vi_take_uffd: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, I32] },
  vi_tid_addresses: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B, U32] },
  vi_rewrite_words: { library: "vmsnap_wp", retType: I32, paramsType: [EXT, B, U32] },
  vi_thaw: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  vi_frozen_threads: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] },
  vi_close: { library: "vmsnap_wp", retType: I32, paramsType: [EXT] }
} as const

const wpTable = { ...engineTable, ...writerTable, ...restoreTable, ...recordTable, ...transportTable, ...injectTable } as const

type Table<T> = { [K in keyof T]: (args: Array<unknown>) => any }

/** Opens a library once, on first use; throws an Error naming a missing file. */
const lazyLibrary = <T extends object>(library: string, file: "libvmsnap_wp.so", table: T): (() => Table<T>) => {
  let bound: Table<T> | undefined
  return () => {
    if (bound) return bound
    const path = libraryPath(file)
    if (!existsSync(path)) throw new Error(`${library} is not built: ${path} is missing (run \`pnpm install\`)`)
    open({ library, path })
    bound = define(table as any) as Table<T>
    return bound
  }
}

export const loadWp = lazyLibrary("vmsnap_wp", "libvmsnap_wp.so", wpTable)

/**
 * Numbers shared with the C headers, by their C names. `test/internal/ffi.test.ts`
 * parses the headers and checks each against its `#define`, and every table
 * entry above against its C prototype.
 */
export const WP_ABI_VERSION = 7
export const WP_PAGE_SIZE = 4096
export const WP_HIST_BUCKETS = 64
export const WP_FEATURE_PAGEFAULT_FLAG_WP = 1n << 0n
export const WP_FEATURE_WP_HUGETLBFS_SHMEM = 1n << 12n
export const WP_FEATURE_WP_UNPOPULATED = 1n << 13n
export const WP_FEATURE_WP_ASYNC = 1n << 15n
export const WP_FEATURE_MOVE = 1n << 16n
export const WP_OPEN_SYSCALL = 1
export const WP_OPEN_DEVICE = 2
export const WP_PAGE_DATA = 0
export const WP_PAGE_ZERO = 1
export const WP_RESTORE_HIST_BUCKETS = 256
export const WP_RESTORE_RAW_IMAGE = 1
export const WP_RESTORE_NO_FILL = 2
export const WP_RESTORE_MOVE = 4
export const WP_RESTORE_UFFD_MINOR = 8
export const WP_RESTORE_UFFD_POISON = 16
export const WP_RESTORE_RANGE_SHARED = 1
/** hugetlbfs memory with 2 MiB pages (vmsnap_restore.h). */
export const WP_RESTORE_RANGE_HUGE_2M = 2
export const WP_RECORD_HEADER_BYTES = 32
export const WP_RECORD_MAX_PAGES = 1 << 20
export const WP_RECORD_RAW = 0
export const WP_RECORD_LZ4 = 1
export const WP_RECORD_ZERO = 2
export const WP_RECORD_PAGES = 3
export const WP_RECORD_PAGES_MAX_PAGES = 256
export const WP_RECORD_PAGES_ENTRY_BYTES = 8
export const WP_RECORD_ENCODE_LZ4 = 1
export const WP_RECORD_BATCH_FIELDS = 6
export const WP_WRITER_NONE = 0
export const WP_WRITER_LZ4 = 1
export const WP_WRITER_AUTO = 2
export const WP_WRITER_SEQUENTIAL = 1
export const WP_WRITER_RUNNING = 0
export const WP_WRITER_DONE = 1
export const WP_WRITER_FAILED = 2
export const WP_WRITER_FROM_ENGINE = 1
export const WP_WRITER_FROM_FILE = 2
export const WP_WRITER_FROM_MEMORY = 3

/** `struct wp_writer_stats`: these 64-bit fields in this order (`error` signed). */
export const WP_WRITER_STATS_FIELDS = [
  "state", "error", "error_source", "pages_saved", "pages_written", "end_offset", "records", "batches_raw", "batches_lz4", "batches_lz4_inline"
] as const
/** `struct wp_writer_record`: region u32, page_count u32, first_page u64, file_offset u64. */
export const WP_WRITER_RECORD_BYTES = 24

/** `struct wp_stats`: these u64 fields in this order, then `hist[WP_HIST_BUCKETS]`. */
export const WP_STATS_FIELDS = [
  "faults", "faults_spurious", "fallbacks", "fallback_ns", "overflow_pages", "pool_slots", "pool_high_water",
  "pool_used", "pages_total", "pages_saved", "pages_swept", "pages_zero", "fault_ns_max", "fault_ns_total",
  "pages_fault_around", "arm_faults", "cut_pages", "pages_steered", "pages_discarded"
] as const
/** Size of `wp_stats` in u64 words. */
export const WP_STATS_WORDS = WP_STATS_FIELDS.length + WP_HIST_BUCKETS

/** `struct wp_restore_stats`: these u64 fields in this order, then `hist[WP_RESTORE_HIST_BUCKETS]`. */
export const WP_RESTORE_STATS_FIELDS = [
  "pages_total", "pages_settled", "faults", "faults_zero", "pages_by_fault", "pages_by_fill", "removed_pages",
  "fault_ns_total", "fault_ns_max", "first_fault_ns", "done_ns", "pages_gone", "pages_failed", "pages_poisoned",
  "failed_records", "failed_offset", "failed_why", "failed_errno", "faults_outside", "outside_poisoned", "outside_hva",
  "pages_unallocated", "started_at_ns", "first_page_ns"
] as const
export const WP_RESTORE_STATS_WORDS = WP_RESTORE_STATS_FIELDS.length + WP_RESTORE_HIST_BUCKETS

/** The ffi tables by header, for the test that checks them against the headers. @internal */
export const symbolTables = {
  "vmsnap_engine.h": engineTable,
  "vmsnap_writer.h": writerTable,
  "vmsnap_restore.h": restoreTable,
  "vmsnap_record.h": recordTable,
  "vmsnap_transport.h": transportTable,
  "vmsnap_inject.h": injectTable
} as const
