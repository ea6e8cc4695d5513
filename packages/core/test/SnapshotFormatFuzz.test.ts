/**
 * Fuzz harness of the header / trailer / index parser (SnapshotFormat.ts),
 * the steps `openSnapshot` takes before any record is read. A deterministic
 * mutation driver (seeded xorshift: the same inputs every run) over a seed
 * corpus of well-formed files built here; in half of the inputs the header,
 * index and trailer checksums are repaired so the checks behind them are
 * reached. Every input must either parse or fail with a FormatViolation:
 * never a RangeError, a TypeError or an allocation the file cannot justify.
 * ITERATIONS bounds the run (a few seconds); FUZZ_ITERATIONS overrides it.
 * The record decoder's harness is packages/wp-native/fuzz/fuzz_record.c.
 */
import { describe, expect, it } from "vitest"
import { crc32 } from "node:zlib"
import {
  checkIndex, decodeHeader, decodeHeaderPrefix, decodeIndex, decodeTrailer, encodeHeader, encodeRecord, encodeTrailer,
  FormatViolation, HEADER_FIXED_BYTES, IndexBuilder, TRAILER_BYTES
} from "../src/SnapshotFormat.js"
import type { MemoryKind } from "../src/GuestMemory.js"

const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 20000)

/** A well-formed file: regions of `pages` pages each, covered by zero records of `per` pages. */
const seedFile = (regions: ReadonlyArray<{ pages: number; kind?: MemoryKind; pageSize?: number }>, per: number): Buffer => {
  const header = encodeHeader({
    snapshotId: "00000000-0000-4000-8000-00000000f022", parentId: undefined, createdMs: 0, pageSize: 4096,
    regions: regions.map((r, i) => ({ guestBase: BigInt(i) << 30n, size: r.pages * 4096, kind: r.kind ?? "anon", pageSize: r.pageSize ?? 4096 }))
  })
  const parts = [header]
  const index = new IndexBuilder()
  let offset = header.length
  regions.forEach((r, region) => {
    for (let p = 0; p < r.pages; p += per) {
      const pageCount = Math.min(per, r.pages - p)
      index.add({ region, firstPage: p, pageCount, fileOffset: offset })
      parts.push(encodeRecord({ region, firstPage: p, pageCount, encoding: "zero" }, undefined))
      offset += 32
    }
  })
  const idx = index.encode()
  parts.push(idx, encodeTrailer({ indexOffset: offset, indexBytes: idx.length, recordCount: index.count }))
  return Buffer.concat(parts)
}

const seeds = [
  seedFile([{ pages: 16 }], 4),
  seedFile([{ pages: 3 }, { pages: 5, kind: "memfd" }, { pages: 1, kind: "anon-thp" }], 2),
  seedFile([{ pages: 512, kind: "hugetlbfs", pageSize: 2 * 1024 * 1024 }], 256)
]

let state = 0x2545f4914f6cdd1dn
const rnd = (n: number): number => {
  if (n <= 0) return 0
  state ^= (state << 13n) & 0xffffffffffffffffn
  state ^= state >> 7n
  state ^= (state << 17n) & 0xffffffffffffffffn
  return Number(state % BigInt(n))
}
const EDGES = [0, 1, 2, 31, 32, 4095, 4096, 4097, 0x7fffffff, 0x80000000, 0xffffffff]

const mutate = (seed: Buffer): Buffer => {
  let b = Buffer.from(seed)
  for (let ops = 1 + rnd(4); ops > 0; ops--) {
    switch (rnd(6)) {
      case 0: b[rnd(b.length)] ^= 1 << rnd(8); break
      case 1: b[rnd(b.length)] = rnd(256); break
      case 2: { // an edge value into an aligned u32 or u64 (counts, sizes, offsets)
        const at = rnd(Math.floor(b.length / 4)) * 4
        if (rnd(2) && at + 8 <= b.length) b.writeBigUInt64LE(BigInt(EDGES[rnd(EDGES.length)]!) << BigInt(rnd(2) * 32), at)
        else if (at + 4 <= b.length) b.writeUInt32LE(EDGES[rnd(EDGES.length)]!, at)
        break
      }
      case 3: b = b.subarray(0, rnd(b.length + 1)); break
      case 4: b = Buffer.concat([b, Buffer.alloc(1 + rnd(64), rnd(2) ? 0 : 0xff)]); break
      case 5: { const s = seeds[rnd(seeds.length)]!; const from = rnd(s.length); const to = rnd(b.length || 1); s.copy(b, to, from, from + 1 + rnd(64)); break }
    }
  }
  return b
}

/** Recompute the header, index and trailer checksums where their lengths can be read. */
const repair = (b: Buffer) => {
  if (b.length >= HEADER_FIXED_BYTES) {
    const hb = b.readUInt32LE(12)
    if (hb >= 4 && hb <= b.length) b.writeUInt32LE(crc32(b.subarray(0, hb - 4)), hb - 4)
  }
  if (b.length >= TRAILER_BYTES) {
    const t = b.length - TRAILER_BYTES
    const io = Number(b.readBigUInt64LE(t + 8)), ib = Number(b.readBigUInt64LE(t + 16))
    if (ib >= 12 && io + ib <= t) b.writeUInt32LE(crc32(b.subarray(io, io + ib - 4)), io + ib - 4)
    b.writeUInt32LE(crc32(b.subarray(t, t + 28)), t + 28)
  }
}

/** What openSnapshot does with a file's bytes, before any record. */
const open = (b: Buffer) => {
  const { headerBytes } = decodeHeaderPrefix(b.subarray(0, HEADER_FIXED_BYTES), b.length)
  const header = decodeHeader(b.subarray(0, headerBytes), b.length)
  const trailer = decodeTrailer(b.subarray(b.length - TRAILER_BYTES), b.length, headerBytes)
  const index = decodeIndex(b.subarray(trailer.indexOffset, trailer.indexOffset + trailer.indexBytes), trailer.indexOffset)
  checkIndex(header, index, trailer.indexOffset)
  return index.length
}

describe("fuzz: header, trailer and index parser", () => {
  it("every seed parses", () => {
    for (const s of seeds) expect(open(s)).toBeGreaterThan(0)
  })

  it(`${ITERATIONS} mutated files: each parses or fails with a FormatViolation, nothing else`, () => {
    let parsed = 0
    let refused = 0
    for (let i = 0; i < ITERATIONS; i++) {
      const b = mutate(seeds[rnd(seeds.length)]!)
      if (rnd(2)) repair(b)
      try {
        open(b)
        parsed++
      } catch (e) {
        if (!(e instanceof FormatViolation)) throw new Error(`input ${i} (${b.toString("hex").slice(0, 200)}...) threw ${String(e)}`)
        refused++
      }
    }
    console.log(`fuzz header/index: ${ITERATIONS} inputs, ${parsed} parsed, ${refused} refused with a FormatViolation`)
    expect(refused).toBeGreaterThan(ITERATIONS / 10) // the mutations reach the checks
  })
})
