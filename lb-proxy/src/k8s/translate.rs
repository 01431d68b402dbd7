//! One Service (k8s-openapi's type) → one [`ServicePlan`]: the rules, probes
//! and allowed prefixes cloud-provider-azure would configure, following
//! `docs/research/cloud-provider-azure.md` (CPA master @7b31c76) section by
//! section. Pure: no I/O; every refusal names the manifest field.
//!
//! Where lb-proxy is stricter than CPA (CPA falls back silently, lb-proxy
//! refuses) the comment says so: an unknown probe protocol in an annotation,
//! an invalid (or empty) source range, a per-port key for a port the Service
//! lacks. A `metadata.uid` that is not a UUID is refused too (the API server
//! never assigns one; the rule names are cut from it).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_core::{DistributionMode, ExternalTrafficPolicy, SessionAffinity, SourcePrefix};

use super::annotations::{self, key, param, Annotations};
use super::plan::{HealthProbe, LbRule, ProbeProtocol, RuleProtocol, ServicePlan};

/// A refusal: the field path inside the object and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

fn refuse<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        path: path.into(),
        message: message.into(),
    })
}

/// `metadata.namespace` when absent (kubectl applies to the current namespace; `default` here).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Rule/probe name prefix length: `a` + uid without dashes, cut to 32 (research doc §1.6).
const RULE_PREFIX_LEN: usize = 32;
/// `idleTimeoutInMinutes` bounds and default (§1.3).
const IDLE_TIMEOUT_MINUTES: std::ops::RangeInclusive<u32> = 4..=100;
const DEFAULT_IDLE_TIMEOUT_MINUTES: u32 = 4;
/// Probe interval and count: in CPA each minimum is also the default
/// (`HealthProbeDefaultProbeInterval` 5, `HealthProbeDefaultNumOfProbe` 2,
/// consts.go L495/L500), and their product must stay under 120 s (§2.3).
const MIN_PROBE_INTERVAL: u32 = 5;
const MIN_NUM_OF_PROBE: u32 = 2;
const PROBE_TOTAL_LIMIT_SECONDS: u32 = 120;
/// `requestPath` of Http(s) probes when no annotation sets one (§2.1, `HealthProbeDefaultRequestPath`).
const DEFAULT_PROBE_PATH: &str = "/";
/// The path kube-proxy's health check node port serves under `Local` (§2.1).
const LOCAL_HEALTHZ_PATH: &str = "/healthz";
/// The `trafficDistribution` values Kubernetes 1.36 knows.
const TRAFFIC_DISTRIBUTIONS: &[&str] = &["PreferClose", "PreferSameZone", "PreferSameNode"];
/// The port shown where the manifest has no nodePort / healthCheckNodePort yet
/// (hand-written: the API server allocates them at create). Azure's probe
/// ports are 1–65535, so 0 cannot be mistaken for a real one.
pub const UNALLOCATED_PORT: u16 = 0;

/// Translates one Service.
pub fn translate(svc: &Service) -> Result<ServicePlan, FieldError> {
    let name = svc.metadata.name.clone().ok_or_else(|| FieldError {
        path: "metadata.name".into(),
        message: "missing".into(),
    })?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let Some(spec) = &svc.spec else {
        return refuse("spec", "missing");
    };
    let empty = BTreeMap::new();
    let ann = Annotations::new(svc.metadata.annotations.as_ref().unwrap_or(&empty));
    let mut notes = Vec::new();

    check_type_and_families(spec)?;
    check_ports(spec)?;
    not_emulated_spec_fields(spec, &mut notes);
    let not_emulated = check_annotations(&ann, spec)?;
    notes.extend(
        not_emulated
            .iter()
            .map(|k| format!("{}: not emulated ({})", annotations::path(&k.key), k.what)),
    );

    let policy = traffic_policy(spec)?;
    let (session_affinity, affinity_timeout) = affinity(spec)?;
    let traffic_distribution = traffic_distribution(spec)?;
    let source_ranges = source_ranges(spec, &ann)?;
    let uid = checked_uid(svc.metadata.uid.as_deref())?;
    let prefix = rule_prefix(uid, &namespace, &name, &mut notes);
    let health_check_node_port =
        port_field(spec.health_check_node_port, "spec.healthCheckNodePort")?;

    let ctx = Context {
        spec,
        ann: &ann,
        prefix: &prefix,
        policy,
        distribution: match session_affinity {
            SessionAffinity::ClientIp => DistributionMode::SourceIp,
            SessionAffinity::None => DistributionMode::FiveTuple,
        },
        health_check_node_port,
    };
    let (rules, probes) = ctx.rules_and_probes(&mut notes)?;
    Ok(ServicePlan {
        namespace,
        name,
        uid: svc.metadata.uid.clone(),
        external_traffic_policy: policy,
        session_affinity,
        affinity_timeout,
        health_check_node_port,
        traffic_distribution,
        source_ranges,
        rules,
        probes,
        notes,
    })
}

/// `type: LoadBalancer` only; IPv4 only; no `loadBalancerClass` (CPA leaves such Services to another controller).
fn check_type_and_families(spec: &ServiceSpec) -> Result<(), FieldError> {
    match spec.type_.as_deref() {
        Some("LoadBalancer") => {}
        None => return refuse("spec.type", "not set (ClusterIP, the default): only type LoadBalancer gets Azure Load Balancer rules"),
        Some(other) => return refuse("spec.type", format!("`{other}`: only type LoadBalancer gets Azure Load Balancer rules")),
    }
    if let Some(class) = &spec.load_balancer_class {
        return refuse("spec.loadBalancerClass", format!("`{class}`: cloud-provider-azure does not reconcile Services with a loadBalancerClass"));
    }
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        if family != "IPv4" {
            return refuse(format!("spec.ipFamilies[{i}]"), format!("`{family}`: only IPv4 rules are emulated (IPv6 rules get an -IPv6 suffix in AKS, research doc §1.6)"));
        }
    }
    Ok(())
}

