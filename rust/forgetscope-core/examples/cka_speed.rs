//! Speed and accuracy of linear CKA against this machine's plain f32 GEMM rate, in one run.
//!
//! `cargo run --release -p forgetscope-core --example cka_speed [n p gram_n panel]`
//! (defaults 16384 4096 4096 2048). Prints, for the feature form (X, Y: n × p, f32) and the Gram
//! form (n = gram_n, p features): seconds, flops actually executed / s, the ratio to faer's plain
//! f32 GEMM on the same shapes, and the relative error of the Mixed path against the F64 path.
//! Flop counts are the flops executed: feature form n(p+q)² (XᵀY full, XᵀX and YᵀY as lower
//! triangles); Gram form n²(p+q) (two lower-triangle Grams); plain GEMM 2mnk. The f32 reference
//! rate is faer's f32 GEMM on the same shapes in its fastest layout (contraction index
//! contiguous); the rate on the row-major inputs as given is printed too.
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use forgetscope_core::metrics::cka::{
    linear_cka_parts, CkaOptions, Form, Precision, Rows, StreamingCka,
};
use std::time::Instant;

/// Deterministic pseudo-normal data (sum of 4 uniforms), with per-column offsets and a shared
/// component between X and Y so that CKA is neither 0 nor 1.
fn data(n: usize, p: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut s = seed;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut x = vec![0f32; n * p];
    let mut y = vec![0f32; n * p];
    for i in 0..n * p {
        let shared = u() + u() + u() + u();
        x[i] = shared + 0.5 * (u() + u()) + 0.01 * (i % p) as f32;
        y[i] = 0.7 * shared + u() + u() - 0.02 * (i % p) as f32;
    }
    (x, y)
}

/// Row-major [n, p] → row-major [p, n].
fn transpose(a: &[f32], n: usize, p: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * p];
    for i0 in (0..n).step_by(64) {
        for j0 in (0..p).step_by(64) {
            for i in i0..(i0 + 64).min(n) {
                for j in j0..(j0 + 64).min(p) {
                    t[j * n + i] = a[i * p + j];
                }
            }
        }
    }
    t
}

