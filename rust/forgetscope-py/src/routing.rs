//! MoE router drift (METRICS.md §4): numpy float32 in, dicts out. Arrays are borrowed, the GIL is
//! released while the core runs; shapes and defaults are checked in `forgetscope.routing`.

use forgetscope_core::metrics::router::{self, RoutingOptions, RoutingRule};
use forgetscope_core::Error;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;
use crate::metrics::{Held, Matrix};

fn usage(py: Python<'_>, reason: impl Into<String>) -> PyErr {
    to_pyerr(
        py,
        Error::Config {
            reason: reason.into(),
        },
    )
}

/// A held 2-D array as (data, rows, cols), float32 only (the Python layer converts).
fn f32_matrix<'a>(
    py: Python<'_>,
    what: &str,
    h: &'a Held<'_>,
) -> PyResult<(&'a [f32], usize, usize)> {
    match h.matrix()? {
        Matrix::F32(d, r, c) => Ok((d, r, c)),
        Matrix::F64(..) => Err(usage(py, format!("{what} must be float32"))),
    }
}

fn vector<'a>(
    py: Python<'_>,
    what: &str,
    a: &'a Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<Option<&'a [f32]>> {
    a.as_ref()
        .map(|a| {
            a.as_slice()
                .map_err(|_| usage(py, format!("{what} must be C-contiguous")))
        })
        .transpose()
}

fn parse_rule(py: Python<'_>, config_json: &str) -> PyResult<RoutingRule> {
    let v: serde_json::Value = serde_json::from_str(config_json)
        .map_err(|e| usage(py, format!("config is not valid JSON: {e}")))?;
    RoutingRule::from_config(&v).map_err(|e| to_pyerr(py, e))
}

/// The exact routing rule of an HF config (given as JSON text), returned as JSON text.
#[pyfunction]
fn routing_rule(py: Python<'_>, config_json: &str) -> PyResult<String> {
    let rule = parse_rule(py, config_json)?;
    serde_json::to_string(&rule).map_err(|e| usage(py, e.to_string()))
}

/// Data-dependent routing drift (METRICS §4.3) over n tokens; returns a dict of the fields.
#[pyfunction]
#[pyo3(signature = (router_base, router_ckpt, hidden_base, hidden_ckpt, config_json, *, bias_base=None, bias_ckpt=None, shared_gate_base=None, shared_gate_ckpt=None, batch_size=2048, threads=0))]
#[allow(clippy::too_many_arguments)]
fn routing_drift<'py>(
    py: Python<'py>,
    router_base: &Bound<'py, PyAny>,
    router_ckpt: &Bound<'py, PyAny>,
    hidden_base: &Bound<'py, PyAny>,
    hidden_ckpt: Option<&Bound<'py, PyAny>>,
    config_json: &str,
    bias_base: Option<PyReadonlyArray1<'py, f32>>,
    bias_ckpt: Option<PyReadonlyArray1<'py, f32>>,
    shared_gate_base: Option<PyReadonlyArray1<'py, f32>>,
    shared_gate_ckpt: Option<PyReadonlyArray1<'py, f32>>,
    batch_size: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let rule = parse_rule(py, config_json)?;
    let hr0 = Held::from_py(py, router_base, None)?;
    let hrt = Held::from_py(py, router_ckpt, None)?;
    let hh0 = Held::from_py(py, hidden_base, None)?;
    let hht = hidden_ckpt
        .map(|h| Held::from_py(py, h, None))
        .transpose()?;
    let (r0, e, hidden) = f32_matrix(py, "router_base", &hr0)?;
    let (rt, ..) = f32_matrix(py, "router_ckpt", &hrt)?;
    let (h0, n, _) = f32_matrix(py, "hidden_base", &hh0)?;
    let (ht, ..) = match &hht {
        Some(h) => f32_matrix(py, "hidden_ckpt", h)?,
        None => (h0, n, hidden),
    };
    if e != rule.n_experts {
        return Err(usage(
            py,
            format!(
                "the router has {e} rows but the {} config has n_experts = {}",
                rule.family, rule.n_experts
            ),
        ));
    }
    let b0 = vector(py, "bias_base", &bias_base)?;
    let bt = vector(py, "bias_ckpt", &bias_ckpt)?;
    let g0 = vector(py, "shared_gate_base", &shared_gate_base)?;
    let gt = vector(py, "shared_gate_ckpt", &shared_gate_ckpt)?;
    let gate = match (g0, gt) {
        (Some(a), Some(b)) => Some((a, b)),
        (None, None) => None,
        _ => {
            return Err(usage(
                py,
                "give both shared_gate_base and shared_gate_ckpt, or neither",
            ))
        }
    };
    let opts = RoutingOptions {
        batch: batch_size,
        threads,
    };
    let d = py
        .detach(|| router::routing_drift(&rule, r0, b0, rt, bt, h0, ht, n, hidden, gate, &opts))
        .map_err(|e| to_pyerr(py, e))?;
    let out = PyDict::new(py);
    out.set_item("n_tokens", d.n_tokens)?;
    out.set_item("n_nonfinite", d.n_nonfinite)?;
    out.set_item("js_mean", d.js_mean)?;
    out.set_item("js_bernoulli_mean", d.js_bernoulli_mean)?;
    out.set_item("topk_overlap", d.topk_overlap)?;
    out.set_item("jaccard", d.jaccard)?;
    out.set_item("top1_agreement", d.top1_agreement)?;
    out.set_item("weight_l1_mean", d.weight_l1_mean)?;
    out.set_item("load_entropy_base", d.load_entropy_base)?;
    out.set_item("load_entropy_ckpt", d.load_entropy_ckpt)?;
    out.set_item("load_tv", d.load_tv)?;
    out.set_item("max_load_ratio_base", d.max_load_ratio_base)?;
    out.set_item("max_load_ratio_ckpt", d.max_load_ratio_ckpt)?;
    out.set_item("balance_base", d.balance_base)?;
    out.set_item("balance_ckpt", d.balance_ckpt)?;
    out.set_item("shared_gate_drift", d.shared_gate_drift)?;
    out.set_item("load_base", PyArray1::from_vec(py, d.load_base))?;
    out.set_item("load_ckpt", PyArray1::from_vec(py, d.load_ckpt))?;
    out.set_item(
        "rule_json",
        serde_json::to_string(&rule).unwrap_or_default(),
    )?;
    Ok(out)
}

