//! Handing freed memory back to the operating system.
//!
//! glibc's allocator keeps what a program frees in its arenas (one per thread that allocated
//! under contention) for the next allocation, and returns it to the system only when the top of
//! an arena is free. A training job allocates and frees gigabytes of activations and gradients
//! from the training thread and the compute pool; once it ends, that memory would stay resident
//! in the process (a `serve` process kept ~850 MiB after a QLoRA job on SmolLM2-135M, see
//! `scripts/job_memory.py`) although nothing uses it. `malloc_trim(0)` walks every arena and
//! returns its free pages.

/// Returns the allocator's free memory to the system; call when a large working set was freed.
/// A no-op where the allocator is not glibc's.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reorganises the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
