//! numpy in → core kernels → plain values out. Arrays are borrowed (zero-copy) when they are
//! C-contiguous f32/f64; bf16 arrives as a `uint16` view plus `dtype="bfloat16"` and is widened
//! by the core. The GIL is released while a kernel runs.

use forgetscope_core::dtype::bf16_bits_to_f32;
use forgetscope_core::metrics::he::{self, HeOptions, NeuronAxis, PrincipalOptions};
use forgetscope_core::Error;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;

/// A 2-D float matrix as the kernels take it.
pub(crate) enum Matrix<'a> {
    F32(&'a [f32], usize, usize),
    F64(&'a [f64], usize, usize),
}

/// Owned or borrowed storage behind a [`Matrix`].
pub(crate) enum Held<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Widened(Vec<f32>, usize, usize),
}

impl<'py> Held<'py> {
    pub(crate) fn from_py(
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let usage = |reason: String| to_pyerr(py, Error::Config { reason });
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(Held::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f64>>() {
            return Ok(Held::F64(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, u16>>() {
            if dtype != Some("bfloat16") {
                return Err(usage(
                    "a uint16 array is read as bfloat16 bits only with dtype=\"bfloat16\"".into(),
                ));
            }
            let (r, c) = (a.shape()[0], a.shape()[1]);
            let bits = a
                .as_slice()
                .map_err(|_| usage("the bfloat16 array must be C-contiguous".into()))?;
            let mut out = vec![0f32; bits.len()];
            bf16_bits_to_f32(bits, &mut out);
            return Ok(Held::Widened(out, r, c));
        }
        Err(usage(
            "expected a 2-D C-contiguous float32, float64 or (bfloat16 as) uint16 array".into(),
        ))
    }

    pub(crate) fn matrix(&self) -> PyResult<Matrix<'_>> {
        let contiguous = |py: Python<'_>| {
            to_pyerr(
                py,
                Error::Config {
                    reason: "the array must be C-contiguous (use np.ascontiguousarray)".into(),
                },
            )
        };
        Ok(match self {
            Held::F32(a) => {
                let (r, c) = (a.shape()[0], a.shape()[1]);
                Matrix::F32(a.as_slice().map_err(|_| contiguous(a.py()))?, r, c)
            }
            Held::F64(a) => {
                let (r, c) = (a.shape()[0], a.shape()[1]);
                Matrix::F64(a.as_slice().map_err(|_| contiguous(a.py()))?, r, c)
            }
            Held::Widened(v, r, c) => Matrix::F32(v, *r, *c),
        })
    }
}

fn axis(py: Python<'_>, a: &str) -> PyResult<NeuronAxis> {
    match a {
        "rows" => Ok(NeuronAxis::Rows),
        "cols" | "columns" => Ok(NeuronAxis::Cols),
        other => Err(to_pyerr(
            py,
            Error::Config {
                reason: format!("axis must be \"rows\" or \"cols\", not {other:?}"),
            },
        )),
    }
}

/// Hyperspherical energy of the neurons of `w`; returns a dict of the result fields.
#[pyfunction]
#[pyo3(signature = (w, *, axis="rows", half_space=false, eps=he::DEFAULT_EPS, near_dup_cos=he::DEFAULT_NEAR_DUP_COS, near_dup_d2=he::DEFAULT_NEAR_DUP_D2, max_neurons=None, seed=0, threads=0, dtype=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn hyperspherical_energy<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    axis: &str,
    half_space: bool,
    eps: f64,
    near_dup_cos: f64,
    near_dup_d2: f64,
    max_neurons: Option<usize>,
    seed: u64,
    threads: usize,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = HeOptions {
        axis: self::axis(py, axis)?,
        half_space,
        eps,
        near_dup_cos,
        near_dup_d2,
        max_neurons,
        seed,
        threads,
        ..HeOptions::default()
    };
    let held = Held::from_py(py, w, dtype)?;
    let m = held.matrix()?;
    let r = py
        .detach(|| match m {
            Matrix::F32(d, r, c) => he::hyperspherical_energy(d, r, c, &opts),
            Matrix::F64(d, r, c) => he::hyperspherical_energy_f64(d, r, c, &opts),
        })
        .map_err(|e| to_pyerr(py, e))?;
    let d = PyDict::new(py);
    d.set_item("energy_s0", r.energy[0])?;
    d.set_item("energy_s1", r.energy[1])?;
    d.set_item("energy_s2", r.energy[2])?;
    d.set_item("n_neurons", r.n_neurons)?;
    d.set_item("n_total", r.n_total)?;
    d.set_item("n_zero", r.n_zero)?;
    d.set_item("n_nonfinite", r.n_nonfinite)?;
    d.set_item("subsampled", r.subsampled)?;
    d.set_item("dim", r.dim)?;
    d.set_item("n_near_dup", r.n_near_dup)?;
    d.set_item("min_d2", r.min_d2)?;
    d.set_item("frame_potential", r.frame_potential)?;
    d.set_item("half_space", r.half_space)?;
    d.set_item("eps", r.eps)?;
    d.set_item("convention", r.convention)?;
    Ok(d)
}

/// SPHERE principal hyperspherical directions; returns (eigenvalues, rank, directions [dim, rank]).
#[pyfunction]
#[pyo3(signature = (w, *, beta=0.5, axis="rows", threads=0, dtype=None))]
pub(crate) fn principal_directions<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    beta: f64,
    axis: &str,
    threads: usize,
    dtype: Option<&str>,
) -> PyResult<(Bound<'py, PyArray1<f64>>, usize, Bound<'py, PyAny>)> {
    let opts = PrincipalOptions {
        axis: self::axis(py, axis)?,
        beta,
        threads,
        ..PrincipalOptions::default()
    };
    let held = Held::from_py(py, w, dtype)?;
    let m = held.matrix()?;
    let p = py
        .detach(|| match m {
            Matrix::F32(d, r, c) => he::principal_directions_with(d, r, c, &opts),
            Matrix::F64(d, r, c) => he::principal_directions_f64(d, r, c, &opts),
        })
        .map_err(|e| to_pyerr(py, e))?;
    let dirs = PyArray1::from_vec(py, p.directions).reshape([p.dim, p.rank])?;
    Ok((
        PyArray1::from_vec(py, p.eigenvalues),
        p.rank,
        dirs.into_any(),
    ))
}

