//! Kubernetes in: a user's Service manifests (and where their nodes and pods
//! are) translated the way cloud-provider-azure configures the Azure Load
//! Balancer for AKS, into frontends lb-proxy runs and rules it prints.

pub mod cluster;
pub mod frontends;
pub mod plan;
pub mod source;
