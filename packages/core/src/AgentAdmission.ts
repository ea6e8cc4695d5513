/**
 * What the agent checks of a hello before it admits a process, so a problem
 * is reported with its real cause at `hello` rather than as an errno during
 * a later snapshot: every region's fd is large enough and is shared memory,
 * its real page size (read from the fd for fd-backed regions, from the
 * sender's mapping, /proc/PID/smaps, for anonymous ones; never trusted from
 * the hello) is the one the region declares (4 KiB, or 2 MiB for hugetlbfs),
 * and the sender really maps each region where it says (its /proc/PID/maps:
 * the whole range is mapped, by that fd at that offset and shared for
 * fd-backed regions). The pid is the kernel's (SO_PEERCRED), never the message's.
 */
import { fstatSync, readFileSync } from "node:fs"
import { failProtocol as fail, type Hello, type HelloRegion } from "./AgentProtocol.js"
import { PAGE_SIZE } from "./GuestMemory.js"
import { aliasesOf, deviceName, describeMapping, type ProcessMapping, readMappings } from "./ProcessMappings.js"

interface Mapping {
  readonly start: bigint
  readonly end: bigint
  readonly offset: bigint
  readonly inode: number
  readonly path: string
  /** The permissions column, e.g. rw-s (s: MAP_SHARED, p: MAP_PRIVATE). */
  readonly perms: string
}

/** The mappings of `pid` (/proc/PID/maps), in address order. */
const mappingsOf = (pid: number): Array<Mapping> => {
  let text: string
  try {
    text = readFileSync(`/proc/${pid}/maps`, "utf8")
  } catch (e) {
    return fail(`cannot read /proc/${pid}/maps to check the regions: ${(e as Error).message}`)
  }
  return text.split("\n").filter((l) => l.length > 0).map((line) => {
    const [range, perms, offset, , inode, ...path] = line.split(/\s+/)
    const [start, end] = range!.split("-")
    return { start: BigInt(`0x${start}`), end: BigInt(`0x${end}`), offset: BigInt(`0x${offset}`), inode: Number(inode), path: path.join(" "), perms: perms ?? "" }
  })
}

const where = (i: number, r: HelloRegion) => `region ${i} (gpa 0x${r.gpa.toString(16)}, hva 0x${r.hva.toString(16)}, ${r.size} bytes)`

/** Fails unless [hva, hva + size) is mapped without a gap, by the fd (inode) at the region's offset when it has one. */
const checkMapped = (maps: ReadonlyArray<Mapping>, i: number, r: HelloRegion, inode: number | undefined, pid: number) => {
  const end = r.hva + BigInt(r.size)
  let at = r.hva
  for (const m of maps) {
    if (m.end <= at || m.start > at) continue
    if (inode !== undefined) {
      if (m.inode !== inode) fail(`${where(i, r)}: pid ${pid} maps ${m.path || "anonymous memory"} at 0x${at.toString(16)}, not the fd it sent`)
      // MAP_PRIVATE: the guest's writes go to private copies the fd does not show, so reading the
      // fd would save its unwritten pages (zeros) as the guest's memory (break8 H1).
      if (m.perms[3] !== "s")
        fail(`${where(i, r)}: pid ${pid} maps the fd privately (MAP_PRIVATE, ${m.perms}) at 0x${at.toString(16)}: the guest's writes land in private copies the fd does not show, so a snapshot read through the fd would be wrong; map guest memory MAP_SHARED, or declare the region with "fd": null so it is read from the process's memory`)
      if (m.offset + (at - m.start) !== BigInt(r.offset) + (at - r.hva))
        fail(`${where(i, r)}: pid ${pid} maps the fd at offset 0x${(m.offset + (at - m.start)).toString(16)} there, not at the region's offset ${r.offset}`)
    }
    at = m.end
    if (at >= end) return
  }
  fail(`${where(i, r)}: pid ${pid} has nothing mapped at 0x${at.toString(16)} (unmapped or remapped; a VMM must say hello with its regions mapped and must not remap them while connected)`)
}

