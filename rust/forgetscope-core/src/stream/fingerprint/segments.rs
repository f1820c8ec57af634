//! How a tensor's elements are grouped into segments whose sketches are kept apart: one per
//! attention head (row blocks of q/k/v, column blocks of o, slices of q/k/v biases), one per
//! expert and projection of a fused expert tensor (gate and up halves of `gate_up_proj`, in either
//! orientation and interleaving), and one for every other tensor. The layout rules are those of
//! `metrics::heads` and `metrics::experts` (METRICS.md §1.4, §4.2); the same function runs when
//! the fingerprint is written and when it is compared, so both sides agree on every segment.

use serde::Serialize;

use crate::layout::{Attention, Module, Structure};
use crate::results::analysis::AnalysisSkip;

/// Segment of a row of the 2-D view `[numel / cols, cols]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RowMap {
    /// Every row in segment 0.
    All,
    /// Row r in segment ⌊r / size⌋.
    Block {
        /// Rows per segment.
        size: u64,
    },
    /// Row r in segment 2·⌊r / block⌋ + [r mod block ≥ at] (concatenated gate/up halves).
    Split {
        /// Rows per pair of segments.
        block: u64,
        /// First row of the second half.
        at: u64,
    },
    /// Row r in segment 2·⌊r / block⌋ + (r mod block) mod 2 (interleaved gate/up).
    Parity {
        /// Rows per pair of segments.
        block: u64,
    },
}

/// Segment of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ColMap {
    /// Every column in segment 0.
    All,
    /// Column c in segment ⌊c / size⌋.
    Block {
        /// Columns per segment.
        size: u64,
    },
    /// Column c in segment [c ≥ at].
    Split {
        /// First column of the second half.
        at: u64,
    },
    /// Column c in segment c mod 2.
    Parity,
}

/// Segments of one tensor: element (r, c) of the row-major view `[numel/cols, cols]` belongs to
/// segment `row_seg(r)·n_col + col_seg(c)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Segmentation {
    /// Row length of the view (the last dimension; 1 for a scalar).
    pub cols: u64,
    /// Row → segment.
    pub rows: RowMap,
    /// Column → segment.
    pub col: ColMap,
    /// Row segments.
    pub n_row: u32,
    /// Column segments.
    pub n_col: u32,
}

impl Segmentation {
    /// One segment: the whole tensor.
    pub fn whole(cols: u64) -> Self {
        Segmentation {
            cols: cols.max(1),
            rows: RowMap::All,
            col: ColMap::All,
            n_row: 1,
            n_col: 1,
        }
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.n_row as usize * self.n_col as usize
    }

    /// Whether there is no segment (never: a tensor has at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (row segment, first row after `r` in another row segment).
    #[inline]
    pub fn row_seg(&self, r: u64) -> (u64, u64) {
        match self.rows {
            RowMap::All => (0, u64::MAX),
            RowMap::Block { size } => {
                let b = r / size;
                (b, (b + 1).saturating_mul(size))
            }
            RowMap::Split { block, at } => {
                let (b, o) = (r / block, r % block);
                if o < at {
                    (2 * b, b * block + at)
                } else {
                    (2 * b + 1, (b + 1).saturating_mul(block))
                }
            }
            RowMap::Parity { block } => (2 * (r / block) + (r % block) % 2, r + 1),
        }
    }

    /// (column segment, first column after `c` in another column segment, ≤ cols).
    #[inline]
    pub fn col_seg(&self, c: u64) -> (u64, u64) {
        match self.col {
            ColMap::All => (0, self.cols),
            ColMap::Block { size } => {
                let b = c / size;
                (b, ((b + 1) * size).min(self.cols))
            }
            ColMap::Split { at } => {
                if c < at {
                    (0, at)
                } else {
                    (1, self.cols)
                }
            }
            ColMap::Parity => (c % 2, c + 1),
        }
    }
}

/// One attention layer whose heads are sketched apart: tensor indices (into the list given to
/// [`plan_segments`]) and geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadLayer {
    /// GQA: q, k, v, o and the optional q/k/v biases.
    Gqa {
        layer: u32,
        q: usize,
        k: usize,
        v: usize,
        o: usize,
        bias: [Option<usize>; 3],
        n_heads: usize,
        n_kv_heads: usize,
    },
    /// MLA: q (q_b_proj or q_proj), kv_b (segments 2h = K_nope_h, 2h+1 = V_h), o.
    Mla {
        layer: u32,
        q: usize,
        kv_b: usize,
        o: usize,
        n_heads: usize,
    },
}

