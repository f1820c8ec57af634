//! `linear_cka`, `rbf_cka`: Centered Kernel Alignment between two representations of the same
//! examples, exact single-pass streaming accumulators, minibatch CKA, a layer × layer matrix, and
//! two "collapse" companions (`mean_pairwise_cosine`, `covariance_participation_ratio`).
//!
//! # Formulas (METRICS.md §2)
//!
//! X `[n, p]` and Y `[n, q]` hold the **same n examples** as rows. K = XXᵀ, L = YYᵀ (linear) and
//! H = I − 11ᵀ/n.
//! - **Biased (HSIC₀)** `CKA = tr(KHLH) / √(tr(KHKH)·tr(LHLH))`. In feature space, with column-centred
//!   X_c, Y_c: `CKA = ‖Y_cᵀX_c‖_F² / (‖X_cᵀX_c‖_F·‖Y_cᵀY_c‖_F)`, in [0, 1].
//! - **Debiased (unbiased HSIC₁, Song et al. 2012)**: K, L are U-centred (Székely & Rizzo 2014:
//!   zero the diagonal, `m = colsum/(n−2)`, `m −= Σm/(2(n−1))`, subtract m from rows and columns,
//!   zero the diagonal) and `CKA = ⟨K_U, L_U⟩/(‖K_U‖·‖L_U‖)`; n(n−3)·HSIC₁ = ⟨K_U, L_U⟩. Needs
//!   n ≥ 4; can be negative.
//! - **Streaming (§2.2)**: from raw features, with a_i = ‖x_i‖², b_i = ‖y_i‖², accumulate n,
//!   s_x = Σx_i, s_y, S_xy = XᵀY, S_xx, S_yy, A = Σa_i, B = Σb_i, Σa_ib_i, Σa_i², Σb_i²,
//!   u = Σa_i y_i, w = Σb_i x_i, v_x = Σa_i x_i, v_y = Σb_i y_i. Biased: C = S − s sᵀ/n and the
//!   feature formula. Debiased: `n(n−3)·HSIC₁ = T₁ + T₂T₃/((n−1)(n−2)) − 2T₄/(n−2)` with
//!   T₁ = ‖S_xy‖² − Σa_ib_i, T₂ = ‖s_x‖² − A, T₃ = ‖s_y‖² − B,
//!   T₄ = s_xᵀS_xy s_y − s_y·u − s_x·w + Σa_ib_i (and the same for the pairs (X,X), (Y,Y)).
//! - **RBF** (reference code `gram_rbf`): `d_ij = ‖x_i − x_j‖²`,
//!   `K = exp(−d/(2τ²·median(d)))`, the median taken over **all n² entries of d, including the n
//!   zero diagonal entries, of squared distances** (numpy's median: the mean of the two middle
//!   values when n² is even). τ is the "fraction of the median distance" (demo: 0.5).
//! - **Minibatch (Nguyen, Raghu & Kornblith 2021)**: per batch b of n_b rows,
//!   `h_xy += ⟨K_U^b, L_U^b⟩/(n_b(n_b−3))` (and h_xx, h_yy); `CKA_mb = h_xy/√(h_xx·h_yy)`. The
//!   reference code omits the weight 1/(n_b(n_b−3)), which cancels only for equal batch sizes.
//! - **Collapse companions (§2.3, ours)**: mean pairwise cosine
//!   `(‖Σx̂_i‖² − Σ‖x̂_i‖²)/(m(m−1))` over the m non-zero rows x̂_i = x_i/‖x_i‖; participation
//!   ratio `(tr C)²/‖C‖_F²` of the centred covariance C.
//!
//! Sources: Kornblith, Norouzi, Lee & Hinton, ICML 2019, and the reference notebook
//! `google-research/representation_similarity/Demo.ipynb`; Nguyen et al., ICLR 2021,
//! `do_wide_and_deep_networks_learn_the_same_things/efficient_CKA.py`; METRICS.md §2 (the
//! streaming identities are ours, verified there).
//!
//! # Conventions
//! - Inputs are row-major [`Rows`] views over `f32` or `f64` data; nothing is copied whole: the
//!   kernels read panels of rows (or columns) and convert them as they go.
//! - Every sum, dot product and GEMM accumulator is f64. The GEMMs run either in f64
//!   ([`Precision::F64`]) or as f32 GEMMs over panels of at most [`CkaOptions::panel`] rows
//!   (features, for the Gram form) whose results are added into f64 ([`Precision::Mixed`]).
//!   Before a panel is rounded to f32 it is shifted by a per-column reference (the exact column
//!   means in the one-shot functions, the first batch's means in [`StreamingCka`]), so the f32
//!   GEMM never sees a large common offset; the per-row norms a_i, b_i are taken from the values
//!   the GEMM sees. [`Precision::Auto`] (the default) runs Mixed when both inputs are f32 and the
//!   panel is at least 64 deep, F64 otherwise.
//! - Biased CKA needs n ≥ 2 examples, debiased n ≥ 4: fewer is a [`crate::Error::Config`] in the
//!   one-shot functions and NaN from the accumulators. A NaN or infinite input value is a
//!   `Config` error. A zero or negative self-similarity (constant features; debiased
//!   denominators ≤ 0) gives NaN, never a panic; [`CkaParts::is_degenerate`] flags it.
//! - Our own reductions combine per-column (or per-chunk) partial sums in a fixed order, and
//!   faer's GEMMs split the output, not the contraction: results are bit-identical for 1 and 2
//!   threads (tested). The AVX2 and portable panel kernels are bit-identical too (no FMA, same
//!   lane order).
//!
//! # Mixed precision: how, and what it costs in accuracy
//! A panel of k ≤ [`CkaOptions::panel`] examples is shifted, rounded to f32 (`f32(f64(x) − c)`)
//! and stored feature-major (`[p, k]`, the contraction index contiguous: faer's f32 GEMM runs
//! about 1.7× faster in that layout than on row-major `[k, p]` operands); f32 GEMMs give the
//! panel's XᵀY and the lower triangles of XᵀX and YᵀY, which are added into the f64
//! accumulators. The result is the exact f64 computation on the shifted data rounded to f32
//! (≤ 2⁻²⁴ relative per element), plus the f32 summation error inside each panel (faer sums in
//! registers over blocks of the contraction, then into its f32 output). The shift stays in f64:
//! an f32-representable shift would leave large-offset columns on the coarse grid of ulp(x), where
//! faer's f32 GEMM was measured to round with a systematic bias (3e-7 instead of 3e-8 below).
//!
//! Relative error against the F64 path, measured: 16384 × 4096 random pairs, panel 4096:
//! 8e-9 (biased) and 1e-8 (debiased); n = 3000 with column offsets up to 3840σ: ≤ 3e-8; the
//! adversarial case of a few "massive activation" columns 300× the rest, which dominate
//! ‖XᵀX‖_F so that the per-entry f32 error is not averaged out: 2.5e-7 (feature form; 4e-8
//! with panel 256, 4e-8 in the Gram form). Tests assert ≤ 1e-6. Errors are relative to the scale
//! of the centred products: a CKA value that is itself ≈ 0 (debiased CKA of independent data) has
//! a small absolute, not relative, error. Use [`Precision::F64`] when that is not enough.
//!
//! # Speed (measured, `examples/cka_speed.rs`; 2 threads, AVX-512 machine, shared)
//! Feature form, X, Y 16384 × 4096 f32: Mixed 4.8–5.0 s = 219–228 GFLOP/s executed
//! (n(p+q)² = 1.1 TFLOP) = 88–92% of faer's f32 GEMM rate on the same shapes in its fastest
//! layout (243–252 GFLOP/s), measured interleaved in the same run; F64 path 46% of that rate
//! (faer's f64 GEMM: 47–48%). Gram form, n = p = 4096: Mixed 86% of the f32 GEMM rate.
//!
//! # Memory
//! Feature form and [`StreamingCka`]: 8(pq + p² + q²) bytes of f64 accumulators (the symmetric
//! ones stored square, lower triangle used), an f32 GEMM scratch of 4·max(pq, p², q²) bytes, and
//! panels of 4·panel·(p + q) bytes (Mixed) or 8·1024·(p + q) (F64). Gram form: two packed
//! triangles of 4n(n+1) bytes each, one n × n GEMM scratch, one n × panel feature panel.
//!
//! # Complexity
//! Feature form: O(n(p² + q² + pq)) time (the symmetric products are computed as lower
//! triangles, so n(p+q)² flops in all), O(p² + q² + pq) f64 memory. Gram form: O(n²(p + q)) time
//! (n²(p+q) flops), O(n²) memory (packed lower triangles). [`linear_cka`] picks the feature form
//! when p + q ≤ n. RBF is Gram-form only. Minibatch: the cheaper form per batch.

