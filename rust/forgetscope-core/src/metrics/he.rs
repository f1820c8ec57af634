//! `hyperspherical_energy`: how evenly the neurons of one weight matrix cover the unit sphere, and
//! the principal hyperspherical directions SPHERE protects (METRICS.md §3).
//!
//! **Formula** (Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018, eq. 1;
//! conventions of the reference code wy1iu/MHE). N neurons w_i ∈ R^d, ŵ_i = w_i/‖w_i‖,
//! d²_ij = ‖ŵ_i − ŵ_j‖² = 2 − 2·cos_ij, and
//!
//! ```text
//! E_s = mean over unordered pairs i<j of f_s(max(d²_ij, eps))
//! f_0 = log(1/‖·‖) = −½·ln d²      f_1 = (d²)^(−1/2)      f_2 = (d²)^(−1)
//! ```
//!
//! i.e. the paper's double sum over ordered pairs divided by N(N−1) ([`CONVENTION_FULL`]).
//! **Half-space** ([`HeOptions::half_space`], [`CONVENTION_HALF`]): the same mean over the 2N points
//! {ŵ_i} ∪ {−ŵ_i}, pairs (ŵ_i, −ŵ_i) included. It has a closed form over the i<j pairs: the
//! 2N(2N−1)/2 = N(2N−1) pairs are, for each i<j, (ŵ_i,ŵ_j) and (−ŵ_i,−ŵ_j) at d² = 2−2c, and
//! (ŵ_i,−ŵ_j) and (−ŵ_i,ŵ_j) at d² = 2+2c, plus N antipodal pairs at d² = 4, so
//!
//! ```text
//! E_s^half = ( 2·Σ_{i<j} [f_s(2−2c_ij) + f_s(2+2c_ij)] + N·f_s(4) ) / (N(2N−1))
//! ```
//!
//! (checked against the brute-force 2N-point computation in the tests). Also reported: the frame
//! potential ‖C‖_F² = (N + 2·Σ_{i<j} c²_ij)/N² with C = ŴᵀŴ/N (§3.4; the same for the half-space
//! cloud, whose C is identical), the number of near-duplicate pairs and the minimum d².
//!
//! **Which vectors are neurons** ([`NeuronAxis`]): rows for a torch `nn.Linear` weight [out, in]
//! (and transformers-v5 `gate_up_proj` [E, 2I, H] per expert); columns for transposed layouts
//! (Llama 4 / GPT-OSS experts [E, H, 2I], TF kernels). Neurons of norm 0 are excluded and counted
//! (`n_zero`); a non-finite value makes every metric NaN (`n_nonfinite`), never silently filtered.
//!
//! **Algorithm** (§3.2). Norms in f64. The Gram matrix is formed tile by tile, G_IJ = W_I W_Jᵀ, by
//! faer's f32 GEMM (only the strict lower triangle for I = J), and each Gram column is turned into
//! cos = clamp(G_ij·s_i·s_j, −1, 1) and d² = 2 − 2cos in f64, then accumulated in f64.
//! - *Direct path* (f32 rows, no subsample, norms in [2⁻⁴⁰, 2⁴⁰]): the GEMM reads the caller's
//!   matrix in place, s = 1/‖w‖ in f64. No copy.
//! - *Panel path* (columns, f64 input, subsampling, extreme norms): each tile's neurons are copied
//!   as w·2⁻ᵉ (a power of two, so exact for f32 input) into row-major f32 panels, s = 2ᵉ/‖w‖.
//!   (faer's GEMM straight on a transposed view runs at less than half the rate.)
//!
//! `2 − 2cos` cancels catastrophically for near-duplicates (an f32 Gram turns a true d² = 4e-9 into
//! 0) and the f32 Gram's ~1e-7 absolute error in cos is a relative error ~1e-7/(1 − cos) in d², so
//! every pair with cos > `near_dup_cos` (default 0.9), or whose Gram d² is below
//! 2·max(`eps`, `near_dup_d2`), is recomputed exactly as Σ_k (w_ik/‖w_i‖ − w_jk/‖w_j‖)² in f64
//! from contiguous f32 rows (the caller's rows or the panels); f64 input reads its own values. In half-space, pairs with cos < −threshold get ‖ŵ_i + ŵ_j‖² the same way. `n_near_dup`
//! and the clamp are therefore decided on exact distances, and `min_d2` is recomputed exactly for
//! the pair that attains it. Every other d² is within ~1e-6 relative, so the means agree with an
//! all-f64 computation to ~1e-6 or better (property-tested).
//!
//! **Determinism.** Tiles are jobs handed to a dedicated rayon pool; each tile runs a sequential
//! GEMM and fixed-order f64 reductions (8 lanes, no FMA, identical on the AVX2 and generic paths),
//! and per-tile sums are merged in tile order, so the result is bit-identical for every thread
//! count. The tile size depends on (N, d) only, never on threads. Different tile sizes agree to
//! ~1e-9 relative, not bitwise (faer's kernels round differently for different tile shapes).
//!
//! **Cost.** N²d/2 multiply-adds (N²d flops) in GEMM + N²/2 logarithms, divisions and square roots
//! (N(N−1) of each in half-space) in f64, + O(d) per recomputed pair. Extra memory per worker:
//! one B×B f32 tile and three B-long f64 row buffers (direct path, B = 1024: 4 MiB); on the panel
//! path also two B×d f32 panels, B shrinking so that a worker stays within 28 MiB (B = 800 at
//! d = 4096). Plus O(N) norms and indices. Measured at N = 14336, d = 4096 on 2 cores
//! (`examples/he_speed.rs`, best of 2 on a shared machine): rows 273 GFLOP/s (N²d counted) and
//! 13 MiB peak RSS growth including faer's packing buffers, i.e. 94% of faer's f32 GEMM for the
//! same Gram run as one single-threaded product per core (290) and 114% of faer's own threaded
//! GEMM (239); half-space 258 GFLOP/s; columns 216 GFLOP/s with 60 MiB.
//!
//! **Principal directions** ([`principal_directions`], METRICS §3.5, `project_B_into_soft_dirs` in
//! PlusLabNLP/SPHERE): eigen-decomposition of C = ÂᵀÂ/N (Â = unit neurons, zero neurons excluded,
//! so tr C = 1; SPHERE divides by ‖w‖ + 1e-8 instead, a relative difference below 1e-8 for real
//! weights). When N ≤ d it decomposes the N×N Gram ÂÂᵀ = QΛQᵀ (eig(C) = Λ/N, V = ÂᵀQΛ^{−1/2}),
//! else the d×d C; both accumulated in f64 (faer f64 GEMM, lower triangle) and decomposed in f64.
//! Cost O(N·d·min(N,d)) + O(min(N,d)³); peak memory ≈ 5·min(N,d)² f64 (faer's eigensolver
//! holds the input, the eigenvectors and its workspace) + 16 MiB panels + the f32 output.
//! Measured on 2 cores: 4096×14336 (Gram route) 20 s, 14336×4096 (covariance) 17 s, 628 MiB.

#![deny(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::simd::dispatch;

/// Convention string of the full-space energy (stored in output metadata).
pub const CONVENTION_FULL: &str = "mean over unordered pairs i<j of f_s(max(|w_i-w_j|^2, eps)) on \
unit-normalised neurons; f_0 = log(1/|w_i-w_j|), f_1 = |w_i-w_j|^-1, f_2 = |w_i-w_j|^-2; \
zero neurons excluded";

/// Convention string of the half-space energy (stored in output metadata).
pub const CONVENTION_HALF: &str = "half-space: mean over the N(2N-1) unordered pairs of the 2N \
points {w_i} U {-w_i} (antipodal pairs included) of f_s(max(|a-b|^2, eps)) on unit-normalised \
neurons; f_0 = log(1/|a-b|), f_1 = |a-b|^-1, f_2 = |a-b|^-2; zero neurons excluded";

