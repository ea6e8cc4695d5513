/**
 * The toy VMM's write patterns, read back from the guest's memory: a guest
 * restored lazily from a snapshot runs with a pattern, then the VMM replays
 * its writes over the image (they must agree page for page) and counts the
 * pages it changed, in and out of the hot set. No timing is asserted.
 */
import { Agent, restoreToRawFile, RestoreServer, WpNative } from "@vmsnap/core"
import { Effect, Exit } from "effect"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
// The end-to-end tests' toy VMM helpers (tests only).
import { scratchDir, startVmm, toyVmmSkipReason } from "../../../test/toyVmmTests.js"

const dir = scratchDir("vmsnap-rig-")
const skip = await toyVmmSkipReason("toy VMM pattern tests")
const snapshotPath = join(dir, "guest.vmsnap")
const imagePath = join(dir, "guest.img")

describe.skipIf(skip)("toy VMM write patterns", () => {
  const socket = join(dir, "serve.sock")
  const server = new RestoreServer(socket, { path: snapshotPath, raw: false }, { log: () => undefined })

  beforeAll(async () => {
    const agentSocket = join(dir, "agent.sock")
    const agent = new Agent(agentSocket)
    await agent.listen()
    const source = startVmm({ memMiB: 16, rate: 0, agent: agentSocket, vm: "source", fillPercent: 75 })
    await source.ready
    const exit = await Effect.runPromiseExit(Effect.provide(agent.snapshot({ vm: "source", path: snapshotPath }), WpNative.layer))
    expect(Exit.isSuccess(exit)).toBe(true)
    await source.stop()
    await agent.close()
    await Effect.runPromise(restoreToRawFile(snapshotPath, imagePath))
    await server.listen()
  })
  afterAll(() => server.close())

  // 2000 writes/s for 500 ms into 3584 pages: few enough that where they land shows.
  it.each([
    ["hot", (share: number) => expect(share).toBeGreaterThan(0.5)],
    ["random", (share: number) => expect(share).toBeLessThan(0.3)]
  ] as const)("%s: the guest's writes land where the pattern says, and the replay agrees", async (pattern, check) => {
    const vmm = startVmm({ memMiB: 16, rate: 2000, pattern, restoreFrom: socket, verifyImage: imagePath, runMs: 500 })
    const report = await vmm.report()
    expect(report.restore?.verifyMismatches).toBe(0)
    const { changedPages, changedHotPages } = report.restore!
    expect(changedPages).toBeGreaterThan(20)
    check(changedHotPages / changedPages)
  })
})
