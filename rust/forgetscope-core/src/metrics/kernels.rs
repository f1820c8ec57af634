//! Reductions over f32 slices with f64 accumulation, in a fixed lane order so that results do not
//! depend on the thread count or on which CPU path runs.
//!
//! Each kernel keeps `LANES` independent f64 partial sums (lane j takes elements ≡ j mod LANES) and
//! combines them pairwise at the end. The bodies are compiled twice: generic, and with AVX2 enabled
//! (4-wide f64), picked at run time. No fused multiply-add is used, so both paths round identically.
//! Products of two f32 values are exact in f64; only the additions round.

const LANES: usize = 8;

#[inline(always)]
fn combine(acc: [f64; LANES]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

use crate::simd::dispatch;

/// Test reference: the plain sum of squares the fused kernels must agree with.
#[cfg(test)]
#[inline(always)]
fn sum_sq_body(a: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = a.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            let x = c[j] as f64;
            acc[j] += x * x;
        }
    }
    for (j, &x) in it.remainder().iter().enumerate() {
        acc[j] += x as f64 * x as f64;
    }
    combine(acc)
}

#[cfg(test)]
dispatch! {
    /// Σ aᵢ² in f64.
    pub fn sum_sq(a: &[f32]) -> f64 = sum_sq_body;
}

/// Test reference for the difference kernels (sum and equal count in one loop).
#[cfg(test)]
#[inline(always)]
fn diff_sq_eq_body(a: &[f32], b: &[f32]) -> (f64, u64) {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let mut eq = [0u32; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..LANES {
            let d = cb[j] as f64 - ca[j] as f64;
            acc[j] += d * d;
            eq[j] += (ca[j] == cb[j]) as u32;
        }
    }
    for (j, (&x, &y)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        let d = y as f64 - x as f64;
        acc[j] += d * d;
        eq[j] += (x == y) as u32;
    }
    (combine(acc), eq.iter().map(|&e| e as u64).sum())
}

#[cfg(test)]
dispatch! {
    /// (Σ (bᵢ − aᵢ)², #{aᵢ = bᵢ}) in f64. Slices of at most 2³² elements (callers pass sub-blocks).
    pub fn diff_sq_eq(a: &[f32], b: &[f32]) -> (f64, u64) = diff_sq_eq_body;
}

/// Sums of one pass over two aligned slices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairStats {
    /// Σ aᵢ².
    pub sq_a: f64,
    /// Σ bᵢ².
    pub sq_b: f64,
    /// Σ (bᵢ − aᵢ)².
    pub diff_sq: f64,
    /// #{aᵢ = bᵢ}.
    pub equal: u64,
}

/// The 8 lane accumulators of [`pair_stats`]; the scalar step below is the reference the AVX2
/// loops reproduce lane for lane (and finish their tails with).
#[derive(Default)]
struct PairLanes {
    sa: [f64; LANES],
    sb: [f64; LANES],
    sd: [f64; LANES],
    equal: u64,
}

impl PairLanes {
    #[inline(always)]
    fn step(&mut self, j: usize, x: f32, y: f32) {
        let (xf, yf) = (x as f64, y as f64);
        let d = yf - xf;
        self.sa[j] = xf.mul_add(xf, self.sa[j]);
        self.sb[j] = yf.mul_add(yf, self.sb[j]);
        self.sd[j] = d.mul_add(d, self.sd[j]);
        self.equal += (x == y) as u64;
    }

    fn finish(self) -> PairStats {
        PairStats {
            sq_a: combine(self.sa),
            sq_b: combine(self.sb),
            diff_sq: combine(self.sd),
            equal: self.equal,
        }
    }

