//! Benchmark commands that print one JSON line in the format of `shared/perf` (see its README),
//! so `compare.sh` can run them side by side with the PyTorch reference.

pub mod generate;
pub mod serve;
pub mod train;

/// Peak resident set size of this process in MiB (Linux `VmHWM`; `ru_maxrss` equivalent).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(str::to_string)))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the machine's cores).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}
