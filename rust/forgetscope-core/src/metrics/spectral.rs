//! Spectral summaries of one dense matrix (`spectral_drift`, stable rank, participation ratio, both
//! effective ranks) and principal angles between top-k singular subspaces (METRICS.md §1.1, §1.2
//! "Spectral quantities", §1.3).
//!
//! **Formulas** (σ₁ ≥ σ₂ ≥ … the singular values of an m×n matrix A, ‖A‖_F² = Σσᵢ² = `fro2`):
//!
//! ```text
//! spectral norm     σ₁ = ‖A‖₂                         (spectral drift when A = Δ = W_t − W₀)
//! stable rank       sr   = ‖A‖_F² / σ₁²
//! participation     PR   = (Σσᵢ²)² / Σσᵢ⁴ = ‖A‖_F⁴ / ‖AᵀA‖_F²
//! effective rank    erank  = exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ/Σσⱼ     (Roy & Vetterli 2007; 0·ln0 = 0)
//! energy eff. rank  erank₂ = exp(−Σ qᵢ ln qᵢ), qᵢ = σᵢ²/Σσⱼ²
//! ```
//!
//! with 1 ≤ sr ≤ PR ≤ erank₂ ≤ erank ≤ rank (METRICS §1.1, property-tested). sr and PR use the
//! caller's `fro2` (accumulated in f64 by the streaming pass); erank and erank₂ use the computed
//! spectrum. A zero matrix (or m·n = 0, treated as the zero matrix) gives σ₁ = 0 and NaN for every
//! ratio (METRICS: Δ = 0 → NaN). A NaN or ±Inf anywhere gives NaN everywhere. No input panics.
//!
//! **Two modes**, chosen by `min(m, n) ≤ exact_max_dim` (default 512):
//!
//! * *Exact.* The matrix is copied to f64, oriented tall (M×N, M ≥ N; Aᵀ when m < n, which is A's
//!   own memory order), factorised in place by faer's Householder QR and the N×N factor R by faer's
//!   SVD (all f64). This is backward stable: every σᵢ is within ~N·ε₆₄·σ₁ of the exact singular
//!   value of the (f32-valued) input, so σᵢ down to ~1e-13·σ₁ keep several digits. (The Gram route
//!   eigvalsh(AᵀA) would lose every σᵢ < ~1e-8·σ₁; tested against a one-sided Jacobi SVD to 1e-9.)
//!   All quantities are exact up to that rounding. Cost O(mn·N) + O(N³) flops; memory: one f64
//!   copy (8mn bytes) + O(N²) (R, its singular vectors, faer's workspace) + the returned vectors.
//! * *Randomized* (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1). l = k′+p columns (k′ triplets
//!   wanted, p = `oversample`): X₀ = orth(Ω) for a Gaussian Ω ∈ R^{n×l} drawn from our own seeded
//!   splitmix64 + Box–Muller stream; q = `power_iters` rounds of Y = AX, Q = orth(Y), Z = AᵀQ,
//!   X = orth(Z); then Y = AX, Q = orth(Y), Bᵀ = AᵀQ and the SVD Bᵀ = U_B·Σ·V_Bᵀ (n×l) gives
//!   U = Q·V_B, V = U_B, σ = σ(B). Orthonormalising Ω first leaves the range (and so the
//!   algorithm) unchanged and lets the same X serve the PR estimator below. σ(B) ≤ σ(A) term by
//!   term, so **σ₁ is a lower bound and sr an upper bound**; erank and erank₂ are NaN (they need
//!   the whole spectrum).
//!
//! **PR in randomized mode** is a Hutch++-style estimate of Σσᵢ⁴ = tr(M), M = (AᵀA)², that rides
//! on the last two GEMMs at no extra pass over A. With P = XXᵀ (X the orthonormal input of the last
//! Y = AX), tr M = tr(XᵀMX) + tr((I−P)M(I−P)). The first term is exact and free: AᵀAX = AᵀY =
//! AᵀQ·R_Y = Bᵀ·R_Y (Y = Q·R_Y), so tr(XᵀMX) = ‖Bᵀ R_Y‖_F². The second is Hutchinson's estimator
//! with h = `probes` Rademacher vectors projected off X, gⱼ = (I−P)vⱼ: AGⱼ is appended to the last
//! AX GEMM and AᵀAG to the last AᵀQ GEMM, and tr((I−P)M(I−P)) ≈ mean ‖AᵀA gⱼ‖². The deflated part
//! is exact and captures the top of the spectrum, so the estimate is tight when the spectrum decays
//! and the random part has small variance when it is flat (≈ √(2/(h·n_eff)) relative). The
//! estimated relative standard error of PR is reported (`participation_ratio_rse`; 0 in exact
//! mode or when the sketch spans the row space, NaN with fewer than 2 probes). It is calibrated:
//! over 200 seeds on a 600×400 Gaussian matrix (the worst case, the tail dominates) the error had
//! mean 6e-5 ± 1.5e-3 and sd 2.1% against a mean reported rse of 2.2%. With h = 0 the tail is
//! dropped: Σσ⁴ is then a lower bound and PR an upper bound. The exact ‖AᵀA‖_F² would cost
//! 2mn·min(m,n) flops, ≥ 15× the whole sketch whenever min(m,n) > 512, so it is never used.
//!
//! **Precision (randomized).** The four-plus GEMMs over A run in f32 through faer (the decoded data
//! is f32); the panels are scaled by a power of two 2⁻ᵉ ≈ 1/‖A‖_F before each product so that no
//! f32 product can overflow (any finite input works; matrices with ‖A‖_F < 2⁻¹⁰⁰ get the largest
//! scale 2¹⁰⁰ and may lose relative accuracy to subnormals). Orthonormalisation (QR of the
//! m×l / n×l panels), the SVD of Bᵀ and every sum are f64. The f32 products add a relative error
//! ~1e-6 to σᵢ (relative to σ₁, more for σᵢ ≪ σ₁); the randomized approximation adds
//! ~(σ_{l+1}/σᵢ)^{2q+1} (HMT §10), always downwards (σ̂ᵢ ≤ σᵢ). Tested: the top-5 σ of a 600×400
//! matrix with spectrum 0.8ⁱ within 1e-3 relative at q = 1. A flat spectrum is the hard case:
//! METRICS §1.2's "q = 2 recovers the top-5 σ of a flat 64×32 matrix to within 0.5%" holds for a
//! typical draw only (over 200 Gaussian draws, worst-of-top-5 error: median 0.29% with this
//! l = 17 sketch, max 2.1%; median 0.59% with k = 5, p = 10, as numpy's HMT also gives), and at
//! 600×400 a 17-column sketch with q = 2 is 6–7% low (q = 8, p = 32 reaches ~1%). Spectra of
//! fine-tuning updates usually decay, where q = 1 is ample; raise q for flat ones.
//!
//! **Cost (randomized).** (2q+2) passes over A: 2mn·l flops per pass, plus 2mn·h in each of the
//! last two (h probes). At the defaults k = 8 (k′ = 9 triplets for `spectral_stats`), p = 8,
//! q = 1, h = 16: 2mn·(2·17 + 2·33) = 200·mn flops. Memory: O((m+n)(l+h)) f32 and f64 panels
//! beyond the input, plus faer's GEMM packing buffers (per worker, ≤ a few MiB). See
//! [`randomized_gemm_flops`]. Measured (`examples/spectral_speed.rs`, 4096×11008, 2 threads, best
//! of 5 on the shared machine, load ≈ 2.3): 122 ms = 74 GFLOP/s counted (9.0 GFLOP), 1.17× faer's
//! own threaded GEMM on the same A·X product (63 GFLOP/s) and 32% of the square 2048³ f32 GEMM
//! rate of the same run (234 GFLOP/s). faer's f32 GEMM on such skinny products is bound by
//! packing A, not by the l columns (a pass costs nearly the same at l = 17 and l = 33), which
//! is why the probes ride along almost free.
//!
//! **Parallelism and determinism.** `par` (a [`faer::Par`]) sets how many workers share the big
//! products. They are cut into fixed blocks (row blocks of A for AX, column blocks of A for AᵀQ),
//! each a single-threaded faer GEMM writing its own slice of the output, taken from a shared
//! counter by the workers. No reduction is split, so the GEMM results, and hence every randomized
//! result, are bit-identical for every thread count and run (tested for Seq vs 2 threads). The
//! exact mode hands `par` to faer's QR and SVD (reproducible for a given `par`). Small
//! factorizations always run sequentially.
//!
//! **Principal angles** ([`subspace_overlap`], METRICS §1.3, Björck & Golub 1973; Knyazev &
//! Argentati 2002). For orthonormal U₀, U_t ∈ R^{dim×k}: cos θᵢ = σᵢ(U₀ᵀU_t), sin θᵢ =
//! σᵢ(U_t − U₀(U₀ᵀU_t)). The sines are accurate for tiny angles (θ = 1e-9 is recovered; the cosine
//! route returns 0); θᵢ = asin(sin θᵢ) when sin²θᵢ < ½ and acos(cos θᵢ) otherwise, so large angles
//! are accurate too. Summaries, all from the sines: overlap Ω = mean cos²θ = 1 − Σsin²θ/k
//! (= ‖U₀ᵀU_t‖_F²/k), excess overlap Ω − k/dim (independent random subspaces have E(Ω) = k/dim),
//! projection distance ‖U₀U₀ᵀ − U_tU_tᵀ‖_F = √(2Σsin²θ), Grassmann distance √(Σθ²), the largest
//! angle, and the gap ratios σ_{k+1}/σ_k of both spectra (the top-k subspace is ill-defined when
//! this is near 1). Cost O(dim·k²).

