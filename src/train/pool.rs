//! Running training steps on rayon's pool.
//!
//! candle parallelises each operation with rayon. Called from a thread outside the pool, every
//! operation hands its work to the pool and sleeps until it is done: a wake-up and a context
//! switch per operation, many hundreds per step (a `perf record` of decoding, which has the same
//! pattern, put ~10% of the time in futex and `sched_yield`). Called from a pool thread, the work
//! starts at once on that thread and the other workers steal from it.

use std::sync::Once;

/// Stack of the pool's threads: candle's backward walks the graph recursively, and a deep model's
/// graph overflowed the default 2 MiB (see `shared/notes/candle-training.md`).
const STACK_BYTES: usize = 64 << 20;

static INIT: Once = Once::new();

/// Builds rayon's global pool with large stacks, unless something built it already (then its
/// threads keep their stacks). Call it before any parallel work: `main` does.
pub fn init_pool() {
    INIT.call_once(|| {
        let _ = rayon::ThreadPoolBuilder::new().stack_size(STACK_BYTES).build_global();
    });
}

/// Runs `work` on a thread of rayon's global pool and returns its result.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    init_pool();
    rayon::scope(|_| work())
}
