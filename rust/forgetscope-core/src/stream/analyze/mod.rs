//! `analyze`: every weight metric in one pass over the checkpoints.
//!
//! Tensors that a structure- or spectrum-level metric needs whole (attention layers for heads,
//! routers, fused expert slices, and every matrix when spectra are on) are read into memory as
//! units — the same read feeds their per-tensor drift — while a reader thread prefetches the next
//! unit, so disk and compute overlap. Everything else streams in chunks exactly as `trajectory`
//! does. The working set is at most two units plus the streaming buffers: a unit that needs more
//! than half the memory budget is not made resident; its tensors still get every per-tensor metric
//! and the skipped metrics are listed with the reason.

pub(crate) mod compute;
pub(crate) mod resident;
pub(crate) mod summary;
pub(crate) mod units;

use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use super::budget::Budget;
use super::driver::{resolve_threads, stream_drift, trajectory_report};
use super::plan::plan_trajectory;
use super::{as_paths, Control, RunOptions};
use crate::error::{Error, Result};
use crate::layout::{resolve, ModelConfig, TensorDesc};
use crate::metrics::drift::DriftAcc;
use crate::metrics::spectral::SpectralOptions;
use crate::results::analysis::{AnalysisReport, AnalysisSkip};
use crate::source::{open_checkpoint, Checkpoint, Encoding};

/// Which metric families `analyze` computes (per-tensor `weight_drift` always runs).
#[derive(Debug, Clone)]
pub struct MetricSet {
    /// `head_drift` (per attention head, with QK/OV circuit drift).
    pub head_drift: bool,
    /// `expert_drift`.
    pub expert_drift: bool,
    /// `router_drift` (weight-only).
    pub router_drift: bool,
    /// `spectra` and `subspace_overlap` of every matrix.
    pub spectra: bool,
}

impl Default for MetricSet {
    fn default() -> Self {
        MetricSet {
            head_drift: true,
            expert_drift: true,
            router_drift: true,
            spectra: true,
        }
    }
}

/// Options of `analyze`.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Threads, memory budget, open options.
    pub run: RunOptions,
    /// Metrics to compute.
    pub metrics: MetricSet,
    /// Spectral options (k, oversampling, power iterations, exact threshold, seed).
    pub spectral: SpectralOptions,
    /// Robust z-score above which a head counts as severely disrupted.
    pub severe_z: f64,
    /// The model's config; `None` looks for `config.json` beside the base checkpoint.
    pub config: Option<ModelConfig>,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            run: RunOptions::default(),
            metrics: MetricSet::default(),
            spectral: SpectralOptions::default(),
            severe_z: 3.0,
            config: None,
        }
    }
}

/// `config.json` beside the base checkpoint: in the directory given, or beside its first shard
/// (HF snapshots, index files).
pub fn find_config(ckpt: &Checkpoint) -> Result<Option<ModelConfig>> {
    let mut candidates = Vec::new();
    if ckpt.path.is_dir() {
        candidates.push(ckpt.path.join("config.json"));
    } else if let Some(parent) = ckpt.path.parent() {
        candidates.push(parent.join("config.json"));
    }
    if let Some(parent) = ckpt.shards.first().and_then(|s| s.path.parent()) {
        candidates.push(parent.join("config.json"));
    }
    for c in candidates {
        if c.is_file() {
            return ModelConfig::from_file(&c).map(Some);
        }
    }
    Ok(None)
}

