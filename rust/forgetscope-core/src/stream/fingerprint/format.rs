//! The `.fsfp` file: a safetensors file (readable by any safetensors reader) holding
//!
//! - `sketch` F64 `[n_segments, r]` (unscaled S·w of every segment, tensors in file order),
//!   `seg_sq` F64 `[n_segments]` (Σw² per segment), `seg_hash` U64 `[n_segments]`;
//! - `whole/{k}` F32 (router weights and biases, decoded values);
//! - `svd/{k}/u` F64 `[m, k+1]`, `svd/{k}/v` F64 `[n, k+1]`, `svd/{k}/s` F64 `[k+1]` (row-major);
//!
//! and one `__metadata__` entry `forgetscope_fingerprint`: a JSON object with `schema_version`,
//! `sketch_dim`, `seed`, conventions, the base (path, layout, shards with their sizes and header
//! hashes, skipped tensors), `config` (the base's config.json), spectral options, and per tensor
//! its name, shape, format, Σw², NaN/Inf counts, row statistics, segmentation and first segment.
//!
//! Written through a temporary sibling, fsync'd and renamed (a reader never sees half a file).
//! Read with this crate's own header validation ([`crate::source::header::read_header`]); every
//! inconsistency is an [`Error::Checkpoint`] naming the file, so front ends exit with code 3.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use faer::Mat;
use serde_json::{json, Map, Value};

