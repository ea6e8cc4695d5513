/**
 * `vmsnap serve --socket PATH FILE`: a page-fault handler for lazy restore
 * that speaks Firecracker's UFFD handshake. Serves VMMs until SIGINT/SIGTERM
 * (or, with --once, until the first VMM served has all its memory resident,
 * exit 0, or has failed: exit 3 if a record could not be produced, else 1).
 * Before listening it checks the file's structure (as verify does, without
 * the records' checksums: coverage, a page stored twice, region page sizes);
 * --verify checks every record first. docs/lazy-restore.md.
 */
import { RestoreServer, type ServeStop, SnapshotFormatError, SnapshotIoError, verifySnapshot } from "@vmsnap/core"
import { Effect } from "effect"
import { existsSync } from "node:fs"
import { InvalidInput } from "@vmsnap/core"
import { ExitCode } from "../ExitCode.js"
import type { Io } from "../Io.js"
import { type CliCommand, defineCommand } from "../Command.js"
import { commonFlags, UsageError } from "../Options.js"
import { type CommonFlags, runCommand } from "../Run.js"

/** How the first VMM served ended (--once): a record that could not be produced makes it `corrupt` (exit 3). */
interface FirstServed {
  readonly pid: number
  readonly ok: boolean
  readonly error?: string
  readonly corrupt: boolean
}

export interface ServeFlags extends CommonFlags {
  readonly socket: string
  readonly file: string
  readonly raw: boolean
  readonly once: boolean
  readonly verify: boolean
}

/** What SIGINT/SIGTERM did to serve (RestoreServer.close, run as the scope ends). */
const stopMessage = (file: string, stopped: ServeStop | undefined): string => {
  const vmms = !stopped || stopped.served === 0
    ? "no VMM was being served"
    : `${stopped.served} VMM(s) were being served, each got its finished event; ${stopped.pagesLeft === 0
      ? "each had every page settled"
      : `${stopped.pagesLeft} of them still had pages to install: those ranges stay registered to the VMM's userfaultfd and its guest cannot run (restart that VMM)`}`
  return `stopped serving ${file} (the socket is removed; connections still sending their first message were refused); ${vmms}`
}

