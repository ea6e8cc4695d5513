/**
 * `vmsnap snapshot -o FILE`: a live snapshot of a VM connected to an agent
 * (`--agent SOCK --vm ID`), or, one-shot, of the first VMM that connects to
 * `--listen SOCK` (with `--processes N`: once N of its processes are there).
 */
import { agentScoped, type Compression, formatBytes, InvalidInput, type MappingSelector, parseMappingSelector, requestSnapshot, snapshotPid } from "@vmsnap/core"
import { Effect } from "effect"
import { fstatSync } from "node:fs"
import { resolve } from "node:path"
import type { Io } from "../Io.js"
import { progressBar } from "../Progress.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { bufferOption, commonFlags, compressionOptionSpec, faultAroundOption, faultAroundOptionSpec, maxGuestSizeOption, maxGuestSizeOptionSpec, poolPagesOption, sizeOption, stallTimeoutOption, stallTimeoutOptionSpec, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

export interface SnapshotFlags extends CommonFlags {
  readonly output: string
  readonly agent: string | undefined
  readonly listen: string | undefined
  readonly vm: string | undefined
  readonly processes: number
  readonly waitMs: number
  readonly poolPages: number
  readonly faultAroundPages: number
  readonly compression: Compression
  /** Fail when the output takes nothing for this long (ms). */
  readonly stallMs: number
  /** With --listen or --pid: the most memory protected (bytes); undefined: this machine's memory. */
  readonly maxGuestBytes?: number
  /** --pid: snapshot this process directly (ptrace), with these mappings (empty: all capturable). */
  readonly pid?: number
  readonly mappings?: ReadonlyArray<MappingSelector>
}

interface Summary {
  readonly vm: string
  readonly path: string
  readonly sizeBytes: number
  readonly fileBytes: number
  readonly pauseMs: number
  readonly durationMs: number
  readonly faults: number
  /** --pid: threads frozen for the cut, mappings captured, writable mappings left out. */
  readonly threads?: number
  readonly mappings?: ReadonlyArray<{ hva: string; size: number; kind: string; name: string; permissions: string }>
  readonly skipped?: ReadonlyArray<{ mapping: string; why: string }>
}

/** Standard output is /dev/null (char device 1:3): Node reopens a closed fd 1 there, and -o - would keep nothing (break7 L2). */
const stdoutIsDevNull = (): boolean => {
  try {
    const st = fstatSync(1)
    return st.isCharacterDevice() && st.rdev === ((1 << 8) | 3)
  } catch {
    return false
  }
}

/** "-" is standard output (written as it goes); any other path is resolved here. */
const outputPath = (output: string) => (output === "-" ? "-" : resolve(output))

const oneShot = (flags: SnapshotFlags, io: Io, onProgress: (d: number, t: number) => void) =>
  Effect.scoped(
    Effect.gen(function* () {
      const agent = yield* agentScoped(flags.listen!, { log: (l) => flags.verbose && io.stderr(`vmsnap agent: ${l}\n`), limits: { stallTimeoutMs: flags.stallMs, maxGuestBytes: flags.maxGuestBytes } })
      if (!flags.json) io.stderr(`vmsnap: waiting on ${flags.listen} for ${flags.vm ? `vm ${flags.vm}` : "a VMM"}${flags.processes > 1 ? ` with ${flags.processes} processes` : ""}...\n`)
      const vm = yield* Effect.tryPromise({
        try: (signal) => agent.waitForVm(flags.vm, flags.processes, signal),
        catch: () => new InvalidInput({ reason: "interrupted while waiting for a VMM" })
      }).pipe(
        Effect.timeoutOrElse({
          duration: flags.waitMs,
          orElse: () => Effect.fail(new InvalidInput({ reason: `no VMM connected to ${flags.listen} within ${flags.waitMs} ms` }))
        })
      )
      const r = yield* agent.snapshot({ vm, path: outputPath(flags.output), poolPages: flags.poolPages, faultAroundPages: flags.faultAroundPages, compression: flags.compression }, onProgress)
      return { vm, path: r.path, sizeBytes: r.sizeBytes, fileBytes: r.fileBytes, pauseMs: r.pauseMs, durationMs: r.durationMs, faults: r.engine.faults } satisfies Summary
    })
  )