mod engine;
mod gram;

use engine::{
    add_rank2, all_finite, bilinear, bilinear_lower, build_panel_t, cfg, col_means, dot,
    first_nonfinite_row, grow, matvec, matvec_lower, matvec_t, par_for, sq_norm_rank1,
    sq_norm_rank1_lower, trace_rank1, vec_stats_t, zeros, Elem,
};
use gram::{linear_gram, Packed};

use crate::error::Result;

// ------------------------------------------------------------------------------------------
// Inputs and options
// ------------------------------------------------------------------------------------------

/// The element data of a [`Rows`] view.
#[derive(Debug, Clone, Copy)]
pub enum RowData<'a> {
    /// Single precision (activations as captured).
    F32(&'a [f32]),
    /// Double precision.
    F64(&'a [f64]),
}

impl RowData<'_> {
    fn len(&self) -> usize {
        match self {
            RowData::F32(d) => d.len(),
            RowData::F64(d) => d.len(),
        }
    }
}

/// A row-major matrix `[n, p]`: n examples (rows) of p features, borrowed, f32 or f64.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: RowData<'a>,
    n: usize,
    p: usize,
}

impl<'a> Rows<'a> {
    /// View `data` as `[n, p]`, row-major. Errors when `data.len() ≠ n·p` or `p = 0`.
    pub fn new(data: RowData<'a>, n: usize, p: usize) -> Result<Self> {
        if p == 0 {
            return Err(cfg("a representation needs at least one feature (p ≥ 1)"));
        }
        let len = n
            .checked_mul(p)
            .ok_or_else(|| cfg(format!("shape [{n}, {p}] overflows")))?;
        if data.len() != len {
            return Err(cfg(format!(
                "data has {} elements but the shape [{n}, {p}] needs {len}",
                data.len()
            )));
        }
        Ok(Rows { data, n, p })
    }

    /// View an f32 slice as `[n, p]`.
    pub fn f32(data: &'a [f32], n: usize, p: usize) -> Result<Self> {
        Self::new(RowData::F32(data), n, p)
    }

    /// View an f64 slice as `[n, p]`.
    pub fn f64(data: &'a [f64], n: usize, p: usize) -> Result<Self> {
        Self::new(RowData::F64(data), n, p)
    }

    /// Number of examples (rows).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of features (columns).
    pub fn p(&self) -> usize {
        self.p
    }

    /// The underlying data.
    pub fn data(&self) -> RowData<'a> {
        self.data
    }

    /// Whether the data is f64.
    pub fn is_f64(&self) -> bool {
        matches!(self.data, RowData::F64(_))
    }

    /// Rows `start..end` as a view of their own.
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<Rows<'a>> {
        if start > end || end > self.n {
            return Err(cfg(format!(
                "row range {start}..{end} out of bounds for {} rows",
                self.n
            )));
        }
        let (a, b) = (start * self.p, end * self.p);
        let data = match self.data {
            RowData::F32(d) => RowData::F32(&d[a..b]),
            RowData::F64(d) => RowData::F64(&d[a..b]),
        };
        Ok(Rows {
            data,
            n: end - start,
            p: self.p,
        })
    }

    fn col_means(&self) -> Vec<f64> {
        match self.data {
            RowData::F32(d) => col_means(d, self.n, self.p),
            RowData::F64(d) => col_means(d, self.n, self.p),
        }
    }

    /// Error unless every value is finite.
    fn check_finite(&self, name: &str) -> Result<()> {
        let ok = match self.data {
            RowData::F32(d) => all_finite(d),
            RowData::F64(d) => all_finite(d),
        };
        if ok {
            Ok(())
        } else {
            Err(self.nonfinite_error(name))
        }
    }

    fn nonfinite_error(&self, name: &str) -> crate::Error {
        let row = match self.data {
            RowData::F32(d) => first_nonfinite_row(d, self.p),
            RowData::F64(d) => first_nonfinite_row(d, self.p),
        };
        cfg(format!(
            "{name} holds a NaN or infinite value (row {}); CKA needs finite activations",
            row.unwrap_or(0)
        ))
    }

    /// Column means, checking finiteness on the way (a non-finite value makes its column's
    /// mean non-finite).
    fn means_checked(&self, name: &str) -> Result<Vec<f64>> {
        let m = self.col_means();
        if m.iter().all(|v| v.is_finite()) {
            Ok(m)
        } else {
            Err(self.nonfinite_error(name))
        }
    }

    /// Same data, same shape (used to reuse work when a layer appears on both sides).
    fn same_as(&self, o: &Rows<'_>) -> bool {
        let ptr = |d: RowData<'_>| match d {
            RowData::F32(s) => (s.as_ptr() as usize, 4),
            RowData::F64(s) => (s.as_ptr() as usize, 8),
        };
        self.n == o.n && self.p == o.p && ptr(self.data) == ptr(o.data)
    }
}

/// Arithmetic of the GEMMs (every accumulator is f64 in all modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// `Mixed` when both inputs are f32 and the panel is at least 64 deep, `F64` otherwise.
    #[default]
    Auto,
    /// f64 GEMMs (faer), accumulating straight into the f64 accumulators.
    F64,
    /// f32 GEMMs over panels of at most [`CkaOptions::panel`] rows (or feature columns), each
    /// panel's result added into the f64 accumulators; inputs are shifted (centred) before they
    /// are rounded to f32.
    Mixed,
}

/// Which space the linear kernel is computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// The cheaper of the two: feature form when p + q ≤ n, Gram form otherwise.
    #[default]
    Auto,
    /// Feature space: XᵀY, XᵀX, YᵀY (cost n(p+q)², memory p² + q² + pq).
    Feature,
    /// Example space: n × n Gram matrices (cost n²(p+q), memory n²).
    Gram,
}

/// Options shared by the CKA kernels. `CkaOptions::default()` is what the plain functions use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CkaOptions {
    /// GEMM arithmetic. Default [`Precision::Auto`].
    pub precision: Precision,
    /// Feature or Gram form for the linear kernel. Default [`Form::Auto`].
    pub form: Form,
    /// Depth of one f32 panel in `Mixed` (rows in the feature form, feature columns in the Gram
    /// form): the length over which f32 sums run before they are added into f64. Default 4096
    /// ([`DEFAULT_PANEL`]).
    pub panel: usize,
    /// Bytes that [`cka_matrix_with`] may spend on cached Gram matrices before it splits the
    /// layers into groups (recomputing the `ys` Grams once per group). Default 4 GiB.
    pub memory_budget: usize,
}

/// Default [`CkaOptions::panel`].
pub const DEFAULT_PANEL: usize = 4096;
/// Panel rows of the F64 path (bounds the f64 copy of one panel; no accuracy role).
const F64_PANEL: usize = 1024;
/// Shallowest panel that `Precision::Auto` runs in f32.
const MIXED_MIN_DEPTH: usize = 64;

