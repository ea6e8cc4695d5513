/**
 * The directory an agent writes requested snapshots into, and nowhere else.
 * It is opened once; a requested path is resolved inside it component by
 * component through directory fds (openat-style, `/proc/self/fd/N/NAME`
 * with O_NOFOLLOW), never by string prefix alone: a relative path resolves
 * there; an absolute path must lie under it; `..`, a symbolic link as any
 * directory component and a missing directory are refused. The last
 * component is checked by AtomicFile (a regular file or nothing).
 */
import { closeSync, constants as fsConstants, lstatSync, openSync, realpathSync } from "node:fs"
import { isAbsolute, normalize, relative } from "node:path"
import { InvalidInput } from "./Errors.js"

const DIR_FLAGS = fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW

/** Where inside the output directory a file goes: an open directory (the caller closes `dirFd`) and a name in it. */
export interface OutputLocation {
  readonly dirFd: number
  readonly name: string
  /** The path as a person reads it (the output directory joined with the relative path). */
  readonly path: string
}

export class OutputDir {
  readonly fd: number
  /** The directory as named, and as resolved: an absolute request may use either. */
  private readonly roots: ReadonlyArray<string>

  constructor(readonly path: string) {
    this.fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY)
    this.roots = [...new Set([normalize(path), realpathSync(path)])]
  }

  close() {
    closeSync(this.fd)
  }

  /** Opens the directory that will hold `requested`; InvalidInput says why a path is refused. */
  resolve(requested: string): OutputLocation {
    const refuse = (why: string): never => {
      throw new InvalidInput({ reason: `output path ${JSON.stringify(requested)} refused: ${why} (the agent writes only under ${this.path})` })
    }
    if (requested.length === 0 || requested.length > 4096 || requested.includes("\0")) refuse("not a usable path")
    let rel = requested
    if (isAbsolute(requested)) {
      const under = this.roots.map((root) => relative(root, requested)).find((r) => r !== "" && !r.startsWith("..") && !isAbsolute(r))
      rel = under ?? refuse("outside the output directory")
    }
    const parts = rel.split("/").filter((p) => p !== "" && p !== ".")
    if (parts.includes("..")) refuse(`".." is not allowed`)
    const name = parts.pop()
    if (name === undefined || requested.endsWith("/")) refuse("names no file")
    let dirFd = openSync(`/proc/self/fd/${this.fd}`, DIR_FLAGS & ~fsConstants.O_NOFOLLOW)
    try {
      for (const [i, part] of parts.entries()) {
        let next: number
        try {
          next = openSync(`/proc/self/fd/${dirFd}/${part}`, DIR_FLAGS)
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code
          const at = parts.slice(0, i + 1).join("/")
          // O_DIRECTORY|O_NOFOLLOW on a symbolic link fails with ELOOP or ENOTDIR: say which it was.
          const link = code === "ELOOP" || (code === "ENOTDIR" && lstatSync(`/proc/self/fd/${dirFd}/${part}`, { throwIfNoEntry: false })?.isSymbolicLink())
          return refuse(link ? `${at} is a symbolic link` : code === "ENOTDIR" ? `${at} is not a directory` : code === "ENOENT" ? `${at} does not exist` : `${at}: ${code}`)
        }
        closeSync(dirFd)
        dirFd = next
      }
    } catch (e) {
      closeSync(dirFd)
      throw e
    }
    return { dirFd, name: name!, path: [this.path.replace(/\/+$/, ""), ...parts, name].join("/") }
  }
}
