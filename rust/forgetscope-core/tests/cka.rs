//! CKA kernels against a slow, obviously-correct f64 reference (a line-by-line transcription of
//! the Kornblith et al. demo code), the demo's known values, and the invariances of METRICS §2.3.

use forgetscope_core::metrics::cka::{
    cka_matrix, cka_matrix_with, covariance_participation_ratio,
    covariance_participation_ratio_with, linear_cka, linear_cka_feature, linear_cka_gram,
    linear_cka_parts, linear_cka_with, mean_pairwise_cosine, rbf_cka, rbf_cka_with, CkaOptions,
    Form, MinibatchCka, Precision, Rows, StreamingCka,
};
use forgetscope_core::Error;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

fn load(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Kornblith demo data: X, Y of shape [100, 10].
fn demo() -> (Vec<f64>, Vec<f64>) {
    (
        load(include_bytes!("data/kornblith_x.f64")),
        load(include_bytes!("data/kornblith_y.f64")),
    )
}

const LINEAR: f64 = 0.5576132566;
const RBF_05: f64 = 0.6548311823;
const DEBIASED: f64 = 0.5134564895;
const MINIBATCH_4X25: f64 = 0.5132675064;

/// Deterministic normal samples (splitmix64 + Box-Muller).
struct Rng(u64);
impl Rng {
    fn u(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.u(), self.u());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
    fn mat(&mut self, n: usize, p: usize) -> Vec<f64> {
        (0..n * p).map(|_| self.normal()).collect()
    }
}

/// Correlated pair: Y = X·W + noise, with per-column offsets `shift` added to both.
fn pair(seed: u64, n: usize, p: usize, q: usize, shift: f64) -> (Vec<f64>, Vec<f64>) {
    let mut r = Rng(seed);
    let x = r.mat(n, p);
    let w = r.mat(p, q);
    let mut y = vec![0.0; n * q];
    for i in 0..n {
        for j in 0..q {
            let mut s = r.normal() * 2.0;
            for k in 0..p {
                s += x[i * p + k] * w[k * q + j] / (p as f64).sqrt();
            }
            y[i * q + j] = s;
        }
    }
    let x = x
        .iter()
        .enumerate()
        .map(|(i, v)| v + shift * (1.0 + (i % p) as f64))
        .collect();
    let y = y
        .iter()
        .enumerate()
        .map(|(i, v)| v - shift * (2.0 + (i % q) as f64))
        .collect();
    (x, y)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn up(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn rows(v: &[f64], n: usize) -> Rows<'_> {
    Rows::f64(v, n, v.len() / n).unwrap()
}
fn rows32(v: &[f32], n: usize) -> Rows<'_> {
    Rows::f32(v, n, v.len() / n).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[track_caller]
fn close(a: f64, b: f64, tol: f64) {
    assert!(
        rel(a, b) <= tol,
        "{a} vs {b}: relative error {:e} > {tol:e}",
        rel(a, b)
    );
}

fn opts(precision: Precision, form: Form) -> CkaOptions {
    CkaOptions {
        precision,
        form,
        ..CkaOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Slow f64 reference: the demo notebook's functions, transcribed
// ---------------------------------------------------------------------------------------------

type Mat = Vec<Vec<f64>>;

fn gram_linear(x: &[f64], n: usize) -> Mat {
    let p = x.len() / n;
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..p).map(|k| x[i * p + k] * x[j * p + k]).sum())
                .collect()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len();
    if m % 2 == 1 {
        v[m / 2]
    } else {
        (v[m / 2 - 1] + v[m / 2]) / 2.0
    }
}

fn gram_rbf(x: &[f64], n: usize, threshold: f64) -> Mat {
    let g = gram_linear(x, n);
    let d: Mat = (0..n)
        .map(|i| (0..n).map(|j| -2.0 * g[i][j] + g[i][i] + g[j][j]).collect())
        .collect();
    let med = median(d.iter().flatten().copied().collect());
    d.iter()
        .map(|r| {
            r.iter()
                .map(|v| (-v / (2.0 * threshold * threshold * med)).exp())
                .collect()
        })
        .collect()
}

fn center_gram(g: &Mat, unbiased: bool) -> Mat {
    let n = g.len();
    let mut g = g.clone();
    let nf = n as f64;
    if unbiased {
        for (i, r) in g.iter_mut().enumerate() {
            r[i] = 0.0;
        }
        let mut means: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| g[i][j]).sum::<f64>() / (nf - 2.0))
            .collect();
        let t = means.iter().sum::<f64>() / (2.0 * (nf - 1.0));
        means.iter_mut().for_each(|m| *m -= t);
        for i in 0..n {
            for j in 0..n {
                g[i][j] -= means[i] + means[j];
            }
        }
        for (i, r) in g.iter_mut().enumerate() {
            r[i] = 0.0;
        }
    } else {
        let mut means: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| g[i][j]).sum::<f64>() / nf)
            .collect();
        let t = means.iter().sum::<f64>() / nf / 2.0;
        means.iter_mut().for_each(|m| *m -= t);
        for i in 0..n {
            for j in 0..n {
                g[i][j] -= means[i] + means[j];
            }
        }
    }
    g
}

fn fro_dot(a: &Mat, b: &Mat) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| x * y)
        .sum()
}

