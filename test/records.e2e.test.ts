/**
 * One decoder of records (issue 9, issue 12 items 12-13): a corpus of good
 * and bad records, built deterministically, gets the same answer from
 * `verify` (TypeScript, through ffi) and from the lazy restorer (restore.c,
 * in-process on real userfaultfd memory); headers with impossible regions
 * and indexes that store a page twice are refused by verify and serve alike.
 */
import { Effect, Exit } from "effect"
import { execFile } from "node:child_process"
import { readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { promisify } from "node:util"
import { crc32 } from "node:zlib"
import { describe, expect, it } from "vitest"
import { loadWp } from "../packages/core/src/internal/ffi.js"
import { PAGE_SIZE, RestoreServer, SnapshotFormatError, startLazyRestore, restoreUffd, TRAILER_BYTES, verifySnapshot } from "../packages/core/src/index.js"
import { scratchMemory } from "../packages/rig/src/index.js"
import { buildSnapshot, patternPages, type RecordSpec, writeSnapshot } from "./snapshotFiles.js"
import { scratchDir, toyVmmSkipReason } from "./toyVmmTests.js"

const execFileAsync = promisify(execFile)
const dir = scratchDir("vmsnap-records-")
const skip = await toyVmmSkipReason("record corpus tests")
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const cli = join(import.meta.dirname, "..", "packages", "cli", "dist", "bin.js")

const PAGES = 64
const A = patternPages(8, 1)
const B = patternPages(8, 2)

/** Pages 8-15 for encoding 3: a zero page (3), a random one (5: stored raw) and compressible ones (lz4 blocks). */
const C = Buffer.concat([patternPages(3, 4), Buffer.alloc(PAGE_SIZE), patternPages(1, 5), randomPage(6), patternPages(2, 7)])
function randomPage(seed: number): Buffer {
  const b = Buffer.alloc(PAGE_SIZE)
  let x = seed
  for (let i = 0; i < b.length; i++) b[i] = (x = (x * 1103515245 + 12345) >>> 0) >>> 24
  return b
}
/** Where encoding 3's block k starts in the payload, and its table entry. */
const blockAt = (p: Buffer, k: number) => {
  let at = 8 * 8
  for (let j = 0; j < k; j++) at += p.readUInt32LE(j * 8)
  return at
}
const pages = (tamper?: RecordSpec["tamper"], fixCrc?: boolean): Partial<RecordSpec> => ({ encoding: "pages", pages: C, ...(tamper ? { tamper } : {}), ...(fixCrc === undefined ? {} : { fixCrc }) })

/**
 * The corpus: one region of 64 pages; the record under test holds pages 8-15
 * (lz4 of B unless it says otherwise). `block`: only one page's block of an
 * encoding-3 record is bad (the restorer may serve the record's other pages).
 */
const corpus: ReadonlyArray<{ name: string; accept: boolean; record: Partial<RecordSpec>; regions?: number; block?: boolean }> = [
  { name: "good pages record (lz4, raw and zero blocks)", accept: true, record: pages() },
  { name: "good pages record, every block raw", accept: true, record: { ...pages(), lz4: false } },
  { name: "pages: a table byte flipped (checksum mismatch)", accept: false, record: pages((_h, p) => void (p[8 * 2 + 1] ^= 0x04), false) },
  { name: "pages: a block byte flipped (its CRC)", accept: false, block: true, record: pages((_h, p) => void (p[blockAt(p, 5) + 100] ^= 0x01)) },
  { name: "pages: a block CRC changed, table checksum valid", accept: false, block: true, record: pages((_h, p) => void p.writeUInt32LE(p.readUInt32LE(6 * 8 + 4) ^ 1, 6 * 8 + 4)) },
  { name: "pages: blockBytes 4097, the table's sum kept, valid checksum", accept: false, record: pages((_h, p) => {
    // page 3 (zero) 0 -> 4097, page 5 (raw) 4096 -> 0, page 0 (lz4) one byte less: the same sum
    p.writeUInt32LE(4097, 3 * 8)
    p.writeUInt32LE(0, 5 * 8)
    p.writeUInt32LE(p.readUInt32LE(0) - 1, 0)
  }) },
  { name: "pages: the table's sum one byte short of the stored bytes, valid checksum", accept: false, record: pages((_h, p) => void p.writeUInt32LE(p.readUInt32LE(0) - 1, 0)) },
  { name: "pages: an lz4 block that is a page and a byte (BAD_PAYLOAD), valid CRCs", accept: false, block: true, record: pages((_h, p) => {
    // page 0's lz4 block replaced by a valid LZ4 block of one literal: it decodes to 1 byte, not 4096
    const one = Buffer.from([0x10, 0x41])
    const old = p.readUInt32LE(0)
    const out = Buffer.concat([p.subarray(0, 64), one, p.subarray(64 + old)])
    out.writeUInt32LE(one.length, 0)
    out.writeUInt32LE(crc32(one), 4)
    return out
  }) },
  { name: "good lz4 record", accept: true, record: {} },
  { name: "good raw record", accept: true, record: { encoding: "raw" } },
  { name: "good zero record", accept: true, record: { encoding: "zero", pages: undefined } },
  { name: "lz4 length prefix 0xffffffff, valid checksum", accept: false, record: { tamper: (_h, p) => void p.writeUInt32LE(0xffffffff, 0) } },
  { name: "lz4 length prefix one page too long, valid checksum", accept: false, record: { tamper: (_h, p) => void p.writeUInt32LE(9 * PAGE_SIZE, 0) } },
  { name: "lz4 block shorter than the pages, valid checksum", accept: false, record: { tamper: (_h, p) => p.subarray(0, p.length - 8) } },
  { name: "lz4 block with trailing bytes, valid checksum", accept: false, record: { tamper: (_h, p) => Buffer.concat([p, Buffer.from([0x10, 0x41])]) } },
  { name: "record names another region than its index entry, valid checksum", accept: false, regions: 2, record: { tamper: (h) => void h.writeUInt32LE(1, 4) } },
  { name: "record's first page differs from its index entry, valid checksum", accept: false, record: { tamper: (h) => void h.writeBigUInt64LE(9n, 8) } },
  { name: "reserved byte set, valid checksum", accept: false, record: { tamper: (h) => void (h[22] = 1) } },
  { name: "unknown encoding, valid checksum", accept: false, record: { tamper: (h) => void (h[20] = 4) } },
  { name: "a payload byte flipped (checksum mismatch)", accept: false, record: { fixCrc: false, tamper: (_h, p) => void (p[p.length >> 1] ^= 0x20) } },
  { name: "raw record one byte short, valid checksum", accept: false, record: { encoding: "raw", tamper: (_h, p) => p.subarray(1) } }
]

const fileFor = (name: string, c: (typeof corpus)[number]) =>
  writeSnapshot(join(dir, `${name.replace(/\W+/g, "-")}.vmsnap`), Array.from({ length: c.regions ?? 1 }, () => ({ size: PAGES * PAGE_SIZE })), [
    { region: 0, firstPage: 0, pageCount: 8, encoding: "raw", pages: A },
    { region: 0, firstPage: 8, pageCount: 8, encoding: "lz4", pages: B, ...c.record },
    { region: 0, firstPage: 16, pageCount: PAGES - 16, encoding: "zero" },
    ...(c.regions === 2 ? [{ region: 1, firstPage: 0, pageCount: PAGES, encoding: "zero" as const }] : [])
  ])

/** The lazy restorer's answer: fill everything in-process (no page touched that could block), then read what it installed. */
const lazyRestore = (path: string) =>
  Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        const size = PAGES * PAGE_SIZE
        const hva = yield* scratchMemory(size)
        const uffd = yield* restoreUffd(hva, size)
        const restore = yield* startLazyRestore({ path, raw: false }, uffd, [{ hva, size, imageOffset: 0 }])
        for (;;) {
          const s = restore.stats()
          if (restore.poll() !== "serving" || s.pagesSettled + s.pagesFailed === s.pagesTotal) break
          yield* Effect.promise(() => sleep(5))
        }
        const s = restore.stats()
        const read = (page: number, pages: number) => {
          const b = Buffer.alloc(pages * PAGE_SIZE)
          loadWp().wp_copy_from_hva([b, hva + BigInt(page * PAGE_SIZE), BigInt(b.length)])
          return b
        }
        // Pages 0-7 and 16-63 are settled (resident) whatever record 1 holds: reading them cannot block.
        return { failed: s.pagesFailed, failedRecord: s.failedRecord, head: read(0, 8), tail: read(16, PAGES - 16), mid: s.pagesFailed ? undefined : read(8, 8) }
      })
    )
  )