impl Default for CkaOptions {
    fn default() -> Self {
        CkaOptions {
            precision: Precision::Auto,
            form: Form::Auto,
            panel: DEFAULT_PANEL,
            memory_budget: 4 << 30,
        }
    }
}

/// Resolved GEMM arithmetic of one computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    F64,
    Mixed,
}

impl CkaOptions {
    fn mode(&self, any_f64: bool, depth: usize) -> Mode {
        match self.precision {
            Precision::F64 => Mode::F64,
            Precision::Mixed => Mode::Mixed,
            Precision::Auto if any_f64 || depth < MIXED_MIN_DEPTH => Mode::F64,
            Precision::Auto => Mode::Mixed,
        }
    }

    fn depth_for(&self, mode: Mode) -> usize {
        match mode {
            Mode::Mixed => self.panel.max(1),
            Mode::F64 => F64_PANEL,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.panel == 0 {
            return Err(cfg("panel depth must be ≥ 1"));
        }
        Ok(())
    }
}

/// The three similarity terms behind one CKA value.
///
/// Biased: `hsic_xy = tr(K_c L_c) = ‖C_xy‖_F²` (= (n−1)²·HSIC₀). Debiased:
/// `hsic_xy = ⟨K_U, L_U⟩` (= n(n−3)·HSIC₁). Likewise `hsic_xx`, `hsic_yy`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CkaParts {
    /// Cross term.
    pub hsic_xy: f64,
    /// Self term of X.
    pub hsic_xx: f64,
    /// Self term of Y.
    pub hsic_yy: f64,
    /// Number of examples.
    pub n: u64,
    /// Whether these are the unbiased (debiased) terms.
    pub debiased: bool,
}

impl CkaParts {
    fn nan(n: u64, debiased: bool) -> Self {
        CkaParts {
            hsic_xy: f64::NAN,
            hsic_xx: f64::NAN,
            hsic_yy: f64::NAN,
            n,
            debiased,
        }
    }

    /// `hsic_xy / √(hsic_xx·hsic_yy)`, or NaN when the value is undefined: too few examples
    /// (n < 2 biased, n < 4 debiased) or a self term ≤ 0 (constant features, or a debiased
    /// denominator that rounding drove to ≤ 0).
    pub fn value(&self) -> f64 {
        let min = if self.debiased { 4 } else { 2 };
        if self.n < min || !(self.hsic_xx > 0.0 && self.hsic_yy > 0.0) {
            return f64::NAN;
        }
        self.hsic_xy / (self.hsic_xx.sqrt() * self.hsic_yy.sqrt())
    }

    /// True when [`CkaParts::value`] is NaN (undefined CKA, see there).
    pub fn is_degenerate(&self) -> bool {
        self.value().is_nan()
    }
}

fn check_pair(x: &Rows<'_>, y: &Rows<'_>, debiased: bool) -> Result<()> {
    if x.n != y.n {
        return Err(cfg(format!(
            "X has {} rows but Y has {}: CKA compares representations of the same examples",
            x.n, y.n
        )));
    }
    let min = if debiased { 4 } else { 2 };
    if x.n < min {
        return Err(cfg(format!(
            "{} CKA needs at least {min} examples, got {}",
            if debiased { "debiased" } else { "biased" },
            x.n
        )));
    }
    Ok(())
}

fn feature_is_cheaper(n: usize, p: usize, q: usize) -> bool {
    p.saturating_add(q) <= n
}

// ------------------------------------------------------------------------------------------
// Streaming accumulators (feature form)
// ------------------------------------------------------------------------------------------

/// f64 accumulators of §2.2, relative to a per-column shift (x − c_x, y − c_y).
#[derive(Debug, Clone)]
struct State {
    cx: Vec<f64>,
    cy: Vec<f64>,
    sx: Vec<f64>,
    sy: Vec<f64>,
    /// S_xy, p × q column-major.
    sxy: Vec<f64>,
    /// S_xx, p × p, lower triangle.
    sxx: Vec<f64>,
    /// S_yy, q × q, lower triangle.
    syy: Vec<f64>,
    a: f64,
    b: f64,
    ab: f64,
    aa: f64,
    bb: f64,
    /// Σ a_i y_i (q).
    u: Vec<f64>,
    /// Σ b_i x_i (p).
    w: Vec<f64>,
    /// Σ a_i x_i (p).
    vx: Vec<f64>,
    /// Σ b_i y_i (q).
    vy: Vec<f64>,
}

impl State {
    /// Accumulators around the shift (c_x, c_y).
    fn new(cx: Vec<f64>, cy: Vec<f64>) -> Result<Self> {
        let (p, q) = (cx.len(), cy.len());
        let too_big = || cfg(format!("accumulators for p = {p}, q = {q} overflow"));
        let pq = p.checked_mul(q).ok_or_else(too_big)?;
        let pp = p.checked_mul(p).ok_or_else(too_big)?;
        let qq = q.checked_mul(q).ok_or_else(too_big)?;
        Ok(State {
            cx,
            cy,
            sx: vec![0.0; p],
            sy: vec![0.0; q],
            sxy: zeros(pq, "S_xy accumulator")?,
            sxx: zeros(pp, "S_xx accumulator")?,
            syy: zeros(qq, "S_yy accumulator")?,
            a: 0.0,
            b: 0.0,
            ab: 0.0,
            aa: 0.0,
            bb: 0.0,
            u: vec![0.0; q],
            w: vec![0.0; p],
            vx: vec![0.0; p],
            vy: vec![0.0; q],
        })
    }
}

/// Work buffers: never cloned, never compared.
#[derive(Default)]
struct Work {
    gemm: Vec<f32>,
    x32: Vec<f32>,
    y32: Vec<f32>,
    x64: Vec<f64>,
    y64: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
}

impl Clone for Work {
    fn clone(&self) -> Self {
        Work::default()
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Work")
    }
}

/// Exact single-pass accumulators for linear CKA, biased and debiased, over raw (uncentred)
/// features (METRICS.md §2.2).
///
/// Feed batches of the same examples of X `[n_b, p]` and Y `[n_b, q]` with
/// [`update`](Self::update); batches may have any size. [`biased`](Self::biased) and
/// [`debiased`](Self::debiased) equal full-data [`linear_cka`] on the concatenated batches (up to
/// rounding). Accumulators built on different parts of the data [`merge`](Self::merge) exactly.
///
/// Internally the features are shifted by the first batch's column means (fixed thereafter;
/// `merge` translates between shifts exactly), which keeps the f32 panels of
/// [`Precision::Mixed`] free of large offsets; the estimators are translation invariant.
/// Memory: 8(pq + p² + q²) bytes of f64 accumulators, allocated at the first non-empty batch.
#[derive(Debug, Clone)]
pub struct StreamingCka {
    p: usize,
    q: usize,
    opts: CkaOptions,
    n: u64,
    state: Option<Box<State>>,
    work: Work,
}

impl StreamingCka {
    /// Empty accumulator for X with p features and Y with q features (default options).
    pub fn new(p: usize, q: usize) -> Self {
        Self::with_options(p, q, CkaOptions::default())
    }

    /// Empty accumulator with explicit options (precision, panel depth).
    pub fn with_options(p: usize, q: usize, opts: CkaOptions) -> Self {
        StreamingCka {
            p,
            q,
            opts,
            n: 0,
            state: None,
            work: Work::default(),
        }
    }

