/**
 * SnapshotFile: header, records in append order, index and trailer, and the
 * atomic commit. Read back with the project's reader (SnapshotReader.ts).
 */
import { Effect } from "effect"
import { existsSync, readdirSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { gpa } from "../src/GuestMemory.js"
import { SnapshotFile } from "../src/SnapshotFile.js"
import { openSnapshot, readRecord } from "../src/SnapshotReader.js"
import { tempDir } from "./helpers.js"

const dir = tempDir()
const header = {
  snapshotId: "00000000-0000-4000-8000-000000000001",
  parentId: undefined,
  createdMs: 1,
  pageSize: 4096,
  regions: [{ guestBase: gpa(0), size: 8 * 4096, kind: "anon" as const, pageSize: 4096 }]
}
const page = (byte: number, pages = 1) => Buffer.alloc(pages * 4096, byte)

describe("SnapshotFile", () => {
  it("writes header, records in append order, index and trailer; visible only after commit", async () => {
    const path = join(dir, "a.vmsnap")
    await Effect.runPromise(
      Effect.scoped(
        Effect.gen(function* () {
          const file = yield* SnapshotFile.create(path, undefined, header)
          yield* file.append([{ region: 0, firstPage: 4, pageCount: 2, encoding: "raw", payload: page(7, 2) }])
          yield* file.append([
            { region: 0, firstPage: 0, pageCount: 4, encoding: "zero", payload: undefined },
            { region: 0, firstPage: 6, pageCount: 2, encoding: "raw", payload: page(9, 2) }
          ])
          expect(file.recordCount).toBe(3)
          const size = yield* file.finish()
          expect(size).toBe(file.bytesWritten)
          expect(existsSync(path)).toBe(false) // not before the commit
          yield* file.commit
        })
      )
    )
    const records = await Effect.runPromise(
      Effect.scoped(
        Effect.gen(function* () {
          const s = yield* openSnapshot(path)
          expect(s.header.snapshotId).toBe(header.snapshotId)
          return yield* Effect.forEach(s.index, (e) => readRecord(s, e))
        })
      )
    )
    expect(records.map((r) => [r.header.firstPage, r.header.pageCount])).toEqual([[4, 2], [0, 4], [6, 2]])
    expect(records[0]!.pages!.equals(page(7, 2))).toBe(true)
    expect(records[1]!.pages).toBeUndefined()
    expect(records[2]!.pages!.equals(page(9, 2))).toBe(true)
  })

  it("released without commit: nothing is left, not even the temporary file", async () => {
    const sub = join(dir, "uncommitted")
    await import("node:fs/promises").then((fs) => fs.mkdir(sub))
    await Effect.runPromise(
      Effect.scoped(
        Effect.gen(function* () {
          const file = yield* SnapshotFile.create(join(sub, "b.vmsnap"), undefined, header)
          yield* file.append([{ region: 0, firstPage: 0, pageCount: 8, encoding: "zero", payload: undefined }])
          yield* file.finish()
        })
      )
    )
    expect(readdirSync(sub)).toEqual([])
  })
})
