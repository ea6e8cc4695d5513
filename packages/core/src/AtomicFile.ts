/**
 * An output file that appears under its final name only when complete: it is
 * written as `.NAME.tmp-PID-RANDOM` in the same directory, then fsynced,
 * renamed and the directory fsynced (`commit`). Released uncommitted (error,
 * interruption), the temporary file is deleted: nothing partial is left.
 */
import { Effect } from "effect"
import { randomUUID } from "node:crypto"
import { constants as fsConstants } from "node:fs"
import { open, rename, stat, unlink, type FileHandle } from "node:fs/promises"
import { basename, dirname, join } from "node:path"
import { ioError, type SnapshotIoError } from "./Errors.js"

export interface AtomicFile {
  readonly path: string
  readonly file: FileHandle
  /** Makes the file durable under its final name. */
  readonly commit: Effect.Effect<void, SnapshotIoError>
}

export const atomicFile = (path: string, mode: "write" | "read-write" = "write") =>
  Effect.acquireRelease(
    Effect.gen(function* () {
      const existing = yield* Effect.promise(() => stat(path).catch(() => undefined))
      if (existing?.isDirectory())
        return yield* Effect.fail(ioError(path, "create", Object.assign(new Error("is a directory"), { code: "EISDIR" })))
      const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`)
      const access = mode === "write" ? fsConstants.O_WRONLY : fsConstants.O_RDWR
      const file = yield* Effect.tryPromise({
        try: () => open(tmp, fsConstants.O_CREAT | fsConstants.O_EXCL | access, 0o644),
        catch: (e) => ioError(path, "create", e)
      })
      const state = { committed: false }
      const commit = Effect.tryPromise({
        try: async () => {
          await file.sync()
          await rename(tmp, path)
          state.committed = true
          const dir = await open(dirname(path), fsConstants.O_RDONLY)
          await dir.sync().finally(() => dir.close())
        },
        catch: (e) => ioError(path, "commit", e)
      })
      return { output: { path, file, commit } satisfies AtomicFile, tmp, state }
    }),
    ({ output, tmp, state }) =>
      Effect.promise(async () => {
        await output.file.close().catch(() => undefined)
        if (!state.committed) await unlink(tmp).catch(() => undefined)
      })
  ).pipe(Effect.map(({ output }) => output))
