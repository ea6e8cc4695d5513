/** The OOM killer is kept off vmsnap while it runs a system call inside a --pid target (break7 H1), then put back. */
import { readFileSync } from "node:fs"
import { describe, expect, it } from "vitest"
import { outOfOomReach } from "../../src/internal/oomScore.js"

const score = () => readFileSync("/proc/self/oom_score_adj", "utf8").trim()

describe("outOfOomReach", () => {
  it("sets oom_score_adj to -1000 for the call only, also when it throws", () => {
    if (process.getuid?.() !== 0) return console.warn("SKIP outOfOomReach: lowering oom_score_adj needs root (CAP_SYS_RESOURCE)")
    const before = score()
    expect(outOfOomReach(score)).toBe("-1000")
    expect(score()).toBe(before)
    expect(() => outOfOomReach(() => { throw new Error("injection failed") })).toThrow("injection failed")
    expect(score()).toBe(before)
  })
})