use super::pass::{RowStats, TensorSketch};
use super::segments::{ColMap, RowMap, Segmentation};
use super::{
    BaseInfo, Fingerprint, ShardPrint, SpectralParams, SvdPrint, TensorPrint, WholeTensor,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::metrics::spectral::{SpectralStats, TopSvd};
use crate::results::analysis::AnalysisSkip;
use crate::source::file::{open_regular, read_exact_at};
use crate::source::header::{read_header, RawTensor};

/// Version of the `.fsfp` layout; a reader refuses any other.
pub const FINGERPRINT_SCHEMA_VERSION: u32 = 1;
/// The `__metadata__` key holding the JSON description.
const META_KEY: &str = "forgetscope_fingerprint";
/// The `format` metadata value.
const FORMAT: &str = "forgetscope-fingerprint";

fn f64_json(x: f64) -> Value {
    // JSON has no NaN/Inf: null, read back as NaN.
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn seg_json(s: &Segmentation) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

fn rows_json(r: &RowStats) -> Value {
    json!({
        "n_rows": r.n_rows, "min": f64_json(r.min), "median": f64_json(r.median),
        "max": f64_json(r.max), "mean": f64_json(r.mean), "n_zero": r.n_zero,
    })
}

fn stats_json(s: &SpectralStats) -> Value {
    json!({
        "m": s.m, "n": s.n, "method": s.method, "fro": f64_json(s.fro), "sigma1": f64_json(s.sigma1),
        "stable_rank": f64_json(s.stable_rank), "participation_ratio": f64_json(s.participation_ratio),
        "participation_ratio_rse": f64_json(s.participation_ratio_rse), "erank": f64_json(s.erank),
        "erank2": f64_json(s.erank2), "sigmas": s.sigmas.iter().map(|&x| f64_json(x)).collect::<Vec<_>>(),
    })
}

/// A blob of the data section.
enum Blob<'a> {
    F64(Vec<f64>),
    F64Ref(&'a [f64]),
    U64(Vec<u64>),
    F32(&'a [f32]),
}

impl Blob<'_> {
    fn dtype(&self) -> &'static str {
        match self {
            Blob::F64(_) | Blob::F64Ref(_) => "F64",
            Blob::U64(_) => "U64",
            Blob::F32(_) => "F32",
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Blob::F64(v) => 8 * v.len() as u64,
            Blob::F64Ref(v) => 8 * v.len() as u64,
            Blob::U64(v) => 8 * v.len() as u64,
            Blob::F32(v) => 4 * v.len() as u64,
        }
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        // Little-endian, in blocks so the writer is not called per element.
        let mut buf = Vec::with_capacity(1 << 16);
        let flush = |buf: &mut Vec<u8>, w: &mut dyn Write| -> std::io::Result<()> {
            w.write_all(buf)?;
            buf.clear();
            Ok(())
        };
        macro_rules! put {
            ($v:expr) => {
                for x in $v.iter() {
                    buf.extend_from_slice(&x.to_le_bytes());
                    if buf.len() >= (1 << 16) {
                        flush(&mut buf, w)?;
                    }
                }
            };
        }
        match self {
            Blob::F64(v) => put!(v),
            Blob::F64Ref(v) => put!(v),
            Blob::U64(v) => put!(v),
            Blob::F32(v) => put!(v),
        }
        flush(&mut buf, w)
    }
}

/// Row-major copy of a column-major faer matrix.
fn row_major(m: &Mat<f64>) -> Vec<f64> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// Write `fp` to `out` atomically; returns the file size in bytes.
pub fn write_fingerprint(fp: &Fingerprint, out: &Path) -> Result<u64> {
    let r = fp.sketch_dim;
    let n_seg = fp.n_segments();
    let mut sketch = Vec::with_capacity(n_seg * r);
    let mut seg_sq = Vec::with_capacity(n_seg);
    let mut seg_hash = Vec::with_capacity(n_seg);
    let mut tensors_meta = Vec::with_capacity(fp.tensors.len());
    let mut first = 0usize;
    for t in &fp.tensors {
        sketch.extend_from_slice(&t.sketch.sketch);
        seg_sq.extend_from_slice(&t.sketch.seg_sq);
        seg_hash.extend_from_slice(&t.sketch.seg_hash);
        tensors_meta.push(json!({
            "name": t.name, "shape": t.shape, "format": t.format, "mxfp4": t.mxfp4,
            "sq": f64_json(t.sketch.sq), "n_nan": t.sketch.n_nan, "n_inf": t.sketch.n_inf,
            "rows": rows_json(&t.sketch.rows), "seg": seg_json(&t.seg), "first_seg": first,
        }));
        first += t.seg.len();
    }
    let mut blobs: Vec<(String, Vec<u64>, Blob<'_>)> = vec![
        (
            "sketch".into(),
            vec![n_seg as u64, r as u64],
            Blob::F64(sketch),
        ),
        ("seg_sq".into(), vec![n_seg as u64], Blob::F64(seg_sq)),
        ("seg_hash".into(), vec![n_seg as u64], Blob::U64(seg_hash)),
    ];
    let mut whole_meta = Vec::new();
    for (k, w) in fp.whole.iter().enumerate() {
        whole_meta.push(json!({"name": w.name, "shape": w.shape}));
        blobs.push((format!("whole/{k}"), w.shape.clone(), Blob::F32(&w.values)));
    }
    let mut svd_meta = Vec::new();
    for (k, s) in fp.svd.iter().enumerate() {
        svd_meta.push(json!({
            "label": s.label, "tensor": s.tensor, "layer": s.layer, "expert": s.expert, "e0": s.e0,
            "rows": s.rows, "cols": s.cols, "transposed": s.transposed, "method": s.top.method,
            "stats": stats_json(&s.stats),
        }));
        let kk = s.top.s.len() as u64;
        blobs.push((
            format!("svd/{k}/u"),
            vec![s.top.u.nrows() as u64, s.top.u.ncols() as u64],
            Blob::F64(row_major(&s.top.u)),
        ));
        blobs.push((
            format!("svd/{k}/v"),
            vec![s.top.v.nrows() as u64, s.top.v.ncols() as u64],
            Blob::F64(row_major(&s.top.v)),
        ));
        blobs.push((format!("svd/{k}/s"), vec![kk], Blob::F64Ref(&s.top.s)));
    }
    let meta = json!({
        "schema_version": fp.schema_version,
        "core_version": fp.core_version,
        "sketch_dim": fp.sketch_dim,
        "seed": fp.seed,
        "conventions": {
            "sketch": "unscaled S.vec(W), S_ji = +-1 from splitmix64 bits (metrics::sketch); ||S x||^2 / r estimates ||x||^2",
            "segments": "whole tensor; GQA q/k/v row blocks and q/k/v bias slices per (kv) head, o column blocks per head; MLA q row blocks, kv_b K_nope/V per head, o column blocks; fused experts: gate, up per expert (gate_up), one per expert (down)",
            "seg_hash": "wrapping sum over elements of mix(k_h + i*gamma ^ bits(w_i)*K), -0.0 as +0.0",
            "rows": "norms of the rows of the [numel/cols, cols] view",
        },
        "base": fp.base,
        "config": fp.config,
        "spectral": fp.spectral,
        "subspace_max_numel": fp.subspace_max_numel,
        "skipped": fp.skipped,
        "seconds": fp.seconds,
        "tensors": tensors_meta,
        "whole": whole_meta,
        "svd": svd_meta,
    });

    let mut head = Map::new();
    head.insert(
        "__metadata__".into(),
        json!({"format": FORMAT, META_KEY: meta.to_string()}),
    );
    let mut offset = 0u64;
    for (name, shape, blob) in &blobs {
        let n = blob.bytes();
        head.insert(
            name.clone(),
            json!({"dtype": blob.dtype(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = Value::Object(head).to_string().into_bytes();
    // Align the data section to 8 bytes, as the reference writer does.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fingerprint.fsfp".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{fname}.{}.{nanos}.tmp", std::process::id()));
    let io = |e: std::io::Error, p: &Path| Error::Io {
        path: p.to_path_buf(),
        source: e,
    };
    let result = (|| -> Result<u64> {
        let f = File::create(&tmp).map_err(|e| io(e, &tmp))?;
        let mut w = BufWriter::new(f);
        let mut write = || -> std::io::Result<()> {
            w.write_all(&(text.len() as u64).to_le_bytes())?;
            w.write_all(&text)?;
            for (_, _, b) in &blobs {
                b.write(&mut w)?;
            }
            w.flush()?;
            w.get_ref().sync_all()
        };
        write().map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, out).map_err(|e| io(e, out))?;
        Ok(8 + text.len() as u64 + offset)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reading: every problem is "not a valid forgetscope fingerprint" with the reason.
struct Reader<'a> {
    path: &'a Path,
    file: File,
    tensors: Vec<RawTensor>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("not a valid forgetscope fingerprint: {}", reason.into()),
    }
}

impl Reader<'_> {
    fn raw(&self, name: &str, dtype: Dtype, shape: &[u64]) -> Result<Vec<u8>> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad(self.path, format!("tensor {name:?} is missing")))?;
        if t.dtype != dtype || t.shape != shape {
            return Err(bad(
                self.path,
                format!(
                    "tensor {name:?} is {} {:?}, expected {dtype} {shape:?}",
                    t.dtype, t.shape
                ),
            ));
        }
        let mut buf = vec![0u8; t.len as usize];
        read_exact_at(&self.file, self.path, &mut buf, t.offset)?;
        Ok(buf)
    }

    fn f64s(&self, name: &str, shape: &[u64]) -> Result<Vec<f64>> {
        Ok(self
            .raw(name, Dtype::F64, shape)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn u64s(&self, name: &str, shape: &[u64]) -> Result<Vec<u64>> {
        Ok(self
            .raw(name, Dtype::U64, shape)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn f32s(&self, name: &str, shape: &[u64]) -> Result<Vec<f32>> {
        Ok(self
            .raw(name, Dtype::F32, shape)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}

/// Typed access to the metadata JSON, with errors naming the field.
struct J<'a> {
    path: &'a Path,
}

impl J<'_> {
    fn get<'v>(&self, v: &'v Value, key: &str) -> Result<&'v Value> {
        v.get(key)
            .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is missing")))
    }
    fn u64(&self, v: &Value, key: &str) -> Result<u64> {
        self.get(v, key)?.as_u64().ok_or_else(|| {
            bad(
                self.path,
                format!("metadata field {key:?} is not an unsigned integer"),
            )
        })
    }
    fn usize(&self, v: &Value, key: &str) -> Result<usize> {
        usize::try_from(self.u64(v, key)?)
            .map_err(|_| bad(self.path, format!("metadata field {key:?} is too large")))
    }
    fn f64(&self, v: &Value, key: &str) -> Result<f64> {
        match self.get(v, key)? {
            Value::Null => Ok(f64::NAN),
            x => x
                .as_f64()
                .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is not a number"))),
        }
    }
    fn str<'v>(&self, v: &'v Value, key: &str) -> Result<&'v str> {
        self.get(v, key)?
            .as_str()
            .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is not a string")))
    }
    fn bool(&self, v: &Value, key: &str) -> Result<bool> {
        self.get(v, key)?.as_bool().ok_or_else(|| {
            bad(
                self.path,
                format!("metadata field {key:?} is not a boolean"),
            )
        })
    }
    fn arr<'v>(&self, v: &'v Value, key: &str) -> Result<&'v Vec<Value>> {
        self.get(v, key)?
            .as_array()
            .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is not an array")))
    }
    fn shape(&self, v: &Value, key: &str) -> Result<Vec<u64>> {
        self.arr(v, key)?
            .iter()
            .map(|x| {
                x.as_u64()
                    .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is not a shape")))
            })
            .collect()
    }
    fn opt_u32(&self, v: &Value, key: &str) -> Result<Option<u32>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| bad(self.path, format!("metadata field {key:?} is not an index"))),
        }
    }
}

