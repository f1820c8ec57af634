//! The one error type of the core. Every variant that concerns input names the file it is about
//! (and the tensor, where there is one); messages are complete sentences a user can act on.

use std::path::PathBuf;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused an open, stat or read.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// A path that should exist does not.
    #[error("{path}: no such file or directory{hint}", path = .path.display())]
    NotFound {
        /// Missing path.
        path: PathBuf,
        /// Extra context (e.g. which index named it), starting with "; " or empty.
        hint: String,
    },
    /// The file is something else than safetensors (a pickle, a zip, an LFS pointer, ...).
    #[error("{path}: not a safetensors file: {what}", path = .path.display())]
    ForeignFormat {
        /// File concerned.
        path: PathBuf,
        /// What it looks like, and what to do about it.
        what: String,
    },
    /// The safetensors header is malformed.
    #[error("{path}: invalid safetensors header: {reason}", path = .path.display())]
    Header {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One tensor's entry is inconsistent (dtype, shape, offsets, scales).
    #[error("{path}: tensor {name:?}: {reason}", path = .path.display())]
    Tensor {
        /// File concerned.
        path: PathBuf,
        /// Tensor name, exactly as stored.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A sharded index (`*.safetensors.index.json`) is malformed or disagrees with its shards.
    #[error("{path}: invalid shard index: {reason}", path = .path.display())]
    Index {
        /// Index file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A path would leave the checkpoint directory (`..`, absolute, symlink out).
    #[error("{path}: unsafe path: {reason}", path = .path.display())]
    UnsafePath {
        /// Path concerned (as written in the index or found on disk).
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// A FIFO, socket, device or directory where a regular file is required.
    #[error("{path}: is a {kind}, not a regular file; refusing to read it", path = .path.display())]
    NotRegularFile {
        /// Path concerned.
        path: PathBuf,
        /// "directory", "FIFO", "socket", "character device", "block device".
        kind: &'static str,
    },
    /// A checkpoint directory whose layout cannot be understood.
    #[error("{path}: {reason}", path = .path.display())]
    Checkpoint {
        /// Directory concerned.
        path: PathBuf,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A file was truncated or replaced while it was being read.
    #[error("{path}: file changed while being read: {reason}", path = .path.display())]
    Changed {
        /// File concerned.
        path: PathBuf,
        /// What changed.
        reason: String,
    },
    /// A valid tensor that this operation does not support (e.g. an integer tensor to decode).
    #[error("{path}: tensor {name:?}: {reason}", path = .path.display())]
    Unsupported {
        /// File concerned.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What is unsupported.
        reason: String,
    },
    /// A model `config.json` is unreadable or contradicts the tensors it describes.
    #[error("{path}: invalid model config: {reason}", path = .path.display())]
    ModelConfig {
        /// Config file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A requested tensor does not exist in the checkpoint.
    #[error("{path}: no tensor named {name:?}", path = .path.display())]
    TensorNotFound {
        /// Checkpoint concerned.
        path: PathBuf,
        /// Requested name.
        name: String,
    },
    /// An option given by the caller is out of range (thread count, memory budget, ...).
    #[error("invalid option: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The run was cancelled through its [`crate::Control`].
    #[error("cancelled")]
    Cancelled,
}

/// Coarse classes of [`Error`] that front ends map to exception types and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Malformed, foreign or inconsistent input (CLI exit 3).
    InvalidInput,
    /// Input refused for safety (path escape, special file) (CLI exit 3).
    UnsafeInput,
    /// A named file or tensor does not exist (CLI exit 3).
    NotFound,
    /// Permission denied by the OS (CLI exit 3).
    PermissionDenied,
    /// Bad option (CLI exit 2).
    Usage,
    /// Cancelled by the caller (CLI exit 130).
    Cancelled,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::InvalidInput,
            },
            Error::NotFound { .. } | Error::TensorNotFound { .. } => ErrorKind::NotFound,
            Error::UnsafePath { .. } | Error::NotRegularFile { .. } => ErrorKind::UnsafeInput,
            Error::Config { .. } => ErrorKind::Usage,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::ForeignFormat { .. }
            | Error::Header { .. }
            | Error::Tensor { .. }
            | Error::Index { .. }
            | Error::Checkpoint { .. }
            | Error::ModelConfig { .. }
            | Error::Changed { .. }
            | Error::Unsupported { .. } => ErrorKind::InvalidInput,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound {
                path,
                hint: String::new(),
            };
        }
        Error::Io { path, source }
    }

    pub(crate) fn header(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Header {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            name: name.into(),
            reason: reason.into(),
        }
    }
}
