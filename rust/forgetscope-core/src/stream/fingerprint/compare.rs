//! Compare a candidate checkpoint with a base fingerprint: one pass over the candidate with the
//! base's signs, then the `analyze` records (same fields, same conventions) built from sketch
//! differences, with per-row `estimated` / `rel_error_bound` / interval columns (module doc of
//! [`super`] lists what is exact and what is estimated).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::pass::{run_pass, Item, TensorSketch};
use super::segments::{plan_segments, HeadLayer};
use super::{keep_whole, layout_name, Fingerprint};
use crate::error::{Error, Result};
use crate::layout::{fused_orientation, parse_name, Module, Structure, TensorDesc};
use crate::metrics::drift::{BaseStats, StepMetrics};
use crate::metrics::experts::ExpertDrift;
use crate::metrics::heads::{robust_z, HeadDrift};
use crate::metrics::router::{bias_drift, router_weight_drift};
use crate::metrics::sketch::{jl_bound, JlBound, SignKeys};
use crate::metrics::spectral::{spectral_stats, subspace_overlap, Side, SpectralStats};
use crate::results::analysis::{
    AnalysisReport, AnalysisSkip, ExpertRecord, HeadRecord, LayerRecord, RouterLayerRecord,
    RouterRecord, SpectraRecord, SubspaceRecord,
};
use crate::results::{
    trajectory_conventions, CheckpointInfo, Mismatch, RunStats, TensorTrajectory, TrajectoryReport,
    SCHEMA_VERSION,
};
use crate::source::{open_checkpoint, Encoding, LogicalTensor, Skipped};
use crate::stream::analyze::summary::{layer_record, ratio};
use crate::stream::budget::Budget;
use crate::stream::driver::resolve_threads;
use crate::stream::{Control, RunOptions};
use crate::table::analysis::NamedTable;
use crate::table::Column;

/// Options of [`compare_fingerprint`].
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Threads, memory budget, open options.
    pub run: RunOptions,
    /// Failure probability δ of each estimate's bound (default 0.01).
    pub delta: f64,
    /// Robust z-score above which a head counts as severely disrupted.
    pub severe_z: f64,
    /// Refuse a candidate whose tensor set or shapes differ from the base's (default). Off: such
    /// tensors are listed as mismatches and left out, as `analyze` does.
    pub strict: bool,
    /// Compute the candidate's spectra and the subspace overlaps of the stored matrices.
    pub spectra: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            run: RunOptions {
                memory_budget: 2 << 30,
                ..RunOptions::default()
            },
            delta: 0.01,
            severe_z: 3.0,
            strict: true,
            spectra: true,
        }
    }
}

/// The result: an `analyze` report plus, per table, the extra columns (`estimated`,
/// `rel_error_bound`, intervals) aligned with its rows.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Same records and conventions as `analyze` (checkpoint 0 = the fingerprinted base).
    pub report: AnalysisReport,
    /// Table name (`trajectory`, `heads`, ...) → extra columns.
    pub extra: Vec<(&'static str, NamedTable)>,
    /// The bound used.
    pub bound: JlBound,
}

/// Extra columns of one table.
#[derive(Default)]
struct Extra {
    estimated: Vec<bool>,
    bound: Vec<f64>,
    cols: Vec<(String, Vec<f64>)>,
}

impl Extra {
    fn with(names: &[&str]) -> Self {
        Extra {
            estimated: Vec::new(),
            bound: Vec::new(),
            cols: names.iter().map(|n| (n.to_string(), Vec::new())).collect(),
        }
    }

    fn push(&mut self, est: bool, bound: f64, vals: &[f64]) {
        self.estimated.push(est);
        self.bound.push(bound);
        for (c, v) in self.cols.iter_mut().zip(vals) {
            c.1.push(*v);
        }
    }

    fn table(self) -> NamedTable {
        let mut t: NamedTable = vec![
            ("estimated".into(), Column::Bool(self.estimated)),
            ("rel_error_bound".into(), Column::F64(self.bound)),
        ];
        t.extend(self.cols.into_iter().map(|(n, v)| (n, Column::F64(v))));
        t
    }
}

/// A sketch difference: Σ of segment differences (zero for hash-equal segments).
#[derive(Clone)]
struct Diff {
    z: Vec<f64>,
    /// Every contributing segment is bit-identical: the drift is exactly 0.
    exact: bool,
}

impl Diff {
    fn zero(r: usize) -> Self {
        Diff {
            z: vec![0.0; r],
            exact: true,
        }
    }

    fn add(&mut self, o: &Diff, w: f64) {
        for (a, b) in self.z.iter_mut().zip(&o.z) {
            *a += w * b;
        }
        self.exact &= o.exact;
    }

    /// Estimated squared norm ‖z‖²/r (exactly 0 when every segment matched).
    fn norm2(&self) -> f64 {
        if self.exact {
            return 0.0;
        }
        self.z.iter().map(|x| x * x).sum::<f64>() / self.z.len() as f64
    }
}

