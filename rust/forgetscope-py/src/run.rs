//! Run a core job with the GIL released, re-attaching every 100 ms only to check for Ctrl-C and
//! report progress. On KeyboardInterrupt the job is cancelled (it stops within one chunk per worker)
//! and the interrupt is re-raised once it has stopped.

use std::sync::mpsc;
use std::time::Duration;

use forgetscope_core::{Control, Error};
use pyo3::prelude::*;

use crate::errors::to_pyerr;

const POLL: Duration = Duration::from_millis(100);

fn report(py: Python<'_>, cb: &Py<PyAny>, c: &Control) -> PyResult<()> {
    use std::sync::atomic::Ordering::Relaxed;
    cb.call1(
        py,
        (
            c.done_bytes.load(Relaxed),
            c.total_bytes.load(Relaxed),
            c.done_tensors.load(Relaxed),
            c.total_tensors.load(Relaxed),
        ),
    )?;
    Ok(())
}

pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    job: impl FnOnce(&Control) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let control = Control::new();
    let progress: Option<Py<PyAny>> = progress.map(|p| p.clone().unbind());
    let (outcome, interrupt) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<()>();
            let control = &control;
            let handle = s.spawn(move || {
                let r = job(control);
                let _ = tx.send(());
                r
            });
            let mut interrupt: Option<PyErr> = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(POLL) {
                if interrupt.is_some() {
                    continue;
                }
                Python::attach(|py| {
                    let checked = py.check_signals().and_then(|()| match &progress {
                        Some(cb) => report(py, cb, control),
                        None => Ok(()),
                    });
                    if let Err(e) = checked {
                        control.cancel();
                        interrupt = Some(e);
                    }
                });
            }
            (handle.join(), interrupt)
        })
    });
    let result = match outcome {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    if let Some(e) = interrupt {
        return Err(e);
    }
    if let (Some(cb), Ok(_)) = (&progress, &result) {
        report(py, cb, &control)?;
    }
    result.map_err(|e| to_pyerr(py, e))
}