    /// Spill AVX2 accumulators (lanes 0–3 in `.0`, 4–7 in `.1`; per-lane equal counts in `eq`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn from_avx2(
        sa: (std::arch::x86_64::__m256d, std::arch::x86_64::__m256d),
        sb: (std::arch::x86_64::__m256d, std::arch::x86_64::__m256d),
        sd: (std::arch::x86_64::__m256d, std::arch::x86_64::__m256d),
        eq: std::arch::x86_64::__m256i,
    ) -> PairLanes {
        use std::arch::x86_64::*;
        let lanes = |(lo, hi): (__m256d, __m256d)| {
            let mut out = [0f64; LANES];
            // SAFETY: out holds 8 f64; unaligned stores.
            unsafe {
                _mm256_storeu_pd(out.as_mut_ptr(), lo);
                _mm256_storeu_pd(out.as_mut_ptr().add(4), hi);
            }
            out
        };
        let mut counts = [0u32; 8];
        // SAFETY: counts holds 8 i32-sized values.
        unsafe { _mm256_storeu_si256(counts.as_mut_ptr() as *mut __m256i, eq) };
        PairLanes {
            sa: lanes(sa),
            sb: lanes(sb),
            sd: lanes(sd),
            equal: counts.iter().map(|&c| c as u64).sum(),
        }
    }
}

/// Portable reference of [`pair_stats`]: the same 8 lanes and the same fused multiply-adds as
/// the AVX2 path, so both give bit-identical results.
fn pair_stats_generic(a: &[f32], b: &[f32]) -> PairStats {
    let mut lanes = PairLanes::default();
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        lanes.step(i % LANES, x, y);
    }
    lanes.finish()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pair_stats_avx2(a: &[f32], b: &[f32]) -> PairStats {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let (mut sa0, mut sa1, mut sb0, mut sb1, mut sd0, mut sd1) = (
        _mm256_setzero_pd(),
        _mm256_setzero_pd(),
        _mm256_setzero_pd(),
        _mm256_setzero_pd(),
        _mm256_setzero_pd(),
        _mm256_setzero_pd(),
    );
    let mut eq = _mm256_setzero_si256();
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 ≤ full ≤ len of both slices; unaligned loads.
        let (va, vb, a0, a1, b0, b1) = unsafe {
            let pa = a.as_ptr().add(i);
            let pb = b.as_ptr().add(i);
            (
                _mm256_loadu_ps(pa),
                _mm256_loadu_ps(pb),
                _mm256_cvtps_pd(_mm_loadu_ps(pa)),
                _mm256_cvtps_pd(_mm_loadu_ps(pa.add(4))),
                _mm256_cvtps_pd(_mm_loadu_ps(pb)),
                _mm256_cvtps_pd(_mm_loadu_ps(pb.add(4))),
            )
        };
        // Equal lanes are all-ones (−1 as i32): subtracting counts them.
        eq = _mm256_sub_epi32(eq, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(va, vb)));
        let d0 = _mm256_sub_pd(b0, a0);
        let d1 = _mm256_sub_pd(b1, a1);
        sa0 = _mm256_fmadd_pd(a0, a0, sa0);
        sa1 = _mm256_fmadd_pd(a1, a1, sa1);
        sb0 = _mm256_fmadd_pd(b0, b0, sb0);
        sb1 = _mm256_fmadd_pd(b1, b1, sb1);
        sd0 = _mm256_fmadd_pd(d0, d0, sd0);
        sd1 = _mm256_fmadd_pd(d1, d1, sd1);
        i += LANES;
    }
    let mut lanes = PairLanes::from_avx2((sa0, sa1), (sb0, sb1), (sd0, sd1), eq);
    for (j, (&x, &y)) in a[full..n].iter().zip(&b[full..n]).enumerate() {
        lanes.step(j, x, y);
    }
    lanes.finish()
}