const viaAgent = (flags: SnapshotFlags, onProgress: (d: number, t: number) => void) =>
  Effect.map(
    requestSnapshot(flags.agent!, { vm: flags.vm!, path: flags.output, poolPages: flags.poolPages, faultAroundPages: flags.faultAroundPages, compression: flags.compression }, onProgress),
    (r): Summary => ({ vm: flags.vm!, path: r.path, sizeBytes: r.sizeBytes, fileBytes: r.fileBytes, pauseMs: r.pauseMs, durationMs: r.durationMs, faults: r.faults })
  )

const byPid = (flags: SnapshotFlags, onProgress: (d: number, t: number) => void) =>
  Effect.map(
    snapshotPid({
      pid: flags.pid!, path: outputPath(flags.output), mappings: flags.mappings, poolPages: flags.poolPages, faultAroundPages: flags.faultAroundPages,
      compression: flags.compression,
      stallMs: flags.stallMs,
      maxGuestBytes: flags.maxGuestBytes,
      onProgress: (saved, total) => onProgress(saved * 4096, total * 4096)
    }),
    (r): Summary => ({
      vm: `pid ${r.pid}`, path: r.path, sizeBytes: r.sizeBytes, fileBytes: r.fileBytes, pauseMs: r.pauseMs, durationMs: r.durationMs, faults: r.engine.faults,
      threads: r.threads,
      mappings: r.mappings.map((m) => ({ hva: `0x${m.hva.toString(16)}`, size: m.size, kind: m.kind, name: m.name, permissions: m.permissions })),
      skipped: r.skipped
    })
  )

export const runSnapshot = (io: Io, flags: SnapshotFlags) => {
  const bar = progressBar(io, "snapshot", !flags.json)
  const program = flags.pid !== undefined ? byPid(flags, bar.update) : flags.agent ? viaAgent(flags, bar.update) : oneShot(flags, io, bar.update)
  return runCommand(io, flags, program, (s) => {
    bar.done()
    return {
      json: { ok: true, ...s },
      human: `vm ${s.vm}: ${formatBytes(s.sizeBytes)} saved to ${s.path === "-" ? "standard output" : s.path} (${formatBytes(s.fileBytes)}) in ${(s.durationMs / 1000).toFixed(2)} s, paused ${s.pauseMs.toFixed(2)} ms, ${s.faults} faults`
    }
  }, () =>
    // A stream cannot be withdrawn: what went out stays, without its trailer (every reader refuses it as truncated).
    flags.output === "-" ? "protection removed; standard output ends without the snapshot's trailer (incomplete)" : "protection removed, partial output deleted")
}

