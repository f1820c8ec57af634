//! Logical tensors: what the metrics see. A logical tensor is one stored tensor, or a stored tensor
//! plus the companion that gives its codes a meaning:
//!
//! - FP8 (DeepSeek-V3 style): `X` in F8_E4M3/F8_E5M2 with `X_scale_inv` (despite the name the real
//!   value is `code × scale_inv`) shaped `[⌈rows/b⌉, ⌈cols/b⌉]` (b = 128 in DeepSeek-V3), or a
//!   per-tensor / per-row `X_scale` or `X_scale_inv`.
//! - MXFP4 (GPT-OSS): `S_blocks` U8 `[..., G, 16]` and `S_scales` U8 `[..., G]` form `S` with shape
//!   `[..., 32·G]`.
//!
//! Decoding is by element range so a tensor can be cut into chunks anywhere its encoding allows
//! (MXFP4: multiples of 32).

use crate::dtype::{decode_mxfp4, decode_plain, Dtype};

/// Where a stored tensor's bytes are.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Index of the shard in [`crate::Checkpoint::shards`].
    pub shard: u32,
    /// Absolute byte offset in the shard.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: Vec<u64>,
    /// Name as stored.
    pub name: String,
}

/// How FP8 codes are scaled.
#[derive(Debug, Clone)]
pub enum Scale {
    /// One scale for the whole tensor.
    PerTensor(Stored),
    /// One scale per row (shape `[rows]` or `[rows, 1]`).
    PerRow(Stored),
    /// One scale per `block_rows × block_cols` tile, row-major `[⌈rows/br⌉, ⌈cols/bc⌉]`.
    Block {
        /// The scale tensor.
        scale: Stored,
        /// Tile height.
        block_rows: u64,
        /// Tile width.
        block_cols: u64,
    },
}

/// How a logical tensor's bytes become f32 values.
#[derive(Debug, Clone)]
pub enum Encoding {
    /// F16, BF16, F32 or F64.
    Plain,
    /// FP8 codes times a scale.
    Fp8(Scale),
    /// MXFP4 blocks (the data) and E8M0 scales (the companion).
    Mxfp4 {
        /// The `*_scales` tensor.
        scales: Stored,
    },
}

/// A tensor the metrics can decode.
#[derive(Debug, Clone)]
pub struct LogicalTensor {
    /// Logical name (for MXFP4, the stem without `_blocks`).
    pub name: String,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// Element count.
    pub numel: u64,
    /// The main stored tensor (codes or values).
    pub data: Stored,
    /// How to decode it.
    pub encoding: Encoding,
}

impl LogicalTensor {
    /// A short label of the stored format, e.g. `BF16`, `F8_E4M3×block128x128`, `MXFP4`.
    pub fn format(&self) -> String {
        match &self.encoding {
            Encoding::Plain => self.data.dtype.to_string(),
            Encoding::Fp8(Scale::PerTensor(_)) => format!("{}×tensor_scale", self.data.dtype),
            Encoding::Fp8(Scale::PerRow(_)) => format!("{}×row_scale", self.data.dtype),
            Encoding::Fp8(Scale::Block {
                block_rows,
                block_cols,
                ..
            }) => {
                format!("{}×block_scale{block_rows}x{block_cols}", self.data.dtype)
            }
            Encoding::Mxfp4 { .. } => "MXFP4".into(),
        }
    }

    /// Number of columns (last dimension; 1 for a scalar).
    pub fn cols(&self) -> u64 {
        self.shape.last().copied().unwrap_or(1).max(1)
    }

    /// Bytes of stored data per element, as a fraction `num/den`.
    fn bytes_per_elem(&self) -> (u64, u64) {
        match self.encoding {
            Encoding::Mxfp4 { .. } => (1, 2),
            _ => (self.data.dtype.bits() / 8, 1),
        }
    }

    /// Stored bytes per element, rounded up (for budgeting).
    pub fn max_elem_bytes(&self) -> u64 {
        let (n, d) = self.bytes_per_elem();
        n.div_ceil(d)
    }

    /// Element-count granularity a chunk boundary must respect.
    pub fn chunk_align(&self) -> u64 {
        match self.encoding {
            Encoding::Mxfp4 { .. } => 32,
            _ => 1,
        }
    }

    /// Byte range `(absolute offset, len)` of the data for elements `[e0, e1)`.
    pub fn data_range(&self, e0: u64, e1: u64) -> (u64, u64) {
        let (n, d) = self.bytes_per_elem();
        (self.data.offset + e0 * n / d, (e1 - e0) * n / d)
    }