/// Segmentation of every tensor, and the attention layers split into heads.
#[derive(Debug, Clone)]
pub(crate) struct SegPlan {
    pub segs: Vec<Segmentation>,
    pub heads: Vec<HeadLayer>,
    pub skipped: Vec<AnalysisSkip>,
}

fn rows_of(shape: &[u64]) -> Option<(u64, u64)> {
    match shape {
        [r, c] => Some((*r, *c)),
        _ => None,
    }
}

fn row_blocks(cols: u64, size: u64, n: u64) -> Segmentation {
    Segmentation {
        cols,
        rows: RowMap::Block { size },
        col: ColMap::All,
        n_row: n as u32,
        n_col: 1,
    }
}

fn col_blocks(cols: u64, size: u64, n: u64) -> Segmentation {
    Segmentation {
        cols,
        rows: RowMap::All,
        col: ColMap::Block { size },
        n_row: 1,
        n_col: n as u32,
    }
}

/// Segment every tensor (`(name, shape)`, roles aligned in `st`). Layers whose attention shapes
/// disagree with the geometry keep whole-tensor segments and are listed in `skipped`.
pub(crate) fn plan_segments(shapes: &[&[u64]], st: &Structure) -> SegPlan {
    let cols = |i: usize| shapes[i].last().copied().unwrap_or(1).max(1);
    let mut segs: Vec<Segmentation> = (0..shapes.len())
        .map(|i| Segmentation::whole(cols(i)))
        .collect();
    let mut heads = Vec::new();
    let mut skipped = Vec::new();
    if !st.is_known() {
        return SegPlan {
            segs,
            heads,
            skipped,
        };
    }
    let find = |layer: u32, module: Module, bias: bool| {
        (0..shapes.len()).find(|&i| {
            let r = st.roles[i];
            r.layer == Some(layer) && r.module == module && r.bias == bias && r.expert.is_none()
        })
    };
    let mut layers: Vec<u32> = st.roles.iter().filter_map(|r| r.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    // Too many segments would make the fingerprint as large as the tensor; no real model is close.
    const MAX_SEGS: u64 = 1 << 16;
    for &l in &layers {
        match &st.attention {
            Attention::Gqa {
                n_heads,
                n_kv_heads,
                head_dim,
            } => {
                let parts = [Module::Q, Module::K, Module::V, Module::O].map(|m| find(l, m, false));
                let [Some(q), Some(k), Some(v), Some(o)] = parts else {
                    continue;
                };
                let (h, hkv, d) = (*n_heads as u64, *n_kv_heads as u64, *head_dim as u64);
                let bias = [Module::Q, Module::K, Module::V].map(|m| find(l, m, true));
                let ok = (|| -> Option<bool> {
                    if h == 0 || hkv == 0 || d == 0 || h % hkv != 0 || h > MAX_SEGS {
                        return Some(false);
                    }
                    let (qr, n) = rows_of(shapes[q])?;
                    let (kr, kn) = rows_of(shapes[k])?;
                    let (vr, vn) = rows_of(shapes[v])?;
                    let (or, oc) = rows_of(shapes[o])?;
                    let shapes_ok = qr == h * d
                        && kr == hkv * d
                        && vr == hkv * d
                        && kn == n
                        && vn == n
                        && or == n
                        && oc == h * d;
                    let bias_ok = bias.iter().zip([h, hkv, hkv]).all(|(b, nh)| match b {
                        None => true,
                        Some(b) => shapes[*b] == [nh * d],
                    });
                    Some(shapes_ok && bias_ok)
                })()
                .unwrap_or(false);
                if !ok {
                    skipped.push(AnalysisSkip {
                        tensor: format!("layer {l}"),
                        metric: "head_drift".into(),
                        reason: "q/k/v/o shapes disagree with the heads of config.json; per-tensor sketches only".into(),
                    });
                    continue;
                }
                segs[q] = row_blocks(cols(q), d, h);
                segs[k] = row_blocks(cols(k), d, hkv);
                segs[v] = row_blocks(cols(v), d, hkv);
                segs[o] = col_blocks(cols(o), d, h);
                for (b, nh) in bias.iter().zip([h, hkv, hkv]) {
                    if let Some(b) = b {
                        segs[*b] = col_blocks(cols(*b), d, nh);
                    }
                }
                heads.push(HeadLayer::Gqa {
                    layer: l,
                    q,
                    k,
                    v,
                    o,
                    bias,
                    n_heads: h as usize,
                    n_kv_heads: hkv as usize,
                });
            }
            Attention::Mla { n_heads, mla } => {
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
                let h = *n_heads as u64;
                let (nope, rope, dv) = (
                    mla.qk_nope_head_dim as u64,
                    mla.qk_rope_head_dim as u64,
                    mla.v_head_dim as u64,
                );
                let (dqk, dkv) = (nope + rope, nope + dv);
                let ok = h > 0
                    && h <= MAX_SEGS
                    && dqk > 0
                    && dv > 0
                    && matches!(rows_of(shapes[q]), Some((r, _)) if r == h * dqk)
                    && matches!(rows_of(shapes[kvb]), Some((r, _)) if r == h * dkv)
                    && matches!(rows_of(shapes[o]), Some((_, c)) if c == h * dv);
                if !ok {
                    skipped.push(AnalysisSkip {
                        tensor: format!("layer {l}"),
                        metric: "head_drift".into(),
                        reason: "MLA shapes disagree with config.json; per-tensor sketches only"
                            .into(),
                    });
                    continue;
                }
                segs[q] = row_blocks(cols(q), dqk, h);
                segs[kvb] = Segmentation {
                    cols: cols(kvb),
                    rows: RowMap::Split {
                        block: dkv,
                        at: nope,
                    },
                    col: ColMap::All,
                    n_row: (2 * h) as u32,
                    n_col: 1,
                };
                segs[o] = col_blocks(cols(o), dv, h);
                heads.push(HeadLayer::Mla {
                    layer: l,
                    q,
                    kv_b: kvb,
                    o,
                    n_heads: h as usize,
                });
            }
            Attention::None => {}
        }
    }
    // Fused expert tensors: 2 segments per expert for gate_up (gate, up), 1 for down.
    for (i, role) in st.roles.iter().enumerate() {
        let (Some(_), Some(layout), false) = (role.layer, role.fused, role.bias) else {
            continue;
        };
        let [e, a, b] = shapes[i][..] else { continue };
        if e == 0 || a == 0 || b == 0 || e > MAX_SEGS {
            continue;
        }
        segs[i] = match role.module {
            Module::ExpertsGateUp if !layout.transposed => Segmentation {
                cols: b,
                rows: if layout.interleaved {
                    RowMap::Parity { block: a }
                } else {
                    RowMap::Split {
                        block: a,
                        at: a / 2,
                    }
                },
                col: ColMap::All,
                n_row: (2 * e) as u32,
                n_col: 1,
            },
            Module::ExpertsGateUp => Segmentation {
                cols: b,
                rows: RowMap::Block { size: a },
                col: if layout.interleaved {
                    ColMap::Parity
                } else {
                    ColMap::Split { at: b / 2 }
                },
                n_row: e as u32,
                n_col: 2,
            },
            Module::ExpertsDown => row_blocks(b, a, e),
            _ => continue,
        };
    }
    SegPlan {
        segs,
        heads,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg_of(s: &Segmentation, i: u64) -> u64 {
        let (r, c) = (i / s.cols, i % s.cols);
        s.row_seg(r).0 * u64::from(s.n_col) + s.col_seg(c).0
    }

    #[test]
    fn maps_follow_their_definitions() {
        let s = Segmentation {
            cols: 6,
            rows: RowMap::Split { block: 4, at: 2 },
            col: ColMap::All,
            n_row: 4,
            n_col: 1,
        };
        let want = [0, 0, 1, 1, 2, 2, 3, 3];
        for r in 0..8u64 {
            assert_eq!(seg_of(&s, r * 6 + 3), want[r as usize]);
            let (seg, next) = s.row_seg(r);
            assert!(next > r && (next == 8 || s.row_seg(next).0 != seg));
        }
        let t = Segmentation {
            cols: 6,
            rows: RowMap::Block { size: 3 },
            col: ColMap::Parity,
            n_row: 2,
            n_col: 2,
        };
        assert_eq!(seg_of(&t, 0), 0);
        assert_eq!(seg_of(&t, 1), 1);
        assert_eq!(seg_of(&t, 3 * 6 + 1), 3);
        let o = col_blocks(8, 2, 4);
        assert_eq!(o.col_seg(5), (2, 6));
        assert_eq!(seg_of(&o, 8 + 7), 3);
    }
}
