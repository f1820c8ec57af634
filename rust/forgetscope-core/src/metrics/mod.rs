//! Stage 3: pure kernels and streaming accumulators (update / merge / finish).

pub mod cka;
pub mod drift;
pub mod he;
pub mod spectral;
pub(crate) mod kernels;
