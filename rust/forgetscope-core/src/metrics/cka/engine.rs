//! The numerical engine under CKA: shifted panels of the inputs, GEMM accumulation into f64
//! (plain f64, or f32 panels accumulated into f64), and reductions over the f64 accumulators.
//!
//! Storage conventions: a matrix accumulator `m × c` is a column-major `Vec<f64>`; a symmetric
//! one keeps only its lower triangle (rows `i ≥ j` of column j are meaningful, the rest is
//! ignored). Every reduction runs in parallel over columns and combines the per-column partial
//! sums in column order, so results do not depend on the thread count.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `Error::Config` with a reason.
pub(super) fn cfg(reason: impl Into<String>) -> Error {
    Error::Config {
        reason: reason.into(),
    }
}

/// Zeroed `Vec<f64>` of `len` elements, or a `Config` error instead of an abort when the
/// allocation is impossible.
pub(super) fn zeros(len: usize, what: &str) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        cfg(format!(
            "{what}: cannot allocate {len} f64 values ({} MiB)",
            len.saturating_mul(8) >> 20
        ))
    })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Grow `v` to at least `len` elements (never shrinks, never re-initialises what is there).
pub(super) fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> Result<()> {
    if v.len() < len {
        v.try_reserve_exact(len - v.len())
            .map_err(|_| cfg(format!("cannot allocate a work buffer of {len} values")))?;
        v.resize(len, T::default());
    }
    Ok(())
}

/// Parallelism for a GEMM of `flops` floating-point operations: serial below ~10 MFLOP, where
/// thread start-up costs more than it saves; otherwise the current rayon pool.
pub(super) fn par_for(flops: f64) -> Par {
    if flops < 1e7 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// An input element type.
pub(super) trait Src: Copy + Send + Sync {
    fn f(self) -> f64;
}
impl Src for f32 {
    #[inline(always)]
    fn f(self) -> f64 {
        self as f64
    }
}
impl Src for f64 {
    #[inline(always)]
    fn f(self) -> f64 {
        self
    }
}

/// A panel element type: the type the GEMMs run in. `f64` accumulates straight into the f64
/// accumulator; `f32` runs an f32 GEMM into a scratch buffer and adds that into f64.
pub(super) trait Elem: Copy + Send + Sync + Default + 'static {
    fn from_f64(v: f64) -> Self;
    fn get(self) -> f64;
    /// `acc[m×m, lower] += a·aᵀ` for `a` of shape `m × k`.
    fn syrk_add(
        acc: &mut [f64],
        a: MatRef<'_, Self>,
        scratch: &mut Vec<f32>,
        par: Par,
    ) -> Result<()>;
    /// `acc[m×c] += a·b` for `a: m × k`, `b: k × c`.
    fn gemm_add(
        acc: &mut [f64],
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        scratch: &mut Vec<f32>,
        par: Par,
    ) -> Result<()>;
}