/// Bound bookkeeping for an estimate of a norm d̂ (or an exact 0).
fn interval(b: &JlBound, d: f64, exact: bool) -> (bool, f64, f64, f64) {
    if exact {
        return (false, 0.0, 0.0, 0.0);
    }
    let hi = if d == 0.0 { 0.0 } else { d * b.hi_factor };
    (true, b.rel_error, d * b.lo_factor, hi)
}

fn skipped_of(v: &serde_json::Value) -> Vec<Skipped> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| Skipped {
                    name: s["name"].as_str().unwrap_or("").into(),
                    dtype: s["dtype"].as_str().unwrap_or("").into(),
                    shape: s["shape"]
                        .as_array()
                        .map(|x| x.iter().filter_map(|d| d.as_u64()).collect())
                        .unwrap_or_default(),
                    reason: s["reason"].as_str().unwrap_or("").into(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One candidate matrix's spectral outputs, computed while it is resident.
struct SpecOut {
    spectra: Vec<SpectraRecord>,
    subspaces: Vec<SubspaceRecord>,
}

/// Compare `candidate` with the fingerprinted base (see the module doc of [`super`]).
pub fn compare_fingerprint(
    fp: &Fingerprint,
    candidate: &Path,
    opts: &CompareOptions,
    control: &Control,
) -> Result<Comparison> {
    let r = fp.sketch_dim;
    let bound = jl_bound(r, opts.delta)?;
    if !(opts.severe_z.is_finite() && opts.severe_z > 0.0) {
        return Err(Error::Config {
            reason: format!("severe_z must be a positive number, not {}", opts.severe_z),
        });
    }
    let threads = resolve_threads(opts.run.threads);
    let budget = Budget::new(opts.run.memory_budget, 1, threads, opts.run.chunk_bytes)?;
    let ckpt = open_checkpoint(candidate, &opts.run.open)?;
    let cfg = fp.model_config()?;
    let st = fp.structure()?;
    let shapes: Vec<&[u64]> = fp.tensors.iter().map(|t| t.shape.as_slice()).collect();
    let plan = plan_segments(&shapes, &st);
    for (t, seg) in fp.tensors.iter().zip(&plan.segs) {
        if &t.seg != seg {
            return Err(Error::Checkpoint {
                path: fp.base.path.clone().into(),
                reason: format!(
                    "the fingerprint segments tensor {:?} differently from this forgetscope ({:?} vs {:?}); rebuild the fingerprint",
                    t.name, t.seg, seg
                ),
            });
        }
    }

    // Pair the candidate's tensors with the base's.
    let by_name: BTreeMap<&str, &LogicalTensor> =
        ckpt.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let base_names: std::collections::HashSet<&str> =
        fp.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut mismatches = Vec::new();
    let mut paired: Vec<Option<&LogicalTensor>> = Vec::with_capacity(fp.tensors.len());
    let orient = |name: &str, shape: &[u64], mxfp4: bool| {
        fused_orientation(cfg.as_ref(), &TensorDesc { name, shape, mxfp4 }).map(|l| l.transposed)
    };
    for t in &fp.tensors {
        let Some(c) = by_name.get(t.name.as_str()).copied() else {
            let in_skipped = ckpt.skipped.iter().find(|s| s.name == t.name);
            mismatches.push(Mismatch {
                tensor: t.name.clone(),
                checkpoint: 1,
                kind: if in_skipped.is_some() {
                    "skipped"
                } else {
                    "missing"
                }
                .into(),
                detail: match in_skipped {
                    Some(s) => format!("not analysable in checkpoint 1: {}", s.reason),
                    None => "present in the base, absent from checkpoint 1".into(),
                },
            });
            paired.push(None);
            continue;
        };
        if c.shape != t.shape {
            mismatches.push(Mismatch {
                tensor: t.name.clone(),
                checkpoint: 1,
                kind: "shape".into(),
                detail: format!(
                    "shape {:?} in checkpoint 1 vs {:?} in the base; not compared",
                    c.shape, t.shape
                ),
            });
            paired.push(None);
            continue;
        }
        let cm = matches!(c.encoding, Encoding::Mxfp4 { .. });
        if orient(&t.name, &t.shape, t.mxfp4) != orient(&c.name, &c.shape, cm) {
            mismatches.push(Mismatch {
                tensor: t.name.clone(),
                checkpoint: 1,
                kind: "layout".into(),
                detail: "fused expert tensor stored in another orientation than in the base; a fingerprint compares elements in storage order, so it is not compared (use analyze with the base)".into(),
            });
            paired.push(None);
            continue;
        }
        if c.format() != t.format {
            mismatches.push(Mismatch {
                tensor: t.name.clone(),
                checkpoint: 1,
                kind: "dtype".into(),
                detail: format!(
                    "stored as {} in checkpoint 1 vs {} in the base; compared after decoding both to f32",
                    c.format(),
                    t.format
                ),
            });
        }
        paired.push(Some(c));
    }
    for c in &ckpt.tensors {
        if !base_names.contains(c.name.as_str()) {
            mismatches.push(Mismatch {
                tensor: c.name.clone(),
                checkpoint: 1,
                kind: "extra".into(),
                detail: "present in checkpoint 1, absent from the base".into(),
            });
        }
    }
    if opts.strict {
        let hard: Vec<&Mismatch> = mismatches.iter().filter(|m| m.kind != "dtype").collect();
        if !hard.is_empty() {
            let list: Vec<String> = hard
                .iter()
                .take(5)
                .map(|m| format!("{} ({})", m.tensor, m.kind))
                .collect();
            return Err(Error::Checkpoint {
                path: candidate.to_path_buf(),
                reason: format!(
                    "the candidate's tensors differ from the fingerprinted base's in {} place(s): {}{}; compare-fingerprint needs the same tensor set and shapes (--allow-mismatch / allow_mismatch=True compares only the common tensors)",
                    hard.len(),
                    list.join(", "),
                    if hard.len() > 5 { ", ..." } else { "" }
                ),
            });
        }
    }

    // Resident candidate tensors: stored routers, and the matrices with stored subspaces.
    let whole_of: BTreeMap<&str, usize> = fp
        .whole
        .iter()
        .enumerate()
        .map(|(k, w)| (w.name.as_str(), k))
        .collect();
    let mut svd_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    if opts.spectra {
        for (k, s) in fp.svd.iter().enumerate() {
            svd_of.entry(s.tensor.as_str()).or_default().push(k);
        }
    }
    let mut skipped: Vec<AnalysisSkip> = fp.skipped.clone();
    let half = budget.total / 2;
    let idx: Vec<usize> = (0..fp.tensors.len())
        .filter(|&i| paired[i].is_some())
        .collect();
    let mut items = Vec::with_capacity(idx.len());
    for &i in &idx {
        let t = &fp.tensors[i];
        let c = paired[i].expect("paired");
        let wants = whole_of.contains_key(t.name.as_str()) || svd_of.contains_key(t.name.as_str());
        let fits = c.numel.saturating_mul(4) <= half;
        if wants && !fits {
            skipped.push(AnalysisSkip {
                tensor: t.name.clone(),
                metric: "router_drift/spectra/subspace_overlap".into(),
                reason: format!(
                    "needs {} bytes resident, more than half the memory budget ({} bytes); raise memory_budget",
                    c.numel * 4,
                    budget.total
                ),
            });
        }
        items.push(Item {
            tensor: c,
            seg: &plan.segs[i],
            keys: SignKeys::new(fp.seed, &t.name, r)?,
            resident: wants && fits,
        });
    }
    if opts.spectra && !fp.svd.is_empty() {
        skipped.push(AnalysisSkip {
            tensor: "*".into(),
            metric: "spectra (delta)".into(),
            reason: "spectra of W_t - W_0 need the base weights, which a fingerprint does not hold"
                .into(),
        });
    }
    skipped.push(AnalysisSkip {
        tensor: "*".into(),
        metric: "circuit_drift".into(),
        reason: "QK/OV circuit drift is bilinear in the weights; a linear sketch cannot estimate it (NaN)".into(),
    });

    let so = fp.spectral.options(faer::Par::rayon(budget.workers.max(1)));
    let family_softmax = st.family.softmax_router();
    let started = Instant::now();
    let mut cand_whole: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut spec = SpecOut {
        spectra: Vec::new(),
        subspaces: Vec::new(),
    };
    let sketches = crate::pool::with_pool(budget.workers.max(1), "forgetscope-cmp", |pool| {
        run_pass(&ckpt, &items, &budget, pool, control, |j, values, _| {
            let i = idx[j];
            let name = fp.tensors[i].name.as_str();
            for &k in svd_of.get(name).map(Vec::as_slice).unwrap_or(&[]) {
                spectra_of(fp, k, &values, &so, &mut spec)?;
            }
            if whole_of.contains_key(name) {
                cand_whole.insert(i, values);
            }
            Ok(())
        })
    })??;
    let seconds = started.elapsed().as_secs_f64();
    let mut cand: Vec<Option<TensorSketch>> = vec![None; fp.tensors.len()];
    for (&i, sk) in idx.iter().zip(sketches) {
        cand[i] = Some(sk);
    }

    // Segment differences.
    let seg_diff = |i: usize, s: usize| -> Option<Diff> {
        let c = cand[i].as_ref()?;
        let b = &fp.tensors[i].sketch;
        if b.seg_hash[s] == c.seg_hash[s] {
            return Some(Diff::zero(r));
        }
        Some(Diff {
            z: c.sketch[s * r..(s + 1) * r]
                .iter()
                .zip(&b.sketch[s * r..(s + 1) * r])
                .map(|(x, y)| x - y)
                .collect(),
            exact: false,
        })
    };
    let tensor_diff = |i: usize| -> Option<Diff> {
        let mut d = Diff::zero(r);
        for s in 0..fp.tensors[i].seg.len() {
            d.add(&seg_diff(i, s)?, 1.0);
        }
        Some(d)
    };

    // Per tensor.
    let mut tensors = Vec::new();
    let mut traj_x = Extra::with(&[
        "rel_delta_lo",
        "rel_delta_hi",
        "one_minus_cos_lo",
        "one_minus_cos_hi",
    ]);
    let mut tdiff: Vec<Option<Diff>> = vec![None; fp.tensors.len()];
    for (i, t) in fp.tensors.iter().enumerate() {
        let (Some(c), Some(cs)) = (paired[i], cand[i].as_ref()) else {
            continue;
        };
        let d = tensor_diff(i).expect("paired tensor has a sketch");
        let bs = &t.sketch;
        let fin0 = bs.n_nan == 0 && bs.n_inf == 0;
        let fin1 = cs.n_nan == 0 && cs.n_inf == 0;
        let nan = f64::NAN;
        let norm0 = if fin0 { bs.sq.sqrt() } else { nan };
        let norm = if fin1 { cs.sq.sqrt() } else { nan };
        let ok = fin0 && fin1;
        let d2 = if ok { d.norm2() } else { nan };
        let fro = d2.sqrt();
        let omc = |dd: f64| {
            if ok && norm0 > 0.0 && norm > 0.0 {
                let gap = norm - norm0;
                ((dd - gap * gap) / (2.0 * norm0 * norm)).clamp(0.0, 2.0)
            } else {
                nan
            }
        };
        let rel = |x: f64| if norm0 > 0.0 { x / norm0 } else { nan };
        let (est, rb, lo, hi) = interval(&bound, fro, d.exact && ok);
        traj_x.push(est, rb, &[rel(lo), rel(hi), omc(lo * lo), omc(hi * hi)]);
        let info = parse_name(&t.name);
        tensors.push(TensorTrajectory {
            name: t.name.clone(),
            layer: info.layer,
            expert: info.expert,
            kind: info.kind.to_string(),
            component: info.component,
            shape: t.shape.clone(),
            numel: c.numel,
            formats: vec![t.format.clone(), c.format()],
            base: BaseStats {
                norm: norm0,
                n_nan: bs.n_nan,
                n_inf: bs.n_inf,
            },
            steps: vec![StepMetrics {
                norm,
                fro_delta: fro,
                rel_delta: rel(fro),
                one_minus_cos: omc(d2),
                step_drift: fro,
                path_length: fro,
                straightness: if fro > 0.0 && fro.is_finite() {
                    1.0
                } else {
                    nan
                },
                step_cos: nan,
                frac_unchanged: if d.exact && ok && c.numel > 0 {
                    1.0
                } else {
                    nan
                },
                n_nan: cs.n_nan,
                n_inf: cs.n_inf,
            }],
        });
        tdiff[i] = Some(d);
    }

    // Heads.
    let mut heads = Vec::new();
    let mut heads_x = Extra::with(&["drift_lo", "drift_hi", "rel_drift_lo", "rel_drift_hi"]);
    let sq = |i: usize, s: usize| fp.tensors[i].sketch.seg_sq[s];
    for hl in &plan.heads {
        let members: Vec<usize> = match hl {
            HeadLayer::Gqa {
                q, k, v, o, bias, ..
            } => [*q, *k, *v, *o]
                .into_iter()
                .chain(bias.iter().flatten().copied())
                .collect(),
            HeadLayer::Mla { q, kv_b, o, .. } => vec![*q, *kv_b, *o],
        };
        let layer = match hl {
            HeadLayer::Gqa { layer, .. } | HeadLayer::Mla { layer, .. } => *layer,
        };
        if members.iter().any(|&m| cand[m].is_none()) {
            skipped.push(AnalysisSkip {
                tensor: format!("layer {layer}"),
                metric: "head_drift".into(),
                reason: "q_proj, k_proj, v_proj and o_proj are not all present in the candidate"
                    .into(),
            });
            continue;
        }
        let sd = |i: usize, s: usize| seg_diff(i, s).expect("present");
        let parts: Vec<(HeadDrift, Diff)> = match *hl {
            HeadLayer::Gqa {
                q,
                k,
                v,
                o,
                bias,
                n_heads,
                n_kv_heads,
                ..
            } => {
                let g = (n_heads / n_kv_heads) as f64;
                (0..n_heads)
                    .map(|h| {
                        let j = h / (n_heads / n_kv_heads);
                        let with_bias = |w: usize, b: Option<usize>, s: usize| {
                            let mut d = sd(w, s);
                            let mut b2 = sq(w, s);
                            if let Some(b) = b {
                                d.add(&sd(b, s), 1.0);
                                b2 += sq(b, s);
                            }
                            (d, b2)
                        };
                        let (dq, bq) = with_bias(q, bias[0], h);
                        let (dk, bk) = with_bias(k, bias[1], j);
                        let (dv, bv) = with_bias(v, bias[2], j);
                        let (dout, bo) = (sd(o, h), sq(o, h));
                        let mut z = Diff::zero(r);
                        z.add(&dq, 1.0);
                        z.add(&dout, 1.0);
                        z.add(&dk, 1.0 / g.sqrt());
                        z.add(&dv, 1.0 / g.sqrt());
                        let base2 = bq + bo + (bk + bv) / g;
                        (head_record(h, j, &z, base2, [&dq, &dk, &dv, &dout]), z)
                    })
                    .collect()
            }
            HeadLayer::Mla {
                q,
                kv_b,
                o,
                n_heads,
                ..
            } => (0..n_heads)
                .map(|h| {
                    let (dq, dk, dv, dout) =
                        (sd(q, h), sd(kv_b, 2 * h), sd(kv_b, 2 * h + 1), sd(o, h));
                    let mut z = Diff::zero(r);
                    for x in [&dq, &dk, &dv, &dout] {
                        z.add(x, 1.0);
                    }
                    let base2 = sq(q, h) + sq(kv_b, 2 * h) + sq(kv_b, 2 * h + 1) + sq(o, h);
                    (head_record(h, h, &z, base2, [&dq, &dk, &dv, &dout]), z)
                })
                .collect(),
        };
        for (drift, z) in parts {
            let (est, rb, lo, hi) = interval(&bound, drift.drift, z.exact);
            let base = drift.base2.sqrt();
            let rel = |x: f64| {
                if drift.base2 > 0.0 {
                    x / base
                } else {
                    f64::NAN
                }
            };
            heads_x.push(est, rb, &[lo, hi, rel(lo), rel(hi)]);
            heads.push(HeadRecord {
                checkpoint: 1,
                layer,
                drift,
                z_score: f64::NAN,
                severe: false,
            });
        }
    }
    let vals: Vec<f64> = heads.iter().map(|h| h.drift.drift).collect();
    for (h, z) in heads.iter_mut().zip(robust_z(&vals)) {
        h.z_score = z;
        h.severe = z > opts.severe_z;
    }

    // Experts: (layer, expert or −1) → [gate, up, down] (diff, base²).
    type Parts = [Option<(Diff, f64)>; 3];
    let mut ex: BTreeMap<(u32, i64), Parts> = BTreeMap::new();
    let mut add_part = |l: u32, e: i64, p: usize, d: Diff, b2: f64| {
        let slot = &mut ex.entry((l, e)).or_insert_with(|| [None, None, None])[p];
        match slot {
            Some((dd, bb)) => {
                dd.add(&d, 1.0);
                *bb += b2;
            }
            None => *slot = Some((d, b2)),
        }
    };
    if st.is_known() {
        for (i, t) in fp.tensors.iter().enumerate() {
            let role = st.roles[i];
            let (Some(l), false, Some(d)) = (role.layer, role.bias, tdiff[i].as_ref()) else {
                continue;
            };
            let proj = match role.module {
                Module::ExpertGate | Module::SharedGate => Some(0),
                Module::ExpertUp | Module::SharedUp => Some(1),
                Module::ExpertDown | Module::SharedDown => Some(2),
                _ => None,
            };
            if let Some(p) = proj {
                let e = match role.module {
                    Module::SharedGate | Module::SharedUp | Module::SharedDown => -1,
                    _ => match role.expert {
                        Some(e) => i64::from(e),
                        None => continue,
                    },
                };
                add_part(l, e, p, d.clone(), t.sketch.sq);
                continue;
            }
            if role.fused.is_none() || t.shape.len() != 3 {
                continue;
            }
            let n_e = t.shape[0] as usize;
            match role.module {
                Module::ExpertsGateUp if t.seg.len() == 2 * n_e => {
                    for e in 0..n_e {
                        for p in 0..2 {
                            let s = 2 * e + p;
                            add_part(l, e as i64, p, seg_diff(i, s).expect("present"), sq(i, s));
                        }
                    }
                }
                Module::ExpertsDown if t.seg.len() == n_e => {
                    for e in 0..n_e {
                        add_part(l, e as i64, 2, seg_diff(i, e).expect("present"), sq(i, e));
                    }
                }
                _ => {}
            }
        }
    }
    let mut experts = Vec::new();
    let mut experts_x = Extra::with(&["rel_drift_lo", "rel_drift_hi"]);
    for ((layer, expert), parts) in ex {
        let mut z = Diff::zero(r);
        let mut b2 = 0.0;
        let mut per = [f64::NAN; 3];
        for (p, part) in parts.iter().enumerate() {
            if let Some((d, b)) = part {
                z.add(d, 1.0);
                b2 += b;
                per[p] = ratio(d.norm2(), *b);
            }
        }
        let d2 = z.norm2();
        let drift = ExpertDrift {
            fro_delta: d2.sqrt(),
            base_norm: b2.sqrt(),
            rel_drift: ratio(d2, b2),
            gate_rel_drift: per[0],
            up_rel_drift: per[1],
            down_rel_drift: per[2],
        };
        let (est, rb, lo, hi) = interval(&bound, drift.fro_delta, z.exact);
        let rel = |x: f64| if b2 > 0.0 { x / b2.sqrt() } else { f64::NAN };
        experts_x.push(est, rb, &[rel(lo), rel(hi)]);
        experts.push(ExpertRecord {
            checkpoint: 1,
            layer,
            expert,
            shared: expert < 0,
            drift,
        });
    }

    // Routers (exact, from the stored weights).
    let mut routers = Vec::new();
    let mut router_layers = Vec::new();
    if st.is_known() {
        let find = |l: u32, m: Module| {
            (0..fp.tensors.len()).find(|&i| {
                let ro = st.roles[i];
                ro.layer == Some(l) && ro.module == m && ro.expert.is_none() && keep_whole(&st, i)
            })
        };
        let mut layers: Vec<u32> = st.roles.iter().filter_map(|x| x.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        for l in layers {
            let Some(w) = find(l, Module::Router) else {
                continue;
            };
            let base_of = |i: usize| {
                whole_of
                    .get(fp.tensors[i].name.as_str())
                    .map(|&k| &fp.whole[k])
            };
            let (Some(b0), Some(ct)) = (base_of(w), cand_whole.get(&w)) else {
                skipped.push(AnalysisSkip {
                    tensor: fp.tensors[w].name.clone(),
                    metric: "router_drift".into(),
                    reason: "router weights not stored in the fingerprint or not read from the candidate (memory budget)".into(),
                });
                continue;
            };
            let [rows, cols] = b0.shape[..] else { continue };
            let d =
                router_weight_drift(&b0.values, ct, rows as usize, cols as usize, family_softmax)?;
            let bd = |m: Module| -> Result<_> {
                let Some(i) = find(l, m) else { return Ok(None) };
                match (base_of(i), cand_whole.get(&i)) {
                    (Some(b), Some(c)) => bias_drift(&b.values, c).map(Some),
                    _ => Ok(None),
                }
            };
            router_layers.push(RouterLayerRecord {
                checkpoint: 1,
                layer: l,
                rel_drift_max: d.rel_drift_max,
                rel_drift_mean: d.rel_drift_mean,
                rel_drift_gini: d.rel_drift_gini,
                bias: bd(Module::RouterBias)?,
                score_correction_bias: bd(Module::ScoreCorrectionBias)?,
            });
            routers.extend(d.per_expert.into_iter().map(|drift| RouterRecord {
                checkpoint: 1,
                layer: l,
                drift,
            }));
        }
    }

    // Layers.
    let layers = layer_records(fp, &st, &tdiff, &heads, &experts, &router_layers, &bound, r);
    let (layers, layers_x) = layers;

    let trajectory = TrajectoryReport {
        schema_version: SCHEMA_VERSION,
        core_version: env!("CARGO_PKG_VERSION").to_string(),
        checkpoints: vec![
            CheckpointInfo {
                path: fp.base.path.clone(),
                layout: fp.base.layout.clone(),
                n_files: fp.base.shards.len(),
                total_bytes: fp.base.total_bytes,
                n_tensors: fp.base.n_tensors,
                skipped: skipped_of(&fp.base.skipped),
                warnings: fp.base.warnings.clone(),
            },
            CheckpointInfo {
                path: ckpt.path.display().to_string(),
                layout: layout_name(&ckpt).into(),
                n_files: ckpt.shards.len(),
                total_bytes: ckpt.total_bytes,
                n_tensors: ckpt.tensors.len(),
                skipped: ckpt.skipped.clone(),
                warnings: ckpt.warnings.clone(),
            },
        ],
        tensors,
        mismatches,
        conventions: {
            let mut c = trajectory_conventions();
            c.push((
                "estimated".into(),
                format!(
                    "fro_delta, rel_delta, one_minus_cos, step_drift and path_length are estimated from {r}-dimensional sign sketches of the base fingerprint (estimated = true) unless the tensor is bit-identical to the base (exact 0); rel_error_bound = {:.4}: |estimate - true| <= rel_error_bound * true with probability >= {} per row; rel_delta_lo/hi and one_minus_cos_lo/hi bound the true value at the same probability; frac_unchanged is 1 for bit-identical tensors and NaN otherwise",
                    bound.rel_error,
                    1.0 - opts.delta
                ),
            ));
            c
        },
        stats: RunStats {
            bytes_read: items
                .iter()
                .map(|i| i.tensor.numel * i.tensor.max_elem_bytes())
                .sum(),
            seconds,
            threads: budget.workers,
            memory_budget: budget.total,
            chunk_bytes: budget.chunk_bytes,
        },
    };
    let conventions = conventions(fp, opts, &bound);
    let routers_n = routers.len();
    let (spectra, subspaces) = (spec.spectra, spec.subspaces);
    let exact_x = |n: usize| {
        let mut x = Extra::default();
        for _ in 0..n {
            x.push(false, 0.0, &[]);
        }
        x.table()
    };
    let extra = vec![
        ("trajectory", traj_x.table()),
        ("heads", heads_x.table()),
        ("experts", experts_x.table()),
        ("routers", exact_x(routers_n)),
        ("layers", layers_x.table()),
        ("spectra", exact_x(spectra.len())),
        ("subspaces", exact_x(subspaces.len())),
    ];
    Ok(Comparison {
        report: AnalysisReport {
            trajectory,
            structure: st,
            heads,
            experts,
            routers,
            router_layers,
            spectra,
            subspaces,
            layers,
            skipped,
            conventions,
        },
        extra,
        bound,
    })
}

fn head_record(h: usize, j: usize, z: &Diff, base2: f64, parts: [&Diff; 4]) -> HeadDrift {
    let drift2 = z.norm2();
    let nan = f64::NAN;
    HeadDrift {
        head: h,
        kv_head: j,
        drift2,
        base2,
        drift: drift2.sqrt(),
        rel_drift: ratio(drift2, base2),
        q_delta: parts[0].norm2().sqrt(),
        k_delta: parts[1].norm2().sqrt(),
        v_delta: parts[2].norm2().sqrt(),
        o_delta: parts[3].norm2().sqrt(),
        qk_circuit_drift: nan,
        qk_circuit_rel: nan,
        ov_circuit_drift: nan,
        ov_circuit_rel: nan,
    }
}

/// Spectra of the candidate's matrix `k` (W_t) against the stored W₀, and the subspace overlaps.
fn spectra_of(
    fp: &Fingerprint,
    k: usize,
    values: &[f32],
    so: &crate::metrics::spectral::SpectralOptions,
    out: &mut SpecOut,
) -> Result<()> {
    let s = &fp.svd[k];
    let (m, n) = (s.rows, s.cols);
    let e0 = s.e0 as usize;
    let Some(a) = e0.checked_add(m * n).and_then(|e1| values.get(e0..e1)) else {
        return Err(Error::Checkpoint {
            path: fp.base.path.clone().into(),
            reason: format!(
                "not a valid forgetscope fingerprint: stored matrix {:?} lies outside its tensor",
                s.label
            ),
        });
    };
    let rec = |checkpoint: usize, mut stats: SpectralStats| {
        if s.transposed {
            std::mem::swap(&mut stats.m, &mut stats.n);
        }
        SpectraRecord {
            tensor: s.label.clone(),
            layer: s.layer,
            expert: s.expert,
            checkpoint,
            matrix: "weight",
            stats,
            rel_sigma1: f64::NAN,
        }
    };
    let (st, top) = spectral_stats(a, m, n, f64::NAN, so)?;
    out.spectra.push(rec(0, s.stats.clone()));
    out.spectra.push(rec(1, st));
    let kk = so.k.min(s.top.s.len()).min(top.s.len());
    if kk == 0 {
        return Ok(());
    }
    for (side, name) in [(Side::Left, "left"), (Side::Right, "right")] {
        let label = match (name, s.transposed) {
            ("left", true) => "right",
            ("right", true) => "left",
            (x, _) => x,
        };
        out.subspaces.push(SubspaceRecord {
            tensor: s.label.clone(),
            layer: s.layer,
            expert: s.expert,
            checkpoint: 1,
            side: label,
            stats: subspace_overlap(&s.top, &top, side, kk)?,
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn layer_records(
    fp: &Fingerprint,
    st: &Structure,
    tdiff: &[Option<Diff>],
    heads: &[HeadRecord],
    experts: &[ExpertRecord],
    router_layers: &[RouterLayerRecord],
    bound: &JlBound,
    r: usize,
) -> (Vec<LayerRecord>, Extra) {
    // layer → [all, attention, mlp] × (diff, Σ‖W₀‖²)
    let mut sums: BTreeMap<u32, [(Diff, f64); 3]> = BTreeMap::new();
    for (i, t) in fp.tensors.iter().enumerate() {
        let role = st.roles[i];
        let (Some(layer), Some(d)) = (role.layer, tdiff[i].as_ref()) else {
            continue;
        };
        let b2 = t.sketch.sq;
        let slot = sums.entry(layer).or_insert_with(|| {
            [
                (Diff::zero(r), 0.0),
                (Diff::zero(r), 0.0),
                (Diff::zero(r), 0.0),
            ]
        });
        slot[0].0.add(d, 1.0);
        slot[0].1 += b2;
        if role.module != Module::Norm && role.module != Module::Other {
            let class = if role.module.is_attention() { 1 } else { 2 };
            slot[class].0.add(d, 1.0);
            slot[class].1 += b2;
        }
    }
    let moe: std::collections::BTreeSet<u32> = st.moe_layers.iter().copied().collect();
    let mut out = Vec::new();
    let mut x = Extra::with(&["rel_drift_lo", "rel_drift_hi"]);
    let nan = f64::NAN;
    for (l, s) in sums {
        let rel = |k: usize| ratio(s[k].0.norm2(), s[k].1);
        let hs: Vec<&HeadRecord> = heads.iter().filter(|h| h.layer == l).collect();
        let ex: Vec<f64> = experts
            .iter()
            .filter(|e| e.layer == l && !e.shared)
            .map(|e| e.drift.rel_drift)
            .collect();
        let rl = router_layers.iter().find(|r| r.layer == l);
        let all = &s[0];
        let d = all.0.norm2().sqrt();
        let (est, rb, lo, hi) = interval(bound, d, all.0.exact);
        let relb = |v: f64| if all.1 > 0.0 { v / all.1.sqrt() } else { nan };
        x.push(est, rb, &[relb(lo), relb(hi)]);
        out.push(layer_record(
            1,
            l,
            moe.contains(&l),
            [rel(0), rel(1), rel(2)],
            &hs,
            &ex,
            rl,
        ));
    }
    (out, x)
}

fn conventions(fp: &Fingerprint, opts: &CompareOptions, b: &JlBound) -> Vec<(String, String)> {
    let sp = &fp.spectral;
    [
        ("fingerprint", format!(
            "base compared through its fingerprint: sketch_dim r = {}, seed = {}; estimated rows satisfy |estimate - true| <= rel_error_bound * true with probability >= {} each (rel_error_bound = {:.4}; *_lo / *_hi bound the true value); bit-identical segments are exact (estimated = false)",
            fp.sketch_dim, fp.seed, 1.0 - opts.delta, b.rel_error
        )),
        ("head_drift", "D_h^2 = ||dQ_h||^2 + ||dO_{:,h}||^2 + (||dK_j(h)||^2 + ||dV_j(h)||^2)/g (biases in q/k/v), estimated from one sketch of the concatenated slices; rel_drift divides by the exact base expression; MLA: ||dQ_h||^2 + ||dKVb_h||^2 + ||dO_h||^2".to_string()),
        ("circuit_drift", "not available from a fingerprint (NaN)".to_string()),
        ("severe", format!("robust z = (D_h - median)/(1.4826 MAD) over all heads of the model, on the estimated D_h; severe if z > {}", opts.severe_z)),
        ("expert_drift", "rho_e = sqrt(sum_{gate,up,down} ||dW||^2) / sqrt(sum ||W_0||^2), estimated from one sketch of the expert's concatenated slices (base norms exact); shared experts have expert = -1".to_string()),
        ("router_drift", "exact (router weights are stored in the fingerprint): per expert row one_minus_cos, norm_drift, rel_drift; centered_* on R - 1 rbar^T (softmax routers only); layer: max, mean, Gini over experts".to_string()),
        ("spectra", format!("exact for W_0 (stored) and W_t of the matrices stored in the fingerprint (k={}, oversample={}, power_iters={}, exact_max_dim={}, seed={}); spectra of W_t - W_0 are not available", sp.k, sp.oversample, sp.power_iters, sp.exact_max_dim, sp.seed)),
        ("subspace_overlap", format!("exact for the matrices stored in the fingerprint (at most {} elements): top-k (k={}) singular subspaces of W_0 (stored) and W_t; sines of principal angles; left = output space, right = input space", fp.subspace_max_numel, sp.k)),
        ("layers", "rel_drift, attn_rel_drift, mlp_rel_drift estimated from one sketch of the layer's concatenated tensors (base norms exact); head, expert and router columns as in their tables".to_string()),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect()
}

/// The tables of a comparison, as `analyze` returns them, with the extra columns appended:
/// (trajectory table, [(name, table)]).
pub fn comparison_tables(c: &Comparison) -> (NamedTable, Vec<(&'static str, NamedTable)>) {
    let extra = |name: &str| {
        c.extra
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    };
    let mut traj: NamedTable = crate::table::trajectory_table(&c.report.trajectory)
        .into_iter()
        .map(|(n, col)| (n.to_string(), col))
        .collect();
    traj.extend(extra("trajectory"));
    let tables = crate::table::analysis::analysis_tables(&c.report)
        .into_iter()
        .map(|(name, mut t)| {
            let x = extra(name);
            let rows = t.first().map_or(0, |(_, col)| col_len(col));
            if x.first().is_some_and(|(_, col)| col_len(col) == rows) {
                t.extend(x);
            }
            (name, t)
        })
        .collect();
    (traj, tables)
}

fn col_len(c: &Column) -> usize {
    match c {
        Column::F64(v) => v.len(),
        Column::I64(v) => v.len(),
        Column::Str(v) => v.len(),
        Column::Bool(v) => v.len(),
    }
}