/// `cka(gram_x, gram_y, debiased)` of the demo; also returns the unnormalised terms.
fn ref_cka_terms(gx: &Mat, gy: &Mat, debiased: bool) -> [f64; 3] {
    let gx = center_gram(gx, debiased);
    let gy = center_gram(gy, debiased);
    [fro_dot(&gx, &gy), fro_dot(&gx, &gx), fro_dot(&gy, &gy)]
}
fn ref_cka(gx: &Mat, gy: &Mat, debiased: bool) -> f64 {
    let [xy, xx, yy] = ref_cka_terms(gx, gy, debiased);
    xy / (xx.sqrt() * yy.sqrt())
}
fn ref_linear(x: &[f64], y: &[f64], n: usize, debiased: bool) -> f64 {
    ref_cka(&gram_linear(x, n), &gram_linear(y, n), debiased)
}

/// Centred covariance-style reference for the participation ratio.
fn ref_pr(x: &[f64], n: usize) -> f64 {
    let p = x.len() / n;
    let mean: Vec<f64> = (0..p)
        .map(|j| (0..n).map(|i| x[i * p + j]).sum::<f64>() / n as f64)
        .collect();
    let mut c = vec![vec![0.0; p]; p];
    for i in 0..n {
        for a in 0..p {
            for b in 0..p {
                c[a][b] += (x[i * p + a] - mean[a]) * (x[i * p + b] - mean[b]) / (n as f64 - 1.0);
            }
        }
    }
    let tr: f64 = (0..p).map(|a| c[a][a]).sum();
    let fro: f64 = c.iter().flatten().map(|v| v * v).sum();
    tr * tr / fro
}

fn ref_cosine(x: &[f64], n: usize) -> f64 {
    let p = x.len() / n;
    let nz: Vec<&[f64]> = x
        .chunks(p)
        .filter(|r| r.iter().any(|&v| v != 0.0))
        .collect();
    let nrm = |r: &[f64]| r.iter().map(|v| v * v).sum::<f64>().sqrt();
    let (mut s, mut c) = (0.0, 0usize);
    for i in 0..nz.len() {
        for j in 0..nz.len() {
            if i != j {
                let d: f64 = nz[i].iter().zip(nz[j]).map(|(a, b)| a * b).sum();
                s += d / (nrm(nz[i]) * nrm(nz[j]));
                c += 1;
            }
        }
    }
    s / c as f64
}

// ---------------------------------------------------------------------------------------------
// Known values
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_values_all_routes() {
    let (x, y) = demo();
    let (x, y) = (rows(&x, 100), rows(&y, 100));
    // 5 digits asked for; these agree with the float64 reference to ~1e-10.
    for v in [
        linear_cka(x, y, false).unwrap(),
        linear_cka_feature(x, y, false).unwrap(),
        linear_cka_gram(x, y, false).unwrap(),
    ] {
        assert!((v - LINEAR).abs() < 1e-9, "{v}");
        assert_eq!(format!("{v:.5}"), "0.55761");
    }
    for v in [
        linear_cka(x, y, true).unwrap(),
        linear_cka_feature(x, y, true).unwrap(),
        linear_cka_gram(x, y, true).unwrap(),
    ] {
        assert!((v - DEBIASED).abs() < 1e-9, "{v}");
        assert_eq!(format!("{v:.5}"), "0.51346");
    }
    let r = rbf_cka(x, y, 0.5, false).unwrap();
    assert!((r - RBF_05).abs() < 1e-9, "{r}");
    assert_eq!(format!("{r:.5}"), "0.65483");
}

#[test]
fn demo_matches_transcribed_reference() {
    let (x, y) = demo();
    for debiased in [false, true] {
        let want = ref_linear(&x, &y, 100, debiased);
        let got = linear_cka(rows(&x, 100), rows(&y, 100), debiased).unwrap();
        close(got, want, 1e-12);
        for tau in [0.2, 0.5, 1.0, 3.0] {
            let want = ref_cka(&gram_rbf(&x, 100, tau), &gram_rbf(&y, 100, tau), debiased);
            let got = rbf_cka(rows(&x, 100), rows(&y, 100), tau, debiased).unwrap();
            close(got, want, 1e-11);
        }
    }
}

#[test]
fn rbf_wide_bandwidth_tends_to_linear() {
    let (x, y) = demo();
    let r = rbf_cka(rows(&x, 100), rows(&y, 100), 1e3, false).unwrap();
    assert!((r - LINEAR).abs() < 1e-6, "{r}");
    assert!((r - 0.557613278137).abs() < 1e-9, "{r}");
    // Odd n (n² odd) exercises the other median branch.
    let want = ref_cka(
        &gram_rbf(&x[..99 * 10], 99, 0.5),
        &gram_rbf(&y[..99 * 10], 99, 0.5),
        false,
    );
    let got = rbf_cka(rows(&x[..990], 99), rows(&y[..990], 99), 0.5, false).unwrap();
    close(got, want, 1e-11);
}

