//! Gradient interference (METRICS.md §5.2): the plan-building, update, merge and finish calls of
//! the core's streaming accumulator. Gradient runs are borrowed zero-copy from C-contiguous numpy
//! float32 / float64 arrays, or uint16 arrays holding bfloat16 / float16 bits; the GIL is released
//! while the core reduces them.

use forgetscope_core::metrics::gradient_interference::{
    Axis, GradSlice, StreamingGradientInterference, Sums,
};
use forgetscope_core::Error;
use numpy::{PyArray1, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_pyerr;

fn usage(py: Python<'_>, reason: impl Into<String>) -> PyErr {
    to_pyerr(
        py,
        Error::Config {
            reason: reason.into(),
        },
    )
}

/// A borrowed gradient run (kept alive while its slice is in use).
enum HeldGrad<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    Bf16(PyReadonlyArrayDyn<'py, u16>),
    F16(PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> HeldGrad<'py> {
    fn from_py(
        py: Python<'py>,
        what: &str,
        obj: &Bound<'py, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, f32>>() {
            return Ok(HeldGrad::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, f64>>() {
            return Ok(HeldGrad::F64(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u16>>() {
            return match dtype {
                Some("bfloat16") => Ok(HeldGrad::Bf16(a)),
                Some("float16") => Ok(HeldGrad::F16(a)),
                _ => Err(usage(
                    py,
                    format!("{what}: a uint16 array is read as bits only with dtype=\"bfloat16\" or \"float16\""),
                )),
            };
        }
        Err(usage(
            py,
            format!("{what}: expected a float32, float64 or (bfloat16 / float16 bits as) uint16 numpy array"),
        ))
    }

    fn slice(&self, py: Python<'_>, what: &str) -> PyResult<GradSlice<'_>> {
        let err = |_| usage(py, format!("{what}: the array must be C-contiguous"));
        Ok(match self {
            HeldGrad::F32(a) => GradSlice::F32(a.as_slice().map_err(err)?),
            HeldGrad::F64(a) => GradSlice::F64(a.as_slice().map_err(err)?),
            HeldGrad::Bf16(a) => GradSlice::Bf16(a.as_slice().map_err(err)?),
            HeldGrad::F16(a) => GradSlice::F16(a.as_slice().map_err(err)?),
        })
    }
}

/// `{"dot", "sq_norm_a", "sq_norm_b", "cos"}` columns of a list of sums.
fn columns<'py>(py: Python<'py>, sums: &[Sums]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let col = |f: fn(&Sums) -> f64| PyArray1::from_iter(py, sums.iter().map(f));
    d.set_item("dot", col(|s| s.dot))?;
    d.set_item("sq_norm_a", col(|s| s.sq_norm_a))?;
    d.set_item("sq_norm_b", col(|s| s.sq_norm_b))?;
    d.set_item("cos", col(|s| s.cos()))?;
    Ok(d)
}

/// Streaming gradient interference (cos(g_A, g_B) per tensor, slice, group and layer).
#[pyclass(name = "StreamingGradientInterference", module = "forgetscope._core")]
pub(crate) struct PyStreamingGradientInterference {
    inner: StreamingGradientInterference,
}

#[pymethods]
impl PyStreamingGradientInterference {
    #[new]
    fn new() -> Self {
        PyStreamingGradientInterference {
            inner: StreamingGradientInterference::new(),
        }
    }

    #[pyo3(signature = (name, rows, cols, layer=-1))]
    fn add_tensor(
        &mut self,
        py: Python<'_>,
        name: String,
        rows: usize,
        cols: usize,
        layer: i64,
    ) -> PyResult<usize> {
        self.inner
            .add_tensor(name, rows, cols, layer)
            .map_err(|e| to_pyerr(py, e))
    }

    fn add_slice(
        &mut self,
        py: Python<'_>,
        tensor: usize,
        axis: &str,
        lo: usize,
        hi: usize,
    ) -> PyResult<usize> {
        let axis = match axis {
            "rows" => Axis::Rows,
            "cols" | "columns" => Axis::Cols,
            other => {
                return Err(usage(
                    py,
                    format!("axis must be \"rows\" or \"cols\", not {other:?}"),
                ))
            }
        };
        self.inner
            .add_slice(tensor, axis, lo, hi)
            .map_err(|e| to_pyerr(py, e))
    }

    fn add_whole(&mut self, py: Python<'_>, tensor: usize) -> PyResult<usize> {
        self.inner.add_whole(tensor).map_err(|e| to_pyerr(py, e))
    }

    fn add_group(
        &mut self,
        py: Python<'_>,
        name: String,
        terms: Vec<(usize, f64)>,
    ) -> PyResult<usize> {
        self.inner
            .add_group(name, &terms)
            .map_err(|e| to_pyerr(py, e))
    }

    /// Add elements `[offset, offset + a.size)` of tensor `tensor` (arrays read flattened).
    #[pyo3(signature = (tensor, a, b, *, offset=0, dtype=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        tensor: usize,
        a: &Bound<'_, PyAny>,
        b: &Bound<'_, PyAny>,
        offset: usize,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let ha = HeldGrad::from_py(py, "g_A", a, dtype)?;
        let hb = HeldGrad::from_py(py, "g_B", b, dtype)?;
        let (sa, sb) = (ha.slice(py, "g_A")?, hb.slice(py, "g_B")?);
        let inner = &mut self.inner;
        py.detach(|| inner.update(tensor, offset, sa, sb))
            .map_err(|e| to_pyerr(py, e))
    }

    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, Self>) -> PyResult<()> {
        self.inner.merge(&other.inner).map_err(|e| to_pyerr(py, e))
    }

    fn empty_copy(&self) -> Self {
        PyStreamingGradientInterference {
            inner: self.inner.empty_copy(),
        }
    }

    fn reset(&mut self) {
        self.inner.reset()
    }

    #[getter]
    fn seen<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_slice(py, self.inner.seen())
    }

    #[getter]
    fn n_tensors(&self) -> usize {
        self.inner.tensors().len()
    }

    #[getter]
    fn n_slices(&self) -> usize {
        self.inner.slices().len()
    }

    #[getter]
    fn n_groups(&self) -> usize {
        self.inner.groups().len()
    }

    /// `{"tensors", "slices", "groups", "layers": column dicts, "overall": dict}`.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.inner.finish().map_err(|e| to_pyerr(py, e))?;
        let d = PyDict::new(py);
        d.set_item("tensors", columns(py, &r.tensors)?)?;
        d.set_item("slices", columns(py, &r.slices)?)?;
        d.set_item("groups", columns(py, &r.groups)?)?;
        let layer_sums: Vec<Sums> = r.layers.iter().map(|l| l.sums).collect();
        let layers = columns(py, &layer_sums)?;
        layers.set_item(
            "layer",
            PyArray1::from_iter(py, r.layers.iter().map(|l| l.layer)),
        )?;
        layers.set_item(
            "numel",
            PyArray1::from_iter(py, r.layers.iter().map(|l| l.numel)),
        )?;
        d.set_item("layers", layers)?;
        let o = PyDict::new(py);
        o.set_item("dot", r.overall.dot)?;
        o.set_item("sq_norm_a", r.overall.sq_norm_a)?;
        o.set_item("sq_norm_b", r.overall.sq_norm_b)?;
        o.set_item("cos", r.overall.cos())?;
        o.set_item("n_params", r.n_params)?;
        o.set_item("n_tensors", r.tensors.len())?;
        d.set_item("overall", o)?;
        Ok(d)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStreamingGradientInterference>()?;
    Ok(())
}
