/**
 * Lazy restore: a guest starts at once and each page is served from a
 * snapshot (or a raw memory image) the first time it is touched, while the
 * rest streams in behind (packages/wp-native/src/restore.c does the serving;
 * docs/lazy-restore.md is the VMM author's view).
 *
 * The guest's VMM owns the userfaultfd: it created it O_NONBLOCK, negotiated
 * and registered it (MISSING for anonymous memory; MISSING | MINOR for a
 * memfd). Each range the VMM declares is any range of the memory image: a
 * vmsnap file's regions concatenated in header order (docs/format.md), or
 * the raw image itself.
 */
import { Effect, type Scope } from "effect"
import { isNullPointer } from "ffi-rs"
import { closeSync } from "node:fs"
import { InvalidInput, NativeError, ProtocolError, type SnapshotFormatError, type SnapshotIoError } from "./Errors.js"
import { HUGE_PAGE_SIZE, PAGE_SIZE } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import {
  type JsExternal, loadWp, WP_RESTORE_MOVE, WP_RESTORE_NO_FILL, WP_RESTORE_RANGE_HUGE_2M, WP_RESTORE_RANGE_SHARED, WP_RESTORE_RAW_IMAGE, WP_RESTORE_STATS_FIELDS,
  WP_RESTORE_STATS_WORDS, WP_RESTORE_UFFD_MINOR, WP_RESTORE_UFFD_POISON
} from "./internal/ffi.js"
import { guestBucketLowerNs, summarizeUs, type LatencySummary } from "./LatencyHistogram.js"
import { checkNoOverlap, type HvaSpan } from "./FirecrackerHandshake.js"
import { type ImageIndex, openImageIndex, type RestoreSource } from "./RestoreIndex.js"

export interface GuestRange {
  /** Where the VMM maps this range. */
  readonly hva: bigint
  readonly size: number
  /** Offset of the range in the memory image. */
  readonly imageOffset: number
  /** The memfd backing it in the VMM, if any: the range is shared memory (pages may sit in the page cache unmapped). */
  readonly memfd?: number
  /** Shared memory without its memfd (as /proc/PID/smaps says): the same as a memfd given. */
  readonly shared?: boolean
  /**
   * Bytes per page of the VMM's mapping: 4096 (default) or 2 MiB (hugetlbfs:
   * each huge page is assembled from the image's 4 KiB pages and installed
   * whole; hva and size must be multiples of it).
   */
  readonly pageSize?: number
}

export interface LazyRestoreStats {
  readonly pagesTotal: number
  /** Installed, discarded by the guest, gone (remapped by the VMM) or poisoned. */
  readonly pagesSettled: number
  readonly faults: number
  readonly faultsZero: number
  readonly pagesByFault: number
  readonly pagesByFill: number
  readonly removedPages: number
  readonly faultServiceUs: LatencySummary
  /** Since serving started; null until it happened. */
  readonly firstFaultMs: number | null
  /** Since serving started: the first fault's page installed (its thread may resume); null until then. */
  readonly firstPageMs: number | null
  /** Since serving started: every page settled and the ranges unregistered; null until then, or when serving was stopped (the VMM left, serve stopped) before the restorer got there. */
  readonly doneMs: number | null
  /** Pages the VMM mapped something else over (ENOENT): skipped. */
  readonly pagesGone: number
  /** Pages whose record cannot be produced, or that cannot be installed (pagesUnallocated); of them, resolved with UFFDIO_POISON. */
  readonly pagesFailed: number
  /** Of pagesFailed, 4 KiB pages of huge pages that could not be allocated (the hugetlbfs pool, or a mount's size= quota, exhausted). */
  readonly pagesUnallocated: number
  readonly pagesPoisoned: number
  /** The first record that could not be produced, if any. */
  readonly failedRecord: { readonly records: number; readonly fileOffset: number; readonly reason: string } | null
  /** Faults on pages registered with the uffd that no range covers; of them, answered with UFFDIO_POISON (the others stay blocked). */
  readonly faultsOutside: number
  readonly outsidePoisoned: number
  /** The page of the first of them (hva, hex), if any. */
  readonly firstOutsideHva: string | null
}

