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
//! S is never stored. Write j = 64b + 8g + l (l < 8, g < 8) and group the elements in aligned
//! quads i = 4t + u (u < 4); then S_ji = −1 iff bit 32·(g mod 2) + 4l + u of
//! `mix(k_b + (4t + ⌊g/2⌋)·γ)` is set — every (j, i) reads its own bit of the four hashes of its
//! quad (the layout lets one AVX-512 permute serve 8 rows and 4 elements). `mix` is the
//! splitmix64 finaliser, γ = 0x9E3779B97F4A7C15, the block key is
//! k_b = mix(seed ^ mix(name_hash + (b+1)·γ)) and name_hash = mix(FNV-1a-64(tensor name)). The same
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
//! guarantee over every x, not a typical error. When r·ln(6/5) < ln(2/δ) there is no lower-tail
//! guarantee (ε₋ = 1, `hi_factor` = ∞). The bound holds for every x (no dependence on n, sparsity
//! or scale).
//!
//! **Exact zero.** A 64-bit content hash per segment, Σ_i mix(k_h + i·γ ^ bits(w_i)·K) mod 2⁶⁴
//! (order-free, so chunking does not matter; −0.0 hashed as +0.0; K odd), detects bit-identical
//! segments: their drift is exactly 0, not an estimate (false match probability ≈ 2⁻⁶⁴).
//!
//! **Numerics.** Values decoded to f32 and summed in f64 (subset sums, Σx, Σ_{−1}x: only additions
//! round, ≈ 1e-16 relative to ‖W‖, negligible next to the JL error); no fused multiply-add, and the
//! same association on every path, so every CPU rounds identically.
//!
//! **Kernel.** y_j = Σ_i x_i − 2·Σ_{S_ji = −1} x_i per piece of ≤ 512 elements. For each quad the 16
//! subset sums of its 4 values are formed once; row j then adds the entry its 4 sign bits select.
//! With AVX-512 that is, per quad and 8 rows, one variable shift, one `vpermt2pd` and one add
//! (≈ 0.1 vector instructions per element and row instead of 1); the generic and AVX2 paths run
//! the same arithmetic in the same order (bit-identical results, tested).
//!
//! **Cost.** r/4 table additions per element plus one 64-bit hash per element per 64 rows of S;
//! memory O(r) per accumulator. Measured (`examples/fingerprint_speed.rs --kernels`, one core of
//! the shared 2-vCPU AVX-512 Xeon): 540 M elements/s at r ≤ 64, 140 M at r = 256 (the whole
//! fingerprint pass on a bf16 file: 0.55–0.6 GB/s per thread at r = 64).

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

    /// S_ji ∈ {−1, +1} (module doc: bit 32·(g mod 2) + 4·l + (i mod 4) of
    /// mix(k_b + (4⌊i/4⌋ + ⌊g/2⌋)·γ), with j = 64b + 8g + l).
    pub fn sign(&self, j: usize, i: u64) -> f64 {
        let (b, g, l) = (j / 64, (j % 64) / 8, j % 8);
        let w = mix(self.blocks[b].wrapping_add(((i & !3) + (g as u64 >> 1)).wrapping_mul(GAMMA)));
        if (w >> (32 * (g & 1) + 4 * l + (i & 3) as usize)) & 1 == 1 {
            -1.0
        } else {
            1.0
        }
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

/// Elements per piece (the hash scratch, 4 KiB, lives on the stack).
const PIECE: usize = 512;

/// `hs[k] = mix(key + (first + k)·γ)`: one vectorisable pass (AVX-512DQ multiplies 8 lanes).
#[inline(always)]
fn fill_hashes(hs: &mut [u64], key: u64, first: u64) {
    for (k, h) in hs.iter_mut().enumerate() {
        *h = mix(key.wrapping_add(first.wrapping_add(k as u64).wrapping_mul(GAMMA)));
    }
}

/// Σ vals in f64 with 8 lanes (the same code on every path, so it rounds identically).
#[inline(always)]
fn piece_total(vals: &[f32]) -> f64 {
    let mut t = [0f64; 8];
    let mut it = vals.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            t[j] += f64::from(c[j]);
        }
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        t[j] += f64::from(v);
    }
    ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
}