// ---------------------------------------------------------------------------------------------
// CKA

use forgetscope_core::metrics::cka::{self, MinibatchCka, Rows, StreamingCka};

fn rows<'a>(m: &Matrix<'a>) -> forgetscope_core::Result<Rows<'a>> {
    match *m {
        Matrix::F32(d, r, c) => Rows::f32(d, r, c),
        Matrix::F64(d, r, c) => Rows::f64(d, r, c),
    }
}

/// Convert a pair of arrays, then run `f` on them with the GIL released.
fn with_pair<T: Send>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    dtype: Option<&str>,
    f: impl for<'a> FnOnce(Rows<'a>, Rows<'a>) -> forgetscope_core::Result<T> + Send,
) -> PyResult<T> {
    let (hx, hy) = (Held::from_py(py, x, dtype)?, Held::from_py(py, y, dtype)?);
    let (mx, my) = (hx.matrix()?, hy.matrix()?);
    py.detach(|| f(rows(&mx)?, rows(&my)?))
        .map_err(|e| to_pyerr(py, e))
}

/// Linear CKA of two activation matrices holding the same n examples as rows.
#[pyfunction]
#[pyo3(signature = (x, y, *, debiased=false, form="auto", dtype=None))]
pub(crate) fn linear_cka(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    debiased: bool,
    form: &str,
    dtype: Option<&str>,
) -> PyResult<f64> {
    let f = match form {
        "auto" => cka::linear_cka,
        "feature" => cka::linear_cka_feature,
        "gram" => cka::linear_cka_gram,
        other => {
            return Err(to_pyerr(
                py,
                Error::Config {
                    reason: format!("form must be auto, feature or gram, not {other:?}"),
                },
            ))
        }
    };
    with_pair(py, x, y, dtype, |a, b| f(a, b, debiased))
}

/// RBF-kernel CKA (bandwidth = τ × the median squared distance).
#[pyfunction]
#[pyo3(signature = (x, y, *, tau=0.5, debiased=false, dtype=None))]
pub(crate) fn rbf_cka(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    tau: f64,
    debiased: bool,
    dtype: Option<&str>,
) -> PyResult<f64> {
    with_pair(py, x, y, dtype, |a, b| cka::rbf_cka(a, b, tau, debiased))
}

