/** Per-thread CPU accounting of `vmsnap bench` (ThreadCpu.ts), against this process's own threads. */
import { describe, expect, it } from "vitest"
import { cpus } from "node:os"
import { ThreadCpuSampler } from "../src/ThreadCpu.js"

describe("ThreadCpuSampler", () => {
  it("counts the CPU this process's main thread burns inside a window, and never more than the window", async () => {
    const cpu = new ThreadCpuSampler(() => [process.pid])
    await new Promise((r) => setTimeout(r, 60))
    const from = Number(process.hrtime.bigint())
    let x = 0
    const until = Date.now() + 300
    while (Date.now() < until) x += Math.sqrt(x + 1)
    const to = Number(process.hrtime.bigint())
    await new Promise((r) => setTimeout(r, 60))
    cpu.stop()
    const used = cpu.between(from, to)
    expect(x).toBeGreaterThan(0)
    expect(used["node main"]).toBeGreaterThan(0)
    expect(used["node main"]!).toBeLessThanOrEqual(used["window ms"]!)
    // The window is the samples around [from, to]: at least as long as the busy loop.
    expect(used["window ms"]!).toBeGreaterThanOrEqual((to - from) / 1e6 - 1)
    // The whole machine was busy at least while this thread was (USER_HZ ticks: 10 ms steps), and
    // at most every CPU for the whole window.
    expect(used["all CPUs busy"]!).toBeGreaterThanOrEqual(used["node main"]! - 20)
    expect(used["all CPUs busy"]!).toBeLessThanOrEqual(used["window ms"]! * cpus().length + 20)
  })
})
