//! `weight_drift`: trajectory metrics of one tensor across checkpoints W₀ → W₁ → … → W_k.
//!
//! Formulas (METRICS.md §1.1–1.2), with Δ_t = W_t − W₀ and δ_t = W_t − W_{t−1}:
//! - `fro_delta`      D_t = ‖Δ_t‖_F
//! - `rel_delta`      D_t / ‖W₀‖_F (NaN when ‖W₀‖ = 0)
//! - `one_minus_cos`  1 − ⟨W₀,W_t⟩/(‖W₀‖‖W_t‖), computed as (D_t² − (‖W_t‖ − ‖W₀‖)²)/(2‖W₀‖‖W_t‖),
//!   which keeps full relative precision for tiny drifts where 1 − ⟨·,·⟩/(‖·‖‖·‖) cancels;
//!   clamped to [0, 2]; NaN when either norm is 0
//! - `step_drift`     s_t = ‖δ_t‖_F
//! - `path_length`    P_t = Σ_{τ≤t} s_τ
//! - `straightness`   D_t / P_t ∈ [0, 1] (NaN when P_t = 0: no movement)
//! - `step_cos`       cos(δ_t, δ_{t+1}) (NaN for the last step or a zero step)
//! - `frac_unchanged` #{W_t,ij = W₀,ij} / numel — the bf16 rounding floor: above 0.5 the drift is
//!   dominated by storage rounding (METRICS.md §0)
//! - `n_nan`, `n_inf` per checkpoint. Any NaN/Inf makes the sums (and so the metrics) NaN: a metric
//!   is never reported on a silently filtered tensor.
//!
//! One pass over the data: O(k·numel) flops, all sums in f64. Accumulators merge by addition, so
//! chunks can be processed in any order and merged in chunk order (deterministic).

use serde::Serialize;

use super::kernels::{count_nonfinite, diff_sq, pair_stats, pair_stats_bf16, step_dot};

/// Partial sums for one tensor over `n` checkpoints (index 0 is the base).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftAcc {
    n: usize,
    /// Σ W_t² per checkpoint.
    sq: Vec<f64>,
    /// Σ (W_t − W₀)², index t ≥ 1.
    delta_sq: Vec<f64>,
    /// Σ (W_t − W_{t−1})², index t ≥ 1 (t = 1 equals delta_sq[1]).
    step_sq: Vec<f64>,
    /// Σ δ_t·δ_{t+1}, index t in 1..k.
    step_dot: Vec<f64>,
    /// #{W_t = W₀}, index t ≥ 1.
    unchanged: Vec<u64>,
    nan: Vec<u64>,
    inf: Vec<u64>,
    numel: u64,
}

impl DriftAcc {
    /// Empty accumulator for `n ≥ 2` checkpoints.
    pub fn new(n: usize) -> Self {
        assert!(
            n >= 2,
            "a trajectory needs a base and at least one checkpoint"
        );
        DriftAcc {
            n,
            sq: vec![0.0; n],
            delta_sq: vec![0.0; n],
            step_sq: vec![0.0; n],
            step_dot: vec![0.0; n],
            unchanged: vec![0; n],
            nan: vec![0; n],
            inf: vec![0; n],
            numel: 0,
        }
    }

    /// Add one block: `w[t]` holds the same elements of checkpoint t (all the same length).
    pub fn update(&mut self, w: &[&[f32]]) {
        debug_assert_eq!(w.len(), self.n);
        let len = w[0].len();
        debug_assert!(w.iter().all(|x| x.len() == len));
        // One fused pass per checkpoint against the base gives ‖W_t‖², ‖W₀‖² and ‖Δ_t‖² together.
        for t in 1..self.n {
            let p = pair_stats(w[0], w[t]);
            if t == 1 {
                self.add_sq(0, p.sq_a, w[0]);
            }
            self.add_sq(t, p.sq_b, w[t]);
            self.delta_sq[t] += p.diff_sq;
            self.unchanged[t] += p.equal;
            self.step_sq[t] += if t == 1 {
                p.diff_sq
            } else {
                diff_sq(w[t - 1], w[t])
            };
            if t + 1 < self.n {
                self.step_dot[t] += step_dot(w[t - 1], w[t], w[t + 1]);
            }
        }
        self.numel += len as u64;
    }

