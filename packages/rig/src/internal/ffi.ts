/**
 * The raw ffi-rs bindings of the demo guest, 1:1 with `include/vmsnap_guest.h`.
 * No logic here: DemoGuest.ts turns results into errors. Addresses are bound
 * as BigInt (ffi-rs `U64` would be a lossy number); out-parameters are
 * caller-owned Buffers passed as U8Array (by pointer).
 * @internal
 */
import { DataType, define, open, type JsExternal } from "ffi-rs"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

export type { JsExternal }

/** A file the rig's Makefile builds (packages/rig/build), from src/ or dist/ alike. */
export const buildPath = (name: string): string => join(dirname(fileURLToPath(import.meta.url)), "..", "..", "build", name)

const B = DataType.U8Array
const I32 = DataType.I32
const U32 = DataType.U32
const BIG = DataType.BigInt
const EXT = DataType.External

/** vmsnap_guest.h, 1:1 (exported for the test that checks it against the header). */
export const guestTable = {
  vg_create: { library: "vmsnap_guest", retType: EXT, paramsType: [BIG, U32, B] },
  vg_hva: { library: "vmsnap_guest", retType: BIG, paramsType: [EXT] },
  vg_memfd: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_touch: { library: "vmsnap_guest", retType: BIG, paramsType: [BIG, BIG] },
  vg_fill: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, BIG, BIG, BIG] },
  vg_set_target: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, BIG, BIG] },
  vg_start: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, U32, BIG, BIG] },
  vg_set_phase: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, U32] },
  vg_freeze: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, U32] },
  vg_thaw: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_prepare_reference: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_take_reference: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_reference_hva: { library: "vmsnap_guest", retType: BIG, paramsType: [EXT] },
  vg_count_written_unpopulated: { library: "vmsnap_guest", retType: BIG, paramsType: [EXT] },
  vg_latency: { library: "vmsnap_guest", retType: I32, paramsType: [EXT, U32, B, B] },
  vg_stop: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_destroy: { library: "vmsnap_guest", retType: I32, paramsType: [EXT] },
  vg_map: { library: "vmsnap_guest", retType: BIG, paramsType: [BIG] },
  vg_unmap: { library: "vmsnap_guest", retType: I32, paramsType: [BIG, BIG] },
  vg_compare: { library: "vmsnap_guest", retType: BIG, paramsType: [BIG, BIG, BIG] },
  vg_bare_restore: { library: "vmsnap_guest", retType: I32, paramsType: [BIG, BIG, BIG, B, B] },
  vg_read: { library: "vmsnap_guest", retType: I32, paramsType: [B, BIG, BIG] }
} as const

type Table<T> = { [K in keyof T]: (args: Array<unknown>) => any }

let bound: Table<typeof guestTable> | undefined

/** Opens libvmsnap_guest.so once, on first use; throws an Error naming a missing file. */
export const loadGuest = (): Table<typeof guestTable> => {
  if (bound) return bound
  const path = buildPath("libvmsnap_guest.so")
  if (!existsSync(path)) throw new Error(`vmsnap_guest is not built: ${path} is missing (run \`pnpm install\`)`)
  open({ library: "vmsnap_guest", path })
  bound = define(guestTable as any) as Table<typeof guestTable>
  return bound
}

/** Shared with vmsnap_guest.h (checked in test/internal/ffi.test.ts). */
export const VG_HIST_BUCKETS = 512
export const VG_BARE_HIST_BUCKETS = 256