/** The declared page size must be the real one: a hugetlbfs region declared with 4 KiB pages would be protected wrongly. */
const checkPageSize = (i: number, r: HelloRegion, real: number, source: string) => {
  if (real !== r.pageSize)
    fail(`${where(i, r)}: ${source} has ${real}-byte pages${real > PAGE_SIZE ? " (hugetlbfs)" : ""} but the region declares pageSize ${r.pageSize}: declare "pageSize": ${real}`)
}

export const tryRead = <A>(read: () => A): A | Error => {
  try {
    return read()
  } catch (e) {
    return e instanceof Error ? e : new Error(String(e))
  }
}

/** Two regions of one hello at overlapping hvas are one memory declared twice. */
const checkNoOverlap = (hello: Hello) => {
  const sorted = hello.regions.map((r, i) => ({ r, i })).sort((a, b) => (a.r.hva < b.r.hva ? -1 : 1))
  for (let k = 1; k < sorted.length; k++) {
    const a = sorted[k - 1]!, b = sorted[k]!
    if (a.r.hva + BigInt(a.r.size) > b.r.hva) fail(`${where(b.i, b.r)} overlaps ${where(a.i, a.r)} in the sender's address space: declare each piece of guest memory once`)
  }
}

/**
 * Checks a hello against its fds and the sender's mappings; ProtocolError naming the cause. `smaps`: the
 * sender's, when the caller has read them already (else read here once, when a region needs them).
 */
export const checkHello = (hello: Hello, fds: ReadonlyArray<number>, pid: number, smaps?: ReadonlyArray<ProcessMapping> | Error) => {
  const maps = mappingsOf(pid)
  checkNoOverlap(hello)
  // The sender's smaps, read once, when a region needs it (or why it could not be read).
  let smapsRead = smaps
  const smapsOnce = () => (smapsRead ??= tryRead(() => readMappings(pid)))
  hello.regions.forEach((r, i) => {
    if (r.fd !== null) {
      const st = fstatSync(fds[r.fd]!)
      if (!st.isFile()) fail(`${where(i, r)}: its fd is not a memory file (memfd or shmem)`)
      if (st.size < r.offset + r.size) fail(`region at gpa 0x${r.gpa.toString(16)}: its fd holds ${st.size} bytes, fewer than offset ${r.offset} + size ${r.size}`)
      // hugetlbfs reports its huge page size as the block size; tmpfs/memfd report 4096.
      checkPageSize(i, r, Math.max(st.blksize, PAGE_SIZE), "its fd")
      checkMapped(maps, i, r, st.ino, pid)
      // The same memory mapped writable elsewhere in the sender (break8 H4: declared twice, or
      // written through an undeclared second mapping): its writes there would not be protected.
      // smaps that cannot be read (the process is exiting; its maps passed just above) tell nothing.
      const all = smapsOnce()
      const alias = all instanceof Error ? undefined : aliasesOf({ start: r.hva, end: r.hva + BigInt(r.size), device: deviceName(st.dev), inode: st.ino, offset: BigInt(r.offset) }, all)[0]
      if (alias)
        fail(`${where(i, r)}: pid ${pid} also maps that memory writable at ${describeMapping(alias)}: a page written there would be saved after the cut. Declare each piece of guest memory once, and do not write it through a second mapping`)
    } else {
      checkMapped(maps, i, r, undefined, pid)
      const all = smapsOnce()
      if (all instanceof Error) return fail(`cannot read /proc/${pid}/smaps to check the page size of ${where(i, r)}: ${all.message}`)
      const real = all.find((m) => r.hva >= m.start && r.hva < m.end)?.kernelPageSize
      if (real !== undefined) checkPageSize(i, r, real, `pid ${pid}'s mapping`)
    }
  })
}