    /// [`Self::update`] for two checkpoints stored as plain bf16, straight from their bytes.
    /// Bit-identical to decoding the same block and calling [`Self::update`].
    pub fn update_bf16_pair(&mut self, a: &[u8], b: &[u8]) {
        debug_assert_eq!(self.n, 2);
        let p = pair_stats_bf16(a, b);
        if p.sq_a.is_finite() && p.sq_b.is_finite() {
            self.sq[0] += p.sq_a;
            self.sq[1] += p.sq_b;
        } else {
            let decode = |x: &[u8]| {
                let mut v = vec![0f32; x.len() / 2];
                crate::dtype::decode_plain(crate::dtype::Dtype::BF16, x, &mut v);
                v
            };
            self.add_sq(0, p.sq_a, &decode(a));
            self.add_sq(1, p.sq_b, &decode(b));
        }
        self.delta_sq[1] += p.diff_sq;
        self.step_sq[1] += p.diff_sq;
        self.unchanged[1] += p.equal;
        self.numel += (a.len() / 2) as u64;
    }

    /// Add Σw² of checkpoint t; count NaN/Inf only when the sum says there are some (the sum of
    /// squares of finite f32 values cannot overflow f64).
    fn add_sq(&mut self, t: usize, s: f64, w: &[f32]) {
        if !s.is_finite() {
            let (nan, inf) = count_nonfinite(w);
            self.nan[t] += nan;
            self.inf[t] += inf;
        }
        self.sq[t] += s;
    }

    /// Add another accumulator over disjoint elements.
    pub fn merge(&mut self, o: &DriftAcc) {
        debug_assert_eq!(self.n, o.n);
        let add = |a: &mut Vec<f64>, b: &Vec<f64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        let addu = |a: &mut Vec<u64>, b: &Vec<u64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.sq, &o.sq);
        add(&mut self.delta_sq, &o.delta_sq);
        add(&mut self.step_sq, &o.step_sq);
        add(&mut self.step_dot, &o.step_dot);
        addu(&mut self.unchanged, &o.unchanged);
        addu(&mut self.nan, &o.nan);
        addu(&mut self.inf, &o.inf);
        self.numel += o.numel;
    }

    /// Elements accumulated so far.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Base-checkpoint statistics.
    pub fn base(&self) -> BaseStats {
        BaseStats {
            norm: if self.finite(0) {
                self.sq[0].sqrt()
            } else {
                f64::NAN
            },
            n_nan: self.nan[0],
            n_inf: self.inf[0],
        }
    }

    fn finite(&self, t: usize) -> bool {
        self.nan[t] == 0 && self.inf[t] == 0
    }

    /// Metrics for checkpoints 1..n. Any NaN/Inf element in a checkpoint makes every metric that
    /// involves it NaN (an Inf would otherwise leak through as an Inf norm or a straightness of 1).
    pub fn finish(&self) -> Vec<StepMetrics> {
        let nan_unless = |ok: bool, v: f64| if ok { v } else { f64::NAN };
        let norm0 = nan_unless(self.finite(0), self.sq[0].sqrt());
        let mut path = 0.0f64;
        let steps: Vec<f64> = (0..self.n)
            .map(|t| {
                nan_unless(
                    t == 0 || (self.finite(t) && self.finite(t - 1)),
                    self.step_sq[t].sqrt(),
                )
            })
            .collect();
        (1..self.n)
            .map(|t| {
                let ok = self.finite(0) && self.finite(t);
                let norm = nan_unless(self.finite(t), self.sq[t].sqrt());
                let d = nan_unless(ok, self.delta_sq[t].sqrt());
                path += steps[t];
                let one_minus_cos = if ok && norm0 > 0.0 && norm > 0.0 {
                    let gap = norm - norm0;
                    ((self.delta_sq[t] - gap * gap) / (2.0 * norm0 * norm)).clamp(0.0, 2.0)
                } else {
                    f64::NAN
                };
                let step_cos = if t + 1 < self.n && steps[t] > 0.0 && steps[t + 1] > 0.0 {
                    (self.step_dot[t] / (steps[t] * steps[t + 1])).clamp(-1.0, 1.0)
                } else {
                    f64::NAN
                };
                let straightness = if path > 0.0 && d.is_finite() {
                    (d / path).min(1.0)
                } else {
                    f64::NAN
                };
                StepMetrics {
                    norm,
                    fro_delta: d,
                    rel_delta: if norm0 > 0.0 { d / norm0 } else { f64::NAN },
                    one_minus_cos,
                    step_drift: steps[t],
                    path_length: path,
                    straightness,
                    step_cos,
                    frac_unchanged: if self.numel > 0 {
                        self.unchanged[t] as f64 / self.numel as f64
                    } else {
                        f64::NAN
                    },
                    n_nan: self.nan[t],
                    n_inf: self.inf[t],
                }
            })
            .collect()
    }
}

