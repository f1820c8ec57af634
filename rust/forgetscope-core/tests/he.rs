//! Hyperspherical energy and SPHERE principal directions: known values, invariants (METRICS.md
//! §3.3–3.5) and agreement with a slow, obviously-correct f64 reference.

use forgetscope_core::metrics::he::{
    hyperspherical_energy, hyperspherical_energy_f64, principal_directions,
    principal_directions_with, EigenRoute, HeOptions, HeResult, NeuronAxis, PrincipalOptions,
};
use forgetscope_core::Error;
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// Seeded standard normals (xorshift + Box–Muller).
fn gauss(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect()
}

/// Random orthogonal d×d matrix (Gram–Schmidt in f64), row-major.
fn orthogonal(seed: u64, d: usize) -> Vec<f64> {
    let g = gauss(seed, d * d);
    let mut q: Vec<Vec<f64>> = Vec::new();
    for i in 0..d {
        let mut v: Vec<f64> = g[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect();
        for _ in 0..2 {
            for u in &q {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                for (x, y) in v.iter_mut().zip(u) {
                    *x -= dot * y;
                }
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        q.push(v.iter().map(|x| x / n).collect());
    }
    q.concat()
}

/// Neurons of a row-major matrix as f64 vectors.
fn neurons(data: &[f32], rows: usize, cols: usize, axis: NeuronAxis) -> Vec<Vec<f64>> {
    match axis {
        NeuronAxis::Rows => (0..rows)
            .map(|i| (0..cols).map(|k| data[i * cols + k] as f64).collect())
            .collect(),
        NeuronAxis::Cols => (0..cols)
            .map(|i| (0..rows).map(|k| data[k * cols + i] as f64).collect())
            .collect(),
    }
}

struct Brute {
    energy: [f64; 3],
    min_d2: f64,
    n_near: u64,
    fp: f64,
    n: usize,
}

/// Slow reference: every pair of the (optionally 2N-point) unit cloud, distances as ‖a − b‖² in f64.
fn brute(
    data: &[f32],
    rows: usize,
    cols: usize,
    axis: NeuronAxis,
    half: bool,
    eps: f64,
    delta: f64,
) -> Brute {
    let unit: Vec<Vec<f64>> = neurons(data, rows, cols, axis)
        .into_iter()
        .filter_map(|v| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            (n > 0.0).then(|| v.iter().map(|x| x / n).collect())
        })
        .collect();
    let n = unit.len();
    let mut pts = unit.clone();
    if half {
        pts.extend(
            unit.iter()
                .map(|v| v.iter().map(|x| -x).collect::<Vec<f64>>()),
        );
    }
    let (mut e, mut mn, mut near, mut pairs) = ([0f64; 3], f64::INFINITY, 0u64, 0f64);
    for i in 0..pts.len() {
        for j in i + 1..pts.len() {
            let d2: f64 = pts[i]
                .iter()
                .zip(&pts[j])
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            mn = mn.min(d2);
            near += (d2 < delta) as u64;
            let x = d2.max(eps);
            e[0] += -0.5 * x.ln();
            e[1] += 1.0 / x.sqrt();
            e[2] += 1.0 / x;
            pairs += 1.0;
        }
    }
    let mut fp = 0.0;
    for a in &unit {
        for b in &unit {
            let c: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            fp += c * c;
        }
    }
    Brute {
        energy: e.map(|v| v / pairs),
        min_d2: mn,
        n_near: near,
        fp: fp / (n * n) as f64,
        n,
    }
}

fn opts() -> HeOptions {
    HeOptions {
        threads: 1,
        ..HeOptions::default()
    }
}

fn he(data: &[f32], rows: usize, cols: usize, o: &HeOptions) -> HeResult {
    hyperspherical_energy(data, rows, cols, o).expect("hyperspherical_energy")
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(1e-300)
    }
}

fn assert_close(a: [f64; 3], b: [f64; 3], tol: f64, what: &str) {
    for s in 0..3 {
        assert!(
            rel(a[s], b[s]) <= tol,
            "{what}: s={s}: {} vs {} (rel {:e})",
            a[s],
            b[s],
            rel(a[s], b[s])
        );
    }
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// W Q for a row-major [rows, d] W and a d×d Q (f64).
fn times(w: &[f32], rows: usize, d: usize, q: &[f64]) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    for i in 0..rows {
        for j in 0..d {
            let mut s = 0.0;
            for k in 0..d {
                s += w[i * d + k] as f64 * q[k * d + j];
            }
            out[i * d + j] = s as f32;
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = w[i * cols + j];
        }
    }
    t
}

// ------------------------------------------------------------------------------------------------
// Known values (METRICS §3.3)
// ------------------------------------------------------------------------------------------------

#[test]
fn orthonormal_neurons() {
    let d = 12;
    let q = orthogonal(3, d);
    for n in [2, 5, 12] {
        let w = to_f32(&q[..n * d]);
        let r = he(&w, n, d, &opts());
        assert_close(
            r.energy,
            [-0.5 * 2f64.ln(), 0.5f64.sqrt(), 0.5],
            1e-6,
            "orthonormal",
        );
        assert!(rel(r.frame_potential, 1.0 / n as f64) < 1e-6);
        assert!((r.min_d2 - 2.0).abs() < 1e-6);
        assert_eq!(r.n_near_dup, 0);
    }
    // Axis-aligned neurons: exact.
    let mut w = vec![0f32; 4 * 6];
    for i in 0..4 {
        w[i * 6 + i] = 3.0;
    }
    let r = he(&w, 4, 6, &opts());
    assert_eq!(r.energy, [-0.5 * 2f64.ln(), 0.5f64.sqrt(), 0.5]);
}

/// Regular simplex with N = d + 1 = 7 in R^6.
fn simplex(d: usize) -> Vec<f32> {
    let n = d + 1;
    // Vertices e_i − 1/n in R^n, expressed in an orthonormal basis of 1^⊥.
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for k in 0..d {
        let mut v = vec![0f64; n];
        v[k] = 1.0;
        v[k + 1] = -1.0;
        for _ in 0..2 {
            for u in &basis {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                for (x, y) in v.iter_mut().zip(u) {
                    *x -= dot * y;
                }
            }
        }
        let nn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        basis.push(v.iter().map(|x| x / nn).collect());
    }
    let mut out = Vec::new();
    for i in 0..n {
        let p: Vec<f64> = (0..n)
            .map(|k| (k == i) as u8 as f64 - 1.0 / n as f64)
            .collect();
        for b in &basis {
            out.push(p.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() as f32);
        }
    }
    out
}

#[test]
fn regular_simplex_d6() {
    let w = simplex(6);
    let r = he(&w, 7, 6, &opts());
    assert_close(
        r.energy,
        [-0.423649, 0.654654, 0.428571],
        2e-6,
        "simplex (METRICS)",
    );
    let n = 7.0f64;
    let x = 2.0 * n / (n - 1.0);
    assert_close(
        r.energy,
        [-0.5 * x.ln(), x.powf(-0.5), 1.0 / x],
        1e-6,
        "simplex exact",
    );
    // The Jensen bound is attained.
    assert!(rel(r.frame_potential, 1.0 / 6.0) < 1e-6);
}

#[test]
fn antipodal_pair() {
    let v = gauss(1, 9);
    let w: Vec<f32> = v.iter().copied().chain(v.iter().map(|x| -x)).collect();
    let r = he(&w, 2, 9, &opts());
    assert_close(r.energy, [-(2f64.ln()), 0.5, 0.25], 1e-7, "antipodal");
    assert!((r.min_d2 - 4.0).abs() < 1e-12);
}

#[test]
fn jensen_lower_bound_example() {
    // METRICS: random N=40, d=8: 0.755 >= 0.698.
    let w = gauss(40, 40 * 8);
    let r = he(&w, 40, 8, &opts());
    let x = 80.0f64 / 39.0;
    assert!(
        r.energy[1] >= x.powf(-0.5) && (r.energy[1] - 0.755).abs() < 0.05,
        "{:?}",
        r.energy
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// E_s ≥ (2N/(N−1))^{−s/2}, E_0 ≥ −½ ln(2N/(N−1)) for every configuration.
    #[test]
    fn jensen_lower_bound(n in 2usize..60, d in 1usize..20, seed in 0u64..1000, half in any::<bool>()) {
        let w = gauss(seed, n * d);
        let o = HeOptions { half_space: half, ..opts() };
        let r = he(&w, n, d, &o);
        // Half-space: the bound for the 2N-point cloud.
        let m = if half { 2.0 * n as f64 } else { n as f64 };
        let x = 2.0 * m / (m - 1.0);
        let bound = [-0.5 * x.ln(), x.powf(-0.5), 1.0 / x];
        for (s, (&e, &b)) in r.energy.iter().zip(&bound).enumerate() {
            prop_assert!(e >= b - 1e-9 * b.abs(), "s={} {} < {}", s, e, b);
        }
        prop_assert!(r.frame_potential >= 1.0 / (n.min(d) as f64) - 1e-6 && r.frame_potential <= 1.0 + 1e-6);
    }

    /// Agreement with the brute-force f64 reference over shapes, axes, half-space and eps.
    #[test]
    fn matches_brute_force(
        n in 2usize..70, d in 1usize..40, seed in 0u64..10_000,
        cols in any::<bool>(), half in any::<bool>(), eps_i in 0usize..3, block in 0usize..3,
    ) {
        let axis = if cols { NeuronAxis::Cols } else { NeuronAxis::Rows };
        let (rows, ncols) = if cols { (d, n) } else { (n, d) };
        let mut w = gauss(seed, n * d);
        // A few zero neurons.
        if n > 3 && seed % 3 == 0 {
            for k in 0..d {
                let idx = if cols { k * n + 1 } else { d + k };
                w[idx] = 0.0;
            }
        }
        let eps = [0.0, 1e-4, 0.5][eps_i];
        let o = HeOptions { axis, half_space: half, eps, block_size: [0, 1, 7][block], ..opts() };
        let b = brute(&w, rows, ncols, axis, half, eps, o.near_dup_d2);
        if b.n < 2 {
            return Ok(());
        }
        let r = he(&w, rows, ncols, &o);
        prop_assert_eq!(r.n_neurons, b.n);
        for s in 0..3 {
            prop_assert!(rel(r.energy[s], b.energy[s]) < 1e-6, "s={} {} vs {}", s, r.energy[s], b.energy[s]);
        }
        prop_assert!(rel(r.frame_potential, b.fp) < 1e-6, "{} vs {}", r.frame_potential, b.fp);
        prop_assert!((r.min_d2 - b.min_d2).abs() <= 1e-6 * b.min_d2.max(1e-3), "{} vs {}", r.min_d2, b.min_d2);
        prop_assert_eq!(r.n_near_dup, b.n_near);
    }
}

// ------------------------------------------------------------------------------------------------
// Near-duplicates and the clamp
// ------------------------------------------------------------------------------------------------

/// Rows 0..n of gauss, with row `dup` replaced by row 0 plus a perturbation orthogonal to it of
/// relative size `rel_size` (true d² ≈ rel_size²).
fn with_near_dup(n: usize, d: usize, dup: usize, rel_size: f64) -> Vec<f32> {
    let mut w = gauss(77, n * d);
    let base: Vec<f64> = w[..d].iter().map(|&x| x as f64).collect();
    let nb = base.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut u: Vec<f64> = gauss(78, d).iter().map(|&x| x as f64).collect();
    let dot: f64 = u.iter().zip(&base).map(|(a, b)| a * b).sum::<f64>() / (nb * nb);
    for (x, b) in u.iter_mut().zip(&base) {
        *x -= dot * b;
    }
    let nu = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    for k in 0..d {
        w[dup * d + k] = (base[k] + rel_size * nb * u[k] / nu) as f32;
    }
    w
}

#[test]
fn near_duplicate_is_exact_not_zero() {
    let (n, d) = (50, 64);
    let w = with_near_dup(n, d, 17, 6.4e-5);
    let b = brute(&w, n, d, NeuronAxis::Rows, false, 0.0, 1e-4);
    assert!(b.min_d2 > 1e-9 && b.min_d2 < 1e-8, "true d² {}", b.min_d2);
    for half in [false, true] {
        let o = HeOptions {
            eps: 0.0,
            half_space: half,
            ..opts()
        };
        let r = he(&w, n, d, &o);
        let b = brute(&w, n, d, NeuronAxis::Rows, half, 0.0, 1e-4);
        assert!(r.energy.iter().all(|e| e.is_finite()));
        assert_close(r.energy, b.energy, 1e-8, "near-dup, eps=0");
        assert!(
            rel(r.min_d2, b.min_d2) < 1e-8,
            "{} vs {}",
            r.min_d2,
            b.min_d2
        );
        assert_eq!(r.n_near_dup, if half { 2 } else { 1 });
        // With recomputation disabled the f32 Gram loses it (the failure mode METRICS documents).
        let o2 = HeOptions {
            near_dup_cos: 1.0,
            near_dup_d2: 0.0,
            ..o.clone()
        };
        let r2 = he(&w, n, d, &o2);
        assert!(
            rel(r2.energy[2], b.energy[2]) > 1e-2,
            "f32 Gram happened to be exact"
        );
    }
    // Columns and f64 input take other paths and must agree too.
    // Columns: exact copies of the tile's columns, diagonal and off-diagonal tiles.
    let t = transpose(&w, n, d);
    for half in [false, true] {
        for block_size in [0, 8] {
            let o = HeOptions {
                eps: 0.0,
                axis: NeuronAxis::Cols,
                half_space: half,
                block_size,
                ..opts()
            };
            let r = he(&t, d, n, &o);
            let b = brute(&w, n, d, NeuronAxis::Rows, half, 0.0, 1e-4);
            assert_close(r.energy, b.energy, 1e-8, "near-dup, cols");
            assert!(rel(r.min_d2, b.min_d2) < 1e-8);
            assert_eq!(r.n_near_dup, if half { 2 } else { 1 });
        }
    }
    // Extreme norms (panel copies scaled by powers of two: still exact).
    let big: Vec<f32> = w.iter().map(|&x| x * 1e13).collect();
    let r = he(&big, n, d, &HeOptions { eps: 0.0, ..opts() });
    let bb = brute(&big, n, d, NeuronAxis::Rows, false, 0.0, 1e-4);
    assert_close(r.energy, bb.energy, 1e-8, "near-dup, panel path");
    assert!(rel(r.min_d2, bb.min_d2) < 1e-8);
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let r64 = hyperspherical_energy_f64(&w64, n, d, &HeOptions { eps: 0.0, ..opts() }).unwrap();
    assert_close(r64.energy, b.energy, 1e-6, "near-dup, f64 input");
}

#[test]
fn duplicate_row_eps_zero_is_infinite_eps_positive_finite() {
    let (n, d) = (10, 5);
    let mut w = gauss(5, n * d);
    let (a, b) = w.split_at_mut(3 * d);
    b[..d].copy_from_slice(&a[..d]); // row 3 = row 0
    for half in [false, true] {
        let r = he(
            &w,
            n,
            d,
            &HeOptions {
                eps: 0.0,
                half_space: half,
                ..opts()
            },
        );
        assert_eq!(r.energy, [f64::INFINITY; 3]);
        assert_eq!(r.min_d2, 0.0);
        let r = he(
            &w,
            n,
            d,
            &HeOptions {
                half_space: half,
                ..opts()
            },
        );
        assert!(r.energy.iter().all(|e| e.is_finite()));
        assert!(r.n_near_dup >= 1);
        assert_eq!(r.min_d2, 0.0);
        let b = brute(&w, n, d, NeuronAxis::Rows, half, 1e-4, 1e-4);
        assert_close(r.energy, b.energy, 1e-6, "duplicate, eps=1e-4");
    }
    // A duplicated row dominates E_1 (METRICS: random 10×5, 0.779 → 2.594 with eps = 1e-4).
    let clean = he(&gauss(5, n * d), n, d, &opts());
    let dup = he(&w, n, d, &opts());
    assert!(
        dup.energy[1] > clean.energy[1] + 1.5,
        "{:?} vs {:?}",
        dup.energy,
        clean.energy
    );
}

#[test]
fn zero_rows_excluded_and_counted() {
    let (n, d) = (30, 8);
    let w = gauss(9, n * d);
    let mut z = Vec::new();
    for i in 0..n {
        if i % 7 == 2 {
            z.extend(std::iter::repeat_n(0f32, d));
        }
        z.extend_from_slice(&w[i * d..(i + 1) * d]);
    }
    let rows = z.len() / d;
    for half in [false, true] {
        let o = HeOptions {
            half_space: half,
            ..opts()
        };
        let a = he(&w, n, d, &o);
        let b = he(&z, rows, d, &o);
        assert_eq!(b.n_zero, rows - n);
        assert_eq!(b.n_total, rows);
        assert_eq!(b.n_neurons, n);
        assert_close(b.energy, a.energy, 1e-12, "zero rows");
    }
}

// ------------------------------------------------------------------------------------------------
// Invariances
// ------------------------------------------------------------------------------------------------

#[test]
fn positive_row_scaling() {
    let (n, d) = (40, 16);
    let w = gauss(11, n * d);
    let base = he(&w, n, d, &opts());
    // Powers of two: bit-identical.
    let mut s2 = w.clone();
    for i in 0..n {
        let f = (2f32).powi(i as i32 % 9 - 4);
        s2[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= f);
    }
    assert_eq!(he(&s2, n, d, &opts()).energy, base.energy);
    // Arbitrary positive factors (the scaled f32 data itself is rounded): 1e-6.
    let mut s = w.clone();
    let f = gauss(12, n);
    for i in 0..n {
        let k = (f[i].abs() + 0.01) * 37.0;
        s[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= k);
    }
    assert_close(he(&s, n, d, &opts()).energy, base.energy, 1e-6, "scaling");
    // Huge and tiny norms take the normalised-copy path.
    let mut big = w.clone();
    big[..d].iter_mut().for_each(|x| *x *= 1e15);
    big[d..2 * d].iter_mut().for_each(|x| *x *= 1e-15);
    assert_close(
        he(&big, n, d, &opts()).energy,
        base.energy,
        1e-6,
        "extreme norms",
    );
}

#[test]
fn row_permutation_and_rotation() {
    let (n, d) = (45, 12);
    let w = gauss(13, n * d);
    let base = he(&w, n, d, &opts());
    let mut p = Vec::new();
    for i in (0..n)
        .rev()
        .step_by(2)
        .chain((0..n).rev().skip(1).step_by(2))
    {
        p.extend_from_slice(&w[i * d..(i + 1) * d]);
    }
    assert_close(
        he(&p, n, d, &opts()).energy,
        base.energy,
        1e-9,
        "permutation",
    );
    let q = orthogonal(14, d);
    let r = times(&w, n, d, &q);
    assert_close(he(&r, n, d, &opts()).energy, base.energy, 1e-6, "rotation");
    assert!(rel(he(&r, n, d, &opts()).frame_potential, base.frame_potential) < 1e-6);
}

#[test]
fn half_space_sign_flip_invariance() {
    let (n, d) = (40, 8);
    let w = gauss(15, n * d);
    let mut f = w.clone();
    for i in (0..n).filter(|i| i % 3 == 0) {
        f[i * d..(i + 1) * d].iter_mut().for_each(|x| *x = -*x);
    }
    let half = HeOptions {
        half_space: true,
        ..opts()
    };
    assert_close(
        he(&f, n, d, &half).energy,
        he(&w, n, d, &half).energy,
        1e-12,
        "half flip",
    );
    let full_a = he(&w, n, d, &opts()).energy;
    let full_b = he(&f, n, d, &opts()).energy;
    assert!(
        rel(full_a[1], full_b[1]) > 1e-3,
        "full-space should change: {full_a:?} {full_b:?}"
    );
}

#[test]
fn half_space_closed_form_equals_2n_points() {
    // Brute-force 2N-point cloud as an explicit matrix, through the full-space path.
    let (n, d) = (25, 7);
    let w = gauss(16, n * d);
    let w2: Vec<f32> = w.iter().copied().chain(w.iter().map(|x| -x)).collect();
    for eps in [0.0, 1e-4] {
        let half = he(
            &w,
            n,
            d,
            &HeOptions {
                half_space: true,
                eps,
                ..opts()
            },
        );
        let full2n = he(&w2, 2 * n, d, &HeOptions { eps, ..opts() });
        assert_close(half.energy, full2n.energy, 1e-9, "closed form vs 2N points");
        assert_eq!(half.n_near_dup, full2n.n_near_dup);
        assert!(rel(half.frame_potential, full2n.frame_potential) < 1e-6);
    }
}

// ------------------------------------------------------------------------------------------------
// Blocking, threads, subsampling, layouts
// ------------------------------------------------------------------------------------------------

#[test]
fn blocked_equals_unblocked() {
    let (n, d) = (130, 24);
    let mut w = with_near_dup(n, d, 100, 1e-4);
    w[5 * d..6 * d].iter_mut().for_each(|x| *x = 0.0);
    for half in [false, true] {
        let one = he(
            &w,
            n,
            d,
            &HeOptions {
                half_space: half,
                block_size: n,
                ..opts()
            },
        );
        for b in [1, 3, 16, 64, 129] {
            let r = he(
                &w,
                n,
                d,
                &HeOptions {
                    half_space: half,
                    block_size: b,
                    ..opts()
                },
            );
            assert_eq!(r.block_size, b);
            // Not bitwise: faer's f32 kernels round differently for different tile shapes.
            assert_close(r.energy, one.energy, 1e-9, "blocked");
            assert!(rel(r.frame_potential, one.frame_potential) < 1e-7);
            assert_eq!(r.n_near_dup, one.n_near_dup);
            assert_eq!(r.min_d2, one.min_d2);
        }
    }
}

#[test]
fn threads_are_bit_identical() {
    let (n, d) = (300, 40);
    let w = with_near_dup(n, d, 250, 1e-5);
    for half in [false, true] {
        for block in [0, 32] {
            let o = HeOptions {
                half_space: half,
                block_size: block,
                ..opts()
            };
            let a = he(&w, n, d, &o);
            for t in [2, 3, 0] {
                let b = he(
                    &w,
                    n,
                    d,
                    &HeOptions {
                        threads: t,
                        ..o.clone()
                    },
                );
                assert_eq!(a.energy.map(f64::to_bits), b.energy.map(f64::to_bits));
                assert_eq!(a.frame_potential.to_bits(), b.frame_potential.to_bits());
                assert_eq!(a.min_d2.to_bits(), b.min_d2.to_bits());
                assert_eq!(a.n_near_dup, b.n_near_dup);
            }
        }
    }
}

#[test]
fn subsampling_is_seeded_and_reproducible() {
    let (n, d) = (400, 16);
    let w = gauss(21, n * d);
    let o = HeOptions {
        max_neurons: Some(100),
        seed: 5,
        ..opts()
    };
    let a = he(&w, n, d, &o);
    assert!(a.subsampled);
    assert_eq!(a.n_neurons, 100);
    assert_eq!(a.n_total, n);
    let b = he(
        &w,
        n,
        d,
        &HeOptions {
            threads: 2,
            ..o.clone()
        },
    );
    assert_eq!(a.energy.map(f64::to_bits), b.energy.map(f64::to_bits));
    let c = he(
        &w,
        n,
        d,
        &HeOptions {
            seed: 6,
            ..o.clone()
        },
    );
    assert_ne!(a.energy, c.energy);
    // An unbiased estimate of the full mean.
    let full = he(&w, n, d, &opts());
    assert!(rel(a.energy[1], full.energy[1]) < 0.05);
    // At or above N: no subsampling, same numbers as without the option.
    let all = he(
        &w,
        n,
        d,
        &HeOptions {
            max_neurons: Some(n),
            ..opts()
        },
    );
    assert!(!all.subsampled);
    assert_eq!(all.energy, full.energy);
    // The subsample is a subset of the rows: HE of a matrix of distinct rows repeated twice has
    // duplicates, and subsampling never repeats a row.
    let ww: Vec<f32> = w.iter().chain(w.iter()).copied().collect();
    let s = he(
        &ww,
        2 * n,
        d,
        &HeOptions {
            max_neurons: Some(50),
            eps: 0.0,
            ..opts()
        },
    );
    assert!(s.n_neurons == 50 && (s.min_d2 == 0.0 || s.energy[2].is_finite()));
}

#[test]
fn columns_equal_rows_of_transpose() {
    let (n, d) = (70, 33);
    let w = gauss(23, n * d);
    let t = transpose(&w, n, d);
    for half in [false, true] {
        let a = he(
            &w,
            n,
            d,
            &HeOptions {
                half_space: half,
                ..opts()
            },
        );
        let b = he(
            &t,
            d,
            n,
            &HeOptions {
                half_space: half,
                axis: NeuronAxis::Cols,
                ..opts()
            },
        );
        assert_close(a.energy, b.energy, 1e-9, "cols");
        assert_eq!(b.n_neurons, n);
        assert_eq!(b.dim, d);
    }
    // Subsampling picks the same neurons whatever the axis; f64 input too.
    let (n, d) = (300, 37);
    let w = gauss(24, n * d);
    let t = transpose(&w, n, d);
    let sub = HeOptions {
        max_neurons: Some(170),
        seed: 3,
        ..opts()
    };
    let a = he(&w, n, d, &sub);
    let b = he(
        &t,
        d,
        n,
        &HeOptions {
            axis: NeuronAxis::Cols,
            ..sub.clone()
        },
    );
    assert!(a.subsampled && b.subsampled);
    assert_close(a.energy, b.energy, 1e-9, "cols, subsampled");
    let t64: Vec<f64> = t.iter().map(|&x| x as f64).collect();
    let c = hyperspherical_energy_f64(
        &t64,
        d,
        n,
        &HeOptions {
            axis: NeuronAxis::Cols,
            ..opts()
        },
    )
    .unwrap();
    assert_close(c.energy, he(&w, n, d, &opts()).energy, 1e-6, "cols, f64");
}

#[test]
fn f64_input_matches() {
    let (n, d) = (60, 20);
    let w = gauss(25, n * d);
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    for half in [false, true] {
        let o = HeOptions {
            half_space: half,
            ..opts()
        };
        let a = he(&w, n, d, &o);
        let b = hyperspherical_energy_f64(&w64, n, d, &o).unwrap();
        assert_close(a.energy, b.energy, 1e-6, "f64 input");
        let c = brute(&w, n, d, NeuronAxis::Rows, half, o.eps, o.near_dup_d2);
        assert_close(b.energy, c.energy, 1e-6, "f64 input vs brute");
    }
}

// ------------------------------------------------------------------------------------------------
// Errors and non-finite input
// ------------------------------------------------------------------------------------------------

#[test]
fn bad_input_is_a_config_error() {
    let w = gauss(1, 12);
    let cfg = |r: Result<HeResult, Error>| match r {
        Err(Error::Config { reason }) => reason,
        other => panic!("expected Config error, got {other:?}"),
    };
    assert!(cfg(hyperspherical_energy(&w, 3, 5, &opts())).contains("12 elements"));
    assert!(cfg(hyperspherical_energy(&w, usize::MAX, 2, &opts())).contains("overflow"));
    assert!(cfg(hyperspherical_energy(&w, 1, 12, &opts())).contains("at least 2"));
    assert!(cfg(hyperspherical_energy(&[], 0, 0, &opts())).contains("at least 2"));
    let mut z = vec![0f32; 12];
    z[..4].copy_from_slice(&w[..4]);
    assert!(cfg(hyperspherical_energy(&z, 3, 4, &opts())).contains("2 are zero"));
    for o in [
        HeOptions {
            eps: -1.0,
            ..opts()
        },
        HeOptions {
            eps: f64::NAN,
            ..opts()
        },
        HeOptions {
            near_dup_cos: 1.5,
            ..opts()
        },
        HeOptions {
            near_dup_d2: f64::INFINITY,
            ..opts()
        },
        HeOptions {
            max_neurons: Some(1),
            ..opts()
        },
    ] {
        cfg(hyperspherical_energy(&w, 3, 4, &o));
    }
    let pd = principal_directions(&w, 5, 2, NeuronAxis::Rows, 0.5, 1);
    assert!(matches!(pd, Err(Error::Config { .. })));
    let pd = principal_directions(&w, 3, 4, NeuronAxis::Rows, f64::NAN, 1);
    assert!(matches!(pd, Err(Error::Config { .. })));
}

#[test]
fn non_finite_gives_nan_not_a_silent_filter() {
    let mut w = gauss(2, 40);
    w[13] = f32::NAN;
    w[27] = f32::INFINITY;
    let r = he(&w, 10, 4, &opts());
    assert_eq!(r.n_nonfinite, 2);
    assert!(r.energy.iter().all(|e| e.is_nan()) && r.min_d2.is_nan() && r.frame_potential.is_nan());
    let pd = principal_directions(&w, 10, 4, NeuronAxis::Rows, 0.5, 1);
    assert!(matches!(pd, Err(Error::Config { .. })));
}

// ------------------------------------------------------------------------------------------------
// Principal directions (SPHERE §3.5)
// ------------------------------------------------------------------------------------------------

/// C = ÂᵀÂ/N in f64 (brute force), zero neurons excluded.
fn cov(w: &[f32], rows: usize, cols: usize, axis: NeuronAxis) -> (Vec<f64>, usize) {
    let unit: Vec<Vec<f64>> = neurons(w, rows, cols, axis)
        .into_iter()
        .filter_map(|v| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            (n > 0.0).then(|| v.iter().map(|x| x / n).collect())
        })
        .collect();
    let d = unit[0].len();
    let mut c = vec![0f64; d * d];
    for v in &unit {
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += v[i] * v[j];
            }
        }
    }
    let n = unit.len() as f64;
    (c.iter().map(|x| x / n).collect(), d)
}

