//! `weight_sketch`: Johnson–Lindenstrauss random-projection sketches of weight tensors, so that a
//! candidate checkpoint can be compared with a base that is not at hand (the base fingerprint,
//! [`crate::stream::fingerprint`]). Source: Achlioptas, "Database-friendly random projections:
//! Johnson–Lindenstrauss with binary coins", JCSS 66 (2003) (the ±1 projection and its moment
//! bound); METRICS.md §1.1 for the drift quantities estimated.
//!
//! **Sketch** [ours, on Achlioptas' construction]. For a tensor W flattened row-major to
//! w ∈ R^n and a sketch dimension r, the stored sketch is the *unscaled* projection
//!
//! ```text
//! y = S·w ∈ R^r,   S_ji = ±1,   ‖Sx‖²/r estimates ‖x‖²   (E‖Sx‖²/r = ‖x‖² exactly)
//! ```
//!
//! S is never stored: S_ji is bit (j mod 64) of `mix(k_b + i·γ)` (set = −1), with
//! b = ⌊j/64⌋, `mix` the splitmix64 finaliser, γ = 0x9E3779B97F4A7C15 and the block key
//! k_b = mix(seed ^ mix(name_hash + (b+1)·γ)), name_hash = mix(FNV-1a-64(tensor name)). The same
//! (seed, name, r) gives the same S for the base and for any candidate, so
//! S·c − S·w = S·(c − w) and D̂ = ‖S·c − S·w‖/√r estimates D = ‖C − W‖_F. Sketches are linear: the
//! sketch of a segment (a head's row block, an expert's slice) is the partial sum over its elements,
//! a tensor's sketch is the sum of its segments', and sums of sketches of *different* tensors
//! (independent keys) are sketches of the concatenation — which is how per-head, per-expert and
//! per-layer drift are estimated with the same guarantee as one tensor.
//!
//! **Error bound** (per estimate, failure probability δ; treating the hash bits as fair coins).
//! With x = c − w and Q_j = (s_j·x)², ‖Sx‖² = Σ_j Q_j, the Q_j independent with E Q_j = ‖x‖²:
//! - upper tail: E(s·x)^{2k} ≤ E(g·x)^{2k} for a Gaussian g (Achlioptas, Lemma 5: term-by-term
//!   domination of the multinomial expansion), so E e^{λQ} ≤ (1 − 2λ‖x‖²)^{−1/2} and Chernoff gives
//!   P(‖Sx‖²/r ≥ (1+ε)‖x‖²) ≤ exp(−(r/2)(ε − ln(1+ε)));
//! - lower tail: e^{−y} ≤ 1 − y + y²/2 for y ≥ 0 and E Q² ≤ 3‖x‖⁴ give
//!   P(‖Sx‖²/r ≤ (1−ε)‖x‖²) ≤ exp(r·min_{λ≥0}[λ(1−ε) + ln(1 − λ + 3λ²/2)]).
//!
//! [`jl_bound`] solves each tail = δ/2 for ε₊, ε₋ (bisection; the inner minimum by ternary search,
//! the function being convex on [0, 1/3] where its minimum lies). With probability ≥ 1 − δ,
//! D ∈ [D̂/√(1+ε₊), D̂/√(1−ε₋)], and |D̂ − D| ≤ ρ·D with
//! ρ = max(√(1+ε₊) − 1, 1 − √(1−ε₋)) (`rel_error`). At r = 64, δ = 0.01: ε₊ = 0.69, ε₋ = 0.65,
//! ρ = 0.41, D ∈ [0.77·D̂, 1.69·D̂]; r = 256: ρ = 0.17; r = 1024: ρ = 0.078 (ρ ∝ 1/√r). The
//! standard deviation of D̂/D is only ≈ 1/√(2r) = 0.088 at r = 64: the bound is a worst-case 99%
//! guarantee over every x, not a typical error. When r·ln(6/5) < ln(2/δ) there is no lower-tail guarantee (ε₋ = 1,
//! `hi_factor` = ∞). The bound holds for every x (no dependence on n, sparsity or scale).
//!
//! **Exact zero.** A 64-bit content hash per segment, Σ_i mix(k_h + i·γ ^ bits(w_i)·K) mod 2⁶⁴
//! (order-free, so chunking does not matter; −0.0 hashed as +0.0; K odd), detects bit-identical
//! segments: their drift is exactly 0, not an estimate (false match probability ≈ 2⁻⁶⁴).
//!
//! **Numerics.** Values decoded to f32, added with their sign into f64 accumulators (±x is exact; only
//! the additions round, ≈ 1e-16 relative to ‖W‖, negligible next to the JL error); no fused
//! multiply-add, so every CPU path rounds identically.
//!
//! **Cost.** r additions per element plus one 64-bit hash per element per 64 rows of S; memory
//! O(r) per accumulator. The kernel is compiled generic, with AVX2 and with AVX-512F (picked at run
//! time), 4 resp. 8 rows of S per instruction.