/// Portable reference of [`diff_sq`] (same lanes, same fused multiply-adds as the AVX2 path).
fn diff_sq_generic(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let d = y as f64 - x as f64;
        acc[i % LANES] = d.mul_add(d, acc[i % LANES]);
    }
    combine(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn diff_sq_avx2(a: &[f32], b: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 ≤ full ≤ len of both slices; unaligned loads.
        let (a0, a1, b0, b1) = unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            (
                _mm256_cvtps_pd(_mm_loadu_ps(pa)),
                _mm256_cvtps_pd(_mm_loadu_ps(pa.add(4))),
                _mm256_cvtps_pd(_mm_loadu_ps(pb)),
                _mm256_cvtps_pd(_mm_loadu_ps(pb.add(4))),
            )
        };
        let (d0, d1) = (_mm256_sub_pd(b0, a0), _mm256_sub_pd(b1, a1));
        s0 = _mm256_fmadd_pd(d0, d0, s0);
        s1 = _mm256_fmadd_pd(d1, d1, s1);
        i += LANES;
    }
    let mut acc = [0f64; LANES];
    // SAFETY: acc holds 8 f64; unaligned stores.
    unsafe {
        _mm256_storeu_pd(acc.as_mut_ptr(), s0);
        _mm256_storeu_pd(acc.as_mut_ptr().add(4), s1);
    }
    for (j, (&x, &y)) in a[full..n].iter().zip(&b[full..n]).enumerate() {
        let d = y as f64 - x as f64;
        acc[j] = d.mul_add(d, acc[j]);
    }
    combine(acc)
}

/// Σ (bᵢ − aᵢ)² in f64 (8 lanes, fused multiply-add; bit-identical on every CPU path).
pub fn diff_sq(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { diff_sq_avx2(&a[..n], &b[..n]) };
        }
    }
    diff_sq_generic(&a[..n], &b[..n])
}

/// [`pair_stats`] straight from little-endian bf16 bytes (2 bytes per element), without the f32
/// scratch pass. bf16 → f32 is exact, and lanes and operations are those of [`pair_stats`], so the
/// result is bit-identical to decoding first.
pub fn pair_stats_bf16(a: &[u8], b: &[u8]) -> PairStats {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { pair_stats_bf16_avx2(a, b) };
        }
    }
    let n = a.len().min(b.len()) / 2;
    let mut fa = vec![0f32; n];
    let mut fb = vec![0f32; n];
    crate::dtype::decode_plain(crate::dtype::Dtype::BF16, &a[..2 * n], &mut fa);
    crate::dtype::decode_plain(crate::dtype::Dtype::BF16, &b[..2 * n], &mut fb);
    pair_stats_generic(&fa, &fb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pair_stats_bf16_avx2(a: &[u8], b: &[u8]) -> PairStats {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / 2;
    let full = n / LANES * LANES;
    let zero = _mm256_setzero_pd();
    let (mut sa0, mut sa1, mut sb0, mut sb1, mut sd0, mut sd1) =
        (zero, zero, zero, zero, zero, zero);
    let mut eq = _mm256_setzero_si256();
    let widen = |x: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(x)));
    let mut i = 0;
    while i < full {
        // SAFETY: 2·(i + 8) ≤ 2·full ≤ len of both slices; unaligned 16-byte loads.
        let (va, vb) = unsafe {
            (
                widen(_mm_loadu_si128(a.as_ptr().add(2 * i) as *const __m128i)),
                widen(_mm_loadu_si128(b.as_ptr().add(2 * i) as *const __m128i)),
            )
        };
        eq = _mm256_sub_epi32(eq, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(va, vb)));
        let a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(va));
        let a1 = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(va));
        let b0 = _mm256_cvtps_pd(_mm256_castps256_ps128(vb));
        let b1 = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(vb));
        let d0 = _mm256_sub_pd(b0, a0);
        let d1 = _mm256_sub_pd(b1, a1);
        sa0 = _mm256_fmadd_pd(a0, a0, sa0);
        sa1 = _mm256_fmadd_pd(a1, a1, sa1);
        sb0 = _mm256_fmadd_pd(b0, b0, sb0);
        sb1 = _mm256_fmadd_pd(b1, b1, sb1);
        sd0 = _mm256_fmadd_pd(d0, d0, sd0);
        sd1 = _mm256_fmadd_pd(d1, d1, sd1);
        i += LANES;
    }
    let mut lanes = PairLanes::from_avx2((sa0, sa1), (sb0, sb1), (sd0, sd1), eq);
    let bf = |bytes: &[u8], k: usize| {
        f32::from_bits((u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]) as u32) << 16)
    };
    for k in full..n {
        lanes.step(k - full, bf(a, k), bf(b, k));
    }
    lanes.finish()
}