fn check_pd(w: &[f32], rows: usize, cols: usize, axis: NeuronAxis, beta: f64, route: EigenRoute) {
    let o = PrincipalOptions {
        axis,
        beta,
        threads: 1,
        route,
    };
    let p = principal_directions_with(w, rows, cols, &o).unwrap();
    let (c, d) = cov(w, rows, cols, axis);
    assert_eq!(p.dim, d);
    // tr C = 1 and Σλ² = ‖C‖_F² = the HE frame potential.
    let tr: f64 = p.eigenvalues.iter().sum();
    assert!((tr - 1.0).abs() < 1e-12, "tr C = {tr}");
    let fro: f64 = c.iter().map(|x| x * x).sum();
    let l2: f64 = p.eigenvalues.iter().map(|l| l * l).sum();
    assert!(rel(l2, fro) < 1e-10, "{l2} vs {fro}");
    let hopts = HeOptions { axis, ..opts() };
    assert!(rel(he(w, rows, cols, &hopts).frame_potential, fro) < 1e-6);
    assert!(p.eigenvalues.windows(2).all(|x| x[0] >= x[1]));
    // Rank rule.
    let mut cum = 0.0;
    let count = p
        .eigenvalues
        .iter()
        .filter(|&&l| {
            cum += l;
            cum / tr <= beta
        })
        .count();
    assert_eq!(p.rank, (count + 1).min(p.eigenvalues.len()));
    let r = p.rank;
    let u = |k: usize, t: usize| p.directions[k * r + t] as f64;
    // Orthonormal columns; C u = λ u.
    for a in 0..r {
        for b in 0..r {
            let dot: f64 = (0..d).map(|k| u(k, a) * u(k, b)).sum();
            assert!(
                (dot - (a == b) as u8 as f64).abs() < 1e-5,
                "UᵀU[{a},{b}] = {dot}"
            );
        }
        let lam = p.eigenvalues[a];
        let res: f64 = (0..d)
            .map(|i| {
                let cu: f64 = (0..d).map(|j| c[i * d + j] * u(j, a)).sum();
                (cu - lam * u(i, a)).powi(2)
            })
            .sum::<f64>()
            .sqrt();
        assert!(
            res < 1e-6 * p.eigenvalues[0].max(1e-3),
            "residual {res} for λ={lam}"
        );
    }
    // SPHERE projection B' = B(I − αUUᵀ): α = 1 removes the component, α = 0.5 keeps half.
    let m = 9;
    let b = gauss(99, m * d);
    for alpha in [1.0, 0.5] {
        let mut bp = vec![0f64; m * d];
        for i in 0..m {
            let bu: Vec<f64> = (0..r)
                .map(|t| (0..d).map(|k| b[i * d + k] as f64 * u(k, t)).sum())
                .collect();
            for k in 0..d {
                let proj: f64 = (0..r).map(|t| bu[t] * u(k, t)).sum();
                bp[i * d + k] = b[i * d + k] as f64 - alpha * proj;
            }
        }
        let bnorm = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut bpu = 0.0;
        let mut bu_all = 0.0;
        for i in 0..m {
            for t in 0..r {
                let x: f64 = (0..d).map(|k| bp[i * d + k] * u(k, t)).sum();
                let y: f64 = (0..d).map(|k| b[i * d + k] as f64 * u(k, t)).sum();
                bpu += (x - (1.0 - alpha) * y).powi(2);
                bu_all += y * y;
            }
        }
        assert!(
            bpu.sqrt() < 1e-5 * bnorm,
            "alpha={alpha}: ‖B'U − (1−α)BU‖ = {}",
            bpu.sqrt()
        );
        if alpha == 1.0 {
            assert!(bu_all.sqrt() > 1e-3 * bnorm);
        }
    }
}

