//! Stage 1: from a path to validated tensors. Nothing here reads tensor data except the small
//! companions needed to validate it; headers are read once per shard and files are closed again,
//! so a checkpoint may have more shards than the open-file limit.

pub mod file;
pub mod header;
pub mod resolve;
pub mod sniff;
pub mod tensor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use file::{AlignedBuf, ShardFile};
pub use resolve::Layout;
pub use tensor::{AuxValues, Encoding, LogicalTensor, Scale, Stored};

use crate::dtype::{Dtype, DtypeClass};
use crate::error::{Error, Result};

/// Options for opening a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Follow symlinks that leave the checkpoint directory (off by default; see [`resolve`]).
    pub allow_external_symlinks: bool,
}

/// A stored tensor the metrics do not analyse, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Name as stored.
    pub name: String,
    /// Stored dtype.
    pub dtype: String,
    /// Stored shape.
    pub shape: Vec<u64>,
    /// Why it is not analysed.
    pub reason: String,
}

/// What a stored tensor is used as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Analysed on its own.
    Tensor,
    /// The scale of an FP8 tensor.
    Fp8Scale,
    /// The scales of an MXFP4 tensor.
    Mxfp4Scales,
    /// The packed codes of an MXFP4 tensor.
    Mxfp4Blocks,
    /// Not analysed (see [`Skipped`]).
    Skipped,
}

/// One stored tensor, as listed by `inspect`.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// The stored tensor.
    pub stored: Stored,
    /// What it is used as.
    pub role: Role,
    /// For companions, the logical tensor they belong to.
    pub of: Option<String>,
}

/// A validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Path as given.
    pub path: PathBuf,
    /// Layout detected.
    pub layout: Layout,
    /// Shard files.
    pub shards: Vec<ShardFile>,
    /// Every stored tensor in (shard, offset) order.
    pub stored: Vec<StoredEntry>,
    /// Analysable tensors in (shard, offset) order.
    pub tensors: Vec<LogicalTensor>,
    /// Tensors listed but not analysed.
    pub skipped: Vec<Skipped>,
    /// `__metadata__` of the first shard, or the index's `metadata`.
    pub metadata: Vec<(String, String)>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
    /// Total size of all shard files.
    pub total_bytes: u64,
}

impl Checkpoint {
    /// Logical tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&LogicalTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Path of a shard.
    pub fn shard_path(&self, shard: u32) -> &Path {
        &self.shards[shard as usize].path
    }
}

