//! Pair tensors across checkpoints and cut them into chunks.

use std::collections::HashMap;

use super::budget::Budget;
use crate::results::Mismatch;
use crate::source::{Checkpoint, LogicalTensor};

/// One tensor to stream, present with the same shape in every checkpoint.
#[derive(Debug)]
pub struct PlannedTensor {
    /// Logical name.
    pub name: String,
    /// The tensor in each checkpoint (index 0 = base).
    pub per_ckpt: Vec<LogicalTensor>,
    /// Index of its first chunk in [`Plan::chunks`].
    pub first_chunk: usize,
    /// Number of chunks.
    pub n_chunks: usize,
}

/// An element range of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    /// Index into [`Plan::tensors`].
    pub tensor: usize,
    /// First element.
    pub e0: u64,
    /// One past the last element.
    pub e1: u64,
    /// Stored bytes over all checkpoints (for progress).
    pub bytes: u64,
}

/// What a run will read, in order.
#[derive(Debug)]
pub struct Plan {
    /// Tensors, in base file order.
    pub tensors: Vec<PlannedTensor>,
    /// Chunks, tensor by tensor.
    pub chunks: Vec<Chunk>,
    /// Differences between checkpoints.
    pub mismatches: Vec<Mismatch>,
    /// Stored bytes to read over all checkpoints.
    pub total_bytes: u64,
}

/// Elements per chunk for a tensor: as many as fit `chunk_bytes` in the widest stored format,
/// whole rows when a row fits, and a multiple of every encoding's alignment.
pub(crate) fn chunk_elems(per_ckpt: &[&LogicalTensor], chunk_bytes: u64) -> u64 {
    let max_b = per_ckpt
        .iter()
        .map(|t| t.max_elem_bytes())
        .max()
        .unwrap_or(1)
        .max(1);
    let align = per_ckpt.iter().map(|t| t.chunk_align()).max().unwrap_or(1);
    let cols = per_ckpt[0].cols();
    let fit = (chunk_bytes / max_b).max(align);
    if cols <= fit && cols.is_multiple_of(align) {
        fit / cols * cols
    } else {
        (fit / 4096).max(1) * 4096
    }
}

/// Pair the tensors of `ckpts` (index 0 = base) and chunk them.
pub fn plan_trajectory(ckpts: &[Checkpoint], budget: &Budget) -> Plan {
    let maps: Vec<HashMap<&str, &LogicalTensor>> = ckpts
        .iter()
        .map(|c| c.tensors.iter().map(|t| (t.name.as_str(), t)).collect())
        .collect();
    let skipped: Vec<HashMap<&str, &str>> = ckpts
        .iter()
        .map(|c| {
            c.skipped
                .iter()
                .map(|s| (s.name.as_str(), s.reason.as_str()))
                .collect()
        })
        .collect();
    let mut mismatches = Vec::new();
    let mut tensors = Vec::new();
    let mut chunks = Vec::new();
    let mut total_bytes = 0u64;
    'tensor: for base in &ckpts[0].tensors {
        let mut per = vec![base];
        for (t, map) in maps.iter().enumerate().skip(1) {
            let other = match map.get(base.name.as_str()) {
                Some(o) => *o,
                None => {
                    let (kind, detail) = match skipped[t].get(base.name.as_str()) {
                        Some(reason) => (
                            "skipped",
                            format!("not analysable in checkpoint {t}: {reason}"),
                        ),
                        None => (
                            "missing",
                            format!("present in the base, absent from checkpoint {t}"),
                        ),
                    };
                    mismatches.push(Mismatch {
                        tensor: base.name.clone(),
                        checkpoint: t,
                        kind: kind.into(),
                        detail,
                    });
                    continue 'tensor;
                }
            };
            if other.shape != base.shape {
                let transposed = other.shape.len() >= 2 && {
                    let mut s = other.shape.clone();
                    let l = s.len();
                    s.swap(l - 1, l - 2);
                    s == base.shape
                };
                mismatches.push(Mismatch {
                    tensor: base.name.clone(),
                    checkpoint: t,
                    kind: "shape".into(),
                    detail: format!(
                        "shape {:?} in checkpoint {t} vs {:?} in the base{}; not compared",
                        other.shape,
                        base.shape,
                        if transposed {
                            " (the last two dimensions are swapped: a transposed layout?)"
                        } else {
                            ""
                        }
                    ),
                });
                continue 'tensor;
            }
            if other.format() != base.format() {
                mismatches.push(Mismatch {
                    tensor: base.name.clone(),
                    checkpoint: t,
                    kind: "dtype".into(),
                    detail: format!(
                        "stored as {} in checkpoint {t} vs {} in the base; compared after decoding both to f32{}",
                        other.format(),
                        base.format(),
                        if crate::layout::is_fused_expert_weight(&base.name)
                            && (other.format() == "MXFP4") != (base.format() == "MXFP4")
                        {
                            " in storage order (a re-save of MXFP4 experts may be transposed: `analyze`, which reads config.json, compares them expert by expert in the right orientation)"
                        } else {
                            ""
                        }
                    ),
                });
            }
            per.push(other);
        }
        let ce = chunk_elems(&per, budget.chunk_bytes);
        let first_chunk = chunks.len();
        let idx = tensors.len();
        let mut e0 = 0;
        while e0 < base.numel {
            let e1 = (e0 + ce).min(base.numel);
            let bytes = per.iter().map(|t| t.data_range(e0, e1).1).sum();
            total_bytes += bytes;
            chunks.push(Chunk {
                tensor: idx,
                e0,
                e1,
                bytes,
            });
            e0 = e1;
        }
        tensors.push(PlannedTensor {
            name: base.name.clone(),
            per_ckpt: per.into_iter().cloned().collect(),
            first_chunk,
            n_chunks: chunks.len() - first_chunk,
        });
    }
    for (t, c) in ckpts.iter().enumerate().skip(1) {
        for other in &c.tensors {
            if !maps[0].contains_key(other.name.as_str()) {
                let (kind, detail) = match skipped[0].get(other.name.as_str()) {
                    Some(reason) => ("skipped", format!("not analysable in the base: {reason}")),
                    None => (
                        "extra",
                        format!("present in checkpoint {t}, absent from the base"),
                    ),
                };
                mismatches.push(Mismatch {
                    tensor: other.name.clone(),
                    checkpoint: t,
                    kind: kind.into(),
                    detail,
                });
            }
        }
    }
    Plan {
        tensors,
        chunks,
        mismatches,
        total_bytes,
    }
}
