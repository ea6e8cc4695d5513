/**
 * Bounded garbage for the writer. lz4-napi returns a new Buffer per record;
 * V8 only collects them once ~64 MiB of external memory has piled up, which
 * would dwarf a small copy pool. A young-generation collection every few MiB
 * written keeps the writer's footprint at a few MiB. Costs ~0.5 ms each.
 * @internal
 */
import { setFlagsFromString } from "node:v8"
import { runInNewContext } from "node:vm"

type Gc = (options?: { type?: "minor" | "major"; execution?: "sync" | "async" }) => void

let gc: Gc | undefined | null = null

const load = (): Gc | undefined => {
  if (gc !== null) return gc
  try {
    setFlagsFromString("--expose-gc")
    gc = runInNewContext("gc") as Gc
  } catch {
    gc = undefined
  }
  return gc
}

export const collectYoungGarbage = (): void => {
  load()?.({ type: "minor" })
}