#![deny(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder;
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor as qr_factor;
use faer::linalg::svd::{self as faer_svd, ComputeSvdVectors};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};
use serde::Serialize;

use crate::error::{Error, Result};

/// Rows of A per job in Y = AX. faer's f32 GEMM on these skinny products is dominated by packing
/// A, not by the l columns; 128-row blocks measured best (64–256 within ~10%) at 4096×11008.
const ROW_BLOCK: usize = 128;
/// Columns of A per job in Z = AᵀQ (256–1024 within noise; 512 measured best on average).
const COL_BLOCK: usize = 512;
/// Largest power-of-two exponent used to scale GEMM panels (keeps the scaled panels in f32 range).
const MAX_SCALE_EXP: f64 = 100.0;

/// Options of [`top_svd`] and [`spectral_stats`].
#[derive(Debug, Clone, Copy)]
pub struct SpectralOptions {
    /// Number of singular triplets of interest (default 8). [`spectral_stats`] computes k+1 so
    /// that the gap ratio σ_{k+1}/σ_k of a k-dimensional subspace is available.
    pub k: usize,
    /// Oversampling p of the randomized sketch (default 8): the sketch has k′+p columns.
    pub oversample: usize,
    /// Power iterations q of the randomized sketch (default 1).
    pub power_iters: usize,
    /// Exact SVD when min(m, n) ≤ this (default 512), randomized above.
    pub exact_max_dim: usize,
    /// Rademacher probes of the Hutchinson part of the randomized PR estimate (default 16).
    pub probes: usize,
    /// Seed of the Gaussian test matrix and the probes.
    pub seed: u64,
    /// Parallelism of the large products and of the exact-mode factorizations (default
    /// `Par::Seq`; `Par::rayon(t)` runs t workers in the current rayon pool).
    pub par: Par,
}

impl Default for SpectralOptions {
    fn default() -> Self {
        SpectralOptions {
            k: 8,
            oversample: 8,
            power_iters: 1,
            exact_max_dim: 512,
            probes: 16,
            seed: 0x5EED_5EC7_0000_0001,
            par: Par::Seq,
        }
    }
}

/// Spectrum summary of one matrix (m×n).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpectralStats {
    /// Rows.
    pub m: usize,
    /// Columns.
    pub n: usize,
    /// "exact" (full SVD in f64) or "randomized" (sketch; σ₁ a lower bound, PR estimated).
    pub method: &'static str,
    /// ‖A‖_F = √fro2.
    pub fro: f64,
    /// σ₁ = ‖A‖₂ (randomized: a lower bound).
    pub sigma1: f64,
    /// ‖A‖_F²/σ₁² (randomized: an upper bound). NaN for the zero matrix.
    pub stable_rank: f64,
    /// ‖A‖_F⁴/Σσᵢ⁴ (randomized: estimated, see `participation_ratio_rse`). NaN for the zero matrix.
    pub participation_ratio: f64,
    /// Estimated relative standard error of `participation_ratio` (0 when exact, NaN if unknown).
    pub participation_ratio_rse: f64,
    /// Roy–Vetterli effective rank, p ∝ σ (NaN in randomized mode and for the zero matrix).
    pub erank: f64,
    /// Spectral-energy effective rank, p ∝ σ² (NaN in randomized mode and for the zero matrix).
    pub erank2: f64,
    /// Singular values, descending: all min(m, n) (exact) or the k+1 computed (randomized).
    pub sigmas: Vec<f64>,
}

/// Top singular triplets, descending σ.
#[derive(Debug, Clone)]
pub struct TopSvd {
    /// Left singular vectors, m×k (column-major, orthonormal columns).
    pub u: Mat<f64>,
    /// Singular values, descending (length k).
    pub s: Vec<f64>,
    /// Right singular vectors, n×k (column-major, orthonormal columns).
    pub v: Mat<f64>,
    /// "exact" or "randomized".
    pub method: &'static str,
}

/// Principal angles between the top-k singular subspaces of two matrices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubspaceStats {
    /// Subspace dimension.
    pub k: usize,
    /// Ambient dimension (m for [`Side::Left`], n for [`Side::Right`]).
    pub dim: usize,
    /// sin θᵢ, ascending (Knyazev–Argentati route).
    pub sines: Vec<f64>,
    /// Ω = mean cos²θ = 1 − Σsin²θ/k ∈ [0, 1].
    pub overlap: f64,
    /// Ω − k/dim (the expectation for independent random subspaces is 0).
    pub excess_overlap: f64,
    /// ‖U₀U₀ᵀ − U_tU_tᵀ‖_F = √(2Σsin²θ).
    pub projection_distance: f64,
    /// √(Σθ²).
    pub grassmann_distance: f64,
    /// Largest principal angle θ_k (radians).
    pub max_angle: f64,
    /// σ_{k+1}/σ_k of the base spectrum (NaN when σ_{k+1} was not computed or σ_k = 0).
    pub gap_ratio_base: f64,
    /// σ_{k+1}/σ_k of the checkpoint spectrum.
    pub gap_ratio_ckpt: f64,
}

/// Which singular subspace [`subspace_overlap`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Left singular vectors (output space, R^m).
    Left,
    /// Right singular vectors (input space, R^n).
    Right,
}

/// Top-`k` singular triplets of the m×n row-major matrix `a` (exact or randomized per
/// `opts.exact_max_dim`; `opts.k` is ignored in favour of `k`). Returns min(k, m, n) triplets.
/// A zero matrix gives σ = 0 and zero vectors; a non-finite input NaN everywhere.
pub fn top_svd(a: &[f32], m: usize, n: usize, k: usize, opts: &SpectralOptions) -> Result<TopSvd> {
    check_shape(a.len(), m, n)?;
    let fro2 = sum_sq(a);
    Ok(compute(a, m, n, k, fro2, false, true, opts).top)
}

/// Spectral summary of the m×n row-major matrix `a` plus its top-(k+1) triplets (for
/// [`subspace_overlap`], so that no second SVD is needed).
///
/// `fro2` = ‖A‖_F², accumulated in f64 by the caller; NaN means "compute it here". It must be
/// the true value (it scales the randomized products); a negative value is an error.
pub fn spectral_stats(
    a: &[f32],
    m: usize,
    n: usize,
    fro2: f64,
    opts: &SpectralOptions,
) -> Result<(SpectralStats, TopSvd)> {
    stats_impl(a, m, n, fro2, opts, true)
}

/// [`spectral_stats`] without singular vectors: the same numbers, for matrices whose subspaces are
/// not compared (ΔW). In exact mode this skips forming the vectors (about 3× less work for square
/// matrices); the randomized sketch is unchanged.
pub fn spectral_values(
    a: &[f32],
    m: usize,
    n: usize,
    fro2: f64,
    opts: &SpectralOptions,
) -> Result<SpectralStats> {
    stats_impl(a, m, n, fro2, opts, false).map(|(s, _)| s)
}

fn stats_impl(
    a: &[f32],
    m: usize,
    n: usize,
    fro2: f64,
    opts: &SpectralOptions,
    vectors: bool,
) -> Result<(SpectralStats, TopSvd)> {
    check_shape(a.len(), m, n)?;
    if fro2 < 0.0 || fro2 == f64::NEG_INFINITY {
        return Err(Error::Config {
            reason: format!("fro2 must be a sum of squares (>= 0) or NaN, got {fro2}"),
        });
    }
    let fro2 = if fro2.is_nan() { sum_sq(a) } else { fro2 };
    let out = compute(a, m, n, opts.k.saturating_add(1), fro2, true, vectors, opts);
    let top = out.top;
    let method = top.method;
    let fro = fro2.sqrt();
    let nan = f64::NAN;
    let mut stats = SpectralStats {
        m,
        n,
        method,
        fro,
        sigma1: nan,
        stable_rank: nan,
        participation_ratio: nan,
        participation_ratio_rse: nan,
        erank: nan,
        erank2: nan,
        sigmas: Vec::new(),
    };
    match out.spectrum {
        Spectrum::NonFinite => {
            stats.fro = nan;
            stats.sigmas = top.s.clone();
        }
        Spectrum::Zero => {
            stats.sigma1 = 0.0;
            stats.sigmas = out.all_sigmas;
        }
        Spectrum::Exact => {
            let s = out.all_sigmas;
            let s1 = s[0];
            let (erank, erank2, s4) = entropies(&s);
            stats.sigma1 = s1;
            stats.stable_rank = fro2 / (s1 * s1);
            stats.participation_ratio = fro2 * fro2 / s4;
            stats.participation_ratio_rse = 0.0;
            stats.erank = erank;
            stats.erank2 = erank2;
            stats.sigmas = s;
        }
        Spectrum::Randomized { s4, s4_se } => {
            let s1 = top.s[0];
            stats.sigma1 = s1;
            stats.stable_rank = fro2 / (s1 * s1);
            stats.participation_ratio = fro2 * fro2 / s4;
            stats.participation_ratio_rse = s4_se / s4;
            stats.sigmas = top.s.clone();
        }
    }
    Ok((stats, top))
}

