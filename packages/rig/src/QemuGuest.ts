/**
 * A real QEMU (Debian's qemu-system-x86) running the bare-metal guest of
 * packages/rig/qemu-guest on KVM, for `vmsnap bench --target qemu`. The
 * guest writes one byte to a random 4 KiB page of `guestMiB` MiB (at
 * guest-physical 256 MiB) as fast as it can and times every write with its
 * TSC; once per window (`windowMs`) it prints on its serial console a `W`
 * line (writes, percentiles, stalls), and when told to quit, one histogram
 * per window (`H` lines, 512 log buckets in TSC cycles) and every stall of
 * 1 ms or more (`S` lines). See packages/rig/qemu-guest/README.md.
 *
 * Host times are CLOCK_MONOTONIC ns (process.hrtime). A window's host time
 * is placed from its guest end time (`t_ms`) plus the smallest
 * arrival-minus-guest-time offset seen, since printing can only delay a line.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { existsSync, readFileSync } from "node:fs"
import { connect, type Socket } from "node:net"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { Qmp } from "./Qmp.js"

/** The guest fixture's folder (packages/rig/qemu-guest). */
export const qemuGuestDir = (): string => join(dirname(fileURLToPath(import.meta.url)), "..", "qemu-guest")

export const QEMU_PROGRAM = "qemu-system-x86_64"
/** Guest RAM below the workload's buffer (the buffer starts at guest-physical 256 MiB). */
const LOW_MIB = 256
const MiB = 1024 * 1024
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const nowNs = () => Number(process.hrtime.bigint())

/** One `W` line: the guest's accesses in one window, and when it ended. */
export interface GuestWindowLine {
  readonly index: number
  /** Guest time at the window's end, ms since the loop started. */
  readonly guestMs: number
  /** Host CLOCK_MONOTONIC ns at which the line arrived. */
  readonly arrivedNs: number
  readonly writes: number
  readonly maxNs: number
  readonly over1ms: number
  readonly stallUs: number
}

/** What the guest printed when it quit: a histogram per window and its stalls of 1 ms or more. */
export interface GuestFinal {
  readonly nsPerCycle: number
  /** Per window index: bucket -> count. */
  readonly histograms: ReadonlyArray<ReadonlyMap<number, number>>
  /** Guest ms since the loop start, and duration in µs. */
  readonly stalls: ReadonlyArray<{ readonly guestMs: number; readonly us: number }>
}

const onPath = (program: string) => spawnSync("sh", ["-c", `command -v ${program}`], { stdio: "ignore" }).status === 0

/** Why this machine cannot run the QEMU guest, with how to fix it; undefined when it can. */
export const qemuMissing = (): string | undefined => {
  if (process.arch !== "x64") return "the QEMU guest and syscall injection are x86-64 only"
  if (!onPath(QEMU_PROGRAM)) return `${QEMU_PROGRAM} is not installed: install QEMU (Debian/Ubuntu: \`apt-get install qemu-system-x86\`)`
  if (!existsSync("/dev/kvm")) return "/dev/kvm is missing: the QEMU guest needs KVM (load kvm_intel/kvm_amd, or run on a host with nested virtualisation)"
  if (!onPath("gcc") || !onPath("ld")) return "gcc and ld are needed to build the bare-metal guest (Debian: `apt-get install gcc binutils`)"
  if (!existsSync(join(qemuGuestDir(), "build.sh"))) return `the QEMU guest fixture is not at ${qemuGuestDir()}`
  return undefined
}

/** Builds the guest ELF into `out`; throws with the compiler's message. */
export const buildQemuGuest = (out: string): void => {
  const r = spawnSync("bash", [join(qemuGuestDir(), "build.sh"), out], { encoding: "utf8" })
  if (r.status !== 0) throw new Error(`cannot build the QEMU guest: ${(r.stderr || r.error?.message || "").trim()}`)
}

/** `field` of /proc/PID/status in bytes (kB lines), 0 if unreadable. */
export const statusBytes = (pid: number | "self", field: string): number => {
  try {
    return Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) * 1024
  } catch {
    return 0
  }
}

export interface QemuGuestOptions {
  readonly elf: string
  /** Scratch directory for the sockets. */
  readonly dir: string
  readonly guestMiB: number
  readonly windowMs: number
}

export class QemuGuest {
  readonly child: ChildProcess
  readonly ramMiB: number
  private stderr = ""
  private console = ""
  private serial: Socket | undefined
  private qmpClient: Qmp | undefined
  private readonly lines: Array<GuestWindowLine> = []
  private offsetNs = Infinity
  /** How far `console` has been split into lines. */
  private parsed = 0

  constructor(readonly options: QemuGuestOptions) {
    this.ramMiB = options.guestMiB + LOW_MIB
    const ser = join(options.dir, "ser.sock")
    this.child = spawn(QEMU_PROGRAM, [
      "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", String(this.ramMiB), "-smp", "1", "-nodefaults",
      "-display", "none", "-monitor", "none", "-no-reboot", "-kernel", options.elf,
      "-append", `wl.mib=${options.guestMiB} wl.secs=3000 wl.mode=rand wl.win_ms=${options.windowMs}`,
      "-chardev", `socket,id=ser0,path=${ser},server=on,wait=on`, "-serial", "chardev:ser0",
      "-qmp", `unix:${join(options.dir, "qmp.sock")},server=on,wait=off`,
      "-device", "isa-debug-exit,iobase=0xf4,iosize=1"
    ], { stdio: ["ignore", "ignore", "pipe"] })
    this.child.stderr!.on("data", (d) => (this.stderr += d))
  }

