/**
 * Eager restore: every page of a snapshot into live memory regions or into a
 * raw memory image. Nothing is written from a file that fails verification:
 * memory targets are written only after a full verify pass, and raw images
 * are written under a temporary name and renamed only when complete.
 *
 * Raw image layouts (docs/format.md): "concat" puts region i at the sum of
 * the sizes of regions 0..i-1 in one file; "per-region" writes OUT.<i>.
 */
import { Effect } from "effect"
import { type AtomicFile, atomicFile } from "./AtomicFile.js"
import { InvalidInput, ioError, type SnapshotFormatError, type SnapshotIoError } from "./Errors.js"
import { PAGE_SIZE, type Hva } from "./GuestMemory.js"
import { loadWp } from "./internal/ffi.js"
import { concatOffsets } from "./SnapshotFormat.js"
import { openSnapshot, walkRecords, type DecodedRecord, type VerifyReport } from "./SnapshotReader.js"

export interface MemoryTarget {
  /** Host-virtual base of each region, in header order. */
  readonly hostBases: ReadonlyArray<Hva>
  /** The regions hold zeros already (fresh mappings): zero records are skipped. */
  readonly targetIsZero?: boolean
}

const ZERO_CHUNK = Buffer.alloc(256 * PAGE_SIZE)

/** Restores into this process's memory at the given host-virtual bases. */
export const restoreToMemory = (
  path: string,
  target: MemoryTarget,
  onProgress?: (done: number, total: number) => void
): Effect.Effect<VerifyReport, SnapshotFormatError | SnapshotIoError | InvalidInput> =>
  Effect.scoped(
    Effect.gen(function* () {
      const s = yield* openSnapshot(path)
      if (target.hostBases.length !== s.header.regions.length)
        return yield* Effect.fail(new InvalidInput({ reason: `snapshot has ${s.header.regions.length} regions, ${target.hostBases.length} targets given` }))
      yield* walkRecords(s, () => Effect.void)
      const lib = loadWp()
      return yield* walkRecords(
        s,
        (rec: DecodedRecord) =>
          Effect.sync(() => {
            const base = target.hostBases[rec.header.region]! + BigInt(rec.header.firstPage * PAGE_SIZE)
            if (rec.pages) lib.wp_copy_to_hva([base, rec.pages, BigInt(rec.pages.length)])
            else if (!target.targetIsZero) {
              for (let done = 0; done < rec.header.pageCount * PAGE_SIZE; done += ZERO_CHUNK.length) {
                const n = Math.min(ZERO_CHUNK.length, rec.header.pageCount * PAGE_SIZE - done)
                lib.wp_copy_to_hva([base + BigInt(done), ZERO_CHUNK, BigInt(n)])
              }
            }
          }),
        onProgress
      )
    })
  )

export type RawLayout = "concat" | "per-region"

export interface RawRestoreResult extends VerifyReport {
  readonly outputs: ReadonlyArray<string>
}

/** Restores into a raw memory image (sparse: zero pages stay holes). */
export const restoreToRawFile = (
  path: string,
  output: string,
  layout: RawLayout = "concat",
  onProgress?: (done: number, total: number) => void
): Effect.Effect<RawRestoreResult, SnapshotFormatError | SnapshotIoError> =>
  Effect.scoped(
    Effect.gen(function* () {
      const s = yield* openSnapshot(path)
      const regions = s.header.regions
      const names = layout === "concat" ? [output] : regions.map((_, i) => `${output}.${i}`)
      const regionFile: Array<number> = layout === "concat" ? regions.map(() => 0) : regions.map((_, i) => i)
      const starts = concatOffsets(regions)
      const regionBase = layout === "concat" ? starts : regions.map(() => 0)
      const imageBytes = regions.reduce((sum, r) => sum + r.size, 0)
      const outs: Array<AtomicFile> = []
      for (const [i, name] of names.entries()) {
        const out = yield* atomicFile(name, "read-write")
        const size = layout === "concat" ? imageBytes : regions[i]!.size
        yield* Effect.tryPromise({ try: () => out.file.truncate(size), catch: (e) => ioError(name, "truncate", e) })
        outs.push(out)
      }
      const report = yield* walkRecords(
        s,
        (rec) =>
          rec.pages === undefined
            ? Effect.void
            : Effect.tryPromise({
                try: async () => {
                  const o = outs[regionFile[rec.header.region]!]!
                  let pos = regionBase[rec.header.region]! + rec.header.firstPage * PAGE_SIZE
                  let done = 0
                  while (done < rec.pages!.length) {
                    const { bytesWritten } = await o.file.write(rec.pages!, done, rec.pages!.length - done, pos)
                    done += bytesWritten
                    pos += bytesWritten
                  }
                },
                catch: (e) => ioError(outs[regionFile[rec.header.region]!]!.path, "write", e)
              }),
        onProgress
      )
      for (const o of outs) yield* o.commit
      return { ...report, outputs: names }
    })
  )
