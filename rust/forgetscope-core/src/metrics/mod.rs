//! Stage 3: pure kernels and streaming accumulators (update / merge / finish).

pub mod cka;
pub mod drift;
pub mod he;
pub(crate) mod kernels;
pub mod spectral;