/// Default clamp of d² before f_s. It bounds the contribution of one exact duplicate to
/// 1/eps = 1e4 (s = 2), 100 (s = 1) and 4.6 (s = 0), the scale of MHE's `‖w‖ = √(Σw² + 1e-4)`.
pub const DEFAULT_EPS: f64 = 1e-4;
/// Default cosine above which d² is recomputed exactly in f64. METRICS §3.2 suggests 1 − 1e-4,
/// but the f32 Gram carries an absolute error of order 1e-7 in cos (f32 accumulation), i.e. a
/// relative error of ~1e-7/(1 − cos) in d²: a pair just under 1 − 1e-4 is off by up to ~1e-3,
/// which alone breaks 1e-6 agreement of the mean for small N (found by the property test).
/// Above 0.9 every pair is exact and below it each d² is within ~1e-6 relative. The cost is O(d)
/// per recomputed pair: nil for typical weights, whose neuron cosines stay far below 0.9.
pub const DEFAULT_NEAR_DUP_COS: f64 = 0.9;
/// Default near-duplicate threshold on exact d²: the pairs the default `eps` clamps
/// (angle below 0.57°).
pub const DEFAULT_NEAR_DUP_D2: f64 = 1e-4;

/// Norm range within which the GEMM runs on the caller's f32 data without a normalised copy:
/// products of norms stay within 2^±80, far from f32 overflow and underflow.
const VIEW_NORM_MIN: f64 = 9.094947017729282e-13; // 2^-40
const VIEW_NORM_MAX: f64 = 1.099511627776e12; // 2^40
/// Tile edge on the direct (no-copy) path; tuned with `examples/he_speed.rs`.
const BLOCK_VIEW: usize = 1024;
/// Per-worker scratch budget on the panel path (tile + two panels): 2 workers stay under 64 MiB
/// with faer's packing buffers.
const WORKER_BUDGET: usize = 28 << 20;
/// Eigenvalues at or below this fraction of the largest one have no reliable direction.
const RANK_TOL: f64 = 1e-10;

/// Which vectors of a 2-D weight are the neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NeuronAxis {
    /// Rows: torch `nn.Linear` [out, in] — a neuron is the weights feeding one output unit.
    #[default]
    Rows,
    /// Columns: transposed layouts (Llama 4 / GPT-OSS fused experts [H, 2I], TF kernels [in, out]).
    Cols,
}

/// Options of [`hyperspherical_energy`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeOptions {
    /// Which vectors are neurons (default rows).
    pub axis: NeuronAxis,
    /// Half-space energy over {ŵ_i} ∪ {−ŵ_i} (default false).
    pub half_space: bool,
    /// d² is clamped to at least `eps` before f_s (default [`DEFAULT_EPS`] = 1e-4; 0 = no clamp, an
    /// exact duplicate then gives infinite energy). Must be finite and ≥ 0.
    pub eps: f64,
    /// Pairs with Gram cosine above this (or, in half-space, below its negative) get d² recomputed
    /// exactly in f64 (default [`DEFAULT_NEAR_DUP_COS`] = 0.9). In [−1, 1]. Pairs whose Gram d² is
    /// below 2·max(`eps`, `near_dup_d2`) are always recomputed, so the clamp and `n_near_dup` are
    /// decided on exact distances whatever this is.
    pub near_dup_cos: f64,
    /// `n_near_dup` counts pairs with exact d² below this (default [`DEFAULT_NEAR_DUP_D2`] = 1e-4,
    /// the pairs the default clamp touches). Finite and ≥ 0.
    pub near_dup_d2: f64,
    /// Above this many usable neurons, use a seeded uniform sample of this many, without
    /// replacement (for embeddings). At least 2. Default None (all).
    pub max_neurons: Option<usize>,
    /// Seed of the subsample (default 0).
    pub seed: u64,
    /// Worker threads; 0 = one per available core (default 0). Results do not depend on it.
    pub threads: usize,
    /// Tile edge B; 0 = automatic (default; depends on N and d only). For tests and tuning.
    pub block_size: usize,
}

impl Default for HeOptions {
    fn default() -> Self {
        HeOptions {
            axis: NeuronAxis::Rows,
            half_space: false,
            eps: DEFAULT_EPS,
            near_dup_cos: DEFAULT_NEAR_DUP_COS,
            near_dup_d2: DEFAULT_NEAR_DUP_D2,
            max_neurons: None,
            seed: 0,
            threads: 0,
            block_size: 0,
        }
    }
}

/// Hyperspherical energy of one weight matrix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeResult {
    /// Neurons used (after excluding zero neurons and subsampling).
    pub n_neurons: usize,
    /// Neurons in the matrix (rows or columns).
    pub n_total: usize,
    /// Neurons of norm 0 (excluded).
    pub n_zero: usize,
    /// Neurons with a NaN or ±Inf value; when > 0 every metric is NaN.
    pub n_nonfinite: usize,
    /// Whether `n_neurons` is a seeded subsample of the usable neurons.
    pub subsampled: bool,
    /// Dimension d of a neuron.
    pub dim: usize,
    /// Mean energy for s = 0 (log energy, f_0 = log(1/z)), s = 1 and s = 2.
    pub energy: [f64; 3],
    /// Pairs with exact d² < `near_dup_d2` (in half-space, among the 2N points).
    pub n_near_dup: u64,
    /// Minimum d² over the pairs used, before the `eps` clamp, recomputed exactly in f64 for the
    /// pair that attains it (in half-space, over the 2N points: at most 4).
    pub min_d2: f64,
    /// ‖C‖_F² with C = ŴᵀŴ/N, in [1/min(N,d), 1]; minimal for tight frames.
    pub frame_potential: f64,
    /// Whether this is the half-space energy.
    pub half_space: bool,
    /// [`CONVENTION_FULL`] or [`CONVENTION_HALF`].
    pub convention: &'static str,
    /// The clamp used.
    pub eps: f64,
    /// Tile edge used.
    pub block_size: usize,
    /// Bytes of scratch this call allocated (excluding faer's internal GEMM packing buffers).
    pub scratch_bytes: u64,
}

/// Hyperspherical energy of the neurons of `data`, a row-major `[rows, cols]` f32 matrix.
///
/// Errors ([`Error::Config`]): `data.len() != rows*cols`, fewer than 2 usable (non-zero) neurons,
/// out-of-range options, or a worker pool that cannot start. Never panics.
pub fn hyperspherical_energy(
    data: &[f32],
    rows: usize,
    cols: usize,
    opts: &HeOptions,
) -> Result<HeResult> {
    he_impl(data, rows, cols, opts)
}

/// [`hyperspherical_energy`] for f64 input. Norms and the exact near-duplicate distances use the
/// f64 values; the Gram runs on f64-normalised neurons rounded to f32, tile by tile (no full copy).
pub fn hyperspherical_energy_f64(
    data: &[f64],
    rows: usize,
    cols: usize,
    opts: &HeOptions,
) -> Result<HeResult> {
    he_impl(data, rows, cols, opts)
}

// ---------------------------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------------------------

trait Elem: Copy + Send + Sync + 'static {
    fn f64(self) -> f64;
    fn as_f32(data: &[Self]) -> Option<&[f32]>;
    /// `self · f` rounded to f32, for f a power of two (exact for f32 input).
    fn scale_pow2(self, f: f64) -> f32;
    /// `self` rounded to f32.
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn scale_pow2(self, f: f64) -> f32 {
        // Multiplying by a power of two rounds once either way; in f32 when 2^±e is normal.
        if (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&f) {
            self * f as f32
        } else {
            (self as f64 * f) as f32
        }
    }
    fn as_f32(data: &[f32]) -> Option<&[f32]> {
        Some(data)
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn scale_pow2(self, f: f64) -> f32 {
        (self * f) as f32
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
}

/// The neuron matrix as a view: element k of neuron i is `data[i*si + k*sk]`.
#[derive(Clone, Copy)]
struct Src<'a, T> {
    data: &'a [T],
    n: usize,
    d: usize,
    si: usize,
    sk: usize,
}

impl<'a, T: Elem> Src<'a, T> {
    fn new(data: &'a [T], rows: usize, cols: usize, axis: NeuronAxis) -> Self {
        match axis {
            NeuronAxis::Rows => Src {
                data,
                n: rows,
                d: cols,
                si: cols,
                sk: 1,
            },
            NeuronAxis::Cols => Src {
                data,
                n: cols,
                d: rows,
                si: 1,
                sk: cols,
            },
        }
    }

