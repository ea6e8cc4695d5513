/**
 * vmsnap's test rig: the demo guest, the toy VMM's driver and the benchmarks.
 * `vmsnap demo`, `vmsnap bench` and the tests use it; an embedding VMM needs
 * only @vmsnap/core.
 */
export * from "./DemoGuest.js"
export * from "./ToyVmm.js"
export * from "./Benchmark.js"
export * from "./RestoreBenchmark.js"
export type { GuestWindow, Spread } from "./BenchWindows.js"
export * from "./QemuBench.js"
export type { GuestPhase, MemoryPeak } from "./RealBenchReport.js"
export * from "./RedisBench.js"