#[test]
fn demo_streaming_batches_of_seven_shifted() {
    let (x, y) = demo();
    // Shift features far from the origin: the estimators are translation invariant.
    let xs: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v + 50.0 + (i % 10) as f64)
        .collect();
    let ys: Vec<f64> = y
        .iter()
        .enumerate()
        .map(|(i, v)| v - 300.0 * (i % 10 % 3) as f64)
        .collect();
    let mut s = StreamingCka::new(10, 10);
    for r0 in (0..100).step_by(7) {
        let r1 = (r0 + 7).min(100);
        s.update(
            rows(&xs, 100).slice_rows(r0, r1).unwrap(),
            rows(&ys, 100).slice_rows(r0, r1).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(s.n(), 100);
    assert!((s.biased() - LINEAR).abs() < 1e-9, "{}", s.biased());
    assert!((s.debiased() - DEBIASED).abs() < 1e-9, "{}", s.debiased());
}

#[test]
fn demo_minibatch_four_by_25() {
    let (x, y) = demo();
    let mut m = MinibatchCka::new();
    for r0 in (0..100).step_by(25) {
        m.update(
            rows(&x, 100).slice_rows(r0, r0 + 25).unwrap(),
            rows(&y, 100).slice_rows(r0, r0 + 25).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(m.n_batches(), 4);
    assert!(
        (m.compute() - MINIBATCH_4X25).abs() < 1e-9,
        "{}",
        m.compute()
    );
    assert!((m.compute() - m.compute_unweighted()).abs() < 1e-12);
    // Not full-data CKA.
    assert!((m.compute() - DEBIASED).abs() > 1e-4);
}

// ---------------------------------------------------------------------------------------------
// Invariances (METRICS §2.3)
// ---------------------------------------------------------------------------------------------

/// Random orthogonal p × p matrix (Gram–Schmidt on a Gaussian matrix), row-major.
fn orthogonal(p: usize, seed: u64) -> Vec<f64> {
    let mut r = Rng(seed);
    let mut cols: Vec<Vec<f64>> = Vec::new();
    while cols.len() < p {
        let mut v: Vec<f64> = (0..p).map(|_| r.normal()).collect();
        for c in &cols {
            let d: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(a, b)| *a -= d * b);
        }
        let nv = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        cols.push(v.iter().map(|a| a / nv).collect());
    }
    let mut q = vec![0.0; p * p];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..p {
            q[i * p + j] = c[i];
        }
    }
    q
}

fn matmul(x: &[f64], n: usize, a: &[f64], p: usize, q: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * q];
    for i in 0..n {
        for k in 0..p {
            for j in 0..q {
                out[i * q + j] += x[i * p + k] * a[k * q + j];
            }
        }
    }
    out
}

#[test]
fn invariances() {
    let (x, y) = demo();
    let (n, p) = (100, 10);
    let q = orthogonal(p, 7);
    let xq = matmul(&x, n, &q, p, p);
    let x37: Vec<f64> = x.iter().map(|v| 3.7 * v).collect();
    let xt: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v + (i % p) as f64 * 4.0 - 9.0)
        .collect();
    let mut r = Rng(3);
    let a = r.mat(p, p); // general invertible (almost surely)
    let xa = matmul(&x, n, &a, p, p);
    for debiased in [false, true] {
        for form in [Form::Feature, Form::Gram] {
            let o = opts(Precision::F64, form);
            let base = linear_cka_with(rows(&x, n), rows(&y, n), debiased, &o).unwrap();
            for (name, xv) in [("orthogonal", &xq), ("scaling", &x37), ("translation", &xt)] {
                let v = linear_cka_with(rows(xv, n), rows(&y, n), debiased, &o).unwrap();
                assert!(
                    (v - base).abs() < 1e-12,
                    "{name} {form:?} {debiased}: {v} vs {base}"
                );
            }
            let v = linear_cka_with(rows(&xa, n), rows(&y, n), debiased, &o).unwrap();
            assert!(
                (v - base).abs() > 0.01,
                "general A should change CKA: {v} vs {base}"
            );
        }
        // RBF is invariant to orthogonal transforms, isotropic scaling and translation too.
        let base = rbf_cka(rows(&x, n), rows(&y, n), 0.5, debiased).unwrap();
        for xv in [&xq, &x37, &xt] {
            let v = rbf_cka(rows(xv, n), rows(&y, n), 0.5, debiased).unwrap();
            assert!((v - base).abs() < 1e-10, "{v} vs {base}");
        }
    }
}

#[test]
fn self_similarity_and_symmetry() {
    let (x, y) = demo();
    let (xr, yr) = (rows(&x, 100), rows(&y, 100));
    for debiased in [false, true] {
        close(linear_cka(xr, xr, debiased).unwrap(), 1.0, 1e-13);
        close(linear_cka_gram(xr, xr, debiased).unwrap(), 1.0, 1e-13);
        close(rbf_cka(xr, xr, 0.5, debiased).unwrap(), 1.0, 1e-13);
        let a = linear_cka(xr, yr, debiased).unwrap();
        let b = linear_cka(yr, xr, debiased).unwrap();
        assert!((a - b).abs() < 1e-14);
        let a = rbf_cka(xr, yr, 0.7, debiased).unwrap();
        let b = rbf_cka(yr, xr, 0.7, debiased).unwrap();
        assert!((a - b).abs() < 1e-14);
    }
    // Same in f32 through the mixed path.
    let (x32, y32) = (f32s(&x), f32s(&y));
    let o = opts(Precision::Mixed, Form::Feature);
    for debiased in [false, true] {
        let v = linear_cka_with(rows32(&x32, 100), rows32(&x32, 100), debiased, &o).unwrap();
        close(v, 1.0, 1e-6);
        let a = linear_cka_with(rows32(&x32, 100), rows32(&y32, 100), debiased, &o).unwrap();
        let b = linear_cka_with(rows32(&y32, 100), rows32(&x32, 100), debiased, &o).unwrap();
        close(a, b, 1e-6);
    }
}

