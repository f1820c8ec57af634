//! Which tensors are read whole ("resident") and grouped how: one unit per attention layer (heads
//! need q, k, v and o together), one per router, one per expert slice of a fused expert tensor, and
//! one per remaining 2-D matrix when spectra are on. Everything else streams in chunks.

use super::MetricSet;
use crate::layout::{Attention, FusedLayout, Module, Structure};
use crate::results::analysis::AnalysisSkip;
use crate::stream::Plan;

/// A contiguous element range of one planned tensor, viewed as a `rows × cols` matrix.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub tensor: usize,
    pub e0: u64,
    pub e1: u64,
    pub rows: usize,
    pub cols: usize,
    /// Name used in spectral rows (`name[e]` for a fused slice).
    pub label: String,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
    /// Stored as `[in, out]` (fused transposed slices): left/right singular spaces swap.
    pub transposed: bool,
    /// Compute spectra for this member.
    pub spectra: bool,
    /// Per checkpoint: its slice is stored with the last two axes swapped relative to the base
    /// and is transposed into the base's orientation after reading.
    pub swap: Vec<bool>,
}

impl Member {
    pub fn numel(&self) -> u64 {
        self.e1 - self.e0
    }
}

#[derive(Debug, Clone)]
pub(crate) enum UnitKind {
    /// Members: q, k, v, o, then the present q/k/v biases.
    Attention {
        layer: u32,
        bias: [Option<usize>; 3],
    },
    /// Members: q (q_b_proj or q_proj), kv_b, o.
    Mla { layer: u32 },
    /// Members: weight, then optional bias and correction bias.
    Router {
        layer: u32,
        bias: Option<usize>,
        score_bias: Option<usize>,
    },
    /// One expert's slice of a fused tensor.
    FusedExpert {
        layer: u32,
        expert: u32,
        module: Module,
        layout: FusedLayout,
    },
    /// A matrix read whole for its spectra only.
    Matrix,
}

#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub kind: UnitKind,
    pub members: Vec<Member>,
}

impl Unit {
    /// f32 bytes held for `n` checkpoints, plus one ΔW scratch for the largest member.
    pub fn resident_bytes(&self, n: usize) -> u64 {
        let all: u64 = self.members.iter().map(Member::numel).sum();
        let max = self.members.iter().map(Member::numel).max().unwrap_or(0);
        (all * n as u64 + max) * 4
    }
}

fn matrix_dims(shape: &[u64]) -> Option<(usize, usize)> {
    match shape {
        [r, c] => Some((*r as usize, *c as usize)),
        _ => None,
    }
}

fn whole(plan: &Plan, t: usize, st: &Structure, spectra: bool) -> Member {
    let pt = &plan.tensors[t];
    let base = &pt.per_ckpt[0];
    let (rows, cols) = matrix_dims(&base.shape).unwrap_or((1, base.numel as usize));
    let role = st.roles[t];
    Member {
        tensor: t,
        e0: 0,
        e1: base.numel,
        rows,
        cols,
        label: pt.name.clone(),
        layer: role.layer,
        expert: role.expert,
        transposed: false,
        spectra: spectra && base.shape.len() == 2 && rows >= 2 && cols >= 2,
        swap: Vec::new(),
    }
}

