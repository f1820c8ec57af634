//! `gradient_interference`: the cosine between an ancestral-task gradient g_A and a new-task
//! gradient g_B, streamed per tensor, per slice (head rows / columns, experts), per group of
//! slices (modules, heads) and per layer.
//!
//! # Formula (METRICS.md §5.2)
//!
//! With g_A = ∇_θL_A(θ), g_B = ∇_θL_B(θ) at the same θ and any index set S,
//!
//! `cos_S = ⟨g_A, g_B⟩_S / (‖g_A‖_S ‖g_B‖_S)`, from the three sums
//! `dot_S = Σ_{i∈S} g_A,i g_B,i`, `sq_a_S = Σ_{i∈S} g_A,i²`, `sq_b_S = Σ_{i∈S} g_B,i²`,
//!
//! each accumulated in f64: the kernel's 8-lane sums over blocks of 2048 elements, the blocks
//! added with Neumaier compensation (error a few ulps whatever the tensor size or chunking). A **group** is a non-negative weighted sum of slices,
//! `dot_G = Σ_k w_k dot_{S_k}` (and the same for both squared norms). That is how a GQA head h
//! with g query heads per kv head j = ⌊h/g⌋ gets `⟨·⟩_h = ⟨·⟩_{Q_h} + ⟨·⟩_{O[:,h]} +
//! (⟨·⟩_{K_j} + ⟨·⟩_{V_j})/g` (METRICS.md §1.4), whose sum over heads is the q/k/v/o total.
//! Non-negative weights keep a group a weighted inner product, so Cauchy–Schwarz holds and
//! |cos| ≤ 1; the cosine is clamped to [−1, 1] against the last ulp, and NaN when either norm
//! is zero (undefined, not 0).
//!
//! First-order reading: one SGD step on B changes L_A by ≈ −η⟨g_A, g_B⟩, so cos < 0 (PCGrad's
//! and GEM's conflict test) predicts forgetting.
//!
//! # Conventions
//! - A tensor of shape `[d0, d1, …]` is viewed as the row-major matrix `[d0, d1·d2·…]` (a 0-d
//!   tensor as `[1, 1]`, a bias `[n]` as `[n, 1]`): slices are row ranges (q/k/v heads, fused
//!   experts `[E, …]`) or column ranges (o_proj heads) of that view.
//! - Updates hand in any contiguous run of a tensor's flattened elements (`offset` = index of
//!   the first), as f32, f64, or bf16 / f16 bit patterns; narrow inputs are widened exactly in
//!   fixed-size stack blocks, so memory is O(tensors + slices), never O(parameters).
//! - [`StreamingGradientInterference::merge`] adds accumulators that saw **disjoint parts of the
//!   parameter vector** (workers, shards, halves of a tensor). It does not combine data batches:
//!   ⟨Σ_b g_A^b, Σ_b g_B^b⟩ ≠ Σ_b ⟨g_A^b, g_B^b⟩, so gradients are summed over the token budget
//!   before they are reduced here.
//! - [`StreamingGradientInterference::finish`] refuses a tensor that was fed more or fewer
//!   elements than it has (an overlap plus an equal-sized gap cannot be detected).

use crate::dtype::{bf16_bits_to_f32, decode_plain, Dtype};
use crate::error::{Error, Result};
use crate::metrics::kernels::{dot_stats, dot_stats_f64, DotStats};

/// Elements widened at once on the bf16 / f16 / mixed-precision paths (stack scratch).
const BLOCK: usize = 2048;

fn cfg(reason: String) -> Error {
    Error::Config { reason }
}

/// Which way a slice cuts the `[rows, cols]` view of its tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Rows `[lo, hi)`: a contiguous run of the flattened tensor.
    Rows,
    /// Columns `[lo, hi)` of every row.
    Cols,
}

/// One gradient tensor of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Parameter name (for errors and results).
    pub name: String,
    /// Leading dimension.
    pub rows: usize,
    /// Product of the remaining dimensions.
    pub cols: usize,
    /// Transformer layer index, −1 for none (embeddings, final norm, head).
    pub layer: i64,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.rows as u64 * self.cols as u64
    }
}

/// A row or column range of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Index of the tensor in the plan.
    pub tensor: usize,
    /// Row or column range.
    pub axis: Axis,
    /// First row / column.
    pub lo: usize,
    /// One past the last row / column.
    pub hi: usize,
}

/// A named non-negative weighted sum of slices (a module, a head, one projection of a head).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Label carried to the results.
    pub name: String,
    /// `(slice index, weight ≥ 0)`.
    pub terms: Vec<(usize, f64)>,
}

