//! Stage 3: pure kernels and streaming accumulators (update / merge / finish).

pub mod cka;
pub mod drift;
pub mod experts;
pub mod gradient_interference;
pub mod he;
pub mod heads;
pub(crate) mod kernels;
pub mod router;
pub mod sketch;
pub mod spectral;
