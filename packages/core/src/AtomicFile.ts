/**
 * An output file that appears under its final name only when complete: it is
 * written as `.NAME.tmp-PID-RANDOM` in the same directory, then fsynced,
 * renamed and the directory fsynced (`commit`). Released uncommitted (error,
 * interruption), the temporary file is deleted: nothing partial is left.
 * A writer killed with SIGKILL cannot delete it: the next write of the same
 * name in that directory removes the temporary files of that name whose
 * writer is gone and whose owner is the new file's (removeStaleTempFiles).
 *
 * It never follows or replaces what the path does not own: the directory is
 * opened once and everything happens in that directory through its fd
 * (`/proc/self/fd/N/NAME`, openat-style); the temporary file is created with
 * O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 (or `mode`); the final name is
 * replaced only if it is a regular file or nothing (a device node, a FIFO, a
 * socket, a symbolic link or a directory there is an error, checked before
 * writing and again right before the rename); when the file is written for
 * another `owner` than root, only a regular file that owner owns is replaced.
 *
 * The path "-" is standard output (a pipe to ssh, zstd or an uploader, or a
 * redirection): written in order as it comes, for formats written strictly
 * front to back (a snapshot is; a positional write out of order fails). A
 * stream cannot be withdrawn: a failure leaves the reader a stream without
 * its trailer, which every reader rejects as truncated.
 */
import { Effect } from "effect"
import { randomUUID } from "node:crypto"
import { closeSync, constants as fsConstants, fsync, lstatSync, openSync, readdirSync, readFileSync, type Stats, unlinkSync, writev } from "node:fs"
import { lstat, open, rename, unlink, type FileHandle } from "node:fs/promises"
import { basename, dirname } from "node:path"
import { isatty } from "node:tty"
import { promisify } from "node:util"
import { ioError, SnapshotIoError } from "./Errors.js"

export interface AtomicFile {
  readonly path: string
  readonly file: FileHandle
  /** Makes the file durable under its final name. */
  readonly commit: Effect.Effect<void, SnapshotIoError>
  /**
   * For a native writer (vmsnap_writer.h): the descriptor, and whether it is
   * a stream (standard output: written in order, no positions).
   */
  readonly native: {
    readonly fd: number
    readonly stream: boolean
    /** Bytes the native writer wrote through fd, so later in-order writes here know where the stream is. */
    readonly wrote: (bytes: number) => void
  }
}

export interface AtomicFileOptions {
  readonly access?: "write" | "read-write"
  /** File mode, applied exactly (not through the umask). Default 0o600. */
  readonly mode?: number
  /** Owner of the new file (the agent writes files for the uid that asked); unless it is root, only a file it owns is replaced. */
  readonly owner?: { readonly uid: number; readonly gid: number }
  /** An open directory to create the file in (its fd stays the caller's), and the name in it; `path` is then only for messages. */
  readonly dir?: { readonly fd: number; readonly name: string }
}

const TEMP_NAME = /^\.(.+)\.tmp-(\d+)-[0-9a-f]{8}$/

/** What a file is, for messages: "a regular file", "a FIFO", "a character device"... */
export const describeFileType = (st: Stats): string =>
  st.isFile() ? "a regular file" : st.isFIFO() ? "a FIFO" : st.isCharacterDevice() ? "a character device" : st.isBlockDevice() ? "a block device" : st.isSocket() ? "a socket" : st.isSymbolicLink() ? "a symbolic link" : st.isDirectory() ? "a directory" : "of an unknown type"

