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
  storedPages = 0
  rawBytes = 0

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
        this.storedPages += r.pageCount
        if (r.encoding !== "zero") this.rawBytes += r.pageCount * PAGE_SIZE
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

/** Splits drained pages (keys: region << 48 | page) into runs of consecutive pages. */
const recordsFromPool = (buf: Buffer, keys: BigUint64Array, n: number, useLz4: boolean): Promise<Array<PendingRecord>> => {
  const out: Array<Promise<PendingRecord>> = []
  let i = 0
  const isZero = (k: number) => buf.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE).equals(ZERO_PAGE)
  while (i < n) {
    const region = Number(keys[i]! >> 48n)
    const first = Number(keys[i]! & 0xffffffffffffn)
    const zero = isZero(i)
    let j = i + 1
    while (j < n && Number(keys[j]! >> 48n) === region && Number(keys[j]! & 0xffffffffffffn) === first + (j - i) && isZero(j) === zero) j++
    if (zero) {
      // Fault-around saves untouched neighbours too: keep them as zero records.
      out.push(Promise.resolve({ region, firstPage: first, pageCount: j - i, encoding: "zero" as const, payload: undefined }))
      i = j
      continue
    }
    const view = buf.subarray(i * PAGE_SIZE, j * PAGE_SIZE)
    const count = j - i
    if (useLz4 && count < INLINE_COMPRESS_PAGES) {
      // Compressed now, so the drain buffer may be reused; copied only if kept raw.
      const c = compressSync(view)
      const p = c.length < view.length ? { encoding: "lz4" as const, payload: c } : { encoding: "raw" as const, payload: view }
      out.push(Promise.resolve({ region, firstPage: first, pageCount: count, ...p }))
    } else {
      // No copy: this drain buffer is not reused until these records are on disk.
      out.push(encodePayload(view, count, useLz4).then((p) => ({ region, firstPage: first, pageCount: count, ...p })))
    }
    i = j
  }
  return Promise.all(out)
}

/** Splits one sweep's entries into zero runs and data runs of consecutive pages. */
const recordsFromSweep = (
  region: number,
  data: Buffer,
  pages: BigUint64Array,
  flags: Uint8Array,
  n: number,
  useLz4: boolean
): Promise<Array<PendingRecord>> => {
  const out: Array<Promise<PendingRecord>> = []
  let i = 0
  let dataIndex = 0
  while (i < n) {
    const zero = flags[i] === PAGE_ZERO
    const first = Number(pages[i]!)
    let j = i + 1
    while (j < n && (flags[j] === PAGE_ZERO) === zero && Number(pages[j]!) === first + (j - i)) j++
    const count = j - i
    if (zero) {
      out.push(Promise.resolve({ region, firstPage: first, pageCount: count, encoding: "zero", payload: undefined }))
    } else {
      const raw = data.subarray(dataIndex * PAGE_SIZE, (dataIndex + count) * PAGE_SIZE)
      dataIndex += count
      out.push(encodePayload(raw, count, useLz4).then((p) => ({ region, firstPage: first, pageCount: count, ...p })))
    }
    i = j
  }
  return Promise.all(out)
}

export interface WriterResult {
  readonly records: number
  readonly storedPages: number
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
    // Drain buffers, like staging buffers, go back to their pool once their records are on disk.
    const drainBuffers: Array<Buffer> = []
    const takeDrainBuffer = () => drainBuffers.pop() ?? Buffer.allocUnsafeSlow(DRAIN_PAGES * PAGE_SIZE)
    const drainKeys = new BigUint64Array(DRAIN_PAGES)
    const sweepIndex = new BigUint64Array(sweepPages)
    const sweepFlags = new Uint8Array(sweepPages)
    // Staging buffers are reused once their records are on disk: the writer's
    // memory stays bounded by inFlight runs, whatever the guest's size.
    const staging: Array<Buffer> = []
    const takeStaging = () => staging.pop() ?? Buffer.allocUnsafeSlow(sweepPages * PAGE_SIZE)
    const inflight: Array<{ records: Promise<Array<PendingRecord>>; staging?: Buffer; drain?: Buffer }> = []
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
      if (next.staging) staging.push(next.staging)
      if (next.drain) drainBuffers.push(next.drain)
      if (sink.bytesWritten - lastCollect > GC_EVERY_BYTES) {
        lastCollect = sink.bytesWritten
        collectYoungGarbage()
      }
    })

    const turn = Effect.try({
      try: () => {
        const drainBuf = takeDrainBuffer()
        const drained = engine.drainSync(drainBuf, drainKeys)
        if (drained === 0) drainBuffers.push(drainBuf)
        if (drained > 0) {
          inflight.push({ records: recordsFromPool(drainBuf, drainKeys, drained, useLz4), drain: drainBuf })
          saved += drained
          return true
        }
        // Steering: sweep first where the guest is writing, so it meets saved pages.
        const hint = steer ? engine.hintSync() : undefined
        if (hint) {
          const first = hint.page - (hint.page % sweepPages)
          const out = { data: takeStaging(), pages: sweepIndex, flags: sweepFlags }
          const n = engine.sweepSync(hint.region, first, sweepPages, out)
          if (n > 0) {
            inflight.push({ records: recordsFromSweep(hint.region, out.data, out.pages, out.flags, n, useLz4), staging: out.data })
            saved += n
            steered += n
            return true
          }
          staging.push(out.data)
        }
        while (region < regions.length) {
          const pages = regionPages(regions[region]!)
          if (cursor >= pages) {
            region++
            cursor = 0
            continue
          }
          const out = { data: takeStaging(), pages: sweepIndex, flags: sweepFlags }
          const n = engine.sweepSync(region, cursor, sweepPages, out)
          cursor += sweepPages
          if (n > 0) {
            // recordsFromSweep reads pages/flags synchronously; data stays in use until appended.
            inflight.push({ records: recordsFromSweep(region, out.data, out.pages, out.flags, n, useLz4), staging: out.data })
            saved += n
            return true
          }
          staging.push(out.data)
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
    return { records: sink.index.count, storedPages: sink.storedPages, steeredPages: steered }
  })
