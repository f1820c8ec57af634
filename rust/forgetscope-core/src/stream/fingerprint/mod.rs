//! Base fingerprint: a compact artefact (`.fsfp`) of a base checkpoint that lets `analyze`-style
//! drift of a candidate be computed when the multi-hundred-GB base is not on the machine.
//!
//! [`fingerprint`] streams the base ONCE and keeps, per tensor: ‖W‖_F² (f64), NaN/Inf counts,
//! row-norm statistics (min / median / max / mean, zero rows), and per *segment* (the whole
//! tensor; a head's row block of q/k/v or column block of o; an expert's gate / up / down slice of
//! a fused tensor) an r-dimensional sign sketch S·vec(W), Σw² and a 64-bit content hash
//! ([`crate::metrics::sketch`]). It also keeps router weights and biases whole (they are small,
//! E×H), and for every 2-D matrix (and fused expert slice) with at most `subspace_max_numel`
//! elements its spectral summary and top-(k+1) singular triplets, computed by the same
//! [`crate::metrics::spectral::spectral_stats`] call and options as `analyze`.
//!
//! [`compare_fingerprint`] streams the candidate once with the same signs and returns an
//! `analyze` report (same tables, same column names) plus per-row `estimated` /
//! `rel_error_bound` / interval columns. **Exact** from the fingerprint (equal to `analyze` up to
//! f64 summation order): base and candidate norms, NaN/Inf counts, per-head and per-expert base
//! norms, router drift (all fields, from the stored router weights), router bias drift, spectra of
//! W₀ and W_t, subspace overlap of the stored matrices, and every drift of a segment whose content
//! hash matches (exactly 0; `frac_unchanged` = 1). **Estimated** with the JL bound of
//! [`crate::metrics::sketch::jl_bound`] (|D̂ − D| ≤ ρ·D with probability ≥ 1 − δ per row): tensor
//! `fro_delta`, `rel_delta`, `one_minus_cos` (from D̂² and the exact norms), `step_drift`,
//! `path_length`; head `drift`, `rel_drift`, `q/k/v/o_delta` (one sketch of the concatenated head
//! slices, kv parts scaled by 1/√g); expert `fro_delta`, `rel_drift`, per-projection drift; layer
//! `rel_drift`, `attn_rel_drift`, `mlp_rel_drift` (one sketch of the layer's concatenation); and
//! what derives from them (head z-scores and severity, layer maxima). **Not available**: spectra of
//! ΔW, QK/OV circuit drift, `frac_unchanged` of changed tensors, `step_cos` (NaN).
//!
//! Cost: one read of each checkpoint; r additions per element (see the sketch module), plus the
//! spectral work of `analyze` on the stored matrices. Size: 8·r bytes per segment, 4·E·H per
//! router, 8·(m+n)·(k+1) per stored matrix, plus the JSON metadata.

mod compare;
mod format;
mod pass;
mod segments;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

pub use compare::{compare_fingerprint, comparison_tables, CompareOptions, Comparison};
pub use format::{read_fingerprint, write_fingerprint, FINGERPRINT_SCHEMA_VERSION};
pub use pass::{RowStats, TensorSketch};
pub use segments::{ColMap, RowMap, Segmentation};

use self::pass::{run_pass, Item};
use self::segments::plan_segments;
use super::budget::Budget;
use super::driver::resolve_threads;
use super::{Control, RunOptions};
use crate::error::{Error, Result};
use crate::layout::{resolve, ModelConfig, Module, Structure, TensorDesc};
use crate::metrics::sketch::{check_dim, SignKeys, DEFAULT_SKETCH_DIM};
use crate::metrics::spectral::{spectral_stats, SpectralOptions, SpectralStats, TopSvd};
use crate::results::analysis::AnalysisSkip;
use crate::source::{open_checkpoint, Checkpoint, Encoding};

