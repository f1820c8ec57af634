//! Throughput of `hyperspherical_energy` on a random f32 matrix (default 14336×4096, Llama-3-8B
//! gate/up), next to faer's plain f32 GEMM rate for the same Gram (W·Wᵀ, full N×N) in the same run.
//!
//! `cargo run --release -p forgetscope-core --example he_speed -- [N] [d] [--cols] [--half]
//!  [--block B] [--threads T] [--reps R] [--no-gemm] [--pd]`
//!
//! The machine is shared: `--reps R` alternates HE and a per-core GEMM baseline R times and
//! reports the best of each, so that both see similar contention.
//!
//! `--pd` times `principal_directions` (β = 0.5) instead of HE.
//!
//! HE flops are counted as N²d (the N²d/2 multiply-adds of the upper triangle); the GEMM does 2N²d.
//! Peak extra memory = peak RSS during the call (reset through /proc/self/clear_refs) minus the RSS
//! before it, i.e. everything the call allocated including faer's packing buffers.
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use forgetscope_core::metrics::he::{
    hyperspherical_energy, principal_directions, HeOptions, NeuronAxis,
};
use std::time::Instant;

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Positional numbers are N and d; a number right after --block/--threads is that option's.
    let mut pos = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            a.parse::<usize>().is_ok()
                && (*i == 0 || !matches!(args[i - 1].as_str(), "--block" | "--threads" | "--reps"))
        })
        .map(|(_, a)| a);
    let n: usize = pos.next().map(|s| s.parse().unwrap()).unwrap_or(14336);
    let d: usize = pos.next().map(|s| s.parse().unwrap()).unwrap_or(4096);
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let cols = flag("--cols");
    let opts = HeOptions {
        axis: if cols {
            NeuronAxis::Cols
        } else {
            NeuronAxis::Rows
        },
        half_space: flag("--half"),
        block_size: value("--block").unwrap_or(0),
        threads: value("--threads").unwrap_or(0),
        ..HeOptions::default()
    };
    // Uniform in [−1, 1) (xorshift); rows × cols is [N, d], or [d, N] with --cols.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..n * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let (rows, ncols) = if cols { (d, n) } else { (n, d) };
    let threads = rayon::current_num_threads();
    println!(
        "N = {n}, d = {d}, axis = {:?}, half_space = {}, threads = {}",
        opts.axis,
        opts.half_space,
        if opts.threads == 0 {
            threads
        } else {
            opts.threads
        }
    );

    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the peak-RSS counter
    let rss0 = status_kib("VmRSS:").unwrap_or(0);
    if flag("--pd") {
        let t = Instant::now();
        let p = principal_directions(&data, rows, ncols, opts.axis, 0.5, opts.threads)
            .expect("principal_directions");
        let peak = status_kib("VmHWM:").unwrap_or(0);
        println!(
            "principal directions ({:?} route): {:.3} s, rank {} of {}, λ_max {:.3e}, peak extra \
             memory {:.1} MiB",
            p.route,
            t.elapsed().as_secs_f64(),
            p.rank,
            p.eigenvalues.len(),
            p.eigenvalues[0],
            peak.saturating_sub(rss0) as f64 / 1024.0
        );
        return;
    }
    let no_gemm = flag("--no-gemm");
    let reps = value("--reps").unwrap_or(1).max(1);
    let w = if cols {
        MatRef::from_row_major_slice(&data, rows, ncols).transpose()
    } else {
        MatRef::from_row_major_slice(&data, rows, ncols)
    };
    let flops = 2.0 * (n as f64).powi(2) * d as f64;
    let mut g: Vec<f32> = Vec::new();
    let (mut he_secs, mut rate_c) = (f64::INFINITY, 0f64);
    for rep in 0..reps {
        let t = Instant::now();
        let r = hyperspherical_energy(&data, rows, ncols, &opts).expect("hyperspherical_energy");
        let secs = t.elapsed().as_secs_f64();
        he_secs = he_secs.min(secs);
        if rep == 0 {
            let peak = status_kib("VmHWM:").unwrap_or(0);
            println!(
                "HE: block {}; energy {:?}, frame potential {:.6}, min d² {:.4}, near-dups {}",
                r.block_size, r.energy, r.frame_potential, r.min_d2, r.n_near_dup
            );
            println!(
                "peak extra memory {:.1} MiB (RSS {:.1} -> peak {:.1} MiB); scratch reported by \
                 the call {:.1} MiB",
                peak.saturating_sub(rss0) as f64 / 1024.0,
                rss0 as f64 / 1024.0,
                peak as f64 / 1024.0,
                r.scratch_bytes as f64 / (1 << 20) as f64
            );
        }
        println!(
            "  rep {rep}: HE {secs:.3} s, {:.1} GFLOP/s",
            (n as f64).powi(2) * d as f64 / secs / 1e9
        );
        if no_gemm {
            continue;
        }
        if g.is_empty() {
            g = vec![1f32; n * n];
        }
        // (c) 1024-column strips spread over the threads, each a single-threaded GEMM: what
        // faer's kernels reach when every core runs its own product (its internal threading
        // scales less on this machine).
        let t = Instant::now();
        {
            use rayon::prelude::*;
            g.par_chunks_mut(n * 1024)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let width = chunk.len() / n;
                    matmul(
                        MatMut::from_column_major_slice_mut(chunk, n, width),
                        Accum::Replace,
                        w,
                        w.subrows(c * 1024, width).transpose(),
                        1.0f32,
                        Par::Seq,
                    );
                });
        }
        let rc = flops / t.elapsed().as_secs_f64() / 1e9;
        println!("  rep {rep}: GEMM, per-core 1024-column strips, {rc:.1} GFLOP/s");
        rate_c = rate_c.max(rc);
    }
    let he_rate = (n as f64).powi(2) * d as f64 / he_secs / 1e9;
    println!("HE best of {reps}: {he_secs:.3} s, {he_rate:.1} GFLOP/s (N²d counted)");
    if no_gemm {
        return;
    }

    // (a) one call with the full N×N output; (b) the same product as 4096-column strips, one
    // call each (smaller output per call); faer's own threading.
    let t = Instant::now();
    matmul(
        MatMut::from_column_major_slice_mut(&mut g, n, n),
        Accum::Replace,
        w,
        w.transpose(),
        1.0f32,
        Par::rayon(0),
    );
    let rate_a = flops / t.elapsed().as_secs_f64() / 1e9;
    let strip = 4096.min(n);
    let t = Instant::now();
    for (c, chunk) in g.chunks_mut(n * strip).enumerate() {
        let width = chunk.len() / n;
        matmul(
            MatMut::from_column_major_slice_mut(chunk, n, width),
            Accum::Replace,
            w,
            w.subrows(c * strip, width).transpose(),
            1.0f32,
            Par::rayon(0),
        );
    }
    let rate_b = flops / t.elapsed().as_secs_f64() / 1e9;
    let best = rate_a.max(rate_b).max(rate_c);
    println!(
        "faer f32 GEMM W·Wᵀ ({n}×{d} · {d}×{n}, 2N²d flops), {threads} threads: one call \
         {rate_a:.1}, {strip}-column strips {rate_b:.1}, per-core 1024-column strips (best of \
         {reps}) {rate_c:.1} GFLOP/s; HE / best GEMM = {:.1}%",
        100.0 * he_rate / best
    );
    std::hint::black_box(&g);
}