use serde::Serialize;

use crate::error::{Error, Result};

/// Default sketch dimension r.
pub const DEFAULT_SKETCH_DIM: usize = 64;
/// Largest sketch dimension accepted (the cost is r additions per element).
pub const MAX_SKETCH_DIM: usize = 4096;

/// Weyl increment of splitmix64.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Odd multiplier applied to value bits in the content hash.
const HASH_MUL: u64 = 0xFF51_AFD7_ED55_8CCD;
/// Salt separating the content-hash key from the sign keys.
const HASH_SALT: u64 = 0x5851_F42D_4C95_7F2D;

/// The splitmix64 finaliser (a bijection on u64).
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// mix(FNV-1a-64 of the UTF-8 bytes of `name`).
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}

/// The keys that define the sign matrix S (r rows) of one tensor, and its content-hash key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignKeys {
    r: usize,
    blocks: Vec<u64>,
    hash_key: u64,
}

impl SignKeys {
    /// Keys for `r` rows of S for the tensor `name` under `seed`. Errors when r is 0 or above
    /// [`MAX_SKETCH_DIM`].
    pub fn new(seed: u64, name: &str, r: usize) -> Result<SignKeys> {
        check_dim(r)?;
        let nh = name_hash(name);
        let blocks = (0..r.div_ceil(64) as u64)
            .map(|b| mix(seed ^ mix(nh.wrapping_add((b + 1).wrapping_mul(GAMMA)))))
            .collect();
        Ok(SignKeys {
            r,
            blocks,
            hash_key: mix(seed ^ nh ^ HASH_SALT),
        })
    }

    /// Sketch dimension r.
    pub fn dim(&self) -> usize {
        self.r
    }

    /// The 64 sign bits of element `i` for rows [64b, 64b+64) (bit l set ⇔ S_{64b+l, i} = −1).
    pub fn bits(&self, b: usize, i: u64) -> u64 {
        mix(self.blocks[b].wrapping_add(i.wrapping_mul(GAMMA)))
    }
}

/// Checks 1 ≤ r ≤ [`MAX_SKETCH_DIM`].
pub fn check_dim(r: usize) -> Result<()> {
    if r == 0 || r > MAX_SKETCH_DIM {
        return Err(Error::Config {
            reason: format!("sketch dimension must be between 1 and {MAX_SKETCH_DIM}, got {r}"),
        });
    }
    Ok(())
}