export const snapshotCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "snapshot",
    describe: "take a live snapshot of a VM connected to an agent (--agent SOCK --vm ID), of the first VMM that connects to --listen SOCK, or of any process's memory (--pid PID)",
    builder: (y) =>
      y
        .option("output", { alias: "o", type: "string", demandOption: true, describe: "snapshot file to write, created 0600 (with --agent: a path in the agent's --output-dir; relative paths resolve there); - writes to standard output (with --listen or --pid)" })
        .option("agent", { type: "string", describe: "socket of a running `vmsnap agent`" })
        .option("vm", { type: "string", describe: "VM id (required with --agent)" })
        .option("listen", { type: "string", describe: "one-shot: listen here, wait for a VMM, snapshot it, exit" })
        .option("processes", { type: "number", default: 1, describe: "one-shot: wait until the VM has this many processes (VMM + devices)" })
        .option("wait", { type: "number", default: 60000, describe: "one-shot: ms to wait for the VMM" })
        .option("pid", { type: "number", describe: "snapshot the memory of this running process (a VMM, a service): ptrace freezes it for the cut, no agent needed" })
        .option("mapping", { type: "string", array: true, describe: "with --pid: capture only these mappings: START-END (hex hva, whole mappings) or a name ([anon:NAME], /memfd:NAME, a path); repeatable" })
        .option("min-size", { type: "string", describe: "with --pid: capture only writable mappings of at least this size (e.g. a VMM's guest RAM: 1GiB)" })
        .option("buffer", bufferOption("copy pool size (0: synchronous)"))
        .option("fault-around", faultAroundOptionSpec("pages saved with each faulting page (power of two, 1 = off)"))
        .option("compression", compressionOptionSpec)
        .option("max-guest-size", maxGuestSizeOptionSpec("with --listen or --pid: the most memory to write-protect, e.g. 64GiB (default: this machine's memory); protecting takes page tables and state in proportion to the size, so sparse terabytes are refused"))
        .option("stall-timeout", stallTimeoutOptionSpec("with --listen or --pid: seconds the output may take nothing (a reader of -o - that stopped reading, a hung disk) before the snapshot is abandoned and the guest released; meanwhile the guest waits on its write faults once the buffer is full"))
        .example("$0 snapshot --agent /run/vmsnap.sock --vm web-1 -o web-1.vmsnap", "")
        .example("$0 snapshot --listen /tmp/vmsnap.sock -o guest.vmsnap", "then start the VMM with --agent /tmp/vmsnap.sock")
        .example("$0 snapshot --pid 4242 --min-size 1GiB -o qemu.vmsnap", "the guest RAM of a running QEMU (docs/pid-snapshot.md)")
        .example("$0 snapshot --listen /tmp/vmsnap.sock -o - | zstd > guest.vmsnap.zst", "stream the snapshot as it is written"),
    handler: (a) => {
      const sources = [a.agent, a.listen, a.pid].filter((x) => x !== undefined).length
      if (sources !== 1) throw new UsageError("give exactly one of --agent SOCK (a running agent), --listen SOCK (one-shot) or --pid PID (a running process)")
      if (a.pid !== undefined && (!Number.isInteger(a.pid) || a.pid <= 0)) throw new UsageError(`--pid ${a.pid}: must be a process id`)
      if (a.pid === undefined && (a.mapping !== undefined || a["min-size"] !== undefined)) throw new UsageError("--mapping and --min-size go with --pid")
      const mappings: Array<MappingSelector> = (a.mapping ?? []).map((m) => parseMappingSelector(String(m)))
      if (a["min-size"] !== undefined) mappings.push({ _tag: "MinSize", bytes: sizeOption("min-size", a["min-size"], 4096) })
      if (a.output === "-" && a.agent !== undefined) throw new UsageError("-o - works with --listen and --pid: an agent writes files in its --output-dir")
      if (a.output === "-" && a.json) throw new UsageError("-o - and --json both want standard output: give a file, or drop --json")
      if (a.output === "-" && stdoutIsDevNull()) throw new UsageError("-o -: standard output is /dev/null (closed, or redirected there), so the snapshot would be lost: redirect it to a file or a pipe, or give -o FILE")
      if (a.agent !== undefined && a.vm === undefined) throw new UsageError("--agent needs --vm ID (see the agent's log for connected VMs)")
      if (!Number.isInteger(a.processes) || a.processes < 1 || a.processes > 16) throw new UsageError(`--processes ${a.processes}: must be 1 to 16`)
      const stallMs = stallTimeoutOption(a["stall-timeout"])
      const maxGuestBytes = maxGuestSizeOption(a["max-guest-size"])
      if (maxGuestBytes !== undefined && a.agent !== undefined) throw new UsageError("--max-guest-size goes with --listen or --pid: a running agent has its own (vmsnap agent --max-guest-size)")
      const poolPages = poolPagesOption(a.buffer)
      const around = faultAroundOption(a["fault-around"])
      schedule(() =>
        runSnapshot(io, {
          ...commonFlags(a), output: a.output, agent: a.agent, listen: a.listen, vm: a.vm, processes: a.processes,
          waitMs: a.wait, poolPages, faultAroundPages: around, compression: a.compression, pid: a.pid, mappings, stallMs, maxGuestBytes
        })
      )
    }
  })
