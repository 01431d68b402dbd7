//! Where a running config comes from, for startup and for every SIGHUP reload:
//! a TOML file, or Service manifests plus a cluster description (`run
//! --service --cluster`). A reload re-reads every file of its source, so a
//! changed manifest (affinity added, an annotation changed) takes effect the same
//! way an edited TOML does, and a bad one is refused with its file and field.

use std::path::PathBuf;

use super::cluster::{load_cluster, ClusterError};
use super::frontends::{config_from_plans, FrontendsError, RunSettings};
use crate::config::{self, Config, LoadError};

/// What `run` re-reads on SIGHUP. Started from flags, there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    Toml(PathBuf),
    Services(ServiceSource),
}

/// `run --service FILE... --cluster FILE... [--name NAME]` and its global flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSource {
    pub services: Vec<PathBuf>,
    pub clusters: Vec<PathBuf>,
    /// `--name`: a Service name or `namespace/name`, when the files hold several.
    pub select: Option<String>,
    pub settings: RunSettings,
}

/// Why a source could not give a config.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Toml(#[from] LoadError),
    #[error(transparent)]
    Service(#[from] super::K8sError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Frontends(#[from] FrontendsError),
}

impl ConfigSource {
    /// Reads and validates every file of the source, binding nothing.
    pub fn load(&self) -> Result<Config, SourceError> {
        match self {
            ConfigSource::Toml(path) => Ok(config::load_file(path)?),
            ConfigSource::Services(s) => s.load(),
        }
    }
}

impl ServiceSource {
    fn load(&self) -> Result<Config, SourceError> {
        let plans = super::plans_from_files(&self.services, self.select.as_deref())?;
        for plan in &plans {
            for note in &plan.notes {
                tracing::warn!("{}/{}: {note}", plan.namespace, plan.name);
            }
        }
        let cluster = load_cluster(&self.clusters)?;
        Ok(config_from_plans(&plans, &cluster, &self.settings)?)
    }
}
