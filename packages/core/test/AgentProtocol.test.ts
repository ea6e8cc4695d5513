/** The agent protocol's parsing: defaults of optional fields, and what is refused with which words. */
import { describe, expect, it } from "vitest"
import { LineReader, parseBypassWriters, parseClientRequest, parseHello, parseMessage } from "../src/AgentProtocol.js"

const region = { gpa: "0x0", size: 1 << 20, fd: 1, hva: "0x7f0000000000" }
const hello = (extra: Record<string, unknown> = {}, r: Record<string, unknown> = {}) =>
  ({ type: "hello", version: 1, vm: "web-1", regions: [{ ...region, ...r }], ...extra })

describe("parseHello", () => {
  it("fills the documented defaults", () => {
    const h = parseHello(hello(), 2)
    expect(h).toMatchObject({ role: "vmm", uffd: 0, prepare: false, bypassWriters: [] })
    expect(h.regions[0]).toMatchObject({ pageSize: 4096, offset: 0, thp: false, fd: 1, hva: 0x7f0000000000n })
  })

  it("a region may end exactly at 2^64; gpa and hva may be JSON whole numbers (documented)", () => {
    expect(parseHello(hello({}, { gpa: "0xfffffffffff00000", size: 1 << 20 }), 2).regions[0]!.gpa).toBe(0xfffffffffff00000n)
    expect(parseHello(hello({}, { gpa: 4096, hva: 0x7f0000000000 }), 2).regions[0]).toMatchObject({ gpa: 4096n, hva: 0x7f0000000000n })
  })

  it("reads prepare, bypassWriters and thp", () => {
    const h = parseHello(hello({ prepare: true, bypassWriters: ["vfio-pci 0000:01:00.0"] }, { fd: null, thp: true }), 1)
    expect(h.prepare).toBe(true)
    expect(h.bypassWriters).toEqual(["vfio-pci 0000:01:00.0"])
    expect(h.regions[0]).toMatchObject({ fd: null, thp: true })
  })

  it.each([
    [hello({ prepare: "yes" }), 2, /"prepare" must be true or false/],
    [hello({ bypassWriters: "vfio" }), 2, /"bypassWriters" must be an array/],
    [hello({ bypassWriters: [""] }), 2, /"bypassWriters" must be an array/],
    [hello({}, { thp: true }), 2, /only anonymous memory \(no fd\) is rebuilt/],
    [hello({}, { pageSize: 8192, size: 1 << 20 }), 2, /page size 8192: must be 4096, or for hugetlbfs memory 2097152 or 1073741824/],
    [hello({}, { pageSize: 2 << 20, size: 3 << 20 }), 2, /not a whole number of its 2097152-byte pages/],
    [hello({}, { pageSize: 2 << 20, size: 2 << 20, hva: "0x7f0000001000" }), 2, /hva is not a page-aligned address \(2097152-byte pages\)/],
    [hello({}, { hva: "0x7f0000000001" }), 2, /hva is not a page-aligned address/],
    [hello({ uffd: 2 }), 2, /carried 2 fds/],
    [hello(), 0, /without file descriptors/],
    [hello({}, { gpa: "0xfffffffffffff000", size: 4 << 20 }), 2, /passes the end of the 64-bit guest-physical space/],
    [hello({}, { gpa: "0xffffffffffc00000", size: 4 << 20, hva: "0xfffffffffff00000" }), 2, /passes the end of the 64-bit address space/],
    [hello({}, { hva: 1.5 }), 2, /hex string like/]
  ])("refuses %j", (m, fds, pattern) => {
    expect(() => parseHello(m, fds)).toThrow(pattern)
  })
})

describe("requests and framing", () => {
  it("a snapshot request keeps the path as given (it resolves in the agent's output directory)", () => {
    expect(parseClientRequest({ type: "snapshot", vm: "a", path: "sub/x.vmsnap" })).toMatchObject({ path: "sub/x.vmsnap", poolPages: undefined, compression: undefined })
    expect(() => parseClientRequest({ type: "snapshot", vm: "a" })).toThrow(/"path" must name/)
    expect(() => parseClientRequest({ type: "frobnicate" })).toThrow(/unknown message type/)
  })

  it("a number out of range says the range and what came (break8: poolPages 2^60 was \"not a whole number\")", () => {
    expect(() => parseClientRequest({ type: "snapshot", vm: "a", path: "x", poolPages: 2 ** 60 })).toThrow(/"poolPages" must be a whole number from 0 to 2\^53 - 1 \(got 1152921504606847000\)/)
    expect(() => parseClientRequest({ type: "snapshot", vm: "a", path: "x", poolPages: "many" })).toThrow(/\(got string\)/)
  })

  it("bypass-writers lists are bounded", () => {
    expect(parseBypassWriters(["a", "b"])).toEqual(["a", "b"])
    expect(() => parseBypassWriters(Array.from({ length: 65 }, () => "x"))).toThrow(/at most 64/)
  })

  it("lines are split and bounded", () => {
    const r = new LineReader()
    expect(r.push('{"type":"a"}\n{"ty')).toEqual(['{"type":"a"}'])
    expect(r.push('pe":"b"}\n')).toEqual(['{"type":"b"}'])
    expect(() => parseMessage("[1]")).toThrow(/not a JSON object/)
    expect(() => r.push("x".repeat((1 << 20) + 1))).toThrow(/longer than/)
  })
})