/// The three sums behind one cosine.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sums {
    /// ⟨g_A, g_B⟩.
    pub dot: f64,
    /// ‖g_A‖².
    pub sq_norm_a: f64,
    /// ‖g_B‖².
    pub sq_norm_b: f64,
}

impl Sums {
    fn from_stats(s: DotStats) -> Self {
        Sums {
            dot: s.dot,
            sq_norm_a: s.sq_a,
            sq_norm_b: s.sq_b,
        }
    }

    fn add_scaled(&mut self, o: Sums, w: f64) {
        self.dot += w * o.dot;
        self.sq_norm_a += w * o.sq_norm_a;
        self.sq_norm_b += w * o.sq_norm_b;
    }

    /// dot/(‖g_A‖‖g_B‖) clamped to [−1, 1]; NaN when either norm is zero or a sum is not finite.
    pub fn cos(&self) -> f64 {
        let den = self.sq_norm_a.sqrt() * self.sq_norm_b.sqrt();
        if den > 0.0 && den.is_finite() {
            (self.dot / den).clamp(-1.0, 1.0)
        } else {
            f64::NAN
        }
    }
}

/// Per-layer totals of [`InterferenceReport`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSums {
    /// Layer index (−1: tensors outside the layer stack).
    pub layer: i64,
    /// Elements of the layer's tensors.
    pub numel: u64,
    /// The layer's sums.
    pub sums: Sums,
}

/// Everything [`StreamingGradientInterference::finish`] produces, in plan order.
#[derive(Debug, Clone, PartialEq)]
pub struct InterferenceReport {
    /// One per tensor.
    pub tensors: Vec<Sums>,
    /// One per slice.
    pub slices: Vec<Sums>,
    /// One per group.
    pub groups: Vec<Sums>,
    /// One per distinct layer, ascending.
    pub layers: Vec<LayerSums>,
    /// All tensors.
    pub overall: Sums,
    /// Σ numel over the tensors.
    pub n_params: u64,
}

/// One side of an update: a run of a tensor's flattened elements.
#[derive(Debug, Clone, Copy)]
pub enum GradSlice<'a> {
    /// float32 values.
    F32(&'a [f32]),
    /// float64 values.
    F64(&'a [f64]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
}

impl<'a> GradSlice<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GradSlice::F32(x) => x.len(),
            GradSlice::F64(x) => x.len(),
            GradSlice::Bf16(x) | GradSlice::F16(x) => x.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sub(&self, lo: usize, hi: usize) -> GradSlice<'a> {
        match *self {
            GradSlice::F32(x) => GradSlice::F32(&x[lo..hi]),
            GradSlice::F64(x) => GradSlice::F64(&x[lo..hi]),
            GradSlice::Bf16(x) => GradSlice::Bf16(&x[lo..hi]),
            GradSlice::F16(x) => GradSlice::F16(&x[lo..hi]),
        }
    }

    /// Widen to f32 (exact for every variant but F64, which callers route to [`Self::widen_f64`]).
    fn widen_f32(&self, out: &mut [f32]) {
        match *self {
            GradSlice::F32(x) => out.copy_from_slice(x),
            GradSlice::Bf16(x) => bf16_bits_to_f32(x, out),
            GradSlice::F16(x) => {
                let mut bytes = [0u8; 2 * BLOCK];
                for (c, &v) in bytes.chunks_exact_mut(2).zip(x) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
                decode_plain(Dtype::F16, &bytes[..2 * x.len()], out);
            }
            GradSlice::F64(x) => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v as f32;
                }
            }
        }
    }

    fn widen_f64(&self, out: &mut [f64]) {
        if let GradSlice::F64(x) = *self {
            out.copy_from_slice(x);
            return;
        }
        let mut tmp = [0f32; BLOCK];
        let t = &mut tmp[..out.len()];
        self.widen_f32(t);
        for (o, &v) in out.iter_mut().zip(t.iter()) {
            *o = v as f64;
        }
    }
}

/// Neumaier-compensated sums of [`DotStats`]. The kernel's 8 lanes run sequentially over a
/// block, so one call over millions of elements loses ~1e-13 of relative accuracy; reducing in
/// blocks of [`BLOCK`] and carrying each addition's rounding error keeps the sums at a few ulps
/// whatever the tensor size, the chunking or the number of merged parts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Compensated {
    sum: [f64; 3],
    err: [f64; 3],
}

impl Compensated {
    #[inline]
    fn add(&mut self, x: DotStats) {
        for (k, v) in [x.dot, x.sq_a, x.sq_b].into_iter().enumerate() {
            let (s, t) = (self.sum[k], self.sum[k] + v);
            self.err[k] += if s.abs() >= v.abs() {
                (s - t) + v
            } else {
                (v - t) + s
            };
            self.sum[k] = t;
        }
    }

