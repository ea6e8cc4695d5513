/**
 * The writer fiber: moves captured pages from the engine to the snapshot file.
 *
 * Each turn it drains the slot pool first (that frees the memory vCPUs may be
 * waiting for in the synchronous fallback), then sweeps the next run of
 * not-yet-saved pages. Runs are compressed with lz4 on the libuv thread pool
 * while the main thread sweeps the next run, so both cores stay busy; records
 * are appended strictly in submission order.
 */
import { Effect } from "effect"
import { compress, compressSync } from "lz4-napi"
import type { FileHandle } from "node:fs/promises"
import { ioError, type NativeError, type SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE, regionPages } from "./GuestMemory.js"
import { encodeRecord, encodeTrailer, type Encoding, IndexBuilder } from "./SnapshotFormat.js"
import { collectYoungGarbage } from "./internal/gc.js"
import { PAGE_ZERO, type WpEngine } from "./WpNative.js"

/** A record ready to append. */
interface PendingRecord {
  readonly region: number
  readonly firstPage: number
  readonly pageCount: number
  readonly encoding: Encoding
  readonly payload: Buffer | undefined
}

/** Appends records at the end of the file and remembers where each went. */
export class RecordSink {
  readonly index = new IndexBuilder()
  bytesWritten = 0

  constructor(private readonly file: FileHandle, private readonly path: string, private offset: number) {}

  append(records: ReadonlyArray<PendingRecord>): Effect.Effect<void, SnapshotIoError> {
    return Effect.suspend(() => {
      const buffers: Array<Buffer> = []
      const start = this.offset
      for (const r of records) {
        this.index.add({ region: r.region, firstPage: r.firstPage, pageCount: r.pageCount, fileOffset: this.offset })
        const h = encodeRecord(r, r.payload)
        buffers.push(h)
        this.offset += h.length
        if (r.payload) {
          buffers.push(r.payload)
          this.offset += r.payload.length
        }
      }
      this.bytesWritten = this.offset
      return this.writeAll(buffers, start)
    })
  }

  /** Index and trailer: after this the file is complete (but not yet durable). */
  finish(): Effect.Effect<number, SnapshotIoError> {
    return Effect.suspend(() => {
      const index = this.index.encode()
      const trailer = encodeTrailer({ indexOffset: this.offset, indexBytes: index.length, recordCount: this.index.count })
      const start = this.offset
      this.offset += index.length + trailer.length
      this.bytesWritten = this.offset
      return Effect.as(this.writeAll([index, trailer], start), this.offset)
    })
  }

  private writeAll(buffers: Array<Buffer>, position: number): Effect.Effect<void, SnapshotIoError> {
    return Effect.tryPromise({
      try: async () => {
        let pos = position
        let pending = buffers
        while (pending.length > 0) {
          const { bytesWritten } = await this.file.writev(pending, pos)
          pos += bytesWritten
          // Short write: drop what went out and retry the rest.
          let skip = bytesWritten
          const rest: Array<Buffer> = []
          for (const b of pending) {
            if (skip >= b.length) skip -= b.length
            else {
              rest.push(skip > 0 ? b.subarray(skip) : b)
              skip = 0
            }
          }
          pending = rest
        }
      },
      catch: (e) => ioError(this.path, "write", e)
    })
  }
}

export interface WriterOptions {
  /** Pages per sweep call (one ioctl unprotects a run). */
  readonly sweepPages?: number
  /** Compressions in flight at once. */
  readonly inFlight?: number
  /** Compress with lz4 (default) or store raw. */
  readonly compress?: boolean
  /** Deliberately slow the writer (ms per turn): tests and benchmarks of the fallback. */
  readonly writerDelayMs?: number
  /** Sweep where the guest writes first (default true). */
  readonly steer?: boolean
  /** Called after every turn with pages saved so far. */
  readonly onProgress?: (savedPages: number, totalPages: number, bytesWritten: number) => void
}

const DRAIN_PAGES = 256
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE)
/** Written bytes between young-generation collections (see internal/gc.ts). */
const GC_EVERY_BYTES = 8 * 1024 * 1024
/** Runs shorter than this are compressed inline; a thread-pool hop costs more. */
const INLINE_COMPRESS_PAGES = 8

const encodePayload = (raw: Buffer, pages: number, useLz4: boolean): Promise<{ encoding: Encoding; payload: Buffer }> => {
  if (!useLz4) return Promise.resolve({ encoding: "raw", payload: raw })
  const pick = (c: Buffer) => (c.length < raw.length ? { encoding: "lz4" as const, payload: c } : { encoding: "raw" as const, payload: raw })
  if (pages < INLINE_COMPRESS_PAGES) return Promise.resolve(pick(compressSync(raw)))
  return compress(raw).then(pick)
}

/**
 * Cuts entries 0..n-1 into records: maximal runs of consecutive pages of one
 * region that are all zero (a zero record) or all data (one payload).
 * `dataOf(i, j)` gives the bytes of data entries i..j-1; it is called in order.
 */
const recordsFromRuns = (
  n: number,
  regionOf: (i: number) => number,
  pageOf: (i: number) => number,
  zeroAt: (i: number) => boolean,
  dataOf: (i: number, j: number) => Buffer,
  useLz4: boolean
): Promise<Array<PendingRecord>> => {
  const out: Array<Promise<PendingRecord>> = []
  for (let i = 0; i < n; ) {
    const region = regionOf(i)
    const first = pageOf(i)
    const zero = zeroAt(i)
    let j = i + 1
    while (j < n && regionOf(j) === region && pageOf(j) === first + (j - i) && zeroAt(j) === zero) j++
    const pageCount = j - i
    out.push(
      zero
        ? Promise.resolve({ region, firstPage: first, pageCount, encoding: "zero" as const, payload: undefined })
        : encodePayload(dataOf(i, j), pageCount, useLz4).then((p) => ({ region, firstPage: first, pageCount, ...p }))
    )
    i = j
  }
  return Promise.all(out)
}

