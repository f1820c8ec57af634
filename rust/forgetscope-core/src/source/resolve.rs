//! Turn a user-given path into the list of shard files of one checkpoint, safely.
//!
//! Accepted: a `.safetensors` file; a `*.safetensors.index.json` file; a directory holding
//! `model.safetensors.index.json`, `model.safetensors`, or exactly one `*.safetensors(.index.json)`;
//! a Hugging Face cache snapshot (`.../snapshots/<rev>/`, files are symlinks into `../../blobs/`);
//! a Hugging Face cache repo folder (`models--org--name/`, resolved through `refs/main`).
//!
//! Symlink policy: a shard found through a directory or an index must resolve inside the checkpoint
//! directory, or inside the sibling `blobs/` of a Hugging Face snapshot. Anything else is refused
//! unless the caller passes `allow_external_symlinks`. Index entries must be relative paths made
//! of plain components (no `..`, no absolute paths, no NUL).

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::Deserializer;

use crate::error::{Error, Result};

/// Largest index file read (the biggest real indexes are a few MB).
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// How the checkpoint was laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One `.safetensors` file.
    SingleFile,
    /// A directory with one safetensors file.
    Directory,
    /// Shards listed by an index file.
    Sharded {
        /// The index file.
        index: PathBuf,
    },
}

/// A resolved checkpoint: which files, and (for sharded ones) which tensor each holds.
#[derive(Debug)]
pub struct Resolved {
    /// Path as the user gave it.
    pub given: PathBuf,
    /// Layout detected.
    pub layout: Layout,
    /// Shard paths (unique, in first-mention order).
    pub shards: Vec<PathBuf>,
    /// For sharded checkpoints: tensor name → shard index, in index order.
    pub weight_map: Option<Vec<(String, u32)>>,
    /// Index `metadata`, flattened to strings.
    pub metadata: Vec<(String, String)>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// Resolve `path` into shard files.
pub fn resolve(path: &Path, allow_external_symlinks: bool) -> Result<Resolved> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".index.json") {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            return resolve_index(path, path, &dir, allow_external_symlinks);
        }
        return Ok(Resolved {
            given: path.to_path_buf(),
            layout: Layout::SingleFile,
            shards: vec![path.to_path_buf()],
            weight_map: None,
            metadata: vec![],
            warnings: vec![],
        });
    }
    if !meta.is_dir() {
        // FIFOs, devices, sockets: let the file opener produce the uniform message.
        super::file::open_regular(path)?;
        // Only reached if it became a regular file since the stat above.
        return Err(Error::Changed {
            path: path.to_path_buf(),
            reason: "it changed type while being opened; re-run on a stable copy".into(),
        });
    }
    let dir = hf_repo_snapshot(path)?.unwrap_or_else(|| path.to_path_buf());
    let index = dir.join("model.safetensors.index.json");
    if exists_entry(&index) {
        return resolve_index(path, &index, &dir, allow_external_symlinks);
    }
    let single = dir.join("model.safetensors");
    if exists_entry(&single) {
        return resolve_dir_file(path, &dir, single, allow_external_symlinks);
    }
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    let mut others = Vec::new();
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(entry.path());
        } else if name.ends_with(".safetensors") {
            files.push(entry.path());
        } else if [".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack"]
            .iter()
            .any(|s| name.ends_with(s))
        {
            others.push(name);
        }
    }
    indexes.sort();
    files.sort();
    others.sort();
    match (indexes.len(), files.len()) {
        (1, _) => resolve_index(path, &indexes[0].clone(), &dir, allow_external_symlinks),
        (0, 1) => resolve_dir_file(path, &dir, files.remove(0), allow_external_symlinks),
        (0, 0) => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: if others.is_empty() {
                "no safetensors checkpoint here (expected model.safetensors, model.safetensors.index.json or *.safetensors)".into()
            } else {
                format!(
                    "no safetensors files here, only {}; convert them to safetensors (pickled weights are never loaded)",
                    others.join(", ")
                )
            },
        }),
        (0, n) => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "{n} .safetensors files and no *.safetensors.index.json; pass one file, or the index"
            ),
        }),
        (n, _) => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("{n} *.safetensors.index.json files; pass the one to use"),
        }),
    }
}