    fn merge(&mut self, o: &Compensated) {
        self.add(DotStats {
            dot: o.sum[0],
            sq_a: o.sum[1],
            sq_b: o.sum[2],
        });
        for k in 0..3 {
            self.err[k] += o.err[k];
        }
    }

    fn value(&self) -> DotStats {
        DotStats {
            dot: self.sum[0] + self.err[0],
            sq_a: self.sum[1] + self.err[1],
            sq_b: self.sum[2] + self.err[2],
        }
    }
}

/// Add Σab, Σa², Σb² of two equally long runs, whatever their encodings, block by block.
fn stats_into(acc: &mut Compensated, a: GradSlice<'_>, b: GradSlice<'_>) {
    let wide = matches!(a, GradSlice::F64(_)) || matches!(b, GradSlice::F64(_));
    for lo in (0..a.len()).step_by(BLOCK) {
        let hi = (lo + BLOCK).min(a.len());
        let n = hi - lo;
        acc.add(match (a.sub(lo, hi), b.sub(lo, hi)) {
            (GradSlice::F32(x), GradSlice::F32(y)) => dot_stats(x, y),
            (GradSlice::F64(x), GradSlice::F64(y)) => dot_stats_f64(x, y),
            (sa, sb) if wide => {
                let (mut x, mut y) = ([0f64; BLOCK], [0f64; BLOCK]);
                sa.widen_f64(&mut x[..n]);
                sb.widen_f64(&mut y[..n]);
                dot_stats_f64(&x[..n], &y[..n])
            }
            (sa, sb) => {
                let (mut x, mut y) = ([0f32; BLOCK], [0f32; BLOCK]);
                sa.widen_f32(&mut x[..n]);
                sb.widen_f32(&mut y[..n]);
                dot_stats(&x[..n], &y[..n])
            }
        });
    }
}

/// [`stats_into`] from zero (tests).
#[cfg(test)]
fn stats(a: GradSlice<'_>, b: GradSlice<'_>) -> DotStats {
    let mut acc = Compensated::default();
    stats_into(&mut acc, a, b);
    acc.value()
}

/// Streaming gradient-interference accumulator (METRICS.md §5.2): a plan of tensors, slices and
/// groups, then `update` with runs of both gradients, `merge` across workers, `finish`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamingGradientInterference {
    tensors: Vec<TensorSpec>,
    slices: Vec<Slice>,
    groups: Vec<Group>,
    /// Slices of each tensor that need their own pass (whole-tensor slices reuse the total).
    partial: Vec<Vec<usize>>,
    totals: Vec<Compensated>,
    slice_sums: Vec<Compensated>,
    seen: Vec<u64>,
}