/// At least one port; each a valid number, TCP or UDP (SCTP needs an internal LB, §1.1 step 3).
fn check_ports(spec: &ServiceSpec) -> Result<(), FieldError> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return refuse(
            "spec.ports",
            "a LoadBalancer Service needs at least one port",
        );
    }
    for (i, p) in ports.iter().enumerate() {
        port_number(p.port, &format!("spec.ports[{i}].port"))?;
        port_field(p.node_port, &format!("spec.ports[{i}].nodePort"))?;
        let protocol = rule_protocol(p, i)?;
        // Kubernetes refuses a repeated (port, protocol); two rules would share a name.
        let earlier = ports[..i]
            .iter()
            .enumerate()
            .find(|(j, q)| q.port == p.port && rule_protocol(q, *j).ok() == Some(protocol));
        if let Some((j, _)) = earlier {
            return refuse(
                format!("spec.ports[{i}]"),
                format!(
                    "port {} with this protocol is already spec.ports[{j}]",
                    p.port
                ),
            );
        }
    }
    Ok(())
}

/// Spec fields that shape the Azure frontend's address, not its rules, probes
/// or allowed clients: accepted, and said.
fn not_emulated_spec_fields(spec: &ServiceSpec, notes: &mut Vec<String>) {
    if let Some(ip) = &spec.load_balancer_ip {
        notes.push(format!(
            "spec.loadBalancerIP: {ip}: not emulated (the frontend's public IP)"
        ));
    }
    if spec
        .external_ips
        .as_ref()
        .is_some_and(|ips| !ips.is_empty())
    {
        notes.push(
            "spec.externalIPs: not emulated (kube-proxy's, not the Azure Load Balancer's)".into(),
        );
    }
}

fn check_annotations(
    ann: &Annotations,
    spec: &ServiceSpec,
) -> Result<Vec<annotations::NotEmulatedKey>, FieldError> {
    let mut ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
    ports.extend(spec.health_check_node_port);
    ann.check(&ports).map_err(|r| FieldError {
        path: annotations::path(&r.key),
        message: r.message,
    })
}

fn port_number(value: i32, path: &str) -> Result<u16, FieldError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => refuse(path, format!("{value} is not a port (1-65535)")),
    }
}

fn port_field(value: Option<i32>, path: &str) -> Result<Option<u16>, FieldError> {
    value.map(|v| port_number(v, path)).transpose()
}

/// The rule's transport (research doc §1.1 step 4); `protocol` defaults to TCP.
fn rule_protocol(p: &ServicePort, i: usize) -> Result<RuleProtocol, FieldError> {
    match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Ok(RuleProtocol::Tcp),
        "UDP" => Ok(RuleProtocol::Udp),
        "SCTP" => refuse(format!("spec.ports[{i}].protocol"), "SCTP: cloud-provider-azure allows it only on an internal load balancer, which lb-proxy does not emulate"),
        other => refuse(format!("spec.ports[{i}].protocol"), format!("`{other}`: only TCP, UDP and SCTP are supported for Azure LoadBalancers")),
    }
}

fn traffic_policy(spec: &ServiceSpec) -> Result<ExternalTrafficPolicy, FieldError> {
    match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => Ok(ExternalTrafficPolicy::Cluster),
        Some("Local") => Ok(ExternalTrafficPolicy::Local),
        Some(other) => refuse(
            "spec.externalTrafficPolicy",
            format!("`{other}`: expected Cluster or Local"),
        ),
    }
}

/// `sessionAffinity` and kube-proxy's affinity timeout (research doc §1.4;
/// Kubernetes validation: 1 s to `MAX_AFFINITY_TIMEOUT`, config only with ClientIP).
fn affinity(spec: &ServiceSpec) -> Result<(SessionAffinity, Duration), FieldError> {
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => SessionAffinity::None,
        Some("ClientIP") => SessionAffinity::ClientIp,
        Some(other) => {
            return refuse(
                "spec.sessionAffinity",
                format!("`{other}`: expected None or ClientIP"),
            )
        }
    };
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    if spec.session_affinity_config.is_some() && affinity == SessionAffinity::None {
        return refuse(
            "spec.sessionAffinityConfig",
            "must not be set when sessionAffinity is None",
        );
    }
    let timeout = match timeout {
        None => lb_core::DEFAULT_AFFINITY_TIMEOUT,
        Some(s) => match u64::try_from(s) {
            Ok(secs @ 1..) if secs <= lb_core::MAX_AFFINITY_TIMEOUT.as_secs() => {
                Duration::from_secs(secs)
            }
            _ => {
                return refuse(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!(
                        "{s}: must be between 1 and {}",
                        lb_core::MAX_AFFINITY_TIMEOUT.as_secs()
                    ),
                )
            }
        },
    };
    Ok((affinity, timeout))
}

fn traffic_distribution(spec: &ServiceSpec) -> Result<Option<String>, FieldError> {
    match spec.traffic_distribution.as_deref() {
        None => Ok(None),
        Some(v) if TRAFFIC_DISTRIBUTIONS.contains(&v) => Ok(Some(v.to_string())),
        Some(v) => refuse(
            "spec.trafficDistribution",
            format!(
                "`{v}`: expected one of {}",
                TRAFFIC_DISTRIBUTIONS.join(", ")
            ),
        ),
    }
}

/// Allowed client prefixes (research doc §3): `spec.loadBalancerSourceRanges`,
/// or the comma-separated `azure-allowed-ip-ranges` merged with the upstream
/// `load-balancer-source-ranges` annotation; both = CPA's hard error. Each
/// entry goes through lb-core's [`SourcePrefix::parse`], the parser the
/// running frontend uses, so one parser decides. CPA only warns on an invalid
/// entry (an empty one from a trailing comma included) and then denies
/// everyone else; lb-proxy refuses it.
fn source_ranges(spec: &ServiceSpec, ann: &Annotations) -> Result<Vec<String>, FieldError> {
    let spec_ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let from_annotations: Vec<(&str, &str)> = [key::ALLOWED_IP_RANGES, key::UPSTREAM_SOURCE_RANGES]
        .into_iter()
        .flat_map(|k| {
            ann.get(k)
                .into_iter()
                .flat_map(|v| v.split(','))
                .map(move |e| (k, e))
        })
        .collect();
    let both = !spec_ranges.is_empty() && !from_annotations.is_empty();
    let mut out: Vec<String> = Vec::new();
    let entries = spec_ranges
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("spec.loadBalancerSourceRanges[{i}]"), e.as_str()))
        .chain(
            from_annotations
                .into_iter()
                .map(|(k, e)| (annotations::path(k), e)),
        );
    for (path, entry) in entries {
        let prefix = SourcePrefix::parse(entry)
            .map_err(|why| FieldError {
                path,
                message: format!("`{}` {why}", entry.trim()),
            })?
            .to_string();
        if !out.contains(&prefix) {
            out.push(prefix);
        }
    }
    // After the entries, so that an annotation left empty is named as such.
    if both {
        return refuse(
            "spec.loadBalancerSourceRanges",
            format!(
                "cannot set both spec.LoadBalancerSourceRanges and service annotation {}",
                key::ALLOWED_IP_RANGES
            ),
        );
    }
    Ok(out)
}

