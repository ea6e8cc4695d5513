/**
 * The directory an agent writes requested snapshots into, and nowhere else.
 * It is opened once; a requested path is resolved inside it component by
 * component through directory fds (openat-style, `/proc/self/fd/N/NAME`
 * with O_NOFOLLOW), never by string prefix alone: a relative path resolves
 * there; an absolute path must lie under it; `..`, a symbolic link as any
 * directory component and a missing directory are refused. The last
 * component is checked by AtomicFile (a regular file or nothing; for another
 * requester, one it owns).
 *
 * The output directory itself is the administrator's grant: the agent writes
 * there for every requester it allows. Below it, a requester other than root
 * gets only what its own permissions give: search on every subdirectory on
 * the way, write and search on the one that holds the file, judged from the
 * mode bits against its uid, gid and groups (SO_PEERCRED) as the kernel
 * would (owner bits, else group bits, else other bits; POSIX ACLs are not
 * read: an ACL entry naming the requester is not honoured, granting or
 * denying).
 */
import { closeSync, constants as fsConstants, fstatSync, lstatSync, openSync, realpathSync, type Stats } from "node:fs"
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

/** Who asked for a file: the peer's uid, gid and supplementary groups. */
export interface Requester {
  readonly uid: number
  readonly gid: number
  readonly groups: ReadonlyArray<number>
}

const SEARCH = 0o1
const WRITE = 0o2

/** Does the mode of `st` give `who` every bit of `want` (a subset of rwx, 0o7)? The class is chosen as the kernel does: owner, else group, else other. */
export const modeAllows = (st: Stats, who: Requester, want: number): boolean => {
  if (who.uid === 0) return true
  const shift = st.uid === who.uid ? 6 : st.gid === who.gid || who.groups.includes(st.gid) ? 3 : 0
  return ((st.mode >> shift) & want) === want
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

  /**
   * Opens the directory that will hold `requested`; InvalidInput says why a
   * path is refused. With `requester`, every subdirectory must let it search
   * and the last one also write (see the module's comment).
   */
  resolve(requested: string, requester?: Requester): OutputLocation {
    const refuse = (why: string): never => {
      throw new InvalidInput({ reason: `output path ${JSON.stringify(requested)} refused: ${why} (the agent writes only under ${this.path})` })
    }
    if (requested.length === 0 || requested.length > 4096 || requested.includes("\0")) refuse("not a usable path")
    // A name with a newline or an escape sequence misleads every listing and log that shows it.
    if (/[\x00-\x1f\x7f]/.test(requested)) refuse("control characters (newline, tab, escape...) are not allowed in names")
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
        const last = i === parts.length - 1
        if (requester && !modeAllows(fstatSync(dirFd), requester, last ? WRITE | SEARCH : SEARCH))
          refuse(`uid ${requester.uid} may not ${last ? "create files in" : "search"} ${parts.slice(0, i + 1).join("/")} (its owner, group and mode do not allow it)`)
      }
    } catch (e) {
      closeSync(dirFd)
      throw e
    }
    return { dirFd, name: name!, path: [this.path.replace(/\/+$/, ""), ...parts, name].join("/") }
  }
}
