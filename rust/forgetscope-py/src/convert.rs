//! Core tables → a dict of 1-D columns (numeric columns move into numpy without a copy).

use forgetscope_core::table::Column;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) fn table_to_dict<'py, N: AsRef<str>>(
    py: Python<'py>,
    table: Vec<(N, Column)>,
) -> PyResult<Bound<'py, PyAny>> {
    let d = PyDict::new(py);
    for (name, col) in table {
        let name = name.as_ref();
        match col {
            Column::F64(v) => d.set_item(name, PyArray1::from_vec(py, v))?,
            Column::I64(v) => d.set_item(name, PyArray1::from_vec(py, v))?,
            Column::Str(v) => d.set_item(name, v)?,
            Column::Bool(v) => d.set_item(name, PyArray1::from_vec(py, v))?,
        }
    }
    Ok(d.into_any())
}