    /// Examples seen so far.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Feature counts `(p, q)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.p, self.q)
    }

    /// Forget everything (keeps p, q, options and the work buffers).
    pub fn reset(&mut self) {
        self.n = 0;
        self.state = None;
    }

    /// Add a batch: rows of X `[n_b, p]` and Y `[n_b, q]`, the same examples in the same order.
    /// An empty batch is a no-op. Errors (state unchanged): shape mismatch, non-finite values.
    pub fn update(&mut self, x: Rows<'_>, y: Rows<'_>) -> Result<()> {
        self.opts.validate()?;
        if x.p != self.p || y.p != self.q {
            return Err(cfg(format!(
                "batch has p = {}, q = {} features but the accumulator was built for p = {}, q = {}",
                x.p, y.p, self.p, self.q
            )));
        }
        if x.n != y.n {
            return Err(cfg(format!(
                "X batch has {} rows but Y batch has {}: CKA compares the same examples",
                x.n, y.n
            )));
        }
        if x.n == 0 {
            return Ok(());
        }
        if self.state.is_none() {
            let (mx, my) = (x.means_checked("X")?, y.means_checked("Y")?);
            self.state = Some(Box::new(State::new(mx, my)?));
        } else {
            x.check_finite("X")?;
            y.check_finite("Y")?;
        }
        self.accumulate(x, y)
    }

    /// Accumulate with a given shift (the one-shot feature form passes the exact means).
    fn with_shift(&mut self, cx: Vec<f64>, cy: Vec<f64>) -> Result<()> {
        self.state = Some(Box::new(State::new(cx, cy)?));
        Ok(())
    }

    fn accumulate(&mut self, x: Rows<'_>, y: Rows<'_>) -> Result<()> {
        let any_f64 = x.is_f64() || y.is_f64();
        let mode = self
            .opts
            .mode(any_f64, x.n.min(self.opts.depth_for(Mode::Mixed)));
        let depth = self.opts.depth_for(mode).min(x.n);
        let st = self
            .state
            .as_mut()
            .expect("state initialised by the caller");
        let w = &mut self.work;
        match mode {
            Mode::F64 => accumulate_t::<f64>(
                st,
                x,
                y,
                depth,
                &mut w.x64,
                &mut w.y64,
                &mut w.a,
                &mut w.b,
                &mut w.gemm,
            )?,
            Mode::Mixed => accumulate_t::<f32>(
                st,
                x,
                y,
                depth,
                &mut w.x32,
                &mut w.y32,
                &mut w.a,
                &mut w.b,
                &mut w.gemm,
            )?,
        }
        self.n += x.n as u64;
        Ok(())
    }

    /// Add the statistics of `other` (built on other examples, same p and q). Exact: the result
    /// equals one accumulator fed both sets of batches, whatever the two shifts were.
    pub fn merge(&mut self, other: &Self) -> Result<()> {
        if other.p != self.p || other.q != self.q {
            return Err(cfg(format!(
                "cannot merge accumulators of p = {}, q = {} into p = {}, q = {}",
                other.p, other.q, self.p, self.q
            )));
        }
        let Some(o) = other.state.as_deref() else {
            return Ok(());
        };
        let Some(s) = self.state.as_deref_mut() else {
            self.state = other.state.clone();
            self.n = other.n;
            return Ok(());
        };
        merge_state(s, o, other.n as f64, self.p, self.q);
        self.n += other.n;
        Ok(())
    }

    /// The similarity terms (see [`CkaParts`]); all NaN before any data.
    pub fn parts(&self, debiased: bool) -> CkaParts {
        let Some(st) = self.state.as_deref() else {
            return CkaParts::nan(self.n, debiased);
        };
        let (p, q) = (self.p, self.q);
        let n = self.n as f64;
        if !debiased {
            return CkaParts {
                hsic_xy: sq_norm_rank1(&st.sxy, p, &st.sx, &st.sy, 1.0 / n),
                hsic_xx: sq_norm_rank1_lower(&st.sxx, p, &st.sx, 1.0 / n),
                hsic_yy: sq_norm_rank1_lower(&st.syy, q, &st.sy, 1.0 / n),
                n: self.n,
                debiased,
            };
        }
        if self.n < 4 {
            return CkaParts::nan(self.n, debiased);
        }
        let d1 = (n - 1.0) * (n - 2.0);
        let d2 = n - 2.0;
        let t2 = dot(&st.sx, &st.sx) - st.a;
        let t3 = dot(&st.sy, &st.sy) - st.b;
        let hxy = {
            let t1 = sq_norm_rank1(&st.sxy, p, &st.sx, &st.sy, 0.0) - st.ab;
            let t4 = bilinear(&st.sxy, p, &st.sx, &st.sy) - dot(&st.sy, &st.u) - dot(&st.sx, &st.w)
                + st.ab;
            t1 + t2 * t3 / d1 - 2.0 * t4 / d2
        };
        let hxx = {
            let t1 = sq_norm_rank1_lower(&st.sxx, p, &st.sx, 0.0) - st.aa;
            let t4 = bilinear_lower(&st.sxx, p, &st.sx) - 2.0 * dot(&st.sx, &st.vx) + st.aa;
            t1 + t2 * t2 / d1 - 2.0 * t4 / d2
        };
        let hyy = {
            let t1 = sq_norm_rank1_lower(&st.syy, q, &st.sy, 0.0) - st.bb;
            let t4 = bilinear_lower(&st.syy, q, &st.sy) - 2.0 * dot(&st.sy, &st.vy) + st.bb;
            t1 + t3 * t3 / d1 - 2.0 * t4 / d2
        };
        CkaParts {
            hsic_xy: hxy,
            hsic_xx: hxx,
            hsic_yy: hyy,
            n: self.n,
            debiased,
        }
    }

    /// Biased linear CKA of all data seen (NaN when n < 2 or a representation is constant).
    pub fn biased(&self) -> f64 {
        self.parts(false).value()
    }

    /// Debiased linear CKA (unbiased HSIC) of all data seen (NaN when n < 4 or a denominator
    /// is ≤ 0).
    pub fn debiased(&self) -> f64 {
        self.parts(true).value()
    }

    /// Participation ratio `(tr C)²/‖C‖_F²` of X's centred covariance (NaN before 2 examples or
    /// when X is constant).
    pub fn participation_ratio_x(&self) -> f64 {
        match self.state.as_deref() {
            Some(st) => pr(&st.sxx, self.p, &st.sx, self.n),
            None => f64::NAN,
        }
    }

    /// Participation ratio of Y's centred covariance.
    pub fn participation_ratio_y(&self) -> f64 {
        match self.state.as_deref() {
            Some(st) => pr(&st.syy, self.q, &st.sy, self.n),
            None => f64::NAN,
        }
    }
}

fn pr(s: &[f64], m: usize, sum: &[f64], n: u64) -> f64 {
    if n < 2 {
        return f64::NAN;
    }
    let c = 1.0 / n as f64;
    let tr = trace_rank1(s, m, sum, c);
    let fro = sq_norm_rank1_lower(s, m, sum, c);
    if fro > 0.0 {
        tr * tr / fro
    } else {
        f64::NAN
    }
}

