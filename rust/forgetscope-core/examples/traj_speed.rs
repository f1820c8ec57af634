//! Warm-cache throughput of the core trajectory pass on real files (no Python).
//! `cargo run --release -p forgetscope-core --example traj_speed -- BASE FT [THREADS]`
use forgetscope_core::{trajectory, Control, RunOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2);
    let opts = RunOptions {
        threads,
        ..Default::default()
    };
    for _ in 0..3 {
        let r = trajectory(&args[..2], &opts, &Control::new()).expect("trajectory");
        println!(
            "{:.3} s  {:.2} GB/s  ({} threads, chunk {} KiB)",
            r.stats.seconds,
            r.stats.bytes_read as f64 / r.stats.seconds / 1e9,
            r.stats.threads,
            r.stats.chunk_bytes >> 10
        );
    }
}
