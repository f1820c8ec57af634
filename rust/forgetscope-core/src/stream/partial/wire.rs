//! The byte form of a partial result. Floats travel as their IEEE bits (NaN payloads, ±Inf and
//! −0 included), so a merged report is bit-identical to a single run; JSON cannot do that (NaN
//! becomes null). Every decoder builds its record with a struct literal, so a field added to a
//! record fails to compile here until it is carried.

use crate::error::{Error, Result};
use crate::metrics::experts::ExpertSums;
use crate::metrics::heads::HeadDrift;
use crate::metrics::router::{BiasDrift, ExpertRouterDrift};
use crate::metrics::spectral::{SpectralStats, SubspaceStats};
use crate::results::analysis::{
    AnalysisSkip, HeadRecord, RouterLayerRecord, RouterRecord, SpectraRecord, SubspaceRecord,
};
use crate::stream::analyze::compute::UnitOut;

fn bad(reason: impl Into<String>) -> Error {
    Error::Config {
        reason: format!(
            "cannot decode a partial result: {} (do all workers run the same forgetscope version?)",
            reason.into()
        ),
    }
}

/// Appends values in a fixed little-endian layout.
#[derive(Default)]
pub(crate) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.usize(v.len());
        self.buf.extend_from_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            Some(x) => {
                self.u8(1);
                self.u64(u64::from(x));
            }
            None => self.u8(0),
        }
    }
    pub fn f64s(&mut self, v: &[f64]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.f64(x));
    }
    pub fn u64s(&mut self, v: &[u64]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.u64(x));
    }
}

/// Reads what [`Writer`] wrote; every read is bounds-checked and every length is checked against
/// the bytes left before anything is allocated.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn done(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(bad(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    pub fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.u64()?).map_err(|_| bad("u32 out of range"))
    }
    /// A count of items each at least `min_item` bytes long, checked against the bytes left.
    pub fn len(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item.max(1) as u64) > left {
            return Err(bad(format!("length {n} exceeds the {left} bytes left")));
        }
        Ok(n as usize)
    }
    pub fn usize(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| bad("index out of range"))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(bad(format!("invalid bool {b}"))),
        }
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(1)?;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("invalid UTF-8"))
    }
    /// One of a fixed set of labels (records keep them as `&'static str`).
    pub fn label(&mut self, allowed: &[&'static str]) -> Result<&'static str> {
        let s = self.str()?;
        allowed
            .iter()
            .find(|a| **a == s)
            .copied()
            .ok_or_else(|| bad(format!("unknown label {s:?}")))
    }
    pub fn opt_u32(&mut self) -> Result<Option<u32>> {
        Ok(if self.bool()? {
            Some(self.u32()?)
        } else {
            None
        })
    }
    pub fn f64s(&mut self) -> Result<Vec<f64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.f64()).collect()
    }
    pub fn u64s(&mut self) -> Result<Vec<u64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.u64()).collect()
    }
    pub fn vec<T>(&mut self, f: impl Fn(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let n = self.len(1)?;
        (0..n).map(|_| f(self)).collect()
    }
}

fn put_head(w: &mut Writer, r: &HeadRecord) {
    w.usize(r.checkpoint);
    w.u64(u64::from(r.layer));
    let d = &r.drift;
    w.usize(d.head);
    w.usize(d.kv_head);
    for x in [
        d.drift2,
        d.base2,
        d.drift,
        d.rel_drift,
        d.q_delta,
        d.k_delta,
        d.v_delta,
        d.o_delta,
        d.qk_circuit_drift,
        d.qk_circuit_rel,
        d.ov_circuit_drift,
        d.ov_circuit_rel,
    ] {
        w.f64(x);
    }
    w.f64(r.z_score);
    w.bool(r.severe);
}

