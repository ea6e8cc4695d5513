/**
 * The snapshot file on the writer side: the header at offset 0, records
 * appended in arrival order, then the index and the trailer, then the atomic
 * commit. The bytes of each part are laid out in SnapshotFormat.ts; this
 * module owns where they go and when the file becomes visible.
 *
 * The file is written under a temporary name (AtomicFile.ts) and appears
 * under its final name only through `commit` (fsync, rename, fsync of the
 * directory); released uncommitted (error, interruption), nothing partial is
 * left. Records are appended strictly in the order `append` is called, or
 * by the native writer (`adoptRecords`).
 */
import { Effect, type Scope } from "effect"
import type { FileHandle } from "node:fs/promises"
import { type AtomicFile, atomicFile, type AtomicFileOptions } from "./AtomicFile.js"
import { ioError, type SnapshotIoError } from "./Errors.js"
import { encodeHeader, encodeRecord, encodeTrailer, type Encoding, IndexBuilder, type IndexEntry, type SnapshotHeader } from "./SnapshotFormat.js"

/** A record ready to append with `append`: a run of pages of one region and its payload (none for zero records). */
export interface PendingRecord {
  readonly region: number
  readonly firstPage: number
  readonly pageCount: number
  readonly encoding: Encoding
  readonly payload: Buffer | undefined
}

export class SnapshotFile {
  private readonly index = new IndexBuilder()
  private offset: number

  /** @internal use `SnapshotFile.create` */
  constructor(
    private readonly file: FileHandle,
    /** For the native writer: descriptor, stream or not (AtomicFile.ts). */
    readonly native: AtomicFile["native"],
    readonly path: string,
    headerBytes: number,
    /** Makes the file durable under its final name (after `finish`). */
    readonly commit: Effect.Effect<void, SnapshotIoError>
  ) {
    this.offset = headerBytes
  }

  /**
   * Creates the temporary file (as `output` says: mode, confining directory)
   * and writes the header. Scoped: released
   * without `commit`, the temporary file is deleted.
   */
  static create(
    path: string,
    output: AtomicFileOptions | undefined,
    header: Omit<SnapshotHeader, "headerBytes" | "version">
  ): Effect.Effect<SnapshotFile, SnapshotIoError, Scope.Scope> {
    return Effect.gen(function* () {
      const out = yield* atomicFile(path, output ?? {})
      const bytes = encodeHeader(header)
      const file = new SnapshotFile(out.file, out.native, path, bytes.length, out.commit)
      yield* file.writeAll([bytes], 0)
      return file
    })
  }

  /** Bytes written so far (header, records, and after `finish` index and trailer). */
  get bytesWritten(): number {
    return this.offset
  }

  /** Records appended so far. */
  get recordCount(): number {
    return this.index.count
  }

  /**
   * Records another writer appended (the native writer: vmsnap_writer.h),
   * in file order, ending at `endOffset`: they go into the index, and the
   * index and trailer will follow them.
   */
  adoptRecords(records: ReadonlyArray<IndexEntry>, endOffset: number): void {
    for (const r of records) this.index.add(r)
    this.native.wrote(endOffset - this.offset)
    this.offset = endOffset
  }

  /** Appends records encoded here (encodings 0-2, one header each; tests write old files with it). */
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
      return this.writeAll(buffers, start)
    })
  }

  /** Index and trailer: after this the file is complete (not yet durable: `commit`). Returns the file's size. */
  finish(): Effect.Effect<number, SnapshotIoError> {
    return Effect.suspend(() => {
      const index = this.index.encode()
      const trailer = encodeTrailer({ indexOffset: this.offset, indexBytes: index.length, recordCount: this.index.count })
      const start = this.offset
      this.offset += index.length + trailer.length
      return Effect.as(this.writeAll([index, trailer], start), this.offset)
    })
  }

  /** Writes every buffer at `position` onwards, retrying short writes. */
  private writeAll(buffers: Array<Buffer>, position: number): Effect.Effect<void, SnapshotIoError> {
    return Effect.tryPromise({
      try: async () => {
        let pos = position
        let pending = buffers
        while (pending.length > 0) {
          const { bytesWritten } = await this.file.writev(pending, pos)
          pos += bytesWritten
          pending = dropWritten(pending, bytesWritten)
        }
      },
      catch: (e) => ioError(this.path, "write", e)
    })
  }
}

/** What is left of `buffers` after the first `written` bytes went out. */
const dropWritten = (buffers: ReadonlyArray<Buffer>, written: number): Array<Buffer> => {
  const rest: Array<Buffer> = []
  let skip = written
  for (const b of buffers) {
    if (skip >= b.length) skip -= b.length
    else {
      rest.push(skip > 0 ? b.subarray(skip) : b)
      skip = 0
    }
  }
  return rest
}
