//! One pass over ONE checkpoint: per tensor, Σw² (f64), NaN/Inf counts, per-row norms, and per
//! segment the sign sketch, Σw² and the content hash ([`crate::metrics::sketch`]).
//!
//! Streaming tensors are cut into chunks exactly as `trajectory` cuts them and pulled in file order
//! by `workers` threads, each with its own [`ChunkReader`]; a chunk's partial sums are kept until
//! its tensor is complete and then merged in chunk order (results do not depend on the thread
//! count). Tensors wanted whole ("resident": routers, matrices whose subspaces are kept) are read
//! one at a time into memory by a reader thread — their partial sums computed on the way, with the
//! same chunk boundaries — while the caller's callback works on the previous one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;
use serde::Serialize;

use super::segments::{ColMap, Segmentation};
use crate::error::{Error, Result};
use crate::metrics::sketch::{hash_and_sq, sketch_update, sum_sq, SignKeys};
use crate::source::{Checkpoint, LogicalTensor};
use crate::stream::budget::Budget;
use crate::stream::plan::chunk_elems;
use crate::stream::reader::ChunkReader;
use crate::stream::Control;

/// Statistics of the Euclidean norms of the rows of the view `[numel/cols, cols]` (for 3-D fused
/// tensors `[E, a, b]`: the E·a rows of length b; a 1-D tensor is one row).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RowStats {
    /// Rows.
    pub n_rows: u64,
    /// Smallest row norm (NaN without rows or with a non-finite value).
    pub min: f64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Rows whose elements are all zero.
    pub n_zero: u64,
}

/// Everything the pass computes for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSketch {
    /// Σw² in f64 (NaN/Inf when the tensor has such values).
    pub sq: f64,
    /// NaN elements.
    pub n_nan: u64,
    /// ±Inf elements.
    pub n_inf: u64,
    /// Unscaled sketches, segment-major: segment s is `sketch[s·r..(s+1)·r]`.
    pub sketch: Vec<f64>,
    /// Σw² per segment.
    pub seg_sq: Vec<f64>,
    /// Content hash per segment.
    pub seg_hash: Vec<u64>,
    /// Row-norm statistics.
    pub rows: RowStats,
}

/// One tensor to sketch.
pub(crate) struct Item<'a> {
    pub tensor: &'a LogicalTensor,
    pub seg: &'a Segmentation,
    pub keys: SignKeys,
    /// Read whole and handed to the callback.
    pub resident: bool,
}

/// Sums of one chunk: the segments it touches (sparse) and the rows it touches.
struct Partial {
    sq: f64,
    nan: u64,
    inf: u64,
    first_row: u64,
    row_sq: Vec<f64>,
    /// Segment id → slot in `segs`, u32::MAX when untouched.
    slot_of: Vec<u32>,
    /// (segment, Σw², hash) per touched segment.
    segs: Vec<(u32, f64, u64)>,
    /// r values per touched segment.
    sketch: Vec<f64>,
}

impl Partial {
    fn new(n_seg: usize, first_row: u64) -> Self {
        Partial {
            sq: 0.0,
            nan: 0,
            inf: 0,
            first_row,
            row_sq: Vec::new(),
            slot_of: vec![u32::MAX; n_seg],
            segs: Vec::new(),
            sketch: Vec::new(),
        }
    }

    fn slot(&mut self, seg: usize, r: usize) -> usize {
        let s = self.slot_of[seg];
        if s != u32::MAX {
            return s as usize;
        }
        let s = self.segs.len();
        self.slot_of[seg] = s as u32;
        self.segs.push((seg as u32, 0.0, 0));
        self.sketch.resize(self.sketch.len() + r, 0.0);
        s
    }