#[allow(clippy::too_many_arguments)]
fn accumulate_t<T: Elem>(
    st: &mut State,
    x: Rows<'_>,
    y: Rows<'_>,
    depth: usize,
    xs: &mut Vec<T>,
    ys: &mut Vec<T>,
    av: &mut Vec<f64>,
    bv: &mut Vec<f64>,
    gemm: &mut Vec<f32>,
) -> Result<()> {
    let (n, p, q) = (x.n, x.p, y.p);
    grow(xs, depth * p)?;
    grow(ys, depth * q)?;
    grow(av, depth)?;
    grow(bv, depth)?;
    let par = par_for(depth as f64 * ((p + q) * (p + q)) as f64);
    for r0 in (0..n).step_by(depth) {
        let r1 = (r0 + depth).min(n);
        let k = r1 - r0;
        match x.data {
            RowData::F32(d) => build_panel_t(d, p, r0, r1, &st.cx, xs, av),
            RowData::F64(d) => build_panel_t(d, p, r0, r1, &st.cx, xs, av),
        }
        match y.data {
            RowData::F32(d) => build_panel_t(d, q, r0, r1, &st.cy, ys, bv),
            RowData::F64(d) => build_panel_t(d, q, r0, r1, &st.cy, ys, bv),
        }
        let (a, b) = (&av[..k], &bv[..k]);
        vec_stats_t(xs, k, a, b, &mut st.sx, &mut st.vx, &mut st.w);
        vec_stats_t(ys, k, a, b, &mut st.sy, &mut st.u, &mut st.vy);
        for (&ai, &bi) in a.iter().zip(b) {
            st.a += ai;
            st.b += bi;
            st.ab += ai * bi;
            st.aa += ai * ai;
            st.bb += bi * bi;
        }
        // Feature-major panels: xm = X_panelᵀ (p × k), ym = Y_panelᵀ (q × k).
        let xm = faer::MatRef::from_row_major_slice(&xs[..k * p], p, k);
        let ym = faer::MatRef::from_row_major_slice(&ys[..k * q], q, k);
        T::syrk_add(&mut st.sxx, xm, gemm, par)?;
        T::syrk_add(&mut st.syy, ym, gemm, par)?;
        T::gemm_add(&mut st.sxy, xm, ym.transpose(), gemm, par)?;
    }
    Ok(())
}

/// `s += o`, with o's statistics translated from its shift to s's: with δ = c_o − c_s
/// (and ε for y), x − c_s = (x − c_o) + δ, so a_i ↦ a_i + 2δ·x_i + |δ|², S_xy ↦ S_xy + s_x εᵀ +
/// δ s_yᵀ + n δεᵀ, and so on for every accumulator (expansions in the comments below).
fn merge_state(s: &mut State, o: &State, no: f64, p: usize, q: usize) {
    let d: Vec<f64> = o.cx.iter().zip(&s.cx).map(|(a, b)| a - b).collect();
    let e: Vec<f64> = o.cy.iter().zip(&s.cy).map(|(a, b)| a - b).collect();
    let dd = dot(&d, &d);
    let ee = dot(&e, &e);
    let dsx = dot(&d, &o.sx);
    let esy = dot(&e, &o.sy);
    let sxy_e = matvec(&o.sxy, p, &e); // S_xy ε (p)
    let sxyt_d = matvec_t(&o.sxy, p, &d); // S_xyᵀ δ (q)
    let d_sxy_e = dot(&d, &sxy_e);
    let sxx_d = matvec_lower(&o.sxx, p, &d);
    let syy_e = matvec_lower(&o.syy, q, &e);
    let d_sxx_d = dot(&d, &sxx_d);
    let e_syy_e = dot(&e, &syy_e);

    // Σa''b'' = Σ(a + 2δ·x + |δ|²)(b + 2ε·y + |ε|²), expanded.
    s.ab += o.ab
        + 2.0 * dot(&e, &o.u)
        + ee * o.a
        + 2.0 * dot(&d, &o.w)
        + 4.0 * d_sxy_e
        + 2.0 * ee * dsx
        + dd * o.b
        + 2.0 * dd * esy
        + no * dd * ee;
    s.aa += o.aa
        + 4.0 * dot(&d, &o.vx)
        + 2.0 * dd * o.a
        + 4.0 * d_sxx_d
        + 4.0 * dd * dsx
        + no * dd * dd;
    s.bb += o.bb
        + 4.0 * dot(&e, &o.vy)
        + 2.0 * ee * o.b
        + 4.0 * e_syy_e
        + 4.0 * ee * esy
        + no * ee * ee;
    s.a += o.a + 2.0 * dsx + no * dd;
    s.b += o.b + 2.0 * esy + no * ee;
    // Σa''y'' = Σ(a + 2δ·x + |δ|²)(y + ε).
    for j in 0..q {
        s.u[j] +=
            o.u[j] + o.a * e[j] + 2.0 * sxyt_d[j] + 2.0 * dsx * e[j] + dd * (o.sy[j] + no * e[j]);
        s.vy[j] +=
            o.vy[j] + o.b * e[j] + 2.0 * syy_e[j] + 2.0 * esy * e[j] + ee * (o.sy[j] + no * e[j]);
    }
    for i in 0..p {
        s.w[i] +=
            o.w[i] + o.b * d[i] + 2.0 * sxy_e[i] + 2.0 * esy * d[i] + ee * (o.sx[i] + no * d[i]);
        s.vx[i] +=
            o.vx[i] + o.a * d[i] + 2.0 * sxx_d[i] + 2.0 * dsx * d[i] + dd * (o.sx[i] + no * d[i]);
    }
    // S_xy'' = S_xy + s_x εᵀ + δ (s_y + n ε)ᵀ; S_xx'' = S_xx + s_x δᵀ + δ (s_x + n δ)ᵀ.
    let sy_ne: Vec<f64> = o.sy.iter().zip(&e).map(|(a, b)| a + no * b).collect();
    let sx_nd: Vec<f64> = o.sx.iter().zip(&d).map(|(a, b)| a + no * b).collect();
    add_rank2(&mut s.sxy, &o.sxy, p, false, &o.sx, &e, &d, &sy_ne);
    add_rank2(&mut s.sxx, &o.sxx, p, true, &o.sx, &d, &d, &sx_nd);
    add_rank2(&mut s.syy, &o.syy, q, true, &o.sy, &e, &e, &sy_ne);
    for (a, b) in s.sx.iter_mut().zip(&sx_nd) {
        *a += b;
    }
    for (a, b) in s.sy.iter_mut().zip(&sy_ne) {
        *a += b;
    }
}

// ------------------------------------------------------------------------------------------
// One-shot linear and RBF CKA
// ------------------------------------------------------------------------------------------

/// Linear CKA of X `[n, p]` and Y `[n, q]` (the same n examples), biased or debiased, by the
/// cheaper form (feature form when p + q ≤ n, Gram form otherwise), default options.
pub fn linear_cka(x: Rows<'_>, y: Rows<'_>, debiased: bool) -> Result<f64> {
    linear_cka_with(x, y, debiased, &CkaOptions::default())
}

/// Linear CKA in feature space: `‖Y_cᵀX_c‖²/(‖X_cᵀX_c‖·‖Y_cᵀY_c‖)` (biased) or the unbiased
/// HSIC terms of the same products (debiased).
pub fn linear_cka_feature(x: Rows<'_>, y: Rows<'_>, debiased: bool) -> Result<f64> {
    let opts = CkaOptions {
        form: Form::Feature,
        ..CkaOptions::default()
    };
    linear_cka_with(x, y, debiased, &opts)
}

/// Linear CKA in example space: centred (biased) or U-centred (debiased) n × n Gram matrices.
pub fn linear_cka_gram(x: Rows<'_>, y: Rows<'_>, debiased: bool) -> Result<f64> {
    let opts = CkaOptions {
        form: Form::Gram,
        ..CkaOptions::default()
    };
    linear_cka_with(x, y, debiased, &opts)
}

/// Linear CKA with explicit options.
pub fn linear_cka_with(x: Rows<'_>, y: Rows<'_>, debiased: bool, opts: &CkaOptions) -> Result<f64> {
    Ok(linear_cka_parts(x, y, debiased, opts)?.value())
}

/// The similarity terms behind [`linear_cka_with`] (see [`CkaParts`]).
pub fn linear_cka_parts(
    x: Rows<'_>,
    y: Rows<'_>,
    debiased: bool,
    opts: &CkaOptions,
) -> Result<CkaParts> {
    opts.validate()?;
    check_pair(&x, &y, debiased)?;
    let feature = match opts.form {
        Form::Feature => true,
        Form::Gram => false,
        Form::Auto => feature_is_cheaper(x.n, x.p, y.p),
    };
    if feature {
        feature_parts(x, y, debiased, opts)
    } else {
        gram_parts(x, y, debiased, opts, None)
    }
}