/// Layer × layer linear CKA; returns a flat row-major vector of len(xs)·len(ys).
#[pyfunction]
#[pyo3(signature = (xs, ys, *, debiased=false, dtype=None))]
pub(crate) fn cka_matrix<'py>(
    py: Python<'py>,
    xs: Vec<Bound<'py, PyAny>>,
    ys: Vec<Bound<'py, PyAny>>,
    debiased: bool,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let hx = xs
        .iter()
        .map(|x| Held::from_py(py, x, dtype))
        .collect::<PyResult<Vec<_>>>()?;
    let hy = ys
        .iter()
        .map(|y| Held::from_py(py, y, dtype))
        .collect::<PyResult<Vec<_>>>()?;
    let mx = hx
        .iter()
        .map(|h| h.matrix())
        .collect::<PyResult<Vec<_>>>()?;
    let my = hy
        .iter()
        .map(|h| h.matrix())
        .collect::<PyResult<Vec<_>>>()?;
    let out = py
        .detach(|| {
            let rx = mx
                .iter()
                .map(rows)
                .collect::<forgetscope_core::Result<Vec<_>>>()?;
            let ry = my
                .iter()
                .map(rows)
                .collect::<forgetscope_core::Result<Vec<_>>>()?;
            cka::cka_matrix(&rx, &ry, debiased)
        })
        .map_err(|e| to_pyerr(py, e))?;
    Ok(PyArray1::from_vec(py, out)
        .reshape([xs.len(), ys.len()])?
        .into_any())
}

/// (‖Σ x̂ᵢ‖² − n)/(n(n − 1)): the mean cosine between distinct rows.
#[pyfunction]
#[pyo3(signature = (x, *, dtype=None))]
pub(crate) fn mean_pairwise_cosine(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: Option<&str>,
) -> PyResult<f64> {
    let h = Held::from_py(py, x, dtype)?;
    let m = h.matrix()?;
    py.detach(|| cka::mean_pairwise_cosine(rows(&m)?))
        .map_err(|e| to_pyerr(py, e))
}

/// (tr C)² / ‖C‖_F² of the centred covariance of the rows.
#[pyfunction]
#[pyo3(signature = (x, *, dtype=None))]
pub(crate) fn covariance_participation_ratio(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: Option<&str>,
) -> PyResult<f64> {
    let h = Held::from_py(py, x, dtype)?;
    let m = h.matrix()?;
    py.detach(|| cka::covariance_participation_ratio(rows(&m)?))
        .map_err(|e| to_pyerr(py, e))
}

/// Exact single-pass CKA (biased and debiased) over batches of paired activations.
#[pyclass(name = "StreamingCKA", module = "forgetscope._core")]
pub(crate) struct PyStreamingCka {
    inner: StreamingCka,
}

#[pymethods]
impl PyStreamingCka {
    #[new]
    fn new(p: usize, q: usize) -> Self {
        PyStreamingCka {
            inner: StreamingCka::new(p, q),
        }
    }

    #[pyo3(signature = (x, y, *, dtype=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let inner = &mut self.inner;
        with_pair(py, x, y, dtype, |a, b| inner.update(a, b))
    }

    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, Self>) -> PyResult<()> {
        self.inner.merge(&other.inner).map_err(|e| to_pyerr(py, e))
    }

    fn biased(&self) -> f64 {
        self.inner.biased()
    }

    fn debiased(&self) -> f64 {
        self.inner.debiased()
    }

    fn participation_ratio_x(&self) -> f64 {
        self.inner.participation_ratio_x()
    }

    fn participation_ratio_y(&self) -> f64 {
        self.inner.participation_ratio_y()
    }

    #[getter]
    fn n(&self) -> u64 {
        self.inner.n()
    }

    #[getter]
    fn dims(&self) -> (usize, usize) {
        self.inner.dims()
    }

    fn reset(&mut self) {
        self.inner.reset()
    }
}

/// Minibatch CKA (Nguyen et al. 2021), each batch's unbiased HSIC weighted so unequal batches are right.
#[pyclass(name = "MinibatchCKA", module = "forgetscope._core")]
pub(crate) struct PyMinibatchCka {
    inner: MinibatchCka,
}

#[pymethods]
impl PyMinibatchCka {
    #[new]
    fn new() -> Self {
        PyMinibatchCka {
            inner: MinibatchCka::new(),
        }
    }

    #[pyo3(signature = (x, y, *, dtype=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let inner = &mut self.inner;
        with_pair(py, x, y, dtype, |a, b| inner.update(a, b))
    }

    fn compute(&self) -> f64 {
        self.inner.compute()
    }

    #[getter]
    fn n_batches(&self) -> usize {
        self.inner.n_batches()
    }

    #[getter]
    fn n_skipped(&self) -> usize {
        self.inner.n_skipped()
    }

    fn reset(&mut self) {
        self.inner.reset()
    }
}