/// Σa², Σb², Σ(b − a)² and #{a = b} in one pass, f64 sums (8 lanes, fused multiply-add).
/// Slices of at most 2³² elements (callers pass sub-blocks).
pub fn pair_stats(a: &[f32], b: &[f32]) -> PairStats {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { pair_stats_avx2(a, b) };
        }
    }
    pair_stats_generic(a, b)
}

/// Σaᵢbᵢ, Σaᵢ², Σbᵢ² of one pass over two aligned slices (gradient interference, METRICS.md §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DotStats {
    /// Σ aᵢbᵢ.
    pub dot: f64,
    /// Σ aᵢ².
    pub sq_a: f64,
    /// Σ bᵢ².
    pub sq_b: f64,
}

/// Portable reference of [`dot_stats`]. A product of two f32 values is exact in f64, so a plain
/// multiply-then-add rounds exactly like the AVX2 path's fused multiply-add (one rounding, at the
/// add): both paths are bit-identical without paying for a software `mul_add` on CPUs without FMA.
fn dot_stats_generic(a: &[f32], b: &[f32]) -> DotStats {
    let (mut d, mut sa, mut sb) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (j, x, y) = (i % LANES, x as f64, y as f64);
        d[j] += x * y;
        sa[j] += x * x;
        sb[j] += y * y;
    }
    DotStats {
        dot: combine(d),
        sq_a: combine(sa),
        sq_b: combine(sb),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_stats_avx2(a: &[f32], b: &[f32]) -> DotStats {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    let zero = _mm256_setzero_pd();
    let (mut d0, mut d1, mut sa0, mut sa1, mut sb0, mut sb1) = (zero, zero, zero, zero, zero, zero);
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 ≤ full ≤ len of both slices; unaligned loads.
        let (a0, a1, b0, b1) = unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            (
                _mm256_cvtps_pd(_mm_loadu_ps(pa)),
                _mm256_cvtps_pd(_mm_loadu_ps(pa.add(4))),
                _mm256_cvtps_pd(_mm_loadu_ps(pb)),
                _mm256_cvtps_pd(_mm_loadu_ps(pb.add(4))),
            )
        };
        d0 = _mm256_fmadd_pd(a0, b0, d0);
        d1 = _mm256_fmadd_pd(a1, b1, d1);
        sa0 = _mm256_fmadd_pd(a0, a0, sa0);
        sa1 = _mm256_fmadd_pd(a1, a1, sa1);
        sb0 = _mm256_fmadd_pd(b0, b0, sb0);
        sb1 = _mm256_fmadd_pd(b1, b1, sb1);
        i += LANES;
    }
    let lanes = |lo: __m256d, hi: __m256d| {
        let mut out = [0f64; LANES];
        // SAFETY: out holds 8 f64; unaligned stores.
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), lo);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), hi);
        }
        out
    };
    let (mut d, mut sa, mut sb) = (lanes(d0, d1), lanes(sa0, sa1), lanes(sb0, sb1));
    for (j, (&x, &y)) in a[full..n].iter().zip(&b[full..n]).enumerate() {
        let (x, y) = (x as f64, y as f64);
        d[j] += x * y;
        sa[j] += x * x;
        sb[j] += y * y;
    }
    DotStats {
        dot: combine(d),
        sq_a: combine(sa),
        sq_b: combine(sb),
    }
}