/// Statistics of the base checkpoint's tensor.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BaseStats {
    /// ‖W₀‖_F.
    pub norm: f64,
    /// NaN count.
    pub n_nan: u64,
    /// ±Inf count.
    pub n_inf: u64,
}

/// Metrics of one tensor at one checkpoint t ≥ 1 (see the module docs for definitions).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepMetrics {
    /// ‖W_t‖_F.
    pub norm: f64,
    /// ‖W_t − W₀‖_F.
    pub fro_delta: f64,
    /// ‖W_t − W₀‖_F / ‖W₀‖_F.
    pub rel_delta: f64,
    /// 1 − cos(W₀, W_t).
    pub one_minus_cos: f64,
    /// ‖W_t − W_{t−1}‖_F.
    pub step_drift: f64,
    /// Σ_{τ≤t} step_drift.
    pub path_length: f64,
    /// fro_delta / path_length.
    pub straightness: f64,
    /// cos(δ_t, δ_{t+1}).
    pub step_cos: f64,
    /// Fraction of elements equal to the base.
    pub frac_unchanged: f64,
    /// NaN count in W_t.
    pub n_nan: u64,
    /// ±Inf count in W_t.
    pub n_inf: u64,
}

/// Exact byte form, for partial results computed in another process (`stream::partial`).
impl DriftAcc {
    pub(crate) fn put(&self, w: &mut crate::stream::partial::wire::Writer) {
        w.usize(self.n);
        for v in [&self.sq, &self.delta_sq, &self.step_sq, &self.step_dot] {
            w.f64s(v);
        }
        for v in [&self.unchanged, &self.nan, &self.inf] {
            w.u64s(v);
        }
        w.u64(self.numel);
    }

