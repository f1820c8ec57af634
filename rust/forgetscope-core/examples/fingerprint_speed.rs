//! Warm-cache throughput of the fingerprint pass (sketches only, no subspaces) on a real file.
//! `cargo run --release -p forgetscope-core --example fingerprint_speed -- CKPT [THREADS] [R...]`
use forgetscope_core::stream::fingerprint::{fingerprint, FingerprintOptions};
use forgetscope_core::{Control, RunOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--kernels") {
        return kernels();
    }
    let path = std::path::PathBuf::from(&args[0]);
    let threads = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    let dims: Vec<usize> = if args.len() > 2 {
        args[2..].iter().filter_map(|a| a.parse().ok()).collect()
    } else {
        vec![64]
    };
    let bytes: u64 = forgetscope_core::inspect(&path, &Default::default())
        .expect("open")
        .tensors
        .iter()
        .map(|t| t.data.len)
        .sum();
    for r in dims {
        let opts = FingerprintOptions {
            run: RunOptions {
                threads,
                ..Default::default()
            },
            sketch_dim: r,
            subspaces: false,
            ..Default::default()
        };
        for _ in 0..3 {
            let fp = fingerprint(&path, &opts, &Control::new()).expect("fingerprint");
            println!(
                "r = {r:4}: {:.3} s  {:.3} GB/s  ({threads} thread(s), {:.1} M elements/s)",
                fp.seconds,
                bytes as f64 / fp.seconds / 1e9,
                fp.tensors
                    .iter()
                    .map(|t| t.shape.iter().product::<u64>())
                    .sum::<u64>() as f64
                    / fp.seconds
                    / 1e6
            );
        }
    }
}

/// Kernel-only rates (no I/O): sketch update and content hash on an L1-resident block.
#[allow(dead_code)]
pub fn kernels() {
    use forgetscope_core::metrics::sketch::{hash_and_sq, sketch_update, SignKeys};
    let x: Vec<f32> = (0..4096).map(|i| (i as f32).sin()).collect();
    for r in [16usize, 64, 256] {
        let keys = SignKeys::new(0, "t", r).unwrap();
        let mut acc = vec![0f64; r];
        let t = std::time::Instant::now();
        let reps = 2000;
        for k in 0..reps {
            sketch_update(&mut acc, &keys, k * 4096, &x);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "sketch_update r={r}: {:.1} M elements/s",
            (reps * 4096) as f64 / s / 1e6
        );
    }
    let keys = SignKeys::new(0, "t", 64).unwrap();
    let t = std::time::Instant::now();
    let mut h = 0u64;
    for k in 0..2000u64 {
        h = h.wrapping_add(hash_and_sq(&keys, k * 4096, &x).0);
    }
    println!(
        "hash_and_sq: {:.1} M elements/s ({h})",
        2000.0 * 4096.0 / t.elapsed().as_secs_f64() / 1e6
    );
}