/// Σab, Σa², Σb² of two f32 slices in f64 (8 lanes; bit-identical on every CPU path).
pub fn dot_stats(a: &[f32], b: &[f32]) -> DotStats {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { dot_stats_avx2(&a[..n], &b[..n]) };
        }
    }
    dot_stats_generic(&a[..n], &b[..n])
}

#[inline(always)]
fn dot_stats_f64_body(a: &[f64], b: &[f64]) -> DotStats {
    let (mut d, mut sa, mut sb) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..LANES {
            d[j] += ca[j] * cb[j];
            sa[j] += ca[j] * ca[j];
            sb[j] += cb[j] * cb[j];
        }
    }
    for (j, (&x, &y)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        d[j] += x * y;
        sa[j] += x * x;
        sb[j] += y * y;
    }
    DotStats {
        dot: combine(d),
        sq_a: combine(sa),
        sq_b: combine(sb),
    }
}

dispatch! {
    /// [`dot_stats`] of two f64 slices (products round here; no fused multiply-add, so every CPU
    /// path agrees).
    pub fn dot_stats_f64(a: &[f64], b: &[f64]) -> DotStats = dot_stats_f64_body;
}

#[inline(always)]
fn step_dot_body(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    let n = a.len().min(b.len()).min(c.len());
    let mut acc = [0f64; LANES];
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    let mut ic = c.chunks_exact(LANES);
    for ((ca, cb), cc) in (&mut ia).zip(&mut ib).zip(&mut ic) {
        for j in 0..LANES {
            let (x, y, z) = (ca[j] as f64, cb[j] as f64, cc[j] as f64);
            acc[j] += (y - x) * (z - y);
        }
    }
    for (j, ((&x, &y), &z)) in ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .zip(ic.remainder())
        .enumerate()
    {
        let (x, y, z) = (x as f64, y as f64, z as f64);
        acc[j] += (y - x) * (z - y);
    }
    combine(acc)
}

dispatch! {
    /// Σ (bᵢ − aᵢ)(cᵢ − bᵢ): the dot product of two consecutive steps, in f64.
    pub fn step_dot(a: &[f32], b: &[f32], c: &[f32]) -> f64 = step_dot_body;
}

/// (#NaN, #±Inf) of a slice.
pub fn count_nonfinite(a: &[f32]) -> (u64, u64) {
    let mut nan = 0u64;
    let mut inf = 0u64;
    for &x in a {
        nan += x.is_nan() as u64;
        inf += x.is_infinite() as u64;
    }
    (nan, inf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_matches_dispatched_bitwise() {
        let a: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 3) as f32 * 1e-4)
            .collect();
        let c: Vec<f32> = b.iter().map(|x| x * 1.001).collect();
        assert_eq!(sum_sq(&a).to_bits(), sum_sq_body(&a).to_bits());
        assert_eq!(
            diff_sq_eq(&a, &b).0.to_bits(),
            diff_sq_eq_body(&a, &b).0.to_bits()
        );
        assert_eq!(diff_sq_eq(&a, &b).1, 1003 / 3 + 1);
        assert_eq!(
            step_dot(&a, &b, &c).to_bits(),
            step_dot_body(&a, &b, &c).to_bits()
        );
        assert_eq!(dot_stats(&a, &c), dot_stats_generic(&a, &c));
        assert_eq!(
            dot_stats(&a[3..], &c[3..]),
            dot_stats_generic(&a[3..], &c[3..])
        );
        let (a64, c64): (Vec<f64>, Vec<f64>) = (
            a.iter().map(|&x| x as f64).collect(),
            c.iter().map(|&x| x as f64).collect(),
        );
        // Exact f32 products: the f64 kernel on widened inputs rounds the same way.
        assert_eq!(dot_stats_f64(&a64, &c64), dot_stats(&a, &c));
        let naive: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
        assert!((sum_sq(&a) - naive).abs() < 1e-12 * naive);
    }
}
