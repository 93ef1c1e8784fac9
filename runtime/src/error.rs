//! The library's error type: every failure names what was wrong and where (file, tensor, field).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    /// A plugin failed or returned something invalid; the message names the plugin and hook.
    #[error("{0}")]
    Plugin(String),
    /// The CUDA device, driver or a CUDA library is missing or failed.
    #[error("{0}")]
    Device(String),
    /// A device (or a memory budget) could not hold an allocation; the message says how much
    /// was asked for and what was free. `auto_find_batch_size` retries with a smaller batch.
    #[error("{0}")]
    OutOfMemory(String),
    /// Training stopped when asked (SIGTERM, SIGINT) after writing a checkpoint to resume from.
    #[error("{0}")]
    Interrupted(String),
    /// An error every process of a data parallel run reached together (they were given different
    /// runs): each exits with it, none needs to end the others.
    #[error("{0}")]
    Agreed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
    pub fn config(path: &Path, msg: impl Into<String>) -> Self {
        Error::Config { path: path.to_path_buf(), msg: msg.into() }
    }
    pub fn tensor(path: &Path, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), msg: msg.into() }
    }
    pub fn weights(path: &Path, msg: impl Into<String>) -> Self {
        Error::Weights { path: path.to_path_buf(), msg: msg.into() }
    }
}
