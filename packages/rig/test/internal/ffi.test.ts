/**
 * The seam between the rig's TypeScript and its demo guest: every entry of
 * the ffi-rs table must match a prototype of `include/vmsnap_guest.h`, every
 * prototype must be bound (or listed here as not needed), and the numbers
 * both sides share must equal their `#define`s.
 */
import { DataType } from "ffi-rs"
import { readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"
// The header readers core's ffi test uses (tests only).
import { defines, prototypes } from "../../../core/test/internal/cHeaders.js"
import * as ffi from "../../src/internal/ffi.js"

const headerPath = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "include", "vmsnap_guest.h")
const header = readFileSync(headerPath, "utf8").replace(/\/\*[\s\S]*?\*\//g, " ")

/** Exported by the header but deliberately not bound in TypeScript. */
const UNBOUND = new Set(["vg_size"])

describe("the demo guest's ffi table against vmsnap_guest.h", () => {
  it("every entry matches a prototype, every prototype is bound", () => {
    const protos = prototypes(header)
    expect(protos.size).toBeGreaterThan(0)
    for (const [name, entry] of Object.entries(ffi.guestTable) as Array<[string, { retType: DataType; paramsType: ReadonlyArray<DataType> }]>) {
      const proto = protos.get(name)
      expect(proto, `${name} is bound in ffi.ts but not declared in vmsnap_guest.h`).toBeDefined()
      expect({ name, ret: entry.retType, params: [...entry.paramsType] }).toEqual({ name, ret: proto!.ret, params: [...proto!.params] })
    }
    for (const name of protos.keys()) if (!UNBOUND.has(name)) expect(Object.keys(ffi.guestTable), `${name} has no ffi entry`).toContain(name)
  })

  it("every shared constant equals its #define", () => {
    const all = defines(header)
    const shared = Object.entries(ffi).filter(([k, v]) => /^VG_[A-Z0-9_]+$/.test(k) && typeof v === "number")
    expect(shared.length).toBeGreaterThan(0)
    for (const [name, value] of shared) expect({ name, value: BigInt(value as number) }).toEqual({ name, value: all.get(name) })
  })

  it("the built library exports every bound symbol", () => {
    expect(typeof ffi.loadGuest().vg_map).toBe("function") // ffi-rs `define` throws on a missing symbol
  })
})
