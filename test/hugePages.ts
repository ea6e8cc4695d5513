/**
 * Huge pages for the tests that need hugetlbfs memory: reserves `count` more
 * huge pages of `pageSize` bytes (2 MiB: vm.nr_hugepages; others: their
 * /sys/kernel/mm/hugepages pool; root), runs `body`, and takes back what it
 * added from the setting as it is then (not the value read before: test
 * runs of several checkouts at once each take back only their own).
 * Returns why the test must skip when they cannot be had.
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
    writeFileSync(NR, String(before + count))
  } catch (e) {
    return `cannot reserve huge pages in ${NR} (${(e as Error).message}; needs root)`
  }
  // What the kernel could allocate is what is taken back.
  const added = Math.max(0, Number(readFileSync(NR, "utf8")) - before)
  try {
    const free = Number(readFileSync(FREE, "utf8"))
    if (free < count) return `only ${free} free ${pageSize / MiB} MiB pages after asking for ${count} more`
    await body()
    return undefined
  } finally {
    writeFileSync(NR, String(Math.max(0, Number(readFileSync(NR, "utf8")) - added)))
  }
}
