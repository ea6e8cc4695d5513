/**
 * The tables `vmsnap bench --target qemu|redis` prints for people: one row
 * per method, medians of its trials with the range in brackets where the
 * figure is the comparison's point (docs/BENCHMARKS.md says what each means).
 */
import { formatBytes } from "@vmsnap/core"
import type { QemuBenchResult, QemuMethodSummary, RedisBenchResult, RedisMethodSummary, Spread } from "@vmsnap/rig"

const perSecond = (n: number) => (n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : n >= 1e3 ? `${(n / 1e3).toFixed(1)}k` : String(Math.round(n)))
const us = (n: number) => (n >= 1000 ? `${(n / 1000).toFixed(1)}ms` : n >= 10 ? `${Math.round(n)}us` : `${n.toFixed(2)}us`)
const ranged = (s: Spread, f: (n: number) => string) => (s.min === s.max ? f(s.median) : `${f(s.median)} (${f(s.min)}-${f(s.max)})`)
const percent = (x: number) => `${Math.round(x * 100)}%`
/** The pause, and vmsnap --pid's earlier stop to take the userfaultfd. */
const pause = (p: Spread, setup: Spread, digits: number) => ranged(p, (n) => n.toFixed(digits)) + (setup.median > 0 ? ` +${setup.median.toFixed(digits)}` : "")

/** Left-aligns the first column, right-aligns the rest. */
const render = (header: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>): string => {
  const all = [header, ...rows]
  const widths = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? "").length)))
  return all.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd()).join("\n")
}

const failures = (methods: ReadonlyArray<{ method: string; trials: ReadonlyArray<{ ok: boolean; run: number; error: string | null }> }>) =>
  methods.flatMap((m) => m.trials.filter((t) => !t.ok).map((t) => `  ${m.method} run ${t.run} failed: ${t.error}`))

export const qemuTable = (r: QemuBenchResult, runs: number): string => {
  const row = (m: QemuMethodSummary): Array<string> => {
    const f = m.figures
    if (!m.trials.some((t) => t.ok)) return [m.method, "failed"]
    return [
      m.method, pause(f.pauseMs, f.setupStopMs, 1), ranged(f.durationMs, (n) => (n / 1000).toFixed(2)),
      perSecond(f.beforeWritesPerSecond.median), `${perSecond(f.duringWritesPerSecond.median)} ${ranged(f.duringRatio, percent)}`,
      `${perSecond(f.afterWritesPerSecond.median)} ${ranged(f.afterRatio, percent)}`,
      us(f.duringP50Us.median), us(f.duringP99Us.median), us(f.duringP999Us.median), us(f.duringMaxUs.median), String(f.duringOver1ms.median),
      formatBytes(f.targetExtraBytes.median), formatBytes(f.vmsnapExtraBytes.median), formatBytes(f.outputBytes.median)
    ]
  }
  return [
    `QEMU guest: ${formatBytes(r.guestBytes)} written at random flat out (QEMU RAM ${formatBytes(r.qemuRamBytes)}, one vCPU on KVM), a fresh QEMU per trial; medians of ${runs} run${runs > 1 ? "s" : ""} (range)`,
    "guest w/s: the guest's own write counts in the second before, the windows overlapping the snapshot (and that over before), and the windows after it;",
    `latency and >=1ms: the guest's own timing of each write in those windows (${r.windowMs} ms each); extra: RssAnon growth of QEMU and of vmsnap;`,
    "pause: QEMU's downtime (background), stop to cont (stop), every QEMU thread stopped for vmsnap's cut (+ the stop to take the userfaultfd before)",
    render(
      ["method", "pause ms", "time s", "before w/s", "during w/s", "after w/s", "p50", "p99", "p99.9", "max", ">=1ms", "QEMU extra", "vmsnap extra", "output"],
      r.methods.map(row)
    ),
    ...failures(r.methods)
  ].join("\n")
}

export const redisTable = (r: RedisBenchResult, runs: number): string => {
  const row = (m: RedisMethodSummary): Array<string> => {
    const f = m.figures
    if (!m.trials.some((t) => t.ok)) return [m.method, "failed"]
    return [
      m.method, pause(f.pauseMs, f.setupStopMs, 2), ranged(f.durationMs, (n) => (n / 1000).toFixed(2)),
      perSecond(f.beforeCommandsPerSecond.median), ranged(f.duringCommandsPerSecond, perSecond), perSecond(f.afterCommandsPerSecond.median),
      us(f.beforeP99Us.median), us(f.duringP50Us.median), ranged(f.duringP99Us, us), us(f.duringP999Us.median), ranged(f.duringMaxUs, us),
      ranged(f.extraMemoryBytes, formatBytes), formatBytes(f.redisGrowthBytes.median), formatBytes(f.outputBytes.median)
    ]
  }
  return [
    `Redis: ${r.keys} keys of ${r.valueBytes} bytes (used_memory ${formatBytes(r.usedMemoryBytes)}) under redis-benchmark SETs on loopback; medians of ${runs} run${runs > 1 ? "s" : ""} (range)`,
    "cmd/s: commands Redis processed per second before / during / after; latency: a probe client's SETs sent during the snapshot (before p99: the second before);",
    "extra: the fork child's copied pages (BGSAVE) or vmsnap's own memory growth (vmsnap-pid); Redis growth: its RssAnon (the load adds keys);",
    "pause: fork() (Redis's latest_fork_usec) or every Redis thread stopped for vmsnap's cut (+ the stop to take the userfaultfd before)",
    render(
      ["method", "pause ms", "time s", "before cmd/s", "during cmd/s", "after cmd/s", "before p99", "p50", "p99", "p99.9", "max", "extra", "Redis growth", "output"],
      r.methods.map(row)
    ),
    ...failures(r.methods)
  ].join("\n")
}