/** RS_MAX_RANGES in restore_internal.h. */
const MAX_RANGES = 64
/**
 * How long the handshake waits for a mapping change of the VMM's that is in
 * flight (its event not yet queued) when its mappings disagree with its
 * ranges: only then, and only while the kernel says one is in flight.
 */
const EARLY_WAIT_MS = 100

const REFUSED: Record<number, string> = {
  25: "the fd sent as the userfaultfd is not a userfaultfd",
  77: "the userfaultfd is blocking (opened without O_NONBLOCK): a handler's read() on it would hang; open it with O_NONBLOCK"
}

/**
 * A running lazy restore. Its native restorer is freed when the scope that
 * started it closes; after that, stats() gives the last figures and poll()
 * says "stopped": nothing ever reaches freed native memory (a poll or stats
 * call racing the end of serving once locked the freed restorer's mutex,
 * and glibc aborted the process).
 */
export class LazyRestore {
  private handle: JsExternal | undefined
  private final: LazyRestoreStats | undefined
  private startedAt = 0n

  constructor(handle: JsExternal) {
    this.handle = handle
  }

  /**
   * "serving" (failed pages show in stats()); "done": every page settled and
   * every range unregistered; "settled": every page settled, but a range
   * with failed pages stays registered (shared memory, or not poisoned):
   * keep the restorer (its scope open) until the VMM leaves, or the guest's
   * faults and discards there wait for ever; "stopped" (its scope closed);
   * or the failure that stopped it.
   */
  poll(): "serving" | "done" | "settled" | "stopped" | NativeError {
    if (this.handle === undefined) return "stopped"
    const rc: number = loadWp().wp_restorer_poll([this.handle])
    if (rc === 1) return "done"
    if (rc === 2) return "settled"
    if (rc === 0) return "serving"
    return new NativeError({ op: "lazy restore", errno: -rc, reason: -rc === 3 ? "the VMM's memory is gone (the process exited)" : errnoReason("restore", -rc) })
  }

  stats(): LazyRestoreStats {
    if (this.handle === undefined) return this.final!
    const w = new BigUint64Array(WP_RESTORE_STATS_WORDS)
    loadWp().wp_restorer_stats([this.handle, Buffer.from(w.buffer)])
    const n = (field: (typeof WP_RESTORE_STATS_FIELDS)[number]) => Number(w[WP_RESTORE_STATS_FIELDS.indexOf(field)])
    const failedErrno = Number(BigInt.asIntN(64, w[WP_RESTORE_STATS_FIELDS.indexOf("failed_errno")]!))
    this.startedAt = w[WP_RESTORE_STATS_FIELDS.indexOf("started_at_ns")]!
    return {
      pagesTotal: n("pages_total"), pagesSettled: n("pages_settled"), faults: n("faults"), faultsZero: n("faults_zero"),
      pagesByFault: n("pages_by_fault"), pagesByFill: n("pages_by_fill"), removedPages: n("removed_pages"),
      faultServiceUs: summarizeUs(Array.from(w.subarray(WP_RESTORE_STATS_FIELDS.length), Number), n("fault_ns_max"), guestBucketLowerNs),
      firstFaultMs: n("first_fault_ns") ? n("first_fault_ns") / 1e6 : null,
      firstPageMs: n("first_page_ns") ? n("first_page_ns") / 1e6 : null,
      doneMs: n("done_ns") ? n("done_ns") / 1e6 : null,
      pagesGone: n("pages_gone"), pagesFailed: n("pages_failed"), pagesUnallocated: n("pages_unallocated"), pagesPoisoned: n("pages_poisoned"),
      failedRecord: n("failed_records") === 0 ? null : {
        records: n("failed_records"),
        fileOffset: n("failed_offset"),
        reason: failedErrno === -5 ? "short read (the file shrank?)" : (recordReasons[n("failed_why")] ?? "corrupt record")
      },
      faultsOutside: n("faults_outside"), outsidePoisoned: n("outside_poisoned"),
      firstOutsideHva: n("faults_outside") ? `0x${w[WP_RESTORE_STATS_FIELDS.indexOf("outside_hva")]!.toString(16)}` : null
    }
  }

  /**
   * When serving started (wp_restorer_start), CLOCK_MONOTONIC ns: the clock
   * of process.hrtime.bigint() (libuv's uv_hrtime), so a handshake's time
   * taken in TypeScript compares with it. 0n before stats() was first read.
   */
  startedAtNs(): bigint {
    if (this.startedAt === 0n && this.handle !== undefined) this.stats()
    return this.startedAt
  }