/// `symlink_metadata` so a dangling symlink still counts as present (and fails later, loudly).
fn exists_entry(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// For a Hugging Face cache repo folder (`models--org--name/` with `snapshots/`), the snapshot
/// that `refs/main` points to (or the only snapshot).
fn hf_repo_snapshot(dir: &Path) -> Result<Option<PathBuf>> {
    let snaps = dir.join("snapshots");
    if !snaps.is_dir() || dir.join("model.safetensors").exists() {
        return Ok(None);
    }
    let refs_main = dir.join("refs").join("main");
    if let Some(text) = read_ref(&refs_main)? {
        let rev = text.trim();
        if rev.is_empty()
            || !is_plain_relative(Path::new(rev))
            || Path::new(rev).components().count() != 1
        {
            return Err(Error::UnsafePath {
                path: refs_main,
                reason: format!("refs/main holds {rev:?}, which is not a snapshot name"),
            });
        }
        return Ok(Some(snaps.join(rev)));
    }
    let mut revs: Vec<_> = std::fs::read_dir(&snaps)
        .map_err(|e| Error::io(&snaps, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match revs.len() {
        1 => Ok(Some(revs.remove(0))),
        n => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("Hugging Face cache folder with {n} snapshots and no refs/main; pass snapshots/<revision>"),
        }),
    }
}

/// Longest `refs/main` read: it holds one 40-hex-digit revision.
const MAX_REF_BYTES: u64 = 4096;

/// The text of a cache's `refs/main`, or None when there is none. It is read like any untrusted
/// file (found by fuzzing: a FIFO here blocked `read_to_string` forever, and a link to `/dev/zero`
/// would grow without bound): it must be a small regular file, not a symlink, since the Hugging
/// Face cache writes refs as plain files and an error quotes what it holds.
fn read_ref(refs_main: &Path) -> Result<Option<String>> {
    let unsafe_ref = |reason: String| Error::UnsafePath {
        path: refs_main.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(refs_main) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(refs_main, e)),
        Ok(m) if m.file_type().is_symlink() => {
            return Err(unsafe_ref(
                "refs/main is a symlink; the Hugging Face cache writes it as a plain file \
                 (pass snapshots/<revision>)"
                    .into(),
            ))
        }
        Ok(_) => {}
    }
    let (file, id) = super::file::open_regular(refs_main)?;
    if id.len() > MAX_REF_BYTES {
        return Err(unsafe_ref(format!(
            "refs/main is {} bytes; it should hold one revision",
            id.len()
        )));
    }
    let mut bytes = vec![0u8; id.len() as usize];
    super::file::read_exact_at(&file, refs_main, &mut bytes, 0)?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| unsafe_ref("refs/main is not UTF-8 text".into()))
}

fn resolve_dir_file(
    given: &Path,
    dir: &Path,
    file: PathBuf,
    allow_external: bool,
) -> Result<Resolved> {
    let guard = Guard::new(dir, allow_external)?;
    guard.check(&file, None)?;
    Ok(Resolved {
        given: given.to_path_buf(),
        layout: Layout::Directory,
        shards: vec![file],
        weight_map: None,
        metadata: vec![],
        warnings: vec![],
    })
}

/// True when `p` is relative, names something, and has no `..` (`./` is harmless).
fn is_plain_relative(p: &Path) -> bool {
    p.components().any(|c| matches!(c, Component::Normal(_)))
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Decides whether a path found through a checkpoint directory may be read.
struct Guard {
    roots: Vec<PathBuf>,
    allow_external: bool,
}

impl Guard {
    fn new(dir: &Path, allow_external: bool) -> Result<Self> {
        let canon = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let mut roots = vec![canon.clone()];
        // A Hugging Face snapshot's files are symlinks into <repo>/blobs/.
        if canon
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "snapshots")
        {
            if let Some(repo) = canon.parent().and_then(Path::parent) {
                let blobs = repo.join("blobs");
                if let Ok(b) = blobs.canonicalize() {
                    roots.push(b);
                }
            }
        }
        Ok(Guard {
            roots,
            allow_external,
        })
    }

    fn check(&self, p: &Path, named_by: Option<&Path>) -> Result<()> {
        let canon = p.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: p.to_path_buf(),
                hint: match named_by {
                    Some(ix) => format!(" (a shard named by {})", ix.display()),
                    None => String::new(),
                },
            },
            _ => Error::io(p, e),
        })?;
        if self.allow_external || self.roots.iter().any(|r| canon.starts_with(r)) {
            return Ok(());
        }
        Err(Error::UnsafePath {
            path: p.to_path_buf(),
            reason: format!(
                "resolves to {}, outside the checkpoint directory {}; pass --allow-external-symlinks to read it",
                canon.display(),
                self.roots[0].display()
            ),
        })
    }
}