/// Resolve, open and validate a checkpoint.
pub fn open_checkpoint(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
    let resolved = resolve::resolve(path, opts.allow_external_symlinks)?;
    let mut shards = Vec::with_capacity(resolved.shards.len());
    let mut stored = Vec::new();
    let mut metadata = resolved.metadata.clone();
    let mut warnings = resolved.warnings.clone();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut total_bytes = 0u64;
    for (i, p) in resolved.shards.iter().enumerate() {
        let (f, id) = file::open_regular(p)?;
        let h = header::read_header(&f, p, id)?;
        drop(f);
        total_bytes += id.len();
        if i == 0 && metadata.is_empty() {
            metadata = h.metadata.clone();
        }
        for t in h.tensors {
            if let Some(&other) = seen.get(&t.name) {
                return Err(Error::tensor(
                    p,
                    &t.name,
                    format!(
                        "also stored in {}; each tensor must live in exactly one shard",
                        resolved.shards[other as usize].display()
                    ),
                ));
            }
            seen.insert(t.name.clone(), i as u32);
            stored.push(Stored {
                shard: i as u32,
                offset: t.offset,
                len: t.len,
                dtype: t.dtype,
                shape: t.shape,
                name: t.name,
            });
        }
        shards.push(ShardFile {
            path: p.clone(),
            identity: id,
        });
    }
    if let Some(map) = &resolved.weight_map {
        let index = match &resolved.layout {
            Layout::Sharded { index } => index.clone(),
            _ => unreachable!("weight_map implies an index"),
        };
        let mut listed = std::collections::HashSet::with_capacity(map.len());
        for (name, shard) in map {
            listed.insert(name.as_str());
            match seen.get(name) {
                None => {
                    return Err(Error::tensor(
                        index,
                        name,
                        format!(
                        "invalid shard index: weight_map puts it in {}, which does not contain it",
                        resolved.shards[*shard as usize].display()
                    ),
                    ))
                }
                Some(s) if s != shard => {
                    return Err(Error::tensor(
                        index,
                        name,
                        format!(
                            "invalid shard index: weight_map puts it in {}, but it is stored in {}",
                            resolved.shards[*shard as usize].display(),
                            resolved.shards[*s as usize].display()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let unlisted = stored
            .iter()
            .filter(|s| !listed.contains(s.name.as_str()))
            .count();
        if unlisted > 0 {
            warnings.push(format!(
                "{unlisted} tensor(s) stored in the shards are missing from the index weight_map; they are analysed anyway"
            ));
        }
    }
    let (entries, tensors, skipped) = build_logical(&shards, stored)?;
    Ok(Checkpoint {
        path: resolved.given,
        layout: resolved.layout,
        shards,
        stored: entries,
        tensors,
        skipped,
        metadata,
        warnings,
        total_bytes,
    })
}

/// Pair FP8 tensors with their scales and MXFP4 blocks with their scales; classify the rest.
fn build_logical(
    shards: &[ShardFile],
    stored: Vec<Stored>,
) -> Result<(Vec<StoredEntry>, Vec<LogicalTensor>, Vec<Skipped>)> {
    let by_name: HashMap<&str, usize> = stored
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut role: Vec<(Role, Option<String>)> = vec![(Role::Tensor, None); stored.len()];
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    let path_of = |s: &Stored| shards[s.shard as usize].path.clone();

    // Companions first, so a scale is never analysed as a tensor of its own.
    let mut fp8_scale: HashMap<usize, usize> = HashMap::new();
    let mut mx_pairs: HashMap<usize, usize> = HashMap::new();
    let mut int_scale: HashMap<usize, usize> = HashMap::new();
    for (i, s) in stored.iter().enumerate() {
        for suffix in ["_scale_inv", "_scale"] {
            if let Some(base) = s.name.strip_suffix(suffix) {
                if let Some(&b) = by_name.get(base) {
                    let bd = stored[b].dtype;
                    if bd.class() == DtypeClass::Integer {
                        // The scale of an integer-quantised weight: listed with it, never analysed.
                        role[i] = (Role::Skipped, Some(base.to_string()));
                        int_scale.insert(b, i);
                    } else if bd.class() == DtypeClass::ScaledFloat8 {
                        if let Some(prev) = fp8_scale.insert(b, i) {
                            return Err(Error::tensor(
                                path_of(&stored[b]),
                                &stored[b].name,
                                format!(
                                    "has two scale companions: {:?} and {:?}",
                                    stored[prev].name, s.name
                                ),
                            ));
                        }
                        role[i] = (Role::Fp8Scale, Some(base.to_string()));
                    }
                }
            }
        }
        if let Some(stem) = s.name.strip_suffix("_blocks") {
            if s.dtype == Dtype::U8 {
                if let Some(&sc) = by_name.get(format!("{stem}_scales").as_str()) {
                    mx_pairs.insert(i, sc);
                    role[i] = (Role::Mxfp4Blocks, Some(stem.to_string()));
                    role[sc] = (Role::Mxfp4Scales, Some(stem.to_string()));
                }
            }
        }
    }

    for (i, s) in stored.iter().enumerate() {
        match role[i].0 {
            Role::Fp8Scale | Role::Mxfp4Scales | Role::Skipped => continue,
            Role::Mxfp4Blocks => {
                let sc = &stored[mx_pairs[&i]];
                let stem = role[i].1.clone().expect("stem recorded");
                tensors.push(mxfp4_tensor(&path_of(s), stem, s, sc)?);
                continue;
            }
            _ => {}
        }
        let skip = |reason: String| Skipped {
            name: s.name.clone(),
            dtype: s.dtype.to_string(),
            shape: s.shape.clone(),
            reason,
        };
        match s.dtype.class() {
            DtypeClass::Float => tensors.push(LogicalTensor {
                name: s.name.clone(),
                shape: s.shape.clone(),
                numel: s.len * 8 / s.dtype.bits(),
                data: s.clone(),
                encoding: Encoding::Plain,
            }),
            DtypeClass::ScaledFloat8 => match fp8_scale.get(&i) {
                Some(&sc) => tensors.push(fp8_tensor(&path_of(s), s, &stored[sc])?),
                None => {
                    role[i].0 = Role::Skipped;
                    skipped.push(skip(format!(
                        "{} codes without a scale companion ({0}_scale_inv or {0}_scale); raw fp8 codes are never analysed",
                        s.name
                    )))
                }
            },
            DtypeClass::Integer => {
                role[i].0 = Role::Skipped;
                match int_scale.get(&i) {
                    Some(&sc) => {
                        skipped.push(skip(format!(
                            "integer-quantised {} weight with scale {:?}; not supported",
                            s.dtype, stored[sc].name
                        )));
                        skipped.push(Skipped {
                            name: stored[sc].name.clone(),
                            dtype: stored[sc].dtype.to_string(),
                            shape: stored[sc].shape.clone(),
                            reason: format!(
                                "scale of the integer-quantised weight {:?}; not supported",
                                s.name
                            ),
                        });
                    }
                    None => skipped.push(skip(format!(
                        "{} tensor (integer or boolean); not a weight",
                        s.dtype
                    ))),
                }
            }
            DtypeClass::Unsupported => {
                role[i].0 = Role::Skipped;
                skipped.push(skip(format!(
                    "dtype {} cannot be decoded by this version",
                    s.dtype
                )));
            }
        }
    }
    let entries = stored
        .into_iter()
        .zip(role)
        .map(|(stored, (role, of))| StoredEntry { stored, role, of })
        .collect();
    Ok((entries, tensors, skipped))
}

fn fp8_tensor(path: &Path, s: &Stored, sc: &Stored) -> Result<LogicalTensor> {
    if sc.dtype.class() != DtypeClass::Float {
        return Err(Error::tensor(
            path,
            &sc.name,
            format!(
                "scale of {:?} must be a float tensor, found {}",
                s.name, sc.dtype
            ),
        ));
    }
    let numel = s.len; // one byte per fp8 element
    let sc_numel = sc.len * 8 / sc.dtype.bits();
    let scale = if sc_numel == 1 {
        Scale::PerTensor(sc.clone())
    } else if s.shape.len() == 2 {
        let (rows, cols) = (s.shape[0], s.shape[1]);
        let sshape: Vec<u64> = sc.shape.clone();
        if (sshape == [rows] || sshape == [rows, 1]) && rows > 1 {
            Scale::PerRow(sc.clone())
        } else if sshape.len() == 2 && sshape[0] > 0 && sshape[1] > 0 {
            let Some((br, bc)) = block_size(rows, cols, sshape[0], sshape[1]) else {
                return Err(Error::tensor(
                    path,
                    &sc.name,
                    format!(
                        "scale shape {sshape:?} does not tile weight shape {:?} with square power-of-two blocks",
                        s.shape
                    ),
                ));
            };
            Scale::Block {
                scale: sc.clone(),
                block_rows: br,
                block_cols: bc,
            }
        } else {
            return Err(Error::tensor(
                path,
                &sc.name,
                format!(
                    "scale shape {sshape:?} does not fit weight shape {:?}",
                    s.shape
                ),
            ));
        }
    } else {
        return Err(Error::tensor(
            path,
            &sc.name,
            format!(
                "scale shape {:?} for a {}-D fp8 tensor is not supported (only per-tensor scales)",
                sc.shape,
                s.shape.len()
            ),
        ));
    };
    Ok(LogicalTensor {
        name: s.name.clone(),
        shape: s.shape.clone(),
        numel,
        data: s.clone(),
        encoding: Encoding::Fp8(scale),
    })
}

/// The tile size of a block scale: DeepSeek-V3 uses 128×128 (`weight_block_size` in its config);
/// otherwise the largest square power-of-two tile consistent with both scale dimensions. The tile
/// cannot be read off `⌈rows/sr⌉` (a 300-row weight with 3 scale rows has 128-row tiles, not 100).
fn block_size(rows: u64, cols: u64, sr: u64, sc: u64) -> Option<(u64, u64)> {
    let fits = |b: u64| rows.div_ceil(b) == sr && cols.div_ceil(b) == sc;
    if fits(128) {
        return Some((128, 128));
    }
    (0..63)
        .rev()
        .map(|k| 1u64 << k)
        .find(|&b| fits(b))
        .map(|b| (b, b))
}

fn mxfp4_tensor(
    path: &Path,
    stem: String,
    blocks: &Stored,
    scales: &Stored,
) -> Result<LogicalTensor> {
    let b = &blocks.shape;
    let ok = b.len() >= 2
        && b[b.len() - 1] == 16
        && scales.dtype == Dtype::U8
        && scales.shape.len() == b.len() - 1
        && scales.shape[..] == b[..b.len() - 1];
    if !ok {
        return Err(Error::tensor(
            path,
            &blocks.name,
            format!(
                "MXFP4 blocks {:?} ({}) and scales {:?} ({}) do not match (expected [..., G, 16] U8 and [..., G] U8)",
                b, blocks.dtype, scales.shape, scales.dtype
            ),
        ));
    }
    let mut shape = b[..b.len() - 1].to_vec();
    let last = shape.last_mut().expect("len ≥ 1");
    *last = last
        .checked_mul(32)
        .ok_or_else(|| Error::tensor(path, &blocks.name, "MXFP4 shape overflows"))?;
    Ok(LogicalTensor {
        name: stem,
        numel: blocks.len * 2,
        shape,
        data: blocks.clone(),
        encoding: Encoding::Mxfp4 {
            scales: scales.clone(),
        },
    })
}