/// Principal angles between the top-`k` left (or right) singular subspaces of `base` and
/// `ckpt` (see the module doc). `k` must be ≥ 1 and ≤ the triplets of both. When σ_k = 0 in either
/// spectrum (the subspace is not defined) or a vector is non-finite, every number is NaN.
pub fn subspace_overlap(
    base: &TopSvd,
    ckpt: &TopSvd,
    side: Side,
    k: usize,
) -> Result<SubspaceStats> {
    let (u0, ut) = match side {
        Side::Left => (base.u.as_ref(), ckpt.u.as_ref()),
        Side::Right => (base.v.as_ref(), ckpt.v.as_ref()),
    };
    if k == 0 {
        return Err(Error::Config {
            reason: "subspace_overlap needs k >= 1".into(),
        });
    }
    let avail = [u0.ncols(), ut.ncols(), base.s.len(), ckpt.s.len()]
        .into_iter()
        .min()
        .unwrap_or(0);
    if k > avail {
        return Err(Error::Config {
            reason: format!(
                "subspace_overlap: k = {k} but only {avail} singular triplets are available"
            ),
        });
    }
    if u0.nrows() != ut.nrows() {
        return Err(Error::Config {
            reason: format!(
                "subspace_overlap: singular vectors of length {} and {} (shapes differ)",
                u0.nrows(),
                ut.nrows()
            ),
        });
    }
    let dim = u0.nrows();
    let gap = |s: &[f64]| {
        if s.len() > k && s[k - 1] > 0.0 {
            s[k] / s[k - 1]
        } else {
            f64::NAN
        }
    };
    let nan = f64::NAN;
    let mut out = SubspaceStats {
        k,
        dim,
        sines: vec![nan; k],
        overlap: nan,
        excess_overlap: nan,
        projection_distance: nan,
        grassmann_distance: nan,
        max_angle: nan,
        gap_ratio_base: gap(&base.s),
        gap_ratio_ckpt: gap(&ckpt.s),
    };
    let (u0, ut) = (u0.subcols(0, k), ut.subcols(0, k));
    let defined = |s: &[f64]| s[k - 1] > 0.0 && s[..k].iter().all(|x| x.is_finite());
    if !defined(&base.s) || !defined(&ckpt.s) || !all_finite(u0) || !all_finite(ut) {
        return Ok(out);
    }
    let Some((cos, sin)) = cos_sin(u0, ut) else {
        return Ok(out);
    };
    let sum_sin2: f64 = sin.iter().map(|s| s * s).sum();
    let angles: Vec<f64> = sin
        .iter()
        .zip(&cos)
        .map(|(&s, &c)| if s * s < 0.5 { s.asin() } else { c.acos() })
        .collect();
    let kf = k as f64;
    out.overlap = 1.0 - sum_sin2 / kf;
    out.excess_overlap = out.overlap - kf / dim as f64;
    out.projection_distance = (2.0 * sum_sin2).sqrt();
    out.grassmann_distance = angles.iter().map(|t| t * t).sum::<f64>().sqrt();
    out.max_angle = angles.iter().copied().fold(0.0, f64::max);
    out.sines = sin;
    Ok(out)
}

/// Flops of the large f32 GEMMs that [`spectral_stats`] runs on an m×n matrix in randomized mode
/// (2·m·n per column of every product over A); 0 in exact mode. For throughput reports.
pub fn randomized_gemm_flops(m: usize, n: usize, opts: &SpectralOptions) -> f64 {
    let r = m.min(n);
    if r == 0 || r <= opts.exact_max_dim {
        return 0.0;
    }
    let kk = opts.k.saturating_add(1).min(r);
    let l = kk.saturating_add(opts.oversample).min(r);
    let h = if l < n { opts.probes } else { 0 };
    let mn = m as f64 * n as f64;
    2.0 * mn * (2.0 * opts.power_iters as f64 * l as f64 + 2.0 * (l + h) as f64)
}

// ---------------------------------------------------------------------------------------------
// Driver

enum Spectrum {
    NonFinite,
    Zero,
    Exact,
    Randomized { s4: f64, s4_se: f64 },
}

struct Computed {
    top: TopSvd,
    spectrum: Spectrum,
    /// Every singular value (exact and zero cases), descending.
    all_sigmas: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn compute(
    a: &[f32],
    m: usize,
    n: usize,
    k: usize,
    fro2: f64,
    with_pr: bool,
    vectors: bool,
    opts: &SpectralOptions,
) -> Computed {
    let r = m.min(n);
    let kk = k.min(r);
    let exact = r <= opts.exact_max_dim;
    let method = if exact { "exact" } else { "randomized" };
    let filled = |spectrum: Spectrum, val: f64, all: usize| Computed {
        top: TopSvd {
            u: Mat::from_fn(m, kk, |_, _| val),
            s: vec![val; kk],
            v: Mat::from_fn(n, kk, |_, _| val),
            method,
        },
        spectrum,
        all_sigmas: vec![val; all],
    };
    if !fro2.is_finite() {
        return filled(Spectrum::NonFinite, f64::NAN, 0);
    }
    if fro2 == 0.0 {
        // The zero matrix (or an empty one): σ = 0, vectors undefined (zeros).
        return filled(Spectrum::Zero, 0.0, if exact { r } else { kk });
    }
    if kk == 0 {
        // Only `top_svd(.., k = 0, ..)` gets here (spectral_stats asks for k+1 ≥ 1 triplets).
        return filled(Spectrum::Zero, 0.0, 0);
    }
    let am = MatRef::from_row_major_slice(a, m, n);
    if exact {
        match exact_svd(a, m, n, kk, vectors, opts.par) {
            Some((u, s, v)) => Computed {
                top: TopSvd {
                    u,
                    s: s[..kk].to_vec(),
                    v,
                    method,
                },
                spectrum: Spectrum::Exact,
                all_sigmas: s,
            },
            None => filled(Spectrum::NonFinite, f64::NAN, 0),
        }
    } else {
        let probes = if with_pr { opts.probes } else { 0 };
        match randomized_svd(am, kk, fro2, probes, opts) {
            Some((u, s, v, s4, s4_se)) => Computed {
                top: TopSvd { u, s, v, method },
                spectrum: Spectrum::Randomized { s4, s4_se },
                all_sigmas: Vec::new(),
            },
            None => filled(Spectrum::NonFinite, f64::NAN, 0),
        }
    }
}

fn check_shape(len: usize, m: usize, n: usize) -> Result<()> {
    match m.checked_mul(n) {
        Some(t) if t == len => Ok(()),
        Some(t) => Err(Error::Config {
            reason: format!("matrix data has {len} elements but the shape [{m}, {n}] needs {t}"),
        }),
        None => Err(Error::Config {
            reason: format!("matrix shape [{m}, {n}] overflows"),
        }),
    }
}

/// Σ aᵢ² in f64 with 8 independent lanes (vectorisable, fixed order); ±Inf or NaN propagate.
fn sum_sq(a: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = a.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let x = c[j] as f64;
            acc[j] += x * x;
        }
    }
    for (j, &x) in it.remainder().iter().enumerate() {
        acc[j] += x as f64 * x as f64;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// (erank, erank₂, Σσ⁴) of a full spectrum.
fn entropies(s: &[f64]) -> (f64, f64, f64) {
    let s1: f64 = s.iter().sum();
    let s2: f64 = s.iter().map(|x| x * x).sum();
    let s4: f64 = s.iter().map(|x| (x * x) * (x * x)).sum();
    let h = |tot: f64, f: &dyn Fn(f64) -> f64| {
        -s.iter()
            .map(|&x| {
                let p = f(x) / tot;
                if p > 0.0 {
                    p * p.ln()
                } else {
                    0.0
                }
            })
            .sum::<f64>()
    };
    let erank = h(s1, &|x| x).exp();
    let erank2 = h(s2, &|x| x * x).exp();
    (erank, erank2, s4)
}

fn all_finite(x: MatRef<'_, f64>) -> bool {
    (0..x.ncols()).all(|j| x.col(j).iter().all(|v| v.is_finite()))
}

// ---------------------------------------------------------------------------------------------
// Exact mode

/// All singular values (descending) and the top-`kk` vectors of A, in f64. None if A has a
/// non-finite value or the SVD does not converge.
fn exact_svd(
    a: &[f32],
    m: usize,
    n: usize,
    kk: usize,
    vectors: bool,
    par: Par,
) -> Option<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    if a.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let tall = m >= n;
    // Column-major M×N copy of A (tall) or Aᵀ (wide; then each column is a contiguous row of A).
    let t = if tall {
        Mat::from_fn(m, n, |i, j| a[i * n + j] as f64)
    } else {
        Mat::from_fn(n, m, |i, j| a[j * n + i] as f64)
    };
    let (left, s, right) = tall_svd(t, kk, vectors, par)?;
    if tall {
        Some((left, s, right))
    } else {
        Some((right, s, left))
    }
}

