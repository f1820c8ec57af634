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

/// Element types whose all-zero bit pattern is the value 0.
pub(super) trait Zeroable: Copy + Default {}
impl Zeroable for f32 {}
impl Zeroable for f64 {}

/// A zeroed `Vec<T>` of `len` elements from the allocator's zeroed memory (large blocks come
/// straight from the OS, untouched: no memset), advised to use transparent huge pages on Linux
/// so that first touch costs one fault per 2 MiB instead of per 4 KiB (the accumulators are
/// hundreds of MiB). `Config` error instead of an abort when the allocation is impossible.
pub(super) fn zeroed_vec<T: Zeroable>(len: usize, what: &str) -> Result<Vec<T>> {
    let fail = || {
        cfg(format!(
            "{what}: cannot allocate {len} values ({} MiB)",
            len.saturating_mul(std::mem::size_of::<T>()) >> 20
        ))
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| fail())?;
    // SAFETY: `layout` has non-zero size (len > 0, T is f32 or f64).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(fail());
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + layout.size()) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation just made; MADV_HUGEPAGE is only
            // advice and does not change the contents (which stay zero).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    // SAFETY: allocated by the global allocator with the layout of `len` T's; all-zero bits
    // are a valid T (Zeroable); length = capacity = len.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Zeroed `Vec<f64>` of `len` elements (see [`zeroed_vec`]).
pub(super) fn zeros(len: usize, what: &str) -> Result<Vec<f64>> {
    zeroed_vec(len, what)
}

