//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong in lb-bench's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad argument: {0}")]
    BadArgument(String),
    #[error("{what} did not become ready within {secs} s{log}")]
    NotReady {
        what: String,
        secs: u64,
        /// The tail of its log, prefixed with a newline, or empty.
        log: String,
    },
    #[error("{what} exited ({status}) before it was ready{log}")]
    ExitedEarly {
        what: String,
        status: String,
        log: String,
    },
    #[error("binary not found: {path}: {hint}")]
    MissingBinary { path: PathBuf, hint: String },
    #[error("unexpected answer from {what}: {detail}")]
    Protocol { what: String, detail: String },
    #[error("chart: {0}")]
    Chart(String),
    #[error("{path}: {detail}")]
    Unreadable { path: PathBuf, detail: String },
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to `std::io::Result`s.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