/// Build the units. `st.roles` is aligned with `plan.tensors`.
pub(crate) fn build_units(
    plan: &Plan,
    st: &Structure,
    metrics: &MetricSet,
    swapped: &[Option<Vec<bool>>],
    skipped: &mut Vec<AnalysisSkip>,
) -> Vec<Unit> {
    let mut units = Vec::new();
    let mut taken = vec![false; plan.tensors.len()];
    let find = |layer: u32, module: Module, bias: bool| {
        (0..plan.tensors.len()).find(|&i| {
            let r = st.roles[i];
            r.layer == Some(layer) && r.module == module && r.bias == bias && r.expert.is_none()
        })
    };
    let layers: Vec<u32> = {
        let mut v: Vec<u32> = st.roles.iter().filter_map(|r| r.layer).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let spectra = metrics.spectra;

    if metrics.head_drift && st.is_known() {
        for &l in &layers {
            match &st.attention {
                Attention::Gqa { .. } => {
                    let parts =
                        [Module::Q, Module::K, Module::V, Module::O].map(|m| find(l, m, false));
                    let [Some(q), Some(k), Some(v), Some(o)] = parts else {
                        if parts.iter().any(Option::is_some) {
                            skipped.push(AnalysisSkip {
                                tensor: format!("layer {l}"),
                                metric: "head_drift".into(),
                                reason: "q_proj, k_proj, v_proj and o_proj are not all present in every checkpoint".into(),
                            });
                        }
                        continue;
                    };
                    let mut members: Vec<Member> = [q, k, v, o]
                        .iter()
                        .map(|&t| whole(plan, t, st, spectra))
                        .collect();
                    let mut bias = [None; 3];
                    for (slot, m) in [Module::Q, Module::K, Module::V].into_iter().enumerate() {
                        if let Some(b) = find(l, m, true) {
                            bias[slot] = Some(members.len());
                            let mut mb = whole(plan, b, st, false);
                            mb.spectra = false;
                            members.push(mb);
                        }
                    }
                    for m in &members {
                        taken[m.tensor] = true;
                    }
                    units.push(Unit {
                        kind: UnitKind::Attention { layer: l, bias },
                        members,
                    });
                }
                Attention::Mla { mla, .. } => {
                    let q = if mla.q_lora_rank.is_some() {
                        find(l, Module::QB, false)
                    } else {
                        find(l, Module::Q, false)
                    };
                    let (Some(q), Some(kvb), Some(o)) =
                        (q, find(l, Module::KvB, false), find(l, Module::O, false))
                    else {
                        continue;
                    };
                    let members: Vec<Member> = [q, kvb, o]
                        .iter()
                        .map(|&t| whole(plan, t, st, spectra))
                        .collect();
                    for m in &members {
                        taken[m.tensor] = true;
                    }
                    units.push(Unit {
                        kind: UnitKind::Mla { layer: l },
                        members,
                    });
                }
                Attention::None => {}
            }
        }
    }

    if metrics.router_drift && st.is_known() {
        for &l in &layers {
            let Some(w) = find(l, Module::Router, false) else {
                continue;
            };
            let mut members = vec![whole(plan, w, st, spectra)];
            let add = |t: Option<usize>, members: &mut Vec<Member>| {
                t.map(|t| {
                    let mut m = whole(plan, t, st, false);
                    m.spectra = false;
                    members.push(m);
                    members.len() - 1
                })
            };
            let bias = add(find(l, Module::RouterBias, true), &mut members);
            let score_bias = add(find(l, Module::ScoreCorrectionBias, true), &mut members);
            for m in &members {
                taken[m.tensor] = true;
            }
            units.push(Unit {
                kind: UnitKind::Router {
                    layer: l,
                    bias,
                    score_bias,
                },
                members,
            });
        }
    }

    // Fused tensors stored transposed in some checkpoint are only comparable slice by slice, so
    // they are always read as units, whatever the metrics.
    let fused_units = (metrics.expert_drift || spectra) && st.is_known();
    for (t, pt) in plan.tensors.iter().enumerate() {
        let role = st.roles[t];
        let swap = swapped.get(t).cloned().flatten();
        if !fused_units && swap.is_none() {
            continue;
        }
        let (Some(layer), Some(layout)) = (role.layer, role.fused) else {
            continue;
        };
        if role.bias {
            continue;
        }
        let [e, a, b] = pt.per_ckpt[0].shape[..] else {
            skipped.push(AnalysisSkip {
                tensor: pt.name.clone(),
                metric: "expert_drift".into(),
                reason: format!(
                    "fused expert tensor of shape {:?} is not [E, a, b]",
                    pt.per_ckpt[0].shape
                ),
            });
            continue;
        };
        let slice = a * b;
        for ex in 0..e {
            let member = Member {
                tensor: t,
                e0: ex * slice,
                e1: (ex + 1) * slice,
                rows: a as usize,
                cols: b as usize,
                label: format!("{}[{ex}]", pt.name),
                layer: Some(layer),
                expert: Some(ex as u32),
                transposed: layout.transposed,
                spectra: spectra && a >= 2 && b >= 2,
                swap: swap.clone().unwrap_or_default(),
            };
            units.push(Unit {
                kind: UnitKind::FusedExpert {
                    layer,
                    expert: ex as u32,
                    module: role.module,
                    layout,
                },
                members: vec![member],
            });
        }
        taken[t] = true;
    }

    if spectra {
        for (t, taken) in taken.iter_mut().enumerate() {
            if *taken {
                continue;
            }
            let m = whole(plan, t, st, true);
            if m.spectra {
                *taken = true;
                units.push(Unit {
                    kind: UnitKind::Matrix,
                    members: vec![m],
                });
            }
        }
    }
    // File order of the base keeps reads sequential.
    units.sort_by_key(|u| {
        let m = &u.members[0];
        let s = &plan.tensors[m.tensor].per_ckpt[0].data;
        (s.shard, s.offset, m.e0)
    });
    units
}
