//! The run loop: open and validate every checkpoint first (so bad input fails before any work),
//! plan, then let a dedicated rayon pool of `workers` threads pull chunks in file order from a
//! shared counter. Each worker owns its buffers; partial accumulators are stored per chunk and
//! merged in chunk order, so results do not depend on scheduling.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::budget::Budget;
use super::plan::{chunk_elems, plan_trajectory, Plan};
use super::reader::ChunkReader;
use super::{as_paths, Control, RunOptions};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layout::parse_name;
use crate::metrics::drift::DriftAcc;
use crate::results::{
    trajectory_conventions, CheckpointInfo, RunStats, TensorTrajectory, TrajectoryReport,
    SCHEMA_VERSION,
};
use crate::source::{open_checkpoint, Checkpoint, Encoding, Layout, OpenOptions};

pub(crate) fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    }
}

fn layout_name(l: &Layout) -> &'static str {
    match l {
        Layout::SingleFile => "single_file",
        Layout::Directory => "directory",
        Layout::Sharded { .. } => "sharded",
    }
}

/// Weight trajectories of every tensor across `paths` (the first is the base).
pub fn trajectory(
    paths: &[impl AsRef<Path>],
    opts: &RunOptions,
    control: &Control,
) -> Result<TrajectoryReport> {
    let paths = as_paths(paths);
    if paths.len() < 2 {
        return Err(Error::Config {
            reason: "a trajectory needs a base and at least one more checkpoint".into(),
        });
    }
    let threads = resolve_threads(opts.threads);
    let budget = Budget::new(opts.memory_budget, paths.len(), threads, opts.chunk_bytes)?;
    let mut ckpts = Vec::with_capacity(paths.len());
    for p in &paths {
        if control.is_cancelled() {
            return Err(Error::Cancelled);
        }
        ckpts.push(open_checkpoint(p, &opts.open)?);
    }
    let plan = plan_trajectory(&ckpts, &budget);
    let started = Instant::now();
    let include = vec![true; plan.tensors.len()];
    let accs = stream_drift(&ckpts, &plan, &budget, control, &include)?;
    let accs = accs
        .into_iter()
        .map(|a| a.expect("every tensor included"))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    Ok(trajectory_report(&ckpts, &plan, accs, &budget, seconds))
}

/// Stream every included tensor of `plan` once per checkpoint with `budget.workers` threads and
/// return its merged drift accumulator (None for tensors not included). Progress counters in
/// `control` are set for the included tensors.
pub(crate) fn stream_drift(
    ckpts: &[Checkpoint],
    plan: &Plan,
    budget: &Budget,
    control: &Control,
    include: &[bool],
) -> Result<Vec<Option<DriftAcc>>> {
    let n = ckpts.len();
    let refs: Vec<&Checkpoint> = ckpts.iter().collect();
    let chunks: Vec<usize> = (0..plan.chunks.len())
        .filter(|&i| include[plan.chunks[i].tensor])
        .collect();
    control.total_bytes.fetch_add(
        chunks.iter().map(|&i| plan.chunks[i].bytes).sum::<u64>(),
        Ordering::Relaxed,
    );
    control.total_tensors.fetch_add(
        include.iter().filter(|&&x| x).count() as u64,
        Ordering::Relaxed,
    );

    let slots: Vec<OnceLock<DriftAcc>> = (0..plan.chunks.len()).map(|_| OnceLock::new()).collect();
    let remaining: Vec<AtomicU32> = plan
        .tensors
        .iter()
        .map(|t| AtomicU32::new(t.n_chunks as u32))
        .collect();
    let empty = plan
        .tensors
        .iter()
        .zip(include)
        .filter(|(t, &inc)| inc && t.n_chunks == 0)
        .count() as u64;
    control.done_tensors.fetch_add(empty, Ordering::Relaxed);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);

    crate::pool::with_pool(budget.workers, "forgetscope", |pool| {
        pool.broadcast(|_| {
            let mut reader = ChunkReader::new(n);
            loop {
                if stop.load(Ordering::Relaxed) || control.is_cancelled() {
                    return;
                }
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = chunks.get(j) else {
                    return;
                };
                let chunk = &plan.chunks[i];
                let pt = &plan.tensors[chunk.tensor];
                let per: Vec<_> = pt.per_ckpt.iter().collect();
                let mut acc = DriftAcc::new(n);
                // Two plain-bf16 checkpoints (the common case) take the fused decode-as-you-go kernel.
                let raw_bf16 = n == 2
                    && per.iter().all(|t| {
                        matches!(t.encoding, Encoding::Plain) && t.data.dtype == Dtype::BF16
                    });
                let done = if raw_bf16 {
                    reader.for_each_raw_block(&refs, &per, chunk.e0, chunk.e1, |_, b| {
                        acc.update_bf16_pair(b[0], b[1])
                    })
                } else {
                    reader.for_each_block(&refs, &per, chunk.e0, chunk.e1, |_, w| acc.update(w))
                };
                match done {
                    Ok(()) => {
                        let _ = slots[i].set(acc);
                        control.done_bytes.fetch_add(chunk.bytes, Ordering::Relaxed);
                        if remaining[chunk.tensor].fetch_sub(1, Ordering::AcqRel) == 1 {
                            control.done_tensors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_error.lock().expect("error slot").get_or_insert(e);
                        return;
                    }
                }
            }
        })
    })?;
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    if control.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(plan
        .tensors
        .iter()
        .zip(include)
        .map(|(pt, &inc)| {
            inc.then(|| {
                let mut acc = DriftAcc::new(n);
                for slot in &slots[pt.first_chunk..pt.first_chunk + pt.n_chunks] {
                    acc.merge(slot.get().expect("every chunk completed"));
                }
                acc
            })
        })
        .collect())
}

