/**
 * `vmsnap serve` against what a hostile or careless peer can do to it
 * (break5 findings 1, 3, 7), with the Firecracker-style peer
 * (test/fixtures/firecracker_peer.py) on real userfaultfd memory: a raw
 * image that shrinks while it is served never gives the guest zeros in place
 * of its pages (they get a memory error); a VMM that forks with
 * UFFD_FEATURE_EVENT_FORK leaves no fd in serve (each fork hands the handler
 * the child's uffd); a raw image that is not a whole number of pages is
 * refused before serving; a file's zero record of 2^18 pages (1 GiB) is
 * served without a buffer of its size.
 */
import { Effect } from "effect"
import { copyFileSync, readdirSync, readFileSync, readlinkSync, truncateSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { beforeAll, describe, expect, it } from "vitest"
import { RestoreServer, restoreUffd, startLazyRestore, WpNative } from "../packages/core/src/index.js"
import { scratchMemory } from "../packages/rig/src/index.js"
import { writeSnapshot } from "./snapshotFiles.js"
import { MiB, peer, serving, SIZE, twoRegionSnapshot } from "./lazyRestoreTests.js"
import { scratchDir, toyVmmSkipReason } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-lazy-hostile-")
const snapshotPath = join(dir, "guest.vmsnap")
const imagePath = join(dir, "guest.img")
const skip = await toyVmmSkipReason("lazy restore hostile peer tests")

/** This process's open userfaultfds (serving() runs serve's restorers here). */
const uffds = () =>
  readdirSync("/proc/self/fd").filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === "anon_inode:[userfaultfd]"
    } catch {
      return false
    }
  }).length

describe.skipIf(skip)("serve holds against hostile and careless peers", () => {
  beforeAll(() => twoRegionSnapshot(snapshotPath, imagePath, 31))

  it("a raw image truncated to half after serve opened it: the pages past its new end get a memory error, never zeros; ok false", async () => {
    const shrinking = join(dir, "shrinking.img")
    copyFileSync(imagePath, shrinking)
    const s = await serving(dir, "shrink", shrinking, true)
    try {
      truncateSync(shrinking, SIZE / 2)
      // The peer compares with the untouched image: the second half must fail to read, the first equal it.
      expect(await peer(s.sock, "restore", imagePath, String(SIZE), "page_size", "poison=1", `bad=${SIZE / 2}:${SIZE / 2}`)).toMatch(/^OK /)
      const finished = await s.nextFinished(0)
      expect(finished?.ok).toBe(false)
      expect(finished?.stats.pagesFailed).toBe(SIZE / 2 / 4096)
    } finally {
      await s.server.close()
    }
  })

  it("a VMM that negotiated UFFD_FEATURE_EVENT_FORK and forks 200 times leaves no userfaultfd open in serve", async () => {
    const s = await serving(dir, "fork", snapshotPath)
    try {
      const before = uffds()
      expect(await peer(s.sock, "restore", imagePath, String(4 * MiB), "page_size", "fork=200")).toMatch(/^OK /)
      await s.nextFinished(0)
      expect(uffds()).toBeLessThanOrEqual(before)
    } finally {
      await s.server.close()
    }
  })

  it("a zero record of 2^18 pages (1 GiB) is served as zero pages without a buffer its size (this process's peak RSS grows < 256 MiB)", async () => {
    const GiB = 1024 * MiB
    const path = writeSnapshot(join(dir, "big-zero.vmsnap"), [{ size: GiB }], [{ region: 0, firstPage: 0, pageCount: GiB / 4096, encoding: "zero" }])
    const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"))![1])
    writeFileSync("/proc/self/clear_refs", "5") // the peak RSS starts again from now
    const rss = kib("VmRSS")
    const state = await Effect.runPromise(Effect.provide(Effect.scoped(Effect.gen(function* () {
      const base = yield* scratchMemory(GiB)
      const uffd = yield* restoreUffd(base, GiB)
      const restore = yield* startLazyRestore({ path, raw: false }, uffd, [{ hva: base, size: GiB, imageOffset: 0 }])
      for (let i = 0; i < 3000 && restore.poll() === "serving"; i++) yield* Effect.promise(() => new Promise((r) => setTimeout(r, 5)))
      return restore.poll()
    })), WpNative.layer))
    expect(state).toBe("done")
    expect(kib("VmHWM") - rss, "peak RSS growth in KiB").toBeLessThan(256 * 1024)
  })

  it("a raw image that is not a whole number of 4 KiB pages is refused before serving, with the reason", async () => {
    const odd = join(dir, "odd.img")
    writeFileSync(odd, Buffer.alloc(8 * MiB - 100, 1))
    const server = new RestoreServer(join(dir, "odd.sock"), { path: odd, raw: true })
    await expect(server.listen()).rejects.toThrow(/not a whole number of 4096-byte pages/)
    await server.close().catch(() => undefined)
  })
})