fn parse_seg(j: &J<'_>, v: &Value) -> Result<Segmentation> {
    let rows = j.get(v, "rows")?;
    let col = j.get(v, "col")?;
    let rows = match j.str(rows, "kind")? {
        "all" => RowMap::All,
        "block" => RowMap::Block {
            size: j.u64(rows, "size")?,
        },
        "split" => RowMap::Split {
            block: j.u64(rows, "block")?,
            at: j.u64(rows, "at")?,
        },
        "parity" => RowMap::Parity {
            block: j.u64(rows, "block")?,
        },
        k => return Err(bad(j.path, format!("unknown row map {k:?}"))),
    };
    let col = match j.str(col, "kind")? {
        "all" => ColMap::All,
        "block" => ColMap::Block {
            size: j.u64(col, "size")?,
        },
        "split" => ColMap::Split {
            at: j.u64(col, "at")?,
        },
        "parity" => ColMap::Parity,
        k => return Err(bad(j.path, format!("unknown column map {k:?}"))),
    };
    let s = Segmentation {
        cols: j.u64(v, "cols")?,
        rows,
        col,
        n_row: j.u64(v, "n_row")? as u32,
        n_col: j.u64(v, "n_col")? as u32,
    };
    let nonzero = |x: u64| x > 0;
    let ok = s.cols > 0
        && s.n_row > 0
        && s.n_col > 0
        && match s.rows {
            RowMap::All => true,
            RowMap::Block { size } => nonzero(size),
            RowMap::Split { block, .. } | RowMap::Parity { block } => nonzero(block),
        }
        && match s.col {
            ColMap::Block { size } => nonzero(size),
            _ => true,
        };
    if !ok {
        return Err(bad(j.path, "a segmentation has a zero size"));
    }
    Ok(s)
}