describe.skipIf(skip)("one decoder of records: verify and the lazy restorer give the same answer", () => {
  for (const c of corpus) {
    it(`${c.name}: ${c.accept ? "both accept" : "both refuse"}`, async () => {
      const path = fileFor(c.name, c)
      const verified = await Effect.runPromiseExit(verifySnapshot(path))
      const lazy = await lazyRestore(path)
      expect(Exit.isSuccess(verified), `verify ${Exit.isFailure(verified) ? "refused" : "accepted"}`).toBe(c.accept)
      expect(lazy.failed === 0, `the lazy restorer ${lazy.failed ? `refused (${lazy.failedRecord?.reason})` : "accepted"}`).toBe(c.accept)
      if (Exit.isFailure(verified)) expect(String(verified.cause)).toMatch(/not a valid snapshot/)
      expect(lazy.head.equals(A)).toBe(true) // every other page is served
      expect(lazy.tail.equals(Buffer.alloc((PAGES - 16) * PAGE_SIZE))).toBe(true)
      const mid = c.record.encoding === "zero" ? Buffer.alloc(8 * PAGE_SIZE) : c.record.encoding === "pages" ? C : B
      if (c.accept) expect(lazy.mid!.equals(mid)).toBe(true)
      else if (c.block) expect(lazy.failed).toBeGreaterThanOrEqual(1) // at least the bad block's page; the whole record read at once fails all 8
      else expect(lazy.failed).toBe(8)
    })
  }
})

