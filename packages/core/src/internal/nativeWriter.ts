/**
 * The native writer (`packages/wp-native/include/vmsnap_writer.h`) bound for
 * SnapshotWriter.ts: a C thread that takes the engine's captured pages,
 * encodes them as records and appends them to the snapshot file with
 * pwritev, so no batch crosses into JavaScript.
 * @internal
 */
import { isNullPointer, type JsExternal } from "ffi-rs"
import {
  loadWp, WP_WRITER_AUTO, WP_WRITER_DONE, WP_WRITER_FAILED, WP_WRITER_FROM_ENGINE, WP_WRITER_FROM_FILE, WP_WRITER_LZ4,
  WP_WRITER_NONE, WP_WRITER_RECORD_BYTES, WP_WRITER_SEQUENTIAL, WP_WRITER_STATS_FIELDS
} from "./ffi.js"

export interface NativeWriterOptions {
  /** Pages per batch (1..16384). */
  readonly batchPages: number
  /** Pages per data record (1..256). */
  readonly recordPages: number
  readonly compression: "auto" | "lz4" | "none"
  /** Batches in flight (2..64): with compression, what the compression thread may hold. */
  readonly buffers: number
  /** Sleep after each batch, in microseconds (tests of the fallback). */
  readonly delayUs: number
  /** fd is a stream (standard output): written in order with writev. */
  readonly stream: boolean
}

/** What `wp_writer_poll` says. */
export interface NativeWriterState {
  readonly state: "running" | "done" | "failed"
  /** errno of the first failure (positive), 0 if none. */
  readonly errno: number
  /** Where it came from: the engine (wp_engine_error says why), the file (a write), or memory (the index). */
  readonly source: "engine" | "file" | "memory" | undefined
  /** The engine's pages captured so far (no longer protected). */
  readonly pagesSaved: number
  readonly pagesWritten: number
  /** The file's next free byte: the records end here. */
  readonly endOffset: number
  readonly records: number
  readonly batchesRaw: number
  readonly batchesLz4: number
  readonly batchesLz4Inline: number
}

/** One record the writer appended: where it is and which pages it holds. */
export interface WrittenRecord {
  readonly region: number
  readonly pageCount: number
  readonly firstPage: number
  readonly fileOffset: number
}

const COMPRESSION = { none: WP_WRITER_NONE, lz4: WP_WRITER_LZ4, auto: WP_WRITER_AUTO } as const

export class NativeWriter {
  private destroyed = false

  private constructor(private readonly handle: JsExternal) {}

  /**
   * A writer of `engine`'s pages into `fd` from byte `offset` on, started.
   * Throws the -errno of wp_writer_create/start (-EINVAL: options out of
   * range; -ENOMEM).
   */
  static start(engine: JsExternal, fd: number, offset: number, o: NativeWriterOptions): NativeWriter {
    const err = new Int32Array(1)
    const handle: JsExternal = loadWp().wp_writer_create([
      engine, fd, BigInt(offset), o.batchPages, o.recordPages, COMPRESSION[o.compression], o.buffers, o.delayUs, o.stream ? WP_WRITER_SEQUENTIAL : 0, Buffer.from(err.buffer)
    ])
    if (isNullPointer(handle)) throw new NativeWriterFailure(err[0]!)
    const writer = new NativeWriter(handle)
    const rc: number = loadWp().wp_writer_start([handle])
    if (rc < 0) {
      writer.destroy()
      throw new NativeWriterFailure(rc)
    }
    return writer
  }

  poll(): NativeWriterState {
    const words = new BigInt64Array(WP_WRITER_STATS_FIELDS.length)
    loadWp().wp_writer_poll([this.handle, Buffer.from(words.buffer)])
    const n = (field: (typeof WP_WRITER_STATS_FIELDS)[number]) => Number(words[WP_WRITER_STATS_FIELDS.indexOf(field)])
    const source = n("error_source")
    return {
      state: n("state") === WP_WRITER_DONE ? "done" : n("state") === WP_WRITER_FAILED ? "failed" : "running",
      errno: -n("error"),
      source: source === WP_WRITER_FROM_ENGINE ? "engine" : source === WP_WRITER_FROM_FILE ? "file" : source ? "memory" : undefined,
      pagesSaved: n("pages_saved"),
      pagesWritten: n("pages_written"),
      endOffset: n("end_offset"),
      records: n("records"),
      batchesRaw: n("batches_raw"),
      batchesLz4: n("batches_lz4"),
      batchesLz4Inline: n("batches_lz4_inline")
    }
  }

  /** Every record appended, in file order (complete once the writer is done). */
  index(): Array<WrittenRecord> {
    const count = Number(loadWp().wp_writer_index([this.handle, Buffer.alloc(0), 0n]))
    const b = Buffer.alloc(count * WP_WRITER_RECORD_BYTES)
    loadWp().wp_writer_index([this.handle, b, BigInt(count)])
    const out: Array<WrittenRecord> = []
    for (let o = 0; o < b.length; o += WP_WRITER_RECORD_BYTES)
      out.push({ region: b.readUInt32LE(o), pageCount: b.readUInt32LE(o + 4), firstPage: Number(b.readBigUInt64LE(o + 8)), fileOffset: Number(b.readBigUInt64LE(o + 16)) })
    return out
  }

  /**
   * Stops its threads and frees it; once. Blocks up to 2 s per thread stuck
   * in a write, which is then left to end alone (vmsnap_writer.h); after
   * this the engine may be destroyed.
   */
  destroy(): void {
    if (this.destroyed) return
    this.destroyed = true
    loadWp().wp_writer_destroy([this.handle])
  }
}

/** wp_writer_create or wp_writer_start refused (rc: -errno). */
export class NativeWriterFailure extends Error {
  constructor(readonly rc: number) {
    super(`native writer: ${rc}`)
  }
}