    pub(crate) fn get(r: &mut crate::stream::partial::wire::Reader) -> crate::Result<Self> {
        let acc = DriftAcc {
            n: r.usize()?,
            sq: r.f64s()?,
            delta_sq: r.f64s()?,
            step_sq: r.f64s()?,
            step_dot: r.f64s()?,
            unchanged: r.u64s()?,
            nan: r.u64s()?,
            inf: r.u64s()?,
            numel: r.u64()?,
        };
        let n = acc.n;
        let lens = [
            acc.sq.len(),
            acc.delta_sq.len(),
            acc.step_sq.len(),
            acc.step_dot.len(),
            acc.unchanged.len(),
            acc.nan.len(),
            acc.inf.len(),
        ];
        if n < 2 || lens.iter().any(|&l| l != n) {
            return Err(crate::Error::Config {
                reason: format!("cannot decode a partial result: drift accumulator of {n} checkpoints with vectors of {lens:?}"),
            });
        }
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let w0 = [1.0f32, 0.0, 0.0, 0.0];
        let w1 = [1.0f32, 1.0, 0.0, 0.0];
        let w2 = [1.0f32, 1.0, 1.0, 0.0];
        let mut a = DriftAcc::new(3);
        a.update(&[&w0, &w1, &w2]);
        let m = a.finish();
        assert_eq!(m[0].fro_delta, 1.0);
        assert!((m[1].fro_delta - 2f64.sqrt()).abs() < 1e-15);
        assert_eq!(m[1].path_length, 2.0);
        assert!((m[1].straightness - 2f64.sqrt() / 2.0).abs() < 1e-15);
        assert!((m[0].one_minus_cos - (1.0 - 1.0 / 2f64.sqrt())).abs() < 1e-15);
        assert_eq!(m[0].step_cos, 0.0);
        assert!(m[1].step_cos.is_nan());
        assert_eq!(m[0].frac_unchanged, 0.75);
    }

    #[test]
    fn bf16_pair_path_is_bit_identical() {
        let vals = |k: u32| -> Vec<u8> {
            (0..10_007u32)
                .flat_map(|i| (((i * 7919 + k) % 16_000) as u16 + 0x3000).to_le_bytes())
                .collect()
        };
        let (a, mut b) = (vals(0), vals(0));
        for i in (0..b.len()).step_by(6) {
            b[i] ^= 1;
        }
        b[100] = 0x80;
        b[101] = 0x7f; // +Inf
        let dec = |x: &[u8]| -> Vec<f32> {
            let mut v = vec![0f32; x.len() / 2];
            crate::dtype::decode_plain(crate::dtype::Dtype::BF16, x, &mut v);
            v
        };
        let (fa, fb) = (dec(&a), dec(&b));
        let (mut x, mut y) = (DriftAcc::new(2), DriftAcc::new(2));
        for (ca, cb) in a.chunks(8192).zip(b.chunks(8192)) {
            x.update_bf16_pair(ca, cb);
        }
        for (ca, cb) in fa.chunks(4096).zip(fb.chunks(4096)) {
            y.update(&[ca, cb]);
        }
        assert_eq!(x, y);
        assert_eq!(x.finish()[0].n_inf, 1);
    }

    #[test]
    fn merge_equals_whole() {
        let w: Vec<Vec<f32>> = (0..3)
            .map(|t| (0..100).map(|i| (i * (t + 1)) as f32 * 0.01).collect())
            .collect();
        let mut whole = DriftAcc::new(3);
        whole.update(&[&w[0], &w[1], &w[2]]);
        let mut a = DriftAcc::new(3);
        a.update(&[&w[0][..37], &w[1][..37], &w[2][..37]]);
        let mut b = DriftAcc::new(3);
        b.update(&[&w[0][37..], &w[1][37..], &w[2][37..]]);
        a.merge(&b);
        for (x, y) in a.finish().iter().zip(whole.finish()) {
            assert!((x.fro_delta - y.fro_delta).abs() <= 1e-12 * y.fro_delta);
        }
    }

    #[test]
    fn nan_is_counted_and_propagates() {
        let w0 = [1.0f32, 2.0];
        let w1 = [f32::NAN, f32::INFINITY];
        let mut a = DriftAcc::new(2);
        a.update(&[&w0, &w1]);
        let m = a.finish()[0];
        assert_eq!((m.n_nan, m.n_inf), (1, 1));
        assert!(m.fro_delta.is_nan() && m.norm.is_nan() && m.straightness.is_nan());
        let mut b = DriftAcc::new(2);
        b.update(&[&w0, &[f32::INFINITY, 1.0]]);
        let m = b.finish()[0];
        assert_eq!((m.n_nan, m.n_inf), (0, 1));
        assert!(
            m.norm.is_nan()
                && m.fro_delta.is_nan()
                && m.path_length.is_nan()
                && m.straightness.is_nan()
        );
    }
}
