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

macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty = $body:ident;) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2($($arg: $ty),*) -> $ret {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

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

dispatch! {
    /// Σ aᵢ² in f64.
    pub fn sum_sq(a: &[f32]) -> f64 = sum_sq_body;
}

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

dispatch! {
    /// (Σ (bᵢ − aᵢ)², #{aᵢ = bᵢ}) in f64. Slices of at most 2³² elements (callers pass sub-blocks).
    pub fn diff_sq_eq(a: &[f32], b: &[f32]) -> (f64, u64) = diff_sq_eq_body;
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
        let naive: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
        assert!((sum_sq(&a) - naive).abs() < 1e-12 * naive);
    }
}