/**
 * Drained pool pages (keys: region << 48 | page). Fault-around saves
 * untouched neighbours too: all-zero pages become zero records. The drain
 * buffer is not reused until these records are on disk, so no copy.
 */
const recordsFromPool = (buf: Buffer, keys: BigUint64Array, n: number, useLz4: boolean) =>
  recordsFromRuns(
    n,
    (i) => Number(keys[i]! >> 48n),
    (i) => Number(keys[i]! & 0xffffffffffffn),
    (i) => buf.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE).equals(ZERO_PAGE),
    (i, j) => buf.subarray(i * PAGE_SIZE, j * PAGE_SIZE),
    useLz4
  )

/** One sweep's entries; the data of non-zero pages is packed in entry order. */
const recordsFromSweep = (region: number, data: Buffer, pages: BigUint64Array, flags: Uint8Array, n: number, useLz4: boolean) => {
  let packed = 0
  return recordsFromRuns(
    n,
    () => region,
    (i) => Number(pages[i]!),
    (i) => flags[i] === PAGE_ZERO,
    (i, j) => data.subarray(packed * PAGE_SIZE, (packed += j - i) * PAGE_SIZE),
    useLz4
  )
}

export interface WriterResult {
  readonly records: number
  /** Pages swept where the guest had just faulted. */
  readonly steeredPages: number
}

/**
 * Runs until every page is saved and written. Fails with the first I/O or
 * native error; the caller's scope then removes all protection.
 */
export const writeSnapshotBody = (
  engine: WpEngine,
  sink: RecordSink,
  options: WriterOptions = {}
): Effect.Effect<WriterResult, SnapshotIoError | NativeError> =>
  Effect.gen(function* () {
    const sweepPages = options.sweepPages ?? 256
    const maxInFlight = options.inFlight ?? 4
    const useLz4 = options.compress ?? true
    const regions = engine.regions
    const totalPages = regions.reduce((s, r) => s + regionPages(r), 0)
    const drainKeys = new BigUint64Array(DRAIN_PAGES)
    const sweepIndex = new BigUint64Array(sweepPages)
    const sweepFlags = new Uint8Array(sweepPages)
    // Buffers for drained and swept pages go back to this pool once their
    // records are on disk: the writer's memory stays bounded by inFlight
    // batches, whatever the guest's size, and payloads need no copy.
    const buffers: Array<Buffer> = []
    const takeBuffer = () => buffers.pop() ?? Buffer.allocUnsafeSlow(Math.max(DRAIN_PAGES, sweepPages) * PAGE_SIZE)
    const inflight: Array<{ records: Promise<Array<PendingRecord>>; buffer: Buffer }> = []
    let region = 0
    let cursor = 0
    let saved = 0
    let steered = 0
    const steer = options.steer ?? true
    let lastCollect = 0

    const flushOldest = Effect.gen(function* () {
      const next = inflight.shift()!
      const batch = yield* Effect.promise(() => next.records)
      yield* sink.append(batch)
      buffers.push(next.buffer)
      if (sink.bytesWritten - lastCollect > GC_EVERY_BYTES) {
        lastCollect = sink.bytesWritten
        collectYoungGarbage()
      }
    })

    /** Captures the unsaved pages of one run into a staging buffer; how many. */
    const sweep = (r: number, first: number): number => {
      const data = takeBuffer()
      const n = engine.sweepSync(r, first, sweepPages, { data, pages: sweepIndex, flags: sweepFlags })
      if (n === 0) {
        buffers.push(data)
        return 0
      }
      // recordsFromSweep reads pages/flags now; data stays in use until appended.
      inflight.push({ records: recordsFromSweep(r, data, sweepIndex, sweepFlags, n, useLz4), buffer: data })
      saved += n
      return n
    }

    const turn = Effect.try({
      try: () => {
        const drainBuf = takeBuffer()
        const drained = engine.drainSync(drainBuf, drainKeys)
        if (drained > 0) {
          inflight.push({ records: recordsFromPool(drainBuf, drainKeys, drained, useLz4), buffer: drainBuf })
          saved += drained
          return true
        }
        buffers.push(drainBuf)
        // Steering: sweep first where the guest is writing, so it meets saved pages.
        const hint = steer ? engine.hintSync() : undefined
        if (hint) {
          const n = sweep(hint.region, hint.page - (hint.page % sweepPages))
          steered += n
          if (n > 0) return true
        }
        while (region < regions.length) {
          if (cursor >= regionPages(regions[region]!)) {
            region++
            cursor = 0
            continue
          }
          const n = sweep(region, cursor)
          cursor += sweepPages
          if (n > 0) return true
        }
        return false
      },
      catch: (e) => e as NativeError
    })

    while (true) {
      const failure = engine.errorSync()
      if (failure) return yield* Effect.fail(failure)
      const progressed = yield* turn
      if (options.writerDelayMs) yield* Effect.sleep(options.writerDelayMs)
      while (inflight.length >= maxInFlight) yield* flushOldest
      options.onProgress?.(Math.min(saved, totalPages), totalPages, sink.bytesWritten)
      if (progressed) continue
      if (engine.doneSync() && inflight.length === 0) break
      // Sweep finished; pages claimed by the fault thread are still landing.
      if (inflight.length > 0) yield* flushOldest
      else yield* Effect.sleep(0)
    }
    return { records: sink.index.count, steeredPages: steered }
  })
