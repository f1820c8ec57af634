//! Assemble the report: per-expert drift of per-expert tensors from their per-tensor sums, robust
//! z-scores of head drift over the whole model, and the per-layer summaries.

use std::collections::BTreeMap;

use super::compute::UnitOut;
use super::AnalyzeOptions;
use crate::layout::{Module, Structure};
use crate::metrics::experts::{ExpertSums, Proj};
use crate::metrics::heads::robust_z;
use crate::metrics::router::gini;
use crate::results::analysis::{
    AnalysisReport, AnalysisSkip, ExpertRecord, HeadRecord, LayerRecord, RouterLayerRecord,
};
use crate::results::TrajectoryReport;

fn proj_of(m: Module) -> Option<(Proj, bool)> {
    match m {
        Module::ExpertGate => Some((Proj::Gate, false)),
        Module::ExpertUp => Some((Proj::Up, false)),
        Module::ExpertDown => Some((Proj::Down, false)),
        Module::SharedGate => Some((Proj::Gate, true)),
        Module::SharedUp => Some((Proj::Up, true)),
        Module::SharedDown => Some((Proj::Down, true)),
        _ => None,
    }
}

/// √(d2/b2), NaN when the base is zero.
pub(crate) fn ratio(d2: f64, b2: f64) -> f64 {
    if b2 > 0.0 {
        (d2 / b2).sqrt()
    } else {
        f64::NAN
    }
}

fn max_nan(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::NAN, |m, x| if m.is_nan() || x > m { x } else { m })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The per-layer summary of one checkpoint from its heads, routed experts' ρ_e and router summary;
/// `rel` = [all tensors, attention, MLP] relative drift. Shared by `analyze` and the fingerprint
/// comparison so both report layers the same way.
pub(crate) fn layer_record(
    checkpoint: usize,
    layer: u32,
    is_moe: bool,
    rel: [f64; 3],
    hs: &[&HeadRecord],
    ex: &[f64],
    rl: Option<&RouterLayerRecord>,
) -> LayerRecord {
    let nan = f64::NAN;
    let n_severe = hs.iter().filter(|h| h.severe).count();
    LayerRecord {
        checkpoint,
        layer,
        is_moe,
        rel_drift: rel[0],
        attn_rel_drift: rel[1],
        mlp_rel_drift: rel[2],
        n_heads: hs.len(),
        n_heads_severe: n_severe,
        frac_heads_severe: if hs.is_empty() {
            nan
        } else {
            n_severe as f64 / hs.len() as f64
        },
        head_drift_max: max_nan(hs.iter().map(|h| h.drift.drift)),
        head_rel_drift_max: max_nan(hs.iter().map(|h| h.drift.rel_drift)),
        expert_rel_drift_max: max_nan(ex.iter().copied()),
        expert_rel_drift_mean: mean(ex),
        expert_rel_drift_gini: if ex.is_empty() { nan } else { gini(ex) },
        router_rel_drift_max: rl.map_or(nan, |r| r.rel_drift_max),
        router_rel_drift_mean: rl.map_or(nan, |r| r.rel_drift_mean),
        router_rel_drift_gini: rl.map_or(nan, |r| r.rel_drift_gini),
        router_bias_drift: rl.and_then(|r| r.bias.as_ref()).map_or(nan, |b| b.l2),
        score_correction_bias_drift: rl
            .and_then(|r| r.score_correction_bias.as_ref())
            .map_or(nan, |b| b.l2),
    }
}