/// The report of a trajectory run from one merged accumulator per planned tensor.
pub(crate) fn trajectory_report(
    ckpts: &[Checkpoint],
    plan: &Plan,
    accs: Vec<DriftAcc>,
    budget: &Budget,
    seconds: f64,
) -> TrajectoryReport {
    let tensors = plan
        .tensors
        .iter()
        .zip(accs)
        .map(|(pt, acc)| {
            let info = parse_name(&pt.name);
            let base = &pt.per_ckpt[0];
            TensorTrajectory {
                name: pt.name.clone(),
                layer: info.layer,
                expert: info.expert,
                kind: info.kind.to_string(),
                component: info.component,
                shape: base.shape.clone(),
                numel: base.numel,
                formats: pt.per_ckpt.iter().map(|t| t.format()).collect(),
                base: acc.base(),
                steps: acc.finish(),
            }
        })
        .collect();
    let checkpoints = ckpts
        .iter()
        .map(|c| CheckpointInfo {
            path: c.path.display().to_string(),
            layout: layout_name(&c.layout).into(),
            n_files: c.shards.len(),
            total_bytes: c.total_bytes,
            n_tensors: c.tensors.len(),
            skipped: c.skipped.clone(),
            warnings: c.warnings.clone(),
        })
        .collect();
    TrajectoryReport {
        schema_version: SCHEMA_VERSION,
        core_version: env!("CARGO_PKG_VERSION").to_string(),
        checkpoints,
        tensors,
        mismatches: plan.mismatches.clone(),
        conventions: trajectory_conventions(),
        stats: RunStats {
            bytes_read: plan.total_bytes,
            seconds,
            threads: budget.workers,
            memory_budget: budget.total,
            chunk_bytes: budget.chunk_bytes,
        },
    }
}

/// Decode one whole tensor to f32 (row-major), reading it in budget-sized chunks.
///
/// Refuses tensors whose f32 copy would exceed `max_bytes`.
pub fn read_tensor(
    path: &Path,
    name: &str,
    opts: &OpenOptions,
    max_bytes: u64,
) -> Result<(Vec<u64>, Vec<f32>)> {
    let ckpt = open_checkpoint(path, opts)?;
    let Some(t) = ckpt.tensor(name) else {
        if let Some(s) = ckpt.skipped.iter().find(|s| s.name == name) {
            return Err(Error::Unsupported {
                path: ckpt.path.clone(),
                name: name.into(),
                reason: s.reason.clone(),
            });
        }
        return Err(Error::TensorNotFound {
            path: ckpt.path.clone(),
            name: name.into(),
        });
    };
    let need = t.numel.saturating_mul(4);
    if need > max_bytes {
        return Err(Error::Config {
            reason: format!(
                "tensor {name:?} needs {need} bytes as f32, above the limit of {max_bytes} bytes"
            ),
        });
    }
    let mut out = vec![0f32; t.numel as usize];
    let budget = Budget::new(super::DEFAULT_MEMORY_BUDGET, 1, 1, None)?;
    let ce = chunk_elems(&[t], budget.chunk_bytes);
    let mut reader = ChunkReader::new(1);
    let mut e0 = 0;
    while e0 < t.numel {
        let e1 = (e0 + ce).min(t.numel);
        reader.for_each_block(&[&ckpt], &[t], e0, e1, |s, w| {
            out[s as usize..s as usize + w[0].len()].copy_from_slice(w[0]);
        })?;
        e0 = e1;
    }
    Ok((t.shape.clone(), out))
}
