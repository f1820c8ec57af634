//! forgetscope core: streams safetensors checkpoints far larger than RAM and computes weight metrics.
//!
//! Data flows one way: [`source`] (validated bytes on disk) → [`stream`] (tensors paired across
//! checkpoints, cut into chunks under a memory budget) → [`metrics`] (f64 accumulators) →
//! [`results`] (schema-versioned records). This crate never depends on Python.
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod dtype;
pub mod error;
pub mod layout;
pub mod metrics;
mod pool;
pub mod results;
mod simd;
pub mod source;
pub mod stream;
pub mod table;

pub use error::{Error, ErrorKind, Result};
pub use source::{open_checkpoint, Checkpoint, OpenOptions};
pub use stream::{inspect, read_tensor, trajectory, Control, RunOptions};
