//! `plan_parts`, `run_part`, `merge_trajectory`, `merge_analysis`: the core's split/merge of a
//! run, for an engine that schedules the parts elsewhere (`forgetscope._ray`). Argument conversion
//! only; what a part holds and how parts merge is decided in `forgetscope_core::stream::partial`.

use std::path::PathBuf;

use forgetscope_core::stream::partial::{self, Job};
use forgetscope_core::stream::AnalyzeOptions;
use forgetscope_core::{self as core, Control, OpenOptions, RunOptions};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::analyze::{load_config, metric_set};
use crate::convert::table_to_dict;
use crate::run::run_detached;

/// The options of a run, as a dict with every key present (built by `forgetscope._ray`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct JobSpec {
    kind: String,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    chunk_bytes: Option<u64>,
    metrics: Vec<String>,
    model_config: Option<PathBuf>,
    spectra_k: usize,
    spectra_oversample: usize,
    spectra_power_iters: usize,
    spectra_exact_max_dim: usize,
    seed: u64,
    severe_z: f64,
}

fn job(py: Python<'_>, spec: JobSpec) -> PyResult<Job> {
    let run = RunOptions {
        threads: spec.threads,
        memory_budget: spec.memory_budget,
        open: OpenOptions {
            allow_external_symlinks: spec.allow_external_symlinks,
        },
        chunk_bytes: spec.chunk_bytes,
    };
    match spec.kind.as_str() {
        "trajectory" => Ok(Job::Trajectory(run)),
        "analyze" => Ok(Job::Analyze(Box::new(AnalyzeOptions {
            run,
            metrics: metric_set(py, &spec.metrics)?,
            spectral: core::metrics::spectral::SpectralOptions {
                k: spec.spectra_k,
                oversample: spec.spectra_oversample,
                power_iters: spec.spectra_power_iters,
                exact_max_dim: spec.spectra_exact_max_dim,
                seed: spec.seed,
                ..Default::default()
            },
            severe_z: spec.severe_z,
            config: load_config(py, spec.model_config)?,
        }))),
        other => Err(crate::errors::to_pyerr(
            py,
            core::Error::Config {
                reason: format!("unknown job kind {other:?} (trajectory, analyze)"),
            },
        )),
    }
}

/// Split a run into about `n_parts` parts; returns
/// `{"fingerprint": [int], "parts": [{"tensors": [int], "bytes": int, "files": [str]}], "total_bytes": int, "n_tensors": int}`.
#[pyfunction]
#[pyo3(signature = (paths, job_spec, n_parts))]
pub(crate) fn plan_parts<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    job_spec: JobSpec,
    n_parts: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let job = job(py, job_spec)?;
    let wp = run_detached(py, None, move |control| {
        partial::plan_parts(&paths, &job, n_parts, control)
    })?;
    let parts = PyList::empty(py);
    for p in &wp.parts {
        let d = PyDict::new(py);
        d.set_item("tensors", &p.tensors)?;
        d.set_item("bytes", p.bytes)?;
        let files: Vec<String> = p.files.iter().map(|f| f.display().to_string()).collect();
        d.set_item("files", files)?;
        parts.append(d)?;
    }
    let out = PyDict::new(py);
    out.set_item("fingerprint", &wp.fingerprint)?;
    out.set_item("parts", parts)?;
    out.set_item("total_bytes", wp.total_bytes)?;
    out.set_item("n_tensors", wp.n_tensors)?;
    Ok(out)
}

/// Compute one part; returns its partial result as bytes.
#[pyfunction]
#[pyo3(signature = (paths, job_spec, fingerprint, tensors, *, progress=None))]
pub(crate) fn run_part<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    job_spec: JobSpec,
    fingerprint: Vec<u64>,
    tensors: Vec<usize>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let job = job(py, job_spec)?;
    let bytes = run_detached(py, progress.as_ref(), move |control: &Control| {
        partial::run_part(&paths, &job, &fingerprint, &tensors, control)
    })?;
    Ok(PyBytes::new(py, &bytes))
}

/// Copies of the parts' bytes, which must outlive the GIL being held.
fn owned(parts: &[Bound<'_, PyBytes>]) -> Vec<Vec<u8>> {
    parts.iter().map(|b| b.as_bytes().to_vec()).collect()
}

fn views(parts: &[Vec<u8>]) -> Vec<&[u8]> {
    parts.iter().map(Vec::as_slice).collect()
}

/// Merge a trajectory's parts; returns `(columns, meta_json)` like `trajectory`.
#[pyfunction]
#[pyo3(signature = (paths, job_spec, fingerprint, parts, seconds))]
pub(crate) fn merge_trajectory<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    job_spec: JobSpec,
    fingerprint: Vec<u64>,
    parts: Vec<Bound<'py, PyBytes>>,
    seconds: f64,
) -> PyResult<(Bound<'py, PyAny>, String)> {
    let Job::Trajectory(opts) = job(py, job_spec)? else {
        return Err(crate::errors::to_pyerr(
            py,
            core::Error::Config {
                reason: "merge_trajectory needs a trajectory job".into(),
            },
        ));
    };
    let parts = owned(&parts);
    let report = run_detached(py, None, move |_| {
        partial::merge_trajectory(&paths, &opts, &fingerprint, &views(&parts), seconds)
    })?;
    let table = core::table::trajectory_table(&report);
    Ok((table_to_dict(py, table)?, report.meta_json()))
}

/// Merge an analysis' parts; returns `(trajectory_columns, {table: columns}, meta_json)` like
/// `analyze`.
#[pyfunction]
#[pyo3(signature = (paths, job_spec, fingerprint, parts, seconds))]
pub(crate) fn merge_analysis<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    job_spec: JobSpec,
    fingerprint: Vec<u64>,
    parts: Vec<Bound<'py, PyBytes>>,
    seconds: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, String)> {
    let Job::Analyze(opts) = job(py, job_spec)? else {
        return Err(crate::errors::to_pyerr(
            py,
            core::Error::Config {
                reason: "merge_analysis needs an analyze job".into(),
            },
        ));
    };
    let parts = owned(&parts);
    let report = run_detached(py, None, move |_| {
        partial::merge_analysis(&paths, &opts, &fingerprint, &views(&parts), seconds)
    })?;
    let traj = table_to_dict(py, core::table::trajectory_table(&report.trajectory))?;
    let tables = PyDict::new(py);
    for (name, t) in core::table::analysis::analysis_tables(&report) {
        tables.set_item(name, table_to_dict(py, t)?)?;
    }
    Ok((traj, tables.into_any(), report.meta_json()))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_parts, m)?)?;
    m.add_function(wrap_pyfunction!(run_part, m)?)?;
    m.add_function(wrap_pyfunction!(merge_trajectory, m)?)?;
    m.add_function(wrap_pyfunction!(merge_analysis, m)?)?;
    Ok(())
}
