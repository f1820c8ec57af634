//! Throughput of randomized `spectral_stats` (default k = 8, p = 8, q = 1, 16 probes) on a random
//! f32 matrix (default 4096×11008, Llama-7B MLP), next to two baselines run in the same process:
//! faer's own threaded f32 GEMM on the same skinny product (A·X, X with k+1+p columns), and a
//! square 2048³ f32 GEMM (the machine's compute ceiling).
//!
//! `cargo run --release -p forgetscope-core --example spectral_speed -- [m] [n] [--threads T]
//!  [--reps R] [-q Q] [-p P] [-k K] [--probes H]`
//!
//! GFLOP/s counts only the large products over A ([`randomized_gemm_flops`]: 2·m·n per column per
//! pass); the small QR/SVD work is included in the time but not in the count. The bandwidth
//! column is the bytes of A streamed (4·m·n per pass, 2q+2 passes) per second.
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use forgetscope_core::metrics::spectral::{randomized_gemm_flops, spectral_stats, SpectralOptions};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let mut pos = args
        .iter()
        .enumerate()
        .filter(|(i, a)| a.parse::<usize>().is_ok() && (*i == 0 || !args[i - 1].starts_with('-')))
        .map(|(_, a)| a.parse::<usize>().unwrap());
    let m = pos.next().unwrap_or(4096);
    let n = pos.next().unwrap_or(11008);
    let threads = opt("--threads").unwrap_or(2);
    let reps = opt("--reps").unwrap_or(3).max(1);
    let par = if threads <= 1 {
        Par::Seq
    } else {
        Par::rayon(threads)
    };
    let d = SpectralOptions::default();
    let opts = SpectralOptions {
        k: opt("-k").unwrap_or(d.k),
        oversample: opt("-p").unwrap_or(d.oversample),
        power_iters: opt("-q").unwrap_or(d.power_iters),
        probes: opt("--probes").unwrap_or(d.probes),
        exact_max_dim: 0,
        par,
        ..d
    };
    // Uniform in [−0.5, 0.5) (xorshift64).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let a: Vec<f32> = (0..m * n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let fro2: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("thread pool");
    let flops = randomized_gemm_flops(m, n, &opts);
    let passes = 2 * opts.power_iters + 2;
    let l = (opts.k + 1 + opts.oversample).min(m.min(n));
    let am = MatRef::from_row_major_slice(&a, m, n);
    let x = Mat::<f32>::from_fn(n, l, |i, j| ((i * 7 + j * 13) % 17) as f32 - 8.0);
    let mut y = Mat::<f32>::zeros(m, l);
    let sq = 2048;
    let b = Mat::<f32>::from_fn(sq, sq, |i, j| ((i * 3 + j * 5) % 11) as f32 - 5.0);
    let mut c = Mat::<f32>::zeros(sq, sq);
    let (mut t_stats, mut t_skinny, mut t_square) = (f64::MAX, f64::MAX, f64::MAX);
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let out = pool.install(|| spectral_stats(&a, m, n, fro2, &opts).expect("spectral_stats"));
        t_stats = t_stats.min(t.elapsed().as_secs_f64());
        last = Some(out.0);
        let t = Instant::now();
        pool.install(|| matmul(y.as_mut(), Accum::Replace, am, x.as_ref(), 1.0f32, par));
        t_skinny = t_skinny.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        pool.install(|| {
            matmul(
                c.as_mut(),
                Accum::Replace,
                b.as_ref(),
                b.as_ref(),
                1.0f32,
                par,
            )
        });
        t_square = t_square.min(t.elapsed().as_secs_f64());
    }
    let st = last.expect("at least one rep");
    println!(
        "{m}x{n} f32, k={} p={} q={} probes={}, {threads} thread(s), best of {reps}",
        opts.k, opts.oversample, opts.power_iters, opts.probes
    );
    println!(
        "spectral_stats: {:.1} ms, {:.1} GFLOP/s ({:.2} GFLOP in {passes} passes over A), A streamed at {:.1} GB/s",
        t_stats * 1e3,
        flops / t_stats / 1e9,
        flops / 1e9,
        (passes * 4 * m * n) as f64 / t_stats / 1e9
    );
    println!(
        "  sigma1 {:.4}  stable rank {:.2}  PR {:.2} (rse {:.1e})",
        st.sigma1, st.stable_rank, st.participation_ratio, st.participation_ratio_rse
    );
    println!(
        "baseline faer threaded A·X ({m}x{n} · {n}x{l}): {:.1} GFLOP/s",
        2.0 * (m * n * l) as f64 / t_skinny / 1e9
    );
    println!(
        "ceiling  faer square GEMM {sq}^3: {:.1} GFLOP/s",
        2.0 * (sq as f64).powi(3) / t_square / 1e9
    );
}