impl Elem for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn get(self) -> f64 {
        self
    }
    fn syrk_add(acc: &mut [f64], a: MatRef<'_, f64>, _: &mut Vec<f32>, par: Par) -> Result<()> {
        let m = a.nrows();
        tri_matmul(
            MatMut::from_column_major_slice_mut(&mut acc[..m * m], m, m),
            BlockStructure::TriangularLower,
            Accum::Add,
            a,
            BlockStructure::Rectangular,
            a.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        Ok(())
    }
    fn gemm_add(
        acc: &mut [f64],
        a: MatRef<'_, f64>,
        b: MatRef<'_, f64>,
        _: &mut Vec<f32>,
        par: Par,
    ) -> Result<()> {
        let (m, c) = (a.nrows(), b.ncols());
        matmul(
            MatMut::from_column_major_slice_mut(&mut acc[..m * c], m, c),
            Accum::Add,
            a,
            b,
            1.0,
            par,
        );
        Ok(())
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn get(self) -> f64 {
        self as f64
    }
    fn syrk_add(
        acc: &mut [f64],
        a: MatRef<'_, f32>,
        scratch: &mut Vec<f32>,
        par: Par,
    ) -> Result<()> {
        let m = a.nrows();
        grow(scratch, m * m)?;
        let s = &mut scratch[..m * m];
        tri_matmul(
            MatMut::from_column_major_slice_mut(s, m, m),
            BlockStructure::TriangularLower,
            Accum::Replace,
            a,
            BlockStructure::Rectangular,
            a.transpose(),
            BlockStructure::Rectangular,
            1.0f32,
            par,
        );
        acc[..m * m]
            .par_chunks_mut(m)
            .zip(s.par_chunks(m))
            .enumerate()
            .for_each(|(j, (d, s))| {
                for (d, &s) in d[j..].iter_mut().zip(&s[j..]) {
                    *d += s as f64;
                }
            });
        Ok(())
    }
    fn gemm_add(
        acc: &mut [f64],
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        scratch: &mut Vec<f32>,
        par: Par,
    ) -> Result<()> {
        let (m, c) = (a.nrows(), b.ncols());
        grow(scratch, m * c)?;
        let s = &mut scratch[..m * c];
        matmul(
            MatMut::from_column_major_slice_mut(s, m, c),
            Accum::Replace,
            a,
            b,
            1.0f32,
            par,
        );
        acc[..m * c]
            .par_chunks_mut(m.max(1) * 64)
            .zip(s.par_chunks(m.max(1) * 64))
            .for_each(|(d, s)| {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d += s as f64;
                }
            });
        Ok(())
    }
}

/// Rows `r0..r1` of a row-major `[·, p]` input, shifted: `out[i, j] = T(src[r0+i, j] − shift[j])`,
/// and `sq[i] = Σ_j out[i, j]²` (in f64, of the values actually stored).
pub(super) fn build_rows<S: Src, T: Elem>(
    src: &[S],
    p: usize,
    r0: usize,
    r1: usize,
    shift: &[f64],
    out: &mut [T],
    sq: &mut [f64],
) {
    let k = r1 - r0;
    out[..k * p]
        .par_chunks_mut(p)
        .zip(sq[..k].par_iter_mut())
        .enumerate()
        .with_min_len(4)
        .for_each(|(i, (o, s2))| {
            let row = &src[(r0 + i) * p..(r0 + i + 1) * p];
            let mut acc = [0f64; 4];
            let mut oc = o.chunks_exact_mut(4);
            let mut rc = row.chunks_exact(4);
            let mut sc = shift.chunks_exact(4);
            for ((o, r), s) in (&mut oc).zip(&mut rc).zip(&mut sc) {
                for l in 0..4 {
                    let v = T::from_f64(r[l].f() - s[l]);
                    o[l] = v;
                    acc[l] += v.get() * v.get();
                }
            }
            for ((o, r), s) in oc
                .into_remainder()
                .iter_mut()
                .zip(rc.remainder())
                .zip(sc.remainder())
            {
                let v = T::from_f64(r.f() - s);
                *o = v;
                acc[0] += v.get() * v.get();
            }
            *s2 = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        });
}

/// Columns `c0..c1` of a row-major `[n, p]` input, shifted, as a row-major `[n, c1 − c0]` panel.
pub(super) fn build_cols<S: Src, T: Elem>(
    src: &[S],
    n: usize,
    p: usize,
    c0: usize,
    c1: usize,
    shift: &[f64],
    out: &mut [T],
) {
    let w = c1 - c0;
    let sh = &shift[c0..c1];
    out[..n * w]
        .par_chunks_mut(w)
        .enumerate()
        .with_min_len(16)
        .for_each(|(i, o)| {
            let row = &src[i * p + c0..i * p + c1];
            for ((o, r), s) in o.iter_mut().zip(row).zip(sh) {
                *o = T::from_f64(r.f() - s);
            }
        });
}

const COL_BLOCK: usize = 128;