/// `metadata.uid`: Kubernetes uids are UUIDs, so hex digits and dashes only.
/// Anything else is refused: the rule names are cut from it by bytes and
/// printed unquoted.
fn checked_uid(uid: Option<&str>) -> Result<Option<&str>, FieldError> {
    match uid {
        Some(u) if !u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') => refuse(
            "metadata.uid",
            format!("`{u}`: expected a UUID (hex digits and dashes), as the API server assigns"),
        ),
        _ => Ok(uid),
    }
}

/// `a` + uid without dashes, cut to 32 (research doc §1.6). With no uid (a
/// hand-written manifest: the API server assigns it at create), a stand-in uid
/// from the namespace and name, said in a note.
fn rule_prefix(uid: Option<&str>, namespace: &str, name: &str, notes: &mut Vec<String>) -> String {
    let uid = match uid {
        Some(uid) => uid.replace('-', ""),
        None => {
            let stand_in = stand_in_uid(namespace, name);
            notes.push(format!("metadata.uid: not set (the API server assigns one); rule and probe names use a{stand_in}, from namespace/name"));
            stand_in
        }
    };
    let mut prefix = format!("a{uid}");
    prefix.truncate(RULE_PREFIX_LEN);
    prefix
}

/// 31 hex digits of SHA-256(`namespace/name`): stable across runs, distinct per Service.
fn stand_in_uid(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..RULE_PREFIX_LEN - 1].to_string()
}

/// Everything the per-port steps share.
struct Context<'a> {
    spec: &'a ServiceSpec,
    ann: &'a Annotations<'a>,
    prefix: &'a str,
    policy: ExternalTrafficPolicy,
    distribution: DistributionMode,
    health_check_node_port: Option<u16>,
}

