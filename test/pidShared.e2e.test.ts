/**
 * `snapshot --pid` of a process whose shared memory another process also maps
 * (test/fixtures/shared_target.py: a child forked before the snapshot keeps
 * writing its shared anonymous, memfd and SysV mappings). Write-protect in the
 * target does not see the child's writes, so such a mapping cannot be captured
 * at one instant: it is refused, naming the mapping and the child, and the
 * caller may leave it out with --mapping.
 */
import { Cause, Effect, Exit } from "effect"
import { type ChildProcess, spawn } from "node:child_process"
import { existsSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, describe, expect, it } from "vitest"
import { parseMappingSelector, snapshotPid, WpNative } from "../packages/core/src/index.js"
import { scratchDir } from "./toyVmmTests.js"

const here = dirname(fileURLToPath(import.meta.url))
const dir = scratchDir("vmsnap-pidshared-")
const skip = process.arch !== "x64" ? "syscall injection into another process is implemented for x86-64 only"
  : process.getuid?.() !== 0 ? "needs root: ptrace of a process that is not a child, and userfaultfd inside it" : undefined
if (skip) console.warn(`SKIP pid snapshot of shared memory: ${skip}`)

const run = <A, E>(effect: Effect.Effect<A, E, WpNative>) => Effect.runPromiseExit(Effect.provide(effect, WpNative.layer))
const messageOf = (exit: Exit.Exit<unknown, unknown>) => (Exit.isFailure(exit) ? String((Cause.squash(exit.cause) as Error).message) : "(succeeded)")

const targets: Array<ChildProcess> = []
afterAll(() => targets.forEach((t) => t.exitCode === null && t.kill("SIGKILL")))

/** Starts the target; resolves with its READY fields. */
const start = () =>
  new Promise<{ pid: number; child: number; private: string; shared: string; target: ChildProcess }>((resolve, reject) => {
    const target = spawn("python3", [join(here, "fixtures", "shared_target.py")], { stdio: ["pipe", "pipe", "inherit"] })
    targets.push(target)
    let out = ""
    target.stdout!.on("data", (c: Buffer) => {
      out += c.toString()
      const m = /READY pid=(\d+) child=(\d+) private=([0-9a-f]+) shared=([0-9a-f]+)/.exec(out)
      if (m) resolve({ pid: Number(m[1]), child: Number(m[2]), private: m[3]!, shared: m[4]!, target })
    })
    target.on("exit", (code) => reject(new Error(`shared_target.py exited ${code} before READY: ${out}`)))
  })

/** The whole mapping of `pid` that starts at `hex` (as /proc/PID/maps has it), for --mapping. */
const mappingAt = (pid: number, hex: string) =>
  readFileSync(`/proc/${pid}/maps`, "utf8").split("\n").find((l) => l.startsWith(`${hex}-`))!.split(" ")[0]!

/** TracerPid of each thread: 0 once vmsnap let go. */
const tracers = (pid: number) => /TracerPid:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]

describe.skipIf(skip)("snapshot --pid of shared memory another process maps", () => {
  it("every mapping: refused, naming each shared mapping (anonymous, memfd, SysV) and the child; no file", async () => {
    const t = await start()
    const path = join(dir, "all.vmsnap")
    const exit = await run(snapshotPid({ pid: t.pid, path }))
    const message = messageOf(exit)
    expect(message).toMatch(new RegExp(`shared memory of pid ${t.pid} is also mapped by other processes`))
    for (const name of ["/dev/zero \\(deleted\\)", "/memfd:shared-target \\(deleted\\)", "/SYSV[0-9a-f]+ \\(deleted\\)"])
      expect(message).toMatch(new RegExp(`mapping 0x[0-9a-f]+-0x[0-9a-f]+ rw-s ${name} is also mapped by pid ${t.child} \\(python3\\)`))
    expect(message).toMatch(/--mapping/)
    expect(existsSync(path)).toBe(false)
    expect(tracers(t.pid)).toBe("0")
    t.target.stdin!.end()
  })

  it("the shared mapping chosen with --mapping: refused too", async () => {
    const t = await start()
    const range = mappingAt(t.pid, t.shared)
    const exit = await run(snapshotPid({ pid: t.pid, path: join(dir, "one.vmsnap"), mappings: [parseMappingSelector(range)] }))
    expect(messageOf(exit)).toMatch(new RegExp(`mapping 0x${t.shared}-0x[0-9a-f]+ rw-s /dev/zero \\(deleted\\) is also mapped by pid ${t.child}`))
    t.target.stdin!.end()
  })

  it("left out with --mapping (only the target's private memory): the snapshot succeeds", async () => {
    const t = await start()
    const path = join(dir, "private.vmsnap")
    const exit = await run(snapshotPid({ pid: t.pid, path, mappings: [parseMappingSelector(mappingAt(t.pid, t.private))] }))
    expect(Exit.isSuccess(exit), messageOf(exit)).toBe(true)
    expect(existsSync(path)).toBe(true)
    t.target.stdin!.end()
  })
})