/// Route n tokens through one router; returns (selected [n, k] int64, weights [n, k], log_probs [n, E]).
#[pyfunction]
#[pyo3(signature = (router, hidden, config_json, *, bias=None))]
#[allow(clippy::type_complexity)]
fn route_tokens<'py>(
    py: Python<'py>,
    router: &Bound<'py, PyAny>,
    hidden: &Bound<'py, PyAny>,
    config_json: &str,
    bias: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let rule = parse_rule(py, config_json)?;
    let (hr, hh) = (
        Held::from_py(py, router, None)?,
        Held::from_py(py, hidden, None)?,
    );
    let (r, _, hid) = f32_matrix(py, "router", &hr)?;
    let (h, n, _) = f32_matrix(py, "hidden", &hh)?;
    let b = vector(py, "bias", &bias)?;
    let t = py
        .detach(|| router::route_tokens(&rule, r, b, h, n, hid))
        .map_err(|e| to_pyerr(py, e))?;
    let sel: Vec<i64> = t.selected.iter().map(|&x| x as i64).collect();
    Ok((
        PyArray1::from_vec(py, sel)
            .reshape([n, t.top_k])?
            .into_any(),
        PyArray1::from_vec(py, t.weights)
            .reshape([n, t.top_k])?
            .into_any(),
        PyArray1::from_vec(py, t.log_probs)
            .reshape([n, t.n_experts])?
            .into_any(),
    ))
}

/// Weight-only router drift (METRICS §4.2); per-expert fields come back as float64 arrays.
#[pyfunction]
#[pyo3(signature = (router_base, router_ckpt, *, softmax_invariant=true))]
fn router_weight_drift<'py>(
    py: Python<'py>,
    router_base: &Bound<'py, PyAny>,
    router_ckpt: &Bound<'py, PyAny>,
    softmax_invariant: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (h0, ht) = (
        Held::from_py(py, router_base, None)?,
        Held::from_py(py, router_ckpt, None)?,
    );
    let (r0, e, hidden) = f32_matrix(py, "router_base", &h0)?;
    let (rt, ..) = f32_matrix(py, "router_ckpt", &ht)?;
    let w = py
        .detach(|| router::router_weight_drift(r0, rt, e, hidden, softmax_invariant))
        .map_err(|e| to_pyerr(py, e))?;
    let out = PyDict::new(py);
    let col = |f: fn(&router::ExpertRouterDrift) -> f64| -> Vec<f64> {
        w.per_expert.iter().map(f).collect()
    };
    out.set_item(
        "one_minus_cos",
        PyArray1::from_vec(py, col(|x| x.one_minus_cos)),
    )?;
    out.set_item("norm_drift", PyArray1::from_vec(py, col(|x| x.norm_drift)))?;
    out.set_item("rel_drift", PyArray1::from_vec(py, col(|x| x.rel_drift)))?;
    out.set_item(
        "centered_one_minus_cos",
        PyArray1::from_vec(py, col(|x| x.centered_one_minus_cos)),
    )?;
    out.set_item(
        "centered_rel_drift",
        PyArray1::from_vec(py, col(|x| x.centered_rel_drift)),
    )?;
    out.set_item("rel_drift_max", w.rel_drift_max)?;
    out.set_item("rel_drift_mean", w.rel_drift_mean)?;
    out.set_item("rel_drift_gini", w.rel_drift_gini)?;
    out.set_item("fro_delta", w.fro_delta)?;
    out.set_item("rel_delta", w.rel_delta)?;
    out.set_item("centered_rel_delta", w.centered_rel_delta)?;
    out.set_item("frac_unchanged", w.frac_unchanged)?;
    Ok(out)
}

/// Router-bias drift (GPT-OSS router.bias, DeepSeek-V3 e_score_correction_bias).
#[pyfunction]
fn router_bias_drift<'py>(
    py: Python<'py>,
    bias_base: PyReadonlyArray1<'py, f32>,
    bias_ckpt: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyDict>> {
    let (b0, bt) = (Some(bias_base), Some(bias_ckpt));
    let a = vector(py, "bias_base", &b0)?.unwrap_or_default();
    let b = vector(py, "bias_ckpt", &bt)?.unwrap_or_default();
    let d = router::bias_drift(a, b).map_err(|e| to_pyerr(py, e))?;
    let out = PyDict::new(py);
    out.set_item("l2", d.l2)?;
    out.set_item("max_abs", d.max_abs)?;
    out.set_item("rel", d.rel)?;
    Ok(out)
}

/// Gini coefficient of non-negative values (NaN if empty, any NaN/negative, or all zero).
#[pyfunction]
fn gini(x: Vec<f64>) -> f64 {
    router::gini(&x)
}

/// Add this module's functions to `forgetscope._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(routing_rule, m)?)?;
    m.add_function(wrap_pyfunction!(routing_drift, m)?)?;
    m.add_function(wrap_pyfunction!(route_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(router_weight_drift, m)?)?;
    m.add_function(wrap_pyfunction!(router_bias_drift, m)?)?;
    m.add_function(wrap_pyfunction!(gini, m)?)?;
    Ok(())
}
