//! Warm-cache throughput of the fingerprint pass (sketches only, no subspaces) on a real file.
//! `cargo run --release -p forgetscope-core --example fingerprint_speed -- CKPT [THREADS] [R...]`
use forgetscope_core::stream::fingerprint::{fingerprint, FingerprintOptions};
use forgetscope_core::{Control, RunOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