impl Context<'_> {
    /// One rule per port not marked `no_lb_rule`, each with its probe (research doc §1.1, §2).
    fn rules_and_probes(
        &self,
        notes: &mut Vec<String>,
    ) -> Result<(Vec<LbRule>, Vec<HealthProbe>), FieldError> {
        let idle_timeout = self.idle_timeout()?;
        let tcp_reset = !Annotations::is_true(self.ann.get(key::DISABLE_TCP_RESET));
        let floating_ip = !Annotations::is_true(self.ann.get(key::DISABLE_FLOATING_IP));
        let local_probe = self.local_probe(notes)?;
        let mut rules = Vec::new();
        let mut probes: Vec<HealthProbe> = Vec::new();
        for (i, port) in self.spec.ports.iter().flatten().enumerate() {
            if Annotations::is_true(
                self.ann
                    .get_port(port.port, param::NO_LB_RULE)
                    .map(|(_, v)| v),
            ) {
                continue;
            }
            let protocol = rule_protocol(port, i)?;
            let name = format!(
                "{}-{}-{}",
                self.prefix,
                if protocol == RuleProtocol::Tcp {
                    "TCP"
                } else {
                    "UDP"
                },
                port.port
            );
            let probe = self.probe_for(port, i, &name, local_probe.as_ref(), notes)?;
            let node_port = port_field(port.node_port, &format!("spec.ports[{i}].nodePort"))?;
            let frontend_port = port_number(port.port, &format!("spec.ports[{i}].port"))?;
            let backend_port = if floating_ip {
                frontend_port
            } else {
                node_port.unwrap_or_else(|| {
                    unallocated(notes, &format!("spec.ports[{i}].nodePort"), "backendPort")
                })
            };
            rules.push(LbRule {
                name,
                port_name: port.name.clone(),
                protocol,
                frontend_port,
                backend_port,
                enable_floating_ip: floating_ip,
                node_port,
                target_port: match &port.target_port {
                    Some(IntOrString::Int(t)) => {
                        Some(port_number(*t, &format!("spec.ports[{i}].targetPort"))?)
                    }
                    Some(IntOrString::String(_)) => None,
                    None => Some(frontend_port),
                },
                load_distribution: self.distribution,
                idle_timeout_minutes: idle_timeout,
                enable_tcp_reset: (protocol == RuleProtocol::Tcp).then_some(tcp_reset),
                probe: probe.as_ref().map(|p| p.name.clone()),
            });
            if let Some(p) = probe {
                if !probes.iter().any(|q| q.name == p.name) {
                    probes.push(p);
                }
            }
        }
        self.note_udp_idle_timeout(&rules, notes);
        if rules.iter().all(|r| r.probe.is_none()) && !rules.is_empty() {
            notes.push("no rule has a probe (UDP ports under Cluster, or no_probe_rule): Azure then sends to every node in the pool".into());
        }
        Ok((rules, probes))
    }

    /// Azure reads `idleTimeoutInMinutes` on TCP rules only ("only used when
    /// the protocol is set to TCP", §1.3): the UDP rules print it as CPA writes
    /// it, the running UDP frontends keep lb-proxy's UDP flow timeout. Said
    /// when the annotation asks for a timeout and some rule is UDP.
    fn note_udp_idle_timeout(&self, rules: &[LbRule], notes: &mut Vec<String>) {
        if self.ann.get(key::IDLE_TIMEOUT).is_some()
            && rules.iter().any(|r| r.protocol == RuleProtocol::Udp)
        {
            notes.push(format!(
                "{}: applies to TCP rules only (Azure ignores it on UDP); the UDP rules show it as cloud-provider-azure writes it, and lb-proxy's UDP frontends keep their flow timeout of {} s",
                annotations::path(key::IDLE_TIMEOUT),
                crate::config::DEFAULT_UDP_IDLE_TIMEOUT.as_secs()
            ));
        }
    }

    /// `azure-load-balancer-tcp-idle-timeout`: whole minutes 4–100, default 4;
    /// CPA writes it on UDP rules too, where Azure ignores it (§1.3).
    fn idle_timeout(&self) -> Result<u32, FieldError> {
        let Some(v) = self.ann.get(key::IDLE_TIMEOUT) else {
            return Ok(DEFAULT_IDLE_TIMEOUT_MINUTES);
        };
        match v.parse::<u32>() {
            Ok(m) if IDLE_TIMEOUT_MINUTES.contains(&m) => Ok(m),
            _ => refuse(annotations::path(key::IDLE_TIMEOUT), format!("`{v}`: idle timeout value must be a whole number representing minutes between 4 and 100")),
        }
    }

    /// Under `Local`: HTTP `/healthz` on healthCheckNodePort, named after that
    /// port, interval and count read for that port (§2.1).
    fn local_probe(&self, notes: &mut Vec<String>) -> Result<Option<HealthProbe>, FieldError> {
        if self.policy != ExternalTrafficPolicy::Local {
            return Ok(None);
        }
        let port = self.health_check_node_port.unwrap_or_else(|| {
            unallocated(
                notes,
                "spec.healthCheckNodePort",
                "the /healthz probe's port",
            )
        });
        let (interval_seconds, number_of_probes) = self.interval_and_count(i32::from(port))?;
        Ok(Some(HealthProbe {
            name: format!("{}-TCP-{port}", self.prefix),
            protocol: ProbeProtocol::Http,
            port,
            request_path: Some(LOCAL_HEALTHZ_PATH.into()),
            interval_seconds,
            number_of_probes,
        }))
    }

    /// The probe a port's rule refers to (§2.1, §2.2, §2.4): none with
    /// `no_probe_rule`; the per-port probe when one is built; else, under
    /// Local, the shared `/healthz` probe (UDP rules included).
    fn probe_for(
        &self,
        port: &ServicePort,
        i: usize,
        rule: &str,
        local: Option<&HealthProbe>,
        notes: &mut Vec<String>,
    ) -> Result<Option<HealthProbe>, FieldError> {
        if Annotations::is_true(
            self.ann
                .get_port(port.port, param::NO_PROBE_RULE)
                .map(|(_, v)| v),
        ) {
            return Ok(None);
        }
        if let Some(own) = self.port_probe(port, i, rule, notes)? {
            return Ok(Some(own));
        }
        Ok(local.cloned())
    }

    /// `buildHealthProbeRulesForPort` (§2.1–2.3): TCP ports only; under Local
    /// only when `port_{n}_health-probe_port` is set.
    fn port_probe(
        &self,
        port: &ServicePort,
        i: usize,
        rule: &str,
        notes: &mut Vec<String>,
    ) -> Result<Option<HealthProbe>, FieldError> {
        if rule_protocol(port, i)? != RuleProtocol::Tcp {
            return Ok(None);
        }
        let probe_port = self.probe_port_annotation(port)?;
        if self.policy == ExternalTrafficPolicy::Local && probe_port.is_none() {
            return Ok(None);
        }
        let probe_port = match probe_port {
            Some(p) => p,
            None => port_field(port.node_port, &format!("spec.ports[{i}].nodePort"))?
                .unwrap_or_else(|| {
                    unallocated(
                        notes,
                        &format!("spec.ports[{i}].nodePort"),
                        "the probe's port",
                    )
                }),
        };
        let protocol = self.probe_protocol(port)?;
        let request_path = match protocol {
            ProbeProtocol::Tcp => None,
            ProbeProtocol::Http | ProbeProtocol::Https => Some(
                self.ann
                    .get_port(port.port, param::PROBE_REQUEST_PATH)
                    .map(|(_, v)| v)
                    .or_else(|| self.ann.get(key::PROBE_REQUEST_PATH))
                    .unwrap_or(DEFAULT_PROBE_PATH)
                    .to_string(),
            ),
        };
        let (interval_seconds, number_of_probes) = self.interval_and_count(port.port)?;
        Ok(Some(HealthProbe {
            name: rule.to_string(),
            protocol,
            port: probe_port,
            request_path,
            interval_seconds,
            number_of_probes,
        }))
    }

    /// `port_{n}_health-probe_port`: a port name (→ its nodePort), a Service
    /// port number (→ its nodePort), or any other number used as is (§2.2).
    fn probe_port_annotation(&self, port: &ServicePort) -> Result<Option<u16>, FieldError> {
        let Some((key, v)) = self.ann.get_port(port.port, param::PROBE_PORT) else {
            return Ok(None);
        };
        let ports = self.spec.ports.as_deref().unwrap_or_default();
        let target = match v.parse::<i32>() {
            Ok(n) => ports
                .iter()
                .find(|p| p.port == n)
                .map(|p| p.node_port)
                .unwrap_or(Some(n)),
            Err(_) => match ports
                .iter()
                .find(|p| p.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(v)))
            {
                Some(p) => p.node_port,
                None => {
                    return refuse(
                        annotations::path(&key),
                        format!("port {v} not found in service"),
                    )
                }
            },
        };
        match target {
            Some(n) => port_number(n, &annotations::path(&key)).map(Some),
            None => refuse(
                annotations::path(&key),
                format!("`{v}` names a port with no nodePort in the manifest"),
            ),
        }
    }

    /// Per-port annotation > appProtocol > global annotation > Tcp (§2.1). An
    /// appProtocol other than tcp/http/https probes Tcp as CPA does; an
    /// annotation value other than those is refused (CPA would silently use Tcp).
    fn probe_protocol(&self, port: &ServicePort) -> Result<ProbeProtocol, FieldError> {
        if let Some((key, v)) = self.ann.get_port(port.port, param::PROBE_PROTOCOL) {
            return parse_probe_protocol(v).ok_or_else(|| bad_probe_protocol(&key, v));
        }
        if let Some(app) = &port.app_protocol {
            return Ok(parse_probe_protocol(app.trim()).unwrap_or(ProbeProtocol::Tcp));
        }
        match self.ann.get(key::PROBE_PROTOCOL) {
            Some(v) => {
                parse_probe_protocol(v).ok_or_else(|| bad_probe_protocol(key::PROBE_PROTOCOL, v))
            }
            None => Ok(ProbeProtocol::Tcp),
        }
    }

    /// Interval and count for a port: per-port > global > default, each at its
    /// minimum or above, their product under 120 s (§2.3).
    fn interval_and_count(&self, port: i32) -> Result<(u32, u32), FieldError> {
        let interval = self.probe_setting(
            port,
            param::PROBE_INTERVAL,
            key::PROBE_INTERVAL,
            MIN_PROBE_INTERVAL,
            "interval",
        )?;
        let count = self.probe_setting(
            port,
            param::PROBE_NUM_OF_PROBE,
            key::PROBE_NUM_OF_PROBE,
            MIN_NUM_OF_PROBE,
            "num-of-probe",
        )?;
        if interval.0.saturating_mul(count.0) >= PROBE_TOTAL_LIMIT_SECONDS {
            let at = count.1.or(interval.1).unwrap_or_default();
            return refuse(annotations::path(&at), format!("interval {} x num-of-probe {}: total probe should be less than 120, please adjust interval and number of probe accordingly", interval.0, count.0));
        }
        Ok((interval.0, count.0))
    }

    /// One of interval / count, with the key it came from (`None`: the
    /// default, which is the minimum).
    fn probe_setting(
        &self,
        port: i32,
        per_port: &str,
        global: &str,
        min: u32,
        what: &str,
    ) -> Result<(u32, Option<String>), FieldError> {
        let found = self
            .ann
            .get_port(port, per_port)
            .or_else(|| self.ann.get(global).map(|v| (global.to_string(), v)));
        let Some((key, v)) = found else {
            return Ok((min, None));
        };
        match v.parse::<u32>() {
            Ok(n) if n >= min => Ok((n, Some(key))),
            Ok(_) => refuse(
                annotations::path(&key),
                format!("`{v}`: the minimum value of {what} is {min}"),
            ),
            Err(_) => refuse(
                annotations::path(&key),
                format!("`{v}`: not a whole number"),
            ),
        }
    }
}