    /// The companion tensor and the element range of it that elements `[e0, e1)` need.
    pub fn aux_range(&self, e0: u64, e1: u64) -> Option<(&Stored, u64, u64)> {
        debug_assert!(e1 > e0);
        let cols = self.cols();
        match &self.encoding {
            Encoding::Plain => None,
            Encoding::Fp8(Scale::PerTensor(s)) => Some((s, 0, 1)),
            Encoding::Fp8(Scale::PerRow(s)) => Some((s, e0 / cols, (e1 - 1) / cols + 1)),
            Encoding::Fp8(Scale::Block {
                scale,
                block_rows,
                block_cols,
            }) => {
                let scols = cols.div_ceil(*block_cols);
                let r0 = e0 / cols / block_rows;
                let r1 = (e1 - 1) / cols / block_rows + 1;
                Some((scale, r0 * scols, r1 * scols))
            }
            Encoding::Mxfp4 { scales } => Some((scales, e0 / 32, e1 / 32)),
        }
    }

    /// Decode elements `[e0, e0 + out.len())`. `data` holds exactly their stored bytes; `aux` holds
    /// the companion elements of [`Self::aux_range`] for the *whole chunk* starting at `aux_e0`,
    /// already decoded to f32 for FP8 scales, or raw E8M0 bytes (as f32 bit-free u8 values in
    /// `aux_u8`) for MXFP4.
    pub fn decode(&self, data: &[u8], e0: u64, aux: &AuxValues<'_>, out: &mut [f32]) {
        match &self.encoding {
            Encoding::Plain => decode_plain(self.data.dtype, data, out),
            Encoding::Fp8(scale) => {
                decode_plain(self.data.dtype, data, out);
                let AuxValues::Scales { values, first } = aux else {
                    unreachable!("fp8 needs decoded scales")
                };
                match scale {
                    Scale::PerTensor(_) => {
                        let s = values[0];
                        out.iter_mut().for_each(|v| *v *= s);
                    }
                    Scale::PerRow(_) => {
                        let cols = self.cols();
                        for_each_run(e0, out, cols, cols, |row, _, run| {
                            let s = values[(row - first) as usize];
                            run.iter_mut().for_each(|v| *v *= s);
                        });
                    }
                    Scale::Block {
                        block_rows,
                        block_cols,
                        ..
                    } => {
                        let cols = self.cols();
                        let scols = cols.div_ceil(*block_cols);
                        for_each_run(e0, out, cols, *block_cols, |row, col, run| {
                            let idx = (row / block_rows) * scols + col / block_cols - first;
                            let s = values[idx as usize];
                            run.iter_mut().for_each(|v| *v *= s);
                        });
                    }
                }
            }
            Encoding::Mxfp4 { .. } => {
                let AuxValues::Bytes { bytes, first } = aux else {
                    unreachable!("mxfp4 needs raw scale bytes")
                };
                let s0 = (e0 / 32 - first) as usize;
                decode_mxfp4(data, &bytes[s0..s0 + out.len() / 32], out);
            }
        }
    }
}

/// Companion values prepared once per chunk.
pub enum AuxValues<'a> {
    /// No companion.
    None,
    /// FP8 scales decoded to f32; `first` is the scale-tensor element index of `values[0]`.
    Scales {
        /// Decoded scales.
        values: &'a [f32],
        /// Element index of `values[0]` in the scale tensor.
        first: u64,
    },
    /// MXFP4 E8M0 bytes; `first` is the scale index of `bytes[0]`.
    Bytes {
        /// Raw scale bytes.
        bytes: &'a [u8],
        /// Index of `bytes[0]` in the scale tensor.
        first: u64,
    },
}

/// Call `f(row, col, run)` for maximal runs of `out` (elements from `e0`) that stay within one row
/// and one `width`-wide column tile.
fn for_each_run(
    e0: u64,
    out: &mut [f32],
    cols: u64,
    width: u64,
    mut f: impl FnMut(u64, u64, &mut [f32]),
) {
    let mut i = 0usize;
    while i < out.len() {
        let abs = e0 + i as u64;
        let row = abs / cols;
        let col = abs % cols;
        let tile_end = ((col / width + 1) * width).min(cols);
        let n = ((tile_end - col) as usize).min(out.len() - i);
        f(row, col, &mut out[i..i + n]);
        i += n;
    }
}
