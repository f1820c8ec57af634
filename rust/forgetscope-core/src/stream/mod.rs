//! Stage 2: pair tensors across checkpoints, cut them into chunks under a memory budget, and drive
//! workers that read each chunk once per checkpoint and feed every accumulator.

pub mod analyze;
mod budget;
mod driver;
pub mod fingerprint;
pub mod he_pass;
pub mod partial;
mod plan;
pub(crate) mod reader;
pub mod rows;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use analyze::{analyze, AnalyzeOptions, MetricSet};
pub use budget::{Budget, DEFAULT_MEMORY_BUDGET, MIN_MEMORY_BUDGET};
pub use driver::{read_tensor, trajectory};
pub use plan::{plan_trajectory, Plan};

use crate::error::Result;
use crate::source::{open_checkpoint, Checkpoint, OpenOptions};

/// Options of a streaming run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    /// Upper bound for read buffers and decode scratch, in bytes.
    pub memory_budget: u64,
    /// How checkpoints are opened.
    pub open: OpenOptions,
    /// Bytes per checkpoint read at a time; `None` picks a cache-friendly size (≤ 512 KiB).
    pub chunk_bytes: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            threads: 0,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            open: OpenOptions::default(),
            chunk_bytes: None,
        }
    }
}

/// Shared between a run and its caller: cancellation and progress counters, safe to poll from any
/// thread while the run is going.
#[derive(Debug, Default)]
pub struct Control {
    cancel: AtomicBool,
    /// Bytes of tensor data processed so far.
    pub done_bytes: AtomicU64,
    /// Bytes of tensor data to process (known once planning is done).
    pub total_bytes: AtomicU64,
    /// Tensors fully processed.
    pub done_tensors: AtomicU64,
    /// Tensors to process.
    pub total_tensors: AtomicU64,
}

impl Control {
    /// A fresh control block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the run to stop; it returns [`crate::Error::Cancelled`] within one chunk per worker.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Open and validate a checkpoint, for listing.
pub fn inspect(path: &std::path::Path, opts: &OpenOptions) -> Result<Checkpoint> {
    open_checkpoint(path, opts)
}

pub(crate) fn as_paths(paths: &[impl AsRef<std::path::Path>]) -> Vec<PathBuf> {
    paths.iter().map(|p| p.as_ref().to_path_buf()).collect()
}