pub(crate) fn assemble(
    trajectory: TrajectoryReport,
    structure: Structure,
    outs: Vec<UnitOut>,
    mut skipped: Vec<AnalysisSkip>,
    opts: &AnalyzeOptions,
) -> AnalysisReport {
    let n_steps = trajectory.checkpoints.len() - 1;
    let mut heads = Vec::new();
    let mut routers = Vec::new();
    let mut router_layers = Vec::new();
    let mut spectra = Vec::new();
    let mut subspaces = Vec::new();
    // (checkpoint, layer, expert or −1 for shared) → sums.
    let mut sums: BTreeMap<(usize, u32, i64), ExpertSums> = BTreeMap::new();
    for o in outs {
        heads.extend(o.heads);
        routers.extend(o.routers);
        router_layers.extend(o.router_layers);
        spectra.extend(o.spectra);
        subspaces.extend(o.subspaces);
        skipped.extend(o.skipped);
        if opts.metrics.expert_drift {
            for ((t, l, e), s) in o.expert_sums {
                let acc = sums.entry((t, l, i64::from(e))).or_default();
                for p in [Proj::Gate, Proj::Up, Proj::Down] {
                    let i = p as usize;
                    if s.seen[i] {
                        acc.add(p, s.delta2[i], s.base2[i]);
                    }
                }
            }
        }
    }

    // Per-layer sums over tensors, and per-expert sums of per-expert tensors.
    // (checkpoint, layer) → [all, attention, mlp] × (Σ‖Δ‖², Σ‖W₀‖²).
    let mut layer_sums: BTreeMap<(usize, u32), [(f64, f64); 3]> = BTreeMap::new();
    for (i, t) in trajectory.tensors.iter().enumerate() {
        let role = structure.roles[i];
        let Some(layer) = role.layer else { continue };
        let b2 = t.base.norm * t.base.norm;
        for (s, step) in t.steps.iter().enumerate() {
            let d2 = step.fro_delta * step.fro_delta;
            let slot = layer_sums.entry((s + 1, layer)).or_default();
            slot[0].0 += d2;
            slot[0].1 += b2;
            let class = if role.module.is_attention() { 1 } else { 2 };
            if role.module != Module::Norm && role.module != Module::Other {
                slot[class].0 += d2;
                slot[class].1 += b2;
            }
            if !opts.metrics.expert_drift || !structure.is_known() {
                continue;
            }
            if let Some((p, shared)) = proj_of(role.module) {
                if role.bias {
                    continue;
                }
                let e = if shared {
                    -1
                } else {
                    match role.expert {
                        Some(e) => i64::from(e),
                        None => continue,
                    }
                };
                sums.entry((s + 1, layer, e)).or_default().add(p, d2, b2);
            }
        }
    }
    let experts: Vec<ExpertRecord> = sums
        .into_iter()
        .map(|((checkpoint, layer, expert), s)| ExpertRecord {
            checkpoint,
            layer,
            expert,
            shared: expert < 0,
            drift: s.finish(),
        })
        .collect();

    // Robust z of D_h over every head of the model, per checkpoint (METRICS.md §1.4).
    for t in 1..=n_steps {
        let idx: Vec<usize> = (0..heads.len())
            .filter(|&i| heads[i].checkpoint == t)
            .collect();
        let vals: Vec<f64> = idx.iter().map(|&i| heads[i].drift.drift).collect();
        for (&i, z) in idx.iter().zip(robust_z(&vals)) {
            heads[i].z_score = z;
            heads[i].severe = z > opts.severe_z;
        }
    }

    let moe: std::collections::BTreeSet<u32> = structure.moe_layers.iter().copied().collect();
    let mut layers = Vec::new();
    for (&(t, l), s) in &layer_sums {
        let hs: Vec<&HeadRecord> = heads
            .iter()
            .filter(|h| h.checkpoint == t && h.layer == l)
            .collect();
        let ex: Vec<f64> = experts
            .iter()
            .filter(|e| e.checkpoint == t && e.layer == l && !e.shared)
            .map(|e| e.drift.rel_drift)
            .collect();
        let rl = router_layers
            .iter()
            .find(|r| r.checkpoint == t && r.layer == l);
        let rel = [s[0], s[1], s[2]].map(|(d2, b2)| ratio(d2, b2));
        layers.push(layer_record(t, l, moe.contains(&l), rel, &hs, &ex, rl));
    }

    let so = &opts.spectral;
    let conventions = [
        ("head_drift", "D_h^2 = ||dQ_h||^2 + ||dO_{:,h}||^2 + (||dK_j(h)||^2 + ||dV_j(h)||^2)/g, j(h) = floor(h/g), g = H/H_kv; rel_drift = D_h / (same expression on W_0); MLA: D_h^2 = ||dQ_h||^2 + ||dKVb_h||^2 + ||dO_h||^2".to_string()),
        ("circuit_drift", "||A_t^T B_t - A_0^T B_0||_F via d_h x d_h Grams; QK: A = Q_h, B = K_j (MLA: nope parts); OV: A = O_{:,h}^T, B = V_j; *_rel divides by ||A_0^T B_0||_F".to_string()),
        ("severe", format!("robust z = (D_h - median)/(1.4826 MAD) over all heads of the model at that checkpoint; severe if z > {}", opts.severe_z)),
        ("expert_drift", "rho_e = sqrt(sum_{gate,up,down} ||dW||^2) / sqrt(sum ||W_0||^2); fused gate_up split by the family's layout (GPT-OSS interleaved); shared experts have expert = -1".to_string()),
        ("router_drift", "per expert row: one_minus_cos, norm_drift = ||r_t||/||r_0|| - 1, rel_drift = ||r_t - r_0||/||r_0||; centered_* on R - 1 rbar^T (softmax routers only, NaN for sigmoid routers); layer: max, mean, Gini over experts".to_string()),
        ("spectra", format!("sigma1, stable_rank = ||A||_F^2/sigma1^2, participation_ratio = ||A||_F^4/||A^T A||_F^2, erank = exp(H(p)) with p ~ sigma (Roy-Vetterli), erank2 with p ~ sigma^2; method exact when min(m,n) <= {}, else randomized SVD (k={}, oversample={}, power_iters={}, seed={}): sigma1 is then a lower bound and erank/erank2 are NaN", so.exact_max_dim, so.k, so.oversample, so.power_iters, so.seed)),
        ("subspace_overlap", format!("top-k (k={}) singular subspaces of W_0 and W_t; sines of principal angles = sigma(U_t - U_0 U_0^T U_t); overlap = mean cos^2; excess_overlap = overlap - k/dim; gap ratios sigma_(k+1)/sigma_k; left = output space, right = input space", so.k)),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    AnalysisReport {
        trajectory,
        structure,
        heads,
        experts,
        routers,
        router_layers,
        spectra,
        subspaces,
        layers,
        skipped,
        conventions,
    }
}