/// One 64-row block: `acc[l] += ±x` for every value, sign from bit l of the element's hash.
#[inline(always)]
fn block_body(acc: &mut [f64], key: u64, first: u64, vals: &[f32]) {
    if let Ok(a) = <&mut [f64; 64]>::try_from(&mut *acc) {
        // A local copy lets the compiler keep the 64 lanes in registers (AVX-512: 8 zmm).
        let mut loc = *a;
        let mut i = first;
        for &v in vals {
            let h = mix(key.wrapping_add(i.wrapping_mul(GAMMA)));
            let xb = f64::from(v).to_bits();
            for (l, s) in loc.iter_mut().enumerate() {
                // (h >> l) << 63 moves bit l to the sign bit and clears everything else.
                *s += f64::from_bits(xb ^ ((h >> l) << 63));
            }
            i = i.wrapping_add(1);
        }
        *a = loc;
    } else {
        let mut i = first;
        for &v in vals {
            let h = mix(key.wrapping_add(i.wrapping_mul(GAMMA)));
            let xb = f64::from(v).to_bits();
            for (l, s) in acc.iter_mut().enumerate() {
                *s += f64::from_bits(xb ^ ((h >> l) << 63));
            }
            i = i.wrapping_add(1);
        }
    }
}

#[inline(always)]
fn update_body(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32]) {
    for (b, &key) in keys.iter().enumerate() {
        let lo = 64 * b;
        let hi = (lo + 64).min(acc.len());
        block_body(&mut acc[lo..hi], key, first, vals);
    }
}

/// `acc += S[:, first..first+len]·vals` (unscaled ±1 entries) for the tensor of `keys`, where
/// `vals` are elements `first..` of the flattened tensor. `acc.len()` must be `keys.dim()`.
pub fn sketch_update(acc: &mut [f64], keys: &SignKeys, first: u64, vals: &[f32]) {
    debug_assert_eq!(acc.len(), keys.r);
    let n = keys.r.min(acc.len());
    let acc = &mut acc[..n];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32]) {
                update_body(acc, keys, first, vals)
            }
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { avx512(acc, &keys.blocks, first, vals) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32]) {
                update_body(acc, keys, first, vals)
            }
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(acc, &keys.blocks, first, vals) };
        }
    }
    update_body(acc, &keys.blocks, first, vals)
}

/// Generic path only, for tests (the dispatched paths must agree with it bit for bit).
#[cfg(test)]
fn sketch_update_generic(acc: &mut [f64], keys: &SignKeys, first: u64, vals: &[f32]) {
    update_body(acc, &keys.blocks, first, vals)
}

/// Content hash (wrapping sum of per-element hashes, order-free) and Σ x² (f64, 8 lanes) of
/// elements `first..first+len` of the tensor of `keys`.
pub fn hash_and_sq(keys: &SignKeys, first: u64, vals: &[f32]) -> (u64, f64) {
    let mut h = 0u64;
    let mut acc = [0f64; 8];
    let mut i = first;
    for c in vals.chunks(8) {
        for (j, &v) in c.iter().enumerate() {
            // −0.0 and +0.0 are the same value: hash them alike.
            let bits = if v == 0.0 {
                0u64
            } else {
                u64::from(v.to_bits())
            };
            h = h.wrapping_add(mix(
                keys.hash_key.wrapping_add(i.wrapping_mul(GAMMA)) ^ bits.wrapping_mul(HASH_MUL)
            ));
            let x = f64::from(v);
            acc[j] += x * x;
            i = i.wrapping_add(1);
        }
    }
    let sq = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    (h, sq)
}

/// The unscaled sketch S·x of a whole flattened tensor (elements 0..n), for tests and tooling.
pub fn sketch(x: &[f32], keys: &SignKeys) -> Vec<f64> {
    let mut acc = vec![0f64; keys.dim()];
    for (c, part) in x.chunks(4096).enumerate() {
        sketch_update(&mut acc, keys, (c * 4096) as u64, part);
    }
    acc
}

/// D̂ = ‖a − b‖/√r, the estimate of ‖A − B‖_F from two sketches made with the same keys.
pub fn estimate_distance(a: &[f64], b: &[f64]) -> f64 {
    let r = a.len().min(b.len());
    if r == 0 {
        return f64::NAN;
    }
    let s: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    (s / r as f64).sqrt()
}

