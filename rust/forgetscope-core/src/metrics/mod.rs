//! Stage 3: pure kernels and streaming accumulators (update / merge / finish).

pub mod cka;
pub mod drift;
pub mod experts;
pub mod gradient_interference;
pub mod he;
pub mod heads;
// Public only to the fuzz targets (cargo fuzz sets `--cfg fuzzing`), which check the SIMD paths
// against their scalar definitions; not part of the API.
#[cfg(fuzzing)]
pub mod kernels;
#[cfg(not(fuzzing))]
pub(crate) mod kernels;
pub mod router;
pub mod sketch;
pub mod spectral;
