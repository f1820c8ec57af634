//! Integration tests of the streaming trajectory on synthetic checkpoints.

mod common;

use common::{bf16_bytes, f32_bytes, values, write, write_sharded, T};
use forgetscope_core::{trajectory, Control, Error, RunOptions};

fn model(seed: u64, scale: f32) -> Vec<T> {
    let base = |s: u64, n: usize| values(s, n);
    let mut out = Vec::new();
    for (i, (name, n)) in [
        ("model.embed_tokens.weight", 307_200usize),
        ("model.layers.0.self_attn.q_proj.weight", 4096),
        ("model.layers.0.mlp.down_proj.weight", 65_536),
        ("model.norm.weight", 64),
    ]
    .iter()
    .enumerate()
    {
        let w0 = base(100 + i as u64, *n);
        let d = base(seed * 1000 + i as u64, *n);
        let w: Vec<f32> = w0.iter().zip(&d).map(|(a, b)| a + scale * b).collect();
        out.push((
            name.to_string(),
            "BF16",
            vec![*n as u64 / 64, 64],
            bf16_bytes(&w),
        ));
    }
    out
}

fn bits(r: &forgetscope_core::results::TrajectoryReport) -> Vec<u64> {
    r.tensors
        .iter()
        .flat_map(|t| {
            t.steps.iter().flat_map(|s| {
                [
                    s.fro_delta.to_bits(),
                    s.one_minus_cos.to_bits(),
                    s.step_drift.to_bits(),
                    s.frac_unchanged.to_bits(),
                ]
            })
        })
        .collect()
}

#[test]
fn sharded_equals_single_and_threads_equal_serial() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts: Vec<Vec<T>> = vec![model(0, 0.0), model(1, 0.01), model(2, 0.02)];
    let mut single = Vec::new();
    let mut sharded = Vec::new();
    for (i, c) in ckpts.iter().enumerate() {
        let f = dir.path().join(format!("c{i}.safetensors"));
        write(&f, c);
        single.push(f);
        let d = dir.path().join(format!("s{i}"));
        write_sharded(&d, c, 3);
        sharded.push(d);
    }
    let serial = RunOptions {
        threads: 1,
        ..Default::default()
    };
    let par = RunOptions {
        threads: 2,
        ..Default::default()
    };
    let a = trajectory(&single, &serial, &Control::new()).unwrap();
    let b = trajectory(&sharded, &par, &Control::new()).unwrap();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(a.tensors.len(), 4);
    assert_eq!(b.checkpoints[0].n_files, 2);
    // chunked (16 KiB chunks) agrees with whole tensors (64 MiB chunks) to f64 rounding
    let whole = RunOptions {
        threads: 2,
        chunk_bytes: Some(64 << 20),
        ..Default::default()
    };
    let a = trajectory(&single, &whole, &Control::new()).unwrap();
    let small = RunOptions {
        threads: 2,
        chunk_bytes: Some(16 << 10),
        ..Default::default()
    };
    let c = trajectory(&single, &small, &Control::new()).unwrap();
    for (x, y) in a.tensors.iter().zip(&c.tensors) {
        for (s, t) in x.steps.iter().zip(&y.steps) {
            assert!((s.fro_delta - t.fro_delta).abs() <= 1e-12 * s.fro_delta.max(1e-300));
        }
    }
    // the untouched base-equal checkpoint 0 → base: nothing moved in norm weight? (scale applies to all)
    assert!(a.tensors.iter().all(|t| t.steps[0].fro_delta > 0.0));
}