/// Fused expert tensors stored in a different orientation in a checkpoint than in the base (an
/// MXFP4 GPT-OSS original is `[E, out, in]`, its bf16 transformers re-save `[E, in, out]`) are
/// compared expert by expert after transposing, never element by element in storage order. Pairs
/// whose shapes differ join the plan here (with no chunks: they are read slice by slice as resident
/// units) and their `shape` mismatch becomes a `layout` note; pairs whose shapes happen to agree
/// (2I = H) are caught by orientation, not shape. Returns, per planned tensor, which checkpoints are
/// swapped (None for ordinary tensors).
fn pair_transposed_experts(
    ckpts: &[Checkpoint],
    plan: &mut super::Plan,
    config: Option<&ModelConfig>,
) -> Vec<Option<Vec<bool>>> {
    use crate::layout::{fused_orientation, is_fused_expert_weight};
    let orient = |t: &crate::source::LogicalTensor| {
        fused_orientation(
            config,
            &TensorDesc {
                name: &t.name,
                shape: &t.shape,
                mxfp4: matches!(t.encoding, Encoding::Mxfp4 { .. }),
            },
        )
        .map(|l| l.transposed)
    };
    let mut swapped: Vec<Option<Vec<bool>>> = plan
        .tensors
        .iter()
        .map(|pt| {
            let o: Vec<Option<bool>> = pt.per_ckpt.iter().map(orient).collect();
            let swap: Vec<bool> = o.iter().map(|x| x.is_some() && *x != o[0]).collect();
            swap.iter().any(|&s| s).then_some(swap)
        })
        .collect();
    for (pt, s) in plan.tensors.iter().zip(&swapped) {
        if s.is_some() {
            plan.mismatches.push(crate::results::Mismatch {
                tensor: pt.name.clone(),
                checkpoint: 0,
                kind: "layout".into(),
                detail: "stored in another orientation ([E, in, out] vs [E, out, in]) in some checkpoint; compared expert by expert after transposing".into(),
            });
        }
    }
    let candidates: std::collections::BTreeSet<String> = plan
        .mismatches
        .iter()
        .filter(|m| m.kind == "shape" && is_fused_expert_weight(&m.tensor))
        .map(|m| m.tensor.clone())
        .collect();
    // One name → tensor map per checkpoint: `Checkpoint::tensor` is a linear scan, and a file
    // can hold any number of mismatched fused expert weights.
    let by_name: Vec<std::collections::HashMap<&str, &crate::source::LogicalTensor>> =
        if candidates.is_empty() {
            Vec::new()
        } else {
            ckpts
                .iter()
                .map(|c| c.tensors.iter().map(|t| (t.name.as_str(), t)).collect())
                .collect()
        };
    for name in candidates {
        let Some(&base) = by_name[0].get(name.as_str()) else {
            continue;
        };
        let [e, a, b] = base.shape[..] else { continue };
        let mut per = vec![base.clone()];
        let mut swap = vec![false];
        for map in &by_name[1..] {
            match map.get(name.as_str()) {
                Some(&t) if t.shape == base.shape && orient(t) == orient(base) => swap.push(false),
                Some(&t) if t.shape[..] == [e, b, a] && orient(t) != orient(base) => {
                    swap.push(true)
                }
                _ => break,
            }
            per.push((*map.get(name.as_str()).expect("matched above")).clone());
        }
        if per.len() != ckpts.len() {
            continue;
        }
        for m in plan
            .mismatches
            .iter_mut()
            .filter(|m| m.tensor == name && m.kind == "shape")
        {
            m.kind = "layout".into();
            m.detail = format!(
                "stored transposed in checkpoint {} relative to the base ({:?}); compared expert by expert after transposing",
                m.checkpoint, per[m.checkpoint].shape
            );
        }
        plan.tensors.push(super::plan::PlannedTensor {
            name,
            per_ckpt: per,
            first_chunk: plan.chunks.len(),
            n_chunks: 0,
        });
        swapped.push(Some(swap));
    }
    swapped
}

/// `(name, shape)` of every logical tensor of a checkpoint, in file order.
pub type TensorList = Vec<(String, Vec<u64>)>;

/// Open one checkpoint and resolve its structure (for `inspect`): the logical tensors
/// `(name, shape)` in file order and the structure, whose roles are aligned with them.
pub fn inspect_structure(
    path: &Path,
    open: &crate::source::OpenOptions,
    config: Option<ModelConfig>,
) -> Result<(TensorList, crate::layout::Structure)> {
    let ckpt = open_checkpoint(path, open)?;
    let config = match config {
        Some(c) => Some(c),
        None => find_config(&ckpt)?,
    };
    let descs: Vec<TensorDesc<'_>> = ckpt
        .tensors
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            shape: &t.shape,
            mxfp4: matches!(t.encoding, Encoding::Mxfp4 { .. }),
        })
        .collect();
    let st = resolve(config.as_ref(), &descs);
    let names = ckpt
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    Ok((names, st))
}

/// Analyse `paths` (the first is the base).
pub fn analyze(
    paths: &[impl AsRef<Path>],
    opts: &AnalyzeOptions,
    control: &Control,
) -> Result<AnalysisReport> {
    let prepared = prepare(&as_paths(paths), opts, control)?;
    let started = Instant::now();
    let (streamed, computed) = execute(&prepared, None, control)?;
    let mut results: Vec<Option<UnitResult>> = prepared.units.iter().map(|_| None).collect();
    for (i, r) in computed {
        results[i] = Some(r);
    }
    finish(prepared, streamed, results, started.elapsed().as_secs_f64())
}

