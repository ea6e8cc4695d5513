/**
 * What a root agent writes for a requester allowed with --allow-uid (break1
 * finding 4): never a file that requester does not own, never in a directory
 * it could not write itself; and what a killed writer left for it is
 * cleaned up (finding 6). The requester is user nobody (a python client
 * under setpriv); the VM is a toy VMM of root.
 */
import { execFile, spawnSync } from "node:child_process"
import { chmodSync, chownSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Agent } from "../packages/core/src/index.js"
import { scratchDir, startVmm, toyVmmSkipReason } from "./toyVmmTests.js"

const NOBODY = 65534
const skip = (await toyVmmSkipReason("the requester file tests")) ?? (process.getuid?.() !== 0 ? "needs root to ask as user nobody" : undefined)
if (skip) console.warn(`SKIP the requester file tests: ${skip}`)
const execFileAsync = promisify(execFile)

/** Asks for a snapshot of `vm` into `path` as user nobody; the agent's last line (result or error). */
const ASK = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((json.dumps({"type": "snapshot", "vm": sys.argv[2], "path": sys.argv[3]}) + "\\n").encode())
data = b""
while True:
    c = s.recv(65536)
    if not c: break
    data += c
print([l for l in data.decode().split("\\n") if l.strip()][-1])
`
const askAsNobody = async (socket: string, vm: string, path: string) => {
  const { stdout } = await execFileAsync("setpriv", [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "/usr/bin/python3", "-c", ASK, socket, vm, path])
  return JSON.parse(stdout) as { type: string; message?: string }
}

describe.skipIf(skip)("an --allow-uid requester", () => {
  const dir = scratchDir("vmsnap-requester-")
  chmodSync(dir, 0o755)
  const out = join(dir, "out")
  const socket = join(dir, "agent.sock")
  // What a SIGKILLed agent left of a file it was writing for nobody (fchowned to nobody), and one of a uid it does not write for.
  const dead = spawnSync("true").pid!
  const forNobody = `.guest.vmsnap.tmp-${dead}-0badc0de`
  const forOther = `.other.vmsnap.tmp-${dead}-0badc0de`
  const agent = new Agent(socket, { outputDir: out, socketMode: 0o666, allowUids: [NOBODY] })
  beforeAll(async () => {
    mkdirSync(out, { mode: 0o755 })
    writeFileSync(join(out, forNobody), "partial")
    writeFileSync(join(out, forOther), "partial")
    if (!skip) {
      chownSync(join(out, forNobody), NOBODY, NOBODY)
      chownSync(join(out, forOther), 4242, 4242)
    }
    await agent.listen()
    startVmm({ memMiB: 4, vcpus: 1, rate: 0, agent: socket, vm: "req" })
    await agent.waitForVm("req", 1)
  })
  afterAll(() => agent.close())

  it("a killed agent's temporary file written for it is removed when the next agent starts (not another uid's)", () => {
    expect(readdirSync(out).filter((n) => n.includes(".tmp-"))).toEqual([forOther])
  })

  it("the next write of a name removes what a killed writer left of that name in a subdirectory", async () => {
    mkdirSync(join(out, "left"), { mode: 0o700 })
    chownSync(join(out, "left"), NOBODY, NOBODY)
    const leftover = join(out, "left", `.guest.vmsnap.tmp-${dead}-0badc0de`)
    writeFileSync(leftover, "partial")
    chownSync(leftover, NOBODY, NOBODY)
    const answer = await askAsNobody(socket, "req", "left/guest.vmsnap")
    expect(answer.type, answer.message).toBe("result")
    expect(readdirSync(join(out, "left"))).toEqual(["guest.vmsnap"])
  })

  it("does not make the agent replace a root-owned 0600 file", async () => {
    writeFileSync(join(out, "rootfile"), "root's\n", { mode: 0o600 })
    const answer = await askAsNobody(socket, "req", "rootfile")
    expect(answer.type, answer.message).toBe("error")
    expect(answer.message).toMatch(/rootfile belongs to uid 0, not to uid 65534 that asked/)
    expect(readFileSync(join(out, "rootfile"), "utf8")).toBe("root's\n")
    expect(statSync(join(out, "rootfile")).uid).toBe(0)
    expect(readdirSync(out).filter((n) => n.includes(".tmp-"))).toEqual([forOther])
  })

  it("does not make the agent create a file in a root 0700 subdirectory, nor under one", async () => {
    mkdirSync(join(out, "private", "open"), { recursive: true, mode: 0o700 })
    chmodSync(join(out, "private", "open"), 0o777)
    for (const [path, why] of [["private/x", /uid 65534 may not create files in private/], ["private/open/x", /uid 65534 may not search private/]] as const) {
      const answer = await askAsNobody(socket, "req", path)
      expect(answer.type, answer.message).toBe("error")
      expect(answer.message).toMatch(why)
    }
    expect(readdirSync(join(out, "private"))).toEqual(["open"])
    expect(readdirSync(join(out, "private", "open"))).toEqual([])
  })

  it("still writes where the requester may: its own directory, replacing its own file", async () => {
    mkdirSync(join(out, "mine"), { mode: 0o700 })
    chownSync(join(out, "mine"), NOBODY, NOBODY)
    for (let i = 0; i < 2; i++) {
      const answer = await askAsNobody(socket, "req", "mine/guest.vmsnap")
      expect(answer.type, answer.message).toBe("result")
    }
    expect(statSync(join(out, "mine", "guest.vmsnap")).uid).toBe(NOBODY)
  })
})
