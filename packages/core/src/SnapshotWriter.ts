/**
 * The writer fiber: moves captured pages from the engine to the snapshot file.
 *
 * Each turn it asks the engine for the next batch; the engine decides what
 * that is (pages the fault thread saved into the pool first, which frees the
 * memory a vCPU may wait for in the synchronous fallback; then a sweep where
 * the guest last faulted, then in address order). A batch is cut into
 * records (runs of consecutive pages), compressed with lz4 on the libuv
 * thread pool while the next batch is taken, and appended to the
 * SnapshotFile as each batch is ready (any order: the index says where each
 * record is).
 *
 * Compression never holds the capture up with `auto` (the default): a batch
 * is compressed only with CPU the machine leaves idle (at least half a core
 * over the last 100 ms, from /proc/stat) and while no other batch is being
 * compressed, else written raw (the format has raw records). While pages
 * are protected the guest pays for every one not yet saved, so the sweep
 * must go on at the speed of copying memory, and compression must not take
 * the core a vCPU needs (issue 14: on 2 cores with a vCPU writing flat out,
 * compressing one batch at a time still doubled the time pages stayed
 * protected).
 */
import { Effect } from "effect"
import { compress, compressSync } from "lz4-napi"
import type { NativeError, SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE, regionPages } from "./GuestMemory.js"
import type { Encoding } from "./SnapshotFormat.js"
import type { PendingRecord, SnapshotFile } from "./SnapshotFile.js"
import { collectYoungGarbage } from "./internal/gc.js"
import { IdleCpu } from "./internal/idleCpu.js"
import { type EngineBatch, PAGE_ZERO, type WpEngine } from "./WpNative.js"

export interface WriterOptions {
  /** Pages per batch taken from the engine (one sweep run; one ioctl unprotects it). Default 256; at least 512 (a 2 MiB huge page) with hugetlbfs regions. */
  readonly sweepPages?: number
  /** Batches being compressed at once. Default 4. */
  readonly inFlight?: number
  /** Record compression (default "auto"): see `Compression`. */
  readonly compression?: Compression
  /** Deliberately slow the writer (ms per turn): tests and benchmarks of the fallback. */
  readonly writerDelayMs?: number
  /** The engine sweeps where the guest writes first (default true). */
  readonly steer?: boolean
  /** Called after every turn with pages saved so far. */
  readonly onProgress?: (savedPages: number, totalPages: number, bytesWritten: number) => void
}

/**
 * How records are stored. "lz4": every batch compressed (the writer waits for
 * compression when it falls behind); "none": raw; "auto": compressed with
 * idle CPU only, one batch at a time, else raw (never waits for compression).
 */
export type Compression = "auto" | "lz4" | "none"

/** Half a core idle: enough for lz4 to keep up with a batch at a time. */
const IDLE_CORES_TO_COMPRESS = 0.5

/** Whether a batch is compressed: `compressing` batches are on the thread pool, `idleCores` from IdleCpu. */
export const compressBatch = (compression: Compression, compressing: number, idleCores: number): boolean =>
  compression === "lz4" || (compression === "auto" && compressing === 0 && idleCores >= IDLE_CORES_TO_COMPRESS)

/** The values of `Compression`, for option parsers. */
export const COMPRESSIONS: ReadonlyArray<Compression> = ["auto", "lz4", "none"]

/** Written bytes between young-generation collections (see internal/gc.ts). */
const GC_EVERY_BYTES = 8 * 1024 * 1024
/**
 * Pages per data record at most (64 KiB, LZ4's window): a lazy restore
 * decodes one record per fault, so a record is the most a faulting vCPU
 * waits for. Measured: 1 MiB records cost a fault ~500 us to decode (issue 10).
 */
export const RECORD_DATA_PAGES = 16

/** Runs shorter than this are compressed inline; a thread-pool hop costs more. */
const INLINE_COMPRESS_PAGES = 8

const encodePayload = (raw: Buffer, pages: number, useLz4: boolean): Promise<{ encoding: Encoding; payload: Buffer }> => {
  if (!useLz4) return Promise.resolve({ encoding: "raw", payload: raw })
  const pick = (c: Buffer) => (c.length < raw.length ? { encoding: "lz4" as const, payload: c } : { encoding: "raw" as const, payload: raw })
  if (pages < INLINE_COMPRESS_PAGES) return Promise.resolve(pick(compressSync(raw)))
  return compress(raw).then(pick)
}

/**
 * Cuts the n entries of a batch into records: maximal runs of consecutive
 * pages of one region that are all zero (a zero record), or runs of data of
 * at most RECORD_DATA_PAGES (each payload a view of the batch's packed data:
 * no copy). Reads the batch's
 * arrays now; its data buffer stays in use until the records are appended.
 */
