import { describe, expect, it } from "vitest"
import { formatBytes, memoryKindCode, memoryKindOf, pagesIn, parseSize } from "../src/GuestMemory.js"

describe("GuestMemory", () => {
  it("parses sizes with binary units and refuses malformed or unsafe ones", () => {
    expect(parseSize("1GiB")).toBe(1024 ** 3)
    expect(parseSize("512m")).toBe(512 * 1024 ** 2)
    expect(parseSize("4096")).toBe(4096)
    expect(parseSize("1.5K")).toBe(1536)
    expect(parseSize("12 parsecs")).toBeUndefined()
    expect(parseSize("-1")).toBeUndefined()
    expect(parseSize("99999999T")).toBeUndefined()
  })

  it("pages round up; memory kinds round-trip through their codes", () => {
    expect(pagesIn(1)).toBe(1)
    expect(pagesIn(8192)).toBe(2)
    for (const [kind, code] of Object.entries(memoryKindCode)) expect(memoryKindOf(code)).toBe(kind)
    expect(memoryKindOf(99)).toBeUndefined()
    expect(formatBytes(3 * 1024 ** 2)).toBe("3.00 MiB")
  })
})
