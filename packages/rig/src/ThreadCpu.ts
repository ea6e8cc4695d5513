/**
 * Where the CPU went during a benchmark's snapshot, thread by thread: the
 * time each thread of a process spent on a CPU, from
 * /proc/PID/task/TID/schedstat (first field, ns by the scheduler's clock;
 * checked here against /proc/PID/stat's utime+stime on a busy loop),
 * sampled every SAMPLE_MS through a run and grouped by role (issue 14: the
 * vCPUs, vmsnap's fault thread, its writer, node's worker threads). Beside
 * them, "all CPUs busy": the whole machine's busy time from /proc/stat
 * (every CPU, every process, kernel threads such as writeback included;
 * USER_HZ ticks, so 10 ms steps), which says what else competed for the
 * guest's cores.
 */
import { readdirSync, readFileSync } from "node:fs"

/** Sampling period, ms. */
const SAMPLE_MS = 50

/** ms on a CPU per role between two moments, e.g. { "vcpu": 2890, "fault thread": 410 }. */
export type CpuByRole = Record<string, number>

interface Sample {
  readonly ns: number
  /** Busy ns of all CPUs together (/proc/stat: every field but idle and iowait), or NaN. */
  readonly machineNs: number
  /** CPU ns and role per thread ("pid/tid"). */
  readonly threads: ReadonlyMap<string, { readonly role: string; readonly ns: number }>
}

/**
 * The role of a thread: vmsnap's own threads are named (the engine's fault
 * thread "vmsnap-fault", the native writer "vmsnap-writer" and its
 * compression thread "vmsnap-lz4"; the toy VMM's "vcpuN", "floor-fault");
 * in the node process the main thread only watches the writer.
 */
const roleOf = (pid: number, tid: number, comm: string, bench: number): string => {
  if (comm === "vmsnap-fault") return "fault thread"
  if (comm === "vmsnap-writer") return "writer thread"
  if (comm === "vmsnap-lz4") return "lz4 thread"
  if (comm.startsWith("vcpu")) return "vcpu"
  if (comm === "floor-fault") return "floor fault thread"
  if (pid === bench) {
    if (tid === pid) return "node main"
    // Node 20 names none of its threads: libuv's pool and V8's (gc, compiler).
    return "node workers (fs, gc)"
  }
  return tid === pid ? "vmm main" : "vmm other"
}

/** /proc/stat's first line: ticks of USER_HZ (100 on Linux's ABI) per state, all CPUs added. */
const TICK_NS = 1e7
const machineBusyNs = (): number => {
  try {
    const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number)
    // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user and nice)
    const busy = f.slice(0, 8).reduce((a, b) => a + b, 0) - (f[3] ?? 0) - (f[4] ?? 0)
    return busy * TICK_NS
  } catch {
    return Number.NaN
  }
}

const readSample = (pids: ReadonlyArray<number>, bench: number): Sample => {
  const threads = new Map<string, { role: string; ns: number }>()
  for (const pid of pids) {
    let tids: Array<string>
    try {
      tids = readdirSync(`/proc/${pid}/task`)
    } catch {
      continue // exited
    }
    for (const t of tids) {
      try {
        const ns = Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").split(" ")[0])
        const comm = readFileSync(`/proc/${pid}/task/${t}/comm`, "utf8").trim()
        threads.set(`${pid}/${t}`, { role: roleOf(pid, Number(t), comm, bench), ns })
      } catch {
        // the thread exited between readdir and read
      }
    }
  }
  return { ns: Number(process.hrtime.bigint()), machineNs: machineBusyNs(), threads }
}

/** Samples the threads of `pids()` (re-read each time: a VMM may start later) until `stop`. */
export class ThreadCpuSampler {
  private readonly samples: Array<Sample> = []
  private readonly timer: NodeJS.Timeout

  constructor(private readonly pids: () => ReadonlyArray<number>) {
    this.sample()
    this.timer = setInterval(() => this.sample(), SAMPLE_MS)
  }

  sample(): void {
    this.samples.push(readSample(this.pids(), process.pid))
  }

  stop(): void {
    this.sample()
    clearInterval(this.timer)
  }

  /**
   * CPU ms per role from the last sample at or before fromNs to the first at
   * or after toNs (so the window is at most SAMPLE_MS wider on each side). A
   * thread that exited inside the window counts up to its last sample.
   */
  between(fromNs: number, toNs: number): CpuByRole {
    let first = 0
    this.samples.forEach((s, i) => s.ns <= fromNs && (first = i))
    const found = this.samples.findIndex((s) => s.ns >= toNs)
    const last = found < 0 ? this.samples.length - 1 : found
    const out: CpuByRole = {}
    if (last < first) return out
    const start = this.samples[first]!.threads
    const latest = new Map<string, { role: string; ns: number }>()
    for (let i = first + 1; i <= last; i++) for (const [tid, t] of this.samples[i]!.threads) latest.set(tid, t)
    for (const [tid, t] of latest) {
      const ms = (t.ns - (start.get(tid)?.ns ?? 0)) / 1e6
      if (ms > 0) out[t.role] = Math.round(((out[t.role] ?? 0) + ms) * 10) / 10
    }
    const machine = this.samples[last]!.machineNs - this.samples[first]!.machineNs
    if (Number.isFinite(machine)) out["all CPUs busy"] = Math.round(machine / 1e6)
    out["window ms"] = Math.round((this.samples[last]!.ns - this.samples[first]!.ns) / 1e5) / 10
    return out
  }
}
