//! Wall time of `head_drift` on one random attention layer (default Llama-3-8B: hidden 4096,
//! 32 query heads, 8 kv heads, d_h 128), and of `mla_head_drift` with `--mla` (DeepSeek-V3:
//! 128 heads, nope 128, rope 64, v 128, q_lora 1536, kv_lora 512, hidden 7168).
//!
//! `cargo run --release -p forgetscope-core --example heads_speed -- [hidden] [H] [H_kv] [d_h]
//!  [--mla] [--threads T] [--reps R]`
//!
//! Reports the best of R runs (the machine is shared), the process CPU time of that run (user +
//! system, all threads: on a busy machine wall time / CPU time shows the contention), and the
//! Gram rate: each side of r rows over
//! n columns is one 2r×2r lower-triangular Gram, counted as 4r²n flops.
use forgetscope_core::metrics::heads::{
    head_drift, mla_head_drift, AttnWeights, HeadGeometry, MlaGeometry, MlaWeights,
};
use std::time::Instant;

/// User + system CPU seconds of this process so far (all threads).
fn cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn rand_vec(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn perturb(w: &[f32], seed: u64) -> Vec<f32> {
    let n = rand_vec(w.len(), seed, 1e-3);
    w.iter().zip(&n).map(|(a, b)| a + b).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let mut pos = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            a.parse::<usize>().is_ok()
                && (*i == 0 || !matches!(args[i - 1].as_str(), "--threads" | "--reps"))
        })
        .map(|(_, a)| a.parse::<usize>().unwrap());
    let mla = args.iter().any(|a| a == "--mla");
    let threads = value("--threads").unwrap_or(0);
    let reps = value("--reps").unwrap_or(3);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut best = f64::INFINITY;
    let mut best_cpu = f64::INFINITY;
    let flops;
    if mla {
        let g = MlaGeometry {
            n_heads: pos.next().unwrap_or(128),
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            q_in: 1536,
            kv_lora_rank: 512,
            hidden: 7168,
        };
        let h = g.n_heads;
        let q = rand_vec(h * 192 * g.q_in, 1, 0.02);
        let kvb = rand_vec(h * 256 * g.kv_lora_rank, 2, 0.02);
        let o = rand_vec(g.hidden * h * 128, 3, 0.02);
        let (q1, kvb1, o1) = (perturb(&q, 4), perturb(&kvb, 5), perturb(&o, 6));
        let b = MlaWeights {
            q: &q,
            kv_b: &kvb,
            o: &o,
        };
        let c = MlaWeights {
            q: &q1,
            kv_b: &kvb1,
            o: &o1,
        };
        let r2 = 128.0 * 128.0;
        flops = h as f64 * 4.0 * r2 * (g.q_in + 2 * g.kv_lora_rank + g.hidden) as f64;
        for _ in 0..reps {
            let (t, c0) = (Instant::now(), cpu_s());
            let out = pool.install(|| mla_head_drift(&b, &c, &g)).unwrap();
            let wall = t.elapsed().as_secs_f64();
            if wall < best {
                (best, best_cpu) = (wall, cpu_s() - c0);
            }
            std::hint::black_box(out);
        }
        println!("mla_head_drift {g:?}");
    } else {
        let g = HeadGeometry {
            hidden: pos.next().unwrap_or(4096),
            n_heads: pos.next().unwrap_or(32),
            n_kv_heads: pos.next().unwrap_or(8),
            head_dim: pos.next().unwrap_or(128),
        };
        let (h, hkv, d, n) = (g.n_heads, g.n_kv_heads, g.head_dim, g.hidden);
        let q = rand_vec(h * d * n, 1, 0.02);
        let k = rand_vec(hkv * d * n, 2, 0.02);
        let v = rand_vec(hkv * d * n, 3, 0.02);
        let o = rand_vec(n * h * d, 4, 0.02);
        let (q1, k1, v1, o1) = (
            perturb(&q, 5),
            perturb(&k, 6),
            perturb(&v, 7),
            perturb(&o, 8),
        );
        let b = AttnWeights {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            q_bias: None,
            k_bias: None,
            v_bias: None,
        };
        let c = AttnWeights {
            q: &q1,
            k: &k1,
            v: &v1,
            o: &o1,
            ..b
        };
        flops = 2.0 * (h + hkv) as f64 * 4.0 * (d * d) as f64 * n as f64;
        for _ in 0..reps {
            let (t, c0) = (Instant::now(), cpu_s());
            let out = pool.install(|| head_drift(&b, &c, &g)).unwrap();
            let wall = t.elapsed().as_secs_f64();
            if wall < best {
                (best, best_cpu) = (wall, cpu_s() - c0);
            }
            std::hint::black_box(out);
        }
        println!("head_drift {g:?}");
    }
    println!(
        "threads {}  best of {reps}: {:.3} s wall, {:.3} s CPU  Gram {:.1} GFLOP/s ({:.1} GFLOP)",
        pool.current_num_threads(),
        best,
        best_cpu,
        flops / best / 1e9,
        flops / 1e9
    );
}