    /// Add elements `[first, first + vals.len())` of the tensor.
    fn add(&mut self, item: &Item<'_>, first: u64, vals: &[f32]) {
        let seg = item.seg;
        let r = item.keys.dim();
        let cols = seg.cols;
        let end = first + vals.len() as u64;
        let mut block_sq = 0.0;
        let mut pos = first;
        while pos < end {
            let row = pos / cols;
            let re = end.min((row + 1) * cols);
            let part = &vals[(pos - first) as usize..(re - first) as usize];
            let sq = sum_sq(part);
            let i = (row - self.first_row) as usize;
            if self.row_sq.len() <= i {
                self.row_sq.resize(i + 1, 0.0);
            }
            self.row_sq[i] += sq;
            block_sq += sq;
            pos = re;
        }
        if !block_sq.is_finite() {
            for &x in vals {
                self.nan += u64::from(x.is_nan());
                self.inf += u64::from(x.is_infinite());
            }
        }
        self.sq += block_sq;
        let n_col = u64::from(seg.n_col);
        let whole_rows = matches!(seg.col, ColMap::All);
        let mut pos = first;
        while pos < end {
            let (row, c) = (pos / cols, pos % cols);
            let (rs, next_row) = seg.row_seg(row);
            let (cs, next_c) = seg.col_seg(c);
            let run_end = if whole_rows {
                end.min(next_row.saturating_mul(cols))
            } else {
                end.min(row * cols + next_c)
            };
            let id = (rs * n_col + cs) as usize;
            let s = self.slot(id, r);
            let run = &vals[(pos - first) as usize..(run_end - first) as usize];
            sketch_update(&mut self.sketch[s * r..(s + 1) * r], &item.keys, pos, run);
            let (h, q) = hash_and_sq(&item.keys, pos, run);
            let e = &mut self.segs[s];
            e.1 += q;
            e.2 = e.2.wrapping_add(h);
            pos = run_end;
        }
    }
}

/// Merged sums of one tensor.
struct TensorAcc {
    sq: f64,
    nan: u64,
    inf: u64,
    r: usize,
    sketch: Vec<f64>,
    seg_sq: Vec<f64>,
    seg_hash: Vec<u64>,
    row_sq: Vec<f64>,
}

impl TensorAcc {
    fn new(item: &Item<'_>) -> Self {
        let n_seg = item.seg.len();
        let r = item.keys.dim();
        let n_rows = (item.tensor.numel / item.seg.cols) as usize;
        TensorAcc {
            sq: 0.0,
            nan: 0,
            inf: 0,
            r,
            sketch: vec![0.0; n_seg * r],
            seg_sq: vec![0.0; n_seg],
            seg_hash: vec![0; n_seg],
            row_sq: vec![0.0; n_rows],
        }
    }

    fn merge(&mut self, p: &Partial) {
        let r = self.r;
        self.sq += p.sq;
        self.nan += p.nan;
        self.inf += p.inf;
        for (k, &(seg, q, h)) in p.segs.iter().enumerate() {
            let s = seg as usize;
            for (a, b) in self.sketch[s * r..(s + 1) * r]
                .iter_mut()
                .zip(&p.sketch[k * r..(k + 1) * r])
            {
                *a += b;
            }
            self.seg_sq[s] += q;
            self.seg_hash[s] = self.seg_hash[s].wrapping_add(h);
        }
        let first = p.first_row as usize;
        for (i, v) in p.row_sq.iter().enumerate() {
            if let Some(slot) = self.row_sq.get_mut(first + i) {
                *slot += v;
            }
        }
    }