fn get_head(r: &mut Reader) -> Result<HeadRecord> {
    Ok(HeadRecord {
        checkpoint: r.usize()?,
        layer: r.u32()?,
        drift: HeadDrift {
            head: r.usize()?,
            kv_head: r.usize()?,
            drift2: r.f64()?,
            base2: r.f64()?,
            drift: r.f64()?,
            rel_drift: r.f64()?,
            q_delta: r.f64()?,
            k_delta: r.f64()?,
            v_delta: r.f64()?,
            o_delta: r.f64()?,
            qk_circuit_drift: r.f64()?,
            qk_circuit_rel: r.f64()?,
            ov_circuit_drift: r.f64()?,
            ov_circuit_rel: r.f64()?,
        },
        z_score: r.f64()?,
        severe: r.bool()?,
    })
}

fn put_router(w: &mut Writer, r: &RouterRecord) {
    w.usize(r.checkpoint);
    w.u64(u64::from(r.layer));
    let d = &r.drift;
    w.usize(d.expert);
    for x in [
        d.one_minus_cos,
        d.norm_drift,
        d.rel_drift,
        d.centered_one_minus_cos,
        d.centered_rel_drift,
    ] {
        w.f64(x);
    }
}

fn get_router(r: &mut Reader) -> Result<RouterRecord> {
    Ok(RouterRecord {
        checkpoint: r.usize()?,
        layer: r.u32()?,
        drift: ExpertRouterDrift {
            expert: r.usize()?,
            one_minus_cos: r.f64()?,
            norm_drift: r.f64()?,
            rel_drift: r.f64()?,
            centered_one_minus_cos: r.f64()?,
            centered_rel_drift: r.f64()?,
        },
    })
}

fn put_bias(w: &mut Writer, b: &Option<BiasDrift>) {
    match b {
        Some(b) => {
            w.u8(1);
            w.f64(b.l2);
            w.f64(b.max_abs);
            w.f64(b.rel);
        }
        None => w.u8(0),
    }
}

fn get_bias(r: &mut Reader) -> Result<Option<BiasDrift>> {
    Ok(if r.bool()? {
        Some(BiasDrift {
            l2: r.f64()?,
            max_abs: r.f64()?,
            rel: r.f64()?,
        })
    } else {
        None
    })
}

fn put_router_layer(w: &mut Writer, r: &RouterLayerRecord) {
    w.usize(r.checkpoint);
    w.u64(u64::from(r.layer));
    w.f64(r.rel_drift_max);
    w.f64(r.rel_drift_mean);
    w.f64(r.rel_drift_gini);
    put_bias(w, &r.bias);
    put_bias(w, &r.score_correction_bias);
}

fn get_router_layer(r: &mut Reader) -> Result<RouterLayerRecord> {
    Ok(RouterLayerRecord {
        checkpoint: r.usize()?,
        layer: r.u32()?,
        rel_drift_max: r.f64()?,
        rel_drift_mean: r.f64()?,
        rel_drift_gini: r.f64()?,
        bias: get_bias(r)?,
        score_correction_bias: get_bias(r)?,
    })
}

fn put_expert_sums(w: &mut Writer, key: &(usize, u32, u32), s: &ExpertSums) {
    w.usize(key.0);
    w.u64(u64::from(key.1));
    w.u64(u64::from(key.2));
    for i in 0..3 {
        w.f64(s.delta2[i]);
        w.f64(s.base2[i]);
        w.bool(s.seen[i]);
    }
}

fn get_expert_sums(r: &mut Reader) -> Result<((usize, u32, u32), ExpertSums)> {
    let key = (r.usize()?, r.u32()?, r.u32()?);
    let mut s = ExpertSums::default();
    for i in 0..3 {
        s.delta2[i] = r.f64()?;
        s.base2[i] = r.f64()?;
        s.seen[i] = r.bool()?;
    }
    Ok((key, s))
}

const METHODS: &[&str] = &["exact", "randomized"];
const MATRICES: &[&str] = &["weight", "delta"];
const SIDES: &[&str] = &["left", "right"];

fn put_spectra(w: &mut Writer, r: &SpectraRecord) {
    w.str(&r.tensor);
    w.opt_u32(r.layer);
    w.opt_u32(r.expert);
    w.usize(r.checkpoint);
    w.str(r.matrix);
    let s = &r.stats;
    w.usize(s.m);
    w.usize(s.n);
    w.str(s.method);
    for x in [
        s.fro,
        s.sigma1,
        s.stable_rank,
        s.participation_ratio,
        s.participation_ratio_rse,
        s.erank,
        s.erank2,
    ] {
        w.f64(x);
    }
    w.f64s(&s.sigmas);
    w.f64(r.rel_sigma1);
}

