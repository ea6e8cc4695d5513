/**
 * Exit codes, decided here and nowhere else (documented in the README).
 */
import { Cause, Exit } from "effect"

export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  /** The file is not a valid snapshot: corrupt, truncated, or not ours. */
  corrupt: 3,
  /** The kernel or the user's permissions lack what vmsnap needs. */
  unsupported: 4,
  /** Interrupted by SIGINT (128 + 2). */
  interrupted: 130,
  /** Terminated by SIGTERM (128 + 15). */
  terminated: 143
} as const

export const exitCodeOfError = (error: unknown): number => {
  const tag = typeof error === "object" && error !== null && "_tag" in error ? (error as { _tag: string })._tag : undefined
  switch (tag) {
    case "SnapshotFormatError":
      return ExitCode.corrupt
    case "CapabilityError":
      return ExitCode.unsupported
    case "NativeError": {
      const op = (error as { op: string }).op
      const errno = (error as { errno: number }).errno
      return op === "userfaultfd" && (errno === 1 || errno === 13 || errno === 38) ? ExitCode.unsupported : ExitCode.failure
    }
    case "InvalidInput":
      return ExitCode.usage
    default:
      return ExitCode.failure
  }
}

export const isInterrupted = (exit: Exit.Exit<unknown, unknown>): boolean =>
  Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)
