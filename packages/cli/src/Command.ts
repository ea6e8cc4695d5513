/**
 * What a command file exports: a yargs command module built for one `Io`.
 * Its handler checks the options (throwing `UsageError`) and hands `main` the
 * run to start once parsing is over, so a usage error never starts work and
 * a failure of the run is never taken for a usage error.
 */
import type { ArgumentsCamelCase, Argv, CommandModule } from "yargs"
import type { Io } from "./Io.js"
import type { GlobalArgs } from "./Options.js"

/** Receives the command's run; `main` calls it after parsing. */
export type Schedule = (run: () => Promise<number>) => void

export type CliCommand = (io: Io, schedule: Schedule) => CommandModule<GlobalArgs, any>

/** A command module whose handler's arguments are typed from its builder. */
export const defineCommand = <U>(spec: {
  readonly command: string
  readonly describe: string
  readonly builder: (y: Argv<GlobalArgs>) => Argv<U>
  readonly handler: (a: ArgumentsCamelCase<U>) => void
}): CommandModule<GlobalArgs, U> => spec
