//! Reading selected rows of a tensor (e.g. a seeded sample of neurons), decoded to f32.

use super::reader::ChunkReader;
use crate::error::{Error, Result};
use crate::source::{Checkpoint, LogicalTensor};

/// A seeded uniform sample of `k` distinct indices out of `0..n`, sorted (all of them when k ≥ n).
///
/// SplitMix64 drives a partial Fisher–Yates shuffle, so the sample depends only on (n, k, seed):
/// every checkpoint of a trajectory gets the same rows.
pub fn sample_indices(n: usize, k: usize, seed: u64) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (next() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut out = idx[..k].to_vec();
    out.sort_unstable();
    out
}

/// Decode rows `rows` (sorted, < rows of the tensor) of a 2-D tensor into a row-major f32 matrix.
/// Runs of consecutive rows are read in one go.
pub(crate) fn read_rows(ckpt: &Checkpoint, t: &LogicalTensor, rows: &[usize]) -> Result<Vec<f32>> {
    if t.shape.len() != 2 {
        return Err(Error::Unsupported {
            path: ckpt.path.clone(),
            name: t.name.clone(),
            reason: format!(
                "row reads need a 2-D tensor, this one has shape {:?}",
                t.shape
            ),
        });
    }
    let cols = t.shape[1] as usize;
    let mut out = vec![0f32; rows.len() * cols];
    let mut reader = ChunkReader::new(1);
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        // Extend the run while rows are consecutive and the run stays below ~4 MiB.
        while j < rows.len() && rows[j] == rows[j - 1] + 1 && (j - i) * cols < (1 << 20) {
            j += 1;
        }
        let e0 = (rows[i] * cols) as u64;
        let e1 = ((rows[j - 1] + 1) * cols) as u64;
        let base = i * cols;
        reader.for_each_block(&[ckpt], &[t], e0, e1, |s, w| {
            let at = base + (s - e0) as usize;
            out[at..at + w[0].len()].copy_from_slice(w[0]);
        })?;
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_seeded_sorted_distinct() {
        let a = sample_indices(1000, 100, 7);
        assert_eq!(a, sample_indices(1000, 100, 7));
        assert_ne!(a, sample_indices(1000, 100, 8));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample_indices(5, 10, 1), vec![0, 1, 2, 3, 4]);
    }
}