/// Householder QR of a tall matrix, kept in faer's compact form.
struct HouseQr {
    /// Essential parts of the reflectors (unit lower trapezoid), rows × cols.
    basis: Mat<f64>,
    /// Block reflector coefficients.
    coeff: Mat<f64>,
    /// cols × cols upper-triangular factor.
    r: Mat<f64>,
}

impl HouseQr {
    fn new(mut a: Mat<f64>, par: Par) -> HouseQr {
        let (rows, cols) = a.shape();
        let bs = qr_factor::recommended_block_size::<f64>(rows, cols);
        let mut coeff = Mat::<f64>::zeros(bs, rows.min(cols));
        let mut mem = MemBuffer::new(qr_factor::qr_in_place_scratch::<f64>(
            rows,
            cols,
            bs,
            par,
            Default::default(),
        ));
        qr_factor::qr_in_place(
            a.as_mut(),
            coeff.as_mut(),
            par,
            MemStack::new(&mut mem),
            Default::default(),
        );
        let c = rows.min(cols);
        let r = Mat::from_fn(c, cols, |i, j| if i <= j { a[(i, j)] } else { 0.0 });
        // Same basis layout as faer's own `Qr`: unit diagonal, zero above.
        for j in 0..cols {
            for i in 0..j.min(rows) {
                a[(i, j)] = 0.0;
            }
            if j < rows {
                a[(j, j)] = 1.0;
            }
        }
        HouseQr { basis: a, coeff, r }
    }

    /// Q·x for x with `rows` rows (in place).
    fn apply_q(&self, mut x: Mat<f64>, par: Par) -> Mat<f64> {
        let mut mem = MemBuffer::new(
            householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
                self.basis.nrows(),
                self.coeff.nrows(),
                x.ncols(),
            ),
        );
        householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            self.basis.as_ref(),
            self.coeff.as_ref(),
            Conj::No,
            x.as_mut(),
            par,
            MemStack::new(&mut mem),
        );
        x
    }

    /// The first `cols` columns of Q.
    fn thin_q(&self, par: Par) -> Mat<f64> {
        let (rows, cols) = self.basis.shape();
        self.apply_q(Mat::identity(rows, cols), par)
    }
}

/// Orthonormal basis of the columns of a tall matrix, and its R factor.
fn orth(a: Mat<f64>) -> (Mat<f64>, Mat<f64>) {
    let qr = HouseQr::new(a, Par::Seq);
    let q = qr.thin_q(Par::Seq);
    (q, qr.r)
}

/// Thin SVD of a tall M×N matrix (M ≥ N) through QR then the SVD of the N×N factor R:
/// (top-`kk` left vectors M×kk, all N singular values descending, top-`kk` right vectors N×kk).
fn tall_svd(
    t: Mat<f64>,
    kk: usize,
    vectors: bool,
    par: Par,
) -> Option<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let (rows, cols) = t.shape();
    debug_assert!(rows >= cols && kk <= cols);
    let qr = HouseQr::new(t, par);
    if !vectors {
        // Values only: σ(A) = σ(R); no vectors are formed (they come back with zero columns).
        let sig = singular_values(qr.r.as_ref())?;
        if sig.iter().any(|x| !x.is_finite()) {
            return None;
        }
        return Some((Mat::zeros(rows, 0), sig, Mat::zeros(cols, 0)));
    }
    let mut s = Diag::<f64>::zeros(cols);
    let mut ur = Mat::<f64>::zeros(cols, cols);
    let mut vr = Mat::<f64>::zeros(cols, cols);
    let mut mem = MemBuffer::new(faer_svd::svd_scratch::<f64>(
        cols,
        cols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    ));
    faer_svd::svd(
        qr.r.as_ref(),
        s.as_mut(),
        Some(ur.as_mut()),
        Some(vr.as_mut()),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .ok()?;
    drop(mem);
    let sv = s.as_ref().column_vector();
    let sig: Vec<f64> = (0..cols).map(|i| sv[i]).collect();
    if sig.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let padded = Mat::from_fn(rows, kk, |i, j| if i < cols { ur[(i, j)] } else { 0.0 });
    let left = qr.apply_q(padded, par);
    let right = vr.subcols(0, kk).to_owned();
    Some((left, sig, right))
}

// ---------------------------------------------------------------------------------------------
// Randomized mode

/// splitmix64 (Steele, Lea & Flood 2014): the seeded stream behind Ω and the probes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never 0, so ln is finite.
    fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.open01().ln()).sqrt();
        let t = std::f64::consts::TAU * self.open01();
        (r * t.cos(), r * t.sin())
    }
}

/// rows × cols standard Gaussian matrix, filled column by column.
fn gaussian(rng: &mut SplitMix64, rows: usize, cols: usize) -> Mat<f64> {
    let mut vals = Vec::with_capacity(rows * cols + 1);
    while vals.len() < rows * cols {
        let (a, b) = rng.normal_pair();
        vals.push(a);
        vals.push(b);
    }
    Mat::from_fn(rows, cols, |i, j| vals[j * rows + i])
}

/// x·scale rounded to f32.
fn to_f32(x: MatRef<'_, f64>, scale: f64) -> Mat<f32> {
    Mat::from_fn(x.nrows(), x.ncols(), |i, j| (x[(i, j)] * scale) as f32)
}

/// f32 panel → f64, None if any value is non-finite (NaN input the caller's fro2 missed).
fn to_f64_checked(x: MatRef<'_, f32>) -> Option<Mat<f64>> {
    let out = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] as f64);
    all_finite(out.as_ref()).then_some(out)
}

/// Power-of-two s with s·‖A‖_F ≤ 1 (clamped to 2^±100) so that the scaled f32 products stay in
/// range: every entry of A·(Xs) is at most ‖A‖₂·s ≤ 1 for orthonormal X.
fn panel_scale(fro2: f64) -> f64 {
    let e = (0.5 * fro2.log2())
        .ceil()
        .clamp(-MAX_SCALE_EXP, MAX_SCALE_EXP);
    (-e).exp2()
}

type RandOut = (Mat<f64>, Vec<f64>, Mat<f64>, f64, f64);

/// HMT Alg. 4.4 + 5.1 with the Hutch++-style Σσ⁴ estimate (module doc). Returns (U m×kk, σ,
/// V n×kk, Σσ⁴ estimate, its standard error), or None when a panel turns non-finite.
fn randomized_svd(
    a: MatRef<'_, f32>,
    kk: usize,
    fro2: f64,
    probes: usize,
    opts: &SpectralOptions,
) -> Option<RandOut> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let l = kk.saturating_add(opts.oversample).min(r);
    let h = if l < n { probes } else { 0 };
    let par = opts.par;
    let s = panel_scale(fro2);
    let mut rng = SplitMix64(opts.seed);
    let (mut x, _) = orth(gaussian(&mut rng, n, l));
    for _ in 0..opts.power_iters {
        let y = to_f64_checked(a_times(a, to_f32(x.as_ref(), s).as_ref(), par).as_ref())?;
        let (q, _) = orth(y);
        let z = to_f64_checked(at_times(a, to_f32(q.as_ref(), s).as_ref(), par).as_ref())?;
        x = orth(z).0;
    }
    // Last round: Y = A·[X | G] with G = (I − XXᵀ)·Rademacher.
    let mut xin = Mat::<f64>::zeros(n, l + h);
    xin.as_mut().subcols_mut(0, l).copy_from(x.as_ref());
    if h > 0 {
        let v = Mat::from_fn(
            n,
            h,
            |_, _| {
                if rng.next_u64() >> 63 == 0 {
                    1.0
                } else {
                    -1.0
                }
            },
        );
        let mut xtv = Mat::<f64>::zeros(l, h);
        matmul(
            xtv.as_mut(),
            Accum::Replace,
            x.transpose(),
            v.as_ref(),
            1.0,
            Par::Seq,
        );
        let mut g = v;
        matmul(
            g.as_mut(),
            Accum::Add,
            x.as_ref(),
            xtv.as_ref(),
            -1.0,
            Par::Seq,
        );
        xin.as_mut().subcols_mut(l, h).copy_from(g.as_ref());
    }
    let yw = to_f64_checked(a_times(a, to_f32(xin.as_ref(), s).as_ref(), par).as_ref())?;
    drop(xin);
    // yw = A·[X | G]·s. QR of the Y part: Y·s = Q·R_s.
    let (q, r_s) = orth(yw.subcols(0, l).to_owned());
    let mut qin = Mat::<f64>::zeros(m, l + h);
    qin.as_mut().subcols_mut(0, l).copy_from(q.as_ref());
    if h > 0 {
        qin.as_mut().subcols_mut(l, h).copy_from(yw.subcols(l, h));
    }
    drop(yw);
    // [Bᵀ·s | AᵀAG·s²] = Aᵀ·[Q·s | AG·s²].
    let out = to_f64_checked(at_times(a, to_f32(qin.as_ref(), s).as_ref(), par).as_ref())?;
    drop(qin);
    let bt_s = out.subcols(0, l);
    // Exact part tr(XᵀMX) = ‖AᵀY‖_F² = ‖Bᵀ·R_Y‖_F² = ‖(Bᵀs)(R_s)‖_F²/s⁴.
    let mut t = Mat::<f64>::zeros(n, l);
    matmul(
        t.as_mut(),
        Accum::Replace,
        bt_s,
        r_s.as_ref(),
        1.0,
        Par::Seq,
    );
    let s4_unscale = (1.0 / s).powi(4);
    let s4_top = t.squared_norm_l2() * s4_unscale;
    drop(t);
    let tail: Vec<f64> = (0..h)
        .map(|j| out.col(l + j).squared_norm_l2() * s4_unscale)
        .collect();
    let (mean, se) = mean_se(&tail);
    // Without probes the tail is dropped, not known to be zero (unless the sketch spans Rⁿ).
    let se = if h == 0 && l < n { f64::NAN } else { se };
    let s4 = s4_top + mean;
    let bt = Mat::from_fn(n, l, |i, j| bt_s[(i, j)] / s);
    drop(out);
    // Bᵀ = V_B Σ U_Bᵀ (n ≥ l): A ≈ Q·B = (Q·U_B) Σ V_Bᵀ.
    let (vb, sig, ub) = tall_svd(bt, kk, true, Par::Seq)?;
    let mut u = Mat::<f64>::zeros(m, kk);
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        ub.as_ref(),
        1.0,
        Par::Seq,
    );
    let sig = sig[..kk].to_vec();
    Some((u, sig, vb, s4, se))
}

