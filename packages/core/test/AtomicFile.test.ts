/**
 * Output files: created 0600 (not through the umask), never replacing what
 * is not a regular file, nothing partial left behind; and stale temporary
 * files of a killed writer removed, only those.
 */
import { Effect, Exit } from "effect"
import { execFileSync, spawnSync } from "node:child_process"
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { atomicFile, removeStaleTempFiles } from "../src/AtomicFile.js"

const dir = mkdtempSync(join(tmpdir(), "vmsnap-atomicfile-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const write = (path: string, options?: Parameters<typeof atomicFile>[1]) =>
  Effect.runPromiseExit(
    Effect.scoped(
      Effect.gen(function* () {
        const out = yield* atomicFile(path, options)
        yield* Effect.promise(() => out.file.write("data"))
        yield* out.commit
      })
    )
  )

describe("atomicFile", () => {
  it("creates 0600 whatever the umask, or the mode asked", async () => {
    const old = process.umask(0)
    try {
      expect(Exit.isSuccess(await write(join(dir, "a.out")))).toBe(true)
      expect(statSync(join(dir, "a.out")).mode & 0o777).toBe(0o600)
      expect(Exit.isSuccess(await write(join(dir, "b.out"), { mode: 0o640 }))).toBe(true)
      expect(statSync(join(dir, "b.out")).mode & 0o777).toBe(0o640)
    } finally {
      process.umask(old)
    }
  })

  it("a temporary file replaced by someone else while written is not committed nor reported saved (break7 M2)", async () => {
    const sub = mkdtempSync(join(dir, "tamper-"))
    const path = join(sub, "t.out")
    const exit = await Effect.runPromiseExit(
      Effect.scoped(
        Effect.gen(function* () {
          const out = yield* atomicFile(path)
          yield* Effect.promise(() => out.file.write("data"))
          // Another writer of the directory swaps the temporary name for its own file.
          const tmp = readdirSync(sub).find((n) => n.includes(".tmp-"))!
          rmSync(join(sub, tmp))
          writeFileSync(join(sub, tmp), "forged")
          yield* out.commit
        })
      )
    )
    expect(Exit.isFailure(exit)).toBe(true)
    expect(String(Exit.isFailure(exit) && exit.cause)).toMatch(/replaced or moved by someone else before it was complete/)
    expect(existsSync(path)).toBe(false)
  })

  it("replaces a regular file", async () => {
    writeFileSync(join(dir, "c.out"), "old")
    expect(Exit.isSuccess(await write(join(dir, "c.out")))).toBe(true)
    expect(readFileSync(join(dir, "c.out"), "utf8")).toBe("data")
  })

  it.each([
    ["a FIFO", (p: string) => execFileSync("mkfifo", [p]), /is a FIFO: only a regular file \(or nothing\) is replaced/],
    ["a symbolic link", (p: string) => symlinkSync(join(dir, "target"), p), /is a symbolic link/],
    ["a device node", (p: string) => execFileSync("mknod", [p, "c", "1", "3"]), /is a character device/]
  ])("refuses %s, leaves it, and leaves no temporary file", async (what, make, pattern) => {
    if (what === "a device node" && process.getuid?.() !== 0) return console.warn("SKIP the device-node case: mknod needs root")
    const path = join(dir, `x-${what.replace(/\W/g, "")}`)
    make(path)
    const exit = await write(path)
    expect(Exit.isFailure(exit)).toBe(true)
    expect(String(Exit.isFailure(exit) && exit.cause)).toMatch(pattern)
    expect(existsSync(join(dir, "target"))).toBe(false)
    expect(readdirSync(dir).filter((n) => n.includes(".tmp-"))).toEqual([])
  })
})

describe("removeStaleTempFiles", () => {
  it("the next write of a name removes that name's temporary files a killed writer left (writer gone, same owner), only those", async () => {
    const sub = mkdtempSync(join(dir, "next-"))
    const dead = spawnSync("true").pid!
    const names = {
      killed: `.snap.vmsnap.tmp-${dead}-0123abcd`,
      running: `.snap.vmsnap.tmp-${process.pid === 1 ? 2 : 1}-0123abcd`,
      otherName: `.other.vmsnap.tmp-${dead}-0123abcd`
    }
    for (const n of Object.values(names)) writeFileSync(join(sub, n), "partial")
    expect(Exit.isSuccess(await write(join(sub, "snap.vmsnap")))).toBe(true)
    expect(readdirSync(sub).sort()).toEqual([names.running, names.otherName, "snap.vmsnap"].sort())
  })


  it("removes only this module's temporary files whose writer is gone and that this uid owns", () => {
    const sub = mkdtempSync(join(dir, "stale-"))
    const dead = spawnSync("true").pid!
    const names = {
      stale: `.snap.vmsnap.tmp-${dead}-0123abcd`,
      running: `.snap.vmsnap.tmp-${process.pid}-0123abcd`,
      alien: `.snap.vmsnap.tmp-${dead}-0123abcd.bak`,
      plain: "snap.vmsnap"
    }
    for (const n of Object.values(names)) writeFileSync(join(sub, n), "x")
    const fd = openSync(sub, "r")
    try {
      expect(removeStaleTempFiles(fd)).toEqual([names.stale])
    } finally {
      closeSync(fd)
    }
    expect(readdirSync(sub).sort()).toEqual([names.running, names.alien, names.plain].sort())
  })
})
