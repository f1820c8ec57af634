//! `expert_drift`: per-expert relative drift over the expert's gate, up and down projections
//! (METRICS.md §4.2):
//!
//! ρ_e = √(Σ_{p ∈ gate,up,down} ‖ΔW_{e,p}‖_F²) / √(Σ_p ‖W⁰_{e,p}‖_F²)
//!
//! plus ρ_{e,p} per projection. Per-expert tensors give the sums directly from their per-tensor
//! drift; fused `gate_up_proj` slices are split here by the family's layout (gate = first half of
//! the output axis, or the even outputs for GPT-OSS), in either orientation. Cost O(numel) per
//! slice, f64 sums.

use serde::Serialize;

use crate::layout::FusedLayout;

/// Index of a projection in [`ExpertSums`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// Gate (`w1`).
    Gate = 0,
    /// Up (`w3`).
    Up = 1,
    /// Down (`w2`).
    Down = 2,
}

/// Σ‖ΔW‖² and Σ‖W⁰‖² per projection of one expert (NaN-propagating: a non-finite value makes the
/// expert's metrics NaN rather than silently dropping elements).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExpertSums {
    /// Σ (W_t − W₀)² per projection.
    pub delta2: [f64; 3],
    /// Σ W₀² per projection.
    pub base2: [f64; 3],
    /// Which projections contributed.
    pub seen: [bool; 3],
}

/// Finished per-expert drift.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ExpertDrift {
    /// ‖ΔW_e‖_F over all present projections.
    pub fro_delta: f64,
    /// ‖W⁰_e‖_F over all present projections.
    pub base_norm: f64,
    /// ρ_e (NaN when the base is zero).
    pub rel_drift: f64,
    /// ρ per projection (NaN when absent).
    pub gate_rel_drift: f64,
    /// Up projection.
    pub up_rel_drift: f64,
    /// Down projection.
    pub down_rel_drift: f64,
}

fn ratio(d2: f64, b2: f64) -> f64 {
    if b2 > 0.0 {
        (d2 / b2).sqrt()
    } else {
        f64::NAN
    }
}

impl ExpertSums {
    /// Add a projection's sums.
    pub fn add(&mut self, p: Proj, delta2: f64, base2: f64) {
        let i = p as usize;
        self.delta2[i] += delta2;
        self.base2[i] += base2;
        self.seen[i] = true;
    }

    /// Add a whole (unsplit) matrix of projection `p`.
    pub fn add_matrix(&mut self, p: Proj, w0: &[f32], wt: &[f32]) {
        let (d, b) = sums(w0.iter().zip(wt));
        self.add(p, d, b);
    }

    /// Add one expert's slice of a fused `gate_up_proj`, `a × b` row-major as stored, splitting
    /// gate from up by `layout`.
    pub fn add_gate_up(&mut self, w0: &[f32], wt: &[f32], a: usize, b: usize, layout: FusedLayout) {
        // The output axis is rows ([out, in]) or columns ([in, out]).
        let n_out = if layout.transposed { b } else { a };
        let half = n_out / 2;
        let is_gate = |o: usize| {
            if layout.interleaved {
                o.is_multiple_of(2)
            } else {
                o < half
            }
        };
        let mut acc = [(0.0f64, 0.0f64); 2];
        for r in 0..a {
            let row0 = &w0[r * b..(r + 1) * b];
            let rowt = &wt[r * b..(r + 1) * b];
            if layout.transposed {
                for c in 0..b {
                    let d = f64::from(rowt[c]) - f64::from(row0[c]);
                    let slot = &mut acc[usize::from(!is_gate(c))];
                    slot.0 += d * d;
                    slot.1 += f64::from(row0[c]) * f64::from(row0[c]);
                }
            } else {
                let (d, bb) = sums(row0.iter().zip(rowt));
                let slot = &mut acc[usize::from(!is_gate(r))];
                slot.0 += d;
                slot.1 += bb;
            }
        }
        self.add(Proj::Gate, acc[0].0, acc[0].1);
        self.add(Proj::Up, acc[1].0, acc[1].1);
    }

    /// The expert's metrics.
    pub fn finish(&self) -> ExpertDrift {
        let d2: f64 = self.delta2.iter().sum();
        let b2: f64 = self.base2.iter().sum();
        let per = |i: usize| {
            if self.seen[i] {
                ratio(self.delta2[i], self.base2[i])
            } else {
                f64::NAN
            }
        };
        ExpertDrift {
            fro_delta: d2.sqrt(),
            base_norm: b2.sqrt(),
            rel_drift: ratio(d2, b2),
            gate_rel_drift: per(0),
            up_rel_drift: per(1),
            down_rel_drift: per(2),
        }
    }
}

fn sums<'a>(pairs: impl Iterator<Item = (&'a f32, &'a f32)>) -> (f64, f64) {
    let (mut d2, mut b2) = (0.0f64, 0.0f64);
    for (&x0, &xt) in pairs {
        let d = f64::from(xt) - f64::from(x0);
        d2 += d * d;
        b2 += f64::from(x0) * f64::from(x0);
    }
    (d2, b2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gate/up split by explicit index bookkeeping, on a canonical [2I, H] matrix.
    fn oracle(
        w0: &[f32],
        wt: &[f32],
        two_i: usize,
        h: usize,
        interleaved: bool,
    ) -> [(f64, f64); 2] {
        let mut out = [(0.0, 0.0); 2];
        for o in 0..two_i {
            let gate = if interleaved {
                o % 2 == 0
            } else {
                o < two_i / 2
            };
            for c in 0..h {
                let (x0, xt) = (w0[o * h + c] as f64, wt[o * h + c] as f64);
                let s = &mut out[usize::from(!gate)];
                s.0 += (xt - x0) * (xt - x0);
                s.1 += x0 * x0;
            }
        }
        out
    }

    fn transpose(w: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; w.len()];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = w[i * c + j];
            }
        }
        t
    }

    #[test]
    fn gate_up_split_matches_oracle_in_every_layout() {
        let (two_i, h) = (6, 5);
        let w0: Vec<f32> = (0..two_i * h).map(|i| (i as f32 * 0.37).sin()).collect();
        let wt: Vec<f32> = w0
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 7) as f32 * 0.01)
            .collect();
        for interleaved in [false, true] {
            let want = oracle(&w0, &wt, two_i, h, interleaved);
            for transposed in [false, true] {
                let (a0, at, a, b) = if transposed {
                    (transpose(&w0, two_i, h), transpose(&wt, two_i, h), h, two_i)
                } else {
                    (w0.clone(), wt.clone(), two_i, h)
                };
                let mut s = ExpertSums::default();
                s.add_gate_up(
                    &a0,
                    &at,
                    a,
                    b,
                    FusedLayout {
                        transposed,
                        interleaved,
                    },
                );
                for (p, w) in want.iter().enumerate() {
                    assert!(
                        (s.delta2[p] - w.0).abs() < 1e-12,
                        "{interleaved} {transposed}"
                    );
                    assert!((s.base2[p] - w.1).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn finish_combines_projections() {
        let mut s = ExpertSums::default();
        s.add(Proj::Gate, 1.0, 4.0);
        s.add(Proj::Down, 3.0, 12.0);
        let d = s.finish();
        assert!((d.rel_drift - 0.5).abs() < 1e-15);
        assert!((d.gate_rel_drift - 0.5).abs() < 1e-15);
        assert!(d.up_rel_drift.is_nan());
        assert!(ExpertSums::default().finish().rel_drift.is_nan());
    }
}