export const recordsFromBatch = (batch: EngineBatch, n: number, useLz4: boolean): Promise<Array<PendingRecord>> => {
  const out: Array<Promise<PendingRecord>> = []
  let packed = 0
  for (let i = 0; i < n; ) {
    const region = batch.regions[i]!
    const firstPage = Number(batch.pages[i]!)
    const zero = batch.flags[i] === PAGE_ZERO
    let j = i + 1
    while (j < n && batch.regions[j] === region && Number(batch.pages[j]!) === firstPage + (j - i) && (batch.flags[j] === PAGE_ZERO) === zero) j++
    const pageCount = j - i
    if (zero) out.push(Promise.resolve({ region, firstPage, pageCount, encoding: "zero" as const, payload: undefined }))
    else
      for (let at = 0; at < pageCount; at += RECORD_DATA_PAGES) {
        const pages = Math.min(RECORD_DATA_PAGES, pageCount - at)
        const raw = batch.data.subarray(packed * PAGE_SIZE, (packed + pages) * PAGE_SIZE)
        packed += pages
        out.push(encodePayload(raw, pages, useLz4).then((p) => ({ region, firstPage: firstPage + at, pageCount: pages, ...p })))
      }
    i = j
  }
  return Promise.all(out)
}

export interface WriterResult {
  readonly records: number
}

/** Batches taken but not yet appended, and the data buffers free for reuse. */
class InFlight {
  private readonly queue: Array<{ records: Promise<Array<PendingRecord>>; data: Buffer; ready: boolean }> = []
  private readonly free: Array<Buffer> = []
  private lastCollect = 0
  /** Batches whose records are being compressed on the thread pool. */
  compressing = 0

  constructor(private readonly batchPages: number) {}

  get size(): number {
    return this.queue.length
  }

  /** A data buffer for one batch: the writer's memory stays bounded by inFlight batches. */
  takeBuffer(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.batchPages * PAGE_SIZE)
  }

  giveBack(data: Buffer): void {
    this.free.push(data)
  }

  push(records: Promise<Array<PendingRecord>>, data: Buffer, compressed: boolean): void {
    const entry = { records, data, ready: false }
    if (compressed) this.compressing++
    const settle = () => {
      entry.ready = true
      if (compressed) this.compressing--
    }
    records.then(settle, settle)
    this.queue.push(entry)
  }

  /** Appends a batch whose records are ready (the oldest such), else waits for the oldest; then reuses its buffer. */
  flushOne(file: SnapshotFile): Effect.Effect<void, SnapshotIoError> {
    const self = this
    return Effect.gen(function* () {
      const at = Math.max(0, self.queue.findIndex((b) => b.ready))
      const next = self.queue.splice(at, 1)[0]!
      yield* file.append(yield* Effect.promise(() => next.records))
      self.free.push(next.data)
      if (file.bytesWritten - self.lastCollect > GC_EVERY_BYTES) {
        self.lastCollect = file.bytesWritten
        collectYoungGarbage()
      }
    })
  }
}

/**
 * Runs until every page is saved and written. Fails with the first I/O or
 * native error; the caller's scope then removes all protection.
 */
export const writeSnapshotBody = (
  engine: WpEngine,
  file: SnapshotFile,
  options: WriterOptions = {}
): Effect.Effect<WriterResult, SnapshotIoError | NativeError> =>
  Effect.gen(function* () {
    // A sweep takes whole huge pages: a batch holds a 2 MiB one (512 pages); a 1 GiB one is taken over many batches.
    const batchPages = Math.max(options.sweepPages ?? 256, ...engine.regions.map((r) => Math.min((r.pageSize ?? PAGE_SIZE) / PAGE_SIZE, 512)))
    const maxInFlight = options.inFlight ?? 4
    const compression = options.compression ?? "auto"
    const idle = new IdleCpu()
    const totalPages = engine.regions.reduce((s, r) => s + regionPages(r), 0)
    const inflight = new InFlight(batchPages)
    const arrays = { regions: new Uint32Array(batchPages), pages: new BigUint64Array(batchPages), flags: new Uint8Array(batchPages) }
    let saved = 0

    /** Takes the engine's next batch into a fresh buffer; false when none was ready. */
    const takeBatch = Effect.try({
      try: () => {
        const batch = { data: inflight.takeBuffer(), ...arrays }
        const n = engine.nextBatchSync(batch)
        if (n === 0) {
          inflight.giveBack(batch.data)
          return false
        }
        const useLz4 = compressBatch(compression, inflight.compressing, compression === "auto" ? idle.cores() : 0)
        inflight.push(recordsFromBatch(batch, n, useLz4), batch.data, useLz4)
        saved += n
        return true
      },
      catch: (e) => e as NativeError
    })

    while (true) {
      const failure = engine.errorSync()
      if (failure) return yield* Effect.fail(failure)
      const progressed = yield* takeBatch
      if (options.writerDelayMs) yield* Effect.sleep(options.writerDelayMs)
      while (inflight.size >= maxInFlight) yield* inflight.flushOne(file)
      options.onProgress?.(Math.min(saved, totalPages), totalPages, file.bytesWritten)
      if (progressed) continue
      if (engine.doneSync() && inflight.size === 0) break
      // Nothing left to sweep; pages the fault thread saved are still landing.
      if (inflight.size > 0) yield* inflight.flushOne(file)
      else yield* Effect.sleep(0)
    }
    return { records: file.recordCount }
  })