fn parse_stats(j: &J<'_>, v: &Value) -> Result<SpectralStats> {
    Ok(SpectralStats {
        m: j.usize(v, "m")?,
        n: j.usize(v, "n")?,
        method: method_str(j, j.str(v, "method")?)?,
        fro: j.f64(v, "fro")?,
        sigma1: j.f64(v, "sigma1")?,
        stable_rank: j.f64(v, "stable_rank")?,
        participation_ratio: j.f64(v, "participation_ratio")?,
        participation_ratio_rse: j.f64(v, "participation_ratio_rse")?,
        erank: j.f64(v, "erank")?,
        erank2: j.f64(v, "erank2")?,
        sigmas: j
            .arr(v, "sigmas")?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect(),
    })
}

fn method_str(j: &J<'_>, m: &str) -> Result<&'static str> {
    match m {
        "exact" => Ok("exact"),
        "randomized" => Ok("randomized"),
        "" => Ok(""),
        other => Err(bad(j.path, format!("unknown spectral method {other:?}"))),
    }
}

fn from_row_major(v: &[f64], r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |i, k| v[i * c + k])
}

/// Read and validate a `.fsfp` file.
pub fn read_fingerprint(path: &Path) -> Result<Fingerprint> {
    let (file, id) = open_regular(path)?;
    let header = read_header(&file, path, id)?;
    let text = header
        .metadata
        .iter()
        .find(|(k, _)| k == META_KEY)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| {
            bad(
                path,
                format!("no {META_KEY:?} entry in the safetensors metadata (is it a checkpoint? fingerprints are written by `forgetscope fingerprint`)"),
            )
        })?;
    let meta: Value = serde_json::from_str(&text)
        .map_err(|e| bad(path, format!("the metadata is not valid JSON: {e}")))?;
    let j = J { path };
    let version = j.u64(&meta, "schema_version")?;
    if version != u64::from(FINGERPRINT_SCHEMA_VERSION) {
        return Err(bad(
            path,
            format!(
                "schema version {version}, but this forgetscope reads version {FINGERPRINT_SCHEMA_VERSION}; rebuild it with `forgetscope fingerprint`"
            ),
        ));
    }
    let r = j.usize(&meta, "sketch_dim")?;
    crate::metrics::sketch::check_dim(r)
        .map_err(|_| bad(path, format!("sketch_dim {r} is out of range")))?;
    let rd = Reader {
        path,
        file,
        tensors: header.tensors,
    };
    // The sketch tensor's own shape says its dimension; a mismatch is reported as such.
    if let Some(t) = rd.tensors.iter().find(|t| t.name == "sketch") {
        if t.shape.len() != 2 || t.shape[1] != r as u64 {
            return Err(bad(
                path,
                format!(
                    "sketch dimension mismatch: the metadata says sketch_dim = {r} but the sketch tensor has shape {:?}",
                    t.shape
                ),
            ));
        }
    }
    let tmeta = j.arr(&meta, "tensors")?;
    let mut segs = Vec::with_capacity(tmeta.len());
    let mut n_seg = 0usize;
    for t in tmeta {
        let seg = parse_seg(&j, j.get(t, "seg")?)?;
        if j.usize(t, "first_seg")? != n_seg {
            return Err(bad(path, "segments are not contiguous"));
        }
        n_seg = n_seg
            .checked_add(seg.len())
            .ok_or_else(|| bad(path, "too many segments"))?;
        segs.push(seg);
    }
    let n = n_seg as u64;
    let sketch = rd.f64s("sketch", &[n, r as u64])?;
    let seg_sq = rd.f64s("seg_sq", &[n])?;
    let seg_hash = rd.u64s("seg_hash", &[n])?;
    let mut tensors = Vec::with_capacity(tmeta.len());
    let mut at = 0usize;
    for (t, seg) in tmeta.iter().zip(segs) {
        let shape = j.shape(t, "shape")?;
        let numel = crate::source::header::checked_numel(&shape)
            .ok_or_else(|| bad(path, "a tensor shape overflows"))?;
        let k = seg.len();
        let rows = j.get(t, "rows")?;
        if numel % seg.cols != 0 {
            return Err(bad(path, "a segmentation does not divide its tensor"));
        }
        tensors.push(TensorPrint {
            name: j.str(t, "name")?.to_string(),
            shape,
            format: j.str(t, "format")?.to_string(),
            mxfp4: j.bool(t, "mxfp4")?,
            seg,
            sketch: TensorSketch {
                sq: j.f64(t, "sq")?,
                n_nan: j.u64(t, "n_nan")?,
                n_inf: j.u64(t, "n_inf")?,
                sketch: sketch[at * r..(at + k) * r].to_vec(),
                seg_sq: seg_sq[at..at + k].to_vec(),
                seg_hash: seg_hash[at..at + k].to_vec(),
                rows: RowStats {
                    n_rows: j.u64(rows, "n_rows")?,
                    min: j.f64(rows, "min")?,
                    median: j.f64(rows, "median")?,
                    max: j.f64(rows, "max")?,
                    mean: j.f64(rows, "mean")?,
                    n_zero: j.u64(rows, "n_zero")?,
                },
            },
        });
        at += k;
    }
    let mut whole = Vec::new();
    for (k, w) in j.arr(&meta, "whole")?.iter().enumerate() {
        let shape = j.shape(w, "shape")?;
        whole.push(WholeTensor {
            name: j.str(w, "name")?.to_string(),
            values: rd.f32s(&format!("whole/{k}"), &shape)?,
            shape,
        });
    }
    let mut svd = Vec::new();
    for (k, s) in j.arr(&meta, "svd")?.iter().enumerate() {
        let (rows, cols) = (j.usize(s, "rows")?, j.usize(s, "cols")?);
        let sv = rd
            .tensors
            .iter()
            .find(|t| t.name == format!("svd/{k}/s"))
            .map(|t| t.shape.clone())
            .ok_or_else(|| bad(path, format!("tensor \"svd/{k}/s\" is missing")))?;
        let [kk] = sv[..] else {
            return Err(bad(path, format!("tensor \"svd/{k}/s\" is not 1-D")));
        };
        let kk = kk as usize;
        let u = rd.f64s(&format!("svd/{k}/u"), &[rows as u64, kk as u64])?;
        let v = rd.f64s(&format!("svd/{k}/v"), &[cols as u64, kk as u64])?;
        let sig = rd.f64s(&format!("svd/{k}/s"), &[kk as u64])?;
        let method = method_str(&j, j.str(s, "method")?)?;
        svd.push(SvdPrint {
            label: j.str(s, "label")?.to_string(),
            tensor: j.str(s, "tensor")?.to_string(),
            layer: j.opt_u32(s, "layer")?,
            expert: j.opt_u32(s, "expert")?,
            e0: j.u64(s, "e0")?,
            rows,
            cols,
            transposed: j.bool(s, "transposed")?,
            stats: parse_stats(&j, j.get(s, "stats")?)?,
            top: TopSvd {
                u: from_row_major(&u, rows, kk),
                s: sig,
                v: from_row_major(&v, cols, kk),
                method,
            },
        });
    }
    let base = j.get(&meta, "base")?;
    let shards = j
        .arr(base, "shards")?
        .iter()
        .map(|s| {
            Ok(ShardPrint {
                file: j.str(s, "file")?.to_string(),
                bytes: j.u64(s, "bytes")?,
                header_hash: j.str(s, "header_hash")?.to_string(),
            })
        })
        .collect::<Result<_>>()?;
    let sp = j.get(&meta, "spectral")?;
    let skipped = j
        .arr(&meta, "skipped")?
        .iter()
        .map(|s| {
            Ok(AnalysisSkip {
                tensor: j.str(s, "tensor")?.to_string(),
                metric: j.str(s, "metric")?.to_string(),
                reason: j.str(s, "reason")?.to_string(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Fingerprint {
        schema_version: version as u32,
        core_version: j.str(&meta, "core_version")?.to_string(),
        sketch_dim: r,
        seed: j.u64(&meta, "seed")?,
        base: BaseInfo {
            path: j.str(base, "path")?.to_string(),
            layout: j.str(base, "layout")?.to_string(),
            shards,
            total_bytes: j.u64(base, "total_bytes")?,
            n_tensors: j.usize(base, "n_tensors")?,
            skipped: base.get("skipped").cloned().unwrap_or(Value::Null),
            warnings: j
                .arr(base, "warnings")?
                .iter()
                .map(|w| w.as_str().unwrap_or("").to_string())
                .collect(),
        },
        config: match meta.get("config") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.clone()),
        },
        spectral: SpectralParams {
            k: j.usize(sp, "k")?,
            oversample: j.usize(sp, "oversample")?,
            power_iters: j.usize(sp, "power_iters")?,
            exact_max_dim: j.usize(sp, "exact_max_dim")?,
            probes: j.usize(sp, "probes")?,
            seed: j.u64(sp, "seed")?,
        },
        subspace_max_numel: j.u64(&meta, "subspace_max_numel")?,
        tensors,
        whole,
        svd,
        skipped,
        seconds: j.f64(&meta, "seconds")?,
    })
}