/// Grow `v` to at least `len` elements (never shrinks; the contents are not meaningful after).
pub(super) fn grow<T: Zeroable>(v: &mut Vec<T>, len: usize) -> Result<()> {
    if v.len() < len {
        *v = Vec::new();
        *v = zeroed_vec(len, "work buffer")?;
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
pub(super) trait Src: Copy + Send + Sync + Sized {
    fn f(self) -> f64;
    /// [`build_panel_t`] into an f32 panel (overridden for f32 input by a SIMD transposition).
    #[allow(clippy::too_many_arguments)]
    fn build_f32_panel(
        src: &[Self],
        p: usize,
        r0: usize,
        r1: usize,
        shift: &[f64],
        out: &mut [f32],
        sq: &mut [f64],
    ) {
        build_panel_generic(src, p, r0, r1, shift, out, sq)
    }
}
impl Src for f32 {
    #[inline(always)]
    fn f(self) -> f64 {
        self as f64
    }
    fn build_f32_panel(
        src: &[f32],
        p: usize,
        r0: usize,
        r1: usize,
        shift: &[f64],
        out: &mut [f32],
        sq: &mut [f64],
    ) {
        build_panel_f32(src, p, r0, r1, shift, out, sq)
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
pub(super) trait Elem: Zeroable + Send + Sync + 'static {
    fn from_f64(v: f64) -> Self;
    fn get(self) -> f64;
    /// See [`build_panel_t`].
    #[allow(clippy::too_many_arguments)]
    fn build_panel<S: Src>(
        src: &[S],
        p: usize,
        r0: usize,
        r1: usize,
        shift: &[f64],
        out: &mut [Self],
        sq: &mut [f64],
    );
    /// See [`row_stats_portable`].
    fn row_stats(row: &[Self], wa: &[f64], wb: &[f64]) -> [f64; 3] {
        row_stats_portable(row, wa, wb)
    }
    /// `dst[m×m, lower] = a·aᵀ` (column-major; the strict upper triangle is left as it was).
    fn syrk_into(dst: &mut [Self], a: MatRef<'_, Self>, par: Par);
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
    fn build_panel<S: Src>(
        src: &[S],
        p: usize,
        r0: usize,
        r1: usize,
        shift: &[f64],
        out: &mut [f64],
        sq: &mut [f64],
    ) {
        build_panel_generic(src, p, r0, r1, shift, out, sq)
    }
    fn syrk_into(dst: &mut [f64], a: MatRef<'_, f64>, par: Par) {
        let m = a.nrows();
        tri_matmul(
            MatMut::from_column_major_slice_mut(&mut dst[..m * m], m, m),
            BlockStructure::TriangularLower,
            Accum::Replace,
            a,
            BlockStructure::Rectangular,
            a.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
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
    fn build_panel<S: Src>(
        src: &[S],
        p: usize,
        r0: usize,
        r1: usize,
        shift: &[f64],
        out: &mut [f32],
        sq: &mut [f64],
    ) {
        S::build_f32_panel(src, p, r0, r1, shift, out, sq)
    }
    fn row_stats(row: &[f32], wa: &[f64], wb: &[f64]) -> [f64; 3] {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { row_stats_f32_avx2(row, wa, wb) };
            }
        }
        row_stats_portable(row, wa, wb)
    }
    fn syrk_into(dst: &mut [f32], a: MatRef<'_, f32>, par: Par) {
        let m = a.nrows();
        tri_matmul(
            MatMut::from_column_major_slice_mut(&mut dst[..m * m], m, m),
            BlockStructure::TriangularLower,
            Accum::Replace,
            a,
            BlockStructure::Rectangular,
            a.transpose(),
            BlockStructure::Rectangular,
            1.0f32,
            par,
        );
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
        Self::syrk_into(s, a, par);
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

/// Features per task when transposing a panel.
const FEAT_BLOCK: usize = 64;
/// Rows per transposition tile.
const ROW_TILE: usize = 16;

/// Rows `r0..r1` of a row-major `[·, p]` input, shifted and transposed into a feature-major
/// panel: `out[j, i] = T(src[r0+i, j] − shift[j])`, `out` row-major `[p, k]` (k = r1 − r0), and
/// `sq[i] = Σ_j out[j, i]²` (in f64, of the values actually stored). The feature-major layout is
/// the one faer's GEMM runs fastest on for XᵀY (the contraction index contiguous in both
/// operands): about 1.6× the rate of the row-major layout on this machine.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_panel_t<S: Src, T: Elem>(
    src: &[S],
    p: usize,
    r0: usize,
    r1: usize,
    shift: &[f64],
    out: &mut [T],
    sq: &mut [f64],
) {
    T::build_panel(src, p, r0, r1, shift, out, sq)
}

/// Portable [`build_panel_t`].
#[allow(clippy::too_many_arguments)]
fn build_panel_generic<S: Src, T: Elem>(
    src: &[S],
    p: usize,
    r0: usize,
    r1: usize,
    shift: &[f64],
    out: &mut [T],
    sq: &mut [f64],
) {
    let k = r1 - r0;
    let partials: Vec<Vec<f64>> = out[..p * k]
        .par_chunks_mut(FEAT_BLOCK * k)
        .enumerate()
        .map(|(blk, o)| {
            let j0 = blk * FEAT_BLOCK;
            let w = o.len() / k;
            let sh = &shift[j0..j0 + w];
            let mut part = vec![0f64; k];
            // Through a 16 × 64 tile, so that each feature row of the panel is written 16
            // contiguous values at a time (a power-of-two k would otherwise make the 64 write
            // streams collide in the same cache sets).
            let mut tile = [[T::default(); FEAT_BLOCK]; ROW_TILE];
            for i0 in (0..k).step_by(ROW_TILE) {
                let ih = ROW_TILE.min(k - i0);
                for (ii, t) in tile[..ih].iter_mut().enumerate() {
                    let base = (r0 + i0 + ii) * p + j0;
                    let row = &src[base..base + w];
                    for ((t, r), c) in t.iter_mut().zip(row).zip(sh) {
                        *t = T::from_f64(r.f() - c);
                    }
                    part[i0 + ii] = sum_sq(&t[..w]);
                }
                for jj in 0..w {
                    let dst = &mut o[jj * k + i0..jj * k + i0 + ih];
                    for (d, t) in dst.iter_mut().zip(&tile[..ih]) {
                        *d = t[jj];
                    }
                }
            }
            part
        })
        .collect();
    sq[..k].iter_mut().for_each(|v| *v = 0.0);
    for part in &partials {
        for (s, v) in sq[..k].iter_mut().zip(part) {
            *s += v;
        }
    }
}

/// [`build_panel_t`] for f32 input into an f32 panel: `v = f32(f64(x) − c)`, the same two
/// roundings as the portable path. Per example, a_i = Σ_j v_ij² is summed in f64 over the
/// features in order within each block of 64 (no FMA), then over blocks in order: the AVX2 and
/// portable kernels give bit-identical panels and norms.
///
/// The shift c is kept in f64 on purpose. With an f32-representable shift, `x − c` would be exact
/// and, for columns whose offset is large against their spread, every panel value would sit on
/// the coarse grid of ulp(x); faer's f32 GEMM then shows a systematic (not random) rounding bias
/// on such data (measured: mean relative error +2e-7 on the diagonal of XᵀX with 3840σ offsets,
/// against a zero-mean 1e-7 scatter once the values carry full mantissas).
fn build_panel_f32(
    src: &[f32],
    p: usize,
    r0: usize,
    r1: usize,
    shift: &[f64],
    out: &mut [f32],
    sq: &mut [f64],
) {
    let k = r1 - r0;
    let sh = shift;
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let partials: Vec<Vec<f64>> = out[..p * k]
        .par_chunks_mut(FEAT_BLOCK * k)
        .enumerate()
        .map(|(blk, o)| {
            let j0 = blk * FEAT_BLOCK;
            let w = o.len() / k;
            let mut part = vec![0f64; k];
            let full = k / 8 * 8;
            let mut i0 = 0;
            if avx2 && w.is_multiple_of(8) {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: AVX2 is available (checked above); the kernel stays within rows
                    // r0..r0+full of `src`, columns j0..j0+w, and rows 0..w × columns 0..full of
                    // `o`, all in bounds.
                    unsafe {
                        block_f32_avx2(src, p, r0, full, j0, w, &sh[j0..j0 + w], o, k, &mut part)
                    };
                    i0 = full;
                }
            }
            for i in i0..k {
                let row = &src[(r0 + i) * p + j0..(r0 + i) * p + j0 + w];
                let mut acc = 0f64;
                for (jj, (&x, &c)) in row.iter().zip(&sh[j0..j0 + w]).enumerate() {
                    let v = (x as f64 - c) as f32;
                    o[jj * k + i] = v;
                    acc += v as f64 * v as f64;
                }
                part[i] = acc;
            }
            part
        })
        .collect();
    sq[..k].iter_mut().for_each(|v| *v = 0.0);
    for part in &partials {
        for (s, v) in sq[..k].iter_mut().zip(part) {
            *s += v;
        }
    }
}

/// Rows `0..rows` (a multiple of 8) of one feature block: 8 × 8 tiles are loaded, shifted,
/// transposed in registers and stored as 8 consecutive examples of each feature.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_f32_avx2(
    src: &[f32],
    p: usize,
    r0: usize,
    rows: usize,
    j0: usize,
    w: usize,
    sh: &[f64],
    o: &mut [f32],
    k: usize,
    part: &mut [f64],
) {
    use std::arch::x86_64::*;
    debug_assert!(rows.is_multiple_of(8) && w.is_multiple_of(8) && rows <= k);
    debug_assert!((r0 + rows) * p <= src.len() && j0 + w <= p && o.len() >= w * k);
    let sp = src.as_ptr();
    let op = o.as_mut_ptr();
    for i0 in (0..rows).step_by(8) {
        let mut acc_lo = _mm256_setzero_pd();
        let mut acc_hi = _mm256_setzero_pd();
        for jj in (0..w).step_by(8) {
            // SAFETY (all pointer accesses below): row r0+i0+m < r0+rows, columns
            // j0+jj..j0+jj+8 ≤ p; output rows jj+l < w, columns i0..i0+8 ≤ k.
            let (c_lo, c_hi) = unsafe {
                (
                    _mm256_loadu_pd(sh.as_ptr().add(jj)),
                    _mm256_loadu_pd(sh.as_ptr().add(jj + 4)),
                )
            };
            // f32(f64(x) − c) for 8 features of one example.
            macro_rules! ld {
                ($m:expr) => {{
                    let x = unsafe { _mm256_loadu_ps(sp.add((r0 + i0 + $m) * p + j0 + jj)) };
                    let lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), c_lo);
                    let hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)), c_hi);
                    _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo))
                }};
            }
            let (a0, a1, a2, a3) = (ld!(0), ld!(1), ld!(2), ld!(3));
            let (a4, a5, a6, a7) = (ld!(4), ld!(5), ld!(6), ld!(7));
            let t0 = _mm256_unpacklo_ps(a0, a1);
            let t1 = _mm256_unpackhi_ps(a0, a1);
            let t2 = _mm256_unpacklo_ps(a2, a3);
            let t3 = _mm256_unpackhi_ps(a2, a3);
            let t4 = _mm256_unpacklo_ps(a4, a5);
            let t5 = _mm256_unpackhi_ps(a4, a5);
            let t6 = _mm256_unpacklo_ps(a6, a7);
            let t7 = _mm256_unpackhi_ps(a6, a7);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (l, &v) in cols.iter().enumerate() {
                unsafe { _mm256_storeu_ps(op.add((jj + l) * k + i0), v) };
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
                acc_lo = _mm256_add_pd(acc_lo, _mm256_mul_pd(lo, lo));
                acc_hi = _mm256_add_pd(acc_hi, _mm256_mul_pd(hi, hi));
            }
        }
        unsafe {
            _mm256_storeu_pd(part.as_mut_ptr().add(i0), acc_lo);
            _mm256_storeu_pd(part.as_mut_ptr().add(i0 + 4), acc_hi);
        }
    }
}