#[test]
fn biased_cka_in_unit_interval_and_independent_bias() {
    // Independent data: biased CKA is positively biased, debiased ≈ 0 (METRICS: 0.095 vs 0.008
    // at n = 100, p = 10 for one draw).
    let mut r = Rng(11);
    let (mut b, mut d) = (0.0, 0.0);
    for _ in 0..20 {
        let x = r.mat(100, 10);
        let y = r.mat(100, 10);
        let vb = linear_cka(rows(&x, 100), rows(&y, 100), false).unwrap();
        assert!((0.0..=1.0).contains(&vb));
        b += vb / 20.0;
        d += linear_cka(rows(&x, 100), rows(&y, 100), true).unwrap() / 20.0;
    }
    assert!(b > 0.05 && b < 0.15, "{b}");
    assert!(d.abs() < 0.03, "{d}");
}

#[test]
fn whitened_analytic_sqrt_k_over_p() {
    // X centred with orthogonal columns of equal norm ⇒ XᵀX = cI ⇒ CKA(X, X[:, :k]) = √(k/p).
    let (n, p) = (50, 12);
    let mut r = Rng(5);
    let raw = r.mat(n, p);
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for j in 0..p {
        let mut v: Vec<f64> = (0..n).map(|i| raw[i * p + j]).collect();
        let m = v.iter().sum::<f64>() / n as f64;
        v.iter_mut().for_each(|a| *a -= m);
        for _ in 0..2 {
            for c in &cols {
                let d: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(a, b)| *a -= d * b);
            }
        }
        let nv = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        cols.push(v.iter().map(|a| a / nv).collect());
    }
    let x: Vec<f64> = (0..n * p).map(|t| 2.5 * cols[t % p][t / p]).collect();
    for (k, want) in [(1, 0.288675), (3, 0.5), (12, 1.0)] {
        let xk: Vec<f64> = (0..n * k).map(|t| x[(t / k) * p + t % k]).collect();
        for form in [Form::Feature, Form::Gram] {
            let v = linear_cka_with(
                rows(&x, n),
                rows(&xk, n),
                false,
                &opts(Precision::F64, form),
            )
            .unwrap();
            assert!((v - (k as f64 / p as f64).sqrt()).abs() < 1e-12, "{k}: {v}");
            assert!((v - want).abs() < 1e-6);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forms, precision and streaming against the reference
// ---------------------------------------------------------------------------------------------

#[test]
fn feature_equals_gram_equals_reference() {
    for (seed, n, p, q, shift) in [
        (1, 40, 7, 5, 0.0),
        (2, 30, 45, 20, 10.0),
        (3, 64, 3, 70, 1e3),
    ] {
        let (x, y) = pair(seed, n, p, q, shift);
        for debiased in [false, true] {
            let want = ref_linear(&x, &y, n, debiased);
            for form in [Form::Feature, Form::Gram] {
                let v = linear_cka_with(
                    rows(&x, n),
                    rows(&y, n),
                    debiased,
                    &opts(Precision::F64, form),
                )
                .unwrap();
                // The reference works on raw (shifted) features, so it loses digits itself.
                close(v, want, if shift > 100.0 { 1e-7 } else { 1e-11 });
            }
        }
    }
}

#[test]
fn parts_are_the_reference_terms() {
    let (x, y) = pair(9, 37, 6, 8, 1.0);
    for debiased in [false, true] {
        let want = ref_cka_terms(&gram_linear(&x, 37), &gram_linear(&y, 37), debiased);
        for form in [Form::Feature, Form::Gram] {
            let got = linear_cka_parts(
                rows(&x, 37),
                rows(&y, 37),
                debiased,
                &opts(Precision::F64, form),
            )
            .unwrap();
            close(got.hsic_xy, want[0], 1e-11);
            close(got.hsic_xx, want[1], 1e-11);
            close(got.hsic_yy, want[2], 1e-11);
            assert_eq!(got.n, 37);
            assert!(!got.is_degenerate());
        }
    }
}

#[test]
fn mixed_precision_within_1e6_of_f64_oracle() {
    // f32 inputs with large per-column offsets; the oracle is the f64 computation on the same
    // (f32-valued) data.
    let (n, p, q) = (3000, 96, 80);
    let (x, y) = pair(21, n, p, q, 40.0);
    let (x32, y32) = (f32s(&x), f32s(&y));
    let (xu, yu) = (up(&x32), up(&y32));
    for debiased in [false, true] {
        let oracle = linear_cka_with(
            rows(&xu, n),
            rows(&yu, n),
            debiased,
            &opts(Precision::F64, Form::Feature),
        )
        .unwrap();
        for form in [Form::Feature, Form::Gram] {
            for panel in [64, 256, 2048, 4096] {
                let o = CkaOptions {
                    panel,
                    ..opts(Precision::Mixed, form)
                };
                let v = linear_cka_with(rows32(&x32, n), rows32(&y32, n), debiased, &o).unwrap();
                close(v, oracle, 1e-6);
            }
        }
        // Auto runs Mixed on f32 input.
        let v = linear_cka(rows32(&x32, n), rows32(&y32, n), debiased).unwrap();
        close(v, oracle, 1e-6);
    }
    // RBF: the distance Gram through f32 panels of features.
    let (n, p, q) = (400, 300, 200);
    let (x, y) = pair(22, n, p, q, 40.0);
    let (x32, y32) = (f32s(&x), f32s(&y));
    for debiased in [false, true] {
        let oracle = rbf_cka_with(
            rows32(&x32, n),
            rows32(&y32, n),
            0.5,
            debiased,
            &opts(Precision::F64, Form::Auto),
        )
        .unwrap();
        let o = CkaOptions {
            panel: 128,
            ..opts(Precision::Mixed, Form::Auto)
        };
        let v = rbf_cka_with(rows32(&x32, n), rows32(&y32, n), 0.5, debiased, &o).unwrap();
        close(v, oracle, 1e-6);
    }
}

#[test]
fn mixed_precision_massive_activations() {
    // LLM-like: a few feature columns 300× the others, with large offsets; f32 input.
    let (n, p, q) = (5000, 64, 64);
    let (mut x, mut y) = pair(23, n, p, q, 5.0);
    for i in 0..n {
        for j in [0, 17] {
            x[i * p + j] = x[i * p + j] * 300.0 + 2000.0;
        }
        y[i * q + 3] = y[i * q + 3] * 300.0 - 5000.0;
    }
    let (x32, y32) = (f32s(&x), f32s(&y));
    let (xu, yu) = (up(&x32), up(&y32));
    for debiased in [false, true] {
        let oracle = linear_cka_with(
            rows(&xu, n),
            rows(&yu, n),
            debiased,
            &opts(Precision::F64, Form::Feature),
        )
        .unwrap();
        for form in [Form::Feature, Form::Gram] {
            let v = linear_cka_with(
                rows32(&x32, n),
                rows32(&y32, n),
                debiased,
                &opts(Precision::Mixed, form),
            )
            .unwrap();
            close(v, oracle, 1e-6);
        }
        // Streaming with Auto: batches under 64 rows run in f64, larger ones in f32 panels.
        let s = stream(
            &x,
            &y,
            n,
            &[7, 50, 51, 3000, 3010],
            CkaOptions::default(),
            true,
        );
        let v = if debiased { s.debiased() } else { s.biased() };
        close(v, oracle, 1e-6);
    }
}

fn stream(
    x: &[f64],
    y: &[f64],
    n: usize,
    cuts: &[usize],
    o: CkaOptions,
    f32in: bool,
) -> StreamingCka {
    let (p, q) = (x.len() / n, y.len() / n);
    let (x32, y32) = (f32s(x), f32s(y));
    let mut s = StreamingCka::with_options(p, q, o);
    let mut r0 = 0;
    for &c in cuts.iter().chain(std::iter::once(&n)) {
        let (xr, yr) = if f32in {
            (rows32(&x32, n), rows32(&y32, n))
        } else {
            (rows(x, n), rows(y, n))
        };
        s.update(xr.slice_rows(r0, c).unwrap(), yr.slice_rows(r0, c).unwrap())
            .unwrap();
        r0 = c;
    }
    s
}

#[test]
fn streaming_equals_full_data() {
    let n = 230;
    let (x, y) = pair(4, n, 17, 11, 25.0);
    let cuts = [1, 5, 6, 40, 41, 137, 200];
    let s = stream(&x, &y, n, &cuts, opts(Precision::F64, Form::Auto), false);
    assert_eq!(s.n(), n as u64);
    for debiased in [false, true] {
        let want = ref_linear(&x, &y, n, debiased);
        let full = linear_cka_with(
            rows(&x, n),
            rows(&y, n),
            debiased,
            &opts(Precision::F64, Form::Feature),
        )
        .unwrap();
        let got = if debiased { s.debiased() } else { s.biased() };
        close(got, full, 1e-10);
        close(got, want, 1e-9);
    }
    // Mixed precision on f32 input (panels of 64 rows inside the big batches).
    let o = CkaOptions {
        panel: 64,
        ..opts(Precision::Mixed, Form::Auto)
    };
    let (xu, yu) = (up(&f32s(&x)), up(&f32s(&y)));
    let s = stream(&x, &y, n, &cuts, o, true);
    for debiased in [false, true] {
        let oracle = ref_linear(&xu, &yu, n, debiased);
        let got = if debiased { s.debiased() } else { s.biased() };
        close(got, oracle, 1e-6);
    }
}

#[test]
fn chunked_equals_whole_and_merge_equals_sequential() {
    let n = 300;
    let (x, y) = pair(8, n, 13, 19, 7.0);
    let o = opts(Precision::F64, Form::Auto);
    let whole = stream(&x, &y, n, &[], o, false);
    let chunked = stream(&x, &y, n, &[50, 51, 199], o, false);
    for d in [false, true] {
        let (a, b) = (whole.parts(d), chunked.parts(d));
        close(b.value(), a.value(), 1e-12);
    }
    // Three accumulators over disjoint parts (each with its own shift), merged in two orders.
    let (p, q) = (13, 19);
    let part = |r0: usize, r1: usize, shift: f64| {
        let xs: Vec<f64> = x[r0 * p..r1 * p].iter().map(|v| v + shift).collect();
        let ys: Vec<f64> = y[r0 * q..r1 * q].iter().map(|v| v - 2.0 * shift).collect();
        let mut s = StreamingCka::with_options(p, q, o);
        s.update(rows(&xs, r1 - r0), rows(&ys, r1 - r0)).unwrap();
        s
    };
    let (a, b, c) = (part(0, 90, 0.0), part(90, 91, 5.0), part(91, n, -3.0));
    let mut m1 = a.clone();
    m1.merge(&b).unwrap();
    m1.merge(&c).unwrap();
    let mut m2 = StreamingCka::with_options(p, q, o);
    m2.merge(&c).unwrap();
    m2.merge(&StreamingCka::new(p, q)).unwrap();
    m2.merge(&a).unwrap();
    m2.merge(&b).unwrap();
    // Features were translated per part, which changes the data: compare against the same
    // translated data streamed sequentially.
    let mut xs = x.clone();
    let mut ys = y.clone();
    for (r0, r1, sh) in [(0, 90, 0.0), (90, 91, 5.0), (91, n, -3.0)] {
        xs[r0 * p..r1 * p].iter_mut().for_each(|v| *v += sh);
        ys[r0 * q..r1 * q].iter_mut().for_each(|v| *v -= 2.0 * sh);
    }
    let seq = stream(&xs, &ys, n, &[90, 91], o, false);
    for d in [false, true] {
        let want = ref_linear(&xs, &ys, n, d);
        for m in [&m1, &m2] {
            assert_eq!(m.n(), n as u64);
            close(m.parts(d).value(), seq.parts(d).value(), 1e-10);
            close(m.parts(d).value(), want, 1e-9);
            close(m.parts(d).hsic_xx, seq.parts(d).hsic_xx, 1e-10);
            close(m.parts(d).hsic_xy, seq.parts(d).hsic_xy, 1e-10);
        }
    }
    close(m1.participation_ratio_x(), ref_pr(&xs, n), 1e-10);
    close(m2.participation_ratio_y(), ref_pr(&ys, n), 1e-10);
}

#[test]
fn streaming_small_n_reset_and_errors() {
    let (x, y) = pair(2, 10, 3, 4, 0.0);
    let mut s = StreamingCka::new(3, 4);
    assert!(s.biased().is_nan() && s.debiased().is_nan());
    s.update(rows(&x[..3], 1), rows(&y[..4], 1)).unwrap();
    assert!(s.biased().is_nan(), "one example: undefined");
    s.update(rows(&x[3..9], 2), rows(&y[4..12], 2)).unwrap();
    assert!(s.biased().is_finite());
    assert!(s.debiased().is_nan(), "debiased needs n ≥ 4");
    assert!(s.parts(true).is_degenerate());
    // Errors leave the state alone.
    assert!(matches!(
        s.update(rows(&x[..6], 2), rows(&y[..4], 1)),
        Err(Error::Config { .. })
    ));
    assert!(s.update(rows(&y[..8], 2), rows(&y[..8], 2)).is_err());
    let bad = [1.0, f64::NAN, 0.0];
    assert!(s.update(rows(&bad, 1), rows(&y[..4], 1)).is_err());
    assert_eq!(s.n(), 3);
    assert!(s.merge(&StreamingCka::new(4, 3)).is_err());
    s.reset();
    assert_eq!(s.n(), 0);
    assert!(s.biased().is_nan());
}

#[test]
fn threads_do_not_change_results() {
    let n = 700;
    let (x, y) = pair(12, n, 150, 120, 3.0);
    let (x32, y32) = (f32s(&x), f32s(&y));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = vec![];
            for d in [false, true] {
                for form in [Form::Feature, Form::Gram] {
                    for prec in [Precision::F64, Precision::Mixed] {
                        out.push(
                            linear_cka_with(rows32(&x32, n), rows32(&y32, n), d, &opts(prec, form))
                                .unwrap(),
                        );
                    }
                }
            }
            out.push(mean_pairwise_cosine(rows(&x, n)).unwrap());
            out
        })
    };
    let (a, b) = (run(1), run(2));
    for (u, v) in a.iter().zip(&b) {
        assert_eq!(u.to_bits(), v.to_bits(), "{u} vs {v}");
    }
}

