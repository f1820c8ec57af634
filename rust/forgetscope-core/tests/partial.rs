//! A trajectory split into parts (run in any order) merges into exactly the single-run report;
//! a part counted twice, a lost part, or a part planned on other files is refused.

mod common;

use common::{bf16_bytes, values, write_sharded, T};
use forgetscope_core::stream::partial::{merge_trajectory, plan_parts, run_part, Job};
use forgetscope_core::{trajectory, Control, RunOptions};

fn model(seed: u64, scale: f32) -> Vec<T> {
    (0..9)
        .map(|i| {
            let n = 4096 * (i + 1);
            let w0 = values(100 + i as u64, n);
            let d = values(seed * 1000 + i as u64, n);
            let w: Vec<f32> = w0.iter().zip(&d).map(|(a, b)| a + scale * b).collect();
            (
                format!("model.layers.{i}.mlp.down_proj.weight"),
                "BF16",
                vec![n as u64 / 64, 64],
                bf16_bytes(&w),
            )
        })
        .collect()
}

#[test]
fn parts_merge_bit_identical_and_refuse_double_or_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, (seed, scale)) in [(0, 0.0), (1, 0.01), (2, 0.03)].into_iter().enumerate() {
        let d = dir.path().join(format!("c{i}"));
        write_sharded(&d, &model(seed, scale), 3);
        paths.push(d);
    }
    // Small chunks, so tensors span several chunks whose merge order matters.
    let opts = RunOptions {
        threads: 2,
        chunk_bytes: Some(8 << 10),
        ..Default::default()
    };
    let job = Job::Trajectory(RunOptions {
        threads: 1,
        ..opts.clone()
    });
    let whole = trajectory(&paths, &opts, &Control::new()).unwrap();
    let wp = plan_parts(&paths, &job, 4, &Control::new()).unwrap();
    assert_eq!(wp.parts.len(), 4);
    let mut all: Vec<usize> = wp.parts.iter().flat_map(|p| p.tensors.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..9).collect::<Vec<_>>());
    let bytes: Vec<Vec<u8>> = wp
        .parts
        .iter()
        .map(|p| run_part(&paths, &job, &wp.fingerprint, &p.tensors, &Control::new()).unwrap())
        .collect();
    let mut refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    refs.reverse();
    let merged = merge_trajectory(&paths, &opts, &wp.fingerprint, &refs, 0.0).unwrap();
    let key = |r: &forgetscope_core::results::TrajectoryReport| -> Vec<u64> {
        r.tensors
            .iter()
            .flat_map(|t| {
                std::iter::once(t.base.norm.to_bits()).chain(t.steps.iter().flat_map(|s| {
                    [
                        s.fro_delta.to_bits(),
                        s.one_minus_cos.to_bits(),
                        s.step_drift.to_bits(),
                        s.step_cos.to_bits(),
                        s.frac_unchanged.to_bits(),
                    ]
                }))
            })
            .collect()
    };
    assert_eq!(key(&whole), key(&merged));

    let twice: Vec<&[u8]> = refs.iter().copied().chain([refs[0]]).collect();
    let e = merge_trajectory(&paths, &opts, &wp.fingerprint, &twice, 0.0).unwrap_err();
    assert!(e.to_string().contains("counted twice"), "{e}");
    let e = merge_trajectory(&paths, &opts, &wp.fingerprint, &refs[1..], 0.0).unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    let mut other = wp.fingerprint.clone();
    other[2] ^= 1;
    let e = run_part(&paths, &job, &other, &wp.parts[0].tensors, &Control::new()).unwrap_err();
    assert!(e.to_string().contains("c2"), "{e}");
    let mut corrupt = bytes[0].clone();
    corrupt.truncate(corrupt.len() - 3);
    let e = merge_trajectory(&paths, &opts, &wp.fingerprint, &[&corrupt], 0.0).unwrap_err();
    assert!(e.to_string().contains("cannot decode"), "{e}");
}
