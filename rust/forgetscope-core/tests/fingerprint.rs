//! Base fingerprint: round trip through the `.fsfp` file, exact quantities equal to `analyze`'s,
//! estimates within the documented bound, bit-identical tensors exact, bad files rejected.

mod common;

use std::path::Path;

use common::{f32_bytes, values, write_sharded, T};
use forgetscope_core::stream::fingerprint::{
    compare_fingerprint, fingerprint, read_fingerprint, write_fingerprint, CompareOptions,
    FingerprintOptions,
};
use forgetscope_core::stream::{analyze, AnalyzeOptions};
use forgetscope_core::{Control, ErrorKind, RunOptions};

const HIDDEN: u64 = 32;
const H: u64 = 4;
const HKV: u64 = 2;
const D: u64 = 8;
const E: u64 = 4;
const I: u64 = 24;

fn config(dir: &Path) {
    let cfg = serde_json::json!({
        "model_type": "mixtral", "hidden_size": HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": H, "num_key_value_heads": HKV, "num_local_experts": E,
        "num_experts_per_tok": 2, "intermediate_size": I, "vocab_size": 64,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// Rows [r0, r1) of a tensor get noise of this scale.
type Plant = dyn Fn(&str) -> Option<(u64, u64, f32)>;

/// Tensors of a 2-layer Mixtral-style model; `plant(name)` says where to add noise.
fn model(seed: u64, plant: &Plant) -> Vec<T> {
    let mut shapes: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![64, HIDDEN])];
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        shapes.push((format!("{p}input_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}self_attn.q_proj.weight"), vec![H * D, HIDDEN]));
        shapes.push((format!("{p}self_attn.k_proj.weight"), vec![HKV * D, HIDDEN]));
        shapes.push((format!("{p}self_attn.v_proj.weight"), vec![HKV * D, HIDDEN]));
        shapes.push((format!("{p}self_attn.o_proj.weight"), vec![HIDDEN, H * D]));
        shapes.push((format!("{p}block_sparse_moe.gate.weight"), vec![E, HIDDEN]));
        for e in 0..E {
            shapes.push((
                format!("{p}block_sparse_moe.experts.{e}.w1.weight"),
                vec![I, HIDDEN],
            ));
            shapes.push((
                format!("{p}block_sparse_moe.experts.{e}.w2.weight"),
                vec![HIDDEN, I],
            ));
            shapes.push((
                format!("{p}block_sparse_moe.experts.{e}.w3.weight"),
                vec![I, HIDDEN],
            ));
        }
    }
    shapes.push(("lm_head.weight".into(), vec![64, HIDDEN]));
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: u64 = shape.iter().product();
            let mut v = values(1000 + k as u64, n as usize);
            if let Some((r0, r1, s)) = plant(&name) {
                let cols = *shape.last().unwrap();
                let noise = values(seed * 7919 + k as u64, n as usize);
                for i in (r0 * cols) as usize..((r1 * cols) as usize).min(n as usize) {
                    v[i] += s * noise[i];
                }
            }
            (name, "F32", shape, f32_bytes(&v))
        })
        .collect()
}

struct Fix {
    _dir: tempfile::TempDir,
    base: std::path::PathBuf,
    ft: std::path::PathBuf,
}

fn fixture() -> Fix {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let ft = dir.path().join("ft");
    write_sharded(&base, &model(0, &|_| None), 2);
    config(&base);
    // Head 1 of layer 0 (q rows 8..16), kv head 1 of layer 1, expert 2 of layer 1, router row 3.
    let plant = |name: &str| -> Option<(u64, u64, f32)> {
        match name {
            "model.layers.0.self_attn.q_proj.weight" => Some((D, 2 * D, 0.3)),
            "model.layers.1.self_attn.k_proj.weight" => Some((D, 2 * D, 0.3)),
            "model.layers.1.block_sparse_moe.gate.weight" => Some((3, 4, 0.2)),
            n if n.starts_with("model.layers.1.block_sparse_moe.experts.2.") => {
                Some((0, 1 << 20, 0.1))
            }
            "lm_head.weight" => Some((0, 64, 0.01)),
            _ => None,
        }
    };
    write_sharded(&ft, &model(1, &plant), 2);
    config(&ft);
    Fix {
        _dir: dir,
        base,
        ft,
    }
}