/// Over a `[k, p]` panel of rows z_i: `s += Σ z_i`, `sa += Σ wa_i z_i`, `sb += Σ wb_i z_i`.
/// Parallel over blocks of columns; each column is summed in row order.
#[allow(clippy::too_many_arguments)]
pub(super) fn vec_stats<T: Elem>(
    panel: &[T],
    k: usize,
    p: usize,
    wa: &[f64],
    wb: &[f64],
    s: &mut [f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    s.par_chunks_mut(COL_BLOCK)
        .zip(sa.par_chunks_mut(COL_BLOCK))
        .zip(sb.par_chunks_mut(COL_BLOCK))
        .enumerate()
        .for_each(|(blk, ((s, sa), sb))| {
            let c0 = blk * COL_BLOCK;
            let w = s.len();
            for i in 0..k {
                let row = &panel[i * p + c0..i * p + c0 + w];
                let (a, b) = (wa[i], wb[i]);
                for j in 0..w {
                    let v = row[j].get();
                    s[j] += v;
                    sa[j] += a * v;
                    sb[j] += b * v;
                }
            }
        });
}

/// Column means of a row-major `[n, p]` input in f64 (parallel over column blocks, rows in order).
pub(super) fn col_means<S: Src>(src: &[S], n: usize, p: usize) -> Vec<f64> {
    let mut m = vec![0f64; p];
    m.par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(blk, m)| {
            let c0 = blk * COL_BLOCK;
            for i in 0..n {
                let row = &src[i * p + c0..i * p + c0 + m.len()];
                for (m, r) in m.iter_mut().zip(row) {
                    *m += r.f();
                }
            }
            let inv = 1.0 / n as f64;
            for m in m.iter_mut() {
                *m *= inv;
            }
        });
    m
}

/// Index of the first row holding a NaN or an infinity.
pub(super) fn first_nonfinite_row<S: Src>(src: &[S], p: usize) -> Option<usize> {
    src.par_chunks(p.max(1) * 256)
        .position_first(|c| c.iter().any(|v| !v.f().is_finite()))
        .map(|blk| {
            let base = blk * 256;
            let c = &src[base * p..];
            base + c
                .chunks(p.max(1))
                .position(|r| r.iter().any(|v| !v.f().is_finite()))
                .unwrap_or(0)
        })
}

/// Sum of per-column partials in column order.
fn ordered_sum(parts: Vec<f64>) -> f64 {
    parts.iter().sum()
}

/// `Σ_ij (S_ij − c·u_i·v_j)²` over a full `m × cols` column-major accumulator.
pub(super) fn sq_norm_rank1(s: &[f64], m: usize, u: &[f64], v: &[f64], c: f64) -> f64 {
    ordered_sum(
        s.par_chunks(m)
            .zip(v.par_iter())
            .map(|(col, &vj)| {
                let cv = c * vj;
                col.iter()
                    .zip(u)
                    .map(|(&x, &ui)| {
                        let d = x - cv * ui;
                        d * d
                    })
                    .sum::<f64>()
            })
            .collect(),
    )
}

/// `Σ_ij (S_ij − c·u_i·u_j)²` over a symmetric `m × m` accumulator stored as its lower triangle.
pub(super) fn sq_norm_rank1_lower(s: &[f64], m: usize, u: &[f64], c: f64) -> f64 {
    ordered_sum(
        s.par_chunks(m)
            .enumerate()
            .map(|(j, col)| {
                let cu = c * u[j];
                let dj = col[j] - cu * u[j];
                let off: f64 = col[j + 1..]
                    .iter()
                    .zip(&u[j + 1..])
                    .map(|(&x, &ui)| {
                        let d = x - cu * ui;
                        d * d
                    })
                    .sum();
                dj * dj + 2.0 * off
            })
            .collect(),
    )
}

/// `Σ_j (S_jj − c·u_j²)`: the trace of `S − c·u·uᵀ`.
pub(super) fn trace_rank1(s: &[f64], m: usize, u: &[f64], c: f64) -> f64 {
    (0..m).map(|j| s[j * m + j] - c * u[j] * u[j]).sum()
}

