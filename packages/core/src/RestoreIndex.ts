/**
 * The records of a lazy restore's source in image order, built once per
 * source and shared by every VMM served from it (wp_restore_index,
 * packages/wp-native/src/restore_index.c): `vmsnap serve` builds it when it
 * opens the file, before it listens, with the index's structure checked
 * (coverage, no page stored twice, region page sizes: checkIndex); a VMM's
 * restorer then takes a reference in O(1), whatever the image's size, and
 * reads the file serve opened then (not the path again).
 */
import { Effect, type Scope } from "effect"
import { isNullPointer } from "ffi-rs"
import { closeSync, fstatSync, openSync } from "node:fs"
import { InvalidInput, ioError, NativeError, type SnapshotFormatError, type SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import { errnoReason } from "./internal/errno.js"
import { type JsExternal, loadWp } from "./internal/ffi.js"
import { concatOffsets } from "./SnapshotFormat.js"
import { type OpenSnapshot, openSnapshot } from "./SnapshotReader.js"

export interface RestoreSource {
  readonly path: string
  /** A raw memory image rather than a vmsnap file. */
  readonly raw: boolean
}

/** A source's records, held natively until the scope that opened it closes (restorers keep their own reference). */
export interface ImageIndex {
  /** Bytes of the memory image (a raw image's file size; a snapshot's regions added up). */
  readonly imageBytes: number
  /** Records (a raw image: runs of RECORD_PAGES_RAW pages). */
  readonly count: number
  /**
   * The source, open read-only for as long as the index (each restorer
   * reads its own dup): the file whose index this is, whatever the path
   * names later.
   */
  readonly fd: number
  /** The wp_restore_index. @internal */
  readonly native: JsExternal
}

/**
 * A raw image is served in "records" of 16 pages (64 KiB): a fault reads
 * and installs at most that much before its page (the faulting page goes in
 * first, then its neighbours), and the fill streams the image in such runs.
 */
export const RECORD_PAGES_RAW = 16

/** The arrays wp_restore_index_create takes, record i at [i]. */
interface IndexArrays {
  readonly imageBytes: number
  readonly count: number
  readonly regions: Uint32Array
  readonly firstPages: BigUint64Array
  readonly counts: Uint32Array
  readonly offsets: BigUint64Array
  readonly imagePages: BigUint64Array
}

const arrays = (imageBytes: number, count: number): IndexArrays => ({
  imageBytes, count,
  regions: new Uint32Array(count), firstPages: new BigUint64Array(count), counts: new Uint32Array(count),
  offsets: new BigUint64Array(count), imagePages: new BigUint64Array(count)
})

/** A raw image: runs of RECORD_PAGES_RAW pages at their own offsets, as long as the file open at `fd` is now. */
const rawArrays = (fd: number): IndexArrays => {
  const size = fstatSync(fd).size
  const pages = Math.ceil(size / PAGE_SIZE)
  const a = arrays(size, Math.ceil(pages / RECORD_PAGES_RAW))
  for (let i = 0, p = 0; p < pages; i++, p += RECORD_PAGES_RAW) {
    a.firstPages[i] = a.imagePages[i] = BigInt(p)
    a.counts[i] = Math.min(RECORD_PAGES_RAW, pages - p)
    a.offsets[i] = BigInt(p * PAGE_SIZE)
  }
  return a
}

/** A snapshot's records, its index's structure checked at open (checkIndex), in image order. */
const snapshotArrays = (s: OpenSnapshot): IndexArrays => {
  const starts = concatOffsets(s.header.regions)
  const entries = s.index
    .map((e) => ({ e, imagePage: starts[e.region]! / PAGE_SIZE + e.firstPage }))
    .sort((x, y) => x.imagePage - y.imagePage)
  const a = arrays(s.header.regions.reduce((n, r) => n + r.size, 0), entries.length)
  entries.forEach(({ e, imagePage }, i) => {
    a.regions[i] = e.region
    a.firstPages[i] = BigInt(e.firstPage)
    a.counts[i] = e.pageCount
    a.offsets[i] = BigInt(e.fileOffset)
    a.imagePages[i] = BigInt(imagePage)
  })
  return a
}

/**
 * Opens the source (kept open in the scope: the fd every restorer reads) and
 * reads its index from that very file: a file put at the path later (a
 * rename over it) is never served with this index.
 */
const openSource = (source: RestoreSource): Effect.Effect<{ fd: number; arrays: IndexArrays }, SnapshotFormatError | SnapshotIoError | InvalidInput, Scope.Scope> =>
  source.raw
    ? Effect.flatMap(
      Effect.acquireRelease(Effect.try({ try: () => openSync(source.path, "r"), catch: (e) => ioError(source.path, "open", e) }), (fd) => Effect.sync(() => closeSync(fd))),
      (fd) => Effect.flatMap(Effect.try({ try: () => rawArrays(fd), catch: (e) => ioError(source.path, "stat", e) }), (arrays) =>
        arrays.count === 0
          ? Effect.fail(new InvalidInput({ reason: `${source.path}: the raw image is empty: no page to serve` }))
          : arrays.imageBytes % PAGE_SIZE
          ? Effect.fail(new InvalidInput({ reason: `${source.path}: the raw image is ${arrays.imageBytes} bytes, not a whole number of ${PAGE_SIZE}-byte pages (a raw memory image, as \`vmsnap restore --raw\` or a VMM writes it, always is): its last page cannot be served` }))
          : Effect.succeed({ fd, arrays }))
    )
    : Effect.map(openSnapshot(source.path), (s) => ({ fd: s.file.fd, arrays: snapshotArrays(s) }))

const buf = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

/**
 * Opens a source's index once: read, checked (SnapshotFormatError; an empty
 * raw image: InvalidInput), handed to C (NativeError: -EINVAL when its
 * records do not tile the image); freed
 * when the scope closes and no restorer holds it any more.
 */
export const openImageIndex = (source: RestoreSource): Effect.Effect<ImageIndex, SnapshotFormatError | SnapshotIoError | InvalidInput | NativeError, Scope.Scope> =>
  Effect.flatMap(openSource(source), ({ fd, arrays: a }) =>
    Effect.acquireRelease(
      Effect.suspend(() => {
        const err = new Int32Array(1)
        const native: JsExternal = loadWp().wp_restore_index_create([buf(a.regions), buf(a.firstPages), buf(a.counts), buf(a.offsets), buf(a.imagePages), a.count, buf(err)])
        return isNullPointer(native)
          ? Effect.fail(new NativeError({ op: "lazy restore index", errno: -err[0]!, reason: errnoReason("lazy restore index", -err[0]!) }))
          : Effect.succeed({ imageBytes: a.imageBytes, count: a.count, fd, native } satisfies ImageIndex)
      }),
      (index) => Effect.sync(() => loadWp().wp_restore_index_release([index.native]))
    ))
