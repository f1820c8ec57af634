//! Fuzz dtype decoding and the metric kernels over every supported dtype. Each input builds a valid
//! base/fine-tuned pair of one tensor (plain F64/F32/F16/BF16, FP8 E4M3/E5M2 with per-tensor, per-row
//! or block scales in F32/BF16, or MXFP4 blocks + E8M0 scales) from fuzzed bytes, then checks:
//! - `read_tensor` equals a decoder written here from the format definitions, bit for bit;
//! - the streamed trajectory (4–8 KiB chunks, so tensors cross chunk edges) equals float64 sums over
//!   those values;
//! - the SIMD kernels (`pair_stats`, `pair_stats_bf16`, `diff_sq`, `step_dot`, `DriftAcc`) equal
//!   their scalar lane-order definitions bit for bit, including NaN/Inf inputs.
#![no_main]

use arbitrary::Arbitrary;
use forgetscope_core::metrics::drift::DriftAcc;
use forgetscope_core::metrics::kernels::{diff_sq, pair_stats, pair_stats_bf16, step_dot};
use forgetscope_core::stream::{read_tensor, trajectory, Control, RunOptions};
use forgetscope_core::OpenOptions;
use forgetscope_fuzz::{safetensors_bytes, scratch, Entry};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    rows: u8,
    cols: u8,
    scale: u8,
    chunk: u16,
    a: Vec<u8>,
    b: Vec<u8>,
    c: Vec<u8>,
}

/// Independent decoders (from the format definitions, not the core's tables).
fn half_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn fp8(code: u8, e_bits: u32, m_bits: u32, finite_only: bool) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f64 } else { 1.0 };
    let e = ((code as u32) >> m_bits) & ((1 << e_bits) - 1);
    let m = (code as u32) & ((1 << m_bits) - 1);
    let bias = (1i32 << (e_bits - 1)) - 1;
    let emax = (1u32 << e_bits) - 1;
    if finite_only {
        if e == emax && m == (1 << m_bits) - 1 {
            return f32::NAN;
        }
    } else if e == emax {
        return if m == 0 {
            (sign * f64::INFINITY) as f32
        } else {
            f32::NAN
        };
    }
    let v = if e == 0 {
        (m as f64) / (1u64 << m_bits) as f64 * 2f64.powi(1 - bias)
    } else {
        (1.0 + (m as f64) / (1u64 << m_bits) as f64) * 2f64.powi(e as i32 - bias)
    };
    (sign * v) as f32
}

fn e2m1(nibble: u8) -> f32 {
    const MAG: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let v = MAG[(nibble & 7) as usize];
    if nibble & 8 != 0 {
        -v
    } else {
        v
    }
}

fn e8m0(s: u8) -> f32 {
    if s == 255 {
        f32::NAN
    } else {
        2f64.powi(s as i32 - 127) as f32
    }
}

fn bytes_of(src: &[u8], n: usize) -> Vec<u8> {
    if src.is_empty() {
        return vec![0; n];
    }
    src.iter().cycle().take(n).copied().collect()
}

fn same(x: f32, y: f32) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

fn same64(x: f64, y: f64) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

