//! The one error type of the Service translation: every failure names the
//! file it came from and, where there is one, the field path inside the
//! manifest (`svc.yaml: spec.ports[1].protocol: ...`), so a user can find the
//! line to fix.

use std::fmt;

/// Where in the input a problem sits: the file (with the YAML document number
/// when the file holds several) and the field path within that object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file as given on the command line, plus ` (document N)` for the
    /// second and later YAML documents.
    pub file: String,
    /// `spec.ports[1].nodePort`, `items[2].metadata.annotations["..."]`; empty
    /// when the problem is the whole document.
    pub path: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.file)
        } else {
            write!(f, "{}: {}", self.file, self.path)
        }
    }
}

/// Why Service manifests could not be turned into plans.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML/JSON, or a field has the wrong shape for the
    /// Kubernetes API type (serde's message, with the field path).
    #[error("{at}: {message}")]
    Parse { at: Location, message: String },
    /// The manifest is well-formed but asks for something cloud-provider-azure
    /// rejects, or that this translation does not support.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    /// No `kind: Service` object in any of the files.
    #[error("no Service (kind: Service) in {files}")]
    NoService { files: String },
    /// `--name` matched none of the Services read.
    #[error("no Service named `{select}` in {files} (found: {found})")]
    NotSelected {
        select: String,
        files: String,
        found: String,
    },
}