/// Default cap on the elements of a matrix whose subspaces are stored (4096 × 4096).
pub const DEFAULT_SUBSPACE_MAX_NUMEL: u64 = 1 << 24;

/// Options of [`fingerprint`].
#[derive(Debug, Clone)]
pub struct FingerprintOptions {
    /// Threads, memory budget, open options.
    pub run: RunOptions,
    /// Sketch dimension r (1..=4096; default 64).
    pub sketch_dim: usize,
    /// Seed of the sign matrices.
    pub seed: u64,
    /// `config.json` to use (default: the one beside the base).
    pub config: Option<PathBuf>,
    /// Store spectra and top-(k+1) singular subspaces of the matrices within the cap.
    pub subspaces: bool,
    /// Spectral options (as `analyze`'s; `par` is set from the thread count).
    pub spectral: SpectralOptions,
    /// Matrices (or fused expert slices) with more elements keep no subspaces.
    pub subspace_max_numel: u64,
}

impl Default for FingerprintOptions {
    fn default() -> Self {
        FingerprintOptions {
            run: RunOptions {
                memory_budget: 2 << 30,
                ..RunOptions::default()
            },
            sketch_dim: DEFAULT_SKETCH_DIM,
            seed: 0,
            config: None,
            subspaces: true,
            spectral: SpectralOptions::default(),
            subspace_max_numel: DEFAULT_SUBSPACE_MAX_NUMEL,
        }
    }
}

/// One shard of the base, for provenance.
#[derive(Debug, Clone, Serialize)]
pub struct ShardPrint {
    /// File name relative to the checkpoint (or the file's name).
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// mix(FNV-1a-64) of the header (length prefix and JSON), hex.
    pub header_hash: String,
}

/// The base checkpoint, as the fingerprint records it.
#[derive(Debug, Clone, Serialize)]
pub struct BaseInfo {
    /// Path as given.
    pub path: String,
    /// `single_file`, `directory` or `sharded`.
    pub layout: String,
    /// Shards.
    pub shards: Vec<ShardPrint>,
    /// Total bytes of the shards.
    pub total_bytes: u64,
    /// Analysable tensors.
    pub n_tensors: usize,
    /// Tensors not analysed (as `inspect` lists them), JSON.
    pub skipped: Value,
    /// Warnings of the open.
    pub warnings: Vec<String>,
}

/// One base tensor in the fingerprint.
#[derive(Debug, Clone)]
pub struct TensorPrint {
    /// Name.
    pub name: String,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// Stored format (e.g. `BF16`).
    pub format: String,
    /// Stored as MXFP4 (orientation of fused experts depends on it).
    pub mxfp4: bool,
    /// Segments.
    pub seg: Segmentation,
    /// Sums and sketches.
    pub sketch: TensorSketch,
}

/// A base tensor kept whole (router weights and biases), decoded f32.
#[derive(Debug, Clone)]
pub struct WholeTensor {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Spectrum and top singular triplets of one base matrix.
#[derive(Debug, Clone)]
pub struct SvdPrint {
    /// `name` or `name[e]` for a fused expert slice.
    pub label: String,
    /// Tensor name.
    pub tensor: String,
    /// Layer.
    pub layer: Option<u32>,
    /// Expert (fused slices).
    pub expert: Option<u32>,
    /// First element of the matrix in the tensor.
    pub e0: u64,
    /// Rows as stored.
    pub rows: usize,
    /// Columns as stored.
    pub cols: usize,
    /// Stored `[in, out]` (left/right spaces swap in the results).
    pub transposed: bool,
    /// `spectral_stats` of W₀ (as stored, before any swap).
    pub stats: SpectralStats,
    /// Its top-(k+1) triplets.
    pub top: TopSvd,
}

/// Spectral options recorded in a fingerprint (the candidate must use the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpectralParams {
    /// k.
    pub k: usize,
    /// Oversampling.
    pub oversample: usize,
    /// Power iterations.
    pub power_iters: usize,
    /// Exact below this min(m, n).
    pub exact_max_dim: usize,
    /// Hutchinson probes.
    pub probes: usize,
    /// Seed.
    pub seed: u64,
}

