//! `analyze` and `structure`: argument conversion and result tables for the structure-aware pass.

use std::path::PathBuf;

use forgetscope_core::layout::ModelConfig;
use forgetscope_core::stream::{AnalyzeOptions, MetricSet};
use forgetscope_core::{self as core, OpenOptions, RunOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::table_to_dict;
use crate::run::run_detached;

pub(crate) fn metric_set(py: Python<'_>, metrics: &[String]) -> PyResult<MetricSet> {
    let mut m = MetricSet {
        head_drift: false,
        expert_drift: false,
        router_drift: false,
        spectra: false,
    };
    for name in metrics {
        match name.as_str() {
            "weight_drift" => {}
            "head_drift" => m.head_drift = true,
            "expert_drift" => m.expert_drift = true,
            "router_drift" => m.router_drift = true,
            "spectra" | "subspace_overlap" => m.spectra = true,
            other => {
                return Err(crate::errors::to_pyerr(
                    py,
                    core::Error::Config {
                        reason: format!("unknown weight metric {other:?} (weight_drift, head_drift, expert_drift, router_drift, spectra, subspace_overlap)"),
                    },
                ))
            }
        }
    }
    Ok(m)
}

pub(crate) fn load_config(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Option<ModelConfig>> {
    path.map(|p| ModelConfig::from_file(&p))
        .transpose()
        .map_err(|e| crate::errors::to_pyerr(py, e))
}

/// Every weight metric in one pass; returns `(trajectory_columns, {table: columns}, meta_json)`.
#[pyfunction]
#[pyo3(signature = (paths, *, metrics, threads=0, memory_budget=core::stream::DEFAULT_MEMORY_BUDGET, allow_external_symlinks=false, progress=None, chunk_bytes=None, model_config=None, spectra_k=8, spectra_oversample=8, spectra_power_iters=1, spectra_exact_max_dim=512, seed=0, severe_z=3.0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn analyze<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    metrics: Vec<String>,
    threads: usize,
    memory_budget: u64,
    allow_external_symlinks: bool,
    progress: Option<Bound<'py, PyAny>>,
    chunk_bytes: Option<u64>,
    model_config: Option<PathBuf>,
    spectra_k: usize,
    spectra_oversample: usize,
    spectra_power_iters: usize,
    spectra_exact_max_dim: usize,
    seed: u64,
    severe_z: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, String)> {
    let opts = AnalyzeOptions {
        run: RunOptions {
            threads,
            memory_budget,
            open: OpenOptions {
                allow_external_symlinks,
            },
            chunk_bytes,
        },
        metrics: metric_set(py, &metrics)?,
        spectral: core::metrics::spectral::SpectralOptions {
            k: spectra_k,
            oversample: spectra_oversample,
            power_iters: spectra_power_iters,
            exact_max_dim: spectra_exact_max_dim,
            seed,
            ..Default::default()
        },
        severe_z,
        config: load_config(py, model_config)?,
    };
    let report = run_detached(py, progress.as_ref(), move |control| {
        core::stream::analyze(&paths, &opts, control)
    })?;
    let traj = table_to_dict(py, core::table::trajectory_table(&report.trajectory))?;
    let tables = PyDict::new(py);
    for (name, t) in core::table::analysis::analysis_tables(&report) {
        tables.set_item(name, table_to_dict(py, t)?)?;
    }
    Ok((traj, tables.into_any(), report.meta_json()))
}

/// The resolved structure of one checkpoint; returns `(roles_columns, structure_json)`.
#[pyfunction]
#[pyo3(signature = (path, *, model_config=None, allow_external_symlinks=false))]
pub(crate) fn structure<'py>(
    py: Python<'py>,
    path: PathBuf,
    model_config: Option<PathBuf>,
    allow_external_symlinks: bool,
) -> PyResult<(Bound<'py, PyAny>, String)> {
    let config = load_config(py, model_config)?;
    let opts = OpenOptions {
        allow_external_symlinks,
    };
    let (names, st) = run_detached(py, None, move |_| {
        core::stream::analyze::inspect_structure(&path, &opts, config)
    })?;
    let table = core::table::analysis::roles_table(&names, &st);
    Ok((
        table_to_dict(py, table)?,
        serde_json::to_string(&st).unwrap_or_default(),
    ))
}
