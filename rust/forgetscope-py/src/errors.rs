//! Core errors → the Python exception tree defined in `forgetscope.exceptions`, carrying `path`
//! and `tensor` attributes where the error has them.

use forgetscope_core::{Error, ErrorKind};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

pub(crate) fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let class = match e.kind() {
        ErrorKind::InvalidInput => "InvalidCheckpointError",
        ErrorKind::UnsafeInput => "UnsafePathError",
        ErrorKind::NotFound => "CheckpointNotFoundError",
        ErrorKind::PermissionDenied => "CheckpointPermissionError",
        ErrorKind::Usage => "UsageError",
        ErrorKind::Cancelled => return PyKeyboardInterrupt::new_err("cancelled"),
        _ => "ForgetscopeError",
    };
    let (path, tensor) = match &e {
        Error::Io { path, .. }
        | Error::NotFound { path, .. }
        | Error::ForeignFormat { path, .. }
        | Error::Header { path, .. }
        | Error::Index { path, .. }
        | Error::UnsafePath { path, .. }
        | Error::NotRegularFile { path, .. }
        | Error::Checkpoint { path, .. }
        | Error::Changed { path, .. } => (Some(path.display().to_string()), None),
        Error::Tensor { path, name, .. }
        | Error::Unsupported { path, name, .. }
        | Error::TensorNotFound { path, name } => {
            (Some(path.display().to_string()), Some(name.clone()))
        }
        _ => (None, None),
    };
    let message = e.to_string();
    let build = || -> PyResult<PyErr> {
        let module = py.import("forgetscope.exceptions")?;
        let cls = module.getattr(class)?;
        let exc = cls.call1((message.clone(),))?;
        exc.setattr("path", path.clone())?;
        exc.setattr("tensor", tensor.clone())?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|_| PyRuntimeError::new_err(message))
}