/// The 16 subset sums of one quad (x₀..x₃; absent elements are 0): for m < 8,
/// T[m] = (x₀·m₀ + x₁·m₁) + x₂·m₂ and T[8+m] = T[m] + x₃ (mᵤ = bit u of m; "x·0" is +0.0), the
/// association the AVX-512 kernel uses, so both paths round alike.
#[inline(always)]
fn quad_table(x: [f64; 4]) -> [f64; 16] {
    let sel = |m: usize, u: usize| if (m >> u) & 1 == 1 { x[u] } else { 0.0 };
    let mut t = [0f64; 16];
    for m in 0..8 {
        t[m] = (sel(m, 0) + sel(m, 1)) + sel(m, 2);
        t[8 + m] = t[m] + x[3];
    }
    t
}

/// The quad [4q, 4q+4) of the run `vals` starting at element `first` (zeros outside the run).
#[inline(always)]
fn quad(vals: &[f32], first: u64, q: u64) -> [f64; 4] {
    let mut x = [0f64; 4];
    for (u, xu) in x.iter_mut().enumerate() {
        let i = 4 * q + u as u64;
        if i >= first && i - first < vals.len() as u64 {
            *xu = f64::from(vals[(i - first) as usize]);
        }
    }
    x
}

/// S_j += Σ of the run's elements whose sign in row j is −1, for the ≤ 64 rows of `s` of one
/// block; `hs[k]` is the hash of element 4·q0 + k (q0 = the run's first quad).
#[inline(always)]
fn add_quads(s: &mut [f64], hs: &[u64], vals: &[f32], first: u64, q0: u64, nq: u64) {
    for q in q0..q0 + nq {
        let t = quad_table(quad(vals, first, q));
        let w = &hs[4 * (q - q0) as usize..];
        for (j, sj) in s.iter_mut().enumerate() {
            let (g, l) = (j / 8, j % 8);
            let idx = (w[g >> 1] >> (32 * (g & 1) + 4 * l)) & 15;
            *sj += t[idx as usize];
        }
    }
}

/// [`add_quads`] for a full 64-row block with explicit AVX-512: per quad, the 16 subset sums in
/// two zmm (3 adds), and per 8 rows one variable shift (the 4-bit indices), one two-table permute
/// (`vpermt2pd`) and one add — 3 vector instructions per 4 elements and 8 rows.
// AVX-512 intrinsics are stable since Rust 1.89 (the workspace still declares 1.80; see the
// branch notes: the MSRV line has to move to 1.89).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::incompatible_msrv)]
fn add_quads_avx512(s: &mut [f64; 64], hs: &[u64], vals: &[f32], first: u64, q0: u64, nq: u64) {
    use std::arch::x86_64::*;
    let mut acc: [__m512d; 8] = std::array::from_fn(|g| {
        // SAFETY: s holds 64 f64; unaligned load of 8 at offset 8g.
        unsafe { _mm512_loadu_pd(s.as_ptr().add(8 * g)) }
    });
    let shifts: [__m512i; 2] = std::array::from_fn(|h| {
        let b = 32 * h as i64;
        _mm512_setr_epi64(b, b + 4, b + 8, b + 12, b + 16, b + 20, b + 24, b + 28)
    });
    for q in q0..q0 + nq {
        let x = quad(vals, first, q);
        let x0 = _mm512_maskz_mov_pd(0b1010_1010, _mm512_set1_pd(x[0]));
        let x1 = _mm512_maskz_mov_pd(0b1100_1100, _mm512_set1_pd(x[1]));
        let x2 = _mm512_maskz_mov_pd(0b1111_0000, _mm512_set1_pd(x[2]));
        let lo = _mm512_add_pd(_mm512_add_pd(x0, x1), x2);
        let hi = _mm512_add_pd(lo, _mm512_set1_pd(x[3]));
        let w = &hs[4 * (q - q0) as usize..];
        for (g, a) in acc.iter_mut().enumerate() {
            let idx = _mm512_srlv_epi64(_mm512_set1_epi64(w[g >> 1] as i64), shifts[g & 1]);
            *a = _mm512_add_pd(*a, _mm512_permutex2var_pd(lo, idx, hi));
        }
    }
    for (g, a) in acc.iter().enumerate() {
        // SAFETY: as above.
        unsafe { _mm512_storeu_pd(s.as_mut_ptr().add(8 * g), *a) };
    }
}