/// Everything decided before any tensor data is read: the checkpoints, the plan, the structure,
/// the units and which tensors stream. It is a function of the headers, the config and the options
/// only, so every process that prepares the same inputs gets the same tensor and unit indices —
/// which is what lets [`crate::stream::partial`] run a subset elsewhere and merge exactly.
pub(crate) struct Prepared {
    pub ckpts: Vec<Checkpoint>,
    pub plan: super::Plan,
    pub structure: crate::layout::Structure,
    pub units: Vec<units::Unit>,
    pub skipped: Vec<AnalysisSkip>,
    /// Tensors streamed in chunks (neither resident nor paired across orientations).
    pub include: Vec<bool>,
    /// Tensors paired across orientations whose units were dropped: NaN metrics.
    pub unpaired: Vec<usize>,
    pub budget: Budget,
    /// The caller's options, with the spectral kernels' parallelism set to the run's workers.
    pub opts: AnalyzeOptions,
}

/// What [`execute`] returns: the streamed tensors' accumulators (None where not streamed) and
/// `(unit index, result)` in unit order.
pub(crate) type Executed = (Vec<Option<DriftAcc>>, Vec<(usize, UnitResult)>);

/// One unit's metrics and its members' drift accumulators (in member order).
pub(crate) struct UnitResult {
    pub out: compute::UnitOut,
    pub accs: Vec<DriftAcc>,
}

pub(crate) fn prepare(
    paths: &[std::path::PathBuf],
    opts: &AnalyzeOptions,
    control: &Control,
) -> Result<Prepared> {
    if paths.len() < 2 {
        return Err(Error::Config {
            reason: "analyze needs a base and at least one more checkpoint".into(),
        });
    }
    if !(opts.severe_z.is_finite() && opts.severe_z > 0.0) {
        return Err(Error::Config {
            reason: format!("severe_z must be a positive number, not {}", opts.severe_z),
        });
    }
    let threads = resolve_threads(opts.run.threads);
    let budget = Budget::new(
        opts.run.memory_budget,
        paths.len(),
        threads,
        opts.run.chunk_bytes,
    )?;
    let mut ckpts = Vec::with_capacity(paths.len());
    for p in paths {
        if control.is_cancelled() {
            return Err(Error::Cancelled);
        }
        ckpts.push(open_checkpoint(p, &opts.run.open)?);
    }
    let config = match &opts.config {
        Some(c) => Some(c.clone()),
        None => find_config(&ckpts[0])?,
    };
    let mut plan = plan_trajectory(&ckpts, &budget);
    let swapped = pair_transposed_experts(&ckpts, &mut plan, config.as_ref());
    let descs: Vec<TensorDesc<'_>> = plan
        .tensors
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            shape: &t.per_ckpt[0].shape,
            mxfp4: matches!(t.per_ckpt[0].encoding, Encoding::Mxfp4 { .. }),
        })
        .collect();
    let structure = resolve(config.as_ref(), &descs);
    let mut skipped = Vec::new();
    let mut units = units::build_units(&plan, &structure, &opts.metrics, &swapped, &mut skipped);

    // Units that do not fit half the budget stream instead (per-tensor metrics only).
    let n = ckpts.len();
    let half = budget.total / 2;
    units.retain(|u| {
        let need = u.resident_bytes(n);
        if need <= half {
            return true;
        }
        for m in &u.members {
            skipped.push(AnalysisSkip {
                tensor: m.label.clone(),
                metric: "head_drift/router_drift/expert_drift/spectra".into(),
                reason: format!(
                    "needs {need} bytes resident for {n} checkpoints, more than half the memory budget ({} bytes); raise memory_budget",
                    budget.total
                ),
            });
        }
        false
    });
    let mut resident = vec![false; plan.tensors.len()];
    for u in &units {
        for m in &u.members {
            resident[m.tensor] = true;
        }
    }
    // A tensor paired across orientations can only be compared as resident slices; without its
    // units (budget) its metrics are NaN, never the zeros of an empty stream.
    let mut unpaired = Vec::new();
    for (t, s) in swapped.iter().enumerate() {
        if s.is_some() && !resident[t] {
            unpaired.push(t);
            skipped.push(AnalysisSkip {
                tensor: plan.tensors[t].name.clone(),
                metric: "weight_drift".into(),
                reason: "stored in another orientation in some checkpoint and not read as resident slices; its metrics are NaN".into(),
            });
        }
    }
    let include: Vec<bool> = resident
        .iter()
        .zip(&swapped)
        .map(|(r, s)| !r && s.is_none())
        .collect();
    // The spectral kernels split their big products over the run's workers.
    let mut opts = opts.clone();
    opts.spectral.par = faer::Par::rayon(budget.workers.max(1));
    Ok(Prepared {
        ckpts,
        plan,
        structure,
        units,
        skipped,
        include,
        unpaired,
        budget,
        opts,
    })
}

