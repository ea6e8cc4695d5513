/** `vmsnap demo`: its options, and the report of the run (the run itself is in DemoProgram.ts). */
import { faultBucketLowerNs, formatBytes, type MemoryKind, PAGE_SIZE, summarizeUs } from "@vmsnap/core"
import { type CliCommand, defineCommand } from "../Command.js"
import { type DemoFlags, demoProgram, type Latency } from "../DemoProgram.js"
import type { Io } from "../Io.js"
import { bufferOption, commonFlags, faultAroundOption, faultAroundOptionSpec, poolPagesOption, sizeOption, UsageError } from "../Options.js"
import { progressBar } from "../Progress.js"
import { runCommand } from "../Run.js"

const latencyJson = (l: Latency) => ({ p50: l.p50, p99: l.p99, p999: l.p999, max: l.max, writes: l.writes })

export const runDemo = (io: Io, flags: DemoFlags) => {
  const bar = progressBar(io, "snapshot", !flags.json)
  return runCommand(io, flags, demoProgram(flags, bar.update), (d) => {
    bar.done()
    const r = d.result
    const fault = summarizeUs(r.engine.faultHistogram, r.engine.faultNsMax, faultBucketLowerNs)
    const consistent = d.snapshotMatches && d.restoreMatches
    const throughputMBps = r.sizeBytes / 1e6 / (r.durationMs / 1000)
    const kept = flags.output !== undefined || flags.keep
    const ratio = d.before.writesPerSecond > 0 ? d.during.writesPerSecond / d.before.writesPerSecond : 0
    const json = {
      ok: consistent,
      consistent,
      snapshotMatchesReference: d.snapshotMatches,
      restoreMatchesReference: d.restoreMatches,
      sizeBytes: r.sizeBytes,
      pauseMs: round(r.pauseMs, 3),
      armMs: round(r.armMs, 1),
      pagesWrittenWhileArmed: r.engine.cutPages,
      referenceCopyMs: d.referenceMs === undefined ? null : round(d.referenceMs, 1),
      durationMs: round(r.durationMs, 1),
      throughputMBps: round(throughputMBps, 1),
      fileBytes: r.fileBytes,
      compressionRatio: round((d.verified.dataPages * PAGE_SIZE) / Math.max(1, d.verified.storedBytes), 2),
      records: r.records,
      faults: r.engine.faults,
      faultAroundPages: flags.faultAroundPages,
      pagesSavedAround: r.engine.pagesFaultAround,
      fallbacks: r.engine.fallbacks,
      fallbackMs: round(r.engine.fallbackNs / 1e6, 2),
      poolPages: r.engine.poolSlots,
      poolHighWater: r.engine.poolHighWater,
      hugePagesRebuilt: r.collapse,
      faultServiceUs: { p50: fault.p50, p99: fault.p99, max: fault.max },
      path: kept ? d.path : null,
      guest: {
        kind: d.guestKind,
        whyThreads: d.guestKind === "threads" ? d.whyThreads : null,
        processes: d.processes,
        memory: flags.memory,
        writers: flags.writers,
        ratePagesPerSecond: flags.rate,
        writeLatencyUs: { before: latencyJson(d.before), during: latencyJson(d.during) },
        writesPerSecond: { before: Math.round(d.before.writesPerSecond), during: Math.round(d.during.writesPerSecond) },
        throughputRatioDuring: round(ratio, 3)
      }
    }
    const lat = (l: Latency) => `p50 ${l.p50} us  p99 ${l.p99} us  max ${l.max} us  (${Math.round(l.writesPerSecond).toLocaleString("en-US")} writes/s)`
    const who =
      d.guestKind === "kvm"
        ? `a KVM guest (toy VMM, ${flags.writers} vCPU${flags.writers > 1 ? "s" : ""}${d.processes > 1 ? ", plus a device process" : ""})`
        : flags.guest === "vmm"
          ? `the toy VMM on host threads (${d.whyThreads})`
          : `${flags.writers} writer threads in this process`
    const human = [
      `vmsnap demo: live snapshot of ${formatBytes(r.sizeBytes)} of ${flags.memory} memory of ${who}, writing ${flags.rate ? `${flags.rate} pages/s` : "as fast as it can"}`,
      `  result      ${consistent ? "CONSISTENT: snapshot and restore equal the reference copy taken at the cut" : "INCONSISTENT: the snapshot differs from the reference copy"}`,
      `  pause       ${r.pauseMs.toFixed(2)} ms at the cut (re-protecting ${r.engine.cutPages} pages written since arming, which took ${r.armMs.toFixed(0)} ms while the guest ran${d.referenceMs === undefined ? "" : `; the reference copy for this check took another ${d.referenceMs.toFixed(0)} ms`})`,
      `  snapshot    ${(r.durationMs / 1000).toFixed(2)} s, ${throughputMBps.toFixed(0)} MB/s, file ${formatBytes(r.fileBytes)} (${json.compressionRatio}x on data pages)`,
      `  faults      ${r.engine.faults} served (p50 ${fault.p50} us, p99 ${fault.p99} us), ${r.engine.pagesFaultAround} neighbours saved with them, ${r.engine.fallbacks} fallbacks, pool high water ${r.engine.poolHighWater}/${r.engine.poolSlots} pages`,
      `  guest write latency, as the guest measured it`,
      `    before    ${lat(d.before)}`,
      `    during    ${lat(d.during)}`,
      `  ${kept ? `kept ${d.path}` : "snapshot file removed (use --keep or -o FILE to keep it)"}`
    ].join("\n")
    return { json, human, exitCode: consistent ? 0 : 1 }
  })
}

