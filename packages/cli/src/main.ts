/**
 * vmsnap's command line. `main(argv)` parses, runs one command and returns
 * its exit code; it never calls process.exit, so tests call it in-process.
 * Each command declares its options in its own file (commands/); options
 * several commands share are in Options.ts.
 */
import yargs from "yargs"
import type { CliCommand } from "./Command.js"
import { agentCommand } from "./commands/agent.js"
import { benchCommand } from "./commands/bench.js"
import { demoCommand } from "./commands/demo.js"
import { inspectCommand } from "./commands/inspect.js"
import { restoreCommand } from "./commands/restore.js"
import { serveCommand } from "./commands/serve.js"
import { snapshotCommand } from "./commands/snapshot.js"
import { verifyCommand } from "./commands/verify.js"
import { ExitCode } from "./ExitCode.js"
import { type Io, processIo } from "./Io.js"
import { globalOptions, UsageError } from "./Options.js"

/** In the order `--help` lists them. */
const COMMANDS: ReadonlyArray<CliCommand> = [
  demoCommand, agentCommand, snapshotCommand, benchCommand, serveCommand, inspectCommand, verifyCommand, restoreCommand
]

const EXIT_CODES = `Exit codes: 0 ok, 1 failure, 2 usage error, 3 not a valid snapshot (corrupt, truncated, not ours),
4 the kernel or permissions lack userfaultfd support, 130 interrupted (SIGINT), 143 terminated (SIGTERM).`

export const main = async (argv: ReadonlyArray<string>, io: Io = processIo): Promise<number> => {
  let run: (() => Promise<number>) | undefined
  const schedule = (r: () => Promise<number>) => {
    run = r
  }
  const parser = globalOptions(
    yargs().scriptName("vmsnap").usage("vmsnap: live, point-in-time snapshots of VM guest memory (userfaultfd write-protect)\n\nUsage: $0 <command> [options]")
  )
  for (const command of COMMANDS) parser.command(command(io, schedule))
  parser
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
