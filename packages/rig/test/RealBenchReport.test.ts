/** The real-software benches' parsing and merging: RESP replies split anywhere, guest windows merged into a phase. */
import { describe, expect, it } from "vitest"
import type { GuestFinal } from "../src/QemuGuest.js"
import { guestPhase, type PlacedWindow } from "../src/RealBenchReport.js"
import { encodeCommand, parseReply, RespError } from "../src/Resp.js"

describe("RESP replies", () => {
  const replies = Buffer.from("+OK\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:7\r\n$2\r\nab\r\n-ERR no such key\r\n")

  it("parses each kind in order, and only once a reply is whole, however the bytes are split", () => {
    for (let cut = 0; cut <= replies.length; cut++) {
      const head = replies.subarray(0, cut)
      const got: Array<unknown> = []
      let at = 0
      for (let r = parseReply(head, at); r; r = at < head.length ? parseReply(head, at) : undefined) {
        got.push(r[0])
        at = r[1]
      }
      const whole = [["OK", 5], ["hello", 16], [null, 21], [["7", "ab"], 37], [new RespError("ERR no such key"), replies.length]] as const
      const expected = whole.filter(([, end]) => end <= cut).map(([v]) => v)
      expect(got, `cut at ${cut}`).toEqual(expected)
    }
  })

  it("encodes a command as an array of bulk strings, counting bytes not characters", () => {
    expect(encodeCommand(["SET", "k", "é"]).toString("utf8")).toBe("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\né\r\n")
  })
})

describe("guest phases", () => {
  // Two windows of 1 s: 1000 writes in buckets 3 (900) and 40 (100), then 10 writes, one of 2 ms.
  const line = (index: number, writes: number, maxNs: number, over1ms: number) => ({ index, guestMs: (index + 1) * 1000, arrivedNs: 0, writes, maxNs, over1ms, stallUs: 0 })
  const windows: Array<PlacedWindow> = [
    { line: line(0, 1000, 500, 0), startNs: 0, endNs: 1e9 },
    { line: line(1, 10, 2_000_000, 1), startNs: 1e9, endNs: 2e9 }
  ]
  const final: GuestFinal = { nsPerCycle: 1, histograms: [new Map([[3, 900], [40, 100]]), new Map([[3, 10]])], stalls: [] }

  it("sums writes and time, takes percentiles from the merged histograms and the exact max", () => {
    const p = guestPhase(windows, final)
    expect(p.writes).toBe(1010)
    expect(p.seconds).toBe(2)
    expect(p.writesPerSecond).toBe(505)
    expect(p.over1ms).toBe(1)
    expect(p.latencyUs.max).toBe(2000)
    // 910 of 1010 writes in bucket 3 (reported as its upper edge, 4 cycles of 1 ns); p99 in bucket 40 (upper edge 2^5 * 1.125 = 36 ns).
    expect(p.latencyUs.p50).toBe(0.004)
    expect(p.latencyUs.p99).toBe(0.036)
  })

  it("an empty phase is zeros, not NaN", () => {
    expect(guestPhase([], final)).toMatchObject({ writes: 0, writesPerSecond: 0, latencyUs: { p50: 0, max: 0 } })
  })
})