  /**
   * Stops serving (the restorer's threads are ended; nothing is installed
   * after this), keeping the restorer: stats() then gives its final state,
   * which a VMM's outcome is decided from (not from whether a poll() had
   * seen "done" before the VMM left). The scope's end frees it.
   */
  stop() {
    if (this.handle !== undefined) loadWp().wp_restorer_stop([this.handle])
  }

  /** Stops serving and frees the restorer, keeping its last stats. @internal */
  destroySync() {
    if (this.handle === undefined) return
    const handle = this.handle
    this.final = this.stats()
    this.handle = undefined
    loadWp().wp_restorer_destroy([handle])
  }
}

const recordReasons: Record<number, string> = {
  1: "record magic missing", 2: "record disagrees with the index", 3: "unknown record encoding", 4: "impossible stored size",
  5: "record checksum mismatch", 6: "lz4 payload malformed (length prefix or block)"
}

/** Starts serving; the scope's end stops serving and unregisters what is left. */
export interface LazyRestoreOptions {
  /** Move decoded pages in with UFFDIO_MOVE instead of copying (anonymous memory of this process only). */
  readonly move?: boolean
  /** Stream the remaining pages in the background (default true); false: faults only. */
  readonly fill?: boolean
  /**
   * A last check once the uffd is accepted and before any range is added
   * (serve: the VMM's mappings, FirecrackerHandshake.ts); its failure
   * refuses the VMM. It may ask for the spans the VMM unmapped or remapped
   * right after sending the handshake (`goneAfterSending`: their UNMAP /
   * REMAP events, wp_restorer_take_early_events; those pages are then gone,
   * never installed), and may give the ranges to serve as it found them
   * (which are shared memory); undefined: as given.
   */
  readonly admit?: (vmm: { readonly goneAfterSending: () => ReadonlyArray<HvaSpan> }) => Effect.Effect<ReadonlyArray<GuestRange> | undefined, ProtocolError | NativeError>
  /** The VMM's pid: the uffd must fill its memory, not another process's (wp_restorer_check_owner). */
  readonly ownerPid?: number
}

