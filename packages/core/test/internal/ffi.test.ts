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

const includeDir = join(dirname(createRequire(import.meta.url).resolve("@vmsnap/wp-native/package.json")), "include")
const header = (name: string) => readFileSync(join(includeDir, name), "utf8").replace(/\/\*[\s\S]*?\*\//g, " ")

/** Opaque handles: passed and returned as ffi-rs External. */
const HANDLES = new Set(["wp_engine", "wp_restorer", "vg_guest"])

/** The ffi-rs type a C parameter or return type must be bound with. */
const ffiType = (cType: string): DataType => {
  const t = cType.replace(/\bconst\b/g, "").replace(/\s+/g, " ").trim()
  if (t.endsWith("*")) return HANDLES.has(t.slice(0, -1).trim()) ? DataType.External : DataType.U8Array
  switch (t) {
    case "int32_t": return DataType.I32
    case "uint32_t": return DataType.U32
    case "uint64_t": case "int64_t": return DataType.BigInt
    default: throw new Error(`no ffi-rs binding rule for C type "${cType}"`)
  }
}

interface Prototype { readonly ret: DataType; readonly params: ReadonlyArray<DataType> }

/** Function prototypes of a header (comments stripped), by name. */
const prototypes = (text: string): Map<string, Prototype> => {
  const out = new Map<string, Prototype>()
  const re = /(?:^|[;}\n])\s*((?:const\s+)?[A-Za-z_]\w*(?:\s*\*)?)\s*\b([a-z_]\w*)\s*\(([^()]*)\)\s*;/g
  for (const m of text.matchAll(re)) {
    const [, ret, name, params] = m
    const list = params!.trim() === "void" || params!.trim() === "" ? [] : params!.split(",")
    out.set(name!, {
      ret: ffiType(ret!),
      // "uint8_t *buf" -> "uint8_t *"; "uint64_t hva" -> "uint64_t"
      params: list.map((p) => ffiType(p.trim().replace(/\b\w+$/, "")))
    })
  }
  return out
}

const defines = (text: string): Map<string, bigint> => {
  const out = new Map<string, bigint>()
  for (const m of text.matchAll(/^#define\s+([A-Z_][A-Z0-9_]*)\s+\(?\s*(\d+)u?(?:ll|ull)?\s*(?:<<\s*(\d+)\s*)?\)?\s*$/gm)) {
    out.set(m[1]!, BigInt(m[2]!) << BigInt(m[3] ?? 0))
  }
  return out
}

/** u64 fields of `typedef struct name { ... } name;` in order; arrays as "field[N]". */
const structFields = (text: string, name: string): Array<string> => {
  const body = new RegExp(`typedef struct ${name} \\{([\\s\\S]*?)\\} ${name};`).exec(text)?.[1]
  if (!body) throw new Error(`struct ${name} not found`)
  return body.split(";").map((d) => d.trim()).filter(Boolean).flatMap((d) => {
    expect(d.startsWith("uint64_t ")).toBe(true)
    return d.slice("uint64_t ".length).split(",").map((f) => f.trim())
  })
}

/** Exported by a header but deliberately not bound in TypeScript. */
const UNBOUND = new Set(["vg_size"])

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
    const shared = Object.entries(ffi).filter(([k, v]) => /^(WP|VG)_[A-Z0-9_]+$/.test(k) && !k.endsWith("_WORDS") && (typeof v === "number" || typeof v === "bigint"))
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
  })

  it("the built library exports every bound symbol and has this ABI version", () => {
    const wp = ffi.loadWp() // ffi-rs `define` throws on a missing symbol
    expect(wp.wp_abi_version([])).toBe(ffi.WP_ABI_VERSION)
    expect(typeof ffi.loadGuest().vg_map).toBe("function")
  })
})
