//! Benchmark commands that print one JSON line in the format of `shared/perf` (see its README),
//! so `compare.sh` can run them side by side with the PyTorch reference.

mod dpo;
mod encoder;
pub mod generate;
mod seq2seq;
pub mod serve;
pub mod train;

/// A model directory, or a GGUF file in its directory form (kept alive by the returned guard).
pub fn model_dir(path: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let dir = tempfile::tempdir()?;
        crate::models::gguf::materialize(path, dir.path())?;
        return Ok((dir.path().to_path_buf(), Some(dir)));
    }
    Ok((path.to_path_buf(), None))
}

/// The device a benchmark runs on (`--device`), opened, or why it cannot be.
pub fn open_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    Ok(spec.parse::<crate::device::DeviceSpec>()?.open()?)
}

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
