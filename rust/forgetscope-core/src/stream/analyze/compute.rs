//! Metrics of one resident unit: heads of an attention layer, router rows, one fused expert's
//! drift, and the spectra / subspaces of every matrix member, for every checkpoint t ≥ 1 against
//! the base. The kernels live in [`crate::metrics`]; this only slices and dispatches.

use super::resident::ResidentMember;
use super::units::{Member, Unit, UnitKind};
use super::AnalyzeOptions;
use crate::error::Result;
use crate::layout::{Attention, Module, Structure};
use crate::metrics::experts::{ExpertSums, Proj};
use crate::metrics::heads::{
    head_drift, mla_head_drift, AttnWeights, HeadGeometry, MlaGeometry, MlaWeights,
};
use crate::metrics::router::{bias_drift, router_weight_drift};
use crate::metrics::spectral::{
    spectral_stats, spectral_values, subspace_overlap, Side, SpectralStats,
};
use crate::results::analysis::{
    AnalysisSkip, HeadRecord, RouterLayerRecord, RouterRecord, SpectraRecord, SubspaceRecord,
};

/// What one unit contributes to the report.
#[derive(Default)]
pub(crate) struct UnitOut {
    pub heads: Vec<HeadRecord>,
    pub routers: Vec<RouterRecord>,
    pub router_layers: Vec<RouterLayerRecord>,
    /// ((checkpoint, layer, expert), sums) for fused expert slices.
    pub expert_sums: Vec<((usize, u32, u32), ExpertSums)>,
    pub spectra: Vec<SpectraRecord>,
    pub subspaces: Vec<SubspaceRecord>,
    pub skipped: Vec<AnalysisSkip>,
}