describe.skipIf(skip)("headers and indexes that no writer makes are refused by verify (exit 3) and serve alike", () => {
  const refused = async (path: string, pattern: RegExp) => {
    const v = await Effect.runPromiseExit(verifySnapshot(path))
    expect(Exit.isFailure(v)).toBe(true)
    if (Exit.isFailure(v)) {
      const e = (v.cause as any).reasons?.[0]?.error ?? (v.cause as any).error
      expect(String(v.cause)).toMatch(pattern)
      if (e !== undefined) expect(e).toBeInstanceOf(SnapshotFormatError)
    }
    const cliRun = await execFileAsync("node", [cli, "verify", path], { encoding: "utf8" }).then(() => ({ code: 0, stderr: "" }), (e) => ({ code: e.code as number, stderr: String(e.stderr) }))
    expect(cliRun.code, cliRun.stderr).toBe(3)
    expect(cliRun.stderr).toMatch(pattern)
    const server = new RestoreServer(join(dir, "refuse.sock"), { path, raw: false })
    await expect(server.listen()).rejects.toThrow(pattern)
    await server.close()
  }

  it("a 2^52-byte region: not a valid snapshot (no allocation, no RangeError)", async () => {
    const path = writeSnapshot(join(dir, "huge-region.vmsnap"), [{ size: 1n << 52n }], [{ region: 0, firstPage: 0, pageCount: 1, encoding: "zero" }])
    await refused(path, /not a valid snapshot: region 0 is malformed/)
  })

  it("a region entry whose reserved bytes are not zero (header checksum valid): refused, as a record's reserved bytes are (break6 F2)", async () => {
    const b = buildSnapshot([{ size: 2 * 1024 * 1024 }], [{ region: 0, firstPage: 0, pageCount: 512, encoding: "zero" }])
    const headerBytes = b.readUInt32LE(12)
    b.writeBigUInt64LE(1n, 64 + 24)
    b.writeUInt32LE(crc32(b.subarray(0, headerBytes - 4)), headerBytes - 4)
    const path = join(dir, "region-reserved.vmsnap")
    writeFileSync(path, b, { mode: 0o600 })
    await refused(path, /region 0: reserved bytes are not zero/)
  })

  it("a region whose page size its kind cannot have (anon at 8192, hugetlbfs at 4096)", async () => {
    for (const [kind, pageSize] of [["anon", 8192], ["hugetlbfs", 4096]] as const) {
      const path = writeSnapshot(join(dir, `page-size-${kind}.vmsnap`), [{ size: 2 * 1024 * 1024, kind, pageSize }], [{ region: 0, firstPage: 0, pageCount: 512, encoding: "zero" }])
      await refused(path, new RegExp(`page size ${pageSize} is not one a ${kind} region can have`))
    }
  })

  it("a first page or an offset past 2^53 is said exactly (2^64-1, not 18446744073709552000)", async () => {
    const good = buildSnapshot([{ size: 16 * PAGE_SIZE }], [{ region: 0, firstPage: 0, pageCount: 16, encoding: "zero" }])
    const indexAt = Number(good.readBigUInt64LE(good.length - TRAILER_BYTES + 8))
    const spoil = (at: number, name: string) => {
      const b = Buffer.from(good)
      b.writeBigUInt64LE((1n << 64n) - 1n, indexAt + 8 + at)
      const end = b.length - TRAILER_BYTES - 4
      b.writeUInt32LE(crc32(b.subarray(indexAt, end)), end)
      const path = join(dir, name)
      writeFileSync(path, b)
      return path
    }
    await refused(spoil(8, "first-page-max.vmsnap"), /index entry 0: first page 18446744073709551615 /)
    await refused(spoil(16, "offset-max.vmsnap"), /index entry 0: file offset 18446744073709551615 /)
  })

  it("a region whose base + size passes 2^64", async () => {
    const b = buildSnapshot([{ size: 16 * PAGE_SIZE }], [{ region: 0, firstPage: 0, pageCount: 16, encoding: "zero" }])
    const headerBytes = b.readUInt32LE(12)
    b.writeBigUInt64LE(0xfffffffffffff000n, 64) // region 0's guestBase
    b.writeUInt32LE(crc32(b.subarray(0, headerBytes - 4)), headerBytes - 4)
    const path = join(dir, "base-wraps.vmsnap")
    writeFileSync(path, b)
    await refused(path, /region 0: base 0xfffffffffffff000 \+ 65536 bytes passes the end of the 64-bit address space/)
  })

  it("a page stored twice: refused before any VMM is accepted", async () => {
    const path = writeSnapshot(join(dir, "twice.vmsnap"), [{ size: 16 * PAGE_SIZE }], [
      { region: 0, firstPage: 0, pageCount: 16, encoding: "zero" },
      { region: 0, firstPage: 4, pageCount: 1, encoding: "raw", pages: patternPages(1, 3) }
    ])
    await refused(path, /page 4 of region 0 is stored twice/)
  })
})

