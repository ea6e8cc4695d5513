/**
 * The writer: moves captured pages from the engine to the snapshot file.
 *
 * The work is done by the native writer thread (vmsnap_writer.h,
 * internal/nativeWriter.ts): it takes the engine's next batches (pages the
 * fault thread saved into the pool first, which frees the memory a vCPU may
 * wait for in the synchronous fallback; then a sweep where the guest last
 * faulted, then in address order), cuts them into records (runs of zero
 * pages: zero records; runs of data: encoding-3 records of at most
 * RECORD_DATA_PAGES pages, one block and one CRC-32 per page) and appends
 * them with pwritev, raw blocks straight from the batch's buffer. This fiber
 * only watches it (every POLL_MS), reports progress and, at the end, gives
 * the file its index.
 *
 * Why native (issue 14): in JavaScript each batch cost a turn of the event
 * loop, a promise and ffi-rs argument conversion, ~200 us of CPU per
 * engine batch, and the time pages stay protected is what the guest pays.
 *
 * Compression never holds the capture up with `auto` (the default): a batch
 * is compressed by the compression thread when it is idle (it runs
 * SCHED_IDLE: only CPU no other thread wants), or by the writer itself when
 * the guest has taken no write fault for 20 ms (writer.c QUIET_NS); else it
 * is written raw (every page its own raw block).
 *
 * Memory: at most `inFlight` batches (each: the batch's pages, and with
 * compression as much again for lz4 blocks), allocated once; plus the
 * index, 24 bytes per record.
 */
import { Effect } from "effect"
import { ioError, NativeError, SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import type { SnapshotFile } from "./SnapshotFile.js"
import { errnoName, errnoReason } from "./internal/errno.js"
import { NativeWriter, NativeWriterFailure } from "./internal/nativeWriter.js"
import type { WpEngine } from "./WpNative.js"

export interface WriterOptions {
  /** Pages per batch taken from the engine (one sweep run; one ioctl unprotects it). Default 256; at least 512 (a 2 MiB huge page) with hugetlbfs regions. */
  readonly sweepPages?: number
  /** Batches in flight: with compression, how many the compression thread may hold (2-64). Default 4. */
  readonly inFlight?: number
  /** Record compression (default "auto"): see `Compression`. */
  readonly compression?: Compression
  /** Deliberately slow the writer (ms after each batch): tests and benchmarks of the fallback. */
  readonly writerDelayMs?: number
  /** The engine sweeps where the guest writes first (default true). */
  readonly steer?: boolean
  /**
   * Fail the snapshot when the output has taken nothing for this long, in ms
   * (default STALL_MS): a reader of standard output that stopped reading, a
   * hung file system. Meanwhile the pool fills and the guest waits on every
   * write fault; failing releases it.
   */
  readonly stallMs?: number
  /** Called every few ms (POLL_MS) with the pages saved (captured: no longer protected) and the file's bytes so far. */
  readonly onProgress?: (savedPages: number, totalPages: number, bytesWritten: number) => void
}

/**
 * How records are stored. "lz4": every batch compressed (the sweep waits for
 * compression when it falls behind); "none": raw; "auto": compressed only
 * with CPU nobody else wants, else raw (never waits for compression).
 */
export type Compression = "auto" | "lz4" | "none"

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
 * How often the fiber looks at the native writer, in ms: a look is one
 * native call, and progress (the bench's "last page saved") is as fine as it.
 */
const POLL_MS = 5

/** Default `stallMs`: 10 s with nothing written. */
export const STALL_MS = 10_000

export interface WriterResult {
  readonly records: number
}

/**
 * Runs until every page is saved and written. Fails with the first I/O or
 * native error; the caller's scope then removes all protection (the native
 * writer is stopped first: it is released when this effect ends or is
 * interrupted).
 */
export const writeSnapshotBody = (
  engine: WpEngine,
  file: SnapshotFile,
  options: WriterOptions = {}
): Effect.Effect<WriterResult, SnapshotIoError | NativeError> =>
  Effect.scoped(
    Effect.gen(function* () {
      // A sweep takes whole huge pages: a batch holds a 2 MiB one (512 pages); a 1 GiB one is taken over many batches.
      const batchPages = Math.max(options.sweepPages ?? 256, ...engine.regions.map((r) => Math.min((r.pageSize ?? PAGE_SIZE) / PAGE_SIZE, 512)))
      const writer = yield* Effect.acquireRelease(
        Effect.try({
          try: () =>
            NativeWriter.start(engine.nativeHandle, file.native.fd, file.bytesWritten, {
              batchPages,
              recordPages: RECORD_DATA_PAGES,
              compression: options.compression ?? "auto",
              buffers: options.inFlight ?? 4,
              delayUs: Math.round((options.writerDelayMs ?? 0) * 1000),
              stream: file.native.stream
            }),
          catch: (e) =>
            e instanceof NativeWriterFailure
              ? new NativeError({ op: "writer", errno: -e.rc, reason: errnoReason("writer", -e.rc) })
              : new NativeError({ op: "writer", errno: 0, reason: `the native writer could not start: ${String(e)}` })
        }),
        (w) => Effect.sync(() => w.destroy())
      )
      const totalPages = engine.statsSync().pagesTotal
      const stallMs = options.stallMs ?? STALL_MS
      const output = file.native.stream ? "standard output" : file.path
      let written = -1
      let movedAt = performance.now()
      while (true) {
        const s = writer.poll()
        if (s.pagesWritten !== written) {
          written = s.pagesWritten
          movedAt = performance.now()
        } else if (s.state === "running" && performance.now() - movedAt > stallMs) {
          return yield* Effect.fail(
            new SnapshotIoError({
              path: output, op: "write", code: "ETIMEDOUT",
              reason: `the output took nothing for ${(stallMs / 1000).toFixed(1)} s (a reader of standard output that stopped reading, or a hung file system); the snapshot is abandoned so that the guest is not held (--stall-timeout)`
            })
          )
        }
        options.onProgress?.(Math.min(s.pagesSaved, totalPages), totalPages, s.endOffset)
        if (s.state === "done") {
          file.adoptRecords(writer.index(), s.endOffset)
          return { records: s.records }
        }
        if (s.state === "failed") {
          if (s.source === "engine") return yield* Effect.fail(engine.errorSync() ?? new NativeError({ op: "snapshot", errno: s.errno, reason: errnoReason("snapshot", s.errno) }))
          if (s.source === "file") return yield* Effect.fail(ioError(output, "write", Object.assign(new Error(`${errnoName(s.errno)}: ${errnoReason("write", s.errno)}`), { code: errnoName(s.errno) })))
          return yield* Effect.fail(new NativeError({ op: "writer", errno: s.errno, reason: errnoReason("writer", s.errno) }))
        }
        yield* Effect.sleep(POLL_MS)
      }
    })
  )
