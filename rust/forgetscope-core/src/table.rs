//! Columnar views of results, the shape in which tables cross into Python (one 1-D column per
//! field; numeric columns move into numpy without a copy).

pub mod analysis;

use crate::results::TrajectoryReport;
use crate::source::{Checkpoint, Role};

/// One column of a table.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Floating point values (NaN where undefined).
    F64(Vec<f64>),
    /// Integers (−1 where absent, e.g. a tensor outside any layer).
    I64(Vec<i64>),
    /// Text.
    Str(Vec<String>),
    /// Flags.
    Bool(Vec<bool>),
}

/// Named columns of equal length.
pub type Table = Vec<(&'static str, Column)>;

fn shape_str(shape: &[u64]) -> String {
    let inner: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", inner.join(", "))
}

/// Long format: one row per (tensor, checkpoint t ≥ 1).
pub fn trajectory_table(r: &TrajectoryReport) -> Table {
    let rows: usize = r.tensors.iter().map(|t| t.steps.len()).sum();
    let mut tensor = Vec::with_capacity(rows);
    let mut ckpt = Vec::with_capacity(rows);
    let mut layer = Vec::with_capacity(rows);
    let mut expert = Vec::with_capacity(rows);
    let mut kind = Vec::with_capacity(rows);
    let mut component = Vec::with_capacity(rows);
    let mut shape = Vec::with_capacity(rows);
    let mut numel = Vec::with_capacity(rows);
    let mut format = Vec::with_capacity(rows);
    let mut base_format = Vec::with_capacity(rows);
    let mut base_norm = Vec::with_capacity(rows);
    let mut base_nan = Vec::with_capacity(rows);
    let mut base_inf = Vec::with_capacity(rows);
    let mut f: [Vec<f64>; 9] = Default::default();
    let mut n_nan = Vec::with_capacity(rows);
    let mut n_inf = Vec::with_capacity(rows);
    for t in &r.tensors {
        for (i, s) in t.steps.iter().enumerate() {
            tensor.push(t.name.clone());
            ckpt.push(i as i64 + 1);
            layer.push(t.layer.map_or(-1, i64::from));
            expert.push(t.expert.map_or(-1, i64::from));
            kind.push(t.kind.clone());
            component.push(t.component.clone());
            shape.push(shape_str(&t.shape));
            numel.push(t.numel as i64);
            format.push(t.formats[i + 1].clone());
            base_format.push(t.formats[0].clone());
            base_norm.push(t.base.norm);
            base_nan.push(t.base.n_nan as i64);
            base_inf.push(t.base.n_inf as i64);
            let vals = [
                s.norm,
                s.fro_delta,
                s.rel_delta,
                s.one_minus_cos,
                s.step_drift,
                s.path_length,
                s.straightness,
                s.step_cos,
                s.frac_unchanged,
            ];
            for (col, v) in f.iter_mut().zip(vals) {
                col.push(v);
            }
            n_nan.push(s.n_nan as i64);
            n_inf.push(s.n_inf as i64);
        }
    }
    let [norm, fro_delta, rel_delta, one_minus_cos, step_drift, path_length, straightness, step_cos, frac_unchanged] =
        f;
    vec![
        ("tensor", Column::Str(tensor)),
        ("checkpoint", Column::I64(ckpt)),
        ("layer", Column::I64(layer)),
        ("expert", Column::I64(expert)),
        ("kind", Column::Str(kind)),
        ("component", Column::Str(component)),
        ("shape", Column::Str(shape)),
        ("numel", Column::I64(numel)),
        ("format", Column::Str(format)),
        ("base_format", Column::Str(base_format)),
        ("base_norm", Column::F64(base_norm)),
        ("norm", Column::F64(norm)),
        ("fro_delta", Column::F64(fro_delta)),
        ("rel_delta", Column::F64(rel_delta)),
        ("one_minus_cos", Column::F64(one_minus_cos)),
        ("step_drift", Column::F64(step_drift)),
        ("path_length", Column::F64(path_length)),
        ("straightness", Column::F64(straightness)),
        ("step_cos", Column::F64(step_cos)),
        ("frac_unchanged", Column::F64(frac_unchanged)),
        ("n_nan", Column::I64(n_nan)),
        ("n_inf", Column::I64(n_inf)),
        ("base_n_nan", Column::I64(base_nan)),
        ("base_n_inf", Column::I64(base_inf)),
    ]
}

/// One row per stored tensor of a checkpoint.
pub fn inspect_table(c: &Checkpoint) -> Table {
    let n = c.stored.len();
    let mut name = Vec::with_capacity(n);
    let mut dtype = Vec::with_capacity(n);
    let mut shape = Vec::with_capacity(n);
    let mut shard = Vec::with_capacity(n);
    let mut offset = Vec::with_capacity(n);
    let mut nbytes = Vec::with_capacity(n);
    let mut role = Vec::with_capacity(n);
    let mut of = Vec::with_capacity(n);
    for e in &c.stored {
        name.push(e.stored.name.clone());
        dtype.push(e.stored.dtype.to_string());
        shape.push(shape_str(&e.stored.shape));
        shard.push(c.shard_path(e.stored.shard).display().to_string());
        offset.push(e.stored.offset as i64);
        nbytes.push(e.stored.len as i64);
        role.push(
            match e.role {
                Role::Tensor => "tensor",
                Role::Fp8Scale => "fp8_scale",
                Role::Mxfp4Scales => "mxfp4_scales",
                Role::Mxfp4Blocks => "mxfp4_blocks",
                Role::Skipped => "skipped",
            }
            .to_string(),
        );
        of.push(e.of.clone().unwrap_or_default());
    }
    vec![
        ("name", Column::Str(name)),
        ("dtype", Column::Str(dtype)),
        ("shape", Column::Str(shape)),
        ("shard", Column::Str(shard)),
        ("offset", Column::I64(offset)),
        ("bytes", Column::I64(nbytes)),
        ("role", Column::Str(role)),
        ("of", Column::Str(of)),
    ]
}

/// HE along a trajectory, long format: one row per (matrix, checkpoint t ≥ 0), with the change
/// against the base (`delta_s*` = HE_t − HE_0) on every row.
pub fn he_table(records: &[crate::stream::he_pass::HeTrajectory]) -> Table {
    let mut tensor = Vec::new();
    let mut ckpt = Vec::new();
    let mut layer = Vec::new();
    let mut expert = Vec::new();
    let mut kind = Vec::new();
    let mut shape = Vec::new();
    let mut n_neurons = Vec::new();
    let mut n_total = Vec::new();
    let mut n_zero = Vec::new();
    let mut n_near_dup = Vec::new();
    let mut f: [Vec<f64>; 8] = Default::default();
    for r in records {
        let base = r.per_checkpoint[0].energy;
        for (t, h) in r.per_checkpoint.iter().enumerate() {
            tensor.push(r.name.clone());
            ckpt.push(t as i64);
            layer.push(r.layer.map_or(-1, i64::from));
            expert.push(r.expert.map_or(-1, i64::from));
            kind.push(r.kind.clone());
            shape.push(shape_str(&r.shape));
            n_neurons.push(h.n_neurons as i64);
            n_total.push(h.n_total as i64);
            n_zero.push(h.n_zero as i64);
            n_near_dup.push(h.n_near_dup as i64);
            let vals = [
                h.energy[0],
                h.energy[1],
                h.energy[2],
                h.energy[0] - base[0],
                h.energy[1] - base[1],
                h.energy[2] - base[2],
                h.min_d2,
                h.frame_potential,
            ];
            for (col, v) in f.iter_mut().zip(vals) {
                col.push(v);
            }
        }
    }
    let [e0, e1, e2, d0, d1, d2, min_d2, frame] = f;
    vec![
        ("tensor", Column::Str(tensor)),
        ("checkpoint", Column::I64(ckpt)),
        ("layer", Column::I64(layer)),
        ("expert", Column::I64(expert)),
        ("kind", Column::Str(kind)),
        ("shape", Column::Str(shape)),
        ("n_neurons", Column::I64(n_neurons)),
        ("n_total", Column::I64(n_total)),
        ("n_zero", Column::I64(n_zero)),
        ("energy_s0", Column::F64(e0)),
        ("energy_s1", Column::F64(e1)),
        ("energy_s2", Column::F64(e2)),
        ("delta_s0", Column::F64(d0)),
        ("delta_s1", Column::F64(d1)),
        ("delta_s2", Column::F64(d2)),
        ("n_near_dup", Column::I64(n_near_dup)),
        ("min_d2", Column::F64(min_d2)),
        ("frame_potential", Column::F64(frame)),
    ]
}