export const runServe = (io: Io, flags: ServeFlags) => {
  let stopped: ServeStop | undefined
  return runCommand(
    io,
    flags,
    Effect.scoped(
      Effect.gen(function* () {
        if (!existsSync(flags.file)) return yield* Effect.fail(new InvalidInput({ reason: `${flags.file}: no such file` }))
        // Reject a corrupt or foreign file before any VMM depends on it: the
        // structure always (RestoreServer.listen), every record with --verify.
        if (!flags.raw && flags.verify) yield* verifySnapshot(flags.file)
        const emit = (event: Record<string, unknown>, human: string) =>
          flags.json ? io.stdout(JSON.stringify({ time: new Date().toISOString(), ...event }) + "\n") : io.stderr(`vmsnap serve: ${human}\n`)
        // --once: the first VMM served (not one refused at the handshake) decides the exit, success or failure.
        let finish: ((first: FirstServed) => void) | undefined
        const firstDone = new Promise<FirstServed>((resolve) => (finish = resolve))
        const server = new RestoreServer(flags.socket, { path: flags.file, raw: flags.raw }, {
          log: (line) => emit({ type: "log", message: line }, line),
          onRefused: (pid, reason) => emit({ type: "refused", pid, reason }, `refused a VMM${pid ? ` (pid ${pid})` : ""}: ${reason}`),
          onPageFailure: (pid, s) =>
            emit(
              {
                type: "page-failure", pid, pagesFailed: s.pagesFailed, pagesUnallocated: s.pagesUnallocated, pagesPoisoned: s.pagesPoisoned, pagesGone: s.pagesGone, failedRecord: s.failedRecord,
                faultsOutside: s.faultsOutside, outsidePoisoned: s.outsidePoisoned, firstOutsideHva: s.firstOutsideHva
              },
              `VMM pid ${pid}: ${s.pagesFailed} page(s) cannot be produced (${s.pagesPoisoned} poisoned), ${s.pagesGone} no longer registered (remapped by the VMM), ${s.faultsOutside} fault(s) outside every region`
            ),
          onFirstPage: (pid, times) =>
            emit({ type: "first-page", pid, ...times }, `VMM pid ${pid}: first page installed ${times.handshakeToFirstPageMs?.toFixed(3)} ms after the handshake`),
          onFinished: (pid, outcome) => {
            emit({ type: "finished", pid, ok: outcome.ok, error: outcome.error ?? null, ...outcome.stats, ...outcome.handshake }, `VMM pid ${pid}: ${outcome.ok ? "done" : "failed"}`)
            finish?.({ pid, ok: outcome.ok, error: outcome.error, corrupt: outcome.stats.failedRecord !== null })
          }
        })
        yield* Effect.acquireRelease(
          Effect.tryPromise({
            try: () => server.listen(),
            catch: (e) => (e instanceof SnapshotFormatError || e instanceof SnapshotIoError || e instanceof InvalidInput ? e : new InvalidInput({ reason: `cannot listen on ${flags.socket}: ${String(e)}` }))
          }),
          () => Effect.promise(async () => void (stopped = await server.close()))
        )
        emit({ type: "listening", socket: flags.socket, file: flags.file }, `listening on ${flags.socket}, serving ${flags.file}${flags.raw ? " (raw image)" : ""} (Ctrl-C to stop)`)
        // A VMM whose ranges stay registered (failed pages, undeclared pages) is served until it disconnects: exiting
        // earlier would leave its faults and discards there waiting for a handler that is gone.
        if (flags.once) return yield* Effect.promise(() => firstDone.then(async (first) => (await server.idle(), first)))
        return yield* Effect.never
      })
    ),
    (first) =>
      first.ok
        ? { human: `vmsnap serve: VMM pid ${first.pid} restored; exiting (--once)`, json: { type: "exit", pid: first.pid, ok: true } }
        : {
          human: `vmsnap serve: VMM pid ${first.pid}: ${first.error}; exiting (--once)`,
          json: { type: "exit", pid: first.pid, ok: false, error: first.error },
          exitCode: first.corrupt ? ExitCode.corrupt : ExitCode.failure
        },
    () => stopMessage(flags.file, stopped)
  )
}

export const serveCommand: CliCommand = (io, schedule) =>
  defineCommand({
    command: "serve <file>",
    describe: "lazy restore: serve VMMs' guest memory from a snapshot on demand (Firecracker's UFFD handshake)",
    builder: (y) =>
      y
        .positional("file", { type: "string", demandOption: true, describe: "snapshot file (or raw image with --raw)" })
        .option("socket", { type: "string", demandOption: true, describe: "Unix socket the VMMs connect to" })
        .option("raw", { type: "boolean", default: false, describe: "FILE is a raw memory image, not a vmsnap file" })
        .option("once", { type: "boolean", default: false, describe: "exit once the first VMM served has all its memory resident (exit 0), or has failed (exit 3: a record could not be produced; 1: another failure); VMMs refused at the handshake do not count" })
        .option("verify", { type: "boolean", default: false, describe: "check every record's checksum before listening (reads the whole file; the structure is always checked)" })
        .example("$0 serve --socket /tmp/uffd.sock guest.vmsnap", "then start the VMM with its UFFD handler socket set to /tmp/uffd.sock"),
    handler: (a) => {
      if (a.socket.trim() === "") throw new UsageError("--socket: give a socket path")
      schedule(() => runServe(io, { ...commonFlags(a), file: a.file, socket: a.socket, raw: a.raw === true, once: a.once === true, verify: a.verify === true }))
    }
  })
