/**
 * Runs one command's Effect at the CLI edge: SIGINT/SIGTERM interrupt it (so
 * finalizers unprotect memory and remove partial files), failures become one
 * clear line (a stack trace only with --verbose) and an exit code.
 */
import { WpNative } from "@vmsnap/core"
import { Cause, Effect, Exit } from "effect"
import { takeEarlySignal } from "./EarlySignals.js"
import { ExitCode, exitCodeOfError, isInterrupted } from "./ExitCode.js"
import type { Io } from "./Io.js"

export interface CommonFlags {
  readonly json: boolean
  readonly verbose: boolean
}

export interface Rendered {
  /** Lines for people (stderr). */
  readonly human: string
  /** The --json object (stdout). */
  readonly json: Record<string, unknown>
  /** Exit code on success (default 0). */
  readonly exitCode?: number
}

/** Says that a signal stopped the command (one line, or --json's object) and returns its exit code. */
const reportStopped = (io: Io, flags: CommonFlags, code: number, stopped: string): number => {
  const what = code === ExitCode.terminated ? "terminated" : "interrupted"
  if (flags.json) io.stdout(JSON.stringify({ ok: false, error: { tag: "Interrupted", message: what, stopped }, exitCode: code }) + "\n")
  else io.stderr(`vmsnap: ${what}: ${stopped}\n`)
  return code
}

const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e))

export const runCommand = async <A, E>(
  io: Io,
  flags: CommonFlags,
  effect: Effect.Effect<A, E, WpNative>,
  render: (a: A) => Rendered,
  /**
   * What stopping on SIGINT/SIGTERM did, for the line that says so (after
   * the finalizers ran). Default: what a snapshot's stop does (protection
   * removed, partial output deleted).
   */
  stopped: () => string = () => "protection removed, partial output deleted"
): Promise<number> => {
  // A signal while vmsnap was still loading (EarlySignals.ts): nothing has been done yet.
  const early = takeEarlySignal()
  if (early) return reportStopped(io, flags, early === "SIGTERM" ? ExitCode.terminated : ExitCode.interrupted, "stopped before it began: nothing was done")
  const controller = new AbortController()
  let signalCode: number = ExitCode.interrupted
  const onSigint = () => {
    signalCode = ExitCode.interrupted
    controller.abort()
  }
  const onSigterm = () => {
    signalCode = ExitCode.terminated
    controller.abort()
  }
  process.on("SIGINT", onSigint)
  process.on("SIGTERM", onSigterm)
  let exit: Exit.Exit<A, E>
  try {
    exit = await Effect.runPromiseExit(Effect.provide(effect, WpNative.layer), { signal: controller.signal })
  } finally {
    process.off("SIGINT", onSigint)
    process.off("SIGTERM", onSigterm)
  }
  if (Exit.isSuccess(exit)) {
    const out = render(exit.value)
    if (flags.json) io.stdout(JSON.stringify(out.json) + "\n")
    else io.stderr(out.human.endsWith("\n") ? out.human : out.human + "\n")
    return out.exitCode ?? ExitCode.ok
  }
  if (isInterrupted(exit)) return reportStopped(io, flags, signalCode, stopped())
  const error = Cause.squash(exit.cause)
  const code = exitCodeOfError(error)
  const tag = typeof error === "object" && error !== null && "_tag" in error ? String((error as { _tag: unknown })._tag) : "Defect"
  if (flags.json) io.stdout(JSON.stringify({ ok: false, error: { tag, message: messageOf(error) }, exitCode: code }) + "\n")
  else io.stderr(`vmsnap: error: ${messageOf(error)}\n`)
  if (flags.verbose) io.stderr(`${Cause.pretty(exit.cause)}\n`)
  return code
}