    /// Exact ‖ŵ_i ∓ ŵ_j‖² in f64 (`plus` selects ‖ŵ_i + ŵ_j‖²).
    fn exact_d2(&self, i: usize, j: usize, inv_i: f64, inv_j: f64, plus: bool) -> f64 {
        let sign = if plus { -1.0 } else { 1.0 };
        let (bi, bj) = (i * self.si, j * self.si);
        let mut acc = [0f64; 4];
        for k in 0..self.d {
            let a = self.data[bi + k * self.sk].f64() * inv_i;
            let b = self.data[bj + k * self.sk].f64() * inv_j;
            let t = a - sign * b;
            acc[k % 4] += t * t;
        }
        (acc[0] + acc[1]) + (acc[2] + acc[3])
    }

    /// ‖w_i‖ for every neuron, robust to f64 values whose squares over- or underflow (|x| above
    /// ~1e154 or below ~1e-154): those neurons are recomputed as m·‖w/m‖ with m = max|w_ik|, so a
    /// finite neuron never comes out infinite or zero. NaN/Inf entries give a non-finite norm.
    fn norms(&self, threads: usize) -> Vec<f64> {
        // Below this the plain sum of squares may have lost the neuron to underflow.
        const TINY: f64 = 1e-280;
        let mut out = self.norms_sq(threads);
        for (i, s) in out.iter_mut().enumerate() {
            *s = if s.is_finite() && *s >= TINY {
                s.sqrt()
            } else {
                let at = |k: usize| self.data[i * self.si + k * self.sk].f64();
                let m = (0..self.d).map(|k| at(k).abs()).fold(0.0f64, |a, b| {
                    if b > a || b.is_nan() {
                        b
                    } else {
                        a
                    }
                });
                if m == 0.0 || !m.is_finite() {
                    if m == 0.0 {
                        0.0
                    } else {
                        f64::NAN
                    }
                } else {
                    m * (0..self.d)
                        .map(|k| (at(k) / m) * (at(k) / m))
                        .sum::<f64>()
                        .sqrt()
                }
            };
        }
        out
    }

    /// Σ_k w_ik² in f64 for every neuron (fixed order per neuron, so thread-count independent).
    fn norms_sq(&self, threads: usize) -> Vec<f64> {
        let mut out = vec![0f64; self.n];
        if self.n == 0 || self.d == 0 {
            return out;
        }
        let per = self.n.div_ceil(threads.max(1) * 4).max(1);
        let work = |start: usize, chunk: &mut [f64]| {
            if self.sk == 1 {
                for (o, i) in chunk.iter_mut().zip(start..) {
                    let row = &self.data[i * self.si..i * self.si + self.d];
                    *o = sum_sq_lanes(row);
                }
            } else {
                // Columns: walk the rows of the stored matrix, accumulating per column.
                for k in 0..self.d {
                    let row = &self.data[k * self.sk + start..k * self.sk + start + chunk.len()];
                    for (o, &x) in chunk.iter_mut().zip(row) {
                        let x = x.f64();
                        *o += x * x;
                    }
                }
            }
        };
        if threads <= 1 {
            work(0, &mut out);
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(c, chunk)| work(c * per, chunk));
        }
        out
    }
}

fn sum_sq_lanes<T: Elem>(row: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = row.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let x = c[j].f64();
            acc[j] += x * x;
        }
    }
    for (j, &x) in it.remainder().iter().enumerate() {
        let x = x.f64();
        acc[j] += x * x;
    }
    combine(acc)
}

// ---------------------------------------------------------------------------------------------
// Vector kernels (f64, fixed lane order, no FMA: identical results on every CPU path)
// ---------------------------------------------------------------------------------------------

const LANES: usize = 8;