fn get_spectra(r: &mut Reader) -> Result<SpectraRecord> {
    Ok(SpectraRecord {
        tensor: r.str()?,
        layer: r.opt_u32()?,
        expert: r.opt_u32()?,
        checkpoint: r.usize()?,
        matrix: r.label(MATRICES)?,
        stats: SpectralStats {
            m: r.usize()?,
            n: r.usize()?,
            method: r.label(METHODS)?,
            fro: r.f64()?,
            sigma1: r.f64()?,
            stable_rank: r.f64()?,
            participation_ratio: r.f64()?,
            participation_ratio_rse: r.f64()?,
            erank: r.f64()?,
            erank2: r.f64()?,
            sigmas: r.f64s()?,
        },
        rel_sigma1: r.f64()?,
    })
}

fn put_subspace(w: &mut Writer, r: &SubspaceRecord) {
    w.str(&r.tensor);
    w.opt_u32(r.layer);
    w.opt_u32(r.expert);
    w.usize(r.checkpoint);
    w.str(r.side);
    let s = &r.stats;
    w.usize(s.k);
    w.usize(s.dim);
    w.f64s(&s.sines);
    for x in [
        s.overlap,
        s.excess_overlap,
        s.projection_distance,
        s.grassmann_distance,
        s.max_angle,
        s.gap_ratio_base,
        s.gap_ratio_ckpt,
    ] {
        w.f64(x);
    }
}

fn get_subspace(r: &mut Reader) -> Result<SubspaceRecord> {
    Ok(SubspaceRecord {
        tensor: r.str()?,
        layer: r.opt_u32()?,
        expert: r.opt_u32()?,
        checkpoint: r.usize()?,
        side: r.label(SIDES)?,
        stats: SubspaceStats {
            k: r.usize()?,
            dim: r.usize()?,
            sines: r.f64s()?,
            overlap: r.f64()?,
            excess_overlap: r.f64()?,
            projection_distance: r.f64()?,
            grassmann_distance: r.f64()?,
            max_angle: r.f64()?,
            gap_ratio_base: r.f64()?,
            gap_ratio_ckpt: r.f64()?,
        },
    })
}

fn put_skip(w: &mut Writer, s: &AnalysisSkip) {
    w.str(&s.tensor);
    w.str(&s.metric);
    w.str(&s.reason);
}

fn get_skip(r: &mut Reader) -> Result<AnalysisSkip> {
    Ok(AnalysisSkip {
        tensor: r.str()?,
        metric: r.str()?,
        reason: r.str()?,
    })
}

pub(crate) fn put_unit_out(w: &mut Writer, o: &UnitOut) {
    w.usize(o.heads.len());
    o.heads.iter().for_each(|x| put_head(w, x));
    w.usize(o.routers.len());
    o.routers.iter().for_each(|x| put_router(w, x));
    w.usize(o.router_layers.len());
    o.router_layers.iter().for_each(|x| put_router_layer(w, x));
    w.usize(o.expert_sums.len());
    o.expert_sums
        .iter()
        .for_each(|(k, s)| put_expert_sums(w, k, s));
    w.usize(o.spectra.len());
    o.spectra.iter().for_each(|x| put_spectra(w, x));
    w.usize(o.subspaces.len());
    o.subspaces.iter().for_each(|x| put_subspace(w, x));
    w.usize(o.skipped.len());
    o.skipped.iter().for_each(|x| put_skip(w, x));
}

pub(crate) fn get_unit_out(r: &mut Reader) -> Result<UnitOut> {
    Ok(UnitOut {
        heads: r.vec(get_head)?,
        routers: r.vec(get_router)?,
        router_layers: r.vec(get_router_layer)?,
        expert_sums: r.vec(get_expert_sums)?,
        spectra: r.vec(get_spectra)?,
        subspaces: r.vec(get_subspace)?,
        skipped: r.vec(get_skip)?,
    })
}