    fn finish(self) -> TensorSketch {
        let nan = f64::NAN;
        let n_rows = self.row_sq.len() as u64;
        let finite = self.nan == 0 && self.inf == 0;
        let rows = if n_rows == 0 || !finite {
            RowStats {
                n_rows,
                min: nan,
                median: nan,
                max: nan,
                mean: nan,
                n_zero: self.row_sq.iter().filter(|&&x| x == 0.0).count() as u64,
            }
        } else {
            let mut norms: Vec<f64> = self.row_sq.iter().map(|x| x.sqrt()).collect();
            norms.sort_by(f64::total_cmp);
            let n = norms.len();
            RowStats {
                n_rows,
                min: norms[0],
                median: if n % 2 == 1 {
                    norms[n / 2]
                } else {
                    0.5 * (norms[n / 2 - 1] + norms[n / 2])
                },
                max: norms[n - 1],
                mean: norms.iter().sum::<f64>() / n as f64,
                n_zero: self.row_sq.iter().filter(|&&x| x == 0.0).count() as u64,
            }
        };
        TensorSketch {
            sq: self.sq,
            n_nan: self.nan,
            n_inf: self.inf,
            sketch: self.sketch,
            seg_sq: self.seg_sq,
            seg_hash: self.seg_hash,
            rows,
        }
    }
}

/// Sums of elements `[e0, e1)` of `item`, read with `reader`; decoded values also go to `out`
/// (of length e1 − e0) when given.
fn chunk_partial(
    reader: &mut ChunkReader,
    ckpt: &Checkpoint,
    item: &Item<'_>,
    e0: u64,
    e1: u64,
    mut out: Option<&mut [f32]>,
) -> Result<Partial> {
    let mut p = Partial::new(item.seg.len(), e0 / item.seg.cols);
    reader.for_each_block(&[ckpt], &[item.tensor], e0, e1, |s, w| {
        if let Some(out) = out.as_deref_mut() {
            let off = (s - e0) as usize;
            out[off..off + w[0].len()].copy_from_slice(w[0]);
        }
        p.add(item, s, w[0]);
    })?;
    Ok(p)
}

/// Element ranges of one tensor's chunks (`trajectory`'s chunking for one checkpoint).
fn chunk_ranges(t: &LogicalTensor, chunk_bytes: u64) -> Vec<(u64, u64)> {
    let ce = chunk_elems(&[t], chunk_bytes).max(1);
    let mut out = Vec::new();
    let mut e0 = 0;
    while e0 < t.numel {
        let e1 = (e0 + ce).min(t.numel);
        out.push((e0, e1));
        e0 = e1;
    }
    out
}

/// Read a resident item whole (pieces in parallel on the current rayon pool) with its sums.
fn read_resident(
    ckpt: &Checkpoint,
    item: &Item<'_>,
    chunk_bytes: u64,
    control: &Control,
) -> Result<(Vec<f32>, TensorSketch)> {
    let t = item.tensor;
    let ranges = chunk_ranges(t, chunk_bytes);
    let mut values = vec![0f32; t.numel as usize];
    let mut pieces: Vec<(u64, u64, &mut [f32])> = Vec::with_capacity(ranges.len());
    let mut rest = values.as_mut_slice();
    for &(e0, e1) in &ranges {
        let (head, tail) = rest.split_at_mut((e1 - e0) as usize);
        pieces.push((e0, e1, head));
        rest = tail;
    }
    let eb = t.max_elem_bytes();
    let partials: Vec<Result<Partial>> = pieces
        .into_par_iter()
        .map_init(
            || ChunkReader::new(1),
            |reader, (e0, e1, out)| {
                if control.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let p = chunk_partial(reader, ckpt, item, e0, e1, Some(out))?;
                control
                    .done_bytes
                    .fetch_add((e1 - e0) * eb, Ordering::Relaxed);
                Ok(p)
            },
        )
        .collect();
    let mut acc = TensorAcc::new(item);
    for p in partials {
        acc.merge(&p?);
    }
    Ok((values, acc.finish()))
}

