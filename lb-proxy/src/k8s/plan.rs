//! What AKS would configure for one Service: the Azure Load Balancer's
//! load-balancing rules and health probes, the NSG's allowed client prefixes,
//! and the kube-proxy settings the hop needs. This is the translation's output
//! (`k8s::translate`), which `lb-proxy rules` prints in `az`'s shape and
//! `lb-proxy run --service` turns into frontends.
//!
//! Every field follows cloud-provider-azure; `docs/research/cloud-provider-azure.md`
//! cites the source line each rule comes from.

use std::time::Duration;

use lb_core::{DistributionMode, ExternalTrafficPolicy, SessionAffinity};

/// One Service, translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; rule and probe names derive from it (`a` + uid without dashes, 32 chars).
    pub uid: Option<String>,
    pub external_traffic_policy: ExternalTrafficPolicy,
    pub session_affinity: SessionAffinity,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` (kube-proxy's table; Azure does not use it).
    pub affinity_timeout: Duration,
    /// `spec.healthCheckNodePort` (set for `Local` services).
    pub health_check_node_port: Option<u16>,
    /// `spec.trafficDistribution`, as written (`PreferClose`, `PreferSameZone`, `PreferSameNode`).
    pub traffic_distribution: Option<String>,
    /// Allowed client prefixes, each normalised `IP/LEN`, from `spec.loadBalancerSourceRanges`
    /// or the `azure-allowed-ip-ranges` annotation. Empty: every client (the NSG's default for a
    /// public LB service). Validated: each entry parses as an IPv4 or IPv6 prefix.
    pub source_ranges: Vec<String>,
    /// One per `spec.ports[]` entry that has a rule (not `port_{n}_no_lb_rule`), in spec order.
    pub rules: Vec<LbRule>,
    /// The probes the rules refer to, deduplicated by name, in first-use order.
    pub probes: Vec<HealthProbe>,
    /// What the user should know but is not an error, one line each, naming the field:
    /// annotations accepted but not emulated, a stand-in for a missing `metadata.uid`, a port
    /// shown as 0 because the manifest has no `nodePort`/`healthCheckNodePort` yet.
    /// `lb-proxy rules` prints them to stderr.
    pub notes: Vec<String>,
}

/// Transport of a rule, as Azure spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleProtocol {
    Tcp,
    Udp,
}

/// One load-balancing rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbRule {
    /// cloud-provider-azure's name: `a<uid32>-TCP-80` (IPv4).
    pub name: String,
    /// The Service port's `name`, if any.
    pub port_name: Option<String>,
    pub protocol: RuleProtocol,
    pub frontend_port: u16,
    /// `port` with floating IP (the default), `nodePort` when floating IP is disabled.
    pub backend_port: u16,
    pub enable_floating_ip: bool,
    /// `spec.ports[].nodePort`: where lb-proxy connects on each node in real-cluster mode.
    pub node_port: Option<u16>,
    /// `spec.ports[].targetPort` when numeric: the pod's port in lab mode.
    pub target_port: Option<u16>,
    pub load_distribution: DistributionMode,
    /// 4–100, default 4.
    pub idle_timeout_minutes: u32,
    /// `Some(true)` on Standard TCP rules unless disabled by annotation; `None` (absent) on UDP.
    pub enable_tcp_reset: Option<bool>,
    /// The name of the probe in [`ServicePlan::probes`], `None` when the port has none.
    pub probe: Option<String>,
}

/// Protocol of an Azure health probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeProtocol {
    Tcp,
    Http,
    Https,
}

/// One health probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthProbe {
    pub name: String,
    pub protocol: ProbeProtocol,
    /// The port probed on each node (nodePort, healthCheckNodePort, or the annotation's);
    /// `0` when the manifest has no nodePort/healthCheckNodePort yet (see the plan's notes).
    pub port: u16,
    /// HTTP(S) only.
    pub request_path: Option<String>,
    pub interval_seconds: u32,
    /// The probe count annotation; cloud-provider-azure writes it to `probeThreshold`
    /// (not `numberOfProbes`, research doc §2.3).
    pub number_of_probes: u32,
}