/// `Σ v²` in f64 over 8 independent lanes.
#[inline(always)]
fn sum_sq<T: Elem>(v: &[T]) -> f64 {
    let mut l = [0f64; 8];
    let mut c = v.chunks_exact(8);
    for c in &mut c {
        for m in 0..8 {
            l[m] += c[m].get() * c[m].get();
        }
    }
    for (m, x) in c.remainder().iter().enumerate() {
        l[m] += x.get() * x.get();
    }
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
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

/// Over a feature-major `[p, k]` panel (row j = feature j over the k examples z_i):
/// `s[j] += Σ_i z_ij`, `sa[j] += Σ_i wa_i z_ij`, `sb[j] += Σ_i wb_i z_ij`. Parallel over
/// features; each sum runs over i in a fixed lane order.
#[allow(clippy::too_many_arguments)]
pub(super) fn vec_stats_t<T: Elem>(
    panel: &[T],
    k: usize,
    wa: &[f64],
    wb: &[f64],
    s: &mut [f64],
    sa: &mut [f64],
    sb: &mut [f64],
) {
    let p = s.len();
    panel[..p * k]
        .par_chunks(k)
        .zip(s.par_iter_mut())
        .zip(sa.par_iter_mut())
        .zip(sb.par_iter_mut())
        .with_min_len(8)
        .for_each(|(((row, s), sa), sb)| {
            let [t0, t1, t2] = T::row_stats(row, &wa[..k], &wb[..k]);
            *s += t0;
            *sa += t1;
            *sb += t2;
        });
}

/// Combine 8 lanes pairwise.
#[inline(always)]
fn combine8(t: [f64; 8]) -> f64 {
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// `(Σ z_i, Σ wa_i z_i, Σ wb_i z_i)` in f64: lane l takes i ≡ l (mod 8) over whole chunks of 8,
/// the tail goes to lane 0 in order, lanes combine pairwise. No FMA, so the AVX2 kernel
/// ([`row_stats_f32_avx2`]) rounds identically.
#[inline(always)]
fn row_stats_portable<T: Elem>(row: &[T], wa: &[f64], wb: &[f64]) -> [f64; 3] {
    let (mut t0, mut t1, mut t2) = ([0f64; 8], [0f64; 8], [0f64; 8]);
    let mut rc = row.chunks_exact(8);
    let mut ac = wa.chunks_exact(8);
    let mut bc = wb.chunks_exact(8);
    for ((r, a), b) in (&mut rc).zip(&mut ac).zip(&mut bc) {
        for l in 0..8 {
            let v = r[l].get();
            t0[l] += v;
            t1[l] += a[l] * v;
            t2[l] += b[l] * v;
        }
    }
    tail_and_combine(rc.remainder(), ac.remainder(), bc.remainder(), t0, t1, t2)
}

#[inline(always)]
fn tail_and_combine<T: Elem>(
    r: &[T],
    a: &[f64],
    b: &[f64],
    mut t0: [f64; 8],
    mut t1: [f64; 8],
    mut t2: [f64; 8],
) -> [f64; 3] {
    for ((r, a), b) in r.iter().zip(a).zip(b) {
        let v = r.get();
        t0[0] += v;
        t1[0] += a * v;
        t2[0] += b * v;
    }
    [combine8(t0), combine8(t1), combine8(t2)]
}

/// [`row_stats_portable`] for f32 rows with AVX2 (same lanes, same operations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_stats_f32_avx2(row: &[f32], wa: &[f64], wb: &[f64]) -> [f64; 3] {
    use std::arch::x86_64::*;
    let k = row.len().min(wa.len()).min(wb.len());
    let full = k / 8 * 8;
    let z = _mm256_setzero_pd();
    let (mut s0, mut s1, mut a0, mut a1, mut b0, mut b1) = (z, z, z, z, z, z);
    let (rp, ap, bp) = (row.as_ptr(), wa.as_ptr(), wb.as_ptr());
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 ≤ full ≤ k, within all three slices.
        let (v, al, ah, bl, bh) = unsafe {
            (
                _mm256_loadu_ps(rp.add(i)),
                _mm256_loadu_pd(ap.add(i)),
                _mm256_loadu_pd(ap.add(i + 4)),
                _mm256_loadu_pd(bp.add(i)),
                _mm256_loadu_pd(bp.add(i + 4)),
            )
        };
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
        s0 = _mm256_add_pd(s0, lo);
        s1 = _mm256_add_pd(s1, hi);
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(al, lo));
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(ah, hi));
        b0 = _mm256_add_pd(b0, _mm256_mul_pd(bl, lo));
        b1 = _mm256_add_pd(b1, _mm256_mul_pd(bh, hi));
    }
    let lanes = |lo: __m256d, hi: __m256d| {
        let mut t = [0f64; 8];
        // SAFETY: t has room for 8 f64.
        unsafe {
            _mm256_storeu_pd(t.as_mut_ptr(), lo);
            _mm256_storeu_pd(t.as_mut_ptr().add(4), hi);
        }
        t
    };
    let (t0, t1, t2) = (lanes(s0, s1), lanes(a0, a1), lanes(b0, b1));
    tail_and_combine(&row[full..k], &wa[full..k], &wb[full..k], t0, t1, t2)
}