impl Default for StreamingGradientInterference {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamingGradientInterference {
    /// An empty plan.
    pub fn new() -> Self {
        StreamingGradientInterference {
            tensors: Vec::new(),
            slices: Vec::new(),
            groups: Vec::new(),
            partial: Vec::new(),
            totals: Vec::new(),
            slice_sums: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The same plan with every sum at zero (for another worker, to be merged back).
    pub fn empty_copy(&self) -> Self {
        let mut s = self.clone();
        s.reset();
        s
    }

    /// Zero every sum; keep the plan.
    pub fn reset(&mut self) {
        self.totals
            .iter_mut()
            .for_each(|t| *t = Compensated::default());
        self.slice_sums
            .iter_mut()
            .for_each(|t| *t = Compensated::default());
        self.seen.iter_mut().for_each(|n| *n = 0);
    }

    fn started(&self) -> bool {
        self.seen.iter().any(|&n| n > 0)
    }

    fn frozen(&self, what: &str) -> Result<()> {
        if self.started() {
            return Err(cfg(format!(
                "gradient_interference: cannot add a {what} after the first update (the plan is fixed once data flows)"
            )));
        }
        Ok(())
    }

    fn tensor_ref(&self, tensor: usize) -> Result<&TensorSpec> {
        self.tensors.get(tensor).ok_or_else(|| {
            cfg(format!(
                "gradient_interference: no tensor #{tensor} (the plan has {})",
                self.tensors.len()
            ))
        })
    }

    /// Declare a tensor viewed as `[rows, cols]`; returns its index.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        layer: i64,
    ) -> Result<usize> {
        self.frozen("tensor")?;
        let name = name.into();
        if rows.checked_mul(cols).is_none() {
            return Err(cfg(format!(
                "gradient_interference: tensor {name:?}: [{rows}, {cols}] overflows"
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(cfg(format!(
                "gradient_interference: tensor {name:?} is declared twice"
            )));
        }
        self.tensors.push(TensorSpec {
            name,
            rows,
            cols,
            layer,
        });
        self.partial.push(Vec::new());
        self.totals.push(Compensated::default());
        self.seen.push(0);
        Ok(self.tensors.len() - 1)
    }

    /// Declare rows or columns `[lo, hi)` of a tensor; returns the slice's index.
    pub fn add_slice(&mut self, tensor: usize, axis: Axis, lo: usize, hi: usize) -> Result<usize> {
        self.frozen("slice")?;
        let t = self.tensor_ref(tensor)?;
        let extent = match axis {
            Axis::Rows => t.rows,
            Axis::Cols => t.cols,
        };
        if lo > hi || hi > extent {
            return Err(cfg(format!(
                "gradient_interference: tensor {:?}: {} [{lo}, {hi}) outside [0, {extent})",
                t.name,
                if axis == Axis::Rows {
                    "rows"
                } else {
                    "columns"
                },
            )));
        }
        let whole = lo == 0 && hi == extent;
        self.slices.push(Slice {
            tensor,
            axis,
            lo,
            hi,
        });
        let id = self.slices.len() - 1;
        if !whole {
            self.partial[tensor].push(id);
        }
        self.slice_sums.push(Compensated::default());
        Ok(id)
    }

    /// The whole tensor as a slice (free: it reuses the tensor's total).
    pub fn add_whole(&mut self, tensor: usize) -> Result<usize> {
        let rows = self.tensor_ref(tensor)?.rows;
        self.add_slice(tensor, Axis::Rows, 0, rows)
    }

    /// Declare a group `Σ w·slice` (weights finite and ≥ 0); returns its index.
    pub fn add_group(&mut self, name: impl Into<String>, terms: &[(usize, f64)]) -> Result<usize> {
        self.frozen("group")?;
        let name = name.into();
        for &(s, w) in terms {
            if s >= self.slices.len() {
                return Err(cfg(format!(
                    "gradient_interference: group {name:?}: no slice #{s} (the plan has {})",
                    self.slices.len()
                )));
            }
            if !(w.is_finite() && w >= 0.0) {
                return Err(cfg(format!(
                    "gradient_interference: group {name:?}: weight {w} must be finite and >= 0 (a negative weight breaks |cos| <= 1)"
                )));
            }
        }
        self.groups.push(Group {
            name,
            terms: terms.to_vec(),
        });
        Ok(self.groups.len() - 1)
    }

    /// Tensors of the plan.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Slices of the plan.
    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }

    /// Groups of the plan.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Elements fed so far for each tensor.
    pub fn seen(&self) -> &[u64] {
        &self.seen
    }

    /// Add elements `[offset, offset + len)` of the flattened tensor `tensor`, from both gradients.
    pub fn update(
        &mut self,
        tensor: usize,
        offset: usize,
        a: GradSlice<'_>,
        b: GradSlice<'_>,
    ) -> Result<()> {
        let t = self.tensor_ref(tensor)?;
        let numel = t.rows * t.cols;
        let len = a.len();
        if b.len() != len {
            return Err(cfg(format!(
                "gradient_interference: tensor {:?}: g_A has {len} elements, g_B {}",
                t.name,
                b.len()
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > numel) {
            return Err(cfg(format!(
                "gradient_interference: tensor {:?}: elements [{offset}, {offset} + {len}) outside its {numel}",
                t.name
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let (end, cols) = (offset + len, t.cols);
        stats_into(&mut self.totals[tensor], a, b);
        for &s in &self.partial[tensor] {
            let sl = self.slices[s];
            let acc = &mut self.slice_sums[s];
            match sl.axis {
                Axis::Rows => {
                    let lo = (sl.lo * cols).max(offset);
                    let hi = (sl.hi * cols).min(end);
                    if lo < hi {
                        stats_into(
                            acc,
                            a.sub(lo - offset, hi - offset),
                            b.sub(lo - offset, hi - offset),
                        );
                    }
                }
                Axis::Cols => {
                    // cols > 0 here: a zero-width tensor has numel 0 and never gets len > 0.
                    for r in offset / cols..=(end - 1) / cols {
                        let lo = (r * cols + sl.lo).max(offset);
                        let hi = (r * cols + sl.hi).min(end);
                        if lo < hi {
                            stats_into(
                                acc,
                                a.sub(lo - offset, hi - offset),
                                b.sub(lo - offset, hi - offset),
                            );
                        }
                    }
                }
            }
        }
        self.seen[tensor] += len as u64;
        Ok(())
    }

    /// Add the sums of an accumulator with the same plan that saw other elements.
    pub fn merge(&mut self, other: &Self) -> Result<()> {
        if self.tensors != other.tensors
            || self.slices != other.slices
            || self.groups != other.groups
        {
            return Err(cfg(
                "gradient_interference: cannot merge accumulators with different plans (tensors, slices or groups differ)"
                    .into(),
            ));
        }
        for (x, y) in self.totals.iter_mut().zip(&other.totals) {
            x.merge(y);
        }
        for (x, y) in self.slice_sums.iter_mut().zip(&other.slice_sums) {
            x.merge(y);
        }
        for (x, y) in self.seen.iter_mut().zip(&other.seen) {
            *x += y;
        }
        Ok(())
    }

    /// Sums per tensor, slice, group and layer, and overall. Every tensor must have been fed
    /// exactly its number of elements.
    pub fn finish(&self) -> Result<InterferenceReport> {
        for (t, &n) in self.tensors.iter().zip(&self.seen) {
            if n != t.numel() {
                return Err(cfg(format!(
                    "gradient_interference: tensor {:?}: fed {n} of its {} elements",
                    t.name,
                    t.numel()
                )));
            }
        }
        let tensors: Vec<Sums> = self
            .totals
            .iter()
            .map(|s| Sums::from_stats(s.value()))
            .collect();
        let slices: Vec<Sums> = self
            .slices
            .iter()
            .zip(&self.slice_sums)
            .enumerate()
            .map(|(i, (sl, &s))| {
                if self.partial[sl.tensor].contains(&i) {
                    Sums::from_stats(s.value())
                } else {
                    tensors[sl.tensor]
                }
            })
            .collect();
        let groups = self
            .groups
            .iter()
            .map(|g| {
                let mut acc = Sums::default();
                for &(s, w) in &g.terms {
                    acc.add_scaled(slices[s], w);
                }
                acc
            })
            .collect();
        let mut layers: Vec<LayerSums> = Vec::new();
        let mut overall = Sums::default();
        let mut n_params = 0u64;
        for (t, s) in self.tensors.iter().zip(&tensors) {
            overall.add_scaled(*s, 1.0);
            n_params += t.numel();
            match layers.iter_mut().find(|l| l.layer == t.layer) {
                Some(l) => {
                    l.sums.add_scaled(*s, 1.0);
                    l.numel += t.numel();
                }
                None => layers.push(LayerSums {
                    layer: t.layer,
                    numel: t.numel(),
                    sums: *s,
                }),
            }
        }
        layers.sort_by_key(|l| l.layer);
        Ok(InterferenceReport {
            tensors,
            slices,
            groups,
            layers,
            overall,
            n_params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Slow f64 oracle: the sums of one index set, element by element.
    fn oracle(a: &[f64], b: &[f64], idx: impl Iterator<Item = usize>) -> Sums {
        let mut s = Sums::default();
        for i in idx {
            s.dot += a[i] * b[i];
            s.sq_norm_a += a[i] * a[i];
            s.sq_norm_b += b[i] * b[i];
        }
        s
    }

    fn close(x: f64, y: f64, scale: f64) -> bool {
        (x - y).abs() <= 1e-12 * scale.max(1e-300)
    }

    fn assert_sums_close(got: Sums, want: Sums, a2: f64, b2: f64) {
        let d = (a2 * b2).sqrt();
        assert!(
            close(got.dot, want.dot, d),
            "dot {} vs {}",
            got.dot,
            want.dot
        );
        assert!(
            close(got.sq_norm_a, want.sq_norm_a, a2),
            "{got:?} vs {want:?}"
        );
        assert!(
            close(got.sq_norm_b, want.sq_norm_b, b2),
            "{got:?} vs {want:?}"
        );
    }

    /// A GQA layer as gradient.py plans it: q [h·d, m], k and v [hk·d, m], o [m, h·d], q bias.
    struct Gqa {
        acc: StreamingGradientInterference,
        heads: Vec<usize>,
        q: usize,
        k: usize,
        v: usize,
        o: usize,
        qb: usize,
    }

    fn gqa(h: usize, hk: usize, d: usize, m: usize) -> Gqa {
        let mut acc = StreamingGradientInterference::new();
        let q = acc.add_tensor("q", h * d, m, 0).unwrap();
        let k = acc.add_tensor("k", hk * d, m, 0).unwrap();
        let v = acc.add_tensor("v", hk * d, m, 0).unwrap();
        let o = acc.add_tensor("o", m, h * d, 0).unwrap();
        let qb = acc.add_tensor("qb", h * d, 1, 0).unwrap();
        let g = (h / hk) as f64;
        let mut heads = Vec::new();
        for hh in 0..h {
            let j = hh * hk / h;
            let sq = acc.add_slice(q, Axis::Rows, hh * d, (hh + 1) * d).unwrap();
            let sb = acc.add_slice(qb, Axis::Rows, hh * d, (hh + 1) * d).unwrap();
            let sk = acc.add_slice(k, Axis::Rows, j * d, (j + 1) * d).unwrap();
            let sv = acc.add_slice(v, Axis::Rows, j * d, (j + 1) * d).unwrap();
            let so = acc.add_slice(o, Axis::Cols, hh * d, (hh + 1) * d).unwrap();
            let terms = [
                (sq, 1.0),
                (sb, 1.0),
                (so, 1.0),
                (sk, 1.0 / g),
                (sv, 1.0 / g),
            ];
            heads.push(acc.add_group(format!("head{hh}"), &terms).unwrap());
        }
        Gqa {
            acc,
            heads,
            q,
            k,
            v,
            o,
            qb,
        }
    }

    fn feed(acc: &mut StreamingGradientInterference, t: usize, a: &[f32], b: &[f32], chunk: usize) {
        let mut off = 0;
        while off < a.len() {
            let hi = (off + chunk.max(1)).min(a.len());
            acc.update(
                t,
                off,
                GradSlice::F32(&a[off..hi]),
                GradSlice::F32(&b[off..hi]),
            )
            .unwrap();
            off = hi;
        }
    }

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn gqa_heads_match_the_slow_oracle_and_conserve_the_total() {
        let (h, hk, d, m) = (4, 2, 3, 5);
        let mut p = gqa(h, hk, d, m);
        let shapes = [
            (p.q, h * d * m),
            (p.k, hk * d * m),
            (p.v, hk * d * m),
            (p.o, m * h * d),
            (p.qb, h * d),
        ];
        let mut data = Vec::new();
        for (i, &(t, n)) in shapes.iter().enumerate() {
            let (a, b) = (vals(n, 2 * i as u64), vals(n, 2 * i as u64 + 1));
            feed(&mut p.acc, t, &a, &b, 7);
            data.push((a, b));
        }
        let r = p.acc.finish().unwrap();
        let w = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let g = (h / hk) as f64;
        let mut head_total = Sums::default();
        for hh in 0..h {
            let j = hh / (h / hk);
            let mut want = Sums::default();
            let rows = |lo: usize, hi: usize, c: usize| lo * c..hi * c;
            let (qa, qb) = (w(&data[0].0), w(&data[0].1));
            want.add_scaled(oracle(&qa, &qb, rows(hh * d, (hh + 1) * d, m)), 1.0);
            let (ba, bb) = (w(&data[4].0), w(&data[4].1));
            want.add_scaled(oracle(&ba, &bb, rows(hh * d, (hh + 1) * d, 1)), 1.0);
            for kv in [1, 2] {
                let (ka, kb) = (w(&data[kv].0), w(&data[kv].1));
                want.add_scaled(oracle(&ka, &kb, rows(j * d, (j + 1) * d, m)), 1.0 / g);
            }
            let (oa, ob) = (w(&data[3].0), w(&data[3].1));
            let cols = (0..m).flat_map(|r| (r * h * d + hh * d)..(r * h * d + (hh + 1) * d));
            want.add_scaled(oracle(&oa, &ob, cols), 1.0);
            assert_sums_close(r.groups[p.heads[hh]], want, want.sq_norm_a, want.sq_norm_b);
            head_total.add_scaled(r.groups[p.heads[hh]], 1.0);
        }
        let all = r.overall;
        assert_sums_close(head_total, all, all.sq_norm_a, all.sq_norm_b);
        assert_eq!(r.layers.len(), 1);
        assert_eq!(r.layers[0].numel, r.n_params);
    }

    #[test]
    fn narrow_encodings_widen_exactly() {
        let n = 5000;
        // Finite values of both formats, both signs.
        let bits_a: Vec<u16> = (0..n)
            .map(|i| ((i * 7919) % 0x4000 + 0x2000 + (i % 2) * 0x8000) as u16)
            .collect();
        let bits_b: Vec<u16> = (0..n)
            .map(|i| ((i * 104_729) % 0x4000 + 0x2000 + (i % 3 / 2) * 0x8000) as u16)
            .collect();
        let widen = |bits: &[u16], d: Dtype| {
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let mut out = vec![0f32; bits.len()];
            decode_plain(d, &bytes, &mut out);
            out
        };
        for d in [Dtype::BF16, Dtype::F16] {
            fn mk(d: Dtype, x: &[u16]) -> GradSlice<'_> {
                if d == Dtype::BF16 {
                    GradSlice::Bf16(x)
                } else {
                    GradSlice::F16(x)
                }
            }
            let (fa, fb) = (widen(&bits_a, d), widen(&bits_b, d));
            let want = stats(GradSlice::F32(&fa), GradSlice::F32(&fb));
            let got = stats(mk(d, &bits_a), mk(d, &bits_b));
            let scale = want.sq_a.max(want.sq_b);
            assert!(close(got.dot, want.dot, scale) && close(got.sq_a, want.sq_a, scale));
            // Mixed: f64 on one side routes both through the f64 kernel.
            let f64a: Vec<f64> = fa.iter().map(|&x| x as f64).collect();
            let mixed = stats(GradSlice::F64(&f64a), mk(d, &bits_b));
            assert!(close(mixed.dot, want.dot, scale) && close(mixed.sq_b, want.sq_b, scale));
        }
    }

    #[test]
    fn bad_input_is_refused_with_the_tensor_name() {
        let mut acc = StreamingGradientInterference::new();
        let t = acc.add_tensor("w", 2, 3, 1).unwrap();
        let e = |r: Result<usize>| r.unwrap_err().to_string();
        assert!(e(acc.add_slice(t, Axis::Cols, 2, 4)).contains("\"w\""));
        assert!(e(acc.add_tensor("w", 1, 1, 0)).contains("twice"));
        let s = acc.add_whole(t).unwrap();
        assert!(e(acc.add_group("g", &[(s, -1.0)])).contains(">= 0"));
        assert!(e(acc.add_group("g", &[(s + 1, 1.0)])).contains("no slice"));
        let x = [1f32; 4];
        let err = acc
            .update(t, 3, GradSlice::F32(&x), GradSlice::F32(&x))
            .unwrap_err();
        assert!(err.to_string().contains("outside its 6"));
        let err = acc
            .update(t, 0, GradSlice::F32(&x), GradSlice::F32(&x[..3]))
            .unwrap_err();
        assert!(err.to_string().contains("g_A has 4 elements, g_B 3"));
        acc.update(t, 0, GradSlice::F32(&x), GradSlice::F32(&x))
            .unwrap();
        assert!(acc
            .finish()
            .unwrap_err()
            .to_string()
            .contains("fed 4 of its 6"));
        assert!(e(acc.add_whole(t)).contains("after the first update"));
        let other = StreamingGradientInterference::new();
        assert!(acc.merge(&other).is_err());
    }

    #[test]
    fn zero_gradient_gives_nan_and_identical_gives_one() {
        let mut acc = StreamingGradientInterference::new();
        let t = acc.add_tensor("w", 3, 4, 0).unwrap();
        let z = acc.add_tensor("z", 1, 2, 0).unwrap();
        let a = vals(12, 9);
        feed(&mut acc, t, &a, &a, 5);
        feed(&mut acc, z, &[0.0, 0.0], &[1.0, 2.0], 2);
        let r = acc.finish().unwrap();
        // √aa·√aa may differ from aa by an ulp either way; above 1 is clamped.
        assert!((r.tensors[t].cos() - 1.0).abs() < 1e-15);
        assert!(r.tensors[z].cos().is_nan());
    }

    /// A random plan: a tensor [rows, cols] with some row and column slices and one group.
    /// (rows, cols, slices as (is_rows, x, y), g_A, g_B, chunk length).
    type Case = (
        usize,
        usize,
        Vec<(bool, usize, usize)>,
        Vec<f32>,
        Vec<f32>,
        usize,
    );

    fn plan_and_data() -> impl Strategy<Value = Case> {
        (1usize..9, 1usize..9).prop_flat_map(|(r, c)| {
            let n = r * c;
            (
                Just(r),
                Just(c),
                prop::collection::vec((any::<bool>(), 0usize..9, 0usize..9), 0..5),
                prop::collection::vec(-1e3f32..1e3, n),
                prop::collection::vec(-1e3f32..1e3, n),
                1usize..20,
            )
        })
    }

    fn build(
        r: usize,
        c: usize,
        sl: &[(bool, usize, usize)],
    ) -> (StreamingGradientInterference, Vec<usize>) {
        let mut acc = StreamingGradientInterference::new();
        let t = acc.add_tensor("t", r, c, 2).unwrap();
        let mut ids = vec![acc.add_whole(t).unwrap()];
        for &(rows, x, y) in sl {
            let ext = if rows { r } else { c };
            let (lo, hi) = (x.min(y).min(ext), x.max(y).min(ext));
            let axis = if rows { Axis::Rows } else { Axis::Cols };
            ids.push(acc.add_slice(t, axis, lo, hi).unwrap());
        }
        let terms: Vec<(usize, f64)> = ids.iter().map(|&s| (s, 0.5)).collect();
        acc.add_group("g", &terms).unwrap();
        (acc, ids)
    }

    proptest! {
        #[test]
        fn prop_cos_bounded_symmetric_scale_invariant((r, c, sl, a, b, chunk) in plan_and_data(), k in 1e-3f32..1e3) {
            let (mut ab, _) = build(r, c, &sl);
            let mut ba = ab.clone();
            let mut scaled = ab.clone();
            feed(&mut ab, 0, &a, &b, chunk);
            feed(&mut ba, 0, &b, &a, chunk);
            let ka: Vec<f32> = a.iter().map(|&x| x * k).collect();
            feed(&mut scaled, 0, &ka, &b, chunk);
            let (rab, rba, rs) = (ab.finish().unwrap(), ba.finish().unwrap(), scaled.finish().unwrap());
            for (i, s) in rab.slices.iter().chain(&rab.groups).enumerate() {
                let cos = s.cos();
                prop_assert!(cos.is_nan() || (-1.0..=1.0).contains(&cos));
                let other = rba.slices.iter().chain(&rba.groups).nth(i).unwrap().cos();
                prop_assert!((cos.is_nan() && other.is_nan()) || cos == other, "symmetry {} {}", cos, other);
                let sc = rs.slices.iter().chain(&rs.groups).nth(i).unwrap().cos();
                // k·a rounds in f32, so scale invariance holds to f32 precision.
                prop_assert!((cos.is_nan() && sc.is_nan()) || (cos - sc).abs() < 1e-5, "scale {} {}", cos, sc);
            }
        }

        #[test]
        fn prop_merge_equals_one_pass_and_oracle((r, c, sl, a, b, chunk) in plan_and_data(), cut in 0usize..100) {
            let (mut one, ids) = build(r, c, &sl);
            let mut left = one.empty_copy();
            let mut right = one.empty_copy();
            feed(&mut one, 0, &a, &b, a.len());
            let cut = cut % (a.len() + 1);
            feed(&mut left, 0, &a[..cut], &b[..cut], chunk);
            if cut < a.len() {
                right.update(0, cut, GradSlice::F32(&a[cut..]), GradSlice::F32(&b[cut..])).unwrap();
            }
            prop_assert!(left.finish().is_err() || cut == a.len());
            left.merge(&right).unwrap();
            let (r1, r2) = (one.finish().unwrap(), left.finish().unwrap());
            let (wa, wb): (Vec<f64>, Vec<f64>) = (a.iter().map(|&x| x as f64).collect(), b.iter().map(|&x| x as f64).collect());
            let all = oracle(&wa, &wb, 0..a.len());
            let (sa, sb) = (all.sq_norm_a, all.sq_norm_b);
            for (k, &s) in ids.iter().enumerate() {
                assert_sums_close(r1.slices[s], r2.slices[s], sa, sb);
                let want = if k == 0 {
                    all
                } else {
                    let spec = one.slices()[s];
                    let idx: Vec<usize> = (0..a.len()).filter(|&i| {
                        let (row, col) = (i / c, i % c);
                        let x = if spec.axis == Axis::Rows { row } else { col };
                        spec.lo <= x && x < spec.hi
                    }).collect();
                    oracle(&wa, &wb, idx.into_iter())
                };
                assert_sums_close(r2.slices[s], want, sa, sb);
            }
            assert_sums_close(r1.groups[0], r2.groups[0], sa, sb);
            // The whole-tensor slice is the tensor total, the layer and the overall sums.
            prop_assert_eq!(r2.slices[ids[0]], r2.tensors[0]);
            prop_assert_eq!(r2.layers[0].sums, r2.overall);
            prop_assert_eq!(r2.layers[0].layer, 2);
        }

        #[test]
        fn prop_row_slices_tiling_a_tensor_sum_to_its_total((r, c, _sl, a, b, chunk) in plan_and_data(), cuts in prop::collection::vec(0usize..9, 0..4)) {
            let mut acc = StreamingGradientInterference::new();
            let t = acc.add_tensor("t", r, c, 0).unwrap();
            let mut edges: Vec<usize> = cuts.into_iter().map(|x| x.min(r)).chain([0, r]).collect();
            edges.sort_unstable();
            edges.dedup();
            let rows: Vec<usize> = edges.windows(2).map(|w| acc.add_slice(t, Axis::Rows, w[0], w[1]).unwrap()).collect();
            let cols: Vec<usize> = (0..c).map(|j| acc.add_slice(t, Axis::Cols, j, j + 1).unwrap()).collect();
            let gr = acc.add_group("rows", &rows.iter().map(|&s| (s, 1.0)).collect::<Vec<_>>()).unwrap();
            let gc = acc.add_group("cols", &cols.iter().map(|&s| (s, 1.0)).collect::<Vec<_>>()).unwrap();
            feed(&mut acc, t, &a, &b, chunk);
            let rep = acc.finish().unwrap();
            let tot = rep.tensors[t];
            assert_sums_close(rep.groups[gr], tot, tot.sq_norm_a, tot.sq_norm_b);
            assert_sums_close(rep.groups[gc], tot, tot.sq_norm_a, tot.sq_norm_b);
        }
    }
}
