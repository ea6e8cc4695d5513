/**
 * What the pid snapshot tests share: a reference copy of a frozen process's
 * memory (read through /proc/PID/mem at the cut), a chunked comparison of a
 * restored image with it, and what "released" means for a target.
 */
import { Effect, Exit } from "effect"
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, rmSync, statSync, writeSync } from "node:fs"
import { type MemoryRegion, restoreToRawFile } from "../packages/core/src/index.js"

/**
 * Copies the target's memory of every region, concatenated, into `out` (call it while the target is frozen).
 * A region the target unmapped after the mappings were chosen (a churning target) reads EIO: the reference stops
 * there, short, and the snapshot, which must then be refused (its layout changed), is never compared equal to it.
 */
export const referenceAtCut = (pid: number, out: string) => (regions: ReadonlyArray<MemoryRegion>) =>
  Effect.sync(() => {
    const mem = openSync(`/proc/${pid}/mem`, "r")
    const fd = openSync(out, "w", 0o600)
    const buf = Buffer.alloc(1 << 22)
    try {
      copy: for (const r of regions) {
        for (let off = 0; off < r.size; off += buf.length) {
          const n = Math.min(buf.length, r.size - off)
          let got: number
          try {
            got = readSync(mem, buf, 0, n, Number(r.guestBase) + off)
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === "EIO") break copy
            throw e
          }
          if (got !== n) throw new Error("short read of /proc/PID/mem")
          writeSync(fd, buf, 0, n)
        }
      }
    } finally {
      closeSync(fd)
      closeSync(mem)
    }
  })

/** Byte offset of the first difference between two files, -1 if equal (chunked: guest-sized files). */
const firstDifference = (a: string, b: string): number => {
  const fa = openSync(a, "r")
  const fb = openSync(b, "r")
  const ba = Buffer.alloc(1 << 22)
  const bb = Buffer.alloc(1 << 22)
  try {
    for (let off = 0; ; off += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, off)
      const nb = readSync(fb, bb, 0, bb.length, off)
      if (na !== nb) return off + Math.min(na, nb)
      if (na === 0) return -1
      if (!ba.subarray(0, na).equals(bb.subarray(0, nb))) {
        for (let i = 0; i < na; i++) if (ba[i] !== bb[i]) return off + i
      }
    }
  } finally {
    closeSync(fa)
    closeSync(fb)
  }
}

/**
 * Where a snapshot differs from its reference, for a failing test's message: "" if they are equal, else the first
 * differing byte as the mapping and offset it falls in, both sides' bytes there, and both images' lengths.
 */
export const differenceReport = async (
  snapshot: string, reference: string, mappings: ReadonlyArray<{ hva: bigint; size: number; name: string }>
): Promise<string> => {
  const raw = `${snapshot}.raw`
  const exit = await Effect.runPromiseExit(restoreToRawFile(snapshot, raw))
  if (Exit.isFailure(exit)) throw new Error(`restore of ${snapshot} failed`)
  try {
    const at = firstDifference(raw, reference)
    if (at < 0) return ""
    let base = 0
    const m = mappings.find((m) => at < (base += m.size)) ?? mappings[mappings.length - 1]
    const offset = at - (base - (m?.size ?? 0))
    const bytes = (file: string) => {
      const fd = openSync(file, "r")
      try {
        const b = Buffer.alloc(16)
        return b.subarray(0, readSync(fd, b, 0, 16, at)).toString("hex")
      } finally {
        closeSync(fd)
      }
    }
    return `first difference at byte ${at} of ${statSync(raw).size} (reference ${statSync(reference).size}): ` +
      `${m ? `${m.name || "anonymous"} at 0x${m.hva.toString(16)} + 0x${offset.toString(16)} (page ${Math.floor(offset / 4096)} of ${m.size / 4096})` : "past every mapping"}; ` +
      `snapshot ${bytes(raw) || "(end)"}, reference ${bytes(reference) || "(end)"}`
  } finally {
    rmSync(raw)
  }
}

/** Restores the snapshot to a raw image (regions concatenated) and compares it with the reference: -1 if equal, else the first differing byte. */
export const differenceFromReference = async (snapshot: string, reference: string): Promise<number> => {
  const raw = `${snapshot}.raw`
  const exit = await Effect.runPromiseExit(restoreToRawFile(snapshot, raw))
  if (Exit.isFailure(exit)) throw new Error(`restore of ${snapshot} failed`)
  try {
    return firstDifference(raw, reference)
  } finally {
    rmSync(raw)
  }
}

/** What of vmsnap is still in process `pid`: traced threads, userfaultfds, registered ranges. Empty when released. */
export const leftovers = (pid: number): Array<string> => {
  const found: Array<string> = []
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let status: string
    try {
      status = readFileSync(`/proc/${pid}/task/${tid}/status`, "utf8")
    } catch {
      continue // a short-lived thread that exited since the listing
    }
    const tracer = /^TracerPid:\s+(\d+)/m.exec(status)?.[1]
    if (tracer !== "0") found.push(`thread ${tid} traced by ${tracer}`)
  }
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).includes("userfaultfd")) found.push(`fd ${fd} is a userfaultfd`)
    } catch { /* closed meanwhile */ }
  }
  const registered = readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n").filter((l) => l.startsWith("VmFlags:") && / uw( |$)/.test(l))
  if (registered.length) found.push(`${registered.length} ranges still registered for write-protect`)
  return found
}
