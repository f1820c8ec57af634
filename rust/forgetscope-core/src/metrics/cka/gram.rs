//! Example-space (Gram) kernels stored as packed lower triangles: the linear Gram of centred
//! features, the RBF kernel built from it, biased (HKH) and unbiased (U-) centring, and the
//! Frobenius inner product.

use rayon::prelude::*;

use super::engine::{build_cols, cfg, grow, par_for, zeros, Elem};
use super::{Mode, RowData, Rows};
use crate::error::Result;

/// A symmetric `n × n` kernel matrix, packed by columns: column j holds rows `j..n`.
#[derive(Debug, Clone)]
pub(super) struct Packed {
    n: usize,
    data: Vec<f64>,
}

/// Offset of column j in the packed storage.
#[inline]
fn off(n: usize, j: usize) -> usize {
    j * (2 * n - j + 1) / 2
}

impl Packed {
    /// Trace.
    pub(super) fn trace(&self) -> f64 {
        self.diag().iter().sum()
    }

    /// Bytes of a packed matrix of order n (None on overflow).
    pub(super) fn bytes(n: usize) -> Option<usize> {
        n.checked_mul(n.checked_add(1)?)?
            .checked_div(2)?
            .checked_mul(8)
    }

    fn columns(&self) -> Vec<&[f64]> {
        let mut out = Vec::with_capacity(self.n);
        let mut rest = &self.data[..];
        for j in 0..self.n {
            let (c, r) = rest.split_at(self.n - j);
            out.push(c);
            rest = r;
        }
        out
    }

    fn columns_mut(&mut self) -> Vec<&mut [f64]> {
        let mut out = Vec::with_capacity(self.n);
        let mut rest = &mut self.data[..];
        for j in 0..self.n {
            let (c, r) = std::mem::take(&mut rest).split_at_mut(self.n - j);
            out.push(c);
            rest = r;
        }
        out
    }

    fn diag(&self) -> Vec<f64> {
        (0..self.n).map(|j| self.data[off(self.n, j)]).collect()
    }

    /// Column sums of the full symmetric matrix: column j below the diagonal is also row j to
    /// the right of it. Parallel over fixed groups of columns (each scattering into its own
    /// partial vector), partials combined in group order.
    fn col_sums(&self) -> Vec<f64> {
        let n = self.n;
        let group = (n / 32).max(64);
        let cols = self.columns();
        let parts: Vec<Vec<f64>> = cols
            .par_chunks(group)
            .enumerate()
            .map(|(g, chunk)| {
                let mut sums = vec![0f64; n];
                for (jj, col) in chunk.iter().enumerate() {
                    let j = g * group + jj;
                    let mut below = 0.0;
                    for (s, &v) in sums[j + 1..].iter_mut().zip(&col[1..]) {
                        below += v;
                        *s += v;
                    }
                    sums[j] += col[0] + below;
                }
                sums
            })
            .collect();
        let mut sums = vec![0f64; n];
        for part in &parts {
            for (s, v) in sums.iter_mut().zip(part) {
                *s += v;
            }
        }
        sums
    }

    /// `K_ij −= m_i + m_j` for every stored entry.
    fn subtract_means(&mut self, m: &[f64]) {
        self.columns_mut()
            .into_par_iter()
            .enumerate()
            .for_each(|(j, col)| {
                let mj = m[j];
                for (v, &mi) in col.iter_mut().zip(&m[j..]) {
                    *v -= mi + mj;
                }
            });
    }

    fn set_diag(&mut self, v: f64) {
        for j in 0..self.n {
            self.data[off(self.n, j)] = v;
        }
    }

    /// Centre in place. Biased: HKH, in the reference-code form (column means, minus half their
    /// mean, subtracted from rows and columns). Unbiased: U-centring (Székely & Rizzo 2014), which
    /// needs n ≥ 3 (the caller checks n ≥ 4).
    pub(super) fn centre(&mut self, unbiased: bool) {
        let n = self.n as f64;
        if unbiased {
            self.set_diag(0.0);
            let mut m: Vec<f64> = self.col_sums().iter().map(|s| s / (n - 2.0)).collect();
            let t = m.iter().sum::<f64>() / (2.0 * (n - 1.0));
            m.iter_mut().for_each(|v| *v -= t);
            self.subtract_means(&m);
            self.set_diag(0.0);
        } else {
            let mut m: Vec<f64> = self.col_sums().iter().map(|s| s / n).collect();
            let t = m.iter().sum::<f64>() / n / 2.0;
            m.iter_mut().for_each(|v| *v -= t);
            self.subtract_means(&m);
        }
    }

    /// Frobenius inner product ⟨K, L⟩ of the full symmetric matrices.
    pub(super) fn dot(&self, other: &Packed) -> f64 {
        debug_assert_eq!(self.n, other.n);
        let parts: Vec<f64> = self
            .columns()
            .into_par_iter()
            .zip(other.columns().into_par_iter())
            .map(|(a, b)| {
                let off: f64 = a[1..].iter().zip(&b[1..]).map(|(x, y)| x * y).sum();
                a[0] * b[0] + 2.0 * off
            })
            .collect();
        parts.iter().sum()
    }