// ---------------------------------------------------------------------------------------------
// Minibatch
// ---------------------------------------------------------------------------------------------

/// The reference formula: Σ_b w_b⟨K_U,L_U⟩ / √(Σ_b w_b‖K_U‖² · Σ_b w_b‖L_U‖²).
fn ref_minibatch(x: &[f64], y: &[f64], n: usize, cuts: &[usize], weighted: bool) -> f64 {
    let (p, q) = (x.len() / n, y.len() / n);
    let mut h = [0.0; 3];
    let mut r0 = 0;
    for &c in cuts.iter().chain(std::iter::once(&n)) {
        let nb = c - r0;
        let t = ref_cka_terms(
            &gram_linear(&x[r0 * p..c * p], nb),
            &gram_linear(&y[r0 * q..c * q], nb),
            true,
        );
        let w = if weighted {
            1.0 / (nb as f64 * (nb as f64 - 3.0))
        } else {
            1.0
        };
        for i in 0..3 {
            h[i] += w * t[i];
        }
        r0 = c;
    }
    h[0] / (h[1].sqrt() * h[2].sqrt())
}

fn minibatch(x: &[f64], y: &[f64], n: usize, cuts: &[usize]) -> MinibatchCka {
    let mut m = MinibatchCka::new();
    let mut r0 = 0;
    for &c in cuts.iter().chain(std::iter::once(&n)) {
        m.update(
            rows(x, n).slice_rows(r0, c).unwrap(),
            rows(y, n).slice_rows(r0, c).unwrap(),
        )
        .unwrap();
        r0 = c;
    }
    m
}

