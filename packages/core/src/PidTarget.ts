/**
 * What /proc says about the target of a pid snapshot (PidSnapshot.ts),
 * before and while vmsnap acts on it: whether it still runs, whether it is a
 * user process at all (not a kernel thread, not a thread id other than its
 * process's), and why ptrace was refused. Sources: proc(5) `status` and
 * `stat`, Yama's `ptrace_scope`.
 */
import { Effect } from "effect"
import { readFileSync, readlinkSync } from "node:fs"
import { CapabilityError, InvalidInput, type VmsnapError } from "./Errors.js"

const statusField = (pid: number, field: string): string | undefined => {
  try {
    return new RegExp(`^${field}:\\s*(.*)$`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]
  } catch {
    return undefined
  }
}

export const commOf = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim()
  } catch {
    return "?"
  }
}

/** PF_* bits of /proc/PID/stat's flags (field 9; include/linux/sched.h), 0 if unreadable. */
const statFlags = (pid: number): number => {
  try {
    return Number(readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /s, "").split(" ")[6]) || 0
  } catch {
    return 0
  }
}
const PF_EXITING = 0x00000004
/** PF_KTHREAD, for kernels without the status line "Kthread". */
const PF_KTHREAD = 0x00200000

/** Still running: neither gone, a zombie, nor exiting (a killed process tears its memory down before it is a zombie). */
export const isAlive = (pid: number): boolean => {
  const state = statusField(pid, "State")
  return state !== undefined && !state.startsWith("Z") && !state.startsWith("X") && (statFlags(pid) & PF_EXITING) === 0
}

/** Why ptrace was refused, as precisely as /proc tells. */
export const ptraceDenied = (pid: number, errno: number): CapabilityError => {
  const missing = `ptrace access to pid ${pid}`
  const tracer = Number(statusField(pid, "TracerPid") ?? 0)
  if (tracer > 0) return new CapabilityError({ missing, reason: `pid ${pid} is already traced by pid ${tracer} (${commOf(tracer)}); a process has one tracer: detach that debugger or tracer first` })
  let scope: string | undefined
  try {
    scope = readFileSync("/proc/sys/kernel/yama/ptrace_scope", "utf8").trim()
  } catch { /* no yama */ }
  if (scope === "3") return new CapabilityError({ missing, reason: "kernel.yama.ptrace_scope is 3: ptrace attach is disabled until reboot" })
  try {
    if (readlinkSync(`/proc/${pid}/ns/user`) !== readlinkSync("/proc/self/ns/user") && process.getuid?.() !== 0)
      return new CapabilityError({ missing, reason: `pid ${pid} is in another user namespace: run vmsnap in its namespace or as root in the initial one` })
  } catch { /* unreadable: say the general case */ }
  const uid = statusField(pid, "Uid")?.split(/\s+/)[0]
  const reasons = [
    `ptrace was refused (${errno === 1 ? "EPERM" : `errno ${errno}`})`,
    scope !== undefined && scope !== "0" ? `kernel.yama.ptrace_scope is ${scope} (1: only descendants, 2: only CAP_SYS_PTRACE): run as root or set it to 0` : undefined,
    uid !== undefined && Number(uid) !== process.getuid?.() ? `pid ${pid} runs as uid ${uid}: run vmsnap as that user or with CAP_SYS_PTRACE` : undefined
  ].filter(Boolean)
  return new CapabilityError({ missing, reason: reasons.join("; ") })
}

/**
 * Why `pid` is not a user process whose memory can be snapshotted, if it is
 * not: a kernel thread (no user address space: status "Kthread: 1", or
 * PF_KTHREAD), or a thread other than its process's first (status "Tgid"
 * differs: memory belongs to the whole process, which is snapshotted by the
 * Tgid; /proc/TID answers for any thread though /proc lists only processes).
 */
const notAUserProcess = (pid: number): string | undefined => {
  if (statusField(pid, "Kthread") === "1" || (statFlags(pid) & PF_KTHREAD) !== 0)
    return `pid ${pid} (${commOf(pid)}) is a kernel thread: it has no user memory to snapshot`
  const tgid = Number(statusField(pid, "Tgid") ?? pid)
  if (tgid !== pid)
    return `pid ${pid} is a thread of process ${tgid} (${commOf(tgid)}), not a process: memory belongs to the whole process, snapshot it with --pid ${tgid}`
  return undefined
}

/** Refuses what cannot be snapshotted by pid before anything is done to it. */
export const checkTarget = (pid: number): Effect.Effect<void, VmsnapError> =>
  Effect.suspend((): Effect.Effect<void, VmsnapError> => {
    if (!Number.isInteger(pid) || pid <= 0) return Effect.fail(new InvalidInput({ reason: `--pid ${pid}: not a process id` }))
    if (pid === process.pid) return Effect.fail(new InvalidInput({ reason: "vmsnap cannot snapshot itself by pid" }))
    if (!isAlive(pid)) return Effect.fail(new InvalidInput({ reason: `no running process ${pid}` }))
    const notAProcess = notAUserProcess(pid)
    if (notAProcess) return Effect.fail(new InvalidInput({ reason: notAProcess }))
    const seccomp = statusField(pid, "Seccomp")
    if (seccomp !== undefined && seccomp !== "0")
      return Effect.fail(new CapabilityError({ missing: `a seccomp-free pid ${pid}`, reason: `pid ${pid} (${commOf(pid)}) runs under seccomp mode ${seccomp}: a userfaultfd(2) run inside it could be refused or kill it, so vmsnap does not try` }))
    return Effect.void
  })