fn secs<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("integer argument"))
        .collect();
    let n = *args.first().unwrap_or(&16384);
    let p = *args.get(1).unwrap_or(&4096);
    let gn = *args.get(2).unwrap_or(&4096);
    let panel = *args.get(3).unwrap_or(&2048);
    let par = Par::rayon(0);
    println!(
        "threads {}, feature form n = {n}, p = q = {p}; Gram form n = {gn}, p = q = {p}; panel {panel}",
        rayon::current_num_threads()
    );
    let (x, y) = data(n, p, 0x1234_5678);
    let (xr, yr) = (Rows::f32(&x, n, p).unwrap(), Rows::f32(&y, n, p).unwrap());

    // faer's f32 GEMM XᵀY [p × n]·[n × p], two layouts, best of 2 each:
    // - "as given": X, Y row-major [n, p] (the contraction index strided);
    // - "feature-major": Xᵀ, Yᵀ stored row-major [p, n] (the contraction index contiguous),
    //   the layout faer runs fastest, and the one the CKA panels are built in.
    let gemm = |a: MatRef<'_, f32>, b: MatRef<'_, f32>| {
        let mut c = vec![0f32; p * p];
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let (_, t) = secs(|| {
                matmul(
                    MatMut::from_column_major_slice_mut(&mut c, p, p),
                    Accum::Replace,
                    a,
                    b,
                    1.0f32,
                    par,
                )
            });
            best = best.min(t);
        }
        best
    };
    let t_given = gemm(
        MatRef::from_row_major_slice(&x, n, p).transpose(),
        MatRef::from_row_major_slice(&y, n, p),
    );
    let (xt, yt) = (transpose(&x, n, p), transpose(&y, n, p));
    let t_fm = gemm(
        MatRef::from_row_major_slice(&xt, p, n),
        MatRef::from_row_major_slice(&yt, p, n).transpose(),
    );
    let mut c = vec![0f32; p * p];
    let (_, t_syrk) = secs(|| {
        tri_matmul(
            MatMut::from_column_major_slice_mut(&mut c, p, p),
            BlockStructure::TriangularLower,
            Accum::Replace,
            MatRef::from_row_major_slice(&xt, p, n),
            BlockStructure::Rectangular,
            MatRef::from_row_major_slice(&xt, p, n).transpose(),
            BlockStructure::Rectangular,
            1.0f32,
            par,
        )
    });
    drop((c, xt, yt));
    let gflop = 2.0 * (n * p * p) as f64 / 1e9;
    let r_given = gflop / t_given;
    let r32 = gflop / t_fm;
    println!(
        "faer f32 GEMM XᵀY [{p}×{n}]·[{n}×{p}]: row-major inputs as given {t_given:.3} s = {r_given:.1} GFLOP/s; \
         feature-major {t_fm:.3} s = {r32:.1} GFLOP/s (best of 2 each)"
    );
    println!(
        "faer f32 SYRK XᵀX lower, feature-major: {t_syrk:.3} s = {:.1} GFLOP/s (n·p(p+1) flops)",
        (n * p * (p + 1)) as f64 / t_syrk / 1e9
    );
    // f64 GEMM rate on the same p × p output with a shorter contraction (rate, not total time).
    let nd = n.min(4096);
    let xd: Vec<f64> = transpose(&x[..nd * p], nd, p)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let yd: Vec<f64> = transpose(&y[..nd * p], nd, p)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut cd = vec![0f64; p * p];
    let mut t_d = f64::INFINITY;
    for _ in 0..2 {
        let (_, t) = secs(|| {
            matmul(
                MatMut::from_column_major_slice_mut(&mut cd, p, p),
                Accum::Replace,
                MatRef::from_row_major_slice(&xd, p, nd),
                MatRef::from_row_major_slice(&yd, p, nd).transpose(),
                1.0f64,
                par,
            )
        });
        t_d = t_d.min(t);
    }
    drop((xd, yd, cd));
    let r64 = 2.0 * (nd * p * p) as f64 / t_d / 1e9;
    println!(
        "faer f64 GEMM feature-major [{p}×{nd}]·[{nd}×{p}]: {r64:.1} GFLOP/s = {:.1}% of the f32 rate",
        100.0 * r64 / r32
    );

    // Feature form.
    let flops = (n * (2 * p) * (2 * p)) as f64;
    let mixed = CkaOptions {
        precision: Precision::Mixed,
        form: Form::Feature,
        panel,
        ..CkaOptions::default()
    };
    let exact = CkaOptions {
        precision: Precision::F64,
        ..mixed
    };
    let mut t_mixed = f64::INFINITY;
    let mut biased_mixed = 0.0;
    for _ in 0..2 {
        let (v, t) = secs(|| linear_cka_parts(xr, yr, false, &mixed).unwrap().value());
        t_mixed = t_mixed.min(t);
        biased_mixed = v;
    }
    // The oracle: the same accumulators in f64 (one batch = the feature form), both estimators.
    let (oracle, t_f64) = secs(|| {
        let mut s = StreamingCka::with_options(p, p, exact);
        s.update(xr, yr).unwrap();
        (s.biased(), s.debiased())
    });
    let (deb_mixed, t_stream) = secs(|| {
        let mut s = StreamingCka::with_options(p, p, mixed);
        s.update(xr, yr).unwrap();
        s.debiased()
    });
    let rate = |t: f64| flops / t / 1e9;
    println!(
        "feature form, Mixed (f32 panels of {panel} rows → f64): {t_mixed:.3} s = {:.1} GFLOP/s executed = \
         {:.1}% of the feature-major f32 GEMM rate ({:.1}% of the as-given rate); \
         time vs 3 full feature-major GEMMs: {:.1}%",
        rate(t_mixed),
        100.0 * rate(t_mixed) / r32,
        100.0 * rate(t_mixed) / r_given,
        100.0 * 3.0 * t_fm / t_mixed
    );
    println!(
        "feature form, F64 GEMMs: {t_f64:.3} s = {:.1} GFLOP/s = {:.1}% of the f32 rate",
        rate(t_f64),
        100.0 * rate(t_f64) / r32
    );
    println!("feature form, Mixed, streaming accumulator (one batch, debiased): {t_stream:.3} s");
    println!(
        "  CKA biased {:.12} (F64 {:.12}, rel. err {:.2e}); debiased {:.12} (F64 {:.12}, rel. err {:.2e})",
        biased_mixed,
        oracle.0,
        ((biased_mixed - oracle.0) / oracle.0).abs(),
        deb_mixed,
        oracle.1,
        ((deb_mixed - oracle.1) / oracle.1).abs()
    );

    // Gram form at n = gn.
    let (gx, gy) = (&x[..gn * p], &y[..gn * p]);
    let (gxr, gyr) = (Rows::f32(gx, gn, p).unwrap(), Rows::f32(gy, gn, p).unwrap());
    let mut c = vec![0f32; gn * gn];
    let mut t_g32 = f64::INFINITY;
    for _ in 0..2 {
        let (_, t) = secs(|| {
            matmul(
                MatMut::from_column_major_slice_mut(&mut c, gn, gn),
                Accum::Replace,
                MatRef::from_row_major_slice(gx, gn, p),
                MatRef::from_row_major_slice(gy, gn, p).transpose(),
                1.0f32,
                par,
            )
        });
        t_g32 = t_g32.min(t);
    }
    drop(c);
    let g32 = 2.0 * (gn * gn * p) as f64 / t_g32 / 1e9;
    let gflops = (gn * gn * 2 * p) as f64;
    let gm = CkaOptions {
        form: Form::Gram,
        ..mixed
    };
    let ge = CkaOptions {
        form: Form::Gram,
        ..exact
    };
    let (gv, t_gm) = secs(|| linear_cka_parts(gxr, gyr, false, &gm).unwrap().value());
    let (gve, t_ge) = secs(|| linear_cka_parts(gxr, gyr, false, &ge).unwrap().value());
    let (gd, _) = secs(|| linear_cka_parts(gxr, gyr, true, &gm).unwrap().value());
    let (gde, _) = secs(|| linear_cka_parts(gxr, gyr, true, &ge).unwrap().value());
    println!("faer f32 GEMM X·Yᵀ [{gn}×{p}]·[{p}×{gn}] (row-major inputs are already the fast layout here): {t_g32:.3} s = {g32:.1} GFLOP/s");
    println!(
        "Gram form, Mixed: {t_gm:.3} s, {:.1} GFLOP/s = {:.1}% of f32 GEMM; F64: {t_ge:.3} s, {:.1} GFLOP/s = {:.1}%",
        gflops / t_gm / 1e9,
        100.0 * gflops / t_gm / 1e9 / g32,
        gflops / t_ge / 1e9,
        100.0 * gflops / t_ge / 1e9 / g32
    );
    println!(
        "  CKA biased {gv:.12} (F64 {gve:.12}, rel. err {:.2e}); debiased {gd:.12} (F64 {gde:.12}, rel. err {:.2e})",
        ((gv - gve) / gve).abs(),
        ((gd - gde) / gde).abs()
    );
}