/** Fails unless `at` is nothing or a regular file (of `ownerUid`, when given and not root). */
const replaceable = async (at: string, path: string, ownerUid?: number): Promise<void> => {
  const st = await lstat(at).catch(() => undefined)
  if (st?.isFile() && ownerUid !== undefined && ownerUid !== 0 && st.uid !== ownerUid)
    throw new SnapshotIoError({
      path, op: "create", code: "EPERM",
      reason: `${path} belongs to uid ${st.uid}, not to uid ${ownerUid} that asked: only the requester's own file is replaced; choose another path`
    })
  if (!st || st.isFile()) return
  throw new SnapshotIoError({
    path, op: "create", code: st.isDirectory() ? "EISDIR" : "EEXIST",
    reason: `${path} is ${describeFileType(st)}: only a regular file (or nothing) is replaced; choose another path${st.isCharacterDevice() ? " (use -o - to write to stdout where the command allows it)" : ""}`
  })
}

const openDirectory = (path: string): number => openSync(path, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY)

const writevFd = promisify(writev)
const fsyncFd = promisify(fsync)

/**
 * Standard output, for "-": fd 1 written strictly in order (a pipe, a socket
 * or a redirected file). If fd 1 is non-blocking and full, the write is
 * retried after 1 ms until the reader takes it.
 */
const stdoutFile = (path: string) =>
  Effect.suspend((): Effect.Effect<AtomicFile, SnapshotIoError> => {
    if (isatty(1)) return Effect.fail(new SnapshotIoError({ path, op: "write", code: "ENOTTY", reason: "standard output is a terminal: redirect it (e.g. `| zstd > guest.vmsnap.zst`) or give a file" }))
    let written = 0
    const inOrder = (position: number | null | undefined) => {
      if (position !== null && position !== undefined && position !== written)
        throw new SnapshotIoError({ path, op: "write", code: "ESPIPE", reason: `this output is written out of order (at byte ${position}, ${written} written): it cannot go to standard output; give a file` })
    }
    const writeAll = async (buffers: Array<Buffer>) => {
      let n = 0
      while (true) {
        try {
          n = (await writevFd(1, buffers)).bytesWritten
          break
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "EAGAIN") throw e
          await new Promise((r) => setTimeout(r, 1))
        }
      }
      written += n
      return { bytesWritten: n, buffers }
    }
    const stream = {
      writev: (buffers: Array<Buffer>, position?: number | null) => (inOrder(position), writeAll(buffers)),
      write: (buffer: Buffer, offset = 0, length = buffer.length - offset, position?: number | null) => (inOrder(position), writeAll([buffer.subarray(offset, offset + length)])),
      // A pipe or socket cannot be fsynced (EINVAL); a redirected file can.
      sync: () => fsyncFd(1).catch((e: NodeJS.ErrnoException) => (e.code === "EINVAL" || e.code === "EROFS" ? undefined : Promise.reject(e))),
      close: () => Promise.resolve()
    }
    return Effect.succeed({
      path,
      file: stream as unknown as FileHandle,
      commit: Effect.tryPromise({ try: () => stream.sync(), catch: (e) => ioError(path, "commit", e) }),
      native: { fd: 1, stream: true, wrote: (bytes: number) => void (written += bytes) }
    })
  })