    /// `(⟨K, L⟩, ⟨K, K⟩, ⟨L, L⟩)` in one pass over both matrices.
    pub(super) fn dots3(&self, other: &Packed) -> [f64; 3] {
        debug_assert_eq!(self.n, other.n);
        let parts: Vec<[f64; 3]> = self
            .columns()
            .into_par_iter()
            .zip(other.columns().into_par_iter())
            .map(|(a, b)| {
                let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
                for (x, y) in a[1..].iter().zip(&b[1..]) {
                    ab += x * y;
                    aa += x * x;
                    bb += y * y;
                }
                [
                    a[0] * b[0] + 2.0 * ab,
                    a[0] * a[0] + 2.0 * aa,
                    b[0] * b[0] + 2.0 * bb,
                ]
            })
            .collect();
        let mut t = [0.0; 3];
        for p in &parts {
            for i in 0..3 {
                t[i] += p[i];
            }
        }
        t
    }

    /// Turn a linear Gram G (of the same rows) into the RBF kernel of the reference code:
    /// `d_ij = G_ii + G_jj − 2G_ij` (clamped at 0, exactly 0 on the diagonal),
    /// `K = exp(−d / (2τ²·median(d)))`, median over all n² entries including the n diagonal
    /// zeros (numpy's median: mean of the two middle values when n² is even). Returns the median.
    pub(super) fn make_rbf(&mut self, tau: f64) -> f64 {
        let d = self.diag();
        self.columns_mut()
            .into_par_iter()
            .enumerate()
            .for_each(|(j, col)| {
                col[0] = 0.0;
                for (t, v) in col.iter_mut().enumerate().skip(1) {
                    *v = (d[j + t] + d[j] - 2.0 * *v).max(0.0);
                }
            });
        let med = self.median_full();
        let scale = -1.0 / (2.0 * tau * tau * med);
        self.data
            .par_iter_mut()
            .for_each(|v| *v = (*v * scale).exp());
        // exp(-0·scale) is already 1 on the diagonal; if med = 0 the 0·∞ gives NaN, which is
        // what the reference gives too.
        med
    }

    /// Median of the n² entries of a symmetric matrix with a zero diagonal and non-negative
    /// entries: the sorted multiset is n zeros followed by every strict-lower value twice.
    fn median_full(&self) -> f64 {
        let n = self.n;
        let mut v: Vec<f64> = Vec::with_capacity(n * (n - 1) / 2);
        for col in self.columns() {
            v.extend_from_slice(&col[1..]);
        }
        let total = n * n;
        // Position m of the full multiset → pair index (m − n)/2, or the zero diagonal.
        let at = |m: usize| -> Option<usize> { (m >= n).then(|| (m - n) / 2) };
        if v.is_empty() {
            return 0.0;
        }
        let stat = |v: &mut Vec<f64>, m: usize| -> f64 {
            match at(m) {
                None => 0.0,
                Some(k) => *v.select_nth_unstable_by(k, f64::total_cmp).1,
            }
        };
        if total % 2 == 1 {
            stat(&mut v, total / 2)
        } else {
            let lo = stat(&mut v, total / 2 - 1);
            let hi = stat(&mut v, total / 2);
            (lo + hi) / 2.0
        }
    }
}

/// The linear Gram `X_c X_cᵀ` of the column-centred rows (`mean` = column means), accumulated
/// over panels of `depth` feature columns: each panel's lower-triangle product (f32 or f64 GEMM)
/// is added straight into the packed f64 matrix, so no n × n f64 square is ever held.
pub(super) fn linear_gram(x: Rows<'_>, mean: &[f64], mode: Mode, depth: usize) -> Result<Packed> {
    match mode {
        Mode::F64 => linear_gram_t::<f64>(x, mean, depth),
        Mode::Mixed => linear_gram_t::<f32>(x, mean, depth),
    }
}

fn linear_gram_t<T: Elem>(x: Rows<'_>, mean: &[f64], depth: usize) -> Result<Packed> {
    let (n, p) = (x.n(), x.p());
    let len =
        Packed::bytes(n).ok_or_else(|| cfg(format!("Gram of {n} examples is too large")))? / 8;
    let mut k = Packed {
        n,
        data: zeros(len, "packed Gram matrix")?,
    };
    let depth = depth.clamp(1, p);
    let mut panel: Vec<T> = Vec::new();
    grow(&mut panel, n * depth)?;
    let mut square: Vec<T> = Vec::new();
    grow(&mut square, n * n)?;
    let par = par_for(n as f64 * n as f64 * depth as f64);
    for c0 in (0..p).step_by(depth) {
        let c1 = (c0 + depth).min(p);
        let w = c1 - c0;
        match x.data() {
            RowData::F32(s) => build_cols(s, n, p, c0, c1, mean, &mut panel),
            RowData::F64(s) => build_cols(s, n, p, c0, c1, mean, &mut panel),
        }
        let a = faer::MatRef::from_row_major_slice(&panel[..n * w], n, w);
        T::syrk_into(&mut square, a, par);
        k.columns_mut()
            .into_par_iter()
            .enumerate()
            .for_each(|(j, c)| {
                for (d, s) in c.iter_mut().zip(&square[j * n + j..(j + 1) * n]) {
                    *d += s.get();
                }
            });
    }
    Ok(k)
}
