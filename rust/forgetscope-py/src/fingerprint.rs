//! Base fingerprints: argument conversion for `forgetscope.fingerprint` / `compare_fingerprint`,
//! the JL sketch kernel and its error bound (for tests and tooling). Defaults and validation
//! messages live in `forgetscope.fingerprints`.

use std::path::PathBuf;

use forgetscope_core::metrics::sketch::{self, SignKeys};
use forgetscope_core::metrics::spectral::SpectralOptions;
use forgetscope_core::stream::fingerprint::{
    compare_fingerprint as compare, comparison_tables, fingerprint as build, fingerprint_meta_json,
    fingerprint_table, read_fingerprint, write_fingerprint, CompareOptions, FingerprintOptions,
};
use forgetscope_core::{OpenOptions, RunOptions};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::table_to_dict;
use crate::errors::to_pyerr;
use crate::run::run_detached;

/// Fingerprint the checkpoint `path` and write it to `out`; returns the fingerprint's meta JSON
/// with `bytes` (file size) added.
#[pyfunction]
#[pyo3(signature = (path, out, *, sketch_dim, seed, threads=0, memory_budget=2u64 << 30, allow_external_symlinks=false, progress=None, chunk_bytes=None, model_config=None, subspaces=true, spectra_k=8, spectra_oversample=8, spectra_power_iters=1, spectra_exact_max_dim=512, subspace_max_numel=1u64 << 24))]
#[allow(clippy::too_many_arguments)]
fn fingerprint(
    py: Python<'_>,
    path: PathBuf,
    out: PathBuf,
    sketch_dim: usize,
    seed: u64,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    progress: Option<Bound<'_, PyAny>>,
    chunk_bytes: Option<u64>,
    model_config: Option<PathBuf>,
    subspaces: bool,
    spectra_k: usize,
    spectra_oversample: usize,
    spectra_power_iters: usize,
    spectra_exact_max_dim: usize,
    subspace_max_numel: u64,
) -> PyResult<String> {
    let opts = FingerprintOptions {
        run: RunOptions {
            threads,
            memory_budget,
            open: OpenOptions {
                allow_external_symlinks,
            },
            chunk_bytes,
        },
        sketch_dim,
        seed,
        config: model_config,
        subspaces,
        spectral: SpectralOptions {
            k: spectra_k,
            oversample: spectra_oversample,
            power_iters: spectra_power_iters,
            exact_max_dim: spectra_exact_max_dim,
            seed,
            ..Default::default()
        },
        subspace_max_numel,
    };
    let (meta, bytes) = run_detached(py, progress.as_ref(), move |control| {
        let fp = build(&path, &opts, control)?;
        let bytes = write_fingerprint(&fp, &out)?;
        Ok((fingerprint_meta_json(&fp), bytes))
    })?;
    let mut v: serde_json::Value = serde_json::from_str(&meta).unwrap_or_default();
    v["bytes"] = bytes.into();
    Ok(v.to_string())
}

/// Read a `.fsfp` file; returns `(per-tensor columns, meta_json)`.
#[pyfunction]
fn load_fingerprint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<(Bound<'py, PyAny>, String)> {
    let fp = run_detached(py, None, move |_| read_fingerprint(&path))?;
    Ok((
        table_to_dict(py, fingerprint_table(&fp))?,
        fingerprint_meta_json(&fp),
    ))
}

/// Compare `candidate` with the fingerprint at `fp_path`; returns
/// `(trajectory_columns, {table: columns}, meta_json)` shaped like `analyze`'s.
#[pyfunction]
#[pyo3(signature = (fp_path, candidate, *, delta=0.01, severe_z=3.0, strict=true, spectra=true, threads=0, memory_budget=2u64 << 30, allow_external_symlinks=false, progress=None, chunk_bytes=None))]
#[allow(clippy::too_many_arguments)]
fn compare_fingerprint<'py>(
    py: Python<'py>,
    fp_path: PathBuf,
    candidate: PathBuf,
    delta: f64,
    severe_z: f64,
    strict: bool,
    spectra: bool,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    progress: Option<Bound<'py, PyAny>>,
    chunk_bytes: Option<u64>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, String)> {
    let opts = CompareOptions {
        run: RunOptions {
            threads,
            memory_budget,
            open: OpenOptions {
                allow_external_symlinks,
            },
            chunk_bytes,
        },
        delta,
        severe_z,
        strict,
        spectra,
    };
    let (cmp, fp_meta) = run_detached(py, progress.as_ref(), move |control| {
        let fp = read_fingerprint(&fp_path)?;
        let cmp = compare(&fp, &candidate, &opts, control)?;
        Ok((cmp, fingerprint_meta_json(&fp)))
    })?;
    let (traj, tables) = comparison_tables(&cmp);
    let out = PyDict::new(py);
    for (name, t) in tables {
        out.set_item(name, table_to_dict(py, t)?)?;
    }
    let mut meta: serde_json::Value =
        serde_json::from_str(&cmp.report.meta_json()).unwrap_or_default();
    let mut fpm: serde_json::Value = serde_json::from_str(&fp_meta).unwrap_or_default();
    if let Some(o) = fpm.as_object_mut() {
        // The per-matrix listing is long and already implied by the subspaces table.
        o.remove("subspaces");
        o.remove("whole");
    }
    meta["fingerprint"] = fpm;
    meta["bound"] = serde_json::to_value(cmp.bound).unwrap_or_default();
    Ok((table_to_dict(py, traj)?, out.into_any(), meta.to_string()))
}

/// The unscaled sign sketch S·x of a flattened float32 tensor (see `forgetscope.fingerprints`).
#[pyfunction]
#[pyo3(signature = (x, *, sketch_dim, seed, name))]
fn jl_sketch<'py>(
    py: Python<'py>,
    x: PyReadonlyArray1<'py, f32>,
    sketch_dim: usize,
    seed: u64,
    name: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let keys = SignKeys::new(seed, name, sketch_dim).map_err(|e| to_pyerr(py, e))?;
    let data = x.as_slice().map_err(|_| {
        to_pyerr(
            py,
            forgetscope_core::Error::Config {
                reason: "x must be a C-contiguous 1-D float32 array".into(),
            },
        )
    })?;
    let y = py.detach(|| sketch::sketch(data, &keys));
    Ok(PyArray1::from_vec(py, y))
}

/// The error bound of a sketch estimate at failure probability `delta`, as a dict.
#[pyfunction]
fn jl_bound<'py>(py: Python<'py>, sketch_dim: usize, delta: f64) -> PyResult<Bound<'py, PyDict>> {
    let b = sketch::jl_bound(sketch_dim, delta).map_err(|e| to_pyerr(py, e))?;
    let d = PyDict::new(py);
    d.set_item("sketch_dim", b.sketch_dim)?;
    d.set_item("delta", b.delta)?;
    d.set_item("eps_upper", b.eps_upper)?;
    d.set_item("eps_lower", b.eps_lower)?;
    d.set_item("rel_error", b.rel_error)?;
    d.set_item("lo_factor", b.lo_factor)?;
    d.set_item("hi_factor", b.hi_factor)?;
    Ok(d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(load_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(compare_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(jl_sketch, m)?)?;
    m.add_function(wrap_pyfunction!(jl_bound, m)?)?;
    Ok(())
}