/// Rows per task in the passes over whole inputs (fixed, so sums do not depend on threads).
const ROW_CHUNK: usize = 256;

/// Column means of a row-major `[n, p]` input in f64: per-chunk partial sums (parallel over
/// chunks of 256 rows, rows in order inside a chunk), combined in chunk order. A column that
/// holds a NaN or an infinity gets a non-finite mean (a sum of finite f32/f64 values cannot
/// overflow f64 here).
pub(super) fn col_means<S: Src>(src: &[S], n: usize, p: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = src[..n * p]
        .par_chunks(ROW_CHUNK * p)
        .map(|c| {
            let mut m = vec![0f64; p];
            for row in c.chunks_exact(p) {
                for (m, r) in m.iter_mut().zip(row) {
                    *m += r.f();
                }
            }
            m
        })
        .collect();
    let mut m = vec![0f64; p];
    for part in &parts {
        for (a, b) in m.iter_mut().zip(part) {
            *a += b;
        }
    }
    let inv = 1.0 / n as f64;
    m.iter_mut().for_each(|v| *v *= inv);
    m
}

/// Whether every value is finite: `Σ 0·v` is NaN exactly when some v is NaN or infinite
/// (branch-free, so it vectorises).
pub(super) fn all_finite<S: Src>(src: &[S]) -> bool {
    src.par_chunks(1 << 16)
        .map(|c| {
            let mut l = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for c in &mut it {
                for m in 0..8 {
                    l[m] += 0.0 * c[m].f();
                }
            }
            for v in it.remainder() {
                l[0] += 0.0 * v.f();
            }
            l.iter().sum::<f64>() == 0.0
        })
        .collect::<Vec<bool>>()
        .into_iter()
        .all(|b| b)
}