describe.skipIf(skip)("format version 1 (raw, lz4 with its length prefix, zero records) is read by every command", () => {
  const v1 = () =>
    writeSnapshot(join(dir, "version-1.vmsnap"), [{ size: PAGES * PAGE_SIZE }], [
      { region: 0, firstPage: 0, pageCount: 8, encoding: "raw", pages: A },
      { region: 0, firstPage: 8, pageCount: 8, encoding: "lz4", pages: B },
      { region: 0, firstPage: 16, pageCount: PAGES - 16, encoding: "zero" }
    ], { version: 1 })
  const image = Buffer.concat([A, B, Buffer.alloc((PAGES - 16) * PAGE_SIZE)])
  const run = (args: Array<string>) =>
    execFileAsync("node", [cli, ...args], { encoding: "utf8" }).then((r) => ({ code: 0, ...r }), (e) => ({ code: e.code as number, stdout: String(e.stdout), stderr: String(e.stderr) }))

  it("inspect, verify and restore (CLI), and the lazy restorer (serve)", async () => {
    const path = v1()
    const inspected = await run(["inspect", path, "--json"])
    expect(inspected.code, inspected.stderr).toBe(0)
    const report = JSON.parse(inspected.stdout)
    expect(report.version).toBe(1)
    expect(report.encodings).toEqual({ lz4: 1, raw: 1, zero: 1, pages: { records: 0, lz4: 0, raw: 0, zero: 0 } })
    const verified = await run(["verify", path])
    expect(verified.code, verified.stderr).toBe(0)
    const out = join(dir, "version-1.img")
    const restored = await run(["restore", path, "--raw", out])
    expect(restored.code, restored.stderr).toBe(0)
    expect(readFileSync(out).equals(image)).toBe(true)
    const lazy = await lazyRestore(path)
    expect(lazy.failed).toBe(0)
    expect(Buffer.concat([lazy.head, lazy.mid!, lazy.tail]).equals(image)).toBe(true)
  })

  it("a version this vmsnap does not know (3) is refused at open, saying which it reads", async () => {
    const b = buildSnapshot([{ size: 16 * PAGE_SIZE }], [{ region: 0, firstPage: 0, pageCount: 16, encoding: "zero" }], { version: 3 })
    const path = join(dir, "version-3.vmsnap")
    writeFileSync(path, b)
    const verified = await run(["verify", path])
    expect(verified.code).not.toBe(0)
    expect(verified.stderr).toMatch(/format version 3; this vmsnap reads versions 1 and 2/)
  })

  it("inspect counts encoding 3's pages by how each is stored", async () => {
    const path = writeSnapshot(join(dir, "pages-counts.vmsnap"), [{ size: PAGES * PAGE_SIZE }], [
      { region: 0, firstPage: 0, pageCount: 8, encoding: "pages", pages: C },
      { region: 0, firstPage: 8, pageCount: 8, encoding: "pages", pages: B, lz4: false },
      { region: 0, firstPage: 16, pageCount: PAGES - 16, encoding: "zero" }
    ])
    const report = JSON.parse((await run(["inspect", path, "--json"])).stdout)
    expect(report.version).toBe(2)
    // C: 6 compressible pages, 1 zero, 1 random (raw); B without lz4: 8 raw
    expect(report.encodings).toEqual({ lz4: 0, raw: 0, zero: 1, pages: { records: 2, lz4: 6, raw: 9, zero: 1 } })
  })
})