fn resolve_index(given: &Path, index: &Path, dir: &Path, allow_external: bool) -> Result<Resolved> {
    let guard = Guard::new(dir, allow_external)?;
    if given != index {
        guard.check(index, None)?;
    }
    let (file, id) = super::file::open_regular(index)?;
    if id.len() > MAX_INDEX_BYTES {
        return Err(Error::Index {
            path: index.to_path_buf(),
            reason: format!(
                "{} bytes is larger than any real index ({MAX_INDEX_BYTES}-byte limit)",
                id.len()
            ),
        });
    }
    let mut bytes = vec![0u8; id.len() as usize];
    super::file::read_exact_at(&file, index, &mut bytes, 0)?;
    let parsed = parse_index(&bytes).map_err(|(reason, tensor)| {
        let head = &bytes[..bytes.len().min(64)];
        match (super::sniff::foreign_format(head, id.len()), tensor) {
            (Some(what), _) if !what.starts_with("a JSON") => Error::Index {
                path: index.to_path_buf(),
                reason: format!("not JSON: it looks like {what}"),
            },
            (_, Some(name)) => Error::tensor(index, name, format!("invalid shard index: {reason}")),
            _ => Error::Index {
                path: index.to_path_buf(),
                reason,
            },
        }
    })?;
    let mut shard_ids: Vec<(String, u32)> = Vec::new();
    let mut shards: Vec<PathBuf> = Vec::new();
    let mut by_file: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for (tensor, file) in parsed.weight_map {
        let id = match by_file.get(&file) {
            Some(&id) => id,
            None => {
                let rel = Path::new(&file);
                if file.contains('\0') || !is_plain_relative(rel) {
                    return Err(Error::UnsafePath {
                        path: index.to_path_buf(),
                        reason: format!(
                            "weight_map sends {tensor:?} to {file:?}; shard paths must be relative, without '..'"
                        ),
                    });
                }
                let p = dir.join(rel);
                guard.check(&p, Some(index))?;
                let id = shards.len() as u32;
                shards.push(p);
                by_file.insert(file, id);
                id
            }
        };
        shard_ids.push((tensor, id));
    }
    if shards.is_empty() {
        return Err(Error::Index {
            path: index.to_path_buf(),
            reason: "weight_map is empty".into(),
        });
    }
    Ok(Resolved {
        given: given.to_path_buf(),
        layout: Layout::Sharded {
            index: index.to_path_buf(),
        },
        shards,
        weight_map: Some(shard_ids),
        metadata: parsed.metadata,
        warnings: vec![],
    })
}

struct ParsedIndex {
    weight_map: Vec<(String, String)>,
    metadata: Vec<(String, String)>,
}

/// Returns the parse failure and, when it concerns one weight_map entry, that tensor's name.
fn parse_index(bytes: &[u8]) -> std::result::Result<ParsedIndex, (String, Option<String>)> {
    let current = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = de
        .deserialize_map(IndexVisitor { current: &current })
        .map_err(|e| (e.to_string(), current.borrow_mut().take()))?;
    de.end()
        .map_err(|e| (format!("unexpected data after the JSON object: {e}"), None))?;
    parsed.ok_or_else(|| ("no \"weight_map\" object".to_string(), None))
}

struct IndexVisitor<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> Visitor<'de> for IndexVisitor<'_> {
    type Value = Option<ParsedIndex>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with a \"weight_map\"")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut weight_map = None;
        let mut metadata = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "weight_map" => {
                    if weight_map.is_some() {
                        return Err(de::Error::custom("duplicate key \"weight_map\""));
                    }
                    weight_map = Some(map.next_value_seed(WeightMapSeed {
                        current: self.current,
                    })?);
                }
                "metadata" => {
                    let v: serde_json::Value = map.next_value()?;
                    if let serde_json::Value::Object(o) = v {
                        for (k, v) in o {
                            let s = match v {
                                serde_json::Value::String(s) => s,
                                other => other.to_string(),
                            };
                            metadata.push((k, s));
                        }
                    }
                }
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(weight_map.map(|weight_map| ParsedIndex {
            weight_map,
            metadata,
        }))
    }
}

struct WeightMapSeed<'a> {
    current: &'a RefCell<Option<String>>,
}

impl<'de> de::DeserializeSeed<'de> for WeightMapSeed<'_> {
    type Value = Vec<(String, String)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        struct V<'a> {
            current: &'a RefCell<Option<String>>,
        }
        impl<'de> Visitor<'de> for V<'_> {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"weight_map\" as an object of tensor name → shard file name")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                while let Some(k) = map.next_key::<String>()? {
                    *self.current.borrow_mut() = Some(k.clone());
                    let v = match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(v) => v,
                        other => {
                            return Err(de::Error::custom(format!(
                            "weight_map value must be a shard file name (a string), found {other}"
                        )))
                        }
                    };
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom("weight_map lists this tensor twice"));
                    }
                    out.push((k, v));
                }
                *self.current.borrow_mut() = None;
                Ok(out)
            }
        }
        d.deserialize_map(V {
            current: self.current,
        })
    }
}