/// Mean and its standard error (NaN below two samples; 0 mean and 0 se for none).
fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Blocked products over A

/// Runs `f(i, item)` for every item, on `par.degree()` workers taking items from a shared counter.
/// Items own disjoint output slices, so the result does not depend on which worker ran what.
fn for_each_job<T: Send>(items: Vec<T>, par: Par, f: impl Fn(usize, T) + Sync) {
    let workers = par.degree().min(items.len());
    if workers <= 1 {
        for (i, it) in items.into_iter().enumerate() {
            f(i, it);
        }
        return;
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let next = AtomicUsize::new(0);
    rayon::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|_| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = slots.get(i) else { break };
                let item = match slot.lock() {
                    Ok(mut g) => g.take(),
                    Err(p) => p.into_inner().take(),
                };
                if let Some(item) = item {
                    f(i, item);
                }
            });
        }
    });
}

fn split_rows(y: MatMut<'_, f32>, b: usize) -> Vec<MatMut<'_, f32>> {
    let mut out = Vec::with_capacity(y.nrows().div_ceil(b));
    let mut rest = y;
    while rest.nrows() > 0 {
        let k = b.min(rest.nrows());
        let (head, tail) = rest.split_at_row_mut(k);
        out.push(head);
        rest = tail;
    }
    out
}

/// A·X for A m×n (row-major view) and X n×w: one sequential GEMM per block of `ROW_BLOCK` rows.
fn a_times(a: MatRef<'_, f32>, x: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let mut y = Mat::<f32>::zeros(a.nrows(), x.ncols());
    let blocks = split_rows(y.as_mut(), ROW_BLOCK);
    for_each_job(blocks, par, |i, yb| {
        let rows = yb.nrows();
        matmul(
            yb,
            Accum::Replace,
            a.subrows(i * ROW_BLOCK, rows),
            x,
            1.0f32,
            Par::Seq,
        );
    });
    y
}

/// Aᵀ·Q for A m×n (row-major view) and Q m×w: one sequential GEMM per block of `COL_BLOCK`
/// columns of A (rows of the result), so no sum is split between workers.
fn at_times(a: MatRef<'_, f32>, q: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let mut z = Mat::<f32>::zeros(a.ncols(), q.ncols());
    let blocks = split_rows(z.as_mut(), COL_BLOCK);
    for_each_job(blocks, par, |i, zb| {
        let cols = zb.nrows();
        matmul(
            zb,
            Accum::Replace,
            a.subcols(i * COL_BLOCK, cols).transpose(),
            q,
            1.0f32,
            Par::Seq,
        );
    });
    z
}

// ---------------------------------------------------------------------------------------------
// Principal angles

/// (cos θ descending, sin θ ascending) for orthonormal U₀, U_t (dim×k), clamped to [0, 1].
fn cos_sin(u0: MatRef<'_, f64>, ut: MatRef<'_, f64>) -> Option<(Vec<f64>, Vec<f64>)> {
    let k = u0.ncols();
    let mut c = Mat::<f64>::zeros(k, k);
    matmul(
        c.as_mut(),
        Accum::Replace,
        u0.transpose(),
        ut,
        1.0,
        Par::Seq,
    );
    let mut d = ut.to_owned();
    matmul(d.as_mut(), Accum::Add, u0, c.as_ref(), -1.0, Par::Seq);
    let mut cos = singular_values(c.as_ref())?;
    let mut sin = singular_values(d.as_ref())?;
    // d has min(dim, k) singular values; dim < k cannot happen for orthonormal columns.
    sin.resize(k, 0.0);
    sin.reverse();
    for v in cos.iter_mut().chain(sin.iter_mut()) {
        *v = v.clamp(0.0, 1.0);
    }
    Some((cos, sin))
}

/// Singular values (descending) of a small f64 matrix.
fn singular_values(x: MatRef<'_, f64>) -> Option<Vec<f64>> {
    let (r, c) = x.shape();
    let mut s = Diag::<f64>::zeros(r.min(c));
    let mut mem = MemBuffer::new(faer_svd::svd_scratch::<f64>(
        r,
        c,
        ComputeSvdVectors::No,
        ComputeSvdVectors::No,
        Par::Seq,
        Default::default(),
    ));
    faer_svd::svd(
        x,
        s.as_mut(),
        None,
        None,
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .ok()?;
    let sv = s.as_ref().column_vector();
    Some((0..r.min(c)).map(|i| sv[i]).collect())
}

#[cfg(test)]
mod tests_support {
    use super::*;

    pub(super) fn fro2_of(a: &[f32]) -> f64 {
        a.iter().map(|&x| x as f64 * x as f64).sum()
    }

    /// Orthonormal rows × cols (rows ≥ cols) from the QR of a seeded Gaussian.
    pub(super) fn rand_orth(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        orth(gaussian(&mut SplitMix64(seed), rows, cols)).0
    }

    /// Row-major f32 A = U·diag(σ)·Vᵀ with random orthonormal U (m×r), V (n×r).
    pub(super) fn construct(m: usize, n: usize, sig: &[f64], seed: u64) -> Vec<f32> {
        let r = sig.len();
        let u = rand_orth(m, r, seed);
        let v = rand_orth(n, r, seed ^ 0xABCD);
        let us = Mat::from_fn(m, r, |i, t| u[(i, t)] * sig[t]);
        let a = &us * v.transpose();
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = a[(i, j)] as f32;
            }
        }
        out
    }

    pub(super) fn rand_matrix(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let g = gaussian(&mut SplitMix64(seed), m, n);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = g[(i, j)] as f32;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use proptest::prelude::*;

    fn opts_exact() -> SpectralOptions {
        SpectralOptions::default()
    }

    fn opts_rand() -> SpectralOptions {
        SpectralOptions {
            exact_max_dim: 0,
            ..SpectralOptions::default()
        }
    }

    /// Slow oracle: one-sided (Hestenes) Jacobi SVD in f64; singular values descending.
    fn jacobi_sigmas(a: &[f32], m: usize, n: usize) -> Vec<f64> {
        let (rows, cols) = if m >= n { (m, n) } else { (n, m) };
        let get = |i: usize, j: usize| {
            if m >= n {
                a[i * n + j] as f64
            } else {
                a[j * n + i] as f64
            }
        };
        let mut c: Vec<Vec<f64>> = (0..cols)
            .map(|j| (0..rows).map(|i| get(i, j)).collect())
            .collect();
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        for _ in 0..100 {
            let mut rotated = false;
            for p in 0..cols {
                for q in p + 1..cols {
                    let (al, be, ga) = (dot(&c[p], &c[p]), dot(&c[q], &c[q]), dot(&c[p], &c[q]));
                    if ga == 0.0 || ga.abs() <= 1e-16 * (al * be).sqrt() {
                        continue;
                    }
                    rotated = true;
                    let zeta = (be - al) / (2.0 * ga);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let cs = 1.0 / (1.0 + t * t).sqrt();
                    let sn = cs * t;
                    let (lo, hi) = c.split_at_mut(q);
                    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                        let (x0, y0) = (*x, *y);
                        *x = cs * x0 - sn * y0;
                        *y = sn * x0 + cs * y0;
                    }
                }
            }
            if !rotated {
                break;
            }
        }
        let mut s: Vec<f64> = c.iter().map(|v| dot(v, v).sqrt()).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        s
    }

    fn close(a: f64, b: f64, rtol: f64) -> bool {
        (a - b).abs() <= rtol * a.abs().max(b.abs())
    }

    /// Reference summaries from a full spectrum.
    fn reference(s: &[f64], fro2: f64) -> (f64, f64, f64, f64) {
        let (erank, erank2, s4) = entropies(s);
        (fro2 / (s[0] * s[0]), fro2 * fro2 / s4, erank, erank2)
    }

    /// ‖A·V − U·diag(σ)‖_max and max |UᵀU − I|, |VᵀV − I|.
    fn residuals(a: &[f32], m: usize, n: usize, t: &TopSvd) -> (f64, f64) {
        let am = Mat::from_fn(m, n, |i, j| a[i * n + j] as f64);
        let k = t.s.len();
        let av = &am * &t.v;
        let mut res: f64 = 0.0;
        for j in 0..k {
            for i in 0..m {
                res = res.max((av[(i, j)] - t.u[(i, j)] * t.s[j]).abs());
            }
        }
        let mut orth_err: f64 = 0.0;
        for x in [&t.u, &t.v] {
            let g = x.transpose() * x;
            for i in 0..k {
                for j in 0..k {
                    let e = if i == j { 1.0 } else { 0.0 };
                    orth_err = orth_err.max((g[(i, j)] - e).abs());
                }
            }
        }
        (res, orth_err)
    }

    #[test]
    fn exact_matches_jacobi_on_constructed_spectra() {
        for &(m, n, r) in &[
            (30, 20, 20),
            (20, 30, 20),
            (50, 7, 7),
            (7, 50, 5),
            (1, 9, 1),
            (9, 1, 1),
            (40, 40, 40),
        ] {
            let sig: Vec<f64> = (0..r)
                .map(|i| 10f64.powf(-3.0 * i as f64 / r as f64))
                .collect();
            let a = construct(m, n, &sig, 7 + m as u64);
            let fro2 = fro2_of(&a);
            let (st, top) = spectral_stats(&a, m, n, fro2, &opts_exact()).unwrap();
            assert_eq!(st.method, "exact");
            let js = jacobi_sigmas(&a, m, n);
            assert_eq!(st.sigmas.len(), m.min(n));
            for (x, y) in st.sigmas.iter().zip(&js) {
                // Singular values beyond the construction's rank are f32 rounding (~1e-8): absolute.
                assert!((x - y).abs() <= 1e-9 * y.max(1e-6), "{m}x{n}: {x} vs {y}");
            }
            let (sr, pr, er, er2) = reference(&js, fro2);
            assert!(close(st.sigma1, js[0], 1e-9));
            assert!(close(st.stable_rank, sr, 1e-9), "{} {}", st.stable_rank, sr);
            assert!(close(st.participation_ratio, pr, 1e-9));
            assert!(close(st.erank, er, 1e-9), "{} {}", st.erank, er);
            assert!(close(st.erank2, er2, 1e-9));
            assert_eq!(st.participation_ratio_rse, 0.0);
            let (res, oe) = residuals(&a, m, n, &top);
            assert!(res < 1e-12 * js[0] && oe < 1e-12, "{m}x{n}: {res} {oe}");
            assert_eq!(top.s.len(), 9usize.min(m.min(n)));
        }
    }

    #[test]
    fn exact_small_singular_values_are_accurate() {
        // σ spanning 1 … 1e-12: the Gram route would lose everything below ~1e-8.
        let (m, n) = (24, 12);
        let sig: Vec<f64> = (0..n).map(|i| 10f64.powi(-(i as i32))).collect();
        let a = construct(m, n, &sig, 99);
        let (st, _) = spectral_stats(&a, m, n, f64::NAN, &opts_exact()).unwrap();
        let js = jacobi_sigmas(&a, m, n);
        for (x, y) in st.sigmas.iter().zip(&js) {
            assert!((x - y).abs() <= 1e-14 * js[0], "{x} vs {y}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn invariant_chain(m in 1usize..=40, n in 1usize..=40, seed in any::<u64>(), spread in 0.0f64..4.0) {
            let mut a = rand_matrix(m, n, seed);
            // Column scales e^{spread·z} give anything from flat to steep spectra.
            let mut rng = SplitMix64(seed ^ 1);
            let scales: Vec<f64> = (0..n).map(|_| (spread * rng.normal_pair().0).exp()).collect();
            for i in 0..m { for j in 0..n { a[i * n + j] = (a[i * n + j] as f64 * scales[j]) as f32; } }
            let (st, _) = spectral_stats(&a, m, n, fro2_of(&a), &opts_exact()).unwrap();
            let tol = 1e-9;
            let rank = m.min(n) as f64;
            prop_assert!(1.0 <= st.stable_rank * (1.0 + tol));
            prop_assert!(st.stable_rank <= st.participation_ratio * (1.0 + tol));
            prop_assert!(st.participation_ratio <= st.erank2 * (1.0 + tol));
            prop_assert!(st.erank2 <= st.erank * (1.0 + tol));
            prop_assert!(st.erank <= rank * (1.0 + tol));
        }
    }

    #[test]
    fn randomized_decaying_spectrum() {
        let (m, n) = (600, 400);
        let sig: Vec<f64> = (0..n).map(|i| 0.8f64.powi(i as i32)).collect();
        let a = construct(m, n, &sig, 3);
        let fro2 = fro2_of(&a);
        let (ex, _) = spectral_stats(&a, m, n, fro2, &opts_exact()).unwrap();
        let (rd, top) = spectral_stats(&a, m, n, fro2, &opts_rand()).unwrap();
        assert_eq!(rd.method, "randomized");
        assert_eq!(rd.sigmas.len(), 9);
        for i in 0..5 {
            assert!(
                close(rd.sigmas[i], ex.sigmas[i], 1e-3),
                "{i}: {} {}",
                rd.sigmas[i],
                ex.sigmas[i]
            );
        }
        assert!(rd.sigma1 <= ex.sigma1 * (1.0 + 1e-6));
        assert!(rd.stable_rank >= ex.stable_rank * (1.0 - 1e-6));
        assert!(close(rd.stable_rank, ex.stable_rank, 1e-4));
        // The deflated part holds nearly all of Σσ⁴: the estimate is tight.
        assert!(
            close(rd.participation_ratio, ex.participation_ratio, 1e-3),
            "{} {}",
            rd.participation_ratio,
            ex.participation_ratio
        );
        assert!(rd.erank.is_nan() && rd.erank2.is_nan());
        let (res, oe) = residuals(&a, m, n, &top);
        assert!(res < 1e-3 && oe < 1e-10, "{res} {oe}");
    }

    #[test]
    fn randomized_flat_spectrum_q2() {
        // METRICS §1.2 [verified]: q = 2 recovers the top-5 σ of a flat-spectrum (Gaussian)
        // 64×32 matrix to within 0.5%. That holds for a typical draw, not for every one: over 200
        // draws the worst top-5 error has median 0.29% (max 2.1%) with this sketch (k+1 = 9,
        // p = 8), and median 0.59% with k = 5, p = 10 (numpy's HMT gives the same 0.63%). So:
        // the median over 21 fixed draws is below 0.5%, and every σ̂ is a lower bound.
        let (m, n) = (64, 32);
        let mut worst = vec![];
        for seed in 0..21u64 {
            let a = rand_matrix(m, n, 100 + seed);
            let (ex, _) = spectral_stats(&a, m, n, f64::NAN, &opts_exact()).unwrap();
            let o = SpectralOptions {
                power_iters: 2,
                seed,
                ..opts_rand()
            };
            let (rd, _) = spectral_stats(&a, m, n, f64::NAN, &o).unwrap();
            let mut w: f64 = 0.0;
            for i in 0..5 {
                assert!(rd.sigmas[i] <= ex.sigmas[i] * (1.0 + 1e-6));
                w = w.max(1.0 - rd.sigmas[i] / ex.sigmas[i]);
            }
            worst.push(w);
        }
        worst.sort_by(|a, b| a.total_cmp(b));
        assert!(worst[10] < 5e-3 && worst[20] < 0.03, "{worst:?}");
    }

    #[test]
    fn randomized_flat_spectrum_600x400_is_a_lower_bound() {
        // A flat spectrum is the hard case for a 17-column sketch: σ̂ are lower bounds a few % low
        // (measured worst top-5 error over 5 seeds, q = 2: 6.4% for σ linear 1 → 0.5, 7.3% for a
        // Gaussian matrix; q = 8, p = 32 is needed for ~1%). sr is then an upper bound.
        let (m, n) = (600, 400);
        let sig: Vec<f64> = (0..n).map(|i| 1.0 - 0.5 * i as f64 / n as f64).collect();
        for a in [construct(m, n, &sig, 5), rand_matrix(m, n, 11)] {
            let fro2 = fro2_of(&a);
            let (ex, _) = spectral_stats(&a, m, n, fro2, &opts_exact()).unwrap();
            let o = SpectralOptions {
                power_iters: 2,
                ..opts_rand()
            };
            let (rd, _) = spectral_stats(&a, m, n, fro2, &o).unwrap();
            for i in 0..5 {
                assert!(rd.sigmas[i] <= ex.sigmas[i] * (1.0 + 1e-6));
                assert!(
                    close(rd.sigmas[i], ex.sigmas[i], 0.1),
                    "{i}: {} {}",
                    rd.sigmas[i],
                    ex.sigmas[i]
                );
            }
            assert!(
                rd.stable_rank >= ex.stable_rank * (1.0 - 1e-6)
                    && rd.stable_rank < 1.25 * ex.stable_rank
            );
            // The Hutchinson tail dominates Σσ⁴ here; the estimate is unbiased (checked over 200
            // seeds: mean error 6e-5 ± 1.5e-3, sd 2.1% = the reported rse).
            let err = (rd.participation_ratio / ex.participation_ratio - 1.0).abs();
            assert!(
                err < 4.0 * rd.participation_ratio_rse && rd.participation_ratio_rse < 0.05,
                "{err} {}",
                rd.participation_ratio_rse
            );
        }
    }

    #[test]
    fn randomized_is_reproducible_and_thread_independent() {
        let (m, n) = (300, 700);
        let a = rand_matrix(m, n, 21);
        let fro2 = fro2_of(&a);
        let o = SpectralOptions {
            exact_max_dim: 16,
            ..SpectralOptions::default()
        };
        let (s1, t1) = spectral_stats(&a, m, n, fro2, &o).unwrap();
        let (s2, t2) = spectral_stats(&a, m, n, fro2, &o).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let o2 = SpectralOptions {
            par: Par::rayon(2),
            ..o
        };
        let (s3, t3) = pool.install(|| spectral_stats(&a, m, n, fro2, &o2).unwrap());
        let bits = |s: &SpectralStats, t: &TopSvd| {
            let mut v: Vec<u64> = s.sigmas.iter().map(|x| x.to_bits()).collect();
            v.push(s.participation_ratio.to_bits());
            v.push(s.participation_ratio_rse.to_bits());
            v.extend(
                t.u.col_iter()
                    .flat_map(|c| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
            );
            v.extend(
                t.v.col_iter()
                    .flat_map(|c| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
            );
            v
        };
        assert_eq!(bits(&s1, &t1), bits(&s2, &t2));
        assert_eq!(bits(&s1, &t1), bits(&s3, &t3));
        let o4 = SpectralOptions { seed: 1234, ..o };
        let (s4, _) = spectral_stats(&a, m, n, fro2, &o4).unwrap();
        assert_ne!(
            s1.participation_ratio.to_bits(),
            s4.participation_ratio.to_bits()
        );
        assert!(close(s1.sigma1, s4.sigma1, 0.05));
    }

    #[test]
    fn randomized_low_rank_and_extreme_scales() {
        let (m, n) = (200, 150);
        let o = SpectralOptions {
            exact_max_dim: 0,
            ..SpectralOptions::default()
        };
        // Rank 2: the sketch spans the range exactly; trailing σ are f32 noise.
        let a = construct(m, n, &[3.0, 1.0], 8);
        let (st, top) = spectral_stats(&a, m, n, f64::NAN, &o).unwrap();
        assert!(close(st.sigmas[0], 3.0, 1e-6) && close(st.sigmas[1], 1.0, 1e-6));
        assert!(st.sigmas[2] < 1e-5);
        assert!(
            close(st.participation_ratio, 100.0 / 82.0, 1e-5),
            "{}",
            st.participation_ratio
        );
        let (_, oe) = residuals(&a, m, n, &top);
        assert!(oe < 1e-10);
        // Entries near the top and the bottom of the f32 range: no overflow, same relative answer.
        for scale in [1e36f32, 1e-30] {
            let b: Vec<f32> = a.iter().map(|&x| x * scale).collect();
            for oo in [o, opts_exact()] {
                let (sb, _) = spectral_stats(&b, m, n, f64::NAN, &oo).unwrap();
                assert!(
                    close(sb.sigma1 / scale as f64, 3.0, 1e-5),
                    "{scale} {}",
                    sb.sigma1
                );
                assert!(close(sb.stable_rank, st.stable_rank, 1e-4));
            }
        }
    }

    #[test]
    fn top_svd_agrees_between_modes() {
        let (m, n) = (120, 90);
        let sig: Vec<f64> = (0..n).map(|i| 0.7f64.powi(i as i32)).collect();
        let a = construct(m, n, &sig, 17);
        let e = top_svd(&a, m, n, 4, &opts_exact()).unwrap();
        let r = top_svd(&a, m, n, 4, &opts_rand()).unwrap();
        assert_eq!((e.method, r.method), ("exact", "randomized"));
        assert_eq!(
            (e.s.len(), r.s.len(), e.u.ncols(), r.v.ncols()),
            (4, 4, 4, 4)
        );
        for side in [Side::Left, Side::Right] {
            let ov = subspace_overlap(&e, &r, side, 4).unwrap();
            assert!(ov.overlap > 1.0 - 1e-8, "{ov:?}");
        }
    }

    fn topsvd_from(u: Mat<f64>, s: Vec<f64>) -> TopSvd {
        let k = u.ncols();
        TopSvd {
            u,
            s,
            v: Mat::zeros(3, k),
            method: "exact",
        }
    }

    #[test]
    fn principal_angles_basis_invariance_and_identity() {
        let (dim, k) = (60, 6);
        let u0 = rand_orth(dim, k, 1);
        let ut = rand_orth(dim, k, 2);
        let q = rand_orth(k, k, 3);
        let utq = &ut * &q;
        let u0q = &u0 * &q;
        let s = vec![1.0; k];
        let a = subspace_overlap(
            &topsvd_from(u0.clone(), s.clone()),
            &topsvd_from(ut.clone(), s.clone()),
            Side::Left,
            k,
        )
        .unwrap();
        let b = subspace_overlap(
            &topsvd_from(u0.clone(), s.clone()),
            &topsvd_from(utq, s.clone()),
            Side::Left,
            k,
        )
        .unwrap();
        let c = subspace_overlap(
            &topsvd_from(u0q, s.clone()),
            &topsvd_from(ut.clone(), s.clone()),
            Side::Left,
            k,
        )
        .unwrap();
        for i in 0..k {
            assert!(
                (a.sines[i] - b.sines[i]).abs() < 1e-12 && (a.sines[i] - c.sines[i]).abs() < 1e-12
            );
        }
        assert!((a.overlap - b.overlap).abs() < 1e-12);
        let same = subspace_overlap(
            &topsvd_from(u0.clone(), s.clone()),
            &topsvd_from(u0.clone(), s.clone()),
            Side::Left,
            k,
        )
        .unwrap();
        assert!(
            (same.overlap - 1.0).abs() < 1e-14
                && same.projection_distance < 1e-7
                && same.max_angle < 1e-7
        );
        // cos² + sin² = 1 after sorting; projection distance both ways.
        let (cos, sin) = cos_sin(u0.as_ref(), ut.as_ref()).unwrap();
        for i in 0..k {
            assert!((cos[i] * cos[i] + sin[i] * sin[i] - 1.0).abs() < 1e-12);
        }
        let p = &u0 * u0.transpose() - &ut * ut.transpose();
        let pd = p.norm_l2();
        let sum_sin2: f64 = a.sines.iter().map(|x| x * x).sum();
        assert!(
            close(a.projection_distance, pd, 1e-10)
                && close(a.projection_distance, (2.0 * sum_sin2).sqrt(), 1e-14)
        );
        let c2: f64 = cos.iter().map(|x| x * x).sum::<f64>() / k as f64;
        assert!((a.overlap - c2).abs() < 1e-12);
        let ctu = u0.transpose() * &ut;
        assert!((a.overlap - ctu.squared_norm_l2() / k as f64).abs() < 1e-12);
        assert!(a.sines.windows(2).all(|w| w[0] <= w[1]));
        let g: f64 = a.sines.iter().map(|s| s.asin().powi(2)).sum::<f64>().sqrt();
        assert!(close(a.grassmann_distance, g, 1e-9));
    }

    #[test]
    fn principal_angles_tiny_rotation() {
        let (dim, k) = (50, 5);
        let theta: f64 = 1e-9;
        let basis = rand_orth(dim, k + 1, 4);
        let u0 = basis.subcols(0, k).to_owned();
        let mut ut = u0.clone();
        for i in 0..dim {
            ut[(i, 0)] = theta.cos() * basis[(i, 0)] + theta.sin() * basis[(i, k)];
        }
        let s = vec![2.0, 1.0, 1.0, 1.0, 1.0, 0.5];
        let ov = subspace_overlap(
            &topsvd_from(u0.clone(), s.clone()),
            &topsvd_from(ut.clone(), s.clone()),
            Side::Left,
            k,
        )
        .unwrap();
        assert!(close(ov.sines[k - 1], theta, 1e-3), "{:?}", ov.sines);
        assert!(ov.sines[..k - 1].iter().all(|&x| x < 1e-14));
        assert!(close(ov.max_angle, theta, 1e-3));
        // The cosine route cannot see it.
        let (cos, _) = cos_sin(u0.as_ref(), ut.as_ref()).unwrap();
        assert!(cos.iter().all(|&c| c.acos() < 1e-7 && c.acos() != theta));
        // A large angle (π/2 − 1e-9) is read through the cosine.
        let phi = std::f64::consts::FRAC_PI_2 - 1e-9;
        for i in 0..dim {
            ut[(i, 0)] = phi.cos() * basis[(i, 0)] + phi.sin() * basis[(i, k)];
        }
        let ov = subspace_overlap(
            &topsvd_from(u0, s.clone()),
            &topsvd_from(ut, s),
            Side::Left,
            k,
        )
        .unwrap();
        assert!((ov.max_angle - phi).abs() < 1e-15, "{}", ov.max_angle - phi);
    }

    #[test]
    fn random_subspaces_overlap_is_k_over_dim() {
        let (dim, k, trials) = (40, 4, 300);
        let s = vec![1.0; k];
        let mut mean = 0.0;
        for t in 0..trials {
            let a = topsvd_from(rand_orth(dim, k, 1000 + 2 * t), s.clone());
            let b = topsvd_from(rand_orth(dim, k, 1001 + 2 * t), s.clone());
            mean += subspace_overlap(&a, &b, Side::Left, k)
                .unwrap()
                .excess_overlap;
        }
        mean /= trials as f64;
        // E(Ω) = k/dim = 0.1; the sd of one Ω is ≈ 0.05, so the mean of 300 is within ~0.003.
        assert!(mean.abs() < 0.012, "{mean}");
    }

    #[test]
    fn gap_ratios_on_constructed_spectrum() {
        let (m, n) = (30, 20);
        let sig = [5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5];
        let a = construct(m, n, &sig, 31);
        let b = construct(m, n, &[6.0, 3.0, 2.5, 1.0], 32);
        let o = SpectralOptions {
            k: 3,
            ..opts_exact()
        };
        let (_, ta) = spectral_stats(&a, m, n, f64::NAN, &o).unwrap();
        let (_, tb) = spectral_stats(&b, m, n, f64::NAN, &o).unwrap();
        assert_eq!(ta.s.len(), 4);
        let ov = subspace_overlap(&ta, &tb, Side::Right, 3).unwrap();
        assert!(
            close(ov.gap_ratio_base, 2.0 / 3.0, 1e-6) && close(ov.gap_ratio_ckpt, 1.0 / 2.5, 1e-6)
        );
        assert_eq!((ov.k, ov.dim), (3, 20));
        let ov2 = subspace_overlap(&ta, &tb, Side::Left, 2).unwrap();
        assert!(
            close(ov2.gap_ratio_base, 0.75, 1e-6) && close(ov2.gap_ratio_ckpt, 2.5 / 3.0, 1e-6)
        );
        // k = 4: σ₅ not computed → NaN gap, angles still defined.
        let ov4 = subspace_overlap(&ta, &tb, Side::Left, 4).unwrap();
        assert!(ov4.gap_ratio_base.is_nan() && ov4.overlap.is_finite());
        assert!(subspace_overlap(&ta, &tb, Side::Left, 5).is_err());
        assert!(subspace_overlap(&ta, &tb, Side::Left, 0).is_err());
        // Rank 4 < k+1 = 5 on b with k = 4 beyond its rank: σ₅ = 0 in exact mode.
        let o5 = SpectralOptions {
            k: 5,
            ..opts_exact()
        };
        let (_, tb5) = spectral_stats(&b, m, n, f64::NAN, &o5).unwrap();
        let (_, ta5) = spectral_stats(&a, m, n, f64::NAN, &o5).unwrap();
        let ov5 = subspace_overlap(&ta5, &tb5, Side::Left, 5).unwrap();
        assert!(ov5.overlap.is_nan() || tb5.s[4] > 0.0);
    }

    #[test]
    fn edge_cases() {
        for o in [opts_exact(), opts_rand()] {
            // Zero matrix.
            let z = vec![0f32; 12 * 7];
            let (st, top) = spectral_stats(&z, 12, 7, 0.0, &o).unwrap();
            assert_eq!(st.sigma1, 0.0);
            assert!(
                st.stable_rank.is_nan()
                    && st.participation_ratio.is_nan()
                    && st.erank.is_nan()
                    && st.erank2.is_nan()
            );
            let ov = subspace_overlap(&top, &top, Side::Left, 3).unwrap();
            assert!(ov.overlap.is_nan() && ov.sines.iter().all(|x| x.is_nan()));
            // Non-finite input, with fro2 computed here or given (wrongly) by the caller.
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut a = rand_matrix(12, 7, 1);
                a[17] = bad;
                for fro2 in [f64::NAN, 3.0] {
                    let (st, top) = spectral_stats(&a, 12, 7, fro2, &o).unwrap();
                    assert!(
                        st.sigma1.is_nan()
                            && st.stable_rank.is_nan()
                            && st.participation_ratio.is_nan()
                    );
                    assert!(st.erank.is_nan() && st.sigmas.iter().all(|x| x.is_nan()));
                    assert!(top.s.iter().all(|x| x.is_nan()));
                }
                let t = top_svd(&a, 12, 7, 3, &o).unwrap();
                assert!(t.s.iter().all(|x| x.is_nan()));
            }
            // Vectors.
            for (m, n) in [(1, 9), (9, 1), (1, 1)] {
                let a = rand_matrix(m, n, 5);
                let (st, top) = spectral_stats(&a, m, n, f64::NAN, &o).unwrap();
                assert!(close(st.sigma1, fro2_of(&a).sqrt(), 1e-6));
                assert!(
                    close(st.stable_rank, 1.0, 1e-6) && close(st.participation_ratio, 1.0, 1e-6)
                );
                assert_eq!(top.s.len(), 1);
            }
            // Empty.
            for (m, n) in [(0, 5), (5, 0), (0, 0)] {
                let (st, top) = spectral_stats(&[], m, n, f64::NAN, &o).unwrap();
                assert_eq!(st.sigma1, 0.0);
                assert!(st.stable_rank.is_nan() && st.sigmas.is_empty() && top.s.is_empty());
                assert!(subspace_overlap(&top, &top, Side::Left, 1).is_err());
            }
            // Bad arguments.
            assert!(spectral_stats(&[1.0; 5], 2, 3, f64::NAN, &o).is_err());
            assert!(spectral_stats(&[1.0; 6], 2, 3, -1.0, &o).is_err());
            assert!(top_svd(&[1.0; 6], usize::MAX, 2, 1, &o).is_err());
            // k larger than the matrix.
            let a = rand_matrix(4, 3, 2);
            let big = SpectralOptions { k: 50, ..o };
            let (st, top) = spectral_stats(&a, 4, 3, f64::NAN, &big).unwrap();
            assert_eq!(top.s.len(), 3);
            assert!(st.sigma1 > 0.0);
            assert_eq!(top_svd(&a, 4, 3, 0, &o).unwrap().s.len(), 0);
            let bare = SpectralOptions {
                k: 0,
                oversample: 0,
                probes: 0,
                ..o
            };
            let (st, top) = spectral_stats(&a, 4, 3, f64::NAN, &bare).unwrap();
            assert_eq!(top.s.len(), 1);
            assert!(st.sigma1 > 0.0 && st.participation_ratio >= 1.0 - 1e-9);
            assert!(st.participation_ratio_rse.is_nan() == (st.method == "randomized"));
        }
        let mismatched = topsvd_from(rand_orth(10, 2, 1), vec![1.0, 1.0]);
        let other = topsvd_from(rand_orth(11, 2, 1), vec![1.0, 1.0]);
        assert!(subspace_overlap(&mismatched, &other, Side::Left, 2).is_err());
    }

    #[test]
    fn stats_serialize() {
        let a = rand_matrix(5, 4, 3);
        let (st, _) = spectral_stats(&a, 5, 4, f64::NAN, &opts_exact()).unwrap();
        let js = serde_json::to_string(&st).unwrap();
        assert!(js.contains("\"method\":\"exact\""));
    }

    #[test]
    fn values_only_equals_full_stats() {
        for &(m, n) in &[(40usize, 25usize), (25, 40), (700, 600)] {
            let a: Vec<f32> = (0..m * n)
                .map(|i| (i as f32 * 0.618).sin() + (i % 7) as f32 * 0.1)
                .collect();
            let opts = SpectralOptions::default();
            let (full, _) = spectral_stats(&a, m, n, f64::NAN, &opts).unwrap();
            let vals = spectral_values(&a, m, n, f64::NAN, &opts).unwrap();
            assert_eq!(full.method, vals.method);
            for (x, y) in [
                (full.sigma1, vals.sigma1),
                (full.stable_rank, vals.stable_rank),
                (full.participation_ratio, vals.participation_ratio),
            ] {
                assert!((x - y).abs() <= 1e-12 * x.abs(), "{m}x{n}: {x} vs {y}");
            }
            if full.method == "exact" {
                assert!((full.erank - vals.erank).abs() <= 1e-12 * full.erank);
            }
        }
    }
}
