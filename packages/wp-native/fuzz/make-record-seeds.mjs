// Writes the encoding-3 ("pages") seeds of fuzz_record's corpus
// (corpus/record/pages-*.rcd): one record each (32-byte header + payload,
// docs/format.md), made by the writer's own encoder (wp_record_encode_pages
// of the built libvmsnap_wp.so, through packages/core's ffi-rs):
//   node packages/wp-native/fuzz/make-record-seeds.mjs
// The seeds of encodings 0-2 (raw-1, lz4-*, zero-3: format version 1, lz4
// with a u32 length prefix) were written by this script's first version
// (git history), with lz4-napi; they are kept as they are, as the files an
// older vmsnap wrote. Rerun only to change the pages seeds.
import { createRequire } from "node:module"
import { writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const here = dirname(fileURLToPath(import.meta.url))
const { DataType, define, open } = createRequire(join(here, "..", "..", "core", "package.json"))("ffi-rs")
open({ library: "vmsnap_wp", path: join(here, "..", "build", "libvmsnap_wp.so") })
const wp = define({
  wp_record_encode_pages: {
    library: "vmsnap_wp",
    retType: DataType.BigInt,
    paramsType: [DataType.U32, DataType.BigInt, DataType.U32, DataType.U8Array, DataType.U32, DataType.U8Array, DataType.BigInt]
  }
})
const LZ4 = 1
const record = (region, firstPage, data, options) => {
  const pages = data.length / 4096
  const out = Buffer.alloc(32 + pages * (8 + 4096))
  const n = Number(wp.wp_record_encode_pages([region, BigInt(firstPage), pages, data, options, out, BigInt(out.length)]))
  if (n < 0) throw new Error(`wp_record_encode_pages: ${n}`)
  return out.subarray(0, n)
}
const pattern = (pages, seed) => {
  const b = Buffer.alloc(pages * 4096)
  let x = seed * 2654435761
  for (let i = 0; i < b.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0
    b[i] = x >>> 24
  }
  return b
}
const text = (pages) => Buffer.from("vmsnap lazy restore page ".repeat((pages * 4096) / 25 + 1)).subarray(0, pages * 4096)
const out = join(here, "corpus", "record")
writeFileSync(join(out, "pages-mixed-4.rcd"), record(0, 9, Buffer.concat([text(1), Buffer.alloc(4096), pattern(1, 3), text(1)]), LZ4))
writeFileSync(join(out, "pages-raw-2.rcd"), record(1, 40, Buffer.concat([text(1), pattern(1, 5)]), 0))
writeFileSync(join(out, "pages-text-16.rcd"), record(2, 1 << 20, text(16), LZ4))