/// The two-sided error bound of a sketch estimate (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JlBound {
    /// Sketch dimension r.
    pub sketch_dim: usize,
    /// Failure probability δ per estimate.
    pub delta: f64,
    /// ε₊: P(D̂² ≥ (1+ε₊)D²) ≤ δ/2.
    pub eps_upper: f64,
    /// ε₋: P(D̂² ≤ (1−ε₋)D²) ≤ δ/2 (1 when there is no lower-tail guarantee).
    pub eps_lower: f64,
    /// ρ: |D̂ − D| ≤ ρ·D with probability ≥ 1 − δ (∞ without a lower-tail guarantee).
    pub rel_error: f64,
    /// 1/√(1+ε₊): D ≥ D̂·lo_factor with probability ≥ 1 − δ/2.
    pub lo_factor: f64,
    /// 1/√(1−ε₋): D ≤ D̂·hi_factor with probability ≥ 1 − δ/2 (∞ without a guarantee).
    pub hi_factor: f64,
}

/// ln of the upper-tail bound per unit r, as a positive rate: (ε − ln(1+ε))/2.
fn upper_rate(eps: f64) -> f64 {
    0.5 * (eps - eps.ln_1p())
}

/// The lower-tail rate −min_{λ∈[0,1/3]} [λ(1−ε) + ln(1 − λ + 1.5λ²)] ≥ 0.
fn lower_rate(eps: f64) -> f64 {
    let f = |l: f64| l * (1.0 - eps) + (1.0 - l + 1.5 * l * l).ln();
    let (mut a, mut b) = (0.0f64, 1.0 / 3.0);
    for _ in 0..200 {
        let m1 = a + (b - a) / 3.0;
        let m2 = b - (b - a) / 3.0;
        if f(m1) <= f(m2) {
            b = m2;
        } else {
            a = m1;
        }
    }
    (-f(0.5 * (a + b))).max(0.0)
}

/// Smallest ε in [lo, hi] with `rate(ε) ≥ target` (rate increasing), by bisection.
fn solve(rate: impl Fn(f64) -> f64, target: f64, lo: f64, mut hi: f64) -> f64 {
    let mut lo = lo;
    for _ in 0..200 {
        let m = 0.5 * (lo + hi);
        if rate(m) >= target {
            hi = m;
        } else {
            lo = m;
        }
    }
    hi
}