fn fp_opts(chunk: Option<u64>) -> FingerprintOptions {
    FingerprintOptions {
        run: RunOptions {
            threads: 2,
            chunk_bytes: chunk,
            memory_budget: 64 << 20,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn round_trip_exact_parts_and_bounds() {
    let f = fixture();
    let fp = fingerprint(&f.base, &fp_opts(None), &Control::new()).unwrap();
    let out = f._dir.path().join("base.fsfp");
    let size = write_fingerprint(&fp, &out).unwrap();
    assert_eq!(size, std::fs::metadata(&out).unwrap().len());
    let back = read_fingerprint(&out).unwrap();
    assert_eq!(back.tensors.len(), fp.tensors.len());
    for (a, b) in fp.tensors.iter().zip(&back.tensors) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.seg, b.seg);
        assert_eq!(a.sketch, b.sketch, "{}", a.name);
    }
    assert_eq!(back.whole.len(), 2, "two routers kept whole");
    assert!(!back.svd.is_empty());

    // The thread count changes nothing (chunks are merged in order).
    let mut one = fp_opts(None);
    one.run.threads = 1;
    let serial = fingerprint(&f.base, &one, &Control::new()).unwrap();
    for (a, b) in fp.tensors.iter().zip(&serial.tensors) {
        assert_eq!(a.sketch, b.sketch, "{}", a.name);
    }

    // Chunking does not change hashes and changes sketches only by rounding.
    let small = fingerprint(&f.base, &fp_opts(Some(4096)), &Control::new()).unwrap();
    for (a, b) in fp.tensors.iter().zip(&small.tensors) {
        assert_eq!(a.sketch.seg_hash, b.sketch.seg_hash);
        for (x, y) in a.sketch.sketch.iter().zip(&b.sketch.sketch) {
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0));
        }
    }

    let ctl = Control::new();
    let an = analyze(
        &[&f.base, &f.ft],
        &AnalyzeOptions {
            run: RunOptions {
                threads: 2,
                ..Default::default()
            },
            ..Default::default()
        },
        &ctl,
    )
    .unwrap();
    let cmp =
        compare_fingerprint(&back, &f.ft, &CompareOptions::default(), &Control::new()).unwrap();
    let b = cmp.bound;
    let rep = &cmp.report;
    assert_eq!(rep.trajectory.tensors.len(), an.trajectory.tensors.len());
    let close = |a: f64, x: f64| (a - x).abs() <= 1e-12 * x.abs().max(1e-300);
    for (c, a) in rep.trajectory.tensors.iter().zip(&an.trajectory.tensors) {
        assert_eq!(c.name, a.name);
        assert!(close(c.base.norm, a.base.norm), "{}", c.name);
        assert!(close(c.steps[0].norm, a.steps[0].norm), "{}", c.name);
        let (est, tru) = (c.steps[0].fro_delta, a.steps[0].fro_delta);
        if tru == 0.0 {
            assert_eq!(est, 0.0, "{} unchanged must be exact", c.name);
        } else {
            assert!(
                (est - tru).abs() <= b.rel_error * tru,
                "{}: {est} vs {tru}",
                c.name
            );
        }
    }
    // Routers: exact.
    assert_eq!(rep.routers.len(), an.routers.len());
    for (c, a) in rep.routers.iter().zip(&an.routers) {
        assert!(
            close(c.drift.rel_drift, a.drift.rel_drift)
                || (c.drift.rel_drift == 0.0 && a.drift.rel_drift == 0.0)
        );
    }
    // Heads: within the bound, unplanted heads exact 0, planted head ranks first in its layer.
    assert_eq!(rep.heads.len(), an.heads.len());
    for (c, a) in rep.heads.iter().zip(&an.heads) {
        let (est, tru) = (c.drift.drift, a.drift.drift);
        if tru == 0.0 {
            assert_eq!(est, 0.0);
        } else {
            assert!(
                (est - tru).abs() <= b.rel_error * tru,
                "head {} {}: {est} vs {tru}",
                c.layer,
                c.drift.head
            );
        }
    }
    // Experts.
    assert_eq!(rep.experts.len(), an.experts.len());
    for (c, a) in rep.experts.iter().zip(&an.experts) {
        assert_eq!((c.layer, c.expert), (a.layer, a.expert));
        let (est, tru) = (c.drift.fro_delta, a.drift.fro_delta);
        if tru == 0.0 {
            assert_eq!(est, 0.0);
        } else {
            assert!((est - tru).abs() <= b.rel_error * tru);
        }
        assert!(close(c.drift.base_norm, a.drift.base_norm));
    }
    // Subspaces of the stored matrices: exact.
    for c in &rep.subspaces {
        let a = an
            .subspaces
            .iter()
            .find(|a| a.tensor == c.tensor && a.side == c.side)
            .unwrap();
        assert!(
            (c.stats.overlap - a.stats.overlap).abs() < 1e-9,
            "{}",
            c.tensor
        );
    }
    assert!(!rep.subspaces.is_empty());
}

#[test]
fn identical_candidate_is_exact_zero() {
    let f = fixture();
    let fp = fingerprint(&f.base, &fp_opts(None), &Control::new()).unwrap();
    let cmp =
        compare_fingerprint(&fp, &f.base, &CompareOptions::default(), &Control::new()).unwrap();
    for t in &cmp.report.trajectory.tensors {
        assert_eq!(t.steps[0].fro_delta, 0.0);
        assert_eq!(t.steps[0].frac_unchanged, 1.0);
    }
    let (traj, _) = forgetscope_core::stream::fingerprint::comparison_tables(&cmp);
    let est = traj.iter().find(|(n, _)| n == "estimated").unwrap();
    assert!(matches!(&est.1, forgetscope_core::table::Column::Bool(v) if v.iter().all(|x| !x)));
}

#[test]
fn bad_inputs_are_invalid_input() {
    let f = fixture();
    let fp = fingerprint(&f.base, &fp_opts(None), &Control::new()).unwrap();
    let out = f._dir.path().join("base.fsfp");
    write_fingerprint(&fp, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let trunc = f._dir.path().join("trunc.fsfp");
    std::fs::write(&trunc, &bytes[..bytes.len() - 100]).unwrap();
    assert_eq!(
        read_fingerprint(&trunc).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    // A checkpoint is not a fingerprint.
    let shard = std::fs::read_dir(&f.base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let e = read_fingerprint(&shard).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("fingerprint"), "{e}");
    // Candidate with another tensor set.
    let other = f._dir.path().join("other");
    let mut t = model(0, &|_| None);
    t.pop();
    write_sharded(&other, &t, 1);
    let e =
        compare_fingerprint(&fp, &other, &CompareOptions::default(), &Control::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("lm_head.weight (missing)"), "{e}");
    let lax = CompareOptions {
        strict: false,
        ..Default::default()
    };
    let ok = compare_fingerprint(&fp, &other, &lax, &Control::new()).unwrap();
    assert!(ok
        .report
        .trajectory
        .mismatches
        .iter()
        .any(|m| m.kind == "missing"));
}