/// Sketch every item of `ckpt`; resident items are handed, whole, to `on_resident(index, values,
/// sums)` (called in item order, on the calling thread inside `pool`).
pub(crate) fn run_pass<F>(
    ckpt: &Checkpoint,
    items: &[Item<'_>],
    budget: &Budget,
    pool: &rayon::ThreadPool,
    control: &Control,
    mut on_resident: F,
) -> Result<Vec<TensorSketch>>
where
    F: FnMut(usize, Vec<f32>, &TensorSketch) -> Result<()> + Send,
{
    let eb = |t: &LogicalTensor| t.max_elem_bytes();
    control
        .total_tensors
        .store(items.len() as u64, Ordering::Relaxed);
    control.total_bytes.store(
        items.iter().map(|i| i.tensor.numel * eb(i.tensor)).sum(),
        Ordering::Relaxed,
    );

    // Phase 1: streaming items, chunk-parallel.
    let mut chunks: Vec<(usize, u64, u64)> = Vec::new();
    let mut first_chunk = vec![0usize; items.len()];
    let mut n_chunks = vec![0usize; items.len()];
    for (i, it) in items.iter().enumerate() {
        if it.resident {
            continue;
        }
        first_chunk[i] = chunks.len();
        for (e0, e1) in chunk_ranges(it.tensor, budget.chunk_bytes) {
            chunks.push((i, e0, e1));
        }
        n_chunks[i] = chunks.len() - first_chunk[i];
    }
    let slots: Vec<Mutex<Option<Partial>>> = (0..chunks.len()).map(|_| Mutex::new(None)).collect();
    let remaining: Vec<AtomicU32> = n_chunks.iter().map(|&n| AtomicU32::new(n as u32)).collect();
    let results: Vec<OnceLock<TensorSketch>> = (0..items.len()).map(|_| OnceLock::new()).collect();
    for (i, it) in items.iter().enumerate() {
        if !it.resident && n_chunks[i] == 0 {
            let _ = results[i].set(TensorAcc::new(it).finish());
            control.done_tensors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    pool.broadcast(|_| {
        let mut reader = ChunkReader::new(1);
        loop {
            if stop.load(Ordering::Relaxed) || control.is_cancelled() {
                return;
            }
            let j = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(i, e0, e1)) = chunks.get(j) else {
                return;
            };
            let item = &items[i];
            match chunk_partial(&mut reader, ckpt, item, e0, e1, None) {
                Ok(p) => {
                    *slots[j].lock().expect("chunk slot") = Some(p);
                    control
                        .done_bytes
                        .fetch_add((e1 - e0) * eb(item.tensor), Ordering::Relaxed);
                    if remaining[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                        // Last chunk of the tensor: merge in chunk order and free the partials.
                        let mut acc = TensorAcc::new(item);
                        for slot in &slots[first_chunk[i]..first_chunk[i] + n_chunks[i]] {
                            if let Some(p) = slot.lock().expect("chunk slot").take() {
                                acc.merge(&p);
                            }
                        }
                        let _ = results[i].set(acc.finish());
                        control.done_tensors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.lock().expect("error slot").get_or_insert(e);
                    return;
                }
            }
        }
    });
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    if control.is_cancelled() {
        return Err(Error::Cancelled);
    }

    // Phase 2: resident items, one at a time, the next one read while the callback runs.
    let resident: Vec<usize> = (0..items.len()).filter(|&i| items[i].resident).collect();
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = sync_channel(1);
        let resident = &resident;
        s.spawn(move || {
            for &i in resident {
                if control.is_cancelled() {
                    return;
                }
                let r =
                    pool.install(|| read_resident(ckpt, &items[i], budget.chunk_bytes, control));
                let failed = r.is_err();
                if tx.send((i, r)).is_err() || failed {
                    return;
                }
            }
        });
        for (i, r) in rx {
            let (values, sk) = r?;
            if control.is_cancelled() {
                return Err(Error::Cancelled);
            }
            pool.install(|| on_resident(i, values, &sk))?;
            let _ = results[i].set(sk);
            control.done_tensors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })?;
    if control.is_cancelled() {
        return Err(Error::Cancelled);
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.into_inner().ok_or_else(|| Error::Config {
                reason: format!("internal: tensor {} was not sketched", items[i].tensor.name),
            })
        })
        .collect()
}
