/** Test helpers: run Effects in vitest, skip with a printed reason when the kernel lacks a capability. */
import { Cause, Effect, Exit, Layer, type Scope } from "effect"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll } from "vitest"
import { WpNative } from "../src/WpNative.js"
import { run } from "../src/Vmsnap.js"

/** Runs a scoped Effect with the native engine provided; rejects with the typed error. */
export const runTest = <A, E>(effect: Effect.Effect<A, E, WpNative | Scope.Scope>): Promise<A> =>
  Effect.runPromiseExit(Effect.provide(Effect.scoped(effect), WpNative.layer)).then((exit) => {
    if (Exit.isSuccess(exit)) return exit.value
    throw Cause.squash(exit.cause)
  })

/** Why uffd-wp cannot be used here, or undefined when it can. Printed once per file. */
export const uffdUnavailable = async (): Promise<string | undefined> => {
  try {
    const caps = await run(Effect.flatMap(WpNative, (n) => n.probe))
    if (!caps.writeProtectUnpopulated) return "kernel lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)"
    return undefined
  } catch (e) {
    return `userfaultfd unavailable: ${e instanceof Error ? e.message : String(e)}`
  }
}

export const skipReason = async (what: string) => {
  const reason = await uffdUnavailable()
  if (reason) console.warn(`SKIP ${what}: ${reason}`)
  return reason
}

/** A temporary directory removed after the file's tests. */
export const tempDir = (): string => {
  const dir = mkdtempSync(join(tmpdir(), "vmsnap-test-"))
  afterAll(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

export { Layer }
