//! Stage 3: pure kernels and streaming accumulators (update / merge / finish).

pub mod cka;
pub mod drift;
pub mod he;
pub mod router;
pub(crate) mod kernels;
