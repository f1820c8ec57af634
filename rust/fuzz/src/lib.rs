//! Shared pieces of the fuzz targets: a private scratch directory, a safetensors writer that is
//! independent of the core's reader, and the invariants every target checks on whatever the core
//! returns (errors name their file; accepted checkpoints read back, stream, and never escape their
//! directory).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use forgetscope_core::error::Error;
use forgetscope_core::stream::{read_tensor, trajectory, Control, RunOptions};
use forgetscope_core::{inspect, OpenOptions};

/// A directory private to this fuzzing process, on tmpfs when there is one (the targets write a
/// file per input, so the disk must not be the bottleneck).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("forgetscope-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create scratch dir");
        d
    })
}

/// One tensor for [`safetensors_bytes`].
pub struct Entry<'a> {
    /// Name as stored.
    pub name: &'a str,
    /// dtype string as in the format (`"BF16"`, `"F8_E4M3"`, ...).
    pub dtype: &'a str,
    /// Shape.
    pub shape: Vec<u64>,
    /// Raw little-endian bytes.
    pub data: Vec<u8>,
}

/// Serialise tensors as a safetensors file (data in the given order, no padding), written here from
/// the format description rather than with the core, so that a writer bug cannot hide a reader bug.
pub fn safetensors_bytes(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for e in entries {
        let end = off + e.data.len() as u64;
        header.insert(
            e.name.to_string(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    for e in entries {
        out.extend_from_slice(&e.data);
    }
    out
}

/// Every error about input must name one of `paths` (the file, index or directory concerned) in
/// its message, and never be empty. `Config`/`Cancelled` cannot come from input here.
pub fn check_error(e: &Error, paths: &[&Path]) {
    let msg = e.to_string();
    assert!(!msg.is_empty(), "empty error message: {e:?}");
    match e {
        Error::Config { .. } | Error::Cancelled => {
            panic!("input produced a non-input error: {e:?}")
        }
        _ => {}
    }
    let named = paths.iter().any(|p| {
        let shown = p.display().to_string();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        msg.contains(&shown) || (!name.is_empty() && msg.contains(&name))
    });
    // Errors about a shard name the shard, which lives under one of the given directories.
    let under = paths.iter().any(|p| msg.contains(&*p.to_string_lossy()));
    assert!(
        named || under,
        "error does not name its file ({paths:?}): {msg}"
    );
}

/// Open `path`; if it is accepted, read every tensor back (bounded), stream it against itself, and
/// check the self-comparison is exactly zero wherever it is finite. Returns the shard paths.
pub fn exercise(path: &Path, opts: &OpenOptions, named: &[&Path]) -> Option<Vec<PathBuf>> {
    let ck = match inspect(path, opts) {
        Ok(ck) => ck,
        Err(e) => {
            check_error(&e, named);
            return None;
        }
    };
    let shards: Vec<PathBuf> = ck.shards.iter().map(|s| s.path.clone()).collect();
    let mut named_all: Vec<&Path> = named.to_vec();
    named_all.extend(shards.iter().map(PathBuf::as_path));
    for t in ck.tensors.iter().take(16) {
        match read_tensor(path, &t.name, opts, 16 << 20) {
            Ok((shape, values)) => {
                let n: u64 = shape.iter().product();
                assert_eq!(
                    n as usize,
                    values.len(),
                    "tensor {:?}: shape vs values",
                    t.name
                );
                assert_eq!(shape, t.shape, "tensor {:?}: shape changed on read", t.name);
            }
            Err(e) => check_error(&e, &named_all),
        }
    }
    let run = RunOptions {
        threads: 1,
        memory_budget: 16 << 20,
        open: opts.clone(),
        chunk_bytes: Some(4096),
    };
    match trajectory(&[path, path], &run, &Control::new()) {
        Ok(rep) => {
            assert_eq!(rep.tensors.len(), ck.tensors.len());
            for t in &rep.tensors {
                let s = &t.steps[0];
                if s.n_nan == 0 && s.n_inf == 0 {
                    assert_eq!(s.fro_delta, 0.0, "{:?} differs from itself", t.name);
                }
            }
        }
        Err(e) => check_error(&e, &named_all),
    }
    Some(shards)
}

/// The documented symlink policy: with `allow_external_symlinks` off, every shard of an accepted
/// directory checkpoint resolves inside that directory, or inside the `blobs/` sibling of a Hugging
/// Face snapshot (`<repo>/snapshots/<rev>/` → `<repo>/blobs/`).
pub fn assert_inside(dir: &Path, shards: &[PathBuf]) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let blobs = dir.parent().and_then(Path::parent).map(|r| r.join("blobs"));
    for s in shards {
        if let Ok(c) = std::fs::canonicalize(s) {
            let ok = c.starts_with(&dir) || blobs.as_ref().is_some_and(|b| c.starts_with(b));
            assert!(
                ok,
                "shard {s:?} resolves to {c:?}, outside {dir:?}, without allow_external_symlinks"
            );
        }
    }
}

/// A valid one-tensor F32 file named `name`, for targets that need real shards around.
pub fn good_file(dir: &Path, file: &str, tensor: &str) -> PathBuf {
    let p = try_good_file(dir, file, tensor);
    p.expect("write good file")
}

/// [`good_file`], for generated trees where the name may already be a directory or a FIFO.
pub fn try_good_file(dir: &Path, file: &str, tensor: &str) -> std::io::Result<PathBuf> {
    let data: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bytes = safetensors_bytes(&[Entry {
        name: tensor,
        dtype: "F32",
        shape: vec![2, 2],
        data,
    }]);
    let p = dir.join(file);
    std::fs::write(&p, bytes)?;
    Ok(p)
}
