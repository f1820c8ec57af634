//! Read a unit's members whole, decoded to f32, one buffer per checkpoint — and feed the drift
//! accumulator on the way, so the read that makes a tensor resident also gives its per-tensor
//! metrics (one read per tensor for every metric). Pieces of a member are read in parallel, each by
//! a worker with its own [`ChunkReader`], and their accumulators merged in piece order.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use super::units::{Member, Unit};
use crate::error::Result;
use crate::metrics::drift::DriftAcc;
use crate::source::Checkpoint;
use crate::stream::plan::chunk_elems;
use crate::stream::reader::{ChunkReader, SUB_BLOCK};
use crate::stream::{Control, Plan};

/// One member, resident: `values[c]` is checkpoint c's `rows × cols` matrix.
pub(crate) struct ResidentMember {
    pub values: Vec<Vec<f32>>,
    pub acc: DriftAcc,
}

/// Read every member of `unit`.
pub(crate) fn read_unit(
    ckpts: &[Checkpoint],
    plan: &Plan,
    unit: &Unit,
    chunk_bytes: u64,
    control: &Control,
) -> Result<Vec<ResidentMember>> {
    unit.members
        .iter()
        .map(|m| read_member(ckpts, plan, m, chunk_bytes, control))
        .collect()
}

fn read_member(
    ckpts: &[Checkpoint],
    plan: &Plan,
    m: &Member,
    chunk_bytes: u64,
    control: &Control,
) -> Result<ResidentMember> {
    let n = ckpts.len();
    let refs: Vec<&Checkpoint> = ckpts.iter().collect();
    let per: Vec<_> = plan.tensors[m.tensor].per_ckpt.iter().collect();
    let len = m.numel() as usize;
    let ce = chunk_elems(&per, chunk_bytes).max(1) as usize;
    let mut values: Vec<Vec<f32>> = (0..n).map(|_| vec![0f32; len]).collect();
    // Piece i gets the i-th `ce`-sized slice of every checkpoint's buffer.
    let mut pieces: Vec<Vec<&mut [f32]>> = Vec::new();
    for buf in values.iter_mut() {
        for (i, s) in buf.chunks_mut(ce).enumerate() {
            if pieces.len() <= i {
                pieces.push(Vec::with_capacity(n));
            }
            pieces[i].push(s);
        }
    }
    let elem_bytes: u64 = per.iter().map(|t| t.max_elem_bytes()).sum();
    let accs: Vec<Result<DriftAcc>> = pieces
        .into_par_iter()
        .enumerate()
        .map_init(
            || ChunkReader::new(n),
            |reader, (i, mut outs)| {
                if control.is_cancelled() {
                    return Err(crate::Error::Cancelled);
                }
                let e0 = m.e0 + (i * ce) as u64;
                let e1 = e0 + outs[0].len() as u64;
                let mut acc = DriftAcc::new(n);
                reader.for_each_block(&refs, &per, e0, e1, |s, w| {
                    let off = (s - e0) as usize;
                    for (out, src) in outs.iter_mut().zip(w) {
                        out[off..off + src.len()].copy_from_slice(src);
                    }
                    acc.update(w);
                })?;
                control
                    .done_bytes
                    .fetch_add((e1 - e0) * elem_bytes, Ordering::Relaxed);
                Ok(acc)
            },
        )
        .collect();
    let mut acc = DriftAcc::new(n);
    for a in accs {
        acc.merge(&a?);
    }
    if m.swap.iter().any(|&s| s) {
        // Bring swapped slices ([cols, rows] as stored) into the base's [rows, cols] order; the
        // element-wise accumulator must then see the aligned values, not the stored order.
        for (c, v) in values.iter_mut().enumerate() {
            if m.swap.get(c).copied().unwrap_or(false) {
                *v = transpose(v, m.cols, m.rows);
            }
        }
        acc = DriftAcc::new(n);
        let mut s = 0;
        while s < len {
            let e = (s + SUB_BLOCK).min(len);
            let views: Vec<&[f32]> = values.iter().map(|v| &v[s..e]).collect();
            acc.update(&views);
            s = e;
        }
    }
    Ok(ResidentMember { values, acc })
}

/// `r × c` row-major → `c × r` row-major.
fn transpose(v: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    // Blocked so both sides stay in cache for large slices.
    const B: usize = 64;
    for i0 in (0..r).step_by(B) {
        for j0 in (0..c).step_by(B) {
            for i in i0..(i0 + B).min(r) {
                for j in j0..(j0 + B).min(c) {
                    out[j * r + i] = v[i * c + j];
                }
            }
        }
    }
    out
}
