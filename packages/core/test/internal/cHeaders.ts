/**
 * Reading C headers for the tests that pin the ffi-rs tables to them: which
 * ffi-rs type a C type is bound with, function prototypes, `#define`d
 * numbers and 64-bit struct layouts. Used by core's and the rig's ffi tests.
 */
import { DataType } from "ffi-rs"
import { expect } from "vitest"

/** Opaque handles: passed and returned as ffi-rs External. */
const HANDLES = new Set(["wp_engine", "wp_writer", "wp_restorer", "wp_restore_index", "wp_record_codec", "vi_target", "vg_guest"])

/** The ffi-rs type a C parameter or return type must be bound with. */
export const ffiType = (cType: string): DataType => {
  const t = cType.replace(/\bconst\b/g, "").replace(/\s+/g, " ").trim()
  if (t.endsWith("*")) return HANDLES.has(t.slice(0, -1).trim()) ? DataType.External : DataType.U8Array
  switch (t) {
    case "int32_t": return DataType.I32
    case "uint32_t": return DataType.U32
    case "uint64_t": case "int64_t": return DataType.BigInt
    default: throw new Error(`no ffi-rs binding rule for C type "${cType}"`)
  }
}

export interface Prototype { readonly ret: DataType; readonly params: ReadonlyArray<DataType> }

/** Function prototypes of a header (comments stripped), by name. */
export const prototypes = (text: string): Map<string, Prototype> => {
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

export const defines = (text: string): Map<string, bigint> => {
  const out = new Map<string, bigint>()
  for (const m of text.matchAll(/^#define\s+([A-Z_][A-Z0-9_]*)\s+\(?\s*(\d+)u?(?:ll|ull)?\s*(?:<<\s*(\d+)\s*)?\)?\s*$/gm)) {
    out.set(m[1]!, BigInt(m[2]!) << BigInt(m[3] ?? 0))
  }
  return out
}

/** u64 fields of `typedef struct name { ... } name;` in order; arrays as "field[N]". */
export const structFields = (text: string, name: string): Array<string> => {
  const body = new RegExp(`typedef struct ${name} \\{([\\s\\S]*?)\\} ${name};`).exec(text)?.[1]
  if (!body) throw new Error(`struct ${name} not found`)
  return body.split(";").map((d) => d.trim()).filter(Boolean).flatMap((d) => {
    const type = /^u?int64_t /.exec(d)?.[0]
    expect(type, `${name}: "${d}" is not a 64-bit field`).toBeDefined()
    return d.slice(type!.length).split(",").map((f) => f.trim())
  })
}