#[inline(always)]
fn update_body(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32], avx512: bool) {
    // Quads are aligned to absolute element indices, so an element's signs never depend on
    // where a run starts; pieces end on quad boundaries.
    let mut scratch = [0u64; PIECE];
    let end = first + vals.len() as u64;
    let mut pos = first;
    while pos < end {
        let q0 = pos / 4;
        let q1 = (q0 + (PIECE / 4) as u64).min(end.div_ceil(4));
        let piece_end = (4 * q1).min(end);
        let piece = &vals[(pos - first) as usize..(piece_end - first) as usize];
        let nq = q1 - q0;
        let total = piece_total(piece);
        let hs = &mut scratch[..4 * nq as usize];
        for (b, &key) in keys.iter().enumerate() {
            fill_hashes(hs, key, 4 * q0);
            let lo = 64 * b;
            let hi = (lo + 64).min(acc.len());
            let mut s = [0f64; 64];
            // A partial block (r mod 64 rows) runs the full 64-row kernel and keeps its rows:
            // row j's sum does not depend on the other rows.
            #[cfg(target_arch = "x86_64")]
            let done = if avx512 {
                // SAFETY: `avx512` is only true when the CPU has AVX-512F.
                unsafe { add_quads_avx512(&mut s, hs, piece, pos, q0, nq) };
                true
            } else {
                false
            };
            let sb = &mut s[..hi - lo];
            #[cfg(not(target_arch = "x86_64"))]
            let done = {
                let _ = avx512;
                false
            };
            if !done {
                add_quads(sb, hs, piece, pos, q0, nq);
            }
            // y_j = Σx − 2·Σ_{S_ji = −1} x.
            for (a, sj) in acc[lo..hi].iter_mut().zip(sb.iter()) {
                *a += total - (sj + sj);
            }
        }
        pos = piece_end;
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
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            #[target_feature(enable = "avx512f,avx512dq")]
            fn avx512(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32]) {
                update_body(acc, keys, first, vals, true)
            }
            // SAFETY: the CPU supports AVX-512F and DQ (checked just above).
            return unsafe { avx512(acc, &keys.blocks, first, vals) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2(acc: &mut [f64], keys: &[u64], first: u64, vals: &[f32]) {
                update_body(acc, keys, first, vals, false)
            }
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(acc, &keys.blocks, first, vals) };
        }
    }
    update_body(acc, &keys.blocks, first, vals, false)
}

/// Generic path only, for tests (the dispatched paths must agree with it bit for bit).
#[cfg(test)]
fn sketch_update_generic(acc: &mut [f64], keys: &SignKeys, first: u64, vals: &[f32]) {
    update_body(acc, &keys.blocks, first, vals, false)
}

#[inline(always)]
fn hash_sq_body(key: u64, first: u64, vals: &[f32]) -> (u64, f64) {
    // Eight independent lanes: the hash sum is order-free and the f64 sums avoid one long
    // dependency chain; both vectorise.
    let mut h = [0u64; 8];
    let mut s = [0f64; 8];
    let mut it = vals.chunks_exact(8);
    let mut i = first;
    let elem = |i: u64, v: f32| {
        // −0.0 and +0.0 are the same value: hash them alike.
        let bits = if v == 0.0 {
            0u64
        } else {
            u64::from(v.to_bits())
        };
        mix(key.wrapping_add(i.wrapping_mul(GAMMA)) ^ bits.wrapping_mul(HASH_MUL))
    };
    for c in &mut it {
        for j in 0..8 {
            h[j] = h[j].wrapping_add(elem(i.wrapping_add(j as u64), c[j]));
            let x = f64::from(c[j]);
            s[j] += x * x;
        }
        i = i.wrapping_add(8);
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        h[j] = h[j].wrapping_add(elem(i.wrapping_add(j as u64), v));
        let x = f64::from(v);
        s[j] += x * x;
    }
    let hs = h.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    (
        hs,
        ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])),
    )
}

/// Content hash (wrapping sum of per-element hashes, order-free) and Σ x² (f64, 8 lanes) of
/// elements `first..first+len` of the tensor of `keys`.
pub fn hash_and_sq(keys: &SignKeys, first: u64, vals: &[f32]) -> (u64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            #[target_feature(enable = "avx512f,avx512dq")]
            fn avx512(key: u64, first: u64, vals: &[f32]) -> (u64, f64) {
                hash_sq_body(key, first, vals)
            }
            // SAFETY: the CPU supports AVX-512F and DQ (checked just above).
            return unsafe { avx512(keys.hash_key, first, vals) };
        }
    }
    hash_sq_body(keys.hash_key, first, vals)
}

/// Σ x² in f64 with 8 independent lanes.
pub fn sum_sq(vals: &[f32]) -> f64 {
    let mut s = [0f64; 8];
    let mut it = vals.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let x = f64::from(c[j]);
            s[j] += x * x;
        }
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        s[j] += f64::from(v) * f64::from(v);
    }
    ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
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
        keys.sign(j, i)
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
