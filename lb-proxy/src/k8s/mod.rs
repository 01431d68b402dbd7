//! Kubernetes in: a user's Service manifests (and where their nodes and pods
//! are) translated the way cloud-provider-azure configures the Azure Load
//! Balancer for AKS, into frontends lb-proxy runs and rules it prints.
//!
//! The entry points: [`plans_from_files`] (manifests → [`plan::ServicePlan`]s)
//! and [`render_az_rules`] / [`render_az_probes`] (plans → what
//! `az network lb rule|probe list -o yaml` would print).

pub mod annotations;
pub mod az;
pub mod cluster;
pub mod error;
pub mod frontends;
pub mod manifest;
pub mod plan;
pub mod source;
pub mod translate;

use std::path::PathBuf;

pub use error::{K8sError, Location};
pub use plan::ServicePlan;

/// Reads Service manifests (YAML or JSON; single objects, several `---`
/// documents, `kind: List` / `ServiceList`), keeps the `kind: Service` items
/// and translates each. `select` (`name` or `namespace/name`) keeps only the
/// matching Services; an error when it matches none. Pure but for reading the files.
pub fn plans_from_files(
    paths: &[PathBuf],
    select: Option<&str>,
) -> Result<Vec<ServicePlan>, K8sError> {
    let mut found = Vec::new();
    for path in paths {
        found.extend(manifest::read_file(path)?);
    }
    let files = || {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if found.is_empty() {
        return Err(K8sError::NoService { files: files() });
    }
    let mut chosen: Vec<_> = found.iter().filter(|f| selected(f, select)).collect();
    // `kubectl get svc -o json` lists ClusterIP Services too; AKS gives them no
    // rules, so without --name they are passed over. Named, or alone, they are
    // an error (translate says why).
    if select.is_none() && chosen.iter().any(|f| is_load_balancer(f)) {
        chosen.retain(|f| is_load_balancer(f));
    }
    if chosen.is_empty() {
        return Err(K8sError::NotSelected {
            select: select.unwrap_or_default().to_string(),
            files: files(),
            found: found
                .iter()
                .map(qualified_name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    chosen
        .into_iter()
        .map(|f| {
            translate::translate(&f.service).map_err(|e| K8sError::Invalid {
                at: f.at(&e.path),
                message: e.message,
            })
        })
        .collect()
}

fn is_load_balancer(f: &manifest::FoundService) -> bool {
    let spec = f.service.spec.as_ref();
    spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// `namespace/name` (namespace `default` when the manifest has none).
fn qualified_name(f: &manifest::FoundService) -> String {
    let meta = &f.service.metadata;
    format!(
        "{}/{}",
        meta.namespace
            .as_deref()
            .unwrap_or(translate::DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or("?")
    )
}

/// `select` is a name, or `namespace/name`; `None` keeps every Service.
fn selected(f: &manifest::FoundService, select: Option<&str>) -> bool {
    match select {
        None => true,
        Some(s) if s.contains('/') => qualified_name(f) == s,
        Some(s) => f.service.metadata.name.as_deref() == Some(s),
    }
}

/// The plans' load-balancing rules as `az network lb rule list -o yaml` prints them.
pub fn render_az_rules(plans: &[ServicePlan]) -> String {
    az::render_rules(plans)
}

/// The plans' health probes as `az network lb probe list -o yaml` prints them.
pub fn render_az_probes(plans: &[ServicePlan]) -> String {
    az::render_probes(plans)
}