const round = (x: number, digits: number) => Math.round(x * 10 ** digits) / 10 ** digits

export const demoCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "demo",
    describe: "take a live snapshot of the built-in demo guest while it writes, verify it against a reference copy taken at the cut, restore it and compare",
    builder: (y) =>
      y
        .option("size", { type: "string", default: "1GiB", describe: "guest memory size (KiB/MiB/GiB)" })
        .option("writers", { type: "number", default: 1, describe: "guest vCPUs (or writer threads) writing memory; each spins at 100% of a core (ring 3 cannot halt)" })
        .option("rate", { type: "number", default: 50000, describe: "guest writes in pages/s over all writers (0: as fast as they can)" })
        .option("buffer", bufferOption("copy pool: pages written before being saved wait here (0: synchronous, like QEMU)"))
        .option("fault-around", faultAroundOptionSpec("pages saved with each faulting page (power of two, 1 = off)"))
        .option("guest", { choices: ["vmm", "threads"] as const, default: "vmm" as const, describe: "vmm: the toy VMM in its own process (KVM when /dev/kvm works) through the agent; threads: writer threads in this process" })
        .option("device", { type: "boolean", default: false, describe: "with --guest vmm: a second (device) process writes the same guest memory" })
        .option("memory", { choices: ["memfd", "anon", "anon-thp", "hugetlbfs"] as const, default: "memfd" as const, describe: "how guest memory is backed (anon-thp: --guest threads only; hugetlbfs: a memfd of 2 MiB huge pages, needs free ones: vm.nr_hugepages)" })
        .option("output", { alias: "o", type: "string", describe: "snapshot file to write (kept); default: a temporary file" })
        .option("keep", { type: "boolean", default: false, describe: "keep the temporary snapshot file" })
        .option("warmup", { type: "number", default: 1000, describe: "ms of guest writes measured before the snapshot" })
        .example("$0 demo", "1 GiB KVM guest (toy VMM), 1 vCPU writing 50k random pages/s, 64 MiB pool")
        .example("$0 demo --device", "a second process writes the same guest memory during the snapshot")
        .example("$0 demo --guest threads --memory anon-thp", "writer threads in this process over THP memory")
        .example("$0 demo --memory hugetlbfs --size 256MiB", "a KVM guest in 2 MiB hugetlbfs pages (reserve them first: sysctl vm.nr_hugepages=160)")
        .example("$0 demo --size 256MiB --rate 0 --buffer 0", "a small guest writing flat out, no pool (synchronous)")
        .example("$0 demo --json -o /tmp/guest.vmsnap", "keep the snapshot, print the report as JSON"),
    handler: (a) => {
      const size = sizeOption("size", a.size, 2 * 1024 * 1024)
      const poolPages = poolPagesOption(a.buffer)
      if (!Number.isInteger(a.writers) || a.writers < 1 || a.writers > 64) throw new UsageError(`--writers ${a.writers}: must be a whole number from 1 to 64`)
      if (!Number.isFinite(a.rate) || a.rate < 0) throw new UsageError(`--rate ${a.rate}: must be 0 (flat out) or a positive number of pages/s`)
      if (!Number.isFinite(a.warmup) || a.warmup < 0 || a.warmup > 60000) throw new UsageError(`--warmup ${a.warmup}: must be 0 to 60000 ms`)
      const around = faultAroundOption(a["fault-around"])
      if (a.guest === "vmm" && a.memory === "anon-thp") throw new UsageError("--memory anon-thp needs --guest threads (the toy VMM maps memfd or anon memory)")
      if (a.guest === "vmm" && size % (2 * 1024 * 1024) !== 0) throw new UsageError(`--size ${a.size}: the toy VMM needs a multiple of 2 MiB`)
      if (a.guest === "vmm" && a.writers > 32) throw new UsageError(`--writers ${a.writers}: the toy VMM runs at most 32 vCPUs`)
      if (a.device && a.guest !== "vmm") throw new UsageError("--device needs --guest vmm")
      if (a.device && a.memory !== "memfd") throw new UsageError("--device shares guest memory through a memfd: use --memory memfd")
      if (a.memory === "hugetlbfs" && size % (2 * 1024 * 1024) !== 0) throw new UsageError(`--size ${a.size}: hugetlbfs memory needs a multiple of 2 MiB`)
      if (a.output !== undefined && a.output.trim() === "") throw new UsageError("--output: give a file path")
      schedule(() =>
        runDemo(io, {
          ...commonFlags(a), size, poolPages, writers: a.writers, rate: Math.round(a.rate), memory: a.memory as MemoryKind,
          output: a.output, keep: a.keep === true, warmupMs: a.warmup, faultAroundPages: around,
          guest: a.guest as "vmm" | "threads", device: a.device === true
        })
      )
    }
  })