/// Stream the streamed tensors and compute the units — all of them, or only those whose tensors
/// `select` marks (a unit's members are always selected together). Returns the streamed tensors'
/// accumulators (None where not streamed here) and `(unit index, result)` in unit order.
pub(crate) fn execute(
    p: &Prepared,
    select: Option<&[bool]>,
    control: &Control,
) -> Result<Executed> {
    let (ckpts, plan, budget, opts) = (&p.ckpts, &p.plan, &p.budget, &p.opts);
    let chosen = |t: usize| select.is_none_or(|s| s[t]);
    let include: Vec<bool> = (0..plan.tensors.len())
        .map(|t| p.include[t] && chosen(t))
        .collect();
    let units: Vec<usize> = (0..p.units.len())
        .filter(|&i| chosen(p.units[i].members[0].tensor))
        .collect();
    control
        .total_tensors
        .store(0, std::sync::atomic::Ordering::Relaxed);
    control.total_bytes.store(
        units
            .iter()
            .flat_map(|&i| &p.units[i].members)
            .map(|m| {
                let per = &plan.tensors[m.tensor].per_ckpt;
                m.numel() * per.iter().map(|t| t.max_elem_bytes()).sum::<u64>()
            })
            .sum(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let accs = stream_drift(ckpts, plan, budget, control, &include)?;
    let mut outs = Vec::with_capacity(units.len());
    crate::pool::with_pool(budget.workers.max(1), "forgetscope-analyze", |pool| {
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = sync_channel(1);
            let units = &units;
            s.spawn(move || {
                for &i in units {
                    if control.is_cancelled() {
                        return;
                    }
                    let r = pool.install(|| {
                        resident::read_unit(ckpts, plan, &p.units[i], budget.chunk_bytes, control)
                    });
                    let failed = r.is_err();
                    if tx.send((i, r)).is_err() || failed {
                        return;
                    }
                }
            });
            for (i, data) in rx {
                let data = data?;
                if control.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let u = &p.units[i];
                let out = pool.install(|| compute::compute_unit(u, &data, &p.structure, opts))?;
                let accs = data.into_iter().map(|d| d.acc).collect();
                outs.push((i, UnitResult { out, accs }));
            }
            Ok(())
        })
    })??;
    if control.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok((accs, outs))
}

/// The report from the streamed accumulators and every unit's result. Members of several units
/// (the expert slices of a fused tensor) merge in unit order, the order a single run uses, so the
/// report does not depend on where or in which order the pieces were computed.
pub(crate) fn finish(
    p: Prepared,
    mut accs: Vec<Option<DriftAcc>>,
    results: Vec<Option<UnitResult>>,
    seconds: f64,
) -> Result<AnalysisReport> {
    let n = p.ckpts.len();
    let mut outs = Vec::with_capacity(p.units.len());
    let mut partial: Vec<Option<DriftAcc>> = vec![None; p.plan.tensors.len()];
    for (i, (u, r)) in p.units.iter().zip(results).enumerate() {
        let r = r.ok_or_else(|| Error::Config {
            reason: format!("no result for analysis unit {i} ({})", u.members[0].label),
        })?;
        for (m, acc) in u.members.iter().zip(&r.accs) {
            match &mut partial[m.tensor] {
                Some(a) => a.merge(acc),
                slot @ None => *slot = Some(acc.clone()),
            }
        }
        outs.push(r.out);
    }
    for (slot, q) in accs.iter_mut().zip(partial) {
        if slot.is_none() {
            *slot = q;
        }
    }
    for &t in &p.unpaired {
        let mut acc = DriftAcc::new(n);
        let nan = [f32::NAN];
        acc.update(&vec![&nan[..]; n]);
        accs[t] = Some(acc);
    }
    let accs: Vec<DriftAcc> = accs
        .into_iter()
        .map(|a| a.unwrap_or_else(|| DriftAcc::new(n)))
        .collect();
    let trajectory = trajectory_report(&p.ckpts, &p.plan, accs, &p.budget, seconds);
    Ok(summary::assemble(
        trajectory,
        p.structure,
        outs,
        p.skipped,
        &p.opts,
    ))
}