#[test]
fn principal_directions_properties() {
    for (n, d, axis) in [
        (20, 50, NeuronAxis::Rows),
        (60, 12, NeuronAxis::Rows),
        (15, 40, NeuronAxis::Cols),
        (40, 15, NeuronAxis::Cols),
    ] {
        let (rows, cols) = if axis == NeuronAxis::Rows {
            (n, d)
        } else {
            (d, n)
        };
        let mut w = gauss(n as u64 * 31 + d as u64, rows * cols);
        // Correlated neurons so that the spectrum is far from flat.
        for i in 0..rows * cols {
            w[i] += 0.8 * w[i % cols];
        }
        for beta in [0.0, 0.3, 0.5, 0.9, 2.0] {
            for route in [EigenRoute::Auto, EigenRoute::Gram, EigenRoute::Covariance] {
                check_pd(&w, rows, cols, axis, beta, route);
            }
        }
    }
}

#[test]
fn gram_and_covariance_routes_agree() {
    for (n, d) in [(30, 80), (80, 30), (40, 40)] {
        let w = gauss(n as u64 + 1000 * d as u64, n * d);
        let g = principal_directions_with(
            &w,
            n,
            d,
            &PrincipalOptions {
                beta: 0.6,
                threads: 1,
                route: EigenRoute::Gram,
                ..Default::default()
            },
        )
        .unwrap();
        let c = principal_directions_with(
            &w,
            n,
            d,
            &PrincipalOptions {
                beta: 0.6,
                threads: 2,
                route: EigenRoute::Covariance,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(g.route, EigenRoute::Gram);
        assert_eq!(c.route, EigenRoute::Covariance);
        assert_eq!(g.eigenvalues.len(), n.min(d));
        assert_eq!(c.eigenvalues.len(), n.min(d));
        for (a, b) in g.eigenvalues.iter().zip(&c.eigenvalues).take(10) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(g.rank, c.rank);
        // Same (sign-normalised) directions: random data has a simple spectrum.
        for (a, b) in g.directions.iter().zip(&c.directions) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let auto = principal_directions(&w, n, d, NeuronAxis::Rows, 0.6, 0).unwrap();
        assert_eq!(
            auto.route,
            if n <= d {
                EigenRoute::Gram
            } else {
                EigenRoute::Covariance
            }
        );
    }
}

#[test]
fn principal_directions_rank_edge_cases() {
    // Rank-2 neuron cloud in R^6: r never exceeds the numerical rank.
    let (n, d) = (10, 6);
    let a = gauss(3, d);
    let b = gauss(4, d);
    let coef = gauss(5, 2 * n);
    let w: Vec<f32> = (0..n)
        .flat_map(|i| (0..d).map(move |k| (0, i, k)))
        .map(|(_, i, k)| coef[2 * i] * a[k] + coef[2 * i + 1] * b[k])
        .collect();
    for route in [EigenRoute::Gram, EigenRoute::Covariance] {
        let o = PrincipalOptions {
            beta: 5.0,
            threads: 1,
            route,
            ..Default::default()
        };
        let p = principal_directions_with(&w, n, d, &o).unwrap();
        assert_eq!(p.rank, 2, "{:?}", p.eigenvalues);
        let o = PrincipalOptions { beta: 0.0, ..o };
        assert_eq!(principal_directions_with(&w, n, d, &o).unwrap().rank, 1);
    }
    // Zero neurons are excluded and counted.
    let mut z = w.clone();
    z.extend(std::iter::repeat_n(0f32, 2 * d));
    let p = principal_directions(&z, n + 2, d, NeuronAxis::Rows, 0.5, 1).unwrap();
    assert_eq!((p.n_neurons, p.n_zero), (n, 2));
    assert!((p.eigenvalues.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}