#[test]
fn f64_oracle_on_f32_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let a = values(7, 1000);
    let b: Vec<f32> = a
        .iter()
        .zip(values(8, 1000))
        .map(|(x, y)| x + 1e-3 * y)
        .collect();
    write(
        &dir.path().join("a.safetensors"),
        &[("w".into(), "F32", vec![1000], f32_bytes(&a))],
    );
    write(
        &dir.path().join("b.safetensors"),
        &[("w".into(), "F32", vec![1000], f32_bytes(&b))],
    );
    let r = trajectory(
        &[
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        ],
        &RunOptions::default(),
        &Control::new(),
    )
    .unwrap();
    let s = r.tensors[0].steps[0];
    let d: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*y as f64 - *x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n0: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let n1: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    assert!((s.fro_delta - d).abs() <= 1e-13 * d);
    assert!((s.rel_delta - d / n0).abs() <= 1e-13 * d / n0);
    // Stable oracle: 1 - cos = ||a/|a| - b/|b|||^2 / 2 (no cancellation against 1).
    let omc: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 / n0 - *y as f64 / n1).powi(2))
        .sum::<f64>()
        / 2.0;
    assert!(
        (s.one_minus_cos - omc).abs() <= 1e-9 * omc,
        "{} vs {}",
        s.one_minus_cos,
        omc
    );
}

#[test]
fn truncated_while_reading_is_an_error_not_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    let t = model(0, 0.0);
    write(&a, &t);
    write(&b, &model(1, 0.1));
    // Validate, then shrink the file before the data is read: open_checkpoint captured the size.
    let ck = forgetscope_core::open_checkpoint(&b, &Default::default()).unwrap();
    let len = std::fs::metadata(&b).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    drop(ck);
    let e = forgetscope_core::read_tensor(
        &b,
        "model.embed_tokens.weight",
        &Default::default(),
        1 << 30,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Tensor { .. } | Error::Header { .. }),
        "{e}"
    );
    // And through the streaming path: truncate between planning and reading with a control hook is
    // not possible from outside, so check the reader's identity check directly.
    let control = Control::new();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(len)
        .unwrap();
    let r = trajectory(&[&a, &b], &RunOptions::default(), &control);
    assert!(
        r.is_ok(),
        "zero-filled tail is valid bytes again: {:?}",
        r.err()
    );
}

#[test]
fn reopen_detects_replaced_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("b.safetensors");
    write(&b, &model(1, 0.1));
    let (_, id) = forgetscope_core::source::file::open_regular(&b).unwrap();
    let len = std::fs::metadata(&b).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = forgetscope_core::source::file::reopen_same(&b, id).unwrap_err();
    assert!(matches!(e, Error::Changed { .. }), "{e}");
    assert!(e.to_string().contains("b.safetensors"));
}

#[test]
fn short_read_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bin");
    std::fs::write(&p, vec![1u8; 100]).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 200];
    let e = forgetscope_core::source::file::read_exact_at(&f, &p, &mut buf, 0).unwrap_err();
    assert!(matches!(e, Error::Changed { .. }));
}

#[test]
fn cancel_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write(&a, &model(0, 0.0));
    write(&b, &model(1, 0.1));
    let control = Control::new();
    control.cancel();
    assert!(matches!(
        trajectory(&[&a, &b], &RunOptions::default(), &control),
        Err(Error::Cancelled)
    ));
}

#[test]
fn mismatches_are_reported_not_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write(
        &a,
        &[
            ("x".into(), "F32", vec![2, 3], f32_bytes(&[1.0; 6])),
            ("y".into(), "F32", vec![1], f32_bytes(&[1.0])),
            ("z".into(), "F32", vec![6], f32_bytes(&[1.0; 6])),
        ],
    );
    write(
        &b,
        &[
            ("x".into(), "F32", vec![3, 2], f32_bytes(&[1.0; 6])),
            ("w".into(), "F32", vec![1], f32_bytes(&[1.0])),
            ("z".into(), "BF16", vec![6], bf16_bytes(&[1.0; 6])),
        ],
    );
    let r = trajectory(&[&a, &b], &RunOptions::default(), &Control::new()).unwrap();
    let kinds: Vec<(&str, &str)> = r
        .mismatches
        .iter()
        .map(|m| (m.tensor.as_str(), m.kind.as_str()))
        .collect();
    assert!(kinds.contains(&("x", "shape")));
    assert!(kinds.contains(&("y", "missing")));
    assert!(kinds.contains(&("w", "extra")));
    assert!(kinds.contains(&("z", "dtype")));
    assert_eq!(r.tensors.len(), 1);
    assert_eq!(r.tensors[0].name, "z");
    assert_eq!(r.tensors[0].steps[0].fro_delta, 0.0);
}
