/**
 * The seam between TypeScript and C: every entry of the ffi-rs tables must
 * match a prototype of the public headers (name, argument and return types),
 * every exported function of a header must be bound (or listed here as not
 * needed by TypeScript), and every number both sides share must equal its
 * `#define` / struct layout. A renamed or re-typed C function fails here.
 */
import { DataType } from "ffi-rs"
import { readFileSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"
import { describe, expect, it } from "vitest"
import * as ffi from "../../src/internal/ffi.js"
import { defines, prototypes, structFields } from "./cHeaders.js"

const includeDir = join(dirname(createRequire(import.meta.url).resolve("@vmsnap/wp-native/package.json")), "include")
const header = (name: string) => readFileSync(join(includeDir, name), "utf8").replace(/\/\*[\s\S]*?\*\//g, " ")

/** Exported by a header but deliberately not bound in TypeScript. */
const UNBOUND = new Set<string>()

describe("ffi symbol tables against the public headers", () => {
  for (const [file, table] of Object.entries(ffi.symbolTables)) {
    it(`${file}: every entry matches a prototype, every prototype is bound`, () => {
      const protos = prototypes(header(file))
      expect(protos.size).toBeGreaterThan(0)
      for (const [name, entry] of Object.entries(table) as Array<[string, { retType: DataType; paramsType: ReadonlyArray<DataType> }]>) {
        const proto = protos.get(name)
        expect(proto, `${name} is bound in ffi.ts but not declared in ${file}`).toBeDefined()
        expect({ name, ret: entry.retType, params: [...entry.paramsType] }).toEqual({ name, ret: proto!.ret, params: [...proto!.params] })
      }
      for (const name of protos.keys()) {
        if (!UNBOUND.has(name)) expect(Object.keys(table), `${name} of ${file} has no ffi entry`).toContain(name)
      }
    })
  }

  it("the prototype parser sees a changed signature (the check can fail)", () => {
    const p = prototypes("int32_t wp_engine_arm(wp_engine *e, uint64_t x);\nwp_engine *wp_engine_create(uint32_t n, int32_t *err);")
    expect(p.get("wp_engine_arm")).toEqual({ ret: DataType.I32, params: [DataType.External, DataType.BigInt] })
    expect(p.get("wp_engine_create")).toEqual({ ret: DataType.External, params: [DataType.U32, DataType.U8Array] })
  })

  it("every shared constant equals its #define", () => {
    const all = new Map([...Object.keys(ffi.symbolTables)].flatMap((f) => [...defines(header(f))]))
    const shared = Object.entries(ffi).filter(([k, v]) => /^WP_[A-Z0-9_]+$/.test(k) && !k.endsWith("_WORDS") && (typeof v === "number" || typeof v === "bigint"))
    expect(shared.length).toBeGreaterThan(15)
    for (const [name, value] of shared) {
      expect(all.has(name), `${name} has no #define in the headers`).toBe(true)
      expect({ name, value: BigInt(value as number | bigint) }).toEqual({ name, value: all.get(name) })
    }
  })

  it("stats layouts equal the C structs", () => {
    const engine = header("vmsnap_engine.h"), restore = header("vmsnap_restore.h")
    expect(structFields(engine, "wp_stats")).toEqual([...ffi.WP_STATS_FIELDS, "hist[WP_HIST_BUCKETS]"])
    expect(structFields(restore, "wp_restore_stats")).toEqual([...ffi.WP_RESTORE_STATS_FIELDS, "hist[WP_RESTORE_HIST_BUCKETS]"])
    expect(structFields(header("vmsnap_writer.h"), "wp_writer_stats")).toEqual([...ffi.WP_WRITER_STATS_FIELDS])
  })

  it("the built library exports every bound symbol and has this ABI version", () => {
    const wp = ffi.loadWp() // ffi-rs `define` throws on a missing symbol
    expect(wp.wp_abi_version([])).toBe(ffi.WP_ABI_VERSION)
  })
})
