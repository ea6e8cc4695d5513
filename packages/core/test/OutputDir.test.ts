/** The agent's output directory: what a requested path may name. */
import { closeSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { OutputDir } from "../src/OutputDir.js"

const base = mkdtempSync(join(tmpdir(), "vmsnap-outputdir-"))
const root = join(base, "out")
mkdirSync(join(root, "sub", "deeper"), { recursive: true })
symlinkSync(base, join(root, "up"))
symlinkSync(join(root, "sub"), join(root, "sub-link"))
const output = new OutputDir(root)
afterAll(() => {
  output.close()
  rmSync(base, { recursive: true, force: true })
})

describe("OutputDir.resolve", () => {
  it.each([
    ["a.vmsnap", `${root}/a.vmsnap`],
    ["./sub/deeper/b.vmsnap", `${root}/sub/deeper/b.vmsnap`],
    [`${root}/sub/c.vmsnap`, `${root}/sub/c.vmsnap`]
  ])("%s resolves inside", (requested, path) => {
    const at = output.resolve(requested)
    closeSync(at.dirFd)
    expect(at.path).toBe(path)
  })

  it.each([
    ["../a.vmsnap", /"\.\." is not allowed/],
    ["sub/../../a.vmsnap", /"\.\." is not allowed/],
    [join(base, "a.vmsnap"), /outside the output directory/],
    [`${root}-other/a.vmsnap`, /outside the output directory/],
    ["/etc/shadow", /outside the output directory/],
    ["up/a.vmsnap", /up is a symbolic link/],
    ["sub-link/a.vmsnap", /sub-link is a symbolic link/],
    ["missing/a.vmsnap", /missing does not exist/],
    ["sub/", /names no file/],
    ["", /not a usable path/],
    ["\n", /control characters/],
    ["sub/a\x1b[31m.vmsnap", /control characters/],
    ["a\tb.vmsnap", /control characters/]
  ])("%s is refused", (requested, pattern) => {
    expect(() => output.resolve(requested)).toThrow(pattern)
  })
})
