/**
 * The writer fiber: moves captured pages from the engine to the snapshot file.
 *
 * Each turn it asks the engine for the next batch; the engine decides what
 * that is (pages the fault thread saved into the pool first, which frees the
 * memory a vCPU may wait for in the synchronous fallback; then a sweep where
 * the guest last faulted, then in address order). One native call per batch
 * (recordCodec.ts `encodeBatch`, vmsnap_record.h) cuts it into records (runs
 * of zero pages: zero records; runs of data: encoding-3 records of at most
 * RECORD_DATA_PAGES pages, one block and one CRC-32 per page), compresses and
 * checksums them into the batch's output buffer; the batch is appended to
 * the SnapshotFile with one write as soon as it is ready (any order: the
 * index says where each record is). Raw batches are encoded on this thread
 * (a copy and a CRC per page), lz4 batches on the libuv thread pool while the
 * next batch is taken.
 *
 * Compression never holds the capture up with `auto` (the default): a batch
 * is compressed only with CPU the machine leaves idle (at least half a core
 * over the last 100 ms, from /proc/stat) and while no other batch is being
 * compressed, else written raw (every page its own raw block). While pages
 * are protected the guest pays for every one not yet saved, so the sweep
 * must go on at the speed of copying memory, and compression must not take
 * the core a vCPU needs (issue 14: on 2 cores with a vCPU writing flat out,
 * compressing one batch at a time still doubled the time pages stayed
 * protected).
 *
 * Memory: at most `inFlight` batches' buffers (each: the batch's pages and
 * its encoded records, about 2 x batch pages x 4 KiB), reused.
 */
import { Effect } from "effect"
import type { NativeError, SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE, regionPages } from "./GuestMemory.js"
import type { SnapshotFile } from "./SnapshotFile.js"
import { IdleCpu } from "./internal/idleCpu.js"
import { batchBuffers, type BatchBuffers, encodeBatch, encodeBatchSync } from "./internal/recordCodec.js"
import { PAGE_ZERO, type WpEngine } from "./WpNative.js"

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

/**
 * Pages per data record at most (64 KiB): a lazy restore reads one record
 * (or, for encoding 3, one page of it) per fault, so a record is the most a
 * faulting vCPU waits for. Measured: 1 MiB records cost a fault ~500 us to
 * decode (issue 10).
 */
export const RECORD_DATA_PAGES = 16

/**
 * Engine batches gathered into one writer batch: at most this many calls,
 * each after the first with at least MIN_TAKE_PAGES of room (a sweep window that small
 * still unprotects with one ioctl). Measured on a 1 GiB random writer
 * (bench, 2026-11-29): the engine handed ~7 000 batches of mostly 16-127
 * pages, and each cost the writer ~200 us of CPU (a turn of the fiber, a
 * write's promise), most of its 1.4 s.
 */
const MAX_TAKES_PER_TURN = 16
const MIN_TAKE_PAGES = 64

export interface WriterResult {
  readonly records: number
}

/** Batches taken but not yet appended, and the buffers free for reuse. */
class InFlight {
  private readonly queue: Array<{ records: Promise<number>; buffers: BatchBuffers; ready: boolean }> = []
  private readonly free: Array<BatchBuffers> = []
  /** Batches being compressed on the thread pool. */
  compressing = 0

  constructor(private readonly batchPages: number) {}

  get size(): number {
    return this.queue.length
  }

  /** Buffers for one batch: the writer's memory stays bounded by inFlight batches. */
  takeBuffers(): BatchBuffers {
    return this.free.pop() ?? batchBuffers(this.batchPages)
  }

  giveBack(buffers: BatchBuffers): void {
    this.free.push(buffers)
  }

  /** A batch being encoded: `records` settles with its record count. */
  push(records: Promise<number>, buffers: BatchBuffers, compressed: boolean): void {
    const entry = { records, buffers, ready: false }
    if (compressed) this.compressing++
    const settle = () => {
      entry.ready = true
      if (compressed) this.compressing--
    }
    records.then(settle, settle)
    this.queue.push(entry)
  }

  /** Appends a batch whose records are ready (the oldest such), else waits for the oldest; then reuses its buffers. */
  flushOne(file: SnapshotFile): Effect.Effect<void, SnapshotIoError> {
    const self = this
    return Effect.gen(function* () {
      const at = Math.max(0, self.queue.findIndex((b) => b.ready))
      const next = self.queue.splice(at, 1)[0]!
      const count = yield* Effect.promise(() => next.records)
      yield* file.appendEncoded(next.buffers.out, next.buffers.records, count)
      self.free.push(next.buffers)
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
    let saved = 0

    /**
     * Takes the engine's next batches into free buffers, as many as fit (the
     * engine often hands a few pool pages or a partly saved sweep window: one
     * encode and one write per turn, not per engine batch), and starts
     * encoding them; false when none was ready.
     */
    const takeBatch = Effect.try({
      try: () => {
        const batch = inflight.takeBuffers()
        let n = 0
        let packed = 0
        for (let calls = 0; calls < MAX_TAKES_PER_TURN && n < batchPages && (calls === 0 || batchPages - n >= MIN_TAKE_PAGES); calls++) {
          const got = engine.nextBatchSync({
            data: batch.data.subarray(packed * PAGE_SIZE),
            regions: batch.regions.subarray(n),
            pages: batch.pages.subarray(n),
            flags: batch.flags.subarray(n)
          })
          if (got === 0) break
          for (let i = n; i < n + got; i++) if (batch.flags[i] !== PAGE_ZERO) packed++
          n += got
        }
        if (n === 0) {
          inflight.giveBack(batch)
          return false
        }
        const useLz4 = compressBatch(compression, inflight.compressing, compression === "auto" ? idle.cores() : 0)
        const records = useLz4 ? encodeBatch(batch, n, RECORD_DATA_PAGES, true) : Promise.resolve(encodeBatchSync(batch, n, RECORD_DATA_PAGES, false))
        inflight.push(records, batch, useLz4)
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