#[test]
fn minibatch_equal_batches_match_reference() {
    let n = 120;
    // p + q below and above the batch size: both per-batch forms.
    for (p, q) in [(5, 4), (40, 30)] {
        let (x, y) = pair(31, n, p, q, 2.0);
        let cuts = [30, 60, 90];
        let m = minibatch(&x, &y, n, &cuts);
        assert_eq!(m.n_batches(), 4);
        close(m.compute(), ref_minibatch(&x, &y, n, &cuts, true), 1e-11);
        close(
            m.compute_unweighted(),
            ref_minibatch(&x, &y, n, &cuts, false),
            1e-11,
        );
        close(m.compute(), m.compute_unweighted(), 1e-12);
    }
}

#[test]
fn minibatch_unequal_batches_are_weighted() {
    let n = 200;
    let (x, y) = pair(32, n, 6, 5, 0.0);
    let cuts = [10, 150, 160];
    let m = minibatch(&x, &y, n, &cuts);
    let weighted = ref_minibatch(&x, &y, n, &cuts, true);
    let unweighted = ref_minibatch(&x, &y, n, &cuts, false);
    close(m.compute(), weighted, 1e-11);
    close(m.compute_unweighted(), unweighted, 1e-11);
    // The reference code's (unweighted) formula gives a different number here.
    assert!(
        (weighted - unweighted).abs() > 1e-3,
        "{weighted} vs {unweighted}"
    );
}

