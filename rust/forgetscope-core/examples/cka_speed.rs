//! Speed and accuracy of linear CKA against this machine's plain f32 GEMM rate, in one run.
//!
//! `cargo run --release -p forgetscope-core --example cka_speed [n p gram_n panel]`
//! (defaults 16384 4096 4096 and the default panel depth). Prints, for the feature form (X, Y: n × p, f32) and the Gram
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
    linear_cka_parts, CkaOptions, Form, Precision, Rows, StreamingCka, DEFAULT_PANEL,
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

fn f32_gemm(c: &mut [f32], m: usize, a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    let (_, t) = secs(|| {
        matmul(
            MatMut::from_column_major_slice_mut(c, m, m),
            Accum::Replace,
            a,
            b,
            1.0f32,
            Par::rayon(0),
        )
    });
    t
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("integer argument"))
        .collect();
    let n = *args.first().unwrap_or(&16384);
    let p = *args.get(1).unwrap_or(&4096);
    let gn = *args.get(2).unwrap_or(&4096);
    let panel = *args.get(3).unwrap_or(&DEFAULT_PANEL);
    println!(
        "threads {}; feature form X, Y: {n} × {p} f32; Gram form: {gn} × {p}; Mixed panel depth {panel}",
        rayon::current_num_threads()
    );
    let (x, y) = data(n, p, 0x1234_5678);
    let (xr, yr) = (Rows::f32(&x, n, p).unwrap(), Rows::f32(&y, n, p).unwrap());
    let (xt, yt) = (transpose(&x, n, p), transpose(&y, n, p));
    let gflop = 2.0 * (n * p * p) as f64 / 1e9;
    let flops = (n * (2 * p) * (2 * p)) as f64 / 1e9; // n(p+q)²
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

    // Interleave the reference GEMM and the CKA so that both see the same machine load.
    // f32 GEMM XᵀY [p × n]·[n × p] in faer's fastest layout: Xᵀ, Yᵀ stored row-major [p, n]
    // (the contraction index contiguous), the layout the CKA panels are built in.
    println!("--- feature form ---");
    let mut c = vec![0f32; p * p];
    let (mut best_gemm, mut best_cka) = (f64::INFINITY, f64::INFINITY);
    let mut biased_mixed = 0.0;
    for rep in 0..2 {
        let t_g = f32_gemm(
            &mut c,
            p,
            MatRef::from_row_major_slice(&xt, p, n),
            MatRef::from_row_major_slice(&yt, p, n).transpose(),
        );
        let (v, t_c) = secs(|| linear_cka_parts(xr, yr, false, &mixed).unwrap().value());
        biased_mixed = v;
        println!(
            "rep {rep}: f32 GEMM {t_g:.3} s = {:.1} GFLOP/s; CKA Mixed {t_c:.3} s = {:.1} GFLOP/s executed = {:.1}% of that GEMM rate",
            gflop / t_g,
            flops / t_c,
            100.0 * (flops / t_c) / (gflop / t_g)
        );
        best_gemm = best_gemm.min(t_g);
        best_cka = best_cka.min(t_c);
    }
    let r32 = gflop / best_gemm;
    let t_given = f32_gemm(
        &mut c,
        p,
        MatRef::from_row_major_slice(&x, n, p).transpose(),
        MatRef::from_row_major_slice(&y, n, p),
    );
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
            Par::rayon(0),
        )
    });
    drop((c, xt, yt));
    // f64 GEMM rate on the same p × p output with a shorter contraction (a rate, not a total).
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
    let (_, t_d) = secs(|| {
        matmul(
            MatMut::from_column_major_slice_mut(&mut cd, p, p),
            Accum::Replace,
            MatRef::from_row_major_slice(&xd, p, nd),
            MatRef::from_row_major_slice(&yd, p, nd).transpose(),
            1.0f64,
            Par::rayon(0),
        )
    });
    drop((xd, yd, cd));
    let r64 = 2.0 * (nd * p * p) as f64 / t_d / 1e9;
    // The oracle: the same accumulators with f64 GEMMs (one batch = the feature form).
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
    println!(
        "f32 GEMM, best: feature-major {best_gemm:.3} s = {r32:.1} GFLOP/s; row-major inputs as given {t_given:.3} s = {:.1} GFLOP/s",
        gflop / t_given
    );
    println!(
        "f32 SYRK XᵀX (lower, feature-major): {t_syrk:.3} s = {:.1} GFLOP/s (n·p(p+1) flops)",
        (n * p * (p + 1)) as f64 / t_syrk / 1e9
    );
    println!(
        "f64 GEMM (feature-major, [{p}×{nd}]·[{nd}×{p}]): {r64:.1} GFLOP/s = {:.1}% of the f32 rate",
        100.0 * r64 / r32
    );
    println!(
        "CKA feature form, Mixed, best: {best_cka:.3} s = {:.1} GFLOP/s executed (n(p+q)² = {flops:.0} GFLOP) = \
         {:.1}% of the best f32 GEMM rate; (3 full f32 GEMMs)/(CKA) time ratio {:.1}%",
        flops / best_cka,
        100.0 * (flops / best_cka) / r32,
        100.0 * 3.0 * best_gemm / best_cka
    );
    println!(
        "CKA feature form, F64 GEMMs: {t_f64:.3} s = {:.1} GFLOP/s = {:.1}% of the f32 rate",
        flops / t_f64,
        100.0 * (flops / t_f64) / r32
    );
    println!("StreamingCka, Mixed, one batch of {n} (debiased): {t_stream:.3} s");
    println!(
        "  CKA biased {:.12} (F64 {:.12}, rel. err {:.1e}); debiased {:.12} (F64 {:.12}, rel. err {:.1e})",
        biased_mixed,
        oracle.0,
        ((biased_mixed - oracle.0) / oracle.0).abs(),
        deb_mixed,
        oracle.1,
        ((deb_mixed - oracle.1) / oracle.1).abs()
    );

    // Gram form at n = gn: two lower-triangle Grams, n²(p+q) flops. The reference GEMM X·Yᵀ
    // takes the row-major inputs as they are (already the fast layout for this product).
    println!("--- Gram form ---");
    let (gx, gy) = (&x[..gn * p], &y[..gn * p]);
    let (gxr, gyr) = (Rows::f32(gx, gn, p).unwrap(), Rows::f32(gy, gn, p).unwrap());
    let gflop = 2.0 * (gn * gn * p) as f64 / 1e9;
    let gflops = (gn * gn * 2 * p) as f64 / 1e9;
    let gm = CkaOptions {
        form: Form::Gram,
        ..mixed
    };
    let ge = CkaOptions {
        form: Form::Gram,
        ..exact
    };
    let mut c = vec![0f32; gn * gn];
    let (mut bg, mut bc) = (f64::INFINITY, f64::INFINITY);
    let mut gv = 0.0;
    for rep in 0..2 {
        let t_g = f32_gemm(
            &mut c,
            gn,
            MatRef::from_row_major_slice(gx, gn, p),
            MatRef::from_row_major_slice(gy, gn, p).transpose(),
        );
        let (v, t_c) = secs(|| linear_cka_parts(gxr, gyr, false, &gm).unwrap().value());
        gv = v;
        println!(
            "rep {rep}: f32 GEMM {t_g:.3} s = {:.1} GFLOP/s; CKA Gram Mixed {t_c:.3} s = {:.1} GFLOP/s executed = {:.1}% of that GEMM rate",
            gflop / t_g,
            gflops / t_c,
            100.0 * (gflops / t_c) / (gflop / t_g)
        );
        bg = bg.min(t_g);
        bc = bc.min(t_c);
    }
    drop(c);
    let (gve, t_ge) = secs(|| linear_cka_parts(gxr, gyr, false, &ge).unwrap().value());
    let gd = linear_cka_parts(gxr, gyr, true, &gm).unwrap().value();
    let gde = linear_cka_parts(gxr, gyr, true, &ge).unwrap().value();
    println!(
        "CKA Gram form, best: Mixed {bc:.3} s = {:.1} GFLOP/s = {:.1}% of the best f32 GEMM rate ({:.1} GFLOP/s); F64 {t_ge:.3} s = {:.1}%",
        gflops / bc,
        100.0 * (gflops / bc) / (gflop / bg),
        gflop / bg,
        100.0 * (gflops / t_ge) / (gflop / bg)
    );
    println!(
        "  CKA biased {gv:.12} (F64 {gve:.12}, rel. err {:.1e}); debiased {gd:.12} (F64 {gde:.12}, rel. err {:.1e})",
        ((gv - gve) / gve).abs(),
        ((gd - gde) / gde).abs()
    );
}
