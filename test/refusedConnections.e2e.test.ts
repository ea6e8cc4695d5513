/**
 * Every connection the agent or `serve` refuses is answered and CLOSED by the
 * server (break1 finding 3: the answer was sent but the socket's fd stayed
 * open, so a peer that may only connect exhausted the root agent's fds).
 * Each kind of refusal is made N times by a python peer; the server runs in
 * this process, so its open fds are /proc/self/fd.
 */
import { execFile } from "node:child_process"
import { chmodSync, readdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { promisify } from "node:util"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Agent, RestoreServer } from "../packages/core/src/index.js"
import { writeSnapshot } from "./snapshotFiles.js"
import { scratchDir } from "./toyVmmTests.js"

const N = 40
const NOBODY = 65534
const notRoot = process.getuid?.() !== 0 ? "needs root to connect as user nobody" : undefined
const execFileAsync = promisify(execFile)
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const openFds = () => readdirSync("/proc/self/fd").length

/**
 * N connections, each: send the body (a file), read the first line of the answer,
 * close. `idle` connections that send nothing stay open meanwhile (to reach
 * a per-uid limit). Prints one JSON list of the first answer lines.
 */
const PEER = `
import json, socket, sys
path, n, idle, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), open(sys.argv[4], "rb").read()
held = [socket.socket(socket.AF_UNIX) for _ in range(idle)]
for h in held: h.connect(path)
answers = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(path)
    try: s.sendall(body)
    except OSError as e: pass  # refused before the whole body was read: the answer is still there
    data = b""
    try:
        while b"\\n" not in data:
            c = s.recv(4096)
            if not c: break
            data += c
    except OSError as e: data = ("peer: " + str(e)).encode()
    answers.append(data.split(b"\\n")[0].decode(errors="replace"))
    s.close()
for h in held: h.close()
print(json.dumps(answers))
`

let bodies = 0
const refusedNTimes = async (socket: string, body: Buffer, opts: { asNobody?: boolean; idle?: number } = {}) => {
  const file = join(dir, `body-${bodies++}`)
  writeFileSync(file, body, { mode: 0o644 })
  const argv = ["-c", PEER, socket, String(N), String(opts.idle ?? 0), file]
  const { stdout } = opts.asNobody
    ? await execFileAsync("setpriv", [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "/usr/bin/python3", ...argv], { maxBuffer: 1 << 24 })
    : await execFileAsync("python3", argv, { maxBuffer: 1 << 24 })
  return JSON.parse(stdout) as Array<string>
}

/** The open fds once the server has closed what it should (it may take a moment: waits up to 10 s, then reports). */
const settledFds = async (baseline: number) => {
  for (let i = 0; i < 200 && openFds() > baseline; i++) await sleep(50)
  return openFds()
}

const dir = scratchDir("vmsnap-refused-")
chmodSync(dir, 0o755) // user nobody reaches the sockets

const twoMiB = Buffer.alloc(2 << 20, "x")
const kinds: Array<[string, Buffer, RegExp]> = [
  ["bad JSON", Buffer.from("nonsense\n"), /JSON/i],
  ["a JSON value that is not an object", Buffer.from("[1]\n"), /object/],
  ["an unknown message type", Buffer.from('{"type":"pwn"}\n'), /pwn/],
  ["a hello without its fds", Buffer.from('{"type":"hello","version":1,"vm":"x","role":"vmm","uffd":0,"regions":[]}\n'), /./],
  ["2 MiB without a newline", twoMiB, /longer than/]
]

describe("the agent closes every connection it refuses", () => {
  const agent = new Agent(join(dir, "agent.sock"), { outputDir: dir, socketMode: 0o666, limits: { pendingPerUid: 4 } })
  beforeAll(() => agent.listen())
  afterAll(() => agent.close())

  for (const [kind, body, answer] of kinds)
    it(`${kind}: ${N} refusals leave the agent's fd count as it was`, async () => {
      const before = openFds()
      const answers = await refusedNTimes(join(dir, "agent.sock"), body)
      expect(answers.every((a) => a.includes('"type":"error"') && answer.test(a)), answers[0]).toBe(true)
      expect(await settledFds(before)).toBe(before)
    })

  it("over the per-uid limit of connections waiting for their first message: the refusals are closed", async () => {
    const before = openFds()
    const answers = await refusedNTimes(join(dir, "agent.sock"), Buffer.from('{"type":"list"}\n'), { idle: 4 })
    expect(answers.every((a) => /too many connections from uid/.test(a)), answers[0]).toBe(true)
    expect(await settledFds(before)).toBe(before)
  })

  it.skipIf(notRoot)("a list from a uid that may not ask: the refusals are closed", async () => {
    const before = openFds()
    const answers = await refusedNTimes(join(dir, "agent.sock"), Buffer.from('{"type":"list"}\n'), { asNobody: true })
    expect(answers.every((a) => /may not ask this agent/.test(a)), answers[0]).toBe(true)
    expect(await settledFds(before)).toBe(before)
  })
  if (notRoot) console.warn(`SKIP the refused-list case: ${notRoot}`)

  it("an answered list is closed too", async () => {
    const before = openFds()
    const answers = await refusedNTimes(join(dir, "agent.sock"), Buffer.from('{"type":"list"}\n'))
    expect(answers.every((a) => a.includes('"type":"vms"')), answers[0]).toBe(true)
    expect(await settledFds(before)).toBe(before)
  })
})

describe("serve closes every VMM it refuses", () => {
  const image = writeSnapshot(join(dir, "image.vmsnap"), [{ size: 1 << 20 }], [{ region: 0, firstPage: 0, pageCount: 256, encoding: "zero" }])
  const server = new RestoreServer(join(dir, "serve.sock"), { path: image, raw: false })
  beforeAll(() => server.listen())
  afterAll(() => server.close())

  const serveKinds: Array<[string, Buffer, RegExp]> = [
    ["a body that is not JSON", Buffer.from("nonsense\n"), /error/],
    ["a body without the userfaultfd", Buffer.from(JSON.stringify([{ base_host_virt_addr: 0x7f0000000000, size: 1 << 20, offset: 0, page_size: 4096 }])), /no file descriptor/],
    ["2 MiB that is never JSON", twoMiB, /longer than/]
  ]
  for (const [kind, body, answer] of serveKinds)
    it(`${kind}: ${N} refusals leave serve's fd count as it was`, async () => {
      const before = openFds()
      const answers = await refusedNTimes(join(dir, "serve.sock"), body)
      expect(answers.every((a) => answer.test(a)), answers[0]).toBe(true)
      expect(await settledFds(before)).toBe(before)
    })
})
