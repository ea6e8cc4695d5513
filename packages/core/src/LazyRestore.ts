/**
 * Lazy restore: a guest starts at once and each page is served from a
 * snapshot (or a raw memory image) the first time it is touched, while the
 * rest streams in behind (packages/wp-native/src/restore.c does the serving).
 *
 * The guest's VMM owns the userfaultfd: it negotiated and registered it
 * (MISSING for anonymous memory; MISSING | MINOR for a memfd, whose fd we
 * need to fill its page cache). Each range the VMM declares is a part of
 * the memory image: for a vmsnap file, exactly one of its regions in the
 * concatenated layout (docs/format.md); for a raw image, any range inside it.
 */
import { Effect } from "effect"
import { isNullPointer } from "ffi-rs"
import { openSync, closeSync, fstatSync } from "node:fs"
import { InvalidInput, NativeError, ProtocolError, type SnapshotFormatError, type SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import { type JsExternal, loadWp } from "./internal/ffi.js"
import { faultBucketLowerNs, summarizeUs, type LatencySummary } from "./LatencyHistogram.js"
import { concatOffsets } from "./SnapshotFormat.js"
import { openSnapshot } from "./SnapshotReader.js"

export interface GuestRange {
  /** Where the VMM maps this range. */
  readonly hva: bigint
  readonly size: number
  /** Offset of the range in the memory image. */
  readonly imageOffset: number
  /** The memfd backing it in the VMM (MINOR-fault mode), if any. */
  readonly memfd?: number
}

export interface LazyRestoreStats {
  readonly pagesTotal: number
  readonly pagesResident: number
  readonly faults: number
  readonly faultsZero: number
  readonly pagesByFault: number
  readonly pagesByFill: number
  readonly removedPages: number
  readonly faultServiceUs: LatencySummary
  /** Since serving started; null until it happened. */
  readonly firstFaultMs: number | null
  readonly doneMs: number | null
}

const RECORD_PAGES_RAW = 256

interface IndexArrays {
  regions: Array<number>
  firstPages: Array<number>
  counts: Array<number>
  offsets: Array<number>
}

/** Maps the VMM's ranges to the source's records. */
const buildIndex = (source: { path: string; raw: boolean }, ranges: ReadonlyArray<GuestRange>) =>
  Effect.scoped(
    Effect.gen(function* () {
      const idx: IndexArrays = { regions: [], firstPages: [], counts: [], offsets: [] }
      if (source.raw) {
        const fd = openSync(source.path, "r")
        const size = fstatSync(fd).size
        closeSync(fd)
        for (const [i, r] of ranges.entries()) {
          if (r.imageOffset % PAGE_SIZE || r.imageOffset + r.size > size)
            return yield* Effect.fail(new ProtocolError({ reason: `region ${i} (offset ${r.imageOffset}, ${r.size} bytes) lies outside the ${size}-byte image` }))
          for (let p = 0; p < r.size / PAGE_SIZE; p += RECORD_PAGES_RAW) {
            idx.regions.push(i)
            idx.firstPages.push(p)
            idx.counts.push(Math.min(RECORD_PAGES_RAW, r.size / PAGE_SIZE - p))
            idx.offsets.push(r.imageOffset + p * PAGE_SIZE)
          }
        }
        return idx
      }
      const s = yield* openSnapshot(source.path)
      const starts = concatOffsets(s.header.regions)
      const regionOf: Array<number> = []
      for (const [i, r] of ranges.entries()) {
        const k = starts.findIndex((start, j) => start === r.imageOffset && s.header.regions[j]!.size === r.size)
        if (k < 0) {
          const have = s.header.regions.map((g, j) => `offset ${starts[j]} size ${g.size}`).join("; ")
          return yield* Effect.fail(new ProtocolError({ reason: `region ${i} (offset ${r.imageOffset}, ${r.size} bytes) matches no region of the snapshot, which has ${have}` }))
        }
        regionOf.push(k)
      }
      for (const e of s.index) {
        const i = regionOf.indexOf(e.region)
        if (i < 0) continue
        idx.regions.push(i)
        idx.firstPages.push(e.firstPage)
        idx.counts.push(e.pageCount)
        idx.offsets.push(e.fileOffset)
      }
      return idx
    })
  )

const toBuffer = (values: Array<number>, wide: boolean) =>
  wide ? Buffer.from(BigUint64Array.from(values, BigInt).buffer) : Buffer.from(Uint32Array.from(values).buffer)

export class LazyRestore {
  constructor(private readonly handle: JsExternal) {}

  /** "serving", "done" (every page resident, ranges unregistered) or the failure. */
  poll(): "serving" | "done" | NativeError {
    const rc: number = loadWp().wp_restorer_poll([this.handle])
    if (rc === 1) return "done"
    if (rc === 0) return "serving"
    return new NativeError({ op: "lazy restore", errno: -rc, reason: -rc === 74 ? "a record of the snapshot is corrupt (checksum or encoding)" : errnoReason("restore", -rc) })
  }

  stats(): LazyRestoreStats {
    const w = new BigUint64Array(11 + 64)
    loadWp().wp_restorer_stats([this.handle, Buffer.from(w.buffer)])
    const n = (i: number) => Number(w[i])
    return {
      pagesTotal: n(0), pagesResident: n(1), faults: n(2), faultsZero: n(3), pagesByFault: n(4), pagesByFill: n(5), removedPages: n(6),
      faultServiceUs: summarizeUs(Array.from(w.subarray(11), Number), n(8), faultBucketLowerNs),
      firstFaultMs: n(9) ? n(9) / 1e6 : null,
      doneMs: n(10) ? n(10) / 1e6 : null
    }
  }

  /** @internal */
  destroySync() {
    loadWp().wp_restorer_destroy([this.handle])
  }
}

/** Starts serving; the scope's end stops serving and unregisters what is left. */
export interface LazyRestoreOptions {
  /** Move decoded pages in with UFFDIO_MOVE instead of copying (anonymous memory of this process only). */
  readonly move?: boolean
  /** Stream the remaining pages in the background (default true); false: faults only. */
  readonly fill?: boolean
}

export const startLazyRestore = (
  source: { path: string; raw: boolean },
  uffd: number,
  ranges: ReadonlyArray<GuestRange>,
  options: LazyRestoreOptions = {}
): Effect.Effect<LazyRestore, NativeError | ProtocolError | InvalidInput | SnapshotFormatError | SnapshotIoError, import("effect").Scope.Scope> =>
  Effect.gen(function* () {
    if (ranges.length === 0) return yield* Effect.fail(new InvalidInput({ reason: "no memory regions to restore" }))
    const idx = yield* buildIndex(source, ranges)
    const lib = loadWp()
    const fd = yield* Effect.acquireRelease(Effect.sync(() => openSync(source.path, "r")), (f) => Effect.sync(() => closeSync(f)))
    return yield* Effect.acquireRelease(
      Effect.suspend(() => {
        const err = new Int32Array(1)
        const flags = (source.raw ? 1 : 0) | (options.fill === false ? 2 : 0) | (options.move ? 4 : 0)
        const handle: JsExternal = lib.wp_restorer_create([uffd, fd, flags, Buffer.from(err.buffer)])
        if (isNullPointer(handle)) return Effect.fail(new NativeError({ op: "lazy restore", errno: -err[0]!, reason: errnoReason("restore", -err[0]!) }))
        const restore = new LazyRestore(handle)
        const failed = (op: string, rc: number) => {
          restore.destroySync()
          return Effect.fail(new NativeError({ op, errno: -rc, reason: rc === -61 ? "the snapshot leaves pages of a region uncovered" : errnoReason(op, -rc) }))
        }
        for (const r of ranges) {
          const rc: number = lib.wp_restorer_add_region([handle, r.hva, BigInt(r.size), r.memfd ?? -1, BigInt(r.imageOffset)])
          if (rc < 0) return failed("lazy restore region", rc)
        }
        const rc: number = lib.wp_restorer_set_index([
          handle, toBuffer(idx.regions, false), toBuffer(idx.firstPages, true), toBuffer(idx.counts, false), toBuffer(idx.offsets, true), idx.regions.length
        ])
        if (rc < 0) return failed("lazy restore index", rc)
        const started: number = lib.wp_restorer_start([handle])
        if (started < 0) return failed("lazy restore start", started)
        return Effect.succeed(restore)
      }),
      (r) => Effect.sync(() => r.destroySync())
    )
  })

/** A userfaultfd of this process registered to restore [hva, hva + size) (in-process restores). */
export const restoreUffd = (hva: bigint, size: number, options: { memfd?: boolean; move?: boolean } = {}) =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      const fd: number = loadWp().wp_restore_uffd_create([hva, BigInt(size), (options.memfd ? 8 : 0) | (options.move ? 4 : 0)])
      return fd < 0
        ? Effect.fail(new NativeError({ op: "userfaultfd", errno: -fd, reason: errnoReason("userfaultfd", -fd) }))
        : Effect.succeed(fd)
    }),
    (fd) => Effect.sync(() => closeSync(fd))
  )
