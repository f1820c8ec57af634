//! `forgetscope._core`: the thin PyO3 layer over forgetscope-core. It converts arguments, releases
//! the GIL for the duration of the work, maps errors to the Python exception tree, and moves result
//! columns into numpy arrays. No algorithm lives here.

mod analyze;
mod convert;
mod errors;
mod fingerprint;
mod gradient_interference;
mod metrics;
mod partial;
mod routing;
mod run;

use std::path::PathBuf;

use forgetscope_core::{self as core, OpenOptions, RunOptions};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

use crate::convert::table_to_dict;
use crate::errors::to_pyerr;
use crate::run::run_detached;

/// Weight trajectories of every tensor across checkpoints (the first path is the base).
///
/// Returns `(columns, meta_json)`; see `forgetscope.trajectory` for the public API.
#[pyfunction]
#[pyo3(signature = (paths, *, threads=0, memory_budget=core::stream::DEFAULT_MEMORY_BUDGET, allow_external_symlinks=false, progress=None, chunk_bytes=None))]
fn trajectory<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    progress: Option<Bound<'py, PyAny>>,
    chunk_bytes: Option<u64>,
) -> PyResult<(Bound<'py, PyAny>, String)> {
    let opts = RunOptions {
        threads,
        memory_budget,
        open: OpenOptions {
            allow_external_symlinks,
        },
        chunk_bytes,
    };
    let report = run_detached(py, progress.as_ref(), move |control| {
        core::trajectory(&paths, &opts, control)
    })?;
    let table = core::table::trajectory_table(&report);
    Ok((table_to_dict(py, table)?, report.meta_json()))
}

/// Hyperspherical energy of every 2-D weight along a trajectory (same sampled neurons in each
/// checkpoint); returns `(columns, meta_json)`.
#[pyfunction]
#[pyo3(signature = (paths, *, threads=0, memory_budget=core::stream::DEFAULT_MEMORY_BUDGET, allow_external_symlinks=false, progress=None, max_neurons=4096, half_space=false, seed=0))]
#[allow(clippy::too_many_arguments)]
fn he_trajectory<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    progress: Option<Bound<'py, PyAny>>,
    max_neurons: usize,
    half_space: bool,
    seed: u64,
) -> PyResult<(Bound<'py, PyAny>, String)> {
    use core::metrics::he::HeOptions;
    use core::stream::he_pass::{he_trajectory as run, HePassOptions};
    let opts = RunOptions {
        threads,
        memory_budget,
        open: OpenOptions {
            allow_external_symlinks,
        },
        chunk_bytes: None,
    };
    let he = HePassOptions {
        he: HeOptions {
            half_space,
            seed,
            ..HeOptions::default()
        },
        max_neurons,
    };
    let (records, skipped) = run_detached(py, progress.as_ref(), move |control| {
        run(&paths, &opts, &he, control)
    })?;
    let meta = serde_json::json!({
        "schema_version": core::results::SCHEMA_VERSION,
        "skipped": skipped,
        "conventions": {
            "hyperspherical_energy": records.first().map(|r| r.per_checkpoint[0].convention).unwrap_or(""),
            "neurons": "rows of each [out, in] matrix; the same seeded sample of rows in every checkpoint",
            "max_neurons": max_neurons,
            "seed": seed,
            "delta": "delta_s* = HE_t - HE_0 on the same sampled neurons",
        },
    });
    Ok((
        table_to_dict(py, core::table::he_table(&records))?,
        meta.to_string(),
    ))
}

/// Open and validate a checkpoint; returns `(columns, meta_json)` listing every stored tensor.
#[pyfunction]
#[pyo3(signature = (path, *, allow_external_symlinks=false))]
fn inspect<'py>(
    py: Python<'py>,
    path: PathBuf,
    allow_external_symlinks: bool,
) -> PyResult<(Bound<'py, PyAny>, String)> {
    let opts = OpenOptions {
        allow_external_symlinks,
    };
    let ckpt = run_detached(py, None, move |_| core::inspect(&path, &opts))?;
    let table = core::table::inspect_table(&ckpt);
    Ok((
        table_to_dict(py, table)?,
        core::results::inspect_meta_json(&ckpt),
    ))
}

/// Decode one tensor to a float32 array of its logical shape.
#[pyfunction]
#[pyo3(signature = (path, name, *, allow_external_symlinks=false, max_bytes=1u64 << 32))]
fn read_tensor<'py>(
    py: Python<'py>,
    path: PathBuf,
    name: String,
    allow_external_symlinks: bool,
    max_bytes: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = OpenOptions {
        allow_external_symlinks,
    };
    let (shape, data) = run_detached(py, None, move |_| {
        core::read_tensor(&path, &name, &opts, max_bytes)
    })?;
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let arr = PyArray1::from_vec(py, data);
    Ok(arr.reshape(shape)?.into_any())
}

/// Value table of an 8-bit float format (`"F8_E4M3"` or `"F8_E5M2"`), for tests and tooling.
#[pyfunction]
fn fp8_table<'py>(py: Python<'py>, dtype: &str) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let d = match core::dtype::Dtype::parse(dtype) {
        Some(d @ (core::dtype::Dtype::F8E4M3 | core::dtype::Dtype::F8E5M2)) => d,
        _ => {
            return Err(to_pyerr(
                py,
                core::Error::Config {
                    reason: format!("fp8_table takes F8_E4M3 or F8_E5M2, not {dtype:?}"),
                },
            ))
        }
    };
    Ok(PyArray1::from_slice(py, core::dtype::fp8_table(d)))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SCHEMA_VERSION", core::results::SCHEMA_VERSION)?;
    m.add("DEFAULT_MEMORY_BUDGET", core::stream::DEFAULT_MEMORY_BUDGET)?;
    m.add("MIN_MEMORY_BUDGET", core::stream::MIN_MEMORY_BUDGET)?;
    m.add_function(wrap_pyfunction!(trajectory, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(fp8_table, m)?)?;
    m.add_function(wrap_pyfunction!(he_trajectory, m)?)?;
    m.add_function(wrap_pyfunction!(analyze::analyze, m)?)?;
    m.add_function(wrap_pyfunction!(analyze::structure, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::hyperspherical_energy, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::principal_directions, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::linear_cka, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::rbf_cka, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::cka_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(metrics::mean_pairwise_cosine, m)?)?;
    m.add_function(wrap_pyfunction!(
        metrics::covariance_participation_ratio,
        m
    )?)?;
    m.add_class::<metrics::PyStreamingCka>()?;
    m.add_class::<metrics::PyMinibatchCka>()?;
    partial::register(m)?;
    routing::register(m)?;
    fingerprint::register(m)?;
    gradient_interference::register(m)?;
    Ok(())
}