pub(crate) fn compute_unit(
    unit: &Unit,
    data: &[ResidentMember],
    st: &Structure,
    opts: &AnalyzeOptions,
) -> Result<UnitOut> {
    let mut out = UnitOut::default();
    let n = data[0].values.len();
    let v = |i: usize, c: usize| data[i].values[c].as_slice();
    match &unit.kind {
        UnitKind::Attention { layer, bias } => {
            let Attention::Gqa {
                n_heads,
                n_kv_heads,
                head_dim,
            } = st.attention
            else {
                unreachable!("attention units are built for GQA geometry only")
            };
            let hidden = unit.members[0].cols;
            let g = HeadGeometry {
                n_heads,
                n_kv_heads,
                head_dim,
                hidden,
            };
            let w = |c: usize| AttnWeights {
                q: v(0, c),
                k: v(1, c),
                v: v(2, c),
                o: v(3, c),
                q_bias: bias[0].map(|i| v(i, c)),
                k_bias: bias[1].map(|i| v(i, c)),
                v_bias: bias[2].map(|i| v(i, c)),
            };
            for t in 1..n {
                match head_drift(&w(0), &w(t), &g) {
                    Ok(heads) => out.heads.extend(heads.into_iter().map(|drift| HeadRecord {
                        checkpoint: t,
                        layer: *layer,
                        drift,
                        z_score: f64::NAN,
                        severe: false,
                    })),
                    Err(e) => {
                        out.skipped.push(AnalysisSkip {
                            tensor: format!("layer {layer}"),
                            metric: "head_drift".into(),
                            reason: e.to_string(),
                        });
                        break;
                    }
                }
            }
        }
        UnitKind::Mla { layer } => {
            let Attention::Mla { n_heads, mla } = &st.attention else {
                unreachable!("MLA units are built for MLA geometry only")
            };
            let g = MlaGeometry {
                n_heads: *n_heads,
                qk_nope_head_dim: mla.qk_nope_head_dim,
                qk_rope_head_dim: mla.qk_rope_head_dim,
                v_head_dim: mla.v_head_dim,
                q_in: unit.members[0].cols,
                kv_lora_rank: mla.kv_lora_rank,
                hidden: unit.members[2].rows,
            };
            let w = |c: usize| MlaWeights {
                q: v(0, c),
                kv_b: v(1, c),
                o: v(2, c),
            };
            for t in 1..n {
                match mla_head_drift(&w(0), &w(t), &g) {
                    Ok(heads) => out.heads.extend(heads.into_iter().map(|drift| HeadRecord {
                        checkpoint: t,
                        layer: *layer,
                        drift,
                        z_score: f64::NAN,
                        severe: false,
                    })),
                    Err(e) => {
                        out.skipped.push(AnalysisSkip {
                            tensor: format!("layer {layer}"),
                            metric: "head_drift".into(),
                            reason: e.to_string(),
                        });
                        break;
                    }
                }
            }
        }
        UnitKind::Router {
            layer,
            bias,
            score_bias,
        } => {
            let m = &unit.members[0];
            for t in 1..n {
                let d = router_weight_drift(
                    v(0, 0),
                    v(0, t),
                    m.rows,
                    m.cols,
                    st.family.softmax_router(),
                )?;
                let bd = |i: Option<usize>| -> Result<_> {
                    i.map(|i| bias_drift(v(i, 0), v(i, t))).transpose()
                };
                out.router_layers.push(RouterLayerRecord {
                    checkpoint: t,
                    layer: *layer,
                    rel_drift_max: d.rel_drift_max,
                    rel_drift_mean: d.rel_drift_mean,
                    rel_drift_gini: d.rel_drift_gini,
                    bias: bd(*bias)?,
                    score_correction_bias: bd(*score_bias)?,
                });
                out.routers
                    .extend(d.per_expert.into_iter().map(|drift| RouterRecord {
                        checkpoint: t,
                        layer: *layer,
                        drift,
                    }));
            }
        }
        UnitKind::FusedExpert {
            layer,
            expert,
            module,
            layout,
        } => {
            let m = &unit.members[0];
            for t in 1..n {
                let mut s = ExpertSums::default();
                if *module == Module::ExpertsGateUp {
                    s.add_gate_up(v(0, 0), v(0, t), m.rows, m.cols, *layout);
                } else {
                    s.add_matrix(Proj::Down, v(0, 0), v(0, t));
                }
                out.expert_sums.push(((t, *layer, *expert), s));
            }
        }
        UnitKind::Matrix => {}
    }
    if opts.metrics.spectra {
        for (i, m) in unit.members.iter().enumerate() {
            if m.spectra {
                spectra_of(m, &data[i], opts, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Spectra of W₀, of every W_t and ΔW_t, and the subspace overlaps of W₀ and W_t.
fn spectra_of(
    m: &Member,
    data: &ResidentMember,
    opts: &AnalyzeOptions,
    out: &mut UnitOut,
) -> Result<()> {
    let (r, c) = (m.rows, m.cols);
    let so = &opts.spectral;
    let rec = |checkpoint: usize, matrix: &'static str, mut stats: SpectralStats, rel_sigma1| {
        // Shapes are reported in torch `Linear` orientation [out, in], whatever the storage.
        if m.transposed {
            std::mem::swap(&mut stats.m, &mut stats.n);
        }
        SpectraRecord {
            tensor: m.label.clone(),
            layer: m.layer,
            expert: m.expert,
            checkpoint,
            matrix,
            stats,
            rel_sigma1,
        }
    };
    let (s0, top0) = spectral_stats(&data.values[0], r, c, f64::NAN, so)?;
    let sigma0 = s0.sigma1;
    out.spectra.push(rec(0, "weight", s0, f64::NAN));
    let mut delta = vec![0f32; r * c];
    for t in 1..data.values.len() {
        let wt = &data.values[t];
        let (st, topt) = spectral_stats(wt, r, c, f64::NAN, so)?;
        out.spectra.push(rec(t, "weight", st, f64::NAN));
        for ((d, &a), &b) in delta.iter_mut().zip(wt).zip(&data.values[0]) {
            *d = a - b;
        }
        let sd = spectral_values(&delta, r, c, f64::NAN, so)?;
        let rel = if sigma0 > 0.0 {
            sd.sigma1 / sigma0
        } else {
            f64::NAN
        };
        out.spectra.push(rec(t, "delta", sd, rel));
        let k = so.k.min(top0.s.len()).min(topt.s.len());
        if k == 0 {
            continue;
        }
        for (side, name) in [(Side::Left, "left"), (Side::Right, "right")] {
            // A transposed slice stores [in, out]: its left space is the input space.
            let label = match (name, m.transposed) {
                ("left", true) => "right",
                ("right", true) => "left",
                (x, _) => x,
            };
            let stats = subspace_overlap(&top0, &topt, side, k)?;
            out.subspaces.push(SubspaceRecord {
                tensor: m.label.clone(),
                layer: m.layer,
                expert: m.expert,
                checkpoint: t,
                side: label,
                stats,
            });
        }
    }
    Ok(())
}
