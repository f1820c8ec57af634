//! Throughput of the decode + drift-accumulate path on in-memory bf16 data (no I/O).
//! `cargo run --release -p forgetscope-core --example kernel_speed`
use forgetscope_core::dtype::{decode_plain, Dtype};
use forgetscope_core::metrics::drift::DriftAcc;
use std::time::Instant;

fn main() {
    let n = 1 << 18; // 512 KiB per input: cache-resident, measures compute
    let reps = 128;
    let a: Vec<u8> = (0..n * 2).map(|i| (i * 31 % 251) as u8).collect();
    let b: Vec<u8> = (0..n * 2).map(|i| (i * 37 % 251) as u8).collect();
    let sub = 4096;
    let mut sa = vec![0f32; sub];
    let mut sb = vec![0f32; sub];
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            for i in (0..n).step_by(sub) {
                decode_plain(Dtype::BF16, &a[i * 2..(i + sub) * 2], &mut sa);
                decode_plain(Dtype::BF16, &b[i * 2..(i + sub) * 2], &mut sb);
            }
        }
        let dec = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut acc = DriftAcc::new(2);
        for _ in 0..reps {
            for i in (0..n).step_by(sub) {
                decode_plain(Dtype::BF16, &a[i * 2..(i + sub) * 2], &mut sa);
                decode_plain(Dtype::BF16, &b[i * 2..(i + sub) * 2], &mut sb);
                acc.update(&[&sa, &sb]);
            }
        }
        let all = t.elapsed().as_secs_f64();
        let bytes = (n * 4 * reps) as f64;
        let t = Instant::now();
        let mut fused = DriftAcc::new(2);
        for _ in 0..reps {
            for i in (0..n).step_by(sub) {
                fused.update_bf16_pair(&a[i * 2..(i + sub) * 2], &b[i * 2..(i + sub) * 2]);
            }
        }
        let fz = t.elapsed().as_secs_f64();
        println!("fused bf16 pair {:.2} GB/s", bytes / fz / 1e9);
        println!(
            "decode only {:.2} GB/s; decode+update {:.2} GB/s (checkpoint bytes, 1 thread) {:?}",
            bytes / dec / 1e9,
            bytes / all / 1e9,
            acc.numel()
        );
    }
}
