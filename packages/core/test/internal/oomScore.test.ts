/** The OOM killer is kept off vmsnap while it runs a system call inside a --pid target (break7 H1), then put back. */
import { readFileSync, writeFileSync } from "node:fs"
import { describe, expect, it } from "vitest"
import { outOfOomReach } from "../../src/internal/oomScore.js"

const path = "/proc/self/oom_score_adj"
const score = () => readFileSync(path, "utf8").trim()

/** Lowering oom_score_adj needs CAP_SYS_RESOURCE (root in most places, not in every sandbox). */
const canLower = (): boolean => {
  const before = score()
  try {
    writeFileSync(path, String(Number(before) - 1))
    writeFileSync(path, before) // raising it back needs nothing
    return true
  } catch {
    return false
  }
}

describe("outOfOomReach", () => {
  it("leaves oom_score_adj as it was afterwards, also when the call throws, and never fails for want of the right to lower it", () => {
    const before = score()
    expect(() => outOfOomReach(() => { throw new Error("injection failed") })).toThrow("injection failed")
    expect(score()).toBe(before)
    outOfOomReach(score)
    expect(score()).toBe(before)
  })

  it("sets oom_score_adj to -1000 for the call", (ctx) => {
    if (!canLower()) {
      console.warn("SKIP outOfOomReach -1000: this process may not lower oom_score_adj (it lacks CAP_SYS_RESOURCE)")
      return ctx.skip()
    }
    expect(outOfOomReach(score)).toBe("-1000")
  })
})
