/**
 * vmsnap's command line. `main(argv)` parses, runs one command and returns
 * its exit code; it never calls process.exit, so tests call it in-process.
 */
import { BENCH_METHODS, type BenchMethod, formatBytes, type MemoryKind, PAGE_SIZE, parseSize, type RawLayout } from "@vmsnap/core"
import yargs from "yargs"
import { agentCommand } from "./commands/agent.js"
import { benchCommand, restoreBenchCommand } from "./commands/bench.js"
import { demoCommand } from "./commands/demo.js"
import { serveCommand } from "./commands/serve.js"
import { snapshotCommand } from "./commands/snapshot.js"
import { inspectCommand } from "./commands/inspect.js"
import { restoreCommand } from "./commands/restore.js"
import { verifyCommand } from "./commands/verify.js"
import { ExitCode } from "./ExitCode.js"
import { type Io, processIo } from "./Io.js"

class UsageError extends Error {}

const sizeOption = (name: string, value: unknown, min: number): number => {
  const bytes = parseSize(String(value))
  if (bytes === undefined) throw new UsageError(`--${name} ${String(value)}: not a size (examples: 4096, 256MiB, 1GiB)`)
  if (bytes < min) throw new UsageError(`--${name} ${String(value)}: must be at least ${formatBytes(min)}`)
  if (bytes % PAGE_SIZE !== 0) throw new UsageError(`--${name} ${String(value)}: must be a multiple of 4 KiB`)
  return bytes
}

/** --buffer: a size, or 0 for the synchronous mode. Returns pages. */
const poolPagesOption = (value: unknown): number => (String(value).trim() === "0" ? 0 : sizeOption("buffer", value, PAGE_SIZE) / PAGE_SIZE)

const faultAroundOption = (value: number): number => {
  if (!Number.isInteger(value) || value < 1 || value > 512 || (value & (value - 1)) !== 0)
    throw new UsageError(`--fault-around ${value}: must be a power of two from 1 to 512`)
  return value
}

const EXIT_CODES = `Exit codes: 0 ok, 1 failure, 2 usage error, 3 not a valid snapshot (corrupt, truncated, not ours),
4 the kernel or permissions lack userfaultfd support, 130 interrupted (SIGINT), 143 terminated (SIGTERM).`

