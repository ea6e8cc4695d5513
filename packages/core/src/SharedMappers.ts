/**
 * Which other processes map the same shared memory as a snapshot target.
 *
 * Write-protect lives in one process's page tables: a page of shared memory
 * (memfd, /dev/shm, SysV shm, shared anonymous) written through another
 * process's mapping of the same file never faults in the target, so its
 * pages keep changing after the cut while vmsnap saves them. Such a mapping
 * cannot be captured at one instant: `snapshot --pid` refuses it, naming
 * the other processes, unless the caller leaves it out (--mapping); the
 * agent refuses a VM whose guest memory a process that did not say hello
 * maps (docs/agent-protocol.md).
 *
 * Source of the facts: every other process's /proc/PID/maps (device, inode
 * and file offset of each mapping). A process whose maps this process may
 * not read (another user's, without CAP_SYS_PTRACE) is not seen; writes
 * through a file descriptor (pwrite) are not mappings and are not seen
 * either (docs/pid-snapshot.md).
 */
import { readdirSync, readFileSync } from "node:fs"
import { commOf } from "./PidTarget.js"
import { describeMapping, type ProcessMapping } from "./ProcessMappings.js"

/** A chosen shared mapping and the other processes that map the same part of its file. */
export interface SharedMapping {
  readonly mapping: ProcessMapping
  readonly others: ReadonlyArray<{ readonly pid: number; readonly comm: string }>
}

/** The shared file mappings (shmem) among `chosen` that a process other than `pids` (and this one) maps too. */
export const sharedWithOthers = (pids: ReadonlyArray<number>, chosen: ReadonlyArray<ProcessMapping>): Array<SharedMapping> => {
  const shared = chosen.filter((m) => m.permissions[3] === "s")
  if (shared.length === 0) return []
  const found = new Map<ProcessMapping, Array<{ pid: number; comm: string }>>()
  let all: Array<string>
  try {
    all = readdirSync("/proc").filter((n) => /^\d+$/.test(n))
  } catch {
    return []
  }
  for (const name of all) {
    const other = Number(name)
    if (pids.includes(other) || other === process.pid) continue
    let text: string
    try {
      text = readFileSync(`/proc/${other}/maps`, "utf8")
    } catch {
      continue // gone, or not ours to read
    }
    for (const line of text.split("\n")) {
      const f = /^([0-9a-f]+)-([0-9a-f]+) \S{4} ([0-9a-f]+) (\S+) (\d+)/.exec(line)
      if (!f) continue
      const inode = Number(f[5])
      const from = BigInt(`0x${f[3]}`)
      const to = from + BigInt(`0x${f[2]}`) - BigInt(`0x${f[1]}`)
      for (const m of shared) {
        if (m.inode !== inode || m.device !== f[4] || to <= m.offset || from >= m.offset + BigInt(m.size)) continue
        const list = found.get(m) ?? []
        if (!list.some((o) => o.pid === other)) list.push({ pid: other, comm: commOf(other) })
        found.set(m, list)
      }
    }
  }
  return shared.filter((m) => found.has(m)).map((m) => ({ mapping: m, others: found.get(m)! }))
}

/** "mapping A-B rw-s NAME is also mapped by pid 12 (comm), pid 13 (comm)", for each; at most 8 pids each. */
export const describeShared = (list: ReadonlyArray<SharedMapping>): string =>
  list.map((s) =>
    `mapping ${describeMapping(s.mapping)} is also mapped by ${s.others.slice(0, 8).map((o) => `pid ${o.pid} (${o.comm})`).join(", ")}${s.others.length > 8 ? ` and ${s.others.length - 8} more` : ""}`
  ).join("; ")
