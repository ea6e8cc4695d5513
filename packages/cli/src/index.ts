export { main } from "./main.js"
export { ExitCode } from "./ExitCode.js"
export { type Io, memoryIo, processIo } from "./Io.js"