export const main = async (argv: ReadonlyArray<string>, io: Io = processIo): Promise<number> => {
  let run: (() => Promise<number>) | undefined
  const common = (a: { json?: boolean; verbose?: boolean }) => ({ json: a.json === true, verbose: a.verbose === true })
  const parser = yargs()
    .scriptName("vmsnap")
    .usage("vmsnap: live, point-in-time snapshots of VM guest memory (userfaultfd write-protect)\n\nUsage: $0 <command> [options]")
    .option("json", { type: "boolean", default: false, describe: "print one JSON object on stdout and nothing else there" })
    .option("verbose", { type: "boolean", default: false, describe: "print stack traces on errors" })
    .command(
      "demo",
      "take a live snapshot of the built-in demo guest while it writes, verify it against a reference copy taken at the cut, restore it and compare",
      (y) =>
        y
          .option("size", { type: "string", default: "1GiB", describe: "guest memory size (KiB/MiB/GiB)" })
          .option("writers", { type: "number", default: 1, describe: "guest vCPUs (or writer threads) writing memory; each spins at 100% of a core (ring 3 cannot halt)" })
          .option("rate", { type: "number", default: 50000, describe: "guest writes in pages/s over all writers (0: as fast as they can)" })
          .option("buffer", { type: "string", default: "64MiB", describe: "copy pool: pages written before being saved wait here (0: synchronous, like QEMU)" })
          .option("fault-around", { type: "number", default: 16, describe: "pages saved with each faulting page (power of two, 1 = off)" })
          .option("guest", { choices: ["vmm", "threads"] as const, default: "vmm" as const, describe: "vmm: the toy VMM in its own process (KVM when /dev/kvm works) through the agent; threads: writer threads in this process" })
          .option("device", { type: "boolean", default: false, describe: "with --guest vmm: a second (device) process writes the same guest memory" })
          .option("memory", { choices: ["memfd", "anon", "anon-thp"] as const, default: "memfd" as const, describe: "how guest memory is backed (anon-thp: --guest threads only)" })
          .option("output", { alias: "o", type: "string", describe: "snapshot file to write (kept); default: a temporary file" })
          .option("keep", { type: "boolean", default: false, describe: "keep the temporary snapshot file" })
          .option("warmup", { type: "number", default: 1000, describe: "ms of guest writes measured before the snapshot" })
          .example("$0 demo", "1 GiB KVM guest (toy VMM), 1 vCPU writing 50k random pages/s, 64 MiB pool")
          .example("$0 demo --device", "a second process writes the same guest memory during the snapshot")
          .example("$0 demo --guest threads --memory anon-thp", "writer threads in this process over THP memory")
          .example("$0 demo --size 256MiB --rate 0 --buffer 0", "a small guest writing flat out, no pool (synchronous)")
          .example("$0 demo --json -o /tmp/guest.vmsnap", "keep the snapshot, print the report as JSON"),
      (a) => {
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
        if (a.output !== undefined && a.output.trim() === "") throw new UsageError("--output: give a file path")
        run = () =>
          demoCommand(io, {
            ...common(a), size, poolPages, writers: a.writers, rate: Math.round(a.rate), memory: a.memory as MemoryKind,
            output: a.output, keep: a.keep === true, warmupMs: a.warmup, faultAroundPages: around,
            guest: a.guest as "vmm" | "threads", device: a.device === true
          })
      }
    )
    .command(
      "agent",
      "serve VMMs on a Unix socket: they hand over their userfaultfd and guest memory, and snapshots are taken on request",
      (y) =>
        y
          .option("listen", { type: "string", demandOption: true, describe: "Unix socket path to listen on" })
          .example("$0 agent --listen /run/vmsnap.sock", "then start VMMs with that socket, and ask: vmsnap snapshot --agent /run/vmsnap.sock --vm ID -o FILE"),
      (a) => {
        if (a.listen.trim() === "") throw new UsageError("--listen: give a socket path")
        run = () => agentCommand(io, { ...common(a), listen: a.listen })
      }
    )
    .command(
      "snapshot",
      "take a live snapshot of a VM connected to an agent (--agent SOCK --vm ID), or of the first VMM that connects to --listen SOCK",
      (y) =>
        y
          .option("output", { alias: "o", type: "string", demandOption: true, describe: "snapshot file to write" })
          .option("agent", { type: "string", describe: "socket of a running `vmsnap agent`" })
          .option("vm", { type: "string", describe: "VM id (required with --agent)" })
          .option("listen", { type: "string", describe: "one-shot: listen here, wait for a VMM, snapshot it, exit" })
          .option("processes", { type: "number", default: 1, describe: "one-shot: wait until the VM has this many processes (VMM + devices)" })
          .option("wait", { type: "number", default: 60000, describe: "one-shot: ms to wait for the VMM" })
          .option("buffer", { type: "string", default: "64MiB", describe: "copy pool size (0: synchronous)" })
          .option("fault-around", { type: "number", default: 16, describe: "pages saved with each faulting page (power of two, 1 = off)" })
          .example("$0 snapshot --agent /run/vmsnap.sock --vm web-1 -o web-1.vmsnap", "")
          .example("$0 snapshot --listen /tmp/vmsnap.sock -o guest.vmsnap", "then start the VMM with --agent /tmp/vmsnap.sock"),
      (a) => {
        if ((a.agent === undefined) === (a.listen === undefined)) throw new UsageError("give exactly one of --agent SOCK (a running agent) or --listen SOCK (one-shot)")
        if (a.agent !== undefined && a.vm === undefined) throw new UsageError("--agent needs --vm ID (see the agent's log for connected VMs)")
        if (!Number.isInteger(a.processes) || a.processes < 1 || a.processes > 16) throw new UsageError(`--processes ${a.processes}: must be 1 to 16`)
        const poolPages = poolPagesOption(a.buffer)
        const around = faultAroundOption(a["fault-around"])
        run = () =>
          snapshotCommand(io, {
            ...common(a), output: a.output, agent: a.agent, listen: a.listen, vm: a.vm, processes: a.processes,
            waitMs: a.wait, poolPages, faultAroundPages: around
          })
      }
    )
    .command(
      "bench",
      "measure vmsnap against its baselines (no pool, a minimal C handler, fork, stop-the-world) on the same KVM guest",
      (y) =>
        y
          .option("sizes", { type: "string", default: "1GiB", describe: "comma-separated guest sizes" })
          .option("rate", { type: "number", default: 0, describe: "guest writes in pages/s (0: as fast as it can)" })
          .option("methods", { type: "string", default: BENCH_METHODS.join(","), describe: "comma-separated methods" })
          .option("vcpus", { type: "number", default: 1, describe: "guest vCPUs" })
          .option("warmup", { type: "number", default: 2000, describe: "ms the guest runs before each snapshot" })
          .option("after", { type: "number", default: 1000, describe: "ms measured after each snapshot" })
          .option("buffer", { type: "string", default: "64MiB", describe: "vmsnap's pool" })
          .option("compression", { choices: ["lz4", "none"] as const, default: "lz4" as const, describe: "vmsnap's record compression" })
          .option("fault-around", { type: "number", default: 16, describe: "vmsnap's fault-around window in pages (1 = off)" })
          .option("steer", { type: "boolean", default: true, describe: "vmsnap sweeps where the guest writes first (--no-steer: front to back)" })
          .option("pattern", { choices: ["random", "sequential"] as const, default: "random" as const, describe: "which pages the guest writes" })
          .option("restore", { type: "boolean", default: false, describe: "benchmark restore instead: lazy vs eager time to the guest's first write per size, and COPY / CONTINUE / MOVE at 512 MiB" })
          .example("$0 bench", "1 GiB, every method, about a minute")
          .example("$0 bench --sizes 1GiB,4GiB,8GiB --methods vmsnap,stop-the-world --json", "")
          .example("$0 bench --restore --sizes 1GiB,4GiB,8GiB", "lazy restore: first write must stay flat"),
      (a) => {
        const sizes = String(a.sizes).split(",").map((t) => sizeOption("sizes", t, 4 * 1024 * 1024))
        for (const s of sizes) if (s % (2 * 1024 * 1024) !== 0) throw new UsageError(`--sizes ${formatBytes(s)}: each must be a multiple of 2 MiB`)
        const methods = String(a.methods).split(",").map((m) => m.trim())
        for (const m of methods) if (!(BENCH_METHODS as ReadonlyArray<string>).includes(m)) throw new UsageError(`--methods: unknown method ${m} (known: ${BENCH_METHODS.join(", ")})`)
        if (!Number.isInteger(a.vcpus) || a.vcpus < 1 || a.vcpus > 32) throw new UsageError(`--vcpus ${a.vcpus}: must be 1 to 32`)
        if (!Number.isFinite(a.rate) || a.rate < 0) throw new UsageError(`--rate ${a.rate}: must be 0 or more pages/s`)
        const poolPages = poolPagesOption(a.buffer)
        if (a.restore) {
          run = () => restoreBenchCommand(io, { ...common(a), sizes })
          return
        }
        run = () =>
          benchCommand(io, {
            ...common(a), sizes, rate: Math.round(a.rate), methods: methods as Array<BenchMethod>, vcpus: a.vcpus,
            warmupMs: a.warmup, afterMs: a.after, poolPages, compression: a.compression as "lz4" | "none",
            faultAroundPages: faultAroundOption(a["fault-around"]), steer: a.steer !== false,
            pattern: a.pattern as "random" | "sequential"
          })
      }
    )
    .command(
      "serve <file>",
      "lazy restore: serve VMMs' guest memory from a snapshot on demand (Firecracker's UFFD handshake)",
      (y) =>
        y
          .positional("file", { type: "string", demandOption: true, describe: "snapshot file (or raw image with --raw)" })
          .option("socket", { type: "string", demandOption: true, describe: "Unix socket the VMMs connect to" })
          .option("raw", { type: "boolean", default: false, describe: "FILE is a raw memory image, not a vmsnap file" })
          .option("once", { type: "boolean", default: false, describe: "exit once the first VMM's memory is all resident" })
          .example("$0 serve --socket /tmp/uffd.sock guest.vmsnap", "then start the VMM with its UFFD handler socket set to /tmp/uffd.sock"),
      (a) => {
        if (a.socket.trim() === "") throw new UsageError("--socket: give a socket path")
        run = () => serveCommand(io, { ...common(a), file: a.file, socket: a.socket, raw: a.raw === true, once: a.once === true })
      }
    )
    .command(
      "inspect <file>",
      "show a snapshot's header, regions, page counts and compression ratio",
      (y) => y.positional("file", { type: "string", demandOption: true, describe: "snapshot file" }).example("$0 inspect guest.vmsnap --json", ""),
      (a) => {
        run = () => inspectCommand(io, { ...common(a), file: a.file })
      }
    )
    .command(
      "verify <file>",
      "check a snapshot's structure and every checksum, and that every page is stored exactly once",
      (y) => y.positional("file", { type: "string", demandOption: true, describe: "snapshot file" }).example("$0 verify guest.vmsnap", ""),
      (a) => {
        run = () => verifyCommand(io, { ...common(a), file: a.file })
      }
    )
    .command(
      "restore <file>",
      "restore a snapshot into a raw memory image (zero pages stay sparse holes)",
      (y) =>
        y
          .positional("file", { type: "string", demandOption: true, describe: "snapshot file" })
          .option("raw", { type: "string", demandOption: true, describe: "raw image to write" })
          .option("layout", {
            choices: ["concat", "per-region"] as const,
            default: "concat" as const,
            describe: "concat: region i at the sum of the sizes before it in one file; per-region: OUT.0, OUT.1, ..."
          })
          .example("$0 restore guest.vmsnap --raw guest.img", "")
          .example("$0 restore guest.vmsnap --raw guest.img --layout per-region", "writes guest.img.0, guest.img.1, ..."),
      (a) => {
        if (a.raw.trim() === "") throw new UsageError("--raw: give a file path")
        run = () => restoreCommand(io, { ...common(a), file: a.file, raw: a.raw, layout: a.layout as RawLayout })
      }
    )
    .demandCommand(1, "name a command (demo, agent, snapshot, serve, bench, inspect, verify, restore)")
    .strict()
    .recommendCommands()
    .epilogue(EXIT_CODES)
    .help()
    .version("0.1.0")
    .wrap(Math.min(110, process.stdout.columns ?? 100))
    .exitProcess(false)
    .fail((msg, err) => {
      throw err instanceof UsageError ? err : new UsageError(msg ?? err?.message ?? "invalid usage")
    })

  let helpText = ""
  try {
    await parser.parseAsync([...argv], {}, (_err, _args, output) => {
      helpText = output
    })
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e)
    if (argv.includes("--json")) io.stdout(JSON.stringify({ ok: false, error: { tag: "UsageError", message }, exitCode: ExitCode.usage }) + "\n")
    else io.stderr(`vmsnap: ${message}\nRun \`vmsnap --help\` for usage.\n`)
    return ExitCode.usage
  }
  if (run === undefined) {
    // --help or --version: yargs produced the text instead of running a command.
    if (helpText) io.stdout(helpText + "\n")
    return ExitCode.ok
  }
  return run()
}