fn parse_probe_protocol(v: &str) -> Option<ProbeProtocol> {
    match v.to_ascii_lowercase().as_str() {
        "tcp" => Some(ProbeProtocol::Tcp),
        "http" => Some(ProbeProtocol::Http),
        "https" => Some(ProbeProtocol::Https),
        _ => None,
    }
}

fn bad_probe_protocol(key: &str, v: &str) -> FieldError {
    FieldError {
        path: annotations::path(key),
        message: format!("`{v}`: expected Tcp, Http or Https"),
    }
}

/// A port the manifest does not carry yet: noted, shown as [`UNALLOCATED_PORT`].
fn unallocated(notes: &mut Vec<String>, field: &str, used_as: &str) -> u16 {
    let note = format!(
        "{field}: not set (the API server allocates it); {used_as} shown as {UNALLOCATED_PORT}"
    );
    if !notes.contains(&note) {
        notes.push(note);
    }
    UNALLOCATED_PORT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::manifest::read_str;

    /// A LoadBalancer Service with these annotations (YAML lines under
    /// `annotations:`), spec lines, and ports (YAML list under `ports:`).
    fn service(annotations: &[(&str, &str)], spec: &str, ports: &str) -> Service {
        let mut text = String::from("apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  uid: 0123-4567-89ab-cdef-0123-4567-89ab-cdef-0123\n");
        if !annotations.is_empty() {
            text.push_str("  annotations:\n");
            for (k, v) in annotations {
                text.push_str(&format!("    {k}: \"{v}\"\n"));
            }
        }
        text.push_str("spec:\n  type: LoadBalancer\n");
        for line in spec.lines() {
            text.push_str(&format!("  {line}\n"));
        }
        text.push_str("  ports:");
        if ports.starts_with('[') {
            text.push_str(&format!(" {ports}"));
        }
        text.push('\n');
        for line in ports.lines().filter(|l| !l.starts_with('[')) {
            text.push_str(&format!("  {line}\n"));
        }
        read_str("t.yaml", &text).unwrap().remove(0).service
    }

    const TCP80: &str = "- {name: http, port: 80, nodePort: 30080}";
    const TWO: &str = "- {name: http, port: 80, nodePort: 30080}\n- {name: dns, port: 53, protocol: UDP, nodePort: 30053}";

    fn plan(annotations: &[(&str, &str)], spec: &str, ports: &str) -> ServicePlan {
        translate(&service(annotations, spec, ports)).unwrap()
    }

    fn error(annotations: &[(&str, &str)], spec: &str, ports: &str) -> FieldError {
        translate(&service(annotations, spec, ports)).unwrap_err()
    }

    fn per_port(port: i32, p: &str) -> String {
        Annotations::port_key(port, p)
    }

    #[test]
    fn defaults_match_cloud_provider_azure() {
        let p = plan(&[], "", TWO);
        assert_eq!(p.rules.len(), 2);
        let tcp = &p.rules[0];
        assert_eq!(tcp.name, "a0123456789abcdef0123456789abcde-TCP-80");
        assert_eq!(
            (tcp.frontend_port, tcp.backend_port, tcp.enable_floating_ip),
            (80, 80, true)
        );
        assert_eq!(tcp.load_distribution, DistributionMode::FiveTuple);
        assert_eq!(
            (tcp.idle_timeout_minutes, tcp.enable_tcp_reset),
            (4, Some(true))
        );
        assert_eq!(tcp.probe.as_deref(), Some(tcp.name.as_str()));
        let udp = &p.rules[1];
        assert_eq!(
            (udp.protocol, udp.enable_tcp_reset, udp.probe.as_deref()),
            (RuleProtocol::Udp, None, None)
        );
        assert_eq!(
            udp.idle_timeout_minutes, 4,
            "CPA puts the idle timeout on UDP rules too"
        );
        assert_eq!(
            p.probes,
            vec![HealthProbe {
                name: tcp.name.clone(),
                protocol: ProbeProtocol::Tcp,
                port: 30080,
                request_path: None,
                interval_seconds: 5,
                number_of_probes: 2
            }]
        );
        assert_eq!(p.affinity_timeout, lb_core::DEFAULT_AFFINITY_TIMEOUT);
        assert!(
            p.source_ranges.is_empty() && p.notes.is_empty(),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn client_ip_affinity_gives_source_ip_and_its_timeout() {
        let p = plan(
            &[],
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
            TCP80,
        );
        assert_eq!(p.rules[0].load_distribution, DistributionMode::SourceIp);
        assert_eq!(
            (p.session_affinity, p.affinity_timeout),
            (SessionAffinity::ClientIp, Duration::from_secs(600))
        );
        let e = error(
            &[],
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
            TCP80,
        );
        assert_eq!(e.path, "spec.sessionAffinityConfig.clientIP.timeoutSeconds");
        let e = error(
            &[],
            "sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            TCP80,
        );
        assert_eq!(e.path, "spec.sessionAffinityConfig");
        assert_eq!(
            error(&[], "sessionAffinity: Sticky", TCP80).path,
            "spec.sessionAffinity"
        );
    }

    #[test]
    fn idle_timeout_annotation_is_whole_minutes_4_to_100() {
        let p = plan(&[(key::IDLE_TIMEOUT, "30")], "", TWO);
        assert!(p.rules.iter().all(|r| r.idle_timeout_minutes == 30));
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("applies to TCP rules only")),
            "the UDP rule's printed value is not what runs: {:?}",
            p.notes
        );
        assert!(plan(&[(key::IDLE_TIMEOUT, "30")], "", TCP80)
            .notes
            .is_empty());
        assert_eq!(
            plan(&[(key::IDLE_TIMEOUT, " 4 ")], "", TCP80).rules[0].idle_timeout_minutes,
            4
        );
        for bad in ["3", "101", "4.5", "ten"] {
            let e = error(&[(key::IDLE_TIMEOUT, bad)], "", TCP80);
            assert_eq!(e.path, annotations::path(key::IDLE_TIMEOUT), "{bad}");
            assert!(e.message.contains("between 4 and 100"), "{}", e.message);
        }
    }

    #[test]
    fn tcp_reset_can_be_disabled_on_tcp_rules_only() {
        let p = plan(&[(key::DISABLE_TCP_RESET, "TRUE")], "", TWO);
        assert_eq!(
            p.rules
                .iter()
                .map(|r| r.enable_tcp_reset)
                .collect::<Vec<_>>(),
            [Some(false), None]
        );
        assert_eq!(
            plan(&[(key::DISABLE_TCP_RESET, "no")], "", TCP80).rules[0].enable_tcp_reset,
            Some(true)
        );
    }

    #[test]
    fn floating_ip_off_sends_to_the_node_port() {
        let r = &plan(&[(key::DISABLE_FLOATING_IP, "true")], "", TCP80).rules[0];
        assert_eq!(
            (r.backend_port, r.enable_floating_ip, r.node_port),
            (30080, false, Some(30080))
        );
        let p = plan(&[(key::DISABLE_FLOATING_IP, "true")], "", "- port: 80");
        assert_eq!(p.rules[0].backend_port, UNALLOCATED_PORT);
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("spec.ports[0].nodePort: not set")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn no_lb_rule_drops_rule_and_probe_no_probe_rule_only_the_probe() {
        let ports = "- {port: 80, nodePort: 30080}\n- {port: 81, nodePort: 30081}";
        let p = plan(&[(&per_port(80, param::NO_LB_RULE), "true")], "", ports);
        assert_eq!(
            p.rules.iter().map(|r| r.frontend_port).collect::<Vec<_>>(),
            [81]
        );
        assert_eq!(p.probes.iter().map(|p| p.port).collect::<Vec<_>>(), [30081]);
        let p = plan(&[(&per_port(80, param::NO_PROBE_RULE), "True")], "", ports);
        assert_eq!((p.rules.len(), p.rules[0].probe.as_deref()), (2, None));
        assert_eq!(p.probes.iter().map(|p| p.port).collect::<Vec<_>>(), [30081]);
    }

    #[test]
    fn probe_protocol_per_port_then_app_protocol_then_global_then_tcp() {
        let ports = "- {port: 80, nodePort: 30080, appProtocol: https}\n- {port: 81, nodePort: 30081}\n- {port: 82, nodePort: 30082, appProtocol: kubernetes.io/h2c}";
        let p = plan(
            &[
                (key::PROBE_PROTOCOL, "Http"),
                (&per_port(81, param::PROBE_PROTOCOL), "tcp"),
            ],
            "",
            ports,
        );
        let got: Vec<_> = p
            .probes
            .iter()
            .map(|p| (p.protocol, p.request_path.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (ProbeProtocol::Https, Some("/")),
                (ProbeProtocol::Tcp, None),
                (ProbeProtocol::Tcp, None)
            ]
        );
        let p = plan(
            &[(key::PROBE_PROTOCOL, "http")],
            "",
            "- {port: 81, nodePort: 30081}",
        );
        assert_eq!(p.probes[0].protocol, ProbeProtocol::Http);
        let e = error(&[(key::PROBE_PROTOCOL, "grpc")], "", TCP80);
        assert_eq!(e.path, annotations::path(key::PROBE_PROTOCOL));
    }

    #[test]
    fn request_path_per_port_then_global_then_slash() {
        let ports = "- {port: 80, nodePort: 30080}\n- {port: 81, nodePort: 30081}";
        let p = plan(
            &[
                (key::PROBE_PROTOCOL, "http"),
                (key::PROBE_REQUEST_PATH, "/ready"),
                (&per_port(81, param::PROBE_REQUEST_PATH), "/live"),
            ],
            "",
            ports,
        );
        assert_eq!(
            p.probes
                .iter()
                .map(|p| p.request_path.as_deref())
                .collect::<Vec<_>>(),
            [Some("/ready"), Some("/live")]
        );
    }

    #[test]
    fn interval_and_count_per_port_then_global_with_limits() {
        let ports = "- {port: 80, nodePort: 30080}\n- {port: 81, nodePort: 30081}";
        let p = plan(
            &[
                (key::PROBE_INTERVAL, "10"),
                (key::PROBE_NUM_OF_PROBE, "3"),
                (&per_port(81, param::PROBE_INTERVAL), "6"),
            ],
            "",
            ports,
        );
        assert_eq!(
            p.probes
                .iter()
                .map(|p| (p.interval_seconds, p.number_of_probes))
                .collect::<Vec<_>>(),
            [(10, 3), (6, 3)]
        );
        let e = error(&[(key::PROBE_INTERVAL, "4")], "", TCP80);
        assert_eq!(e.path, annotations::path(key::PROBE_INTERVAL));
        assert!(
            e.message.contains("minimum value of interval is 5"),
            "{}",
            e.message
        );
        let e = error(
            &[(&per_port(80, param::PROBE_NUM_OF_PROBE), "1")],
            "",
            TCP80,
        );
        assert_eq!(
            e.path,
            annotations::path(&per_port(80, param::PROBE_NUM_OF_PROBE))
        );
        let e = error(
            &[(key::PROBE_INTERVAL, "20"), (key::PROBE_NUM_OF_PROBE, "6")],
            "",
            TCP80,
        );
        assert!(e.message.contains("less than 120"), "{}", e.message);
        assert_eq!(e.path, annotations::path(key::PROBE_NUM_OF_PROBE));
        assert_eq!(
            plan(&[(key::PROBE_INTERVAL, "59")], "", TCP80).probes[0].interval_seconds,
            59
        );
    }

    #[test]
    fn local_policy_shares_one_healthz_probe_even_with_udp() {
        let p = plan(
            &[(&per_port(32000, param::PROBE_NUM_OF_PROBE), "3")],
            "externalTrafficPolicy: Local\nhealthCheckNodePort: 32000",
            TWO,
        );
        let want = HealthProbe {
            name: "a0123456789abcdef0123456789abcde-TCP-32000".into(),
            protocol: ProbeProtocol::Http,
            port: 32000,
            request_path: Some("/healthz".into()),
            interval_seconds: 5,
            number_of_probes: 3,
        };
        assert_eq!(p.probes, vec![want.clone()]);
        assert!(p
            .rules
            .iter()
            .all(|r| r.probe.as_deref() == Some(want.name.as_str())));
        let want = HealthProbe {
            number_of_probes: 2,
            ..want
        };
        // Per-port protocol is ignored under Local unless the port names its own probe port.
        let p = plan(
            &[(&per_port(80, param::PROBE_PROTOCOL), "https")],
            "externalTrafficPolicy: Local\nhealthCheckNodePort: 32000",
            TCP80,
        );
        assert_eq!(p.probes, vec![want]);
        let p = plan(
            &[(&per_port(80, param::PROBE_PORT), "31000")],
            "externalTrafficPolicy: Local\nhealthCheckNodePort: 32000",
            TCP80,
        );
        assert_eq!(
            (p.probes[0].port, p.probes[0].protocol),
            (31000, ProbeProtocol::Tcp)
        );
    }

    #[test]
    fn probe_port_annotation_by_name_number_or_literal() {
        let ports =
            "- {name: web, port: 80, nodePort: 30080}\n- {name: alt, port: 81, nodePort: 30081}";
        let port_of =
            |v: &str| plan(&[(&per_port(80, param::PROBE_PORT), v)], "", ports).probes[0].port;
        assert_eq!(
            (port_of("ALT"), port_of("81"), port_of("10256")),
            (30081, 30081, 10256)
        );
        let e = error(&[(&per_port(80, param::PROBE_PORT), "nope")], "", ports);
        assert_eq!(
            (e.path, e.message),
            (
                annotations::path(&per_port(80, param::PROBE_PORT)),
                "port nope not found in service".to_string()
            )
        );
    }

    #[test]
    fn all_udp_cluster_service_has_no_probe() {
        let p = plan(&[], "", "- {port: 53, protocol: UDP, nodePort: 30053}");
        assert!(p.probes.is_empty() && p.rules[0].probe.is_none());
        assert!(
            p.notes.iter().any(|n| n.contains("no rule has a probe")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn source_ranges_from_spec_or_annotations_normalised() {
        let p = plan(
            &[],
            "loadBalancerSourceRanges: [127.0.0.77/24, ' 127.1.2.3 ', '::1']",
            TCP80,
        );
        assert_eq!(p.source_ranges, ["127.0.0.0/24", "127.1.2.3/32", "::1/128"]);
        let p = plan(
            &[
                (key::ALLOWED_IP_RANGES, "127.0.0.0/8, 127.0.0.0/8"),
                (key::UPSTREAM_SOURCE_RANGES, "10.0.0.0/8"),
            ],
            "",
            TCP80,
        );
        assert_eq!(p.source_ranges, ["127.0.0.0/8", "10.0.0.0/8"]);
        let e = error(
            &[(key::ALLOWED_IP_RANGES, "127.0.0.0/8")],
            "loadBalancerSourceRanges: [127.0.0.0/24]",
            TCP80,
        );
        assert_eq!(e.path, "spec.loadBalancerSourceRanges");
        let e = error(
            &[],
            "loadBalancerSourceRanges: [127.0.0.0/24, 127.0.0.0/33]",
            TCP80,
        );
        assert_eq!(e.path, "spec.loadBalancerSourceRanges[1]");
        let e = error(&[(key::ALLOWED_IP_RANGES, "localhost")], "", TCP80);
        assert_eq!(e.path, annotations::path(key::ALLOWED_IP_RANGES));
        // lb-core's parser decides: a signed length is refused, a mapped
        // IPv6 prefix is the IPv4 prefix it maps, as the frontend matches it.
        let e = error(&[], "loadBalancerSourceRanges: [127.0.0.0/+8]", TCP80);
        assert_eq!(e.path, "spec.loadBalancerSourceRanges[0]");
        let p = plan(
            &[],
            "loadBalancerSourceRanges: ['::ffff:127.0.0.0/104']",
            TCP80,
        );
        assert_eq!(p.source_ranges, ["127.0.0.0/8"]);
        // A trailing comma leaves an empty entry: invalid for CPA, refused here.
        let e = error(&[(key::ALLOWED_IP_RANGES, "127.0.0.0/8,")], "", TCP80);
        assert_eq!(e.path, annotations::path(key::ALLOWED_IP_RANGES));
        assert!(e.message.contains("empty"), "{}", e.message);
        let e = error(
            &[(key::UPSTREAM_SOURCE_RANGES, "")],
            "loadBalancerSourceRanges: [127.0.0.0/24]",
            TCP80,
        );
        assert_eq!(
            (e.path, e.message.contains("empty")),
            (annotations::path(key::UPSTREAM_SOURCE_RANGES), true)
        );
    }

    #[test]
    fn traffic_distribution_is_copied_when_known() {
        assert_eq!(
            plan(&[], "trafficDistribution: PreferSameNode", TCP80)
                .traffic_distribution
                .as_deref(),
            Some("PreferSameNode")
        );
        assert_eq!(
            error(&[], "trafficDistribution: Nearest", TCP80).path,
            "spec.trafficDistribution"
        );
    }

    #[test]
    fn unsupported_spec_fields_are_named() {
        let cases = [
            ("ipFamilies: [IPv6]", TCP80, "spec.ipFamilies[0]"),
            ("ipFamilies: [IPv4, IPv6]", TCP80, "spec.ipFamilies[1]"),
            (
                "loadBalancerClass: other.io/lb",
                TCP80,
                "spec.loadBalancerClass",
            ),
            (
                "externalTrafficPolicy: Global",
                TCP80,
                "spec.externalTrafficPolicy",
            ),
            (
                "",
                "- {port: 80}\n- {port: 9, protocol: SCTP}",
                "spec.ports[1].protocol",
            ),
            ("", "- {port: 70000}", "spec.ports[0].port"),
            ("", "- {port: 80, nodePort: 0}", "spec.ports[0].nodePort"),
            (
                "",
                "- {port: 80, targetPort: -1}",
                "spec.ports[0].targetPort",
            ),
            ("", "[]", "spec.ports"),
            (
                "",
                "- {port: 80}\n- {port: 80, protocol: TCP}",
                "spec.ports[1]",
            ),
        ];
        for (spec, ports, path) in cases {
            assert_eq!(error(&[], spec, ports).path, path, "{spec} {ports}");
        }
        let mut svc = service(&[], "", TCP80);
        svc.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        assert_eq!(translate(&svc).unwrap_err().path, "spec.type");
        svc.spec.as_mut().unwrap().type_ = None;
        assert!(translate(&svc).unwrap_err().message.contains("ClusterIP"));
    }

    #[test]
    fn annotations_are_checked_against_the_table() {
        let e = error(
            &[(
                "service.beta.kubernetes.io/azure-load-balancer-internal",
                "true",
            )],
            "",
            TCP80,
        );
        assert_eq!(
            e.path,
            annotations::path("service.beta.kubernetes.io/azure-load-balancer-internal")
        );
        let p = plan(
            &[("service.beta.kubernetes.io/azure-pip-name", "my-ip")],
            "",
            TCP80,
        );
        assert!(
            p.notes[0].contains("azure-pip-name") && p.notes[0].contains("not emulated"),
            "{:?}",
            p.notes
        );
        // The Local probe's per-port keys name the healthCheckNodePort, which is allowed.
        assert!(translate(&service(
            &[(&per_port(32000, param::PROBE_INTERVAL), "6")],
            "externalTrafficPolicy: Local\nhealthCheckNodePort: 32000",
            TCP80
        ))
        .is_ok());
    }

    #[test]
    fn same_port_on_tcp_and_udp_is_two_rules_and_address_fields_are_noted() {
        let p = plan(
            &[],
            "loadBalancerIP: 20.62.153.222\nexternalIPs: [10.0.0.9]",
            "- {port: 53, nodePort: 30053}\n- {port: 53, protocol: UDP, nodePort: 30054}",
        );
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a0123456789abcdef0123456789abcde-TCP-53",
                "a0123456789abcdef0123456789abcde-UDP-53"
            ]
        );
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("spec.loadBalancerIP: 20.62.153.222: not emulated")),
            "{:?}",
            p.notes
        );
        assert!(
            p.notes
                .iter()
                .any(|n| n.starts_with("spec.externalIPs: not emulated")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn named_target_port_leaves_the_pod_port_to_the_endpoints() {
        let p = plan(&[], "", "- {port: 80, targetPort: web}\n- {port: 81}");
        assert_eq!(
            p.rules.iter().map(|r| r.target_port).collect::<Vec<_>>(),
            [None, Some(81)]
        );
    }

    proptest::proptest! {
        /// Any value in any known annotation, any port numbers, either policy:
        /// translate returns a plan or a refusal naming a field, never panics.
        #[test]
        fn never_panics_on_any_annotation_value(
            row in 0..annotations::ANNOTATIONS.len(),
            value in "\\PC{0,12}|[0-9]{1,6}|-?[0-9]{1,3}",
            port in -2i32..70_000,
            node_port in -2i32..70_000,
            local in proptest::bool::ANY,
            uid in proptest::option::of("\\PC{0,40}|[0-9a-f-]{0,40}"),
        ) {
            let key = annotations::ANNOTATIONS[row].key.replace("{port}", &port.to_string());
            let mut svc = service(&[], "", TCP80);
            let spec = svc.spec.as_mut().unwrap();
            let p = &mut spec.ports.as_mut().unwrap()[0];
            (p.port, p.node_port) = (port, Some(node_port));
            if local {
                spec.external_traffic_policy = Some("Local".into());
                spec.health_check_node_port = Some(node_port);
            }
            svc.metadata.annotations = Some([(key, value)].into_iter().collect());
            svc.metadata.uid = uid;
            if let Err(e) = translate(&svc) {
                proptest::prop_assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_is_refused() {
        let mut svc = service(&[], "", TCP80);
        // 31 ASCII bytes then a 2-byte char across the 32-byte cut.
        svc.metadata.uid = Some(format!("{}é", "0".repeat(30)));
        let e = translate(&svc).unwrap_err();
        assert_eq!(e.path, "metadata.uid");
        svc.metadata.uid = Some("0123-abc\nrules: []".into());
        assert_eq!(translate(&svc).unwrap_err().path, "metadata.uid");
        svc.metadata.uid = Some("ABCDEF01-2345-6789-abcd-ef0123456789".into());
        assert_eq!(
            translate(&svc).unwrap().rules[0].name,
            "aABCDEF0123456789abcdef012345678-TCP-80"
        );
    }

    #[test]
    fn without_uid_names_come_from_a_stable_stand_in() {
        let mut svc = service(&[], "", TCP80);
        svc.metadata.uid = None;
        let a = translate(&svc).unwrap();
        assert_eq!(a.rules[0].name.len(), RULE_PREFIX_LEN + "-TCP-80".len());
        assert_eq!(a.rules[0].name, translate(&svc).unwrap().rules[0].name);
        svc.metadata.name = Some("other".into());
        assert_ne!(a.rules[0].name, translate(&svc).unwrap().rules[0].name);
        assert!(
            a.notes[0].starts_with("metadata.uid: not set"),
            "{:?}",
            a.notes
        );
    }
}
