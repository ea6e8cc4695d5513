/**
 * Failure paths: the destination fails mid-snapshot. The guest's writers are
 * never left blocked, protection is removed, nothing remains under the final
 * name (nor a temporary file), and the error says what happened.
 */
import { Cause, Effect, Exit } from "effect"
import { execFileSync } from "node:child_process"
import { existsSync, mkdirSync, readdirSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
// A writing guest from the test rig (tests only: core itself never imports the rig).
import { DemoGuest, Phase } from "../../rig/src/DemoGuest.js"
import { takeSnapshot } from "../src/SnapshotSession.js"
import { runTest, skipReason, tempDir } from "./helpers.js"

const MiB = 1024 * 1024
const unavailable = await skipReason("snapshot failure paths")
const dir = tempDir()

const failureMessage = (exit: Exit.Exit<unknown, unknown>): string => {
  if (Exit.isSuccess(exit)) return "(succeeded)"
  const e = Cause.squash(exit.cause)
  return e instanceof Error ? e.message : String(e)
}

/** Mount a small tmpfs, or say why not. */
const smallTmpfs = (): { path: string } | { skip: string } => {
  const path = join(dir, "small")
  mkdirSync(path)
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=4m", "vmsnap-test", path], { stdio: "pipe" })
    return { path }
  } catch (e) {
    return { skip: `cannot mount a small tmpfs (needs root): ${String(e).split("\n")[0]}` }
  }
}

/** Fails the snapshot into `path`, then checks the writers still make progress. */
const failingSnapshot = (path: string) =>
  Effect.gen(function* () {
    const guest = yield* DemoGuest.make(64 * MiB, "anon")
    guest.fill(0, guest.pages, 3)
    guest.start(2, 0)
    guest.setPhase(Phase.during)
    const exit = yield* Effect.exit(takeSnapshot({ regions: [guest.region], path, poolPages: 256, freeze: guest.freeze, thaw: guest.thaw }))
    // After the failure: every writer keeps writing, none waits more than briefly.
    guest.setPhase(Phase.after)
    yield* Effect.sleep(200)
    const after = guest.latency(Phase.after)
    guest.stop()
    return { exit, after }
  })

describe.skipIf(unavailable)("destination failures", () => {
  it("ENOSPC on a small tmpfs: error names it, guest keeps running, nothing left behind", async () => {
    const fs = smallTmpfs()
    if ("skip" in fs) {
      console.warn(`SKIP ENOSPC test: ${fs.skip}`)
      return
    }
    try {
      const target = join(fs.path, "snap.vmsnap")
      const { exit, after } = await runTest(failingSnapshot(target))
      expect(Exit.isFailure(exit)).toBe(true)
      expect(failureMessage(exit)).toMatch(/no space left on the device/)
      expect(after.writes).toBeGreaterThan(1000)
      expect(after.max).toBeLessThan(100_000) // us: nobody stayed blocked
      expect(existsSync(target)).toBe(false)
      expect(readdirSync(fs.path)).toEqual([])
    } finally {
      execFileSync("umount", ["-l", fs.path])
    }
  })

  it("output in a missing directory or a directory as output: clear error, guest untouched", async () => {
    for (const [path, pattern] of [
      [join(dir, "no-such-dir", "snap.vmsnap"), /no such file or directory/],
      [dir, /is a directory/]
    ] as const) {
      const { exit, after } = await runTest(failingSnapshot(path))
      expect(Exit.isFailure(exit)).toBe(true)
      expect(failureMessage(exit)).toMatch(pattern)
      expect(after.writes).toBeGreaterThan(1000)
    }
    expect(readdirSync(dir).filter((n) => n.includes(".tmp-"))).toEqual([])
  })
})
