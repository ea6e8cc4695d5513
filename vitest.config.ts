import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["packages/*/test/**/*.test.ts", "test/**/*.test.ts"],
    // Tests share the kernel and the two cores: run files one at a time.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 60_000,
    // A native call that never returns would stop vitest's timeouts too: report it and go on.
    setupFiles: ["test/hangWatchdog.ts"],
    reporters: ["default"]
  }
})
