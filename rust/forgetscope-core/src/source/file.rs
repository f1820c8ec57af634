//! File access: safe opening (no FIFOs, devices or directories; no hang), identity checks so a
//! file replaced mid-run is noticed, and `pread` into page-aligned buffers.
//!
//! Why `pread` and not `mmap`: a mapping of every shard keeps pages resident in our RSS, and a file
//! truncated under a mapping raises SIGBUS; a short `pread` is an ordinary error. Reads start at a
//! page-aligned file offset into a page-aligned buffer because misaligned copies out of the page
//! cache run several times slower on the machines we measure on.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Page size assumed for alignment (4 KiB on every platform we target; larger pages are multiples).
pub const PAGE: usize = 4096;

/// Identity of an opened file, used to detect replacement or truncation between open and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    fn of(meta: &Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }

    /// Size in bytes at open time.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Modification time at open time, in nanoseconds since the epoch.
    pub fn mtime_ns(&self) -> i128 {
        self.mtime_ns
    }

    /// True when the file was empty at open time.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn file_kind(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("directory")
    } else if ft.is_fifo() {
        Some("FIFO")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_char_device() {
        Some("character device")
    } else if ft.is_block_device() {
        Some("block device")
    } else {
        Some("special file")
    }
}

/// Open a regular file for reading without ever blocking on a FIFO or touching a device.
///
/// The type is checked before opening (so a device is never opened) and again on the open handle
/// (so a swap between the two checks is caught). `O_NONBLOCK` makes opening a FIFO return at once.
pub fn open_regular(path: &Path) -> Result<(File, FileIdentity)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if let Some(kind) = file_kind(meta.file_type()) {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if let Some(kind) = file_kind(meta.file_type()) {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    advise_sequential(&file);
    Ok((file, FileIdentity::of(&meta)))
}

#[cfg(target_os = "linux")]
fn advise_sequential(file: &File) {
    use std::os::fd::AsRawFd;
    // Advisory only: a failure changes nothing but read-ahead.
    // SAFETY: plain syscall on a valid, owned descriptor.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_sequential(_file: &File) {}

/// Reopen a file and verify it is the one that was validated.
pub fn reopen_same(path: &Path, expected: FileIdentity) -> Result<File> {
    let (file, id) = open_regular(path)?;
    if id != expected {
        return Err(Error::Changed {
            path: path.to_path_buf(),
            reason: format!(
                "it was {} bytes when validated and is {} bytes now (or was replaced); re-run on a stable copy",
                expected.len, id.len
            ),
        });
    }
    Ok(file)
}

/// Fill `buf` from `offset`; a short read means the file shrank, which is reported, never UB.
pub fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(Error::Changed {
                    path: path.to_path_buf(),
                    reason: format!(
                        "unexpected end of file at byte {} (wanted {} bytes from offset {}); was it truncated?",
                        offset + done as u64,
                        buf.len(),
                        offset
                    ),
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

/// A heap buffer whose start is page-aligned.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub fn new() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// Make room for `len` bytes (rounded up to whole pages); keeps the allocation when large enough.
    pub fn reserve(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            self.free();
            let cap = len.div_ceil(PAGE).max(1) * PAGE;
            let layout = Layout::from_size_align(cap, PAGE).expect("page-aligned layout");
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        // SAFETY: ptr is valid for cap ≥ len initialised (zeroed) bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    /// `len` bytes from `start` (within what the last `reserve` made available).
    pub fn bytes(&self, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= self.cap, "AlignedBuf::bytes out of range");
        if len == 0 {
            return &[];
        }
        // SAFETY: in bounds of an initialised allocation; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) }
    }

    /// Allocated capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            let layout = Layout::from_size_align(self.cap, PAGE).expect("page-aligned layout");
            // SAFETY: allocated with this exact layout in `reserve`.
            unsafe { dealloc(self.ptr, layout) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// Read `len` bytes at `offset` into `buf`, issuing the read from the enclosing page boundary so the
/// kernel copies page-aligned to page-aligned. Returns where the requested bytes start in `buf`.
pub fn read_aligned(
    file: &File,
    path: &Path,
    buf: &mut AlignedBuf,
    offset: u64,
    len: usize,
    file_len: u64,
) -> Result<usize> {
    let start = offset - offset % PAGE as u64;
    let lead = (offset - start) as usize;
    // Extend to whole pages, but never ask for bytes past the end of the file.
    let end = (offset + len as u64).div_ceil(PAGE as u64) * PAGE as u64;
    let end = end.min(file_len).max(offset + len as u64);
    let total = (end - start) as usize;
    let slice = buf.reserve(total);
    read_exact_at(file, path, slice, start)?;
    Ok(lead)
}

/// A shard as validated: its path and identity, for reopening in workers.
#[derive(Debug, Clone)]
pub struct ShardFile {
    /// Path as resolved (may be a symlink inside a Hugging Face snapshot).
    pub path: PathBuf,
    /// Identity at validation time.
    pub identity: FileIdentity,
}