export const startLazyRestore = (
  source: RestoreSource,
  uffd: number,
  ranges: ReadonlyArray<GuestRange>,
  options: LazyRestoreOptions = {},
  index?: ImageIndex
): Effect.Effect<LazyRestore, NativeError | ProtocolError | InvalidInput | SnapshotFormatError | SnapshotIoError, Scope.Scope> =>
  Effect.gen(function* () {
    if (ranges.length === 0) return yield* Effect.fail(new InvalidInput({ reason: "no memory regions to restore" }))
    if (ranges.length > MAX_RANGES) return yield* Effect.fail(new ProtocolError({ reason: `${ranges.length} regions; a VMM may declare at most ${MAX_RANGES}` }))
    yield* Effect.try({ try: () => checkNoOverlap(ranges.map((r) => ({ base_host_virt_addr: Number(r.hva), size: r.size }))), catch: (e) => e as ProtocolError })
    const idx = index ?? (yield* openImageIndex(source)) // serve opened it once, for every VMM
    for (const [i, r] of ranges.entries()) {
      const pageSize = r.pageSize ?? PAGE_SIZE
      if (pageSize !== PAGE_SIZE && pageSize !== HUGE_PAGE_SIZE)
        return yield* Effect.fail(new ProtocolError({ reason: `region ${i}: page size ${pageSize}; vmsnap serves ${PAGE_SIZE}- and ${HUGE_PAGE_SIZE}-byte pages` }))
      if (r.hva % BigInt(pageSize) || r.size % pageSize)
        return yield* Effect.fail(new ProtocolError({ reason: `region ${i}: hva and size must be multiples of its ${pageSize}-byte pages` }))
      if (r.imageOffset % PAGE_SIZE || r.imageOffset + r.size > Math.ceil(idx.imageBytes / PAGE_SIZE) * PAGE_SIZE)
        return yield* Effect.fail(new ProtocolError({ reason: `region ${i} (offset ${r.imageOffset}, ${r.size} bytes) lies outside the ${idx.imageBytes}-byte memory image` }))
    }
    const lib = loadWp()
    const fd = idx.fd // the file the index was read from (dup'd by the restorer)
    // Created first (the uffd is checked there), freed when the scope closes, whatever fails after.
    const [restore, handle] = yield* Effect.acquireRelease(
      Effect.suspend(() => {
        const err = new Int32Array(1)
        const flags = (source.raw ? WP_RESTORE_RAW_IMAGE : 0) | (options.fill === false ? WP_RESTORE_NO_FILL : 0) | (options.move ? WP_RESTORE_MOVE : 0)
        const handle: JsExternal = lib.wp_restorer_create([uffd, fd, flags, Buffer.from(err.buffer)])
        if (isNullPointer(handle))
          return Effect.fail(
            REFUSED[-err[0]!] !== undefined
              ? new ProtocolError({ reason: REFUSED[-err[0]!]! })
              : new NativeError({ op: "lazy restore", errno: -err[0]!, reason: errnoReason("restore", -err[0]!) })
          )
        return Effect.succeed([new LazyRestore(handle), handle] as const)
      }),
      ([r]) => Effect.sync(() => r.destroySync())
    )
    const goneAfterSending = (): Array<HvaSpan> => {
      const cap = MAX_RANGES
      const out = new BigUint64Array(2 * cap)
      const n: number = lib.wp_restorer_take_early_events([handle, ranges[0]!.hva, EARLY_WAIT_MS, Buffer.from(out.buffer), cap])
      if (n < 0) throw new NativeError({ op: "lazy restore early events", errno: -n, reason: errnoReason("read", -n) })
      return Array.from({ length: Math.min(n, cap) }, (_, k) => ({ start: out[2 * k]!, end: out[2 * k + 1]! }))
    }
    const admitted = options.admit ? yield* options.admit({ goneAfterSending }) : undefined
    const check = (op: string, rc: number) => (rc < 0 ? Effect.fail(new NativeError({ op, errno: -rc, reason: errnoReason(op, -rc) })) : Effect.void)
    for (const [i, r] of (admitted ?? ranges).entries()) {
      const rc: number = lib.wp_restorer_add_range([handle, r.hva, BigInt(r.size), BigInt(r.imageOffset), (r.memfd !== undefined || r.shared ? WP_RESTORE_RANGE_SHARED : 0) | (r.pageSize === HUGE_PAGE_SIZE ? WP_RESTORE_RANGE_HUGE_2M : 0)])
      if (rc === -16)
        return yield* Effect.fail(new ProtocolError({ reason: `region ${i} (0x${r.hva.toString(16)}, ${r.size} bytes) is registered with another userfaultfd than the one sent: send the uffd that registered the guest memory (its faults would reach no handler)` }))
      yield* check("lazy restore range", rc)
    }
    yield* check("lazy restore index", lib.wp_restorer_set_index([handle, idx.native])) // a reference: nothing copied
    if (options.ownerPid !== undefined) {
      const rc: number = lib.wp_restorer_check_owner([handle, options.ownerPid])
      if (rc === -18)
        return yield* Effect.fail(new ProtocolError({ reason: `the userfaultfd sent fills another process's memory, not pid ${options.ownerPid}'s (its faults would reach no handler): send the uffd your own process registered its guest memory with` }))
      yield* check("lazy restore owner check", rc)
    }
    yield* check("lazy restore start", lib.wp_restorer_start([handle]))
    return restore
  })

/** A userfaultfd of this process registered to restore [hva, hva + size) (in-process restores). */
export const restoreUffd = (hva: bigint, size: number, options: { memfd?: boolean; move?: boolean; poison?: boolean } = {}) =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      const fd: number = loadWp().wp_restore_uffd_create([hva, BigInt(size), (options.memfd ? WP_RESTORE_UFFD_MINOR : 0) | (options.move ? WP_RESTORE_MOVE : 0) | (options.poison ? WP_RESTORE_UFFD_POISON : 0)])
      return fd < 0
        ? Effect.fail(new NativeError({ op: "userfaultfd", errno: -fd, reason: errnoReason("userfaultfd", -fd) }))
        : Effect.succeed(fd)
    }),
    (fd) => Effect.sync(() => closeSync(fd))
  )
