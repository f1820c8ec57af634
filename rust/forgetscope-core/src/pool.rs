//! Worker pools that end with the call that made them.
//!
//! Dropping a `rayon::ThreadPool` lets its threads wind down in the background, so a run's
//! workers could outlive the run: a process that forks right after a run would still carry them,
//! and LeakSanitizer (the fuzz targets) reported a half-started worker's deque as leaked. Running
//! the workers as scoped threads (`build_scoped`) joins every one of them before the run returns.

use crate::error::{Error, Result};

/// Run `f` with a pool of `threads` workers named `{name}-{i}`; all of them have exited when this
/// returns.
pub(crate) fn with_pool<R>(
    threads: usize,
    name: &'static str,
    f: impl FnOnce(&rayon::ThreadPool) -> R,
) -> Result<R> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build_scoped(|worker| worker.run(), f)
        .map_err(|e| Error::Config {
            reason: format!("cannot start {threads} worker threads: {e}"),
        })
}
