//! One worker's reading machinery: a small cache of open files, page-aligned buffers reused across
//! chunks, and an L1/L2-sized decode scratch. A chunk is read once per checkpoint and handed to the
//! caller as blocks of f32 values, one slice per checkpoint.

use std::fs::File;

use crate::dtype::decode_plain;
use crate::error::Result;
use crate::source::file::{read_aligned, read_exact_at, reopen_same};
use crate::source::{AlignedBuf, AuxValues, Checkpoint, Encoding, LogicalTensor, Scale};

/// Elements decoded at a time (16 KiB of f32 per checkpoint: stays in L1/L2).
pub(crate) const SUB_BLOCK: usize = 4096;

pub(crate) struct ChunkReader {
    files: Vec<(usize, u32, File)>,
    max_files: usize,
    bufs: Vec<AlignedBuf>,
    aux_raw: Vec<Vec<u8>>,
    aux_f32: Vec<Vec<f32>>,
    scratch: Vec<Vec<f32>>,
}

impl ChunkReader {
    pub(crate) fn new(n: usize) -> Self {
        ChunkReader {
            files: Vec::new(),
            max_files: 2 * n + 2,
            bufs: (0..n).map(|_| AlignedBuf::new()).collect(),
            aux_raw: vec![Vec::new(); n],
            aux_f32: vec![Vec::new(); n],
            scratch: vec![vec![0.0; SUB_BLOCK]; n],
        }
    }

    fn file(&mut self, ckpts: &[&Checkpoint], c: usize, shard: u32) -> Result<usize> {
        if let Some(i) = self
            .files
            .iter()
            .position(|(cc, s, _)| *cc == c && *s == shard)
        {
            return Ok(i);
        }
        let sf = &ckpts[c].shards[shard as usize];
        let f = reopen_same(&sf.path, sf.identity)?;
        if self.files.len() >= self.max_files {
            self.files.remove(0);
        }
        self.files.push((c, shard, f));
        Ok(self.files.len() - 1)
    }

    /// Read elements `[e0, e1)` of each `tensors[t]` (and their companions) into the buffers;
    /// returns where each checkpoint's bytes start in its buffer.
    fn read_chunk(
        &mut self,
        ckpts: &[&Checkpoint],
        tensors: &[&LogicalTensor],
        e0: u64,
        e1: u64,
    ) -> Result<Vec<usize>> {
        let n = tensors.len();
        let mut leads = vec![0usize; n];
        for t in 0..n {
            let lt = tensors[t];
            let (off, len) = lt.data_range(e0, e1);
            let fi = self.file(ckpts, t, lt.data.shard)?;
            let sf = &ckpts[t].shards[lt.data.shard as usize];
            leads[t] = read_aligned(
                &self.files[fi].2,
                &sf.path,
                &mut self.bufs[t],
                off,
                len as usize,
                sf.identity.len(),
            )?;
            if let Some((st, a0, a1)) = lt.aux_range(e0, e1) {
                let esz = st.dtype.bits() / 8;
                let fi = self.file(ckpts, t, st.shard)?;
                let raw = &mut self.aux_raw[t];
                raw.resize(((a1 - a0) * esz) as usize, 0);
                let path = &ckpts[t].shards[st.shard as usize].path;
                read_exact_at(&self.files[fi].2, path, raw, st.offset + a0 * esz)?;
                if matches!(lt.encoding, Encoding::Fp8(_)) {
                    let vals = &mut self.aux_f32[t];
                    vals.resize((a1 - a0) as usize, 0.0);
                    decode_plain(st.dtype, raw, vals);
                }
            }
        }
        Ok(leads)
    }

    /// Like [`Self::for_each_block`], but hands over the stored bytes of each sub-block, for
    /// kernels that decode as they go. Sub-blocks are the same, so accumulations agree bit for bit.
    pub(crate) fn for_each_raw_block(
        &mut self,
        ckpts: &[&Checkpoint],
        tensors: &[&LogicalTensor],
        e0: u64,
        e1: u64,
        mut f: impl FnMut(u64, &[&[u8]]),
    ) -> Result<()> {
        let leads = self.read_chunk(ckpts, tensors, e0, e1)?;
        let bufs = &self.bufs;
        let raw = |t: usize, s: u64, m: u64| {
            let (boff, blen) = tensors[t].data_range(s, s + m);
            let (coff, _) = tensors[t].data_range(e0, e1);
            bufs[t].bytes(leads[t] + (boff - coff) as usize, blen as usize)
        };
        let mut s = e0;
        while s < e1 {
            let m = (e1 - s).min(SUB_BLOCK as u64);
            let views: Vec<&[u8]> = (0..tensors.len()).map(|t| raw(t, s, m)).collect();
            f(s, &views);
            s += m;
        }
        Ok(())
    }

    /// Read elements `[e0, e1)` of `tensors[t]` (tensor in checkpoint `t`) and call `f(first, blocks)`
    /// for consecutive sub-blocks, `blocks[t]` holding checkpoint t's decoded values.
    pub(crate) fn for_each_block(
        &mut self,
        ckpts: &[&Checkpoint],
        tensors: &[&LogicalTensor],
        e0: u64,
        e1: u64,
        mut f: impl FnMut(u64, &[&[f32]]),
    ) -> Result<()> {
        let n = tensors.len();
        let leads = self.read_chunk(ckpts, tensors, e0, e1)?;
        let mut s = e0;
        while s < e1 {
            let m = ((e1 - s) as usize).min(SUB_BLOCK);
            for t in 0..n {
                let lt = tensors[t];
                let (boff, blen) = lt.data_range(s, s + m as u64);
                let (coff, _) = lt.data_range(e0, e1);
                let data = self.bufs[t].bytes(leads[t] + (boff - coff) as usize, blen as usize);
                let aux = match (&lt.encoding, lt.aux_range(e0, e1)) {
                    (Encoding::Plain, _) | (_, None) => AuxValues::None,
                    (Encoding::Fp8(scale), Some((_, a0, _))) => {
                        let first = match scale {
                            Scale::PerTensor(_) => 0,
                            _ => a0,
                        };
                        AuxValues::Scales {
                            values: &self.aux_f32[t],
                            first,
                        }
                    }
                    (Encoding::Mxfp4 { .. }, Some((_, a0, _))) => AuxValues::Bytes {
                        bytes: &self.aux_raw[t],
                        first: a0,
                    },
                };
                lt.decode(data, s, &aux, &mut self.scratch[t][..m]);
            }
            let views: Vec<&[f32]> = self.scratch.iter().map(|v| &v[..m]).collect();
            f(s, &views);
            s += m as u64;
        }
        Ok(())
    }
}