/// Feature form on validated input: the streaming accumulators with the exact column means as
/// shift (so the panels are centred before any rounding).
fn feature_parts(x: Rows<'_>, y: Rows<'_>, debiased: bool, opts: &CkaOptions) -> Result<CkaParts> {
    let mut s = StreamingCka::with_options(x.p, y.p, *opts);
    let (mx, my) = (x.means_checked("X")?, y.means_checked("Y")?);
    s.with_shift(mx, my)?;
    s.accumulate(x, y)?;
    Ok(s.parts(debiased))
}

/// Gram form on validated input; `tau` = Some for the RBF kernel.
fn gram_parts(
    x: Rows<'_>,
    y: Rows<'_>,
    debiased: bool,
    opts: &CkaOptions,
    tau: Option<f64>,
) -> Result<CkaParts> {
    let kx = kernel(x, debiased, opts, tau)?;
    let ky = kernel(y, debiased, opts, tau)?;
    let [hsic_xy, hsic_xx, hsic_yy] = kx.dots3(&ky);
    Ok(CkaParts {
        hsic_xy,
        hsic_xx,
        hsic_yy,
        n: x.n as u64,
        debiased,
    })
}

/// Centred (or U-centred) kernel matrix of one representation.
fn kernel(x: Rows<'_>, debiased: bool, opts: &CkaOptions, tau: Option<f64>) -> Result<Packed> {
    let mode = opts.mode(x.is_f64(), x.p.min(opts.depth_for(Mode::Mixed)));
    let mut k = linear_gram(x, &x.means_checked("X")?, mode, opts.depth_for(mode))?;
    if let Some(tau) = tau {
        k.make_rbf(tau);
    }
    k.centre(debiased);
    Ok(k)
}

/// RBF-kernel CKA: `K = exp(−‖x_i − x_j‖²/(2τ²·median))`, the median over all n² squared
/// distances including the zero diagonal (reference convention); Gram form. τ must be finite
/// and > 0. All rows equal in more than half the pairs (median 0) gives NaN, like the reference.
pub fn rbf_cka(x: Rows<'_>, y: Rows<'_>, tau: f64, debiased: bool) -> Result<f64> {
    rbf_cka_with(x, y, tau, debiased, &CkaOptions::default())
}

/// [`rbf_cka`] with explicit options (precision of the distance Gram).
pub fn rbf_cka_with(
    x: Rows<'_>,
    y: Rows<'_>,
    tau: f64,
    debiased: bool,
    opts: &CkaOptions,
) -> Result<f64> {
    opts.validate()?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(cfg(format!(
            "RBF bandwidth τ must be finite and > 0, got {tau}"
        )));
    }
    check_pair(&x, &y, debiased)?;
    Ok(gram_parts(x, y, debiased, opts, Some(tau))?.value())
}

// ------------------------------------------------------------------------------------------
// Minibatch CKA
// ------------------------------------------------------------------------------------------

/// Minibatch CKA (Nguyen, Raghu & Kornblith 2021) with per-batch weights 1/(n_b(n_b−3)).
///
/// Each batch contributes its unbiased HSIC terms ⟨K_U, L_U⟩/(n_b(n_b−3)), so batches of
/// different sizes are weighted correctly (the reference code omits the weight; that agrees only
/// for equal batch sizes; [`compute_unweighted`](Self::compute_unweighted) reproduces it).
/// CKA_mb estimates population CKA and depends on the batch size; it is not full-data CKA (for
/// that, use [`StreamingCka`]).
///
/// Batches of fewer than 4 examples (where unbiased HSIC is undefined) are **skipped and
/// counted** ([`n_skipped`](Self::n_skipped)); they do not count in
/// [`n_batches`](Self::n_batches). The first batch fixes p and q.
#[derive(Debug, Clone, Default)]
pub struct MinibatchCka {
    opts: CkaOptions,
    dims: Option<(usize, usize)>,
    h: [f64; 3],
    h_unweighted: [f64; 3],
    batches: usize,
    skipped: usize,
}

impl MinibatchCka {
    /// Empty accumulator, default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty accumulator with explicit options.
    pub fn with_options(opts: CkaOptions) -> Self {
        MinibatchCka {
            opts,
            ..Self::default()
        }
    }

    /// Add one batch X `[n_b, p]`, Y `[n_b, q]`. Errors: row counts differ, p or q differ from
    /// the first batch, non-finite values. n_b < 4: skipped and counted.
    pub fn update(&mut self, x: Rows<'_>, y: Rows<'_>) -> Result<()> {
        self.opts.validate()?;
        if x.n != y.n {
            return Err(cfg(format!(
                "X batch has {} rows but Y batch has {}: CKA compares the same examples",
                x.n, y.n
            )));
        }
        if let Some((p, q)) = self.dims {
            if (x.p, y.p) != (p, q) {
                return Err(cfg(format!(
                    "batch has p = {}, q = {} features but earlier batches had p = {p}, q = {q}",
                    x.p, y.p
                )));
            }
        }
        if x.n < 4 {
            self.skipped += 1;
            return Ok(());
        }
        check_pair(&x, &y, true)?;
        let parts = if feature_is_cheaper(x.n, x.p, y.p) {
            feature_parts(x, y, true, &self.opts)?
        } else {
            gram_parts(x, y, true, &self.opts, None)?
        };
        self.dims = Some((x.p, y.p));
        let nb = x.n as f64;
        let wgt = 1.0 / (nb * (nb - 3.0));
        for (i, v) in [parts.hsic_xy, parts.hsic_xx, parts.hsic_yy]
            .into_iter()
            .enumerate()
        {
            self.h[i] += v * wgt;
            self.h_unweighted[i] += v;
        }
        self.batches += 1;
        Ok(())
    }

    /// `Σ_b HSIC₁(K_b, L_b) / √(Σ_b HSIC₁(K_b, K_b)·Σ_b HSIC₁(L_b, L_b))`; NaN before any batch
    /// or when a denominator is ≤ 0.
    pub fn compute(&self) -> f64 {
        ratio(self.h)
    }

    /// The reference code's formula, without the 1/(n_b(n_b−3)) weights (equal to
    /// [`compute`](Self::compute) when all batches have the same size).
    pub fn compute_unweighted(&self) -> f64 {
        ratio(self.h_unweighted)
    }

    /// Forget everything (keeps the options).
    pub fn reset(&mut self) {
        *self = Self::with_options(self.opts);
    }

    /// Batches accumulated (skipped ones excluded).
    pub fn n_batches(&self) -> usize {
        self.batches
    }

    /// Batches skipped because they had fewer than 4 examples.
    pub fn n_skipped(&self) -> usize {
        self.skipped
    }
}

fn ratio(h: [f64; 3]) -> f64 {
    if h[1] > 0.0 && h[2] > 0.0 {
        h[0] / (h[1].sqrt() * h[2].sqrt())
    } else {
        f64::NAN
    }
}

// ------------------------------------------------------------------------------------------
// Layer × layer matrix
// ------------------------------------------------------------------------------------------

/// Linear CKA between every layer of `xs` and every layer of `ys` (all with the same n
/// examples): row-major `[xs.len(), ys.len()]`, entry (i, j) = CKA(`xs[i]`, `ys[j]`). Default options.
///
/// Each layer's centred Gram (or, in the feature form, its self term) is computed once: see
/// [`cka_matrix_with`].
pub fn cka_matrix(xs: &[Rows<'_>], ys: &[Rows<'_>], debiased: bool) -> Result<Vec<f64>> {
    cka_matrix_with(xs, ys, debiased, &CkaOptions::default())
}