#[test]
fn minibatch_skips_tiny_batches_and_resets() {
    let n = 60;
    let (x, y) = pair(33, n, 4, 4, 0.0);
    let m = minibatch(&x, &y, n, &[3, 30, 57]);
    assert_eq!(m.n_batches(), 2);
    assert_eq!(m.n_skipped(), 2);
    let want = {
        let xs = &x[3 * 4..57 * 4];
        let ys = &y[3 * 4..57 * 4];
        ref_minibatch(xs, ys, 54, &[27], true)
    };
    close(m.compute(), want, 1e-11);
    let mut m = m;
    assert!(m.update(rows(&x[..40], 10), rows(&y[..20], 5)).is_err());
    assert!(
        m.update(rows(&x[..40], 4), rows(&x[..40], 8)).is_err(),
        "q changed"
    );
    m.reset();
    assert_eq!(m.n_batches(), 0);
    assert!(m.compute().is_nan());
}

// ---------------------------------------------------------------------------------------------
// Layer matrix
// ---------------------------------------------------------------------------------------------

#[test]
fn cka_matrix_matches_pairwise() {
    let n = 60;
    let mut r = Rng(41);
    let base = r.mat(n, 8);
    let layers: Vec<Vec<f64>> = (0..4)
        .map(|l| {
            let p = 5 + 7 * l;
            let a = r.mat(8, p);
            let mut v = matmul(&base, n, &a, 8, p);
            v.iter_mut().for_each(|t| *t += r.normal() * l as f64 + 3.0);
            v
        })
        .collect();
    let xs: Vec<Rows> = layers[..3].iter().map(|v| rows(v, n)).collect();
    let ys: Vec<Rows> = layers[1..].iter().map(|v| rows(v, n)).collect();
    for debiased in [false, true] {
        let plain = cka_matrix(&xs, &ys, debiased).unwrap();
        assert_eq!(plain.len(), 9);
        for form in [Form::Feature, Form::Gram] {
            for budget in [1usize, 1 << 30] {
                let o = CkaOptions {
                    memory_budget: budget,
                    ..opts(Precision::F64, form)
                };
                let m = cka_matrix_with(&xs, &ys, debiased, &o).unwrap();
                for i in 0..3 {
                    for j in 0..3 {
                        let want = ref_linear(&layers[i], &layers[j + 1], n, debiased);
                        close(m[i * 3 + j], want, 1e-10);
                        close(plain[i * 3 + j], want, 1e-10);
                    }
                }
                // Layers shared between xs and ys give exactly 1 against themselves.
                close(m[3], 1.0, 1e-13);
                close(m[2 * 3 + 1], 1.0, 1e-13);
            }
        }
    }
    assert!(cka_matrix(&[], &ys, false).unwrap().is_empty());
    let short = rows(&layers[0][..40 * 5], 40);
    assert!(cka_matrix(&[short], &ys, false).is_err());
}

// ---------------------------------------------------------------------------------------------
// Collapse companions
// ---------------------------------------------------------------------------------------------

#[test]
fn mean_pairwise_cosine_against_direct() {
    let (n, p) = (70, 9);
    let mut r = Rng(51);
    let mut x = r.mat(n, p);
    x.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v += 0.5 * (i % p) as f64);
    close(
        mean_pairwise_cosine(rows(&x, n)).unwrap(),
        ref_cosine(&x, n),
        1e-12,
    );
    // Zero rows are left out of the mean.
    for i in [0, 13, 69] {
        x[i * p..(i + 1) * p].iter_mut().for_each(|v| *v = 0.0);
    }
    close(
        mean_pairwise_cosine(rows(&x, n)).unwrap(),
        ref_cosine(&x, n),
        1e-12,
    );
    let x32 = f32s(&x);
    close(
        mean_pairwise_cosine(rows32(&x32, n)).unwrap(),
        ref_cosine(&up(&x32), n),
        1e-12,
    );
    // Identical directions: 1. Opposite pair: −1. Fewer than two non-zero rows: NaN.
    let same = [1.0, 2.0, 2.0, 4.0, 0.5, 1.0];
    close(mean_pairwise_cosine(rows(&same, 3)).unwrap(), 1.0, 1e-15);
    let opp = [1.0, -2.0, -1.0, 2.0];
    close(mean_pairwise_cosine(rows(&opp, 2)).unwrap(), -1.0, 1e-15);
    let one = [0.0, 0.0, 1.0, 2.0];
    assert!(mean_pairwise_cosine(rows(&one, 2)).unwrap().is_nan());
    assert!(mean_pairwise_cosine(rows(&one[..2], 1)).is_err());
    // Large n: the chunked parallel sum equals the direct sum.
    let (n, p) = (1000, 5);
    let x = Rng(52).mat(n, p);
    close(
        mean_pairwise_cosine(rows(&x, n)).unwrap(),
        ref_cosine(&x, n),
        1e-10,
    );
}

