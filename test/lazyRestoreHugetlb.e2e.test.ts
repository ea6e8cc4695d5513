/**
 * Lazy restore into hugetlbfs guests at their page size (issue 10 item 6),
 * with the Firecracker-style peer (test/fixtures/firecracker_peer.py) on
 * real userfaultfd memory and huge pages the test reserves itself
 * (test/hugePages.ts; it skips, saying why, when they cannot be had):
 * anonymous MAP_HUGETLB memory and a hugetlbfs memfd, each 2 MiB page
 * assembled from the snapshot's 512 small pages (records of any layout,
 * ranges at offsets that are not huge-page aligned) and installed whole; a
 * corrupt record poisons the huge pages that hold it, never anything else;
 * a discarded huge page reads zero; a hugetlb guest that declares 4 KiB
 * pages, or 4 KiB memory that declares 2 MiB, is refused with the reason.
 */
import { Effect } from "effect"
import { execFileSync } from "node:child_process"
import { mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { beforeAll, describe, expect, it, type TestContext } from "vitest"
import { concatOffsets, openSnapshot, PAGE_SIZE, restoreToRawFile, takeSnapshot, WpNative } from "../packages/core/src/index.js"
import { DemoGuest } from "../packages/rig/src/index.js"
import { withHugePages } from "./hugePages.js"
import { MiB, peer, serving, SIZE, twoRegionSnapshot } from "./lazyRestoreTests.js"
import { scratchDir, toyVmmSkipReason } from "./toyVmmTests.js"

const dir = scratchDir("vmsnap-lazy-hugetlb-")
const HUGE = 2 * MiB
const snapshotPath = join(dir, "guest.vmsnap")
const imagePath = join(dir, "guest.img")
const skip = await toyVmmSkipReason("lazy restore hugetlbfs tests")

/** Runs body with `pages` more 2 MiB pages reserved, or skips the test saying why. */
const withHuge = async (ctx: TestContext, pages: number, body: () => Promise<void>) => {
  const why = await withHugePages(pages, body)
  if (why) {
    console.warn(`SKIP ${ctx.task.name}: ${why}`)
    ctx.skip()
  }
}

describe.skipIf(skip)("lazy restore into hugetlbfs guests at 2 MiB pages", () => {
  let main: Awaited<ReturnType<typeof serving>>

  beforeAll(async () => {
    // A 4 KiB-page snapshot in two regions (split at 8 MiB); small records of every encoding, not aligned to huge pages.
    await twoRegionSnapshot(snapshotPath, imagePath, 17)
    main = await serving(dir, "main", snapshotPath)
    return () => main.server.close()
  })

  it("anonymous MAP_HUGETLB memory: every huge page equals the image (assembled from 512 small pages, one install each)", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE + 1, async () => {
      const before = main.events.finished.length
      expect(await peer(main.sock, "restore", imagePath, String(4 * MiB), "page_size", "hugetlb=1", `pagesize=${HUGE}`)).toMatch(/^OK /)
      expect(await main.nextFinished(before)).toMatchObject({ ok: true, stats: { pagesTotal: SIZE / PAGE_SIZE, pagesGone: 0, pagesFailed: 0 } })
    })
  })

  it("a hugetlbfs memfd (shared, MISSING | MINOR): every huge page equals the image", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE + 1, async () => {
      expect(await peer(main.sock, "restore", imagePath, String(8 * MiB), "page_size", "hugetlb=1", "memfd=1", `pagesize=${HUGE}`)).toMatch(/^OK /)
    })
  })

  it("ranges at image offsets that are not huge-page aligned (3 pages in): assembled across records", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE, async () => {
      expect(await peer(main.sock, "restore", imagePath, String(2 * MiB), "page_size", "hugetlb=1", `pagesize=${HUGE}`, `shift=${3 * PAGE_SIZE}`)).toMatch(/^OK /)
    })
  })

  it("a huge page the guest discards (MADV_DONTNEED) reads zero afterwards", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE + 1, async () => {
      expect(await peer(main.sock, "restore", imagePath, String(SIZE), "page_size", "hugetlb=1", `pagesize=${HUGE}`, "discard", String(4 * MiB), String(HUGE))).toMatch(/^OK /)
    })
  })

  it("a corrupt record: the huge pages holding it are poisoned (the guest reads an error), every other page is served", async (ctx) => {
    // Flip a byte of the block table of a data record (encoding 3) in the middle of the image: the whole record fails.
    const { entry, imageOffset } = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const s = yield* openSnapshot(snapshotPath)
      const bytes = readFileSync(snapshotPath)
      const data = s.index.filter((e) => bytes[e.fileOffset + 20] === 3 && e.pageCount >= 2)
      const e = data[Math.floor(data.length / 2)]!
      return { entry: e, imageOffset: concatOffsets(s.header.regions)[e.region]! + e.firstPage * PAGE_SIZE }
    })))
    const bytes = readFileSync(snapshotPath)
    bytes[entry.fileOffset + 32 + 8 + 5]! ^= 0x40
    const bad = join(dir, "bad.vmsnap")
    writeFileSync(bad, bytes)
    const lo = Math.floor(imageOffset / HUGE) * HUGE
    const hi = Math.ceil((imageOffset + entry.pageCount * PAGE_SIZE) / HUGE) * HUGE
    const s = await serving(dir, "bad", bad)
    try {
      await withHuge(ctx, SIZE / HUGE + 1, async () => {
        expect(await peer(s.sock, "restore", imagePath, String(SIZE), "page_size", "hugetlb=1", `pagesize=${HUGE}`, "poison=1", `bad=${lo}:${hi - lo}`)).toMatch(/^OK /)
        const last = s.events.failures.at(-1)
        expect(last?.failedRecord?.fileOffset).toBe(entry.fileOffset)
        expect(last?.pagesFailed).toBe((hi - lo) / PAGE_SIZE)
        expect(last?.pagesPoisoned).toBe((hi - lo) / PAGE_SIZE)
      })
    } finally {
      await s.server.close()
    }
  })

  it("huge pages running out (a hugetlbfs mount's size= quota): the pages that cannot be installed get a memory error, reported; the others are served", async (ctx) => {
    const mount = join(dir, "hfs")
    mkdirSync(mount, { recursive: true })
    try {
      execFileSync("mount", ["-t", "hugetlbfs", "-o", `size=${4 * MiB},pagesize=2M,mode=0700`, "none", mount], { stdio: "pipe" })
    } catch (e) {
      console.warn(`SKIP ${ctx.task.name}: cannot mount hugetlbfs with a size= quota (${String((e as Error).message).trim()}; needs root)`)
      return ctx.skip()
    }
    try {
      await withHuge(ctx, SIZE / HUGE + 1, async () => {
        const before = main.events.finished.length
        // The mount holds 2 huge pages: pages are installed in image order, so the first 4 MiB are served and the rest cannot be.
        const out = await peer(main.sock, "restore", imagePath, String(8 * MiB), "page_size", "hugetlb=1", "memfd=1", `hugetlbfs=${mount}`, `pagesize=${HUGE}`, "poison=1", `bad=${4 * MiB}:${SIZE - 4 * MiB}`)
        expect(out).toMatch(/^OK /)
        const finished = await main.nextFinished(before)
        expect(finished).toMatchObject({ ok: false, stats: { pagesUnallocated: (SIZE - 4 * MiB) / PAGE_SIZE, pagesPoisoned: (SIZE - 4 * MiB) / PAGE_SIZE } })
        expect(finished?.error).toMatch(/no huge page could be allocated/)
      })
    } finally {
      execFileSync("umount", [mount])
    }
  })

  it("a snapshot of a hugetlbfs guest (2 MiB-page region) is served into a hugetlbfs guest and into 4 KiB memory alike", async (ctx) => {
    await withHuge(ctx, 2 * (SIZE / HUGE) + 1, async () => {
      const path = join(dir, "hugetlb-guest.vmsnap")
      const image = join(dir, "hugetlb-guest.img")
      await Effect.runPromise(Effect.provide(Effect.scoped(Effect.gen(function* () {
        const guest = yield* DemoGuest.make(SIZE, "hugetlbfs")
        guest.fill(0, guest.pages / 2, 23)
        // Declared as memfd memory with 4 KiB pages: the session finds the huge pages itself.
        yield* takeSnapshot({ regions: [{ ...guest.region, kind: "memfd", pageSize: PAGE_SIZE }], path, poolPages: 64 })
      })), WpNative.layer))
      const inspected = await Effect.runPromise(Effect.scoped(Effect.map(openSnapshot(path), (s) => s.header.regions[0]!)))
      expect(inspected).toMatchObject({ kind: "hugetlbfs", pageSize: HUGE })
      await Effect.runPromise(restoreToRawFile(path, image))
      const s = await serving(dir, "hugetlb-guest", path)
      try {
        expect(await peer(s.sock, "restore", image, String(8 * MiB), "page_size", "hugetlb=1", `pagesize=${HUGE}`)).toMatch(/^OK /)
        expect(await peer(s.sock, "restore", image, String(8 * MiB), "page_size")).toMatch(/^OK /)
      } finally {
        await s.server.close()
      }
    })
  })

  it("a registered huge page that no range declares: its fault gets a memory error (a 2 MiB poison), never zero or blocked", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE + 1, async () => {
      const before = main.events.finished.length
      const out = await peer(main.sock, "restore", imagePath, String(4 * MiB), "page_size", "hugetlb=1", `pagesize=${HUGE}`, `gap=${4 * MiB}:${HUGE}`)
      expect(out).toMatch(/^OK [^]*\ngap: EFAULT$/)
      const finished = await main.nextFinished(before)
      expect(finished).toMatchObject({ ok: false, stats: { faultsOutside: 1, outsidePoisoned: 1 } })
    })
  })

  it("4 KiB memory that declares 2 MiB pages is refused with the reason", async () => {
    const answer = JSON.parse(await peer(main.sock, "restore", imagePath, String(4 * MiB), "page_size", `pagesize=${HUGE}`, "refused=1"))
    expect(answer.error).toMatch(/is backed by 4 KiB pages but declares 2097152-byte pages/)
  })

  it("a hugetlbfs memfd that declares 4 KiB pages is refused with the reason", async (ctx) => {
    await withHuge(ctx, SIZE / HUGE + 1, async () => {
      const answer = JSON.parse(await peer(main.sock, "restore", imagePath, String(4 * MiB), "page_size", "hugetlb=1", "memfd=1", "refused=1"))
      expect(answer.error).toMatch(/is backed by 2048 KiB pages \(hugetlbfs\) but declares 4096-byte pages/)
    })
  })
})