#[inline(always)]
fn combine(a: [f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// ln(x) for x ≥ 0 (−∞ at 0), branch-free so that it vectorises; fdlibm's `__ieee754_log`
/// reduction and minimax polynomial (error < 1 ulp). x must not be NaN, +∞ or negative.
#[inline(always)]
fn ln_pos(x: f64) -> f64 {
    const LN2_HI: f64 = 0.6931471803691238; // bits 0x3FE6_2E42_FEE0_0000
    const LN2_LO: f64 = 1.9082149292705877e-10; // bits 0x3DEA_39EF_3579_3C76
    const LG1: f64 = 0.6666666666666735; // bits 0x3FE5_5555_5555_5593
    const LG2: f64 = 0.3999999999940942; // bits 0x3FD9_9999_9997_FA04
    const LG3: f64 = 0.2857142874366239; // bits 0x3FD2_4924_9422_9359
    const LG4: f64 = 0.22222198432149784; // bits 0x3FCC_71C5_1D8E_78AF
    const LG5: f64 = 0.1818357216161805; // bits 0x3FC7_4664_96CB_03DE
    const LG6: f64 = 0.15313837699209373; // bits 0x3FC3_9A09_D078_C69F
    const LG7: f64 = 0.14798198605116586; // bits 0x3FC2_F112_DF3E_5244
    const TWO54: f64 = 18014398509481984.0;
    const SQRT_HALF_BITS: u64 = 0x3FE6_A09E_667F_3BCD;
    const MAGIC: f64 = 4503599627370496.0 + 2048.0; // 2^52 + 2048

    let small = x < f64::MIN_POSITIVE;
    let xs = if small { x * TWO54 } else { x };
    let ix = xs.to_bits();
    // x = 2^k · m with m ∈ [√½, √2): k is the top 12 bits of ix − bits(√½), two's complement.
    let tmp = ix.wrapping_sub(SQRT_HALF_BITS);
    let kbits = (tmp >> 52) ^ 0x800; // k + 2048 ∈ [0, 4096)
    let k = f64::from_bits(0x4330_0000_0000_0000 | kbits) - MAGIC;
    let k = k - if small { 54.0 } else { 0.0 };
    let m = f64::from_bits(ix.wrapping_sub(tmp & 0xFFF0_0000_0000_0000));
    let f = m - 1.0;
    let hfsq = 0.5 * f * f;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    let v = s * (hfsq + r) + k * LN2_LO - hfsq + f + k * LN2_HI;
    if x > 0.0 {
        v
    } else {
        f64::NEG_INFINITY
    }
}

/// (−½·ln x, x^−½, x^−1): the three energy terms of one squared distance x ≥ 0.
#[inline(always)]
fn terms(x: f64) -> (f64, f64, f64) {
    let r = 1.0 / x;
    (-0.5 * ln_pos(x), r.sqrt(), r)
}

#[inline(always)]
fn cos_full_body(g: &[f32], sp: f64, sq: &[f64], thr: f64, c: &mut [f64], xm: &mut [f64]) -> usize {
    let n = g.len();
    let (sq, c, xm) = (&sq[..n], &mut c[..n], &mut xm[..n]);
    let mut flags = 0usize;
    for k in 0..n {
        let v = (g[k] as f64) * sp * sq[k];
        let v = if v > 1.0 { 1.0 } else { v };
        let v = if v < -1.0 { -1.0 } else { v };
        c[k] = v;
        xm[k] = 2.0 - 2.0 * v;
        flags += (v > thr) as usize;
    }
    flags
}

dispatch! {
    /// cos = clamp(g·sp·sq) and d² = 2 − 2cos; returns #{cos > thr}.
    fn cos_full(g: &[f32], sp: f64, sq: &[f64], thr: f64, c: &mut [f64], xm: &mut [f64]) -> usize
        = cos_full_body;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cos_half_body(
    g: &[f32],
    sp: f64,
    sq: &[f64],
    thr: f64,
    c: &mut [f64],
    xm: &mut [f64],
    xp: &mut [f64],
) -> usize {
    let n = g.len();
    let (sq, c, xm, xp) = (&sq[..n], &mut c[..n], &mut xm[..n], &mut xp[..n]);
    let mut flags = 0usize;
    for k in 0..n {
        let v = (g[k] as f64) * sp * sq[k];
        let v = if v > 1.0 { 1.0 } else { v };
        let v = if v < -1.0 { -1.0 } else { v };
        c[k] = v;
        xm[k] = 2.0 - 2.0 * v;
        xp[k] = 2.0 + 2.0 * v;
        flags += (v > thr || v < -thr) as usize;
    }
    flags
}

dispatch! {
    /// As [`cos_full`], also d² = 2 + 2cos to the antipode; returns #{|cos| > thr}.
    fn cos_half(g: &[f32], sp: f64, sq: &[f64], thr: f64, c: &mut [f64], xm: &mut [f64], xp: &mut [f64]) -> usize
        = cos_half_body;
}

#[inline(always)]
fn energy_body(x: &[f64], eps: f64) -> ([f64; 3], f64) {
    let mut a0 = [0f64; LANES];
    let mut a1 = [0f64; LANES];
    let mut a2 = [0f64; LANES];
    let mut mn = [f64::INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        for j in 0..LANES {
            let v = ch[j];
            mn[j] = if v < mn[j] { v } else { mn[j] };
            let v = if v < eps { eps } else { v };
            let (t0, t1, t2) = terms(v);
            a0[j] += t0;
            a1[j] += t1;
            a2[j] += t2;
        }
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        mn[j] = if v < mn[j] { v } else { mn[j] };
        let v = if v < eps { eps } else { v };
        let (t0, t1, t2) = terms(v);
        a0[j] += t0;
        a1[j] += t1;
        a2[j] += t2;
    }
    let m = mn
        .iter()
        .fold(f64::INFINITY, |a, &b| if b < a { b } else { a });
    ([combine(a0), combine(a1), combine(a2)], m)
}

dispatch! {
    /// (Σ f_s(max(x, eps)) for s = 0, 1, 2; min x) in fixed lane order.
    fn energy_sums(x: &[f64], eps: f64) -> ([f64; 3], f64) = energy_body;
}

#[inline(always)]
fn sq_sum_body(c: &[f64]) -> f64 {
    let mut a = [0f64; LANES];
    let mut it = c.chunks_exact(LANES);
    for ch in &mut it {
        for j in 0..LANES {
            a[j] += ch[j] * ch[j];
        }
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        a[j] += v * v;
    }
    combine(a)
}

dispatch! {
    /// Σ c² in fixed lane order.
    fn sq_sum(c: &[f64]) -> f64 = sq_sum_body;
}

#[inline(always)]
fn diff_sq_body(a: &[f32], b: &[f32], sa: f64, sb: f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..LANES {
            let t = ca[j] as f64 * sa - cb[j] as f64 * sb;
            acc[j] += t * t;
        }
    }
    for (j, (&x, &y)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        let t = x as f64 * sa - y as f64 * sb;
        acc[j] += t * t;
    }
    combine(acc)
}

dispatch! {
    /// Σ (a_k·sa − b_k·sb)² in f64: the exact squared distance of two scaled f32 rows.
    fn diff_sq_scaled(a: &[f32], b: &[f32], sa: f64, sb: f64) -> f64 = diff_sq_body;
}

// ---------------------------------------------------------------------------------------------
// Blocked driver
// ---------------------------------------------------------------------------------------------

/// Sums of one tile.
#[derive(Debug, Clone, Copy)]
struct Partial {
    e: [f64; 3],
    fp: f64,
    near: u64,
    min: f64,
    min_p: usize,
    min_q: usize,
    min_plus: bool,
}

impl Partial {
    fn new() -> Self {
        Partial {
            e: [0.0; 3],
            fp: 0.0,
            near: 0,
            min: f64::INFINITY,
            min_p: usize::MAX,
            min_q: usize::MAX,
            min_plus: false,
        }
    }

    fn merge(&mut self, o: &Partial) {
        for s in 0..3 {
            self.e[s] += o.e[s];
        }
        self.fp += o.fp;
        self.near += o.near;
        if o.min < self.min {
            self.min = o.min;
            self.min_p = o.min_p;
            self.min_q = o.min_q;
            self.min_plus = o.min_plus;
        }
    }
}

/// Everything a worker needs, shared read-only.
struct Ctx<'a, T> {
    src: Src<'a, T>,
    /// 1/‖w‖ per original neuron (0 for zero neurons).
    inv: &'a [f64],
    /// Direct path: the N_total × d neuron matrix over the caller's f32 rows.
    view: Option<MatRef<'a, f32>>,
    /// The caller's data is f32: exact distances are then taken from contiguous f32 rows (the
    /// caller's rows, or the panels' exactly power-of-two-scaled copies).
    f32_exact: bool,
    /// Position → original neuron.
    orig: &'a [usize],
    /// Position is a usable neuron.
    valid: &'a [bool],
    /// Position → factor turning a Gram row into a unit vector: 1/‖w‖ on the direct path,
    /// 2^e/‖w‖ on the panel path (a panel row holds w·2^−e).
    scale: &'a [f64],
    /// Position → 2^−e (panel path only).
    pow2: &'a [f64],
    b: usize,
    n_pos: usize,
    half: bool,
    eps: f64,
    thr: f64,
    delta: f64,
}

struct Scratch {
    g: Vec<f32>,
    pi: Vec<f32>,
    pj: Vec<f32>,
    pi_block: usize,
    c: Vec<f64>,
    xm: Vec<f64>,
    xp: Vec<f64>,
}

impl Scratch {
    fn new<T>(ctx: &Ctx<'_, T>) -> Self {
        let b = ctx.b;
        let panel = if ctx.view.is_some() { 0 } else { b * ctx.src.d };
        Scratch {
            g: vec![0f32; b * b],
            pi: vec![0f32; panel],
            pj: vec![0f32; panel],
            pi_block: usize::MAX,
            c: vec![0f64; b],
            xm: vec![0f64; b],
            xp: vec![0f64; if ctx.half { b } else { 0 }],
        }
    }

    fn bytes(&self) -> u64 {
        let f32s = self.g.capacity() + self.pi.capacity() + self.pj.capacity();
        let f64s = self.c.capacity() + self.xm.capacity() + self.xp.capacity();
        (f32s * 4 + f64s * 8) as u64
    }
}

/// Where the exact distance of a flagged pair comes from.
enum Exact<'b> {
    /// f32 rows: the caller's (direct path) or the panels (f32 input). Element k of position p
    /// is `ri[(p − i0)·rs[0] + k·ks[0]]` (likewise for q in `rj` with index 1).
    Rows {
        ri: &'b [f32],
        rj: &'b [f32],
        i0: usize,
        j0: usize,
        rs: [usize; 2],
        ks: [usize; 2],
    },
    /// The caller's data through [`Src::exact_d2`] (f64 input).
    Source,
}