/// The error bound of an estimate from an r-dimensional sketch at failure probability `delta`
/// (module doc). Errors when r is out of range or δ is not in (0, 1).
pub fn jl_bound(r: usize, delta: f64) -> Result<JlBound> {
    check_dim(r)?;
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::Config {
            reason: format!("failure probability delta must be in (0, 1), got {delta}"),
        });
    }
    let rf = r as f64;
    let target = (2.0 / delta).ln() / rf;
    // Upper: the rate grows without bound, so bracket by doubling.
    let mut hi = 1.0;
    while upper_rate(hi) < target {
        hi *= 2.0;
    }
    let eps_upper = solve(upper_rate, target, 0.0, hi);
    let eps_lower = if lower_rate(1.0) < target {
        1.0
    } else {
        solve(lower_rate, target, 0.0, 1.0)
    };
    let lo_factor = 1.0 / (1.0 + eps_upper).sqrt();
    let (hi_factor, down) = if eps_lower >= 1.0 {
        (f64::INFINITY, f64::INFINITY)
    } else {
        (
            1.0 / (1.0 - eps_lower).sqrt(),
            1.0 - (1.0 - eps_lower).sqrt(),
        )
    };
    let up = (1.0 + eps_upper).sqrt() - 1.0;
    Ok(JlBound {
        sketch_dim: r,
        delta,
        eps_upper,
        eps_lower,
        rel_error: up.max(down),
        lo_factor,
        hi_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_sign(keys: &SignKeys, j: usize, i: u64) -> f64 {
        if (keys.bits(j / 64, i) >> (j % 64)) & 1 == 1 {
            -1.0
        } else {
            1.0
        }
    }

    #[test]
    fn sketch_matches_dense_definition_and_paths_agree() {
        for r in [1usize, 5, 64, 65, 130] {
            let keys = SignKeys::new(7, "model.layers.0.q_proj.weight", r).unwrap();
            let x: Vec<f32> = (0..777)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let y = sketch(&x, &keys);
            for (j, &got) in y.iter().enumerate() {
                let want: f64 = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| dense_sign(&keys, j, i as u64) * f64::from(v))
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "r={r} j={j}"
                );
            }
            let mut a = vec![0f64; r];
            let mut b = vec![0f64; r];
            sketch_update(&mut a, &keys, 3, &x);
            sketch_update_generic(&mut b, &keys, 3, &x);
            assert_eq!(a, b, "dispatched path must round like the generic one");
        }
    }

    #[test]
    fn linear_split_equals_whole() {
        let keys = SignKeys::new(1, "t", 64).unwrap();
        let x: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
        let whole = sketch(&x, &keys);
        let mut parts = vec![0f64; 64];
        sketch_update(&mut parts, &keys, 0, &x[..313]);
        sketch_update(&mut parts, &keys, 313, &x[313..]);
        for (a, b) in whole.iter().zip(&parts) {
            assert!((a - b).abs() < 1e-9);
        }
    }

    #[test]
    fn hash_is_order_free_and_sign_of_zero_blind() {
        let keys = SignKeys::new(1, "t", 8).unwrap();
        let x = [1.0f32, -0.0, 3.5, 2.0];
        let y = [1.0f32, 0.0, 3.5, 2.0];
        let (h1, s1) = hash_and_sq(&keys, 0, &x);
        let (h2, _) = hash_and_sq(&keys, 0, &y);
        assert_eq!(h1, h2);
        assert_eq!(s1, 1.0 + 12.25 + 4.0);
        let (a, _) = hash_and_sq(&keys, 0, &x[..2]);
        let (b, _) = hash_and_sq(&keys, 2, &x[2..]);
        assert_eq!(a.wrapping_add(b), h1);
        let z = [1.0f32, 0.0, 3.5, 2.000_000_2];
        assert_ne!(hash_and_sq(&keys, 0, &z).0, h1);
    }

    #[test]
    fn bound_values_and_monotonicity() {
        let b = jl_bound(64, 0.01).unwrap();
        assert!((b.eps_upper - 0.69).abs() < 0.01, "{b:?}");
        assert!((b.eps_lower - 0.65).abs() < 0.01, "{b:?}");
        assert!((b.rel_error - 0.408).abs() < 0.01, "{b:?}");
        let tighter = jl_bound(1024, 0.01).unwrap();
        assert!(tighter.rel_error < b.rel_error / 4.0);
        assert!(jl_bound(8, 0.01).unwrap().hi_factor.is_infinite());
        assert!(jl_bound(0, 0.1).is_err());
        assert!(jl_bound(64, 0.0).is_err());
        assert!(jl_bound(64, 1.0).is_err());
        // The tails really are δ/2 at the solved ε.
        let r = 64.0;
        assert!(((-r * upper_rate(b.eps_upper)).exp() - 0.005).abs() < 1e-6);
        assert!(((-r * lower_rate(b.eps_lower)).exp() - 0.005).abs() < 1e-6);
    }

    #[test]
    fn empirical_failure_rate_below_delta() {
        // Many independent tensors (names) → independent S; count bound violations.
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let truth = x
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let r = 16;
        let b = jl_bound(r, 0.2).unwrap();
        let mut fails = 0;
        let n = 2000;
        for t in 0..n {
            let keys = SignKeys::new(t, "x", r).unwrap();
            let y = sketch(&x, &keys);
            let est = estimate_distance(&y, &vec![0.0; r]);
            if (est - truth).abs() > b.rel_error * truth {
                fails += 1;
            }
        }
        assert!(fails as f64 <= 0.2 * n as f64, "{fails} failures");
    }
}
