/**
 * Huge pages for the tests that need hugetlbfs memory: reserves `count` more
 * 2 MiB pages in vm.nr_hugepages (root), runs `body`, and puts the setting
 * back. Returns why the test must skip when they cannot be had.
 */
import { readFileSync, writeFileSync } from "node:fs"

const NR = "/proc/sys/vm/nr_hugepages"

export const withHugePages = async (count: number, body: () => Promise<void>): Promise<string | undefined> => {
  const before = Number(readFileSync(NR, "utf8"))
  try {
    try {
      writeFileSync(NR, String(before + count))
    } catch (e) {
      return `cannot reserve huge pages in ${NR} (${(e as Error).message}; needs root)`
    }
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync("/proc/meminfo", "utf8"))?.[1] ?? 0)
    if (free < count) return `only ${free} free 2 MiB pages after asking for ${count} more`
    await body()
    return undefined
  } finally {
    writeFileSync(NR, String(before))
  }
}