impl<'a, T: Elem> Ctx<'a, T> {
    /// Positions [p0, p0+len) as w·2^−e in f32, row-major `len × d`; exact for f32 input.
    fn fill_panel(&self, p0: usize, len: usize, out: &mut [f32]) {
        let (d, si, sk, data) = (self.src.d, self.src.si, self.src.sk, self.src.data);
        let out = &mut out[..len * d];
        if sk == 1 {
            for (r, row) in out.chunks_exact_mut(d).enumerate() {
                let (i, f) = (self.orig[p0 + r], self.pow2[p0 + r]);
                for (o, &x) in row.iter_mut().zip(&data[i * si..i * si + d]) {
                    *o = T::scale_pow2(x, f);
                }
            }
        } else {
            // Neurons are columns: transpose in 64-neuron × 16-element blocks (reads use whole
            // cache lines, writes stay within 64 pages). (A column-major panel would avoid the
            // transpose, but faer's GEMM on column-major operands with a power-of-two leading
            // dimension runs at half speed.)
            const RB: usize = 256;
            const KB: usize = 16;
            for r0 in (0..len).step_by(RB) {
                let r1 = (r0 + RB).min(len);
                let idx = &self.orig[p0 + r0..p0 + r1];
                let pw = &self.pow2[p0 + r0..p0 + r1];
                let block = &mut out[r0 * d..r1 * d];
                let normal = |f: &f64| (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(f);
                let contiguous =
                    idx[idx.len() - 1] - idx[0] == idx.len() - 1 && pw.iter().all(normal);
                let mut tmp = [[0f32; RB]; KB];
                for k0 in (0..d).step_by(KB) {
                    let k1 = (k0 + KB).min(d);
                    if contiguous {
                        // Contiguous reads into a KB×RB tile in L1, then whole-line row writes.
                        for (t, k) in tmp.iter_mut().zip(k0..k1) {
                            let src = &data[k * sk + idx[0]..k * sk + idx[0] + idx.len()];
                            for (o, &x) in t.iter_mut().zip(src) {
                                *o = T::to_f32(x);
                            }
                        }
                        for (r, &f) in pw.iter().enumerate() {
                            let row = &mut block[r * d + k0..r * d + k1];
                            let f = f as f32;
                            for (o, t) in row.iter_mut().zip(&tmp) {
                                *o = t[r] * f;
                            }
                        }
                    } else {
                        for (r, (&i, &f)) in idx.iter().zip(pw).enumerate() {
                            let row = &mut block[r * d + k0..r * d + k1];
                            for (o, k) in row.iter_mut().zip(k0..k1) {
                                *o = T::scale_pow2(data[k * sk + i], f);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The panel of `len` positions as a row-major `len × d` matrix, with its (position, element)
    /// strides.
    fn panel<'p>(&self, buf: &'p [f32], len: usize) -> (MatRef<'p, f32>, usize, usize) {
        let d = self.src.d;
        (MatRef::from_row_major_slice(&buf[..len * d], len, d), d, 1)
    }

    fn tile(&self, scr: &mut Scratch, bi_idx: usize, bj_idx: usize) -> Partial {
        let d = self.src.d;
        let (i0, j0) = (bi_idx * self.b, bj_idx * self.b);
        let bi = self.b.min(self.n_pos - i0);
        let bj = self.b.min(self.n_pos - j0);
        let diag = bi_idx == bj_idx;
        let Scratch {
            g,
            pi,
            pj,
            pi_block,
            c,
            xm,
            xp,
        } = scr;
        let (a_i, a_j, exact) = match self.view {
            Some(v) => {
                let exact = match T::as_f32(self.src.data) {
                    Some(f) => Exact::Rows {
                        ri: f,
                        rj: f,
                        i0: 0,
                        j0: 0,
                        rs: [d, d],
                        ks: [1, 1],
                    },
                    None => Exact::Source,
                };
                (v.subrows(i0, bi), v.subrows(j0, bj), exact)
            }
            None => {
                if *pi_block != bi_idx {
                    self.fill_panel(i0, bi, pi);
                    *pi_block = bi_idx;
                }
                if !diag {
                    self.fill_panel(j0, bj, pj);
                }
                let (a_i, rsi, ksi) = self.panel(pi, bi);
                let (a_j, rsj, ksj) = if diag {
                    (a_i, rsi, ksi)
                } else {
                    self.panel(pj, bj)
                };
                let exact = if self.f32_exact {
                    Exact::Rows {
                        ri: &pi[..bi * d],
                        rj: if diag { &pi[..bi * d] } else { &pj[..bj * d] },
                        i0,
                        j0: if diag { i0 } else { j0 },
                        rs: [rsi, rsj],
                        ks: [ksi, ksj],
                    }
                } else {
                    Exact::Source
                };
                (a_i, a_j, exact)
            }
        };
        // dst is column-major bj × bi: column a holds the Gram row of position i0+a vs j0..j0+bj.
        let dst = MatMut::from_column_major_slice_mut(&mut g[..bj * bi], bj, bi);
        if diag {
            triangular::matmul(
                dst,
                BlockStructure::StrictTriangularLower,
                Accum::Replace,
                a_j,
                BlockStructure::Rectangular,
                a_i.transpose(),
                BlockStructure::Rectangular,
                1.0f32,
                Par::Seq,
            );
        } else {
            matmul(dst, Accum::Replace, a_j, a_i.transpose(), 1.0f32, Par::Seq);
        }

        let mut part = Partial::new();
        for a in 0..bi {
            let p = i0 + a;
            if !self.valid[p] {
                continue;
            }
            let col = &g[a * bj..(a + 1) * bj];
            let mut k = if diag { a + 1 } else { 0 };
            while k < bj {
                if !self.valid[j0 + k] {
                    k += 1;
                    continue;
                }
                let mut e = k + 1;
                while e < bj && self.valid[j0 + e] {
                    e += 1;
                }
                let bufs = (&mut c[..], &mut xm[..], &mut xp[..]);
                self.segment(p, j0 + k, &col[k..e], bufs, &exact, &mut part);
                k = e;
            }
        }
        part
    }

    /// Exact ‖ŵ_p ∓ ŵ_q‖² of two positions.
    fn exact(&self, ex: &Exact<'_>, p: usize, q: usize, plus: bool) -> f64 {
        match ex {
            Exact::Rows {
                ri,
                rj,
                i0,
                j0,
                rs,
                ks,
            } => {
                let d = self.src.d;
                let (sa, sb) = (self.scale[p], self.scale[q]);
                let sb = if plus { -sb } else { sb };
                let (oa, ob) = ((p - i0) * rs[0], (q - j0) * rs[1]);
                if ks[0] == 1 && ks[1] == 1 {
                    diff_sq_scaled(&ri[oa..oa + d], &rj[ob..ob + d], sa, sb)
                } else {
                    let mut acc = [0f64; LANES];
                    for k in 0..d {
                        let t = ri[oa + k * ks[0]] as f64 * sa - rj[ob + k * ks[1]] as f64 * sb;
                        acc[k % LANES] += t * t;
                    }
                    combine(acc)
                }
            }
            Exact::Source => {
                let (i, j) = (self.orig[p], self.orig[q]);
                self.src.exact_d2(i, j, self.inv[i], self.inv[j], plus)
            }
        }
    }

    /// Pairs (p, q0..q0+len) from their Gram entries `gs`.
    fn segment(
        &self,
        p: usize,
        q0: usize,
        gs: &[f32],
        bufs: (&mut [f64], &mut [f64], &mut [f64]),
        ex: &Exact<'_>,
        part: &mut Partial,
    ) {
        let len = gs.len();
        let (c, xm, xp) = bufs;
        let (c, xm) = (&mut c[..len], &mut xm[..len]);
        let sq = &self.scale[q0..q0 + len];
        let sp = self.scale[p];
        let flags = if self.half {
            cos_half(gs, sp, sq, self.thr, c, xm, &mut xp[..len])
        } else {
            cos_full(gs, sp, sq, self.thr, c, xm)
        };
        if flags > 0 {
            // Near-duplicates (and, in half-space, near-antipodes): distance exactly in f64.
            let mult = if self.half { 2 } else { 1 };
            for k in 0..len {
                let v = c[k];
                let plus = if self.half {
                    if v > self.thr || v < -self.thr {
                        v < 0.0
                    } else {
                        continue;
                    }
                } else if v > self.thr {
                    false
                } else {
                    continue;
                };
                let x = self.exact(ex, p, q0 + k, plus);
                if plus {
                    xp[k] = x;
                    xm[k] = 4.0 - x;
                    c[k] = 0.5 * x - 1.0;
                } else {
                    xm[k] = x;
                    if self.half {
                        xp[k] = 4.0 - x;
                    }
                    c[k] = 1.0 - 0.5 * x;
                }
                part.near += mult * (x < self.delta) as u64;
            }
        }
        let (e, mn) = energy_sums(xm, self.eps);
        for (acc, v) in part.e.iter_mut().zip(e) {
            *acc += v;
        }
        if mn < part.min {
            if let Some(k) = xm.iter().position(|&v| v == mn) {
                part.min = mn;
                part.min_p = p;
                part.min_q = q0 + k;
                part.min_plus = false;
            }
        }
        if self.half {
            let xp = &xp[..len];
            let (e2, mn2) = energy_sums(xp, self.eps);
            for (acc, v) in part.e.iter_mut().zip(e2) {
                *acc += v;
            }
            if mn2 < part.min {
                if let Some(k) = xp.iter().position(|&v| v == mn2) {
                    part.min = mn2;
                    part.min_p = p;
                    part.min_q = q0 + k;
                    part.min_plus = true;
                }
            }
        }
        part.fp += sq_sum(c);
    }
}

fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    }
}

fn build_pool(threads: usize) -> Result<Option<rayon::ThreadPool>> {
    if threads <= 1 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("forgetscope-he-{i}"))
        .build()
        .map(Some)
        .map_err(|e| Error::Config {
            reason: format!("cannot start {threads} worker threads: {e}"),
        })
}

fn in_pool<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

fn check_shape(len: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(Error::Config {
            reason: format!("data has {len} elements but the shape [{rows}, {cols}] needs {n}"),
        }),
        None => Err(Error::Config {
            reason: format!("shape [{rows}, {cols}] overflows"),
        }),
    }
}

fn too_few(n_total: usize, n_zero: usize) -> Error {
    Error::Config {
        reason: format!(
            "hyperspherical energy needs at least 2 non-zero neurons; the matrix has {n_total} \
             neurons of which {n_zero} are zero"
        ),
    }
}

/// SplitMix64: a small, well-mixed, seedable generator (the subsample must not depend on any
/// external crate's stream).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, bound), bound ≥ 1 (Lemire's multiply-and-reject).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = (self.next() as u128) * (bound as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A uniform `m`-subset of `pool` (partial Fisher–Yates), in ascending order.
fn subsample(mut pool: Vec<usize>, m: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    let n = pool.len();
    for i in 0..m.min(n) {
        let j = i + rng.below((n - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(m);
    pool.sort_unstable();
    pool
}

fn validate(opts: &HeOptions) -> Result<()> {
    let bad = |reason: String| Err(Error::Config { reason });
    if !(opts.eps.is_finite() && opts.eps >= 0.0) {
        return bad(format!("eps must be finite and >= 0, got {}", opts.eps));
    }
    if !(opts.near_dup_d2.is_finite() && opts.near_dup_d2 >= 0.0) {
        return bad(format!(
            "near_dup_d2 must be finite and >= 0, got {}",
            opts.near_dup_d2
        ));
    }
    if !(-1.0..=1.0).contains(&opts.near_dup_cos) {
        return bad(format!(
            "near_dup_cos must be in [-1, 1], got {}",
            opts.near_dup_cos
        ));
    }
    if let Some(m) = opts.max_neurons {
        if m < 2 {
            return bad(format!("max_neurons must be at least 2, got {m}"));
        }
    }
    Ok(())
}

/// Tile edge: `requested` if non-zero, else the tuned default (direct path) or the largest
/// multiple of 16 up to 1024 whose tile and two panels fit [`WORKER_BUDGET`].
fn block_size(requested: usize, n_pos: usize, d: usize, view: bool) -> usize {
    let b = if requested > 0 {
        requested
    } else if view {
        BLOCK_VIEW
    } else {
        let mut b = 1024usize;
        while b > 16 && b * b * 4 + 2 * b * d * 4 > WORKER_BUDGET {
            b -= 16;
        }
        b
    };
    b.clamp(1, n_pos.max(1))
}

/// f_s(x) for one x (the scalar form of [`terms`]).
fn f_all(x: f64) -> [f64; 3] {
    let (a, b, c) = terms(x);
    [a, b, c]
}

fn he_impl<T: Elem>(data: &[T], rows: usize, cols: usize, opts: &HeOptions) -> Result<HeResult> {
    check_shape(data.len(), rows, cols)?;
    validate(opts)?;
    let threads = resolve_threads(opts.threads);
    let src = Src::new(data, rows, cols, opts.axis);
    let (n_total, d) = (src.n, src.d);
    let pool = build_pool(threads)?;
    let norms = in_pool(&pool, || src.norms(threads));
    let n_zero = norms.iter().filter(|&&x| x == 0.0).count();
    let n_nonfinite = norms.iter().filter(|x| !x.is_finite()).count();
    let convention = if opts.half_space {
        CONVENTION_HALF
    } else {
        CONVENTION_FULL
    };
    let mut result = HeResult {
        n_neurons: 0,
        n_total,
        n_zero,
        n_nonfinite,
        subsampled: false,
        dim: d,
        energy: [f64::NAN; 3],
        n_near_dup: 0,
        min_d2: f64::NAN,
        frame_potential: f64::NAN,
        half_space: opts.half_space,
        convention,
        eps: opts.eps,
        block_size: 0,
        scratch_bytes: (norms.len() * 8) as u64,
    };
    if n_nonfinite > 0 {
        result.n_neurons = n_total - n_zero - n_nonfinite;
        return Ok(result);
    }
    let usable: Vec<usize> = (0..n_total).filter(|&i| norms[i] > 0.0).collect();
    if usable.len() < 2 {
        return Err(too_few(n_total, n_zero));
    }
    let inv: Vec<f64> = norms
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    drop(norms);
    let (sel, subsampled) = match opts.max_neurons {
        Some(m) if usable.len() > m => (subsample(usable, m, opts.seed), true),
        _ => (usable, false),
    };
    let n = sel.len();

    // Direct path: GEMM on the caller's f32 rows, zero neurons skipped in place. Otherwise
    // (columns, f64 input, subsample, extreme norms): tiles of w·2^−e copied into f32 panels.
    let in_range = sel.iter().all(|&i| {
        let norm = 1.0 / inv[i];
        (VIEW_NORM_MIN..=VIEW_NORM_MAX).contains(&norm)
    });
    let f32_data = T::as_f32(data);
    // Columns go through panels too: faer's GEMM on the transposed view (huge strides) runs at
    // less than half the rate, while the strip-transposing copy costs a few percent.
    let view = match f32_data {
        Some(f) if !subsampled && in_range && opts.axis == NeuronAxis::Rows => {
            Some(MatRef::from_row_major_slice(f, rows, cols))
        }
        _ => None,
    };
    let (orig, valid, scale, pow2): (Vec<usize>, Vec<bool>, Vec<f64>, Vec<f64>) = if view.is_some()
    {
        let valid = inv.iter().map(|&v| v > 0.0).collect();
        ((0..n_total).collect(), valid, inv.clone(), Vec::new())
    } else {
        // 2^−e with 2^e ≥ ‖w‖ > 2^(e−2): the panel row has norm in (¼, 1].
        let pow2: Vec<f64> = sel
            .iter()
            .map(|&i| {
                let e = (1.0 / inv[i]).log2().ceil() as i32;
                2f64.powi(-e)
            })
            .collect();
        let scale = sel.iter().zip(&pow2).map(|(&i, &f)| inv[i] / f).collect();
        let len = sel.len();
        (sel, vec![true; len], scale, pow2)
    };
    let n_pos = orig.len();
    let b = block_size(opts.block_size, n_pos, d, view.is_some());
    let nb = n_pos.div_ceil(b);
    let jobs: Vec<(usize, usize)> = (0..nb).flat_map(|i| (i..nb).map(move |j| (i, j))).collect();

    let thr = opts.near_dup_cos.min(1.0 - opts.eps.max(opts.near_dup_d2));
    let ctx = Ctx {
        src,
        inv: &inv,
        view,
        f32_exact: f32_data.is_some(),
        orig: &orig,
        valid: &valid,
        scale: &scale,
        pow2: &pow2,
        b,
        n_pos,
        half: opts.half_space,
        eps: opts.eps,
        thr,
        delta: opts.near_dup_d2,
    };
    let next = AtomicUsize::new(0);
    let work = || {
        let mut scr: Option<Scratch> = None;
        let mut out: Vec<(usize, Partial)> = Vec::new();
        loop {
            let j = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(bi, bj)) = jobs.get(j) else {
                break;
            };
            let s = scr.get_or_insert_with(|| Scratch::new(&ctx));
            out.push((j, ctx.tile(s, bi, bj)));
        }
        (out, scr.map_or(0, |s| s.bytes()))
    };
    let lists: Vec<(Vec<(usize, Partial)>, u64)> = match &pool {
        Some(p) => p.broadcast(|_| work()),
        None => vec![work()],
    };
    let worker_bytes: u64 = lists.iter().map(|l| l.1).sum();
    let mut parts: Vec<(usize, Partial)> = lists.into_iter().flat_map(|l| l.0).collect();
    parts.sort_unstable_by_key(|&(j, _)| j);
    let mut tot = Partial::new();
    for (_, p) in &parts {
        tot.merge(p);
    }

    let nf = n as f64;
    let npairs = nf * (nf - 1.0) / 2.0;
    let energy = if opts.half_space {
        let f4 = f_all(opts.eps.max(4.0));
        let denom = nf * (2.0 * nf - 1.0);
        [0, 1, 2].map(|s| (2.0 * tot.e[s] + nf * f4[s]) / denom)
    } else {
        [0, 1, 2].map(|s| tot.e[s] / npairs)
    };
    let mut min_d2 = if tot.min_p < n_pos {
        let (i, j) = (orig[tot.min_p], orig[tot.min_q]);
        src.exact_d2(i, j, inv[i], inv[j], tot.min_plus)
    } else {
        f64::INFINITY
    };
    let mut near = tot.near;
    if opts.half_space {
        min_d2 = min_d2.min(4.0);
        if 4.0 < opts.near_dup_d2 {
            near += n as u64;
        }
    }
    result.n_neurons = n;
    result.subsampled = subsampled;
    result.energy = energy;
    result.n_near_dup = near;
    result.min_d2 = min_d2;
    result.frame_potential = (nf + 2.0 * tot.fp) / (nf * nf);
    result.block_size = b;
    result.scratch_bytes =
        (n_total * 8 + orig.len() * 8 + valid.len() + (scale.len() + pow2.len()) * 8) as u64
            + worker_bytes;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Principal hyperspherical directions (SPHERE)
// ---------------------------------------------------------------------------------------------

/// Which eigenproblem [`principal_directions_with`] solves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EigenRoute {
    /// Gram when N ≤ d, else covariance (default).
    #[default]
    Auto,
    /// The N×N Gram ÂÂᵀ, then V = ÂᵀQΛ^{−1/2}.
    Gram,
    /// The d×d C = ÂᵀÂ/N.
    Covariance,
}

/// Options of [`principal_directions_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalOptions {
    /// Which vectors are neurons.
    pub axis: NeuronAxis,
    /// SPHERE's cumulative-ratio threshold β (its default 0.5). Finite.
    pub beta: f64,
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    /// Which eigenproblem to solve (default [`EigenRoute::Auto`]).
    pub route: EigenRoute,
}

impl Default for PrincipalOptions {
    fn default() -> Self {
        PrincipalOptions {
            axis: NeuronAxis::Rows,
            beta: 0.5,
            threads: 0,
            route: EigenRoute::Auto,
        }
    }
}

/// Principal hyperspherical directions of one weight matrix (SPHERE's U).
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalDirections {
    /// Eigenvalues of C = ÂᵀÂ/N, descending, min(N, d) of them (the rest are 0); negative
    /// round-off is clipped to 0. They sum to tr C = 1.
    pub eigenvalues: Vec<f64>,
    /// r = #{i : cumsum(λ)_i/Σλ ≤ β} + 1, capped at the numerical rank (#{λ > 1e-10·λ_max}), so
    /// 1 ≤ r ≤ min(N, d); for β < 1 the cap never binds in exact arithmetic.
    pub rank: usize,
    /// U as a row-major `[dim, rank]` f32 matrix with orthonormal columns, column t the eigenvector
    /// of the t-th largest eigenvalue, signed so that its largest-magnitude entry is positive.
    pub directions: Vec<f32>,
    /// d, the dimension of a neuron.
    pub dim: usize,
    /// Neurons used (the non-zero ones).
    pub n_neurons: usize,
    /// Neurons of norm 0 (excluded).
    pub n_zero: usize,
    /// The eigenproblem solved ([`EigenRoute::Gram`] or [`EigenRoute::Covariance`]).
    pub route: EigenRoute,
}

/// SPHERE's principal hyperspherical directions of the neurons of `data` (row-major
/// `[rows, cols]`): the top-r eigenvectors of C = ÂᵀÂ/N with r chosen by β. SPHERE then projects an
/// update B as B(I − αUUᵀ).
///
/// Errors ([`Error::Config`]): bad shape, fewer than 2 non-zero neurons, a non-finite value, a
/// non-finite β, or an eigensolver that does not converge.
pub fn principal_directions(
    data: &[f32],
    rows: usize,
    cols: usize,
    axis: NeuronAxis,
    beta: f64,
    threads: usize,
) -> Result<PrincipalDirections> {
    principal_directions_with(
        data,
        rows,
        cols,
        &PrincipalOptions {
            axis,
            beta,
            threads,
            route: EigenRoute::Auto,
        },
    )
}

/// [`principal_directions`] with every option, including the eigenproblem route.
pub fn principal_directions_with(
    data: &[f32],
    rows: usize,
    cols: usize,
    opts: &PrincipalOptions,
) -> Result<PrincipalDirections> {
    principal_impl(data, rows, cols, opts)
}

/// [`principal_directions_with`] for f64 input: neurons are normalised in f64 (robust to any finite
/// magnitude) before anything is rounded to f32.
pub fn principal_directions_f64(
    data: &[f64],
    rows: usize,
    cols: usize,
    opts: &PrincipalOptions,
) -> Result<PrincipalDirections> {
    principal_impl(data, rows, cols, opts)
}

fn principal_impl<T: Elem>(
    data: &[T],
    rows: usize,
    cols: usize,
    opts: &PrincipalOptions,
) -> Result<PrincipalDirections> {
    check_shape(data.len(), rows, cols)?;
    if !opts.beta.is_finite() {
        return Err(Error::Config {
            reason: format!("beta must be finite, got {}", opts.beta),
        });
    }
    let threads = resolve_threads(opts.threads);
    let src = Src::new(data, rows, cols, opts.axis);
    let d = src.d;
    let pool = build_pool(threads)?;
    let norms = in_pool(&pool, || src.norms(threads));
    if let Some(i) = norms.iter().position(|x| !x.is_finite()) {
        return Err(Error::Config {
            reason: format!(
                "principal directions need finite weights; neuron {i} has a NaN or infinite value"
            ),
        });
    }
    let n_zero = norms.iter().filter(|&&x| x == 0.0).count();
    let sel: Vec<usize> = (0..src.n).filter(|&i| norms[i] > 0.0).collect();
    if sel.len() < 2 {
        return Err(too_few(src.n, n_zero));
    }
    let inv: Vec<f64> = norms
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    let n = sel.len();
    let route = match opts.route {
        EigenRoute::Auto if n <= d => EigenRoute::Gram,
        EigenRoute::Auto => EigenRoute::Covariance,
        r => r,
    };
    let par = if threads <= 1 {
        Par::Seq
    } else {
        Par::rayon(threads)
    };
    in_pool(&pool, || {
        pd_solve(&src, &sel, &inv, route, opts.beta, par).map(|(eigenvalues, rank, directions)| {
            PrincipalDirections {
                eigenvalues,
                rank,
                directions,
                dim: d,
                n_neurons: n,
                n_zero,
                route,
            }
        })
    })
}

/// Chunk length so that a `rows × chunk` f64 panel stays near 16 MiB.
fn panel_chunk(rows: usize, total: usize) -> usize {
    ((16usize << 20) / (8 * rows.max(1)))
        .max(16)
        .min(total.max(1))
}

/// Â[:, k0..k0+kc] (Gram route) as a column-major n × kc f64 matrix.
fn fill_cols<T: Elem>(src: &Src<'_, T>, sel: &[usize], inv: &[f64], k0: usize, p: MatMut<'_, f64>) {
    let mut p = p;
    for (r, &i) in sel.iter().enumerate() {
        let base = i * src.si;
        for k in 0..p.ncols() {
            p[(r, k)] = src.data[base + (k0 + k) * src.sk].f64() * inv[i];
        }
    }
}

type PdOut = (Vec<f64>, usize, Vec<f32>);

fn pd_solve<T: Elem>(
    src: &Src<'_, T>,
    sel: &[usize],
    inv: &[f64],
    route: EigenRoute,
    beta: f64,
    par: Par,
) -> Result<PdOut> {
    let (n, d) = (sel.len(), src.d);
    let gram = route == EigenRoute::Gram;
    let m = if gram { n } else { d };
    // Z = ÂÂᵀ (Gram) or ÂᵀÂ (covariance), lower triangle, accumulated panel by panel in f64.
    let mut z = Mat::<f64>::zeros(m, m);
    if gram {
        let kc = panel_chunk(n, d);
        let mut p = Mat::<f64>::zeros(n, kc);
        let mut k0 = 0;
        while k0 < d {
            let len = kc.min(d - k0);
            fill_cols(src, sel, inv, k0, p.as_mut().subcols_mut(0, len));
            let pv = p.as_ref().subcols(0, len);
            triangular::matmul(
                z.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                pv,
                BlockStructure::Rectangular,
                pv.transpose(),
                BlockStructure::Rectangular,
                1.0f64,
                par,
            );
            k0 += len;
        }
    } else {
        let rb = panel_chunk(d, n);
        // Panel stored transposed (d × rb, column-major): column r is neuron r.
        let mut p = Mat::<f64>::zeros(d, rb);
        let mut r0 = 0;
        while r0 < n {
            let len = rb.min(n - r0);
            for (r, &i) in sel[r0..r0 + len].iter().enumerate() {
                let base = i * src.si;
                for k in 0..d {
                    p[(k, r)] = src.data[base + k * src.sk].f64() * inv[i];
                }
            }
            let pv = p.as_ref().subcols(0, len);
            triangular::matmul(
                z.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                pv,
                BlockStructure::Rectangular,
                pv.transpose(),
                BlockStructure::Rectangular,
                1.0f64,
                par,
            );
            r0 += len;
        }
    }
    for j in 0..m {
        for i in 0..j {
            z[(i, j)] = z[(j, i)];
        }
    }

    let params = Default::default();
    let mut s = Diag::<f64>::zeros(m);
    let mut u = Mat::<f64>::zeros(m, m);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        m,
        ComputeEigenvectors::Yes,
        par,
        params,
    ));
    self_adjoint_evd(
        z.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        par,
        MemStack::new(&mut mem),
        params,
    )
    .map_err(|e| Error::Config {
        reason: format!("eigendecomposition of a {m}x{m} matrix failed: {e:?}"),
    })?;
    drop(z);
    drop(mem);
    let nf = n as f64;
    let sv = s.as_ref().column_vector();
    // Descending eigenvalues of C (Z/N for both routes), negative round-off clipped.
    let raw: Vec<f64> = (0..m).rev().map(|t| sv[t].max(0.0)).collect();
    let mut eigenvalues: Vec<f64> = raw.iter().map(|&l| l / nf).collect();
    let kept = m.min(n).min(d);
    eigenvalues.truncate(kept);
    let total: f64 = eigenvalues.iter().sum();
    let lmax = eigenvalues.first().copied().unwrap_or(0.0);
    let num_rank = eigenvalues
        .iter()
        .filter(|&&l| l > RANK_TOL * lmax)
        .count()
        .max(1);
    let mut cum = 0.0;
    let mut count = 0usize;
    for &l in &eigenvalues {
        cum += l;
        if cum / total <= beta {
            count += 1;
        }
    }
    let r = (count + 1).min(num_rank);

    // Top-r eigenvectors of C into a row-major d × r f32 matrix (column t ↔ t-th largest
    // eigenvalue), then each column signed so that its largest-magnitude entry is positive.
    let mut directions = vec![0f32; d * r];
    let mut best = vec![(0.0f64, false); r]; // (max |v_kt|, negative) in k order
    let mut put = |k: usize, t: usize, x: f64| {
        if x.abs() > best[t].0 {
            best[t] = (x.abs(), x < 0.0);
        }
        directions[k * r + t] = x as f32;
    };
    if gram {
        // V = Âᵀ Q_r Λ_r^{−1/2}, a panel of rows of V at a time (never all of V in f64).
        let mut q = Mat::<f64>::zeros(n, r);
        for t in 0..r {
            let col = m - 1 - t;
            let scale = 1.0 / raw[t].sqrt();
            for i in 0..n {
                q[(i, t)] = u[(i, col)] * scale;
            }
        }
        drop(u);
        let kc = panel_chunk(n.max(r), d);
        let mut p = Mat::<f64>::zeros(n, kc);
        let mut vc = Mat::<f64>::zeros(kc, r);
        let mut k0 = 0;
        while k0 < d {
            let len = kc.min(d - k0);
            fill_cols(src, sel, inv, k0, p.as_mut().subcols_mut(0, len));
            matmul(
                vc.as_mut().subrows_mut(0, len),
                Accum::Replace,
                p.as_ref().subcols(0, len).transpose(),
                q.as_ref(),
                1.0f64,
                par,
            );
            for k in 0..len {
                for t in 0..r {
                    put(k0 + k, t, vc[(k, t)]);
                }
            }
            k0 += len;
        }
    } else {
        for k in 0..d {
            for t in 0..r {
                put(k, t, u[(k, m - 1 - t)]);
            }
        }
    }
    for row in directions.chunks_exact_mut(r) {
        for (x, &(_, neg)) in row.iter_mut().zip(&best) {
            if neg {
                *x = -*x;
            }
        }
    }
    Ok((eigenvalues, r, directions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_pos_matches_std() {
        let mut x = 1e-300f64;
        let mut worst = 0.0f64;
        while x < 1e300 {
            for y in [
                x,
                x * 1.2345,
                x * std::f64::consts::SQRT_2,
                x * std::f64::consts::FRAC_1_SQRT_2,
                x * 1.9999,
            ] {
                let (a, b) = (ln_pos(y), y.ln());
                let err = if b == 0.0 {
                    a.abs()
                } else {
                    ((a - b) / b).abs()
                };
                worst = worst.max(err);
            }
            x *= 1.7;
        }
        assert!(worst < 4e-16, "worst relative error {worst}");
        // The range that matters: (0, 4], near 1 and at the clamp.
        for i in 1..=40_000 {
            let y = i as f64 * 1e-4;
            let (a, b) = (ln_pos(y), y.ln());
            assert!(
                (a - b).abs() <= 2.5e-16 * b.abs().max(1e-300) + 1e-300,
                "{y}"
            );
        }
        assert_eq!(ln_pos(1.0), 0.0);
        assert_eq!(ln_pos(0.0), f64::NEG_INFINITY);
        for y in [5e-324, 1e-310, 2.2e-308] {
            assert!(((ln_pos(y) - y.ln()) / y.ln()).abs() < 4e-16, "{y}");
        }
    }

    #[test]
    fn dispatched_kernels_match_generic_bitwise() {
        let g: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919 % 2003) as f32 / 1001.0) - 1.0)
            .collect();
        let sq: Vec<f64> = (0..1003).map(|i| 0.9 + (i % 13) as f64 * 0.017).collect();
        let (mut c1, mut c2) = (vec![0.0; 1003], vec![0.0; 1003]);
        let (mut m1, mut m2, mut p1, mut p2) = (c1.clone(), c1.clone(), c1.clone(), c1.clone());
        let f1 = cos_half(&g, 0.97, &sq, 0.5, &mut c1, &mut m1, &mut p1);
        let f2 = cos_half_body(&g, 0.97, &sq, 0.5, &mut c2, &mut m2, &mut p2);
        assert_eq!((f1, &c1, &m1, &p1), (f2, &c2, &m2, &p2));
        assert_eq!(
            cos_full(&g, 0.97, &sq, 0.5, &mut c1, &mut m1),
            f1 - (0..1003).filter(|&k| c2[k] < -0.5).count()
        );
        for eps in [0.0, 1e-4] {
            let (e1, n1) = energy_sums(&m1, eps);
            let (e2, n2) = energy_body(&m1, eps);
            assert_eq!(
                (e1.map(f64::to_bits), n1.to_bits()),
                (e2.map(f64::to_bits), n2.to_bits())
            );
        }
        assert_eq!(sq_sum(&c1).to_bits(), sq_sum_body(&c1).to_bits());
        let h: Vec<f32> = g.iter().rev().copied().collect();
        assert_eq!(
            diff_sq_scaled(&g, &h, 0.3, -1.7).to_bits(),
            diff_sq_body(&g, &h, 0.3, -1.7).to_bits()
        );
    }

    #[test]
    fn terms_at_zero_are_infinite() {
        let (a, b, c) = terms(0.0);
        assert_eq!((a, b, c), (f64::INFINITY, f64::INFINITY, f64::INFINITY));
    }

    #[test]
    fn subsample_is_uniform_subset() {
        let s = subsample((0..100).collect(), 10, 7);
        assert_eq!(s.len(), 10);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, subsample((0..100).collect(), 10, 7));
        assert_ne!(s, subsample((0..100).collect(), 10, 8));
        // Every element is picked about equally often.
        let mut hits = [0u32; 20];
        for seed in 0..20_000 {
            for i in subsample((0..20).collect(), 5, seed) {
                hits[i] += 1;
            }
        }
        for h in hits {
            assert!((4700..=5300).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn block_size_fits_budget() {
        assert_eq!(block_size(0, 14336, 4096, true), BLOCK_VIEW);
        let b = block_size(0, 14336, 4096, false);
        assert!(
            b * b * 4 + 2 * b * 4096 * 4 <= WORKER_BUDGET && b >= 512,
            "{b}"
        );
        assert_eq!(block_size(0, 10, 4096, false), 10);
        assert_eq!(block_size(3, 10, 4, true), 3);
    }
}