/// `uᵀ S v` for a full `m × cols` accumulator.
pub(super) fn bilinear(s: &[f64], m: usize, u: &[f64], v: &[f64]) -> f64 {
    ordered_sum(
        s.par_chunks(m)
            .zip(v.par_iter())
            .map(|(col, &vj)| vj * col.iter().zip(u).map(|(&x, &ui)| x * ui).sum::<f64>())
            .collect(),
    )
}

/// `uᵀ S u` for a symmetric accumulator stored as its lower triangle.
pub(super) fn bilinear_lower(s: &[f64], m: usize, u: &[f64]) -> f64 {
    ordered_sum(
        s.par_chunks(m)
            .enumerate()
            .map(|(j, col)| {
                let off: f64 = col[j + 1..]
                    .iter()
                    .zip(&u[j + 1..])
                    .map(|(&x, &ui)| x * ui)
                    .sum();
                u[j] * (col[j] * u[j] + 2.0 * off)
            })
            .collect(),
    )
}

/// `S v` (length m) for a full `m × cols` accumulator.
pub(super) fn matvec(s: &[f64], m: usize, v: &[f64]) -> Vec<f64> {
    let mut out = vec![0f64; m];
    out.par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(blk, o)| {
            let r0 = blk * COL_BLOCK;
            for (col, &vj) in s.chunks_exact(m).zip(v) {
                for (o, &x) in o.iter_mut().zip(&col[r0..]) {
                    *o += x * vj;
                }
            }
        });
    out
}

/// `Sᵀ u` (length cols) for a full `m × cols` accumulator.
pub(super) fn matvec_t(s: &[f64], m: usize, u: &[f64]) -> Vec<f64> {
    s.par_chunks(m)
        .map(|col| col.iter().zip(u).map(|(&x, &ui)| x * ui).sum())
        .collect()
}

/// `S u` for a symmetric accumulator stored as its lower triangle.
pub(super) fn matvec_lower(s: &[f64], m: usize, u: &[f64]) -> Vec<f64> {
    // y_i = Σ_{j ≤ i} S_ij u_j + Σ_{j > i} S_ji u_j: the first part column by column, the
    // second as a dot product with column i below the diagonal.
    let mut out: Vec<f64> = s
        .par_chunks(m)
        .enumerate()
        .map(|(i, col)| {
            col[i + 1..]
                .iter()
                .zip(&u[i + 1..])
                .map(|(&x, &uj)| x * uj)
                .sum()
        })
        .collect();
    out.par_chunks_mut(COL_BLOCK)
        .enumerate()
        .for_each(|(blk, o)| {
            let r0 = blk * COL_BLOCK;
            for (j, (col, &uj)) in s.chunks_exact(m).zip(u).enumerate() {
                if j >= r0 + o.len() {
                    break;
                }
                let start = j.max(r0);
                for (o, &x) in o[start - r0..].iter_mut().zip(&col[start..]) {
                    *o += x * uj;
                }
            }
        });
    out
}

/// `D += S + g1·h1ᵀ + g2·h2ᵀ` for `m × cols` accumulators (only the lower triangle when `lower`).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_rank2(
    d: &mut [f64],
    s: &[f64],
    m: usize,
    lower: bool,
    g1: &[f64],
    h1: &[f64],
    g2: &[f64],
    h2: &[f64],
) {
    d.par_chunks_mut(m)
        .zip(s.par_chunks(m))
        .enumerate()
        .for_each(|(j, (dc, sc))| {
            let i0 = if lower { j } else { 0 };
            let (a, b) = (h1[j], h2[j]);
            for i in i0..m {
                dc[i] += sc[i] + g1[i] * a + g2[i] * b;
            }
        });
}

/// `Σ uᵢvᵢ`.
pub(super) fn dot(u: &[f64], v: &[f64]) -> f64 {
    u.iter().zip(v).map(|(a, b)| a * b).sum()
}
