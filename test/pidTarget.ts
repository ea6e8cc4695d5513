/**
 * packages/rig/target/pid_target.c as the pid snapshot tests drive it: start
 * it, read its READY line, send it commands on stdin (`ping`, `remap`,
 * `discard`, ...) and wait for the answer, and check that vmsnap let it go.
 */
import { Cause, Effect, Exit } from "effect"
import { type ChildProcess, spawn } from "node:child_process"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { expect } from "vitest"
import { WpNative } from "../packages/core/src/index.js"
import { leftovers } from "./pidTests.js"

const here = dirname(fileURLToPath(import.meta.url))
export const targetBin = join(here, "..", "packages", "rig", "build", "vmsnap-pidtarget")

/** Why the pid tests cannot run here, if they cannot. */
export const pidSkipReason = (): string | undefined => {
  if (process.arch !== "x64") return "syscall injection into another process is implemented for x86-64 only"
  if (process.getuid?.() !== 0) return "needs root: ptrace of a process that is not a child, and userfaultfd inside it"
  if (!existsSync(targetBin)) return `the test target ${targetBin} is not built (run \`npm run setup\`)`
  return undefined
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
export const run = <A, E>(effect: Effect.Effect<A, E, WpNative>) => Effect.runPromiseExit(Effect.provide(effect, WpNative.layer))
export const messageOf = (exit: Exit.Exit<unknown, unknown>) => (Exit.isFailure(exit) ? String((Cause.squash(exit.cause) as Error).message) : "(succeeded)")

const targets: Array<Target> = []
/** Kills every target started (afterAll). */
export const killTargets = () => targets.forEach((t) => t.kill())

export class Target {
  readonly child: ChildProcess
  private out = ""
  stderr = ""
  readonly ready: Promise<{ pid: number; anon: bigint; shm: bigint; bytes: number }>

  /** `pid_target MIB WRITERS [churn|seccomp]` or `pid_target trace PID`. */
  constructor(args: ReadonlyArray<string>) {
    this.child = spawn(targetBin, args, { stdio: ["pipe", "pipe", "pipe"] })
    this.child.stderr!.on("data", (d) => (this.stderr += d))
    this.child.stdout!.on("data", (d) => (this.out += d))
    this.ready = this.line(/^READY pid=(\d+) anon=([0-9a-f]+) anon_bytes=(\d+) shm=([0-9a-f]+)/m).then((m) => ({
      pid: Number(m[1]), anon: BigInt(`0x${m[2]}`), bytes: Number(m[3]), shm: BigInt(`0x${m[4]}`)
    }))
    this.ready.catch(() => undefined) // a tracer helper never prints READY
    targets.push(this)
  }

  get pid() {
    return this.child.pid!
  }

  /** Waits (up to 10 s) for a line of its stdout matching `re`. */
  async line(re: RegExp): Promise<RegExpExecArray> {
    for (let i = 0; i < 500; i++) {
      const m = re.exec(this.out)
      if (m) {
        this.out = this.out.slice(m.index + m[0].length)
        return m
      }
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`target exited: ${this.stderr}`)
      await sleep(20)
    }
    throw new Error(`target did not print ${re}: ${this.stderr}`)
  }

  /** Sends a command line (answered by its main thread once it runs). */
  send(command: string) {
    this.child.stdin!.write(`${command}\n`)
  }

  /** The target's write count, answered by its main thread (blocked in read(2) meanwhile). */
  async ping(): Promise<number> {
    this.send("ping")
    return Number((await this.line(/^pong (\d+)$/m))[1])
  }

  kill() {
    if (this.child.exitCode === null) this.child.kill("SIGKILL")
  }
}

/** Nothing of vmsnap is left in the target, and its writers run on. */
export const expectReleased = async (target: Target) => {
  expect(leftovers(target.pid)).toEqual([])
  const before = await target.ping()
  await sleep(50)
  expect(await target.ping(), "the target's writers stopped").toBeGreaterThan(before)
}