impl SpectralParams {
    fn of(o: &SpectralOptions) -> Self {
        SpectralParams {
            k: o.k,
            oversample: o.oversample,
            power_iters: o.power_iters,
            exact_max_dim: o.exact_max_dim,
            probes: o.probes,
            seed: o.seed,
        }
    }

    /// Options with these parameters and parallelism `par`.
    pub fn options(&self, par: faer::Par) -> SpectralOptions {
        SpectralOptions {
            k: self.k,
            oversample: self.oversample,
            power_iters: self.power_iters,
            exact_max_dim: self.exact_max_dim,
            probes: self.probes,
            seed: self.seed,
            par,
        }
    }
}

/// A base fingerprint (see the module doc).
#[derive(Debug, Clone)]
pub struct Fingerprint {
    /// [`FINGERPRINT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// forgetscope-core version that wrote it.
    pub core_version: String,
    /// Sketch dimension r.
    pub sketch_dim: usize,
    /// Seed of the sign matrices.
    pub seed: u64,
    /// The base.
    pub base: BaseInfo,
    /// config.json of the base (None without one).
    pub config: Option<Value>,
    /// Spectral options of the stored subspaces.
    pub spectral: SpectralParams,
    /// Cap used for the stored subspaces.
    pub subspace_max_numel: u64,
    /// Every analysable tensor of the base, in file order.
    pub tensors: Vec<TensorPrint>,
    /// Tensors kept whole.
    pub whole: Vec<WholeTensor>,
    /// Stored spectra / subspaces.
    pub svd: Vec<SvdPrint>,
    /// What the fingerprint does not hold, and why.
    pub skipped: Vec<AnalysisSkip>,
    /// Seconds the pass took.
    pub seconds: f64,
}

impl Fingerprint {
    /// The model config (parsed), if the fingerprint has one.
    pub fn model_config(&self) -> Result<Option<ModelConfig>> {
        match &self.config {
            None => Ok(None),
            Some(v) => ModelConfig::from_value(v)
                .map(Some)
                .map_err(|reason| Error::ModelConfig {
                    path: PathBuf::from(&self.base.path).join("config.json"),
                    reason,
                }),
        }
    }

    /// The structure of the base (resolved from the stored tensor list and config).
    pub fn structure(&self) -> Result<Structure> {
        let cfg = self.model_config()?;
        let descs: Vec<TensorDesc<'_>> = self
            .tensors
            .iter()
            .map(|t| TensorDesc {
                name: &t.name,
                shape: &t.shape,
                mxfp4: t.mxfp4,
            })
            .collect();
        Ok(resolve(cfg.as_ref(), &descs))
    }

    /// Total segments.
    pub fn n_segments(&self) -> usize {
        self.tensors.iter().map(|t| t.seg.len()).sum()
    }
}

pub(crate) fn layout_name(c: &Checkpoint) -> &'static str {
    match &c.layout {
        crate::source::Layout::SingleFile => "single_file",
        crate::source::Layout::Directory => "directory",
        crate::source::Layout::Sharded { .. } => "sharded",
    }
}

/// Which tensors are kept whole: router weights and biases of a known structure.
pub(crate) fn keep_whole(st: &Structure, i: usize) -> bool {
    let r = st.roles[i];
    st.is_known()
        && r.layer.is_some()
        && r.expert.is_none()
        && matches!(
            r.module,
            Module::Router | Module::RouterBias | Module::ScoreCorrectionBias
        )
}

/// A matrix whose subspaces may be stored: (label, expert, e0, rows, cols, transposed).
pub(crate) type SvdTarget = (String, Option<u32>, u64, usize, usize, bool);