export const atomicFile = (path: string, options: AtomicFileOptions | "write" | "read-write" = {}) => {
  const o: AtomicFileOptions = typeof options === "string" ? { access: options } : options
  if (path === "-" && o.dir === undefined && o.access !== "read-write") return stdoutFile(path)
  return Effect.acquireRelease(
    Effect.gen(function* () {
      const ownDir = o.dir === undefined
      const dirFd = yield* Effect.try({ try: () => o.dir?.fd ?? openDirectory(dirname(path)), catch: (e) => ioError(path, "open the directory of", e) })
      const name = o.dir?.name ?? basename(path)
      const at = (n: string) => `/proc/self/fd/${dirFd}/${n}`
      const closeDir = () => ownDir && closeSync(dirFd)
      const tmpName = `.${name}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`
      const access = o.access === "read-write" ? fsConstants.O_RDWR : fsConstants.O_WRONLY
      const file = yield* Effect.tryPromise({
        try: async () => {
          await replaceable(at(name), path, o.owner?.uid)
          // A writer of this name killed earlier (SIGKILL leaves its temporary file): its leftovers go now.
          const uid = o.owner?.uid ?? process.geteuid?.()
          removeStaleTempFiles(dirFd, { name, owned: (st) => st.uid === uid })
          const f = await open(at(tmpName), fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW | access, 0o600)
          try {
            if (o.owner) await f.chown(o.owner.uid, o.owner.gid)
            await f.chmod(o.mode ?? 0o600)
          } catch (e) {
            await f.close()
            await unlink(at(tmpName)).catch(() => undefined)
            throw e
          }
          return f
        },
        catch: (e) => (e instanceof SnapshotIoError ? e : ioError(path, "create", e))
      }).pipe(Effect.tapError(() => Effect.sync(closeDir)))
      const state = { committed: false }
      const commit = Effect.tryPromise({
        try: async () => {
          await file.sync()
          await replaceable(at(name), path, o.owner?.uid)
          // The temporary name must still be the file written: whoever can write in the directory could have
          // put another file there (break7 M2). Checked before the rename, and the final name after it.
          const ours = await file.stat()
          const isOurs = async (n: string) => {
            const st = await lstat(at(n)).catch(() => undefined)
            return st !== undefined && st.isFile() && st.ino === ours.ino && st.dev === ours.dev
          }
          const replaced = (when: string) =>
            new SnapshotIoError({ path, op: "commit", code: "ESTALE", reason: `the file being written was replaced or moved by someone else ${when}: nothing written by vmsnap is under this name; keep others out of the output directory` })
          if (!(await isOurs(tmpName))) throw replaced("before it was complete")
          await rename(at(tmpName), at(name))
          if (!(await isOurs(name))) throw replaced("as it was renamed into place")
          state.committed = true
          const dir = await open(`/proc/self/fd/${dirFd}`, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY)
          await dir.sync().finally(() => dir.close())
        },
        catch: (e) => (e instanceof SnapshotIoError ? e : ioError(path, "commit", e))
      })
      const native = { fd: file.fd, stream: false, wrote: () => undefined }
      return { output: { path, file, commit, native } satisfies AtomicFile, remove: () => unlink(at(tmpName)), state, closeDir }
    }),
    ({ output, remove, state, closeDir }) =>
      Effect.promise(async () => {
        await output.file.close().catch(() => undefined)
        if (!state.committed) await remove().catch(() => undefined)
        closeDir()
      })
  ).pipe(Effect.map(({ output }) => output))
}

/** Still running: neither gone nor a zombie waiting for its parent. */
export const isAlive = (pid: number): boolean => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z"
  } catch {
    return false
  }
}

export interface StaleTempOptions {
  /** Only the temporary files of this output name. */
  readonly name?: string
  /** Whose files may go (default: this process's uid). */
  readonly owned?: (st: Stats) => boolean
}

/**
 * Removes temporary files an earlier, killed writer left in `dir` (the open
 * directory `dirFd`): only names of this module's pattern (of `name`, when
 * given), regular files that `owned` accepts (default: owned by this
 * process's uid), whose writer (the pid in the name) is no longer running in
 * this pid namespace. Returns the names removed.
 */
export const removeStaleTempFiles = (dirFd: number, options: StaleTempOptions = {}): Array<string> => {
  const at = (n: string) => `/proc/self/fd/${dirFd}/${n}`
  const owned = options.owned ?? ((st: Stats) => st.uid === process.geteuid?.())
  const removed: Array<string> = []
  for (const n of readdirSync(at(""))) {
    const m = TEMP_NAME.exec(n)
    if (!m || (options.name !== undefined && m[1] !== options.name)) continue
    const pid = Number(m[2])
    if (pid === process.pid || isAlive(pid)) continue
    try {
      const st = lstatSync(at(n))
      if (!st.isFile() || !owned(st)) continue
      unlinkSync(at(n))
      removed.push(n)
    } catch {
      // gone meanwhile
    }
  }
  return removed
}
