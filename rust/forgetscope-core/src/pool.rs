//! Worker pools that end with the call that made them.
//!
//! Dropping a `rayon::ThreadPool` lets its threads wind down in the background, and even scoped
//! threads are only waited for until their closure returns, not until the OS thread has run its
//! thread-local destructors. Either way a run's workers could outlive the run: a process that forks
//! right after would still carry them, and LeakSanitizer (the fuzz targets) reported the half-torn-
//! down threads' allocations as leaks. Here every worker is spawned with a kept `JoinHandle` and
//! joined after the pool is dropped, so when `with_pool` returns its threads are gone.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// Run `f` with a pool of `threads` workers named `{name}-{i}`; every worker thread has exited when
/// this returns.
pub(crate) fn with_pool<R>(
    threads: usize,
    name: &'static str,
    f: impl FnOnce(&rayon::ThreadPool) -> R,
) -> Result<R> {
    let handles = Mutex::new(Vec::with_capacity(threads));
    let config_err = |e: &dyn std::fmt::Display| Error::Config {
        reason: format!("cannot start {threads} worker threads: {e}"),
    };
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .spawn_handler(|worker| {
            let mut b = std::thread::Builder::new();
            if let Some(n) = worker.name() {
                b = b.name(n.to_owned());
            }
            if let Some(s) = worker.stack_size() {
                b = b.stack_size(s);
            }
            let h = b.spawn(|| worker.run())?;
            handles.lock().expect("handles").push(h);
            Ok(())
        })
        .build();
    let pool = built.map_err(|e| config_err(&e))?;
    let result = f(&pool);
    // Dropping the pool tells its workers to stop; then wait for each OS thread to finish. (If
    // building failed, the threads already started are left to rayon rather than risk a hang.)
    drop(pool);
    for h in handles.into_inner().expect("handles") {
        let _ = h.join();
    }
    Ok(result)
}
