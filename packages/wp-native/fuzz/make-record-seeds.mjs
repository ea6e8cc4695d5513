// Writes the seed corpus of fuzz_record (corpus/record/*.rcd): one record
// each (32-byte header + payload, docs/format.md), made with the writer's
// own compressor (lz4-napi, resolved from packages/core):
//   node packages/wp-native/fuzz/make-record-seeds.mjs
// The checked-in seeds were made this way; rerun only to change them.
import { createRequire } from "node:module"
import { writeFileSync } from "node:fs"
import { crc32 } from "node:zlib"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const here = dirname(fileURLToPath(import.meta.url))
const { compressSync } = createRequire(join(here, "..", "..", "core", "package.json"))("lz4-napi")
const out = join(here, "corpus", "record")
const record = (region, firstPage, pageCount, encoding, payload) => {
  const h = Buffer.alloc(32)
  h.writeUInt32LE(0x31444352, 0)
  h.writeUInt32LE(region, 4)
  h.writeBigUInt64LE(BigInt(firstPage), 8)
  h.writeUInt32LE(pageCount, 16)
  h.writeUInt8(encoding, 20)
  h.writeUInt32LE(payload.length, 24)
  h.writeUInt32LE(crc32(payload, crc32(h.subarray(0, 28))), 28)
  return Buffer.concat([h, payload])
}
const pattern = (pages, seed) => {
  const b = Buffer.alloc(pages * 4096)
  for (let i = 0; i < b.length; i++) b[i] = (i * seed + (i >> 7)) & 0xff
  return b
}
const text = (pages) => Buffer.from("vmsnap lazy restore page ".repeat((pages * 4096) / 25 + 1)).subarray(0, pages * 4096)
writeFileSync(join(out, "raw-1.rcd"), record(0, 7, 1, 0, pattern(1, 13)))
writeFileSync(join(out, "lz4-text-2.rcd"), record(1, 0, 2, 1, compressSync(text(2))))
writeFileSync(join(out, "lz4-zero-16.rcd"), record(0, 100, 16, 1, compressSync(Buffer.alloc(16 * 4096))))
writeFileSync(join(out, "lz4-mixed-3.rcd"), record(2, 5, 3, 1, compressSync(Buffer.concat([text(1), Buffer.alloc(4096), pattern(1, 3)]))))
writeFileSync(join(out, "zero-3.rcd"), record(0, 1, 3, 2, Buffer.alloc(0)))
