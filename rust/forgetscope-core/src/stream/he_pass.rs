//! `hyperspherical_energy` along a trajectory: HE of every 2-D weight matrix in every checkpoint,
//! on the same seeded sample of neurons (rows) in each, so that HE_t − HE_0 compares like with like.
//!
//! Matrices with more than `max_neurons` rows (embeddings, lm_head, wide MLPs) are subsampled, and
//! only the sampled rows are read. The kernel itself is in [`crate::metrics::he`]; this pass only
//! chooses tensors, reads rows and collects results. 3-D fused expert tensors are left out (which
//! axis holds the neurons depends on the family; the structure resolver will decide it) and are
//! reported as skipped.

use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::budget::Budget;
use super::plan::plan_trajectory;
use super::rows::{read_rows, sample_indices};
use super::{as_paths, Control, RunOptions};
use crate::error::{Error, Result};
use crate::layout::parse_name;
use crate::metrics::he::{hyperspherical_energy, HeOptions, HeResult};
use crate::source::{open_checkpoint, LogicalTensor};

/// Options of the HE pass.
#[derive(Debug, Clone)]
pub struct HePassOptions {
    /// Kernel options (axis is always rows here; `max_neurons` of the kernel is not used).
    pub he: HeOptions,
    /// Rows sampled per matrix (seeded by `he.seed`); 0 = all rows.
    pub max_neurons: usize,
}

impl Default for HePassOptions {
    fn default() -> Self {
        HePassOptions {
            he: HeOptions::default(),
            max_neurons: 4096,
        }
    }
}

/// HE of one matrix across checkpoints.
#[derive(Debug, Clone, Serialize)]
pub struct HeTrajectory {
    /// Tensor name.
    pub name: String,
    /// Layer parsed from the name.
    pub layer: Option<u32>,
    /// Expert parsed from the name.
    pub expert: Option<u32>,
    /// Module kind.
    pub kind: String,
    /// Shape `[rows, cols]`.
    pub shape: Vec<u64>,
    /// Rows used (the same in every checkpoint).
    pub n_sampled: usize,
    /// One result per checkpoint (index 0 = base).
    pub per_checkpoint: Vec<HeResult>,
}

/// A tensor left out of the HE pass, and why.
#[derive(Debug, Clone, Serialize)]
pub struct HeSkipped {
    /// Tensor name.
    pub name: String,
    /// Reason.
    pub reason: String,
}

/// HE of every 2-D tensor common to all checkpoints (the first path is the base).
pub fn he_trajectory(
    paths: &[impl AsRef<Path>],
    opts: &RunOptions,
    he: &HePassOptions,
    control: &Control,
) -> Result<(Vec<HeTrajectory>, Vec<HeSkipped>)> {
    let paths = as_paths(paths);
    if paths.is_empty() {
        return Err(Error::Config {
            reason: "the HE pass needs at least one checkpoint".into(),
        });
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.threads
    };
    let budget = Budget::new(
        opts.memory_budget,
        paths.len().max(2),
        threads,
        opts.chunk_bytes,
    )?;
    let ckpts: Vec<_> = paths
        .iter()
        .map(|p| open_checkpoint(p, &opts.open))
        .collect::<Result<_>>()?;
    // (name, the tensor in each checkpoint): paired across checkpoints, or the base's own list.
    let items: Vec<(String, Vec<LogicalTensor>)> = if ckpts.len() >= 2 {
        plan_trajectory(&ckpts, &budget)
            .tensors
            .into_iter()
            .map(|t| (t.name, t.per_ckpt))
            .collect()
    } else {
        ckpts[0]
            .tensors
            .iter()
            .map(|t| (t.name.clone(), vec![t.clone()]))
            .collect()
    };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (name, per) in &items {
        if per[0].shape.len() == 3 {
            skipped.push(HeSkipped {
                name: name.clone(),
                reason:
                    "3-D fused expert tensor: per-expert HE needs the family's layout (neuron axis)"
                        .into(),
            });
        }
    }
    let matrices: Vec<_> = items
        .iter()
        .filter(|(_, per)| per[0].shape.len() == 2)
        .collect();
    control
        .total_tensors
        .store(matrices.len() as u64, Ordering::Relaxed);
    let he_opts = HeOptions {
        max_neurons: None,
        threads,
        ..he.he.clone()
    };
    for (name, per_ckpt) in matrices {
        if control.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let shape = per_ckpt[0].shape.clone();
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        if rows < 2 || cols == 0 {
            skipped.push(HeSkipped {
                name: name.clone(),
                reason: format!("shape {shape:?} has fewer than 2 neurons"),
            });
            continue;
        }
        // The sample must also fit the budget as f32 (half of it; the rest is kernel scratch).
        let fit = ((budget.total / 2) / (cols as u64 * 4)).max(2) as usize;
        let k = match he.max_neurons {
            0 => rows,
            m => m.min(rows),
        }
        .min(fit);
        let sample = sample_indices(rows, k, he.he.seed);
        let mut per = Vec::with_capacity(per_ckpt.len());
        for (c, t) in per_ckpt.iter().enumerate() {
            let data = read_rows(&ckpts[c], t, &sample)?;
            let mut r = hyperspherical_energy(&data, sample.len(), cols, &he_opts)?;
            r.n_total = rows;
            r.subsampled = sample.len() < rows;
            per.push(r);
            control.done_bytes.fetch_add(
                (sample.len() * cols) as u64 * t.max_elem_bytes(),
                Ordering::Relaxed,
            );
        }
        control.done_tensors.fetch_add(1, Ordering::Relaxed);
        let info = parse_name(name);
        out.push(HeTrajectory {
            name: name.clone(),
            layer: info.layer,
            expert: info.expert,
            kind: info.kind.to_string(),
            shape,
            n_sampled: sample.len(),
            per_checkpoint: per,
        });
    }
    Ok((out, skipped))
}
