/**
 * What the end-to-end tests with the toy VMM share: why they must skip (said
 * once, printed), a scratch directory (in RAM when it can be) removed at the
 * end, and toy VMMs that are killed when the file ends, whatever failed.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll } from "vitest"
import { Vmsnap } from "../packages/core/src/index.js"
import { ToyVmm, toyVmmPath } from "../packages/rig/src/index.js"

/** Why these tests cannot run here (printed as SKIP), or undefined. */
export const toyVmmSkipReason = async (what: string): Promise<string | undefined> => {
  let reason: string | undefined
  try {
    await Vmsnap.probe()
    if (!existsSync(toyVmmPath())) reason = `the toy VMM is not built (${toyVmmPath()})`
  } catch (e) {
    reason = `userfaultfd unavailable: ${(e as Error).message}`
  }
  if (reason) console.warn(`SKIP ${what}: ${reason}`)
  return reason
}

export const scratchDir = (prefix: string): string => {
  const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), prefix))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

const started: Array<ToyVmm> = []
afterAll(() => started.forEach((v) => v.child.exitCode === null && v.child.kill("SIGKILL")))

/** A toy VMM killed (if still running) when the test file ends. */
export const startVmm = (options: ConstructorParameters<typeof ToyVmm>[0]): ToyVmm => {
  const vmm = new ToyVmm(options)
  started.push(vmm)
  return vmm
}

/**
 * The guest's writes (a VMM started with `progressMs`) made in the next
 * while: returns as soon as it has made more than `atLeast`, or after 10 s
 * (a loaded machine slows the guest, it does not stop it).
 */
export const guestWritesOn = async (vmm: ToyVmm, pid: number, atLeast = 1000): Promise<number> => {
  const before = vmm.progress.get(pid) ?? 0
  let after = before
  for (let i = 0; i < 200 && after - before <= atLeast; i++) {
    await new Promise((r) => setTimeout(r, 50))
    after = vmm.progress.get(pid) ?? 0
  }
  return after - before
}