/// [`cka_matrix`] with explicit options.
///
/// Gram form: the centred Gram of every `xs` layer is computed once and kept (packed lower
/// triangle, 4n(n+1) bytes), normalised; each `ys` Gram is computed once, dotted with all of
/// them, and dropped. A layer passed on both sides (same slice, same shape) is not recomputed.
/// When the `xs` Grams exceed [`CkaOptions::memory_budget`], the `xs` layers are processed in
/// groups and the `ys` Grams are recomputed once per group. Feature form: each layer's self
/// term (‖X_cᵀX_c‖², and the row norms for the debiased estimator) is computed once; each pair
/// costs one X_cᵀY_c GEMM. [`Form::Auto`] picks the form with fewer flops, and the feature form
/// when two Grams do not fit the budget.
pub fn cka_matrix_with(
    xs: &[Rows<'_>],
    ys: &[Rows<'_>],
    debiased: bool,
    opts: &CkaOptions,
) -> Result<Vec<f64>> {
    opts.validate()?;
    if xs.is_empty() || ys.is_empty() {
        return Ok(Vec::new());
    }
    let n = xs[0].n;
    for (side, layers) in [("xs", xs), ("ys", ys)] {
        for (i, l) in layers.iter().enumerate() {
            if l.n != n {
                return Err(cfg(format!(
                    "{side}[{i}] has {} rows but xs[0] has {n}: every layer must hold the same examples",
                    l.n
                )));
            }
            l.check_finite(&format!("{side}[{i}]"))?;
        }
    }
    let min = if debiased { 4 } else { 2 };
    if n < min {
        return Err(cfg(format!(
            "{} CKA needs at least {min} examples, got {n}",
            if debiased { "debiased" } else { "biased" }
        )));
    }
    let gram_bytes = Packed::bytes(n).unwrap_or(usize::MAX);
    let per_group = (opts.memory_budget / gram_bytes.max(1))
        .saturating_sub(1)
        .max(1);
    let feature = match opts.form {
        Form::Feature => true,
        Form::Gram => false,
        Form::Auto => {
            let nf = n as f64;
            let sp: f64 = xs.iter().map(|l| l.p as f64).sum();
            let sq: f64 = ys.iter().map(|l| l.p as f64).sum();
            let sp2: f64 = xs.iter().map(|l| (l.p as f64).powi(2)).sum();
            let sq2: f64 = ys.iter().map(|l| (l.p as f64).powi(2)).sum();
            let groups = xs.len().div_ceil(per_group) as f64;
            let gram = nf * nf * (sp + groups * sq + (xs.len() * ys.len()) as f64);
            let feat = nf * (sp2 + sq2 + 2.0 * sp * sq);
            feat <= gram || gram_bytes.saturating_mul(2) > opts.memory_budget
        }
    };
    let mut out = vec![f64::NAN; xs.len() * ys.len()];
    let ly = ys.len();
    if feature {
        matrix_feature(xs, ys, debiased, opts, &mut out)?;
        return Ok(out);
    }
    for (g, group) in xs.chunks(per_group).enumerate() {
        let base = g * per_group;
        let mut grams = Vec::with_capacity(group.len());
        for x in group {
            let k = kernel(*x, debiased, opts, None)?;
            let norm = k.dot(&k).sqrt();
            grams.push((k, norm));
        }
        for (j, y) in ys.iter().enumerate() {
            let reuse = group.iter().position(|x| x.same_as(y));
            let owned;
            let (ky, ny) = match reuse {
                Some(i) => (&grams[i].0, grams[i].1),
                None => {
                    let k = kernel(*y, debiased, opts, None)?;
                    let nn = k.dot(&k).sqrt();
                    owned = k;
                    (&owned, nn)
                }
            };
            for (i, (kx, nx)) in grams.iter().enumerate() {
                out[(base + i) * ly + j] = if *nx > 0.0 && ny > 0.0 {
                    kx.dot(ky) / (nx * ny)
                } else {
                    f64::NAN
                };
            }
        }
    }
    Ok(out)
}

/// Self statistics of one centred layer for the feature form of [`cka_matrix_with`].
struct LayerSelf {
    mean: Vec<f64>,
    /// Row norms a_i of the centred rows (as the GEMM saw them).
    a: Vec<f64>,
    /// Self term: ‖X_cᵀX_c‖² (biased) or ⟨K_U, K_U⟩ (debiased).
    hsic: f64,
}

fn layer_self(x: Rows<'_>, debiased: bool, opts: &CkaOptions) -> Result<LayerSelf> {
    let mode = opts.mode(x.is_f64(), x.n.min(opts.depth_for(Mode::Mixed)));
    let depth = opts.depth_for(mode).min(x.n);
    let mean = x.means_checked("X")?;
    let (p, n) = (x.p, x.n);
    let mut acc = zeros(p.checked_mul(p).ok_or_else(|| cfg("p² overflows"))?, "XᵀX")?;
    let mut a = vec![0f64; n];
    let mut scratch = Vec::new();
    let par = par_for(depth as f64 * (p * p) as f64);
    fn run<T: Elem>(
        x: Rows<'_>,
        mean: &[f64],
        depth: usize,
        acc: &mut [f64],
        a: &mut [f64],
        scratch: &mut Vec<f32>,
        par: faer::Par,
    ) -> Result<()> {
        let (n, p) = (x.n, x.p);
        let mut panel: Vec<T> = Vec::new();
        grow(&mut panel, depth * p)?;
        for r0 in (0..n).step_by(depth) {
            let r1 = (r0 + depth).min(n);
            let k = r1 - r0;
            match x.data {
                RowData::F32(d) => build_panel_t(d, p, r0, r1, mean, &mut panel, &mut a[r0..r1]),
                RowData::F64(d) => build_panel_t(d, p, r0, r1, mean, &mut panel, &mut a[r0..r1]),
            }
            let m = faer::MatRef::from_row_major_slice(&panel[..k * p], p, k);
            T::syrk_add(acc, m, scratch, par)?;
        }
        Ok(())
    }
    match mode {
        Mode::F64 => run::<f64>(x, &mean, depth, &mut acc, &mut a, &mut scratch, par)?,
        Mode::Mixed => run::<f32>(x, &mean, depth, &mut acc, &mut a, &mut scratch, par)?,
    }
    let zero = vec![0f64; p];
    let xtx = sq_norm_rank1_lower(&acc, p, &zero, 0.0);
    let hsic = if debiased {
        centred_debias(xtx, &a, &a, n)
    } else {
        xtx
    };
    Ok(LayerSelf { mean, a, hsic })
}

/// Unbiased HSIC from centred features: `xty − n/(n−2)·Σa_ib_i + A·B/((n−1)(n−2))`.
fn centred_debias(xty: f64, a: &[f64], b: &[f64], n: usize) -> f64 {
    let nf = n as f64;
    let sa: f64 = a.iter().sum();
    let sb: f64 = b.iter().sum();
    xty - nf / (nf - 2.0) * dot(a, b) + sa * sb / ((nf - 1.0) * (nf - 2.0))
}

/// `‖X_cᵀY_c‖²` for centred layers.
fn cross_xty(
    x: Rows<'_>,
    mx: &[f64],
    y: Rows<'_>,
    my: &[f64],
    opts: &CkaOptions,
    acc: &mut Vec<f64>,
    scratch: &mut Vec<f32>,
) -> Result<f64> {
    let mode = opts.mode(
        x.is_f64() || y.is_f64(),
        x.n.min(opts.depth_for(Mode::Mixed)),
    );
    let depth = opts.depth_for(mode).min(x.n);
    let (n, p, q) = (x.n, x.p, y.p);
    let pq = p.checked_mul(q).ok_or_else(|| cfg("p·q overflows"))?;
    grow(acc, pq)?;
    acc[..pq].iter_mut().for_each(|v| *v = 0.0);
    let par = par_for(2.0 * depth as f64 * pq as f64);
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem>(
        x: Rows<'_>,
        mx: &[f64],
        y: Rows<'_>,
        my: &[f64],
        depth: usize,
        acc: &mut [f64],
        scratch: &mut Vec<f32>,
        par: faer::Par,
    ) -> Result<()> {
        let (n, p, q) = (x.n, x.p, y.p);
        let mut xs: Vec<T> = Vec::new();
        let mut ys: Vec<T> = Vec::new();
        let mut sq = vec![0f64; depth];
        grow(&mut xs, depth * p)?;
        grow(&mut ys, depth * q)?;
        for r0 in (0..n).step_by(depth) {
            let r1 = (r0 + depth).min(n);
            let k = r1 - r0;
            match x.data {
                RowData::F32(d) => build_panel_t(d, p, r0, r1, mx, &mut xs, &mut sq),
                RowData::F64(d) => build_panel_t(d, p, r0, r1, mx, &mut xs, &mut sq),
            }
            match y.data {
                RowData::F32(d) => build_panel_t(d, q, r0, r1, my, &mut ys, &mut sq),
                RowData::F64(d) => build_panel_t(d, q, r0, r1, my, &mut ys, &mut sq),
            }
            let xm = faer::MatRef::from_row_major_slice(&xs[..k * p], p, k);
            let ym = faer::MatRef::from_row_major_slice(&ys[..k * q], q, k);
            T::gemm_add(acc, xm, ym.transpose(), scratch, par)?;
        }
        Ok(())
    }
    match mode {
        Mode::F64 => run::<f64>(x, mx, y, my, depth, &mut acc[..pq], scratch, par)?,
        Mode::Mixed => run::<f32>(x, mx, y, my, depth, &mut acc[..pq], scratch, par)?,
    }
    let _ = n;
    let zp = vec![0f64; p];
    let zq = vec![0f64; q];
    Ok(sq_norm_rank1(&acc[..pq], p, &zp, &zq, 0.0))
}

fn matrix_feature(
    xs: &[Rows<'_>],
    ys: &[Rows<'_>],
    debiased: bool,
    opts: &CkaOptions,
    out: &mut [f64],
) -> Result<()> {
    let sx: Vec<LayerSelf> = xs
        .iter()
        .map(|x| layer_self(*x, debiased, opts))
        .collect::<Result<_>>()?;
    let mut acc = Vec::new();
    let mut scratch = Vec::new();
    let n = xs[0].n;
    for (j, y) in ys.iter().enumerate() {
        let owned;
        let syl = match xs.iter().position(|x| x.same_as(y)) {
            Some(i) => &sx[i],
            None => {
                owned = layer_self(*y, debiased, opts)?;
                &owned
            }
        };
        for (i, x) in xs.iter().enumerate() {
            let sxl = &sx[i];
            let xty = cross_xty(*x, &sxl.mean, *y, &syl.mean, opts, &mut acc, &mut scratch)?;
            let hxy = if debiased {
                centred_debias(xty, &sxl.a, &syl.a, n)
            } else {
                xty
            };
            let parts = CkaParts {
                hsic_xy: hxy,
                hsic_xx: sxl.hsic,
                hsic_yy: syl.hsic,
                n: n as u64,
                debiased,
            };
            out[i * ys.len() + j] = parts.value();
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Collapse companions
// ------------------------------------------------------------------------------------------

/// Mean pairwise cosine similarity of the rows: `(‖Σx̂_i‖² − Σ‖x̂_i‖²)/(m(m−1))`, x̂_i = x_i/‖x_i‖,
/// over the m rows that are not all zero (the cosine of a zero vector is undefined, so zero rows
/// are left out of the mean). One pass over the rows, f64 throughout. Errors: n < 2, non-finite
/// values. NaN when fewer than 2 rows are non-zero.
pub fn mean_pairwise_cosine(x: Rows<'_>) -> Result<f64> {
    if x.n < 2 {
        return Err(cfg(format!(
            "mean pairwise cosine needs at least 2 rows, got {}",
            x.n
        )));
    }
    x.check_finite("X")?;
    const CHUNK: usize = 256;
    fn chunk<S: engine::Src>(rows: &[S], p: usize) -> (Vec<f64>, f64, u64) {
        let mut s = vec![0f64; p];
        let mut self_sq = 0.0;
        let mut m = 0u64;
        for r in rows.chunks_exact(p) {
            let nrm2: f64 = r.iter().map(|v| v.f() * v.f()).sum();
            // Squares of f64 values beyond ~1e±154 over/underflow: rescale by max|v| there.
            let nrm = if nrm2.is_finite() && nrm2 >= 1e-280 {
                nrm2.sqrt()
            } else {
                let big = r.iter().map(|v| v.f().abs()).fold(0.0f64, f64::max);
                if big == 0.0 {
                    0.0
                } else {
                    big * r
                        .iter()
                        .map(|v| (v.f() / big) * (v.f() / big))
                        .sum::<f64>()
                        .sqrt()
                }
            };
            if nrm == 0.0 {
                continue;
            }
            let inv = 1.0 / nrm;
            let mut q = 0.0;
            for (s, v) in s.iter_mut().zip(r) {
                let h = v.f() * inv;
                *s += h;
                q += h * h;
            }
            self_sq += q;
            m += 1;
        }
        (s, self_sq, m)
    }
    use rayon::prelude::*;
    let p = x.p;
    let parts: Vec<(Vec<f64>, f64, u64)> = match x.data {
        RowData::F32(d) => d.par_chunks(CHUNK * p).map(|c| chunk(c, p)).collect(),
        RowData::F64(d) => d.par_chunks(CHUNK * p).map(|c| chunk(c, p)).collect(),
    };
    let mut s = vec![0f64; p];
    let (mut self_sq, mut m) = (0.0, 0u64);
    for (ps, q, c) in parts {
        for (a, b) in s.iter_mut().zip(&ps) {
            *a += b;
        }
        self_sq += q;
        m += c;
    }
    if m < 2 {
        return Ok(f64::NAN);
    }
    let mf = m as f64;
    Ok((dot(&s, &s) - self_sq) / (mf * (mf - 1.0)))
}

/// Participation ratio `(tr C)²/‖C‖_F²` of the centred covariance C = X_cᵀX_c/(n−1) (the scale
/// cancels), in [1, min(n−1, p)]: the effective number of dimensions. Computed as
/// ‖X_c‖_F⁴/‖X_cᵀX_c‖_F² (feature form, p ≤ n) or ‖X_c‖_F⁴/‖X_cX_cᵀ‖_F² (Gram form), default
/// options. Errors: n < 2, non-finite values. NaN when X is constant.
pub fn covariance_participation_ratio(x: Rows<'_>) -> Result<f64> {
    covariance_participation_ratio_with(x, &CkaOptions::default())
}

/// [`covariance_participation_ratio`] with explicit options (precision, form).
pub fn covariance_participation_ratio_with(x: Rows<'_>, opts: &CkaOptions) -> Result<f64> {
    opts.validate()?;
    if x.n < 2 {
        return Err(cfg(format!(
            "a covariance needs at least 2 rows, got {}",
            x.n
        )));
    }
    let feature = match opts.form {
        Form::Feature => true,
        Form::Gram => false,
        Form::Auto => x.p <= x.n,
    };
    let (tr, fro) = if feature {
        let s = layer_self(x, false, opts)?;
        (s.a.iter().sum::<f64>(), s.hsic)
    } else {
        let mode = opts.mode(x.is_f64(), x.p.min(opts.depth_for(Mode::Mixed)));
        let k = linear_gram(x, &x.means_checked("X")?, mode, opts.depth_for(mode))?;
        (k.trace(), k.dot(&k))
    };
    Ok(if fro > 0.0 { tr * tr / fro } else { f64::NAN })
}