/// The matrices of tensor `i` that get spectra / subspaces (analyze's choice: every 2-D tensor
/// with ≥ 2 rows and columns, and each expert slice of a fused tensor of a known structure),
/// within `cap` elements.
pub(crate) fn svd_targets(
    name: &str,
    shape: &[u64],
    st: &Structure,
    i: usize,
    cap: u64,
) -> Vec<SvdTarget> {
    let role = st.roles[i];
    match *shape {
        [m, n] if m >= 2 && n >= 2 && m * n <= cap && !role.bias => {
            vec![(name.to_string(), None, 0, m as usize, n as usize, false)]
        }
        [e, a, b] if st.is_known() && !role.bias && a >= 2 && b >= 2 && a * b <= cap => {
            match role.fused {
                Some(layout) => (0..e)
                    .map(|x| {
                        (
                            format!("{name}[{x}]"),
                            Some(x as u32),
                            x * a * b,
                            a as usize,
                            b as usize,
                            layout.transposed,
                        )
                    })
                    .collect(),
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// Hash of a shard's header bytes (provenance: was this fingerprint made from that file?).
fn shard_print(base: &Path, path: &Path, bytes: u64) -> Result<ShardPrint> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut len = [0u8; 8];
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut eat = |buf: &[u8]| {
        for &b in buf {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    };
    if f.read_exact(&mut len).is_ok() {
        eat(&len);
        // The header was validated when the checkpoint was opened (≤ 100 MB).
        let n = u64::from_le_bytes(len).min(crate::source::header::MAX_HEADER_BYTES);
        let mut head = vec![0u8; n as usize];
        if f.read_exact(&mut head).is_ok() {
            eat(&head);
        }
    }
    let file = if base.is_dir() {
        path.strip_prefix(base).unwrap_or(path)
    } else {
        Path::new(path.file_name().unwrap_or(path.as_os_str()))
    };
    Ok(ShardPrint {
        file: file.display().to_string(),
        bytes,
        header_hash: format!("{:016x}", crate::metrics::sketch::mix(h)),
    })
}

/// Find and read the config: the given path, or `config.json` beside the checkpoint.
fn read_config(ckpt: &Checkpoint, given: Option<&Path>) -> Result<Option<Value>> {
    let path = match given {
        Some(p) => Some(p.to_path_buf()),
        None => super::analyze::find_config(ckpt)?.and_then(|c| c.path),
    };
    let Some(path) = path else { return Ok(None) };
    // Validates (size, JSON, fields) with the same rules as analyze.
    ModelConfig::from_file(&path)?;
    let bytes = std::fs::read(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::ModelConfig {
            path,
            reason: format!("not valid JSON: {e}"),
        })
}

/// Build the fingerprint of the checkpoint at `path` (see the module doc).
pub fn fingerprint(
    path: &Path,
    opts: &FingerprintOptions,
    control: &Control,
) -> Result<Fingerprint> {
    check_dim(opts.sketch_dim)?;
    if opts.subspaces && opts.spectral.k == 0 {
        return Err(Error::Config {
            reason: "spectral k must be at least 1".into(),
        });
    }
    let threads = resolve_threads(opts.run.threads);
    let budget = Budget::new(opts.run.memory_budget, 1, threads, opts.run.chunk_bytes)?;
    let ckpt = open_checkpoint(path, &opts.run.open)?;
    let config = read_config(&ckpt, opts.config.as_deref())?;
    let cfg = match &config {
        Some(v) => Some(
            ModelConfig::from_value(v).map_err(|reason| Error::ModelConfig {
                path: path.join("config.json"),
                reason,
            })?,
        ),
        None => None,
    };
    let descs: Vec<TensorDesc<'_>> = ckpt
        .tensors
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            shape: &t.shape,
            mxfp4: matches!(t.encoding, Encoding::Mxfp4 { .. }),
        })
        .collect();
    let st = resolve(cfg.as_ref(), &descs);
    let shapes: Vec<&[u64]> = ckpt.tensors.iter().map(|t| t.shape.as_slice()).collect();
    let plan = plan_segments(&shapes, &st);
    let mut skipped = plan.skipped.clone();

    let half = budget.total / 2;
    let mut targets: Vec<Vec<SvdTarget>> = vec![Vec::new(); ckpt.tensors.len()];
    let mut resident = vec![false; ckpt.tensors.len()];
    for (i, t) in ckpt.tensors.iter().enumerate() {
        let whole = keep_whole(&st, i);
        let tg = if opts.subspaces {
            svd_targets(&t.name, &t.shape, &st, i, opts.subspace_max_numel)
        } else {
            Vec::new()
        };
        if !whole && tg.is_empty() {
            continue;
        }
        let need = t.numel.saturating_mul(4);
        if need > half {
            skipped.push(AnalysisSkip {
                tensor: t.name.clone(),
                metric: if whole { "router_drift" } else { "subspace_overlap" }.into(),
                reason: format!(
                    "needs {need} bytes resident, more than half the memory budget ({} bytes); raise memory_budget",
                    budget.total
                ),
            });
            continue;
        }
        resident[i] = true;
        targets[i] = tg;
    }
    if opts.subspaces {
        let big = ckpt
            .tensors
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                svd_targets(&t.name, &t.shape, &st, *i, u64::MAX).len()
                    > svd_targets(&t.name, &t.shape, &st, *i, opts.subspace_max_numel).len()
            })
            .count();
        if big > 0 {
            skipped.push(AnalysisSkip {
                tensor: format!("{big} tensor(s)"),
                metric: "subspace_overlap".into(),
                reason: format!(
                    "matrices with more than {} elements keep no subspaces (subspace_max_numel)",
                    opts.subspace_max_numel
                ),
            });
        }
    }

    let items: Vec<Item<'_>> = ckpt
        .tensors
        .iter()
        .zip(&plan.segs)
        .enumerate()
        .map(|(i, (t, seg))| {
            Ok(Item {
                tensor: t,
                seg,
                keys: SignKeys::new(opts.seed, &t.name, opts.sketch_dim)?,
                resident: resident[i],
            })
        })
        .collect::<Result<_>>()?;
    let mut so = opts.spectral;
    so.par = faer::Par::rayon(budget.workers.max(1));
    let started = Instant::now();
    let mut whole = Vec::new();
    let mut svd = Vec::new();
    let sketches = crate::pool::with_pool(budget.workers.max(1), "forgetscope-fp", |pool| {
        run_pass(&ckpt, &items, &budget, pool, control, |i, values, _| {
            let t = &ckpt.tensors[i];
            for (label, expert, e0, m, n, transposed) in &targets[i] {
                let a = &values[*e0 as usize..*e0 as usize + m * n];
                // fro2 as analyze passes it (NaN: computed inside), so the results are identical.
                let (stats, top) = spectral_stats(a, *m, *n, f64::NAN, &so)?;
                svd.push(SvdPrint {
                    label: label.clone(),
                    tensor: t.name.clone(),
                    layer: st.roles[i].layer,
                    expert: *expert,
                    e0: *e0,
                    rows: *m,
                    cols: *n,
                    transposed: *transposed,
                    stats,
                    top,
                });
            }
            if keep_whole(&st, i) {
                whole.push(WholeTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    values,
                });
            }
            Ok(())
        })
    })??;
    let tensors = ckpt
        .tensors
        .iter()
        .zip(plan.segs)
        .zip(sketches)
        .map(|((t, seg), sketch)| TensorPrint {
            name: t.name.clone(),
            shape: t.shape.clone(),
            format: t.format(),
            mxfp4: matches!(t.encoding, Encoding::Mxfp4 { .. }),
            seg,
            sketch,
        })
        .collect();
    let shards = ckpt
        .shards
        .iter()
        .map(|s| shard_print(&ckpt.path, &s.path, s.identity.len()))
        .collect::<Result<_>>()?;
    Ok(Fingerprint {
        schema_version: FINGERPRINT_SCHEMA_VERSION,
        core_version: env!("CARGO_PKG_VERSION").to_string(),
        sketch_dim: opts.sketch_dim,
        seed: opts.seed,
        base: BaseInfo {
            path: ckpt.path.display().to_string(),
            layout: layout_name(&ckpt).into(),
            shards,
            total_bytes: ckpt.total_bytes,
            n_tensors: ckpt.tensors.len(),
            skipped: serde_json::to_value(&ckpt.skipped).unwrap_or(Value::Null),
            warnings: ckpt.warnings.clone(),
        },
        config,
        spectral: SpectralParams::of(&opts.spectral),
        subspace_max_numel: opts.subspace_max_numel,
        tensors,
        whole,
        svd,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One row per base tensor of a fingerprint: what it stores about it (exact base statistics).
pub fn fingerprint_table(fp: &Fingerprint) -> crate::table::Table {
    use crate::table::Column;
    let f = |g: &dyn Fn(&TensorPrint) -> f64| Column::F64(fp.tensors.iter().map(g).collect());
    let i = |g: &dyn Fn(&TensorPrint) -> i64| Column::I64(fp.tensors.iter().map(g).collect());
    let norm = |t: &TensorPrint| {
        if t.sketch.n_nan == 0 && t.sketch.n_inf == 0 {
            t.sketch.sq.sqrt()
        } else {
            f64::NAN
        }
    };
    vec![
        (
            "tensor",
            Column::Str(fp.tensors.iter().map(|t| t.name.clone()).collect()),
        ),
        (
            "shape",
            Column::Str(
                fp.tensors
                    .iter()
                    .map(|t| format!("{:?}", t.shape))
                    .collect(),
            ),
        ),
        (
            "format",
            Column::Str(fp.tensors.iter().map(|t| t.format.clone()).collect()),
        ),
        ("numel", i(&|t| t.shape.iter().product::<u64>() as i64)),
        ("n_segments", i(&|t| t.seg.len() as i64)),
        ("base_norm", f(&norm)),
        ("n_nan", i(&|t| t.sketch.n_nan as i64)),
        ("n_inf", i(&|t| t.sketch.n_inf as i64)),
        ("n_rows", i(&|t| t.sketch.rows.n_rows as i64)),
        ("row_norm_min", f(&|t| t.sketch.rows.min)),
        ("row_norm_median", f(&|t| t.sketch.rows.median)),
        ("row_norm_max", f(&|t| t.sketch.rows.max)),
        ("row_norm_mean", f(&|t| t.sketch.rows.mean)),
        ("n_zero_rows", i(&|t| t.sketch.rows.n_zero as i64)),
    ]
}

/// Everything but the per-tensor rows, as JSON.
pub fn fingerprint_meta_json(fp: &Fingerprint) -> String {
    serde_json::json!({
        "schema_version": fp.schema_version,
        "core_version": fp.core_version,
        "sketch_dim": fp.sketch_dim,
        "seed": fp.seed,
        "base": fp.base,
        "config": fp.config,
        "spectral": fp.spectral,
        "subspace_max_numel": fp.subspace_max_numel,
        "n_tensors": fp.tensors.len(),
        "n_segments": fp.n_segments(),
        "whole": fp.whole.iter().map(|w| serde_json::json!({"name": w.name, "shape": w.shape})).collect::<Vec<_>>(),
        "subspaces": fp.svd.iter().map(|s| serde_json::json!({"label": s.label, "rows": s.rows, "cols": s.cols, "method": s.top.method})).collect::<Vec<_>>(),
        "skipped": fp.skipped,
        "seconds": fp.seconds,
    })
    .to_string()
}