  get pid(): number {
    return this.child.pid!
  }

  /** Guest RAM as QEMU maps it (one anonymous mapping of this size). */
  get ramBytes(): number {
    return this.ramMiB * MiB
  }

  get qmp(): Qmp {
    return this.qmpClient!
  }

  /** Connects to the console and QMP, and waits until the guest has touched its memory and prints windows. */
  async start(timeoutMs = 120_000): Promise<void> {
    const ser = join(this.options.dir, "ser.sock")
    for (let i = 0; i < 500 && !this.serial; i++) {
      if (this.child.exitCode !== null) break
      if (existsSync(ser))
        this.serial = await new Promise<Socket | undefined>((resolve) => {
          const s = connect(ser, () => resolve(s))
          s.on("error", () => resolve(undefined))
        })
      if (!this.serial) await sleep(20)
    }
    if (!this.serial) throw new Error(`QEMU's serial socket never came up: ${this.stderr.trim()}`)
    this.serial.on("data", (d) => this.receive(d.toString("latin1")))
    // QEMU opens its QMP socket once the serial socket (wait=on) has its client.
    const qmp = join(this.options.dir, "qmp.sock")
    for (let i = 0; i < 500 && !this.qmpClient; i++) {
      if (this.child.exitCode !== null) break
      if (existsSync(qmp)) this.qmpClient = await Qmp.connect(qmp).catch(() => undefined)
      if (!this.qmpClient) await sleep(20)
    }
    if (!this.qmpClient) throw new Error(`QEMU's QMP socket never came up: ${this.stderr.trim()}`)
    await this.waitFor(() => /^READY$/m.test(this.console), timeoutMs, "READY")
  }

  /** Window lines received so far. */
  windows(): ReadonlyArray<GuestWindowLine> {
    return this.lines
  }

  /** Host ns of the end of a window (from its guest time and the tightest offset seen). */
  hostEndNs(w: GuestWindowLine): number {
    return this.hostNs(w.guestMs)
  }

  /** Host ns of a guest time (ms since its loop started). */
  hostNs(guestMs: number): number {
    return guestMs * 1e6 + this.offsetNs
  }

  /** Waits until `count` more windows have arrived. */
  async nextWindows(count: number, timeoutMs = 60_000): Promise<void> {
    const target = this.lines.length + count
    await this.waitFor(() => this.lines.length >= target, timeoutMs, `${count} window line(s)`)
  }

  /** Waits until a window ending at least `ms` after host moment `ns` has arrived. */
  async windowsUntil(ns: number, ms: number, timeoutMs = 120_000): Promise<void> {
    await this.waitFor(() => this.lines.length > 0 && this.hostEndNs(this.lines[this.lines.length - 1]!) >= ns + ms * 1e6, timeoutMs, `windows until ${ms} ms after the snapshot`)
  }

  /** Ends the guest's loop and reads its histograms and stalls; QEMU then exits. */
  async quit(timeoutMs = 60_000): Promise<GuestFinal> {
    this.serial!.write("q\n")
    await this.waitFor(() => /^DONE$/m.test(this.console), timeoutMs, "DONE")
    const nsPerCycle = Number(/^HB ns_per_cyc=([\d.]+)/m.exec(this.console)?.[1] ?? 0)
    const histograms: Array<Map<number, number>> = []
    for (const m of this.console.matchAll(/^H i=(\d+) ?(.*)$/gm)) {
      const h = new Map<number, number>()
      for (const pair of m[2]!.split(",").filter(Boolean)) {
        const [b, c] = pair.split(":")
        h.set(Number(b), Number(c))
      }
      histograms[Number(m[1])] = h
    }
    const stalls = [...this.console.matchAll(/^S t_ms=([\d.]+) dur_us=([\d.]+)$/gm)].map((m) => ({ guestMs: Number(m[1]), us: Number(m[2]) }))
    return { nsPerCycle, histograms, stalls }
  }

  kill(): void {
    this.qmpClient?.close()
    this.serial?.destroy()
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL")
  }

  private receive(text: string) {
    const arrivedNs = nowNs()
    this.console += text
    // Window lines are parsed as they arrive (their arrival time places them).
    let nl: number
    while ((nl = this.console.indexOf("\n", this.parsed)) >= 0) {
      const line = this.console.slice(this.parsed, nl)
      this.parsed = nl + 1
      const m = /^W i=(\d+) t_ms=([\d.]+) .*?\bn=(\d+) .*?\bmax=(\d+) .*?\bc1ms=(\d+) .*?\bstall_us=(\d+)/.exec(line)
      if (!m) continue
      const w: GuestWindowLine = {
        index: Number(m[1]), guestMs: Number(m[2]), arrivedNs, writes: Number(m[3]), maxNs: Number(m[4]), over1ms: Number(m[5]), stallUs: Number(m[6])
      }
      this.offsetNs = Math.min(this.offsetNs, arrivedNs - w.guestMs * 1e6)
      this.lines.push(w)
    }
  }

  private async waitFor(done: () => boolean, timeoutMs: number, what: string): Promise<void> {
    for (let waited = 0; !done(); waited += 10) {
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`QEMU exited before the guest printed ${what}: ${this.stderr.trim() || `status ${this.child.exitCode ?? this.child.signalCode}`}`)
      if (waited >= timeoutMs) throw new Error(`the QEMU guest did not print ${what} within ${timeoutMs} ms`)
      await sleep(10)
    }
  }
}
