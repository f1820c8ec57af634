//! Fuzz the sharded-index parser and the path policy it enforces. The input is the content of
//! `model.safetensors.index.json` in a fixed checkpoint directory that also holds valid shards, a
//! shard in a subdirectory, a symlink to a shard outside the directory, a symlink inside it, a FIFO
//! and a directory named like a shard. With the default policy an accepted checkpoint must never
//! resolve a shard outside its directory; a FIFO must never hang the run (libFuzzer's -timeout).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use forgetscope_core::OpenOptions;
use forgetscope_fuzz::{assert_inside, exercise, good_file, scratch};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let root = scratch().join("index");
        let ck = root.join("ck");
        let outside = root.join("outside");
        for d in [&ck, &outside, &ck.join("sub"), &ck.join("d.safetensors")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        good_file(&ck, "a.safetensors", "x");
        good_file(&ck, "b.safetensors", "z");
        good_file(&ck.join("sub"), "c.safetensors", "w");
        good_file(&outside, "e.safetensors", "e");
        std::os::unix::fs::symlink("../outside/e.safetensors", ck.join("ext.safetensors"))
            .expect("symlink");
        std::os::unix::fs::symlink(outside.join("e.safetensors"), ck.join("abs.safetensors"))
            .expect("symlink");
        std::os::unix::fs::symlink("a.safetensors", ck.join("in.safetensors")).expect("symlink");
        std::os::unix::fs::symlink("/dev/zero", ck.join("zero.safetensors")).expect("symlink");
        let fifo = std::ffi::CString::new(ck.join("p.safetensors").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
        (ck, outside)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ck, _) = fixture();
    let index = ck.join("model.safetensors.index.json");
    std::fs::write(&index, data).expect("write index");
    let named: [&Path; 2] = [ck, &index];
    if let Some(shards) = exercise(ck, &OpenOptions::default(), &named) {
        assert_inside(ck, &shards);
    }
    let allow = OpenOptions {
        allow_external_symlinks: true,
    };
    exercise(&index, &allow, &named);
});
