/**
 * The Promise API: the same operations as the Effect modules, for callers
 * that do not use Effect. Failures reject with the tagged error (NativeError,
 * CapabilityError, SnapshotFormatError, SnapshotIoError, InvalidInput).
 */
import { Cause, Effect, Exit } from "effect"
import { inspectSnapshot, verifySnapshot } from "./SnapshotReader.js"
import { restoreToMemory, restoreToRawFile, type MemoryTarget, type RawLayout } from "./SnapshotRestore.js"
import { takeSnapshot, type SnapshotOptions } from "./SnapshotSession.js"
import { WpNative } from "./WpNative.js"

/** Runs an effect; rejects with its typed failure (not a FiberFailure wrapper). */
export const run = async <A, E>(effect: Effect.Effect<A, E, WpNative>, signal?: AbortSignal): Promise<A> => {
  const exit = await Effect.runPromiseExit(Effect.provide(effect, WpNative.layer), { signal })
  if (Exit.isSuccess(exit)) return exit.value
  throw Cause.squash(exit.cause)
}

export const snapshot = (options: SnapshotOptions, signal?: AbortSignal) => run(takeSnapshot(options), signal)
export const verify = (path: string) => run(verifySnapshot(path))
export const inspect = (path: string) => run(inspectSnapshot(path))
export const restore = (path: string, target: MemoryTarget) => run(restoreToMemory(path, target))
export const restoreRaw = (path: string, output: string, layout?: RawLayout) => run(restoreToRawFile(path, output, layout))
export const probe = () => run(Effect.flatMap(WpNative, (n) => n.probe))
