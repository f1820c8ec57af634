//! Memory budget → chunk size and worker count.
//!
//! The working set of a run is `workers × checkpoints × (chunk + companion + one page)` plus a small
//! fixed decode scratch per worker. The chunk size depends only on the budget and the number of
//! checkpoints — never on the thread count — so results are bit-identical whatever `--threads` is;
//! the number of workers is then cut so the working set fits the budget.

use crate::error::{Error, Result};

/// Default budget: 512 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 << 20;
/// Smallest budget accepted.
pub const MIN_MEMORY_BUDGET: u64 = 8 << 20;
/// Largest chunk per checkpoint. Small enough that a worker's chunks (one per checkpoint) are
/// still in L2/L3 when the kernel decodes them right after `pread` copied them: on the 2-vCPU Xeon
/// we measure on, 512 KiB chunks run the warm pass at 7.5 GB/s, 8 MiB chunks at 5.1 GB/s
/// (`examples/traj_speed.rs` on the 4.4 GB benchmark pair).
const MAX_CHUNK: u64 = 512 << 10;
/// Smallest chunk per checkpoint.
const MIN_CHUNK: u64 = 128 << 10;
/// Decode scratch and bookkeeping per worker, per checkpoint.
pub(crate) const SCRATCH_PER_CKPT: u64 = 64 << 10;

/// Chunking decisions for one run.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes of one checkpoint's data per chunk.
    pub chunk_bytes: u64,
    /// Workers that fit.
    pub workers: usize,
    /// The budget.
    pub total: u64,
}

impl Budget {
    /// Decide chunk size and workers for `n_ckpt` checkpoints and `threads` requested workers;
    /// `chunk` overrides the chunk size (bytes per checkpoint, at least 4 KiB).
    pub fn new(total: u64, n_ckpt: usize, threads: usize, chunk: Option<u64>) -> Result<Budget> {
        if total < MIN_MEMORY_BUDGET {
            return Err(Error::Config {
                reason: format!("memory budget {total} bytes is below the minimum of {MIN_MEMORY_BUDGET} bytes (8 MiB)"),
            });
        }
        if threads == 0 {
            return Err(Error::Config {
                reason: "threads must be at least 1".into(),
            });
        }
        let n = n_ckpt.max(1) as u64;
        // Room for two workers' worth of chunks (the companion tensor of a chunk is at most half
        // its size, hence the 3/2) before the chunk size itself is reduced.
        let per_worker_ckpt = total / (2 * n);
        let chunk = match chunk {
            Some(c) if c < 4096 => {
                return Err(Error::Config {
                    reason: format!("chunk size {c} bytes is below the minimum of 4096 bytes"),
                })
            }
            Some(c) => c,
            None => (per_worker_ckpt.saturating_sub(SCRATCH_PER_CKPT + 4096) * 2 / 3)
                .clamp(MIN_CHUNK, MAX_CHUNK),
        };
        let per_worker = n * (chunk * 3 / 2 + SCRATCH_PER_CKPT + 4096);
        if per_worker > total {
            return Err(Error::Config {
                reason: format!(
                    "memory budget of {} MiB is too small for {n_ckpt} checkpoints (needs at least {} MiB)",
                    total >> 20,
                    per_worker.div_ceil(1 << 20)
                ),
            });
        }
        let workers = ((total / per_worker) as usize).clamp(1, threads);
        Ok(Budget {
            chunk_bytes: chunk,
            workers,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_independent_of_threads_and_fits() {
        for n in 2..10 {
            let a = Budget::new(DEFAULT_MEMORY_BUDGET, n, 1, None).unwrap();
            let b = Budget::new(DEFAULT_MEMORY_BUDGET, n, 64, None).unwrap();
            assert_eq!(a.chunk_bytes, b.chunk_bytes);
            let used =
                b.workers as u64 * n as u64 * (b.chunk_bytes * 3 / 2 + SCRATCH_PER_CKPT + 4096);
            assert!(used <= DEFAULT_MEMORY_BUDGET);
        }
        assert!(Budget::new(1 << 20, 2, 1, None).is_err());
        assert!(Budget::new(DEFAULT_MEMORY_BUDGET, 2, 1, Some(1 << 30)).is_err());
        assert_eq!(
            Budget::new(DEFAULT_MEMORY_BUDGET, 2, 1, Some(64 << 20))
                .unwrap()
                .chunk_bytes,
            64 << 20
        );
    }
}
