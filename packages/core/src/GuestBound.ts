/**
 * The most guest memory vmsnap write-protects at once, and why there is a
 * most. Protecting memory costs the host in proportion to the size declared,
 * not to what is in use: the kernel fills page tables for the whole range
 * (UFFD_FEATURE_WP_UNPOPULATED puts a marker in every page table entry, used
 * or not: 2 MiB per GiB), and the engine keeps state for every 4 KiB page
 * (0.5 MiB per GiB). A peer declaring sparse regions of terabytes
 * (MAP_NORESERVE memory costs it nothing) would make the agent exhaust the
 * host: break8 declared 16 TiB, and the kernel's page tables had reached
 * 23 GB when the OOM killer ran. So the total size of what one snapshot protects
 * is bounded, by default to this machine's memory (os.totalmem(): a guest
 * larger than that cannot have all its memory in use here); a guest that
 * really is larger (overcommitted) needs the bound raised.
 */
import { totalmem } from "node:os"
import { formatBytes } from "./GuestMemory.js"

/** The default bound, bytes: this machine's memory. */
export const defaultMaxGuestBytes = (): number => totalmem()

/**
 * Why `bytes` of guest memory (what `what` names) may not be protected
 * under the bound `max` (default: defaultMaxGuestBytes()), or undefined if
 * it may. `fix` says what the caller can do about it.
 */
export const guestTooLarge = (bytes: number, what: string, fix: string, max = defaultMaxGuestBytes()): string | undefined =>
  bytes <= max
    ? undefined
    : `${what} is ${formatBytes(bytes)}, more than the ${formatBytes(max)} vmsnap write-protects at once ` +
      `(${max === totalmem() ? "this machine's memory" : "the bound given"}): protecting memory takes page tables and state ` +
      `in proportion to its declared size (~2.5 MiB per GiB), so larger, sparse memory could exhaust the host; ` +
      `${fix}`