/// One checkpoint's stored tensors and the values they must decode to.
struct Built {
    entries: Vec<(String, &'static str, Vec<u64>, Vec<u8>)>,
    values: Vec<f32>,
}

fn build(kind: u8, rows: u64, cols: u64, scale_kind: u8, raw: &[u8], scale_raw: &[u8]) -> Built {
    let n = (rows * cols) as usize;
    let name = "layers.0.w".to_string();
    match kind % 7 {
        0 => {
            let d = bytes_of(raw, 8 * n);
            let values = d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect();
            Built {
                entries: vec![(name, "F64", vec![rows, cols], d)],
                values,
            }
        }
        1 => {
            let d = bytes_of(raw, 4 * n);
            let values = d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Built {
                entries: vec![(name, "F32", vec![rows, cols], d)],
                values,
            }
        }
        2 | 3 => {
            let d = bytes_of(raw, 2 * n);
            let bf = kind % 7 == 3;
            let values = d
                .chunks_exact(2)
                .map(|c| {
                    let bits = u16::from_le_bytes([c[0], c[1]]);
                    if bf {
                        f32::from_bits((bits as u32) << 16)
                    } else {
                        half_to_f32(bits)
                    }
                })
                .collect();
            let dt = if bf { "BF16" } else { "F16" };
            Built {
                entries: vec![(name, dt, vec![rows, cols], d)],
                values,
            }
        }
        4 | 5 => {
            let e4m3 = kind % 7 == 4;
            let d = bytes_of(raw, n);
            let codes: Vec<f32> = d
                .iter()
                .map(|&c| {
                    if e4m3 {
                        fp8(c, 4, 3, true)
                    } else {
                        fp8(c, 5, 2, false)
                    }
                })
                .collect();
            // Scale layout: per tensor, per row ([rows] or [rows, 1]), or square power-of-two
            // blocks; stored as F32 or BF16.
            let layout = scale_kind % 4;
            let block = 1u64 << (1 + (scale_kind as u64 / 8) % 3); // 2, 4 or 8
            let (sshape, index): (Vec<u64>, Box<dyn Fn(u64, u64) -> usize>) = match layout {
                0 => (vec![], Box::new(|_, _| 0)),
                1 if rows > 1 => (vec![rows], Box::new(|r, _| r as usize)),
                2 if rows > 1 => (vec![rows, 1], Box::new(|r, _| r as usize)),
                _ => {
                    let (sr, sc) = (rows.div_ceil(block), cols.div_ceil(block));
                    // The core infers the tile from the shapes: the largest power of two that
                    // tiles both (128 first); only keep inputs where that is `block`.
                    let fits = |b: u64| rows.div_ceil(b) == sr && cols.div_ceil(b) == sc;
                    let inferred = if fits(128) {
                        128
                    } else {
                        (0..63).rev().map(|k| 1u64 << k).find(|&b| fits(b)).unwrap()
                    };
                    if sr * sc == 1 {
                        (vec![1, 1], Box::new(|_, _| 0))
                    } else {
                        let b = inferred;
                        (
                            vec![sr, sc],
                            Box::new(move |r, c| ((r / b) * sc + c / b) as usize),
                        )
                    }
                }
            };
            let sn = sshape.iter().product::<u64>().max(1) as usize;
            let bf_scale = scale_kind & 4 != 0;
            let (sdt, sbytes, svals): (&str, Vec<u8>, Vec<f32>) = if bf_scale {
                let b = bytes_of(scale_raw, 2 * sn);
                let v = b
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect();
                ("BF16", b, v)
            } else {
                let b = bytes_of(scale_raw, 4 * sn);
                let v = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                ("F32", b, v)
            };
            let mut values = Vec::with_capacity(n);
            for r in 0..rows {
                for c in 0..cols {
                    values.push(codes[(r * cols + c) as usize] * svals[index(r, c)]);
                }
            }
            let dt = if e4m3 { "F8_E4M3" } else { "F8_E5M2" };
            let suffix = if scale_kind & 1 != 0 {
                "_scale_inv"
            } else {
                "_scale"
            };
            Built {
                entries: vec![
                    (name.clone(), dt, vec![rows, cols], d),
                    (format!("{name}{suffix}"), sdt, sshape, sbytes),
                ],
                values,
            }
        }
        _ => {
            // MXFP4: G groups of 32 per row; blocks [rows, G, 16], scales [rows, G].
            let g = 1 + cols % 3;
            let blocks = bytes_of(raw, (rows * g * 16) as usize);
            let scales = bytes_of(scale_raw, (rows * g) as usize);
            let mut values = Vec::new();
            for (i, &byte) in blocks.iter().enumerate() {
                let s = e8m0(scales[i / 16]);
                values.push(e2m1(byte & 0x0f) * s);
                values.push(e2m1(byte >> 4) * s);
            }
            Built {
                entries: vec![
                    ("layers.0.w_blocks".into(), "U8", vec![rows, g, 16], blocks),
                    ("layers.0.w_scales".into(), "U8", vec![rows, g], scales),
                ],
                values,
            }
        }
    }
}

fn write(path: &std::path::Path, b: &Built) {
    let entries: Vec<Entry<'_>> = b
        .entries
        .iter()
        .map(|(n, d, s, bytes)| Entry {
            name: n,
            dtype: d,
            shape: s.clone(),
            data: bytes.clone(),
        })
        .collect();
    std::fs::write(path, safetensors_bytes(&entries)).expect("write");
}

/// Scalar lane-order definition of `pair_stats` (8 f64 lanes, fused multiply-add, pairwise combine).
fn pair_ref(a: &[f32], b: &[f32]) -> (f64, f64, f64, u64) {
    let (mut sa, mut sb, mut sd, mut eq) = ([0f64; 8], [0f64; 8], [0f64; 8], 0u64);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let j = i % 8;
        let (xf, yf) = (x as f64, y as f64);
        let d = yf - xf;
        sa[j] = xf.mul_add(xf, sa[j]);
        sb[j] = yf.mul_add(yf, sb[j]);
        sd[j] = d.mul_add(d, sd[j]);
        eq += (x == y) as u64;
    }
    let c = |v: [f64; 8]| ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    (c(sa), c(sb), c(sd), eq)
}