/// Index of the first row holding a NaN or an infinity (slow; for error messages).
pub(super) fn first_nonfinite_row<S: Src>(src: &[S], p: usize) -> Option<usize> {
    src.chunks(p.max(1))
        .position(|r| r.iter().any(|v| !v.f().is_finite()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 panel builder and the portable one agree bit for bit, on ragged shapes.
    #[test]
    fn f32_panel_build_matches_portable() {
        for (n, p, r0, r1) in [
            (37, 131, 3, 37),
            (64, 64, 0, 64),
            (20, 7, 1, 20),
            (9, 200, 0, 8),
        ] {
            let src: Vec<f32> = (0..n * p)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 150.0)
                .collect();
            let shift: Vec<f64> = (0..p).map(|j| j as f64 * 1.5001 - 20.3).collect();
            let k = r1 - r0;
            let (mut a, mut b) = (vec![0f32; p * k], vec![0f32; p * k]);
            let (mut sa, mut sb) = (vec![0f64; k], vec![0f64; k]);
            build_panel_f32(&src, p, r0, r1, &shift, &mut a, &mut sa);
            build_panel_generic::<f32, f32>(&src, p, r0, r1, &shift, &mut b, &mut sb);
            assert_eq!(a, b);
            let wa: Vec<f64> = (0..k).map(|i| i as f64 * 0.25 - 3.0).collect();
            let wb: Vec<f64> = (0..k).map(|i| (i * i) as f64 * 1e-3).collect();
            for j in 0..p {
                let row = &a[j * k..(j + 1) * k];
                let fast = <f32 as Elem>::row_stats(row, &wa, &wb);
                assert_eq!(fast, row_stats_portable(row, &wa, &wb));
            }
            for (x, y) in sa.iter().zip(&sb) {
                assert!((x - y).abs() <= 1e-12 * y.abs(), "{x} {y}");
            }
            for i in 0..k {
                for j in 0..p {
                    assert_eq!(
                        a[j * k + i],
                        (src[(r0 + i) * p + j] as f64 - shift[j]) as f32
                    );
                }
            }
        }
    }
}
