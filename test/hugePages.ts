/**
 * Huge pages for the tests that need hugetlbfs memory: reserves `count` more
 * huge pages of `pageSize` bytes (2 MiB: vm.nr_hugepages; others: their
 * /sys/kernel/mm/hugepages pool; root), runs `body`, and puts the setting
 * back. Returns why the test must skip when they cannot be had.
 */
import { readFileSync, writeFileSync } from "node:fs"

const MiB = 1024 * 1024

export const withHugePages = async (count: number, body: () => Promise<void>, pageSize = 2 * MiB): Promise<string | undefined> => {
  const NR = pageSize === 2 * MiB ? "/proc/sys/vm/nr_hugepages" : `/sys/kernel/mm/hugepages/hugepages-${pageSize / 1024}kB/nr_hugepages`
  const FREE = `/sys/kernel/mm/hugepages/hugepages-${pageSize / 1024}kB/free_hugepages`
  let before: number
  try {
    before = Number(readFileSync(NR, "utf8"))
  } catch (e) {
    return `no ${pageSize / MiB} MiB huge pages here (${(e as Error).message})`
  }
  try {
    try {
      writeFileSync(NR, String(before + count))
    } catch (e) {
      return `cannot reserve huge pages in ${NR} (${(e as Error).message}; needs root)`
    }
    const free = Number(readFileSync(FREE, "utf8"))
    if (free < count) return `only ${free} free ${pageSize / MiB} MiB pages after asking for ${count} more`
    await body()
    return undefined
  } finally {
    try {
      writeFileSync(NR, String(before))
    } catch {
      // nothing was reserved
    }
  }
}