fn step_dot_ref(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    for (i, ((&x, &y), &z)) in a.iter().zip(b).zip(c).enumerate() {
        let (x, y, z) = (x as f64, y as f64, z as f64);
        acc[i % 8] += (y - x) * (z - y);
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

fn check_kernels(a: &[f32], b: &[f32], c: &[f32]) {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let got = pair_stats(a, b);
    let want = pair_ref(a, b);
    assert!(same64(got.sq_a, want.0), "sq_a {} vs {}", got.sq_a, want.0);
    assert!(same64(got.sq_b, want.1), "sq_b {} vs {}", got.sq_b, want.1);
    assert!(
        same64(got.diff_sq, want.2),
        "diff_sq {} vs {}",
        got.diff_sq,
        want.2
    );
    assert_eq!(got.equal, want.3);
    assert!(same64(diff_sq(a, b), want.2));
    assert!(same64(step_dot(a, b, c), step_dot_ref(a, b, c)));
    // bf16 straight from bytes must equal decoding first.
    let to_bf = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    };
    let (ab, bb) = (to_bf(a), to_bf(b));
    let dec = |v: &[u8]| -> Vec<f32> {
        v.chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect()
    };
    let (ad, bd) = (dec(&ab), dec(&bb));
    let g1 = pair_stats_bf16(&ab, &bb);
    let g2 = pair_stats(&ad, &bd);
    assert!(same64(g1.sq_a, g2.sq_a) && same64(g1.sq_b, g2.sq_b) && same64(g1.diff_sq, g2.diff_sq));
    assert_eq!(g1.equal, g2.equal);
    let mut d1 = DriftAcc::new(2);
    d1.update_bf16_pair(&ab, &bb);
    let mut d2 = DriftAcc::new(2);
    d2.update(&[&ad, &bd]);
    let (f1, f2) = (d1.finish(), d2.finish());
    for (x, y) in f1.iter().zip(&f2) {
        assert!(same64(x.fro_delta, y.fro_delta) && same64(x.norm, y.norm));
        assert_eq!((x.n_nan, x.n_inf), (y.n_nan, y.n_inf));
    }
}

fn close(got: f64, want: f64) -> bool {
    if !want.is_finite() {
        return true; // overflowing sums are reported as such; covered by the NaN/Inf counts
    }
    (got - want).abs() <= 1e-12 * want.abs().max(f64::MIN_POSITIVE) + 1e-300
}

fuzz_target!(|inp: Input| {
    let rows = 1 + (inp.rows % 40) as u64;
    let cols = 1 + (inp.cols % 100) as u64;
    let base = build(inp.kind, rows, cols, inp.scale, &inp.a, &inp.c);
    let ft = build(inp.kind, rows, cols, inp.scale, &inp.b, &inp.c);
    check_kernels(
        &base.values,
        &ft.values,
        &build(inp.kind, rows, cols, inp.scale, &inp.c, &inp.a).values,
    );

    let dir = scratch();
    let (pa, pb) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    write(&pa, &base);
    write(&pb, &ft);
    let opts = OpenOptions::default();
    let (shape, got) = read_tensor(&pa, "layers.0.w", &opts, 1 << 24)
        .unwrap_or_else(|e| panic!("valid file refused: {e}"));
    assert_eq!(got.len(), base.values.len(), "shape {shape:?}");
    for (i, (&g, &w)) in got.iter().zip(&base.values).enumerate() {
        assert!(
            same(g, w),
            "element {i}: read {g} ({:#x}), expected {w} ({:#x})",
            g.to_bits(),
            w.to_bits()
        );
    }
    let run = RunOptions {
        threads: 1 + (inp.chunk % 2) as usize,
        memory_budget: 16 << 20,
        open: opts,
        // The smallest chunk the core allows, and up to twice that: tensors cross chunk edges.
        chunk_bytes: Some(4096 + (inp.chunk as u64 % 4096)),
    };
    let rep = trajectory(&[&pa, &pb], &run, &Control::new())
        .unwrap_or_else(|e| panic!("valid pair refused: {e}"));
    let t = &rep.tensors[0];
    let (mut s0, mut s1, mut sd) = (0f64, 0f64, 0f64);
    for (&x, &y) in base.values.iter().zip(&ft.values) {
        s0 += x as f64 * x as f64;
        s1 += y as f64 * y as f64;
        sd += (y as f64 - x as f64) * (y as f64 - x as f64);
    }
    let nonfinite = base.values.iter().chain(&ft.values).any(|v| !v.is_finite());
    let s = &t.steps[0];
    if nonfinite {
        assert!(
            s.fro_delta.is_nan() || !s.fro_delta.is_finite(),
            "non-finite input, finite drift"
        );
    } else {
        assert!(
            close(s.norm * s.norm, s1),
            "norm² {} vs {}",
            s.norm * s.norm,
            s1
        );
        assert!(
            close(s.fro_delta * s.fro_delta, sd),
            "Δ² {} vs {}",
            s.fro_delta * s.fro_delta,
            sd
        );
        assert!(close(t.base.norm * t.base.norm, s0));
    }
});
