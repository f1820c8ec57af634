//! Fuzz the directory resolver with generated file trees: nested directories, valid and broken
//! shards, index files naming arbitrary paths, symlinks (relative, absolute, dangling, looping, into
//! the Hugging Face `blobs/` layout, to devices and out of the tree), FIFOs and odd names (spaces,
//! newlines, bidi overrides, non-ASCII). The checkpoint is opened at the root or at any generated
//! directory, with and without `allow_external_symlinks`. With the default policy an accepted
//! checkpoint never resolves a shard outside the tree; nothing hangs or panics.
#![no_main]

use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use forgetscope_core::OpenOptions;
use forgetscope_fuzz::{assert_inside, exercise, good_file, scratch, try_good_file};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "a.safetensors",
    "b.safetensors",
    "x.safetensors.index.json",
    "snapshots",
    "blobs",
    "refs",
    "main",
    "rev1",
    "models--org--name",
    "a b.safetensors",
    "é.safetensors",
    "\u{202e}gpj.safetensors",
    "new\nline.safetensors",
    "config.json",
    "model.bin",
    "-",
];

const TARGETS: &[&str] = &[
    "a.safetensors",
    "../a.safetensors",
    "../../blobs/a.safetensors",
    "blobs/a.safetensors",
    "../outside/e.safetensors",
    "/dev/zero",
    "/dev/null",
    "/proc/self/mem",
    "nonexistent",
    ".",
    "..",
    "snapshots/rev1",
    "model.safetensors",
];

#[derive(Arbitrary, Debug)]
enum Node {
    Dir,
    Shard(u8),
    Garbage(Vec<u8>),
    Index(Vec<(u8, Vec<u8>)>),
    Symlink(u8),
    AbsSymlinkOutside,
    Fifo,
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<(Vec<u8>, Node)>,
    open_at: u8,
}

fn rel(parts: &[u8]) -> PathBuf {
    parts
        .iter()
        .take(4)
        .map(|&i| NAMES[i as usize % NAMES.len()])
        .collect()
}

fn build(root: &Path, outside: &Path, entries: &[(Vec<u8>, Node)]) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    for (parts, node) in entries.iter().take(24) {
        if parts.is_empty() {
            continue;
        }
        let p = root.join(rel(parts));
        // Never write into something already there: writing to a FIFO would block the harness.
        if p.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = p.parent() {
            if std::fs::create_dir_all(parent).is_err() {
                continue;
            }
        }
        let _ = match node {
            Node::Dir => std::fs::create_dir(&p).map(|_| dirs.push(p.clone())),
            Node::Shard(t) => {
                let dir = p.parent().unwrap_or(root);
                let file = p.file_name().unwrap().to_string_lossy().into_owned();
                try_good_file(dir, &file, NAMES[*t as usize % NAMES.len()]).map(|_| ())
            }
            Node::Garbage(bytes) => std::fs::write(&p, bytes),
            Node::Index(map) => {
                let mut m = serde_json::Map::new();
                for (t, path) in map.iter().take(8) {
                    m.insert(
                        NAMES[*t as usize % NAMES.len()].to_string(),
                        serde_json::Value::String(rel(path).to_string_lossy().into_owned()),
                    );
                }
                std::fs::write(&p, serde_json::json!({ "weight_map": m }).to_string())
            }
            Node::Symlink(t) => {
                std::os::unix::fs::symlink(TARGETS[*t as usize % TARGETS.len()], &p)
            }
            Node::AbsSymlinkOutside => {
                std::os::unix::fs::symlink(outside.join("e.safetensors"), &p)
            }
            Node::Fifo => {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
                Ok(())
            }
            Node::Text(s) => std::fs::write(&p, s),
        };
    }
    dirs
}

fuzz_target!(|input: Input| {
    if std::env::var_os("FORGETSCOPE_FUZZ_DEBUG").is_some() {
        eprintln!("{input:#?}");
    }
    let base = scratch().join("tree");
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("root");
    let outside = base.join("outside");
    std::fs::create_dir_all(&root).expect("mkdir root");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    good_file(&outside, "e.safetensors", "e");
    let dirs = build(&root, &outside, &input.entries);
    let at = &dirs[input.open_at as usize % dirs.len()];
    let named: [&Path; 2] = [at, &base];
    if let Some(shards) = exercise(at, &OpenOptions::default(), &named) {
        assert_inside(at, &shards);
    }
    let allow = OpenOptions {
        allow_external_symlinks: true,
    };
    exercise(at, &allow, &named);
});