#[test]
fn participation_ratio_against_direct() {
    let mut r = Rng(61);
    for (n, p) in [(80, 6), (12, 30)] {
        let mut x = r.mat(n, p);
        x.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = *v * (1 + i % p) as f64 + 100.0);
        let want = ref_pr(&x, n);
        close(
            covariance_participation_ratio(rows(&x, n)).unwrap(),
            want,
            1e-10,
        );
        for form in [Form::Feature, Form::Gram] {
            let v = covariance_participation_ratio_with(rows(&x, n), &opts(Precision::F64, form))
                .unwrap();
            close(v, want, 1e-10);
        }
        assert!(want >= 1.0 && want <= p.min(n - 1) as f64 + 1e-9);
    }
    // Isotropic, centred, orthogonal columns: PR = p.
    let x = [1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0];
    close(
        covariance_participation_ratio(rows(&x, 4)).unwrap(),
        2.0,
        1e-14,
    );
    let c = [3.0; 8];
    assert!(covariance_participation_ratio(rows(&c, 4))
        .unwrap()
        .is_nan());
    assert!(covariance_participation_ratio(rows(&c[..2], 1)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Errors and degenerate input
// ---------------------------------------------------------------------------------------------

#[test]
fn errors_and_nan() {
    let (x, y) = demo();
    let xr = rows(&x, 100);
    // Shapes.
    assert!(Rows::f64(&x, 99, 10).is_err());
    assert!(Rows::f64(&x, 1000, 0).is_err());
    assert!(Rows::f64(&x, usize::MAX, 2).is_err());
    assert!(xr.slice_rows(5, 101).is_err());
    let y90 = rows(&y[..900], 90);
    assert!(matches!(
        linear_cka(xr, y90, false),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        rbf_cka(xr, y90, 0.5, false),
        Err(Error::Config { .. })
    ));
    // n too small.
    let x3 = rows(&x[..30], 3);
    let y3 = rows(&y[..30], 3);
    assert!(linear_cka(x3, y3, false).is_ok());
    assert!(matches!(
        linear_cka(x3, y3, true),
        Err(Error::Config { .. })
    ));
    assert!(linear_cka(rows(&x[..10], 1), rows(&y[..10], 1), false).is_err());
    // Non-finite values.
    let mut bad = x.clone();
    bad[517] = f64::INFINITY;
    let e = linear_cka(rows(&bad, 100), rows(&y, 100), false).unwrap_err();
    assert!(e.to_string().contains("row 51"), "{e}");
    let bad32 = {
        let mut b = f32s(&y);
        b[999] = f32::NAN;
        b
    };
    assert!(linear_cka(rows(&x, 100), rows32(&bad32, 100), true).is_err());
    // τ.
    for tau in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(rbf_cka(xr, rows(&y, 100), tau, false).is_err());
    }
    // Zero panel depth.
    let o = CkaOptions {
        panel: 0,
        ..CkaOptions::default()
    };
    assert!(linear_cka_with(xr, rows(&y, 100), false, &o).is_err());
    // Constant representation: NaN, flagged, no panic.
    let c = vec![2.5; 1000];
    for debiased in [false, true] {
        for form in [Form::Feature, Form::Gram] {
            let parts = linear_cka_parts(xr, rows(&c, 100), debiased, &opts(Precision::Auto, form))
                .unwrap();
            assert!(parts.is_degenerate() && parts.value().is_nan());
        }
        assert!(rbf_cka(rows(&c, 100), xr, 0.5, debiased).unwrap().is_nan());
    }
    // Debiased with n = 4 and a rank-deficient kernel: finite or NaN, never a panic.
    let v = linear_cka(rows(&x[..40], 4), rows(&y[..40], 4), true).unwrap();
    assert!(v.is_nan() || v.abs() <= 1.0 + 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Properties over random shapes
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prop_forms_stream_and_reference_agree(
        seed in 0u64..1000,
        n in 4usize..40,
        p in 1usize..12,
        q in 1usize..12,
        shift in -50.0f64..50.0,
        cut_seed in 0u64..1000,
    ) {
        let (x, y) = pair(seed, n, p, q, shift);
        let mut cuts: Vec<usize> = (0..3).map(|i| ((cut_seed >> (i * 3)) as usize * 7 + i) % n).collect();
        cuts.sort();
        for debiased in [false, true] {
            let want = ref_linear(&x, &y, n, debiased);
            let f = linear_cka_with(rows(&x, n), rows(&y, n), debiased, &opts(Precision::F64, Form::Feature)).unwrap();
            let g = linear_cka_with(rows(&x, n), rows(&y, n), debiased, &opts(Precision::F64, Form::Gram)).unwrap();
            let s = stream(&x, &y, n, &cuts, opts(Precision::F64, Form::Auto), false).parts(debiased).value();
            if want.is_finite() && want.abs() > 1e-6 {
                // Absolute tolerance scaled by the offset: the reference itself works on raw
                // shifted features.
                let tol = 1e-9 * (1.0 + shift.abs()).powi(2);
                prop_assert!((f - want).abs() <= tol, "feature {} vs {}", f, want);
                prop_assert!((g - want).abs() <= tol, "gram {} vs {}", g, want);
                prop_assert!((s - want).abs() <= tol, "stream {} vs {}", s, want);
            }
            if !debiased {
                prop_assert!((-1e-12..=1.0 + 1e-12).contains(&f));
            }
        }
    }
}
