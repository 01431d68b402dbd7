//! `ServicePlan`s + a cluster description → the `config::Config` lb-proxy runs:
//! one frontend per load-balancing rule, as AKS has one Azure rule per Service
//! port (docs/research/cloud-provider-azure.md §1.1).
//!
//! The config is built as TOML text and parsed by `config::parse`, as
//! `config::from_flags` does, so a translated frontend goes through exactly the
//! validation a hand-written one does; then each frontend gets its
//! [`ServiceOrigin`] (which TOML cannot spell).
//!
//! Per rule:
//! - name `{service}-{tcp|udp}-{port}` (Azure's `a<uid32>-TCP-80` with the
//!   Service's name for the uid); listen `--listen-ip` : the rule's frontend
//!   port, or its `--port PORT=LOCAL` / `--port-offset` replacement;
//! - `distribution` = `loadDistribution` (§1.4); on TCP rules `idle_timeout` =
//!   `idleTimeoutInMinutes` (§1.3) and `tcp_reset_on_idle` = `enableTcpReset`
//!   (§1.1.5). Azure ignores the idle timeout on UDP rules, so a UDP frontend
//!   keeps lb-proxy's UDP flow timeout (the plan's notes say so);
//! - health from the rule's probe (§2): kind and path, interval =
//!   `intervalInSeconds`, and rise = fall = the probe count, because Azure's
//!   `probeThreshold` is "the number of consecutive successful or failed probes
//!   in order to allow or deny traffic" (armnetwork `ProbePropertiesFormat`,
//!   research §4): one figure for both directions. No probe → `kind = "none"`.
//! - `source_ranges` = the NSG's allowed prefixes (§3).
//!
//! Real-cluster mode: backends are the nodes at `InternalIP:nodePort`, named by
//! node, probed at the probe's port (nodePort, or healthCheckNodePort under
//! Local). Azure with floating IP sends `frontendIP:port` to the node, which
//! kube-proxy routes as it routes `nodeIP:nodePort`; lb-proxy cannot keep the
//! destination, so it uses the nodePort (as Azure itself does with floating IP
//! off, §1.1.6). Every node not labelled exclude-from-external-load-balancers
//! is in the pool (§5), under Local too: as in Azure, the `/healthz` probe on
//! healthCheckNodePort (kube-proxy's answer: 200 with a ready local endpoint,
//! 503 without) decides which nodes take traffic, so a Service with no ready
//! endpoint yet still starts, and pods moving between nodes need no reload.
//! The EndpointSlices only inform: a log line per load says how many nodes
//! have a ready endpoint.
//!
//! Lab mode: the hop model (`[frontends.service]` + `[[frontends.nodes]]`), the
//! pods at `address:targetPort`. The ALB's node probe is the hop model's own
//! rule (under Local a node takes traffic iff it has a ready pod); the pods of a
//! TCP rule are probed over TCP at the probe's interval and count, standing in
//! for kubelet; the pods of a UDP rule have no probe lb-proxy could send (a TCP
//! connect to a UDP port fails), so they are watched passively (`kind = "none"`).
//! The nodes' zones and the Service's `trafficDistribution` go to the hop
//! model's topology rules (kube-proxy's); in real-cluster mode the zones are
//! shown on `/backends` (kube-proxy on the real nodes applies the topology).

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use lb_core::{ExternalTrafficPolicy, SessionAffinity, SnatScope};

use super::cluster::{Cluster, ClusterMode, ClusterNode};
use super::plan::{HealthProbe, LbRule, ProbeProtocol, RuleProtocol, ServicePlan};
use crate::config::{self, Config, ConfigError, FrontendProtocol, ServiceOrigin};

/// The global settings `run --service` takes from flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSettings {
    /// Where every frontend listens (the Service's external IP, locally).
    pub listen_ip: IpAddr,
    /// `--port PORT=LOCAL`: listen on LOCAL for the rule with frontend port PORT.
    pub port_map: Vec<(u16, u16)>,
    /// `--port-offset N`: listen on port + N for every other rule.
    pub port_offset: u16,
    pub admin: Option<SocketAddr>,
    pub workers: Option<usize>,
}

/// The origin the generated config is named by in a validation error.
const ORIGIN: &str = "<translated Service>";

/// Why plans could not become frontends.
#[derive(Debug, thiserror::Error)]
pub enum FrontendsError {
    /// The Service asks for something this mode cannot run.
    #[error("Service {service}: {field}: {message}")]
    Unsupported {
        service: String,
        field: String,
        message: String,
    },
    /// A flag is wrong.
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    /// The translated config failed validation (a bug in the translation or two
    /// Services that clash, e.g. on a listen port).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Builds the frontends of every plan over `cluster`.
pub fn config_from_plans(
    plans: &[ServicePlan],
    cluster: &Cluster,
    settings: &RunSettings,
) -> Result<Config, FrontendsError> {
    check_port_map(plans, settings)?;
    let mut text = global_toml(settings);
    let mut origins = Vec::new();
    for plan in plans {
        for rule in &plan.rules {
            let probe = rule
                .probe
                .as_ref()
                .and_then(|name| plan.probes.iter().find(|p| &p.name == name));
            let fe = FrontendInput { plan, rule, probe };
            text.push_str(&fe.toml(cluster, settings)?);
            origins.push(fe.origin(cluster));
        }
    }
    let mut config = config::parse(ORIGIN, &text)?;
    for (fe, origin) in config.frontends.iter_mut().zip(origins) {
        fe.origin = Some(origin);
    }
    Ok(config)
}

/// Every `--port PORT=LOCAL` must name some rule's frontend port: a typo would
/// otherwise leave a rule on a port the user did not mean.
fn check_port_map(plans: &[ServicePlan], settings: &RunSettings) -> Result<(), FrontendsError> {
    let ports: BTreeSet<u16> = plans
        .iter()
        .flat_map(|p| p.rules.iter().map(|r| r.frontend_port))
        .collect();
    for (port, _) in &settings.port_map {
        if !ports.contains(port) {
            return Err(FrontendsError::Flag {
                flag: format!("--port {port}=..."),
                message: format!("no Service port {port} (ports: {ports:?})"),
            });
        }
    }
    Ok(())
}

fn global_toml(settings: &RunSettings) -> String {
    let mut text = String::new();
    if let Some(w) = settings.workers {
        let _ = writeln!(text, "workers = {w}");
    }
    // Without --admin, the default admin address, as `run --listen` has.
    if let Some(a) = settings.admin {
        let _ = writeln!(text, "[admin]\nlisten = \"{a}\"");
    }
    text
}

/// One rule of one plan, on its way to a `[[frontends]]` table.
struct FrontendInput<'a> {
    plan: &'a ServicePlan,
    rule: &'a LbRule,
    probe: Option<&'a HealthProbe>,
}

impl FrontendInput<'_> {
    fn protocol(&self) -> FrontendProtocol {
        match self.rule.protocol {
            RuleProtocol::Tcp => FrontendProtocol::Tcp,
            RuleProtocol::Udp => FrontendProtocol::Udp,
        }
    }

    fn name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.plan.name,
            self.protocol().as_str(),
            self.rule.frontend_port
        )
    }

    /// `spec.ports[port=80].nodePort`: the Service port by its number (rules
    /// skip `no_lb_rule` ports, so a rule's index is not the port's).
    fn port_field(&self, name: &str) -> String {
        format!("spec.ports[port={}].{name}", self.rule.frontend_port)
    }

    fn unsupported(&self, field: &str, message: impl Into<String>) -> FrontendsError {
        FrontendsError::Unsupported {
            service: format!("{}/{}", self.plan.namespace, self.plan.name),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn toml(&self, cluster: &Cluster, settings: &RunSettings) -> Result<String, FrontendsError> {
        let mut t = self.frontend_toml(settings)?;
        t.push_str(&self.health_toml(cluster.mode)?);
        match cluster.mode {
            ClusterMode::Real => t.push_str(&self.backends_toml(cluster)?),
            ClusterMode::Lab => t.push_str(&self.hop_toml(cluster)?),
        }
        Ok(t)
    }

    fn local_port(&self, settings: &RunSettings) -> Result<u16, FrontendsError> {
        let port = self.rule.frontend_port;
        if let Some((_, local)) = settings.port_map.iter().find(|(p, _)| *p == port) {
            return Ok(*local);
        }
        port.checked_add(settings.port_offset)
            .ok_or_else(|| FrontendsError::Flag {
                flag: "--port-offset".into(),
                message: format!("port {port} + {} is past 65535", settings.port_offset),
            })
    }

    fn frontend_toml(&self, settings: &RunSettings) -> Result<String, FrontendsError> {
        let rule = self.rule;
        let listen = SocketAddr::new(settings.listen_ip, self.local_port(settings)?);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "[[frontends]]\nname = {}\nlisten = \"{listen}\"\nprotocol = \"{}\"\ndistribution = \"{}\"",
            toml_string(&self.name()),
            self.protocol().as_str(),
            rule.load_distribution.azure_name(),
        );
        if self.protocol() == FrontendProtocol::Tcp {
            let reset = rule.enable_tcp_reset.unwrap_or(false);
            let _ = writeln!(
                t,
                "idle_timeout = \"{}m\"\ntcp_reset_on_idle = {reset}",
                rule.idle_timeout_minutes
            );
        }
        if !self.plan.source_ranges.is_empty() {
            let list: Vec<String> = self
                .plan
                .source_ranges
                .iter()
                .map(|s| toml_string(s))
                .collect();
            let _ = writeln!(t, "source_ranges = [{}]", list.join(", "));
        }
        Ok(t)
    }

    /// `[frontends.health]` from the rule's Azure probe.
    fn health_toml(&self, mode: ClusterMode) -> Result<String, FrontendsError> {
        let Some(probe) = self.probe else {
            return Ok("[frontends.health]\nkind = \"none\"\n".to_owned());
        };
        if mode == ClusterMode::Lab && self.rule.protocol == RuleProtocol::Udp {
            // The node probe is the hop model's; the pods listen on UDP only.
            return Ok("[frontends.health]\nkind = \"none\"\n".to_owned());
        }
        let mut t = String::from("[frontends.health]\n");
        match (mode, probe.protocol) {
            (ClusterMode::Lab, _) | (ClusterMode::Real, ProbeProtocol::Tcp) => {
                t.push_str("kind = \"tcp\"\n");
            }
            (ClusterMode::Real, ProbeProtocol::Http) => {
                let path = probe.request_path.as_deref().unwrap_or("/");
                let _ = writeln!(t, "kind = \"http\"\npath = {}", toml_string(path));
            }
            (ClusterMode::Real, ProbeProtocol::Https) => {
                return Err(self.unsupported(
                    &format!("probe {}", probe.name),
                    "an Https health probe is not emulated by `run` (no TLS probe client); `rules` prints it",
                ))
            }
        }
        if mode == ClusterMode::Real {
            if probe.port == 0 {
                // The translation shows 0 for a port the API server has not allocated yet.
                return Err(self.unsupported(
                    &format!("probe {}", probe.name),
                    "no port to probe: the manifest has no nodePort/healthCheckNodePort (take them from `kubectl get svc -o yaml`)",
                ));
            }
            let _ = writeln!(t, "port = {}", probe.port);
        }
        let _ = writeln!(
            t,
            "interval = \"{}s\"\nrise = {n}\nfall = {n}",
            probe.interval_seconds,
            n = probe.number_of_probes
        );
        Ok(t)
    }

    /// Real-cluster mode: the nodes at `InternalIP:nodePort`.
    fn backends_toml(&self, cluster: &Cluster) -> Result<String, FrontendsError> {
        let field = self.port_field("nodePort");
        let node_port = self.rule.node_port.ok_or_else(|| {
            self.unsupported(
                &field,
                "missing: real-cluster mode forwards to each node's nodePort (`kubectl get svc -o yaml` shows the one allocated)",
            )
        })?;
        let nodes: Vec<&ClusterNode> = cluster.nodes.iter().filter(|n| !n.excluded).collect();
        if nodes.is_empty() {
            return Err(self.unsupported(
                "nodes",
                "no node in the backend pool: every node is labelled node.kubernetes.io/exclude-from-external-load-balancers",
            ));
        }
        self.log_ready_nodes(cluster, &nodes);
        let mut t = String::new();
        for n in nodes {
            let _ = writeln!(
                t,
                "[[frontends.backends]]\nname = {}\naddress = \"{}\"",
                toml_string(&n.name),
                SocketAddr::new(n.address, node_port)
            );
        }
        Ok(t)
    }

    /// Under Local, how many pool nodes have a ready endpoint now: for the
    /// operator only, since the `/healthz` probe decides (see the module doc).
    fn log_ready_nodes(&self, cluster: &Cluster, pool: &[&ClusterNode]) {
        if self.plan.external_traffic_policy != ExternalTrafficPolicy::Local {
            return;
        }
        let ready: BTreeSet<&str> = cluster
            .endpoints_of(&self.plan.namespace, &self.plan.name)
            .filter(|e| e.ready)
            .filter_map(|e| e.node.as_deref())
            .collect();
        let with_ready = pool
            .iter()
            .filter(|n| ready.contains(n.name.as_str()))
            .count();
        tracing::info!(
            frontend = %self.name(),
            "externalTrafficPolicy Local: {with_ready} of {} nodes have a ready endpoint in the EndpointSlices; the /healthz probe decides which take traffic",
            pool.len()
        );
    }

    /// Lab mode: the Service's policies and the nodes with this Service's pods.
    fn hop_toml(&self, cluster: &Cluster) -> Result<String, FrontendsError> {
        let plan = self.plan;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "[frontends.service]\nexternal_traffic_policy = \"{}\"\nsession_affinity = \"{}\"\ntimeout_seconds = {}\nsnat = \"{}\"",
            match plan.external_traffic_policy {
                ExternalTrafficPolicy::Cluster => "Cluster",
                ExternalTrafficPolicy::Local => "Local",
            },
            match plan.session_affinity {
                SessionAffinity::None => "None",
                SessionAffinity::ClientIp => "ClientIP",
            },
            plan.affinity_timeout.as_secs(),
            match cluster.snat {
                SnatScope::CrossNode => "cross-node",
                SnatScope::Always => "always",
            },
        );
        // kube-proxy's topology rules (lb-core's hop model) take the Service's
        // trafficDistribution and the nodes' zones.
        if let Some(td) = &plan.traffic_distribution {
            let _ = writeln!(t, "traffic_distribution = {}", toml_string(td));
        }
        for n in &cluster.nodes {
            let pods: Vec<String> = cluster
                .endpoints_of(&plan.namespace, &plan.name)
                .filter(|e| e.node.as_deref() == Some(n.name.as_str()))
                .map(|e| {
                    let port = e.port.map_or_else(|| self.target_port(), Ok)?;
                    Ok(format!(
                        "{{ address = \"{}\", ready = {} }}",
                        SocketAddr::new(e.address, port),
                        e.ready
                    ))
                })
                .collect::<Result<_, FrontendsError>>()?;
            let _ = writeln!(
                t,
                "[[frontends.nodes]]\nname = {}\naddress = \"{}\"\nendpoints = [{}]",
                toml_string(&n.name),
                n.address,
                pods.join(", ")
            );
            if let Some(zone) = &n.zone {
                let _ = writeln!(t, "zone = {}", toml_string(zone));
            }
        }
        Ok(t)
    }

    /// Where a lab pod without its own `port` listens: the numeric targetPort.
    fn target_port(&self) -> Result<u16, FrontendsError> {
        self.rule.target_port.ok_or_else(|| {
            self.unsupported(
                &self.port_field("targetPort"),
                "lab mode needs a numeric targetPort, or a `port` on each pod of the lab",
            )
        })
    }

    fn origin(&self, cluster: &Cluster) -> ServiceOrigin {
        ServiceOrigin {
            namespace: self.plan.namespace.clone(),
            service: self.plan.name.clone(),
            port_name: self.rule.port_name.clone(),
            port: self.rule.frontend_port,
            protocol: self.protocol(),
            rule: self.rule.name.clone(),
            traffic_distribution: self.plan.traffic_distribution.clone(),
            node_zones: cluster
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.zone.clone()))
                .collect(),
        }
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lb_core::DistributionMode;

    use super::*;
    use crate::config::ProbeKind;
    use crate::k8s::cluster::{parse_kubectl, parse_lab};

    const KUBECTL: &str =
        include_str!("../../../tests/fixtures/k8s/cluster/nodes-endpointslices.json");
    const LAB: &str = include_str!("../../../tests/fixtures/k8s/cluster/lab.toml");

    fn settings() -> RunSettings {
        RunSettings {
            listen_ip: "127.0.0.1".parse().unwrap(),
            port_map: vec![(80, 0)],
            port_offset: 0,
            admin: None,
            workers: Some(1),
        }
    }

    /// `web` from the kubectl fixture: port 80 → nodePort 30080, Local, healthz on 32000.
    fn web(policy: ExternalTrafficPolicy) -> ServicePlan {
        let local = policy == ExternalTrafficPolicy::Local;
        let probe = HealthProbe {
            name: "aweb-TCP-80".into(),
            protocol: if local {
                ProbeProtocol::Http
            } else {
                ProbeProtocol::Tcp
            },
            port: if local { 32000 } else { 30080 },
            request_path: local.then(|| "/healthz".into()),
            interval_seconds: 5,
            number_of_probes: 3,
        };
        ServicePlan {
            namespace: "default".into(),
            name: "web".into(),
            uid: None,
            external_traffic_policy: policy,
            session_affinity: SessionAffinity::ClientIp,
            affinity_timeout: Duration::from_secs(60),
            health_check_node_port: local.then_some(32000),
            traffic_distribution: Some("PreferSameZone".into()),
            source_ranges: vec!["127.0.3.0/24".into()],
            rules: vec![LbRule {
                name: "aweb-TCP-80".into(),
                port_name: Some("http".into()),
                protocol: RuleProtocol::Tcp,
                frontend_port: 80,
                backend_port: 80,
                enable_floating_ip: true,
                node_port: Some(30080),
                target_port: Some(8080),
                load_distribution: DistributionMode::SourceIp,
                idle_timeout_minutes: 10,
                enable_tcp_reset: Some(true),
                probe: Some("aweb-TCP-80".into()),
            }],
            probes: vec![probe],
            notes: Vec::new(),
        }
    }

    #[test]
    fn local_in_real_cluster_mode_keeps_every_node_and_lets_healthz_decide() {
        let cluster = parse_kubectl("c.json", KUBECTL).unwrap();
        let c =
            config_from_plans(&[web(ExternalTrafficPolicy::Local)], &cluster, &settings()).unwrap();
        let fe = &c.frontends[0];
        assert_eq!(fe.name, "web-tcp-80");
        assert_eq!(fe.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(fe.params.mode, DistributionMode::SourceIp);
        assert_eq!(fe.idle_timeout, Duration::from_secs(600));
        assert!(fe.tcp_reset_on_idle);
        let backends: Vec<_> = fe.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(
            backends,
            ["127.0.1.1:30080", "127.0.1.2:30080", "127.0.1.3:30080"],
            "node 2's endpoint is unready, but its /healthz answer decides, not the snapshot"
        );
        let mut gone = web(ExternalTrafficPolicy::Local);
        gone.name = "no-endpoints".into();
        let c = config_from_plans(&[gone], &cluster, &settings())
            .expect("a Local Service with no ready endpoint still starts");
        assert_eq!(c.frontends[0].backends.len(), 3);
        assert_eq!(
            fe.health.kind,
            ProbeKind::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(fe.health.port, Some(32000));
        assert_eq!(fe.health.interval, Duration::from_secs(5));
        assert_eq!(
            (fe.health.thresholds.rise, fe.health.thresholds.fall),
            (3, 3)
        );
        let ranges = fe.source_ranges.as_ref().expect("source ranges");
        assert!(ranges.contains("127.0.3.9".parse().unwrap()));
        assert!(!ranges.contains("127.0.4.9".parse().unwrap()));
        let origin = fe.origin.as_ref().expect("origin");
        assert_eq!((origin.service.as_str(), origin.port), ("web", 80));
        assert_eq!(origin.node_zones[2].1.as_deref(), Some("eastus-3"));

        let cluster_policy = config_from_plans(
            &[web(ExternalTrafficPolicy::Cluster)],
            &cluster,
            &settings(),
        )
        .unwrap();
        assert_eq!(
            cluster_policy.frontends[0].backends.len(),
            3,
            "Cluster: every node"
        );
        assert_eq!(cluster_policy.frontends[0].health.kind, ProbeKind::Tcp);
    }

    #[test]
    fn lab_mode_builds_the_hop_model_with_pods_at_the_target_port() {
        let cluster = parse_lab("lab.toml", LAB).unwrap();
        let mut plan = web(ExternalTrafficPolicy::Cluster);
        plan.name = "testapp".into();
        plan.source_ranges.clear();
        let c = config_from_plans(&[plan.clone()], &cluster, &settings()).unwrap();
        let hop = c.frontends[0].hop.as_ref().expect("the hop model");
        assert_eq!(hop.service.session_affinity, SessionAffinity::ClientIp);
        assert_eq!(hop.service.affinity_timeout, Duration::from_secs(60));
        assert_eq!(hop.service.snat, SnatScope::Always);
        assert_eq!(
            hop.nodes[1].endpoints[0].addr,
            "127.0.2.2:8000".parse().unwrap(),
            "the lab pod's own port stands in for targetPort 8080"
        );
        assert!(hop.nodes[0].endpoints.is_empty());
        assert_eq!(
            hop.nodes[2].zone.as_deref(),
            Some("eastus-3"),
            "the lab's zones reach lb-core"
        );
        assert_eq!(
            hop.service.traffic_distribution,
            lb_core::TrafficDistribution::PreferSameZone
        );
        assert_eq!(
            c.frontends[0].health.port, None,
            "the pods are probed at their own port"
        );

        let no_port = parse_lab("lab.toml", &LAB.replace(", port = 8000", "")).unwrap();
        let c = config_from_plans(&[plan.clone()], &no_port, &settings()).unwrap();
        let pod = c.frontends[0].hop.as_ref().unwrap().nodes[1].endpoints[0].addr;
        assert_eq!(pod, "127.0.2.2:8080".parse().unwrap(), "the targetPort");
        plan.rules[0].target_port = None;
        let e = config_from_plans(&[plan], &no_port, &settings()).unwrap_err();
        assert!(
            e.to_string().contains("spec.ports[port=80].targetPort"),
            "{e}"
        );
    }

    /// DNS on TCP and UDP 53: two rules, two frontends on one address; the UDP
    /// one has no probe (Cluster, research §2.1) and no TCP reset.
    #[test]
    fn a_udp_rule_beside_a_tcp_one_shares_the_address_and_has_no_probe() {
        let cluster = parse_kubectl("c.json", KUBECTL).unwrap();
        let mut plan = web(ExternalTrafficPolicy::Cluster);
        plan.source_ranges.clear();
        let mut udp = plan.rules[0].clone();
        (udp.name, udp.protocol, udp.probe, udp.enable_tcp_reset) =
            ("aweb-UDP-80".into(), RuleProtocol::Udp, None, None);
        plan.rules.push(udp);
        let c = config_from_plans(&[plan], &cluster, &settings()).unwrap();
        let [tcp, udp] = &c.frontends[..] else {
            panic!("two frontends: {:?}", c.frontends);
        };
        assert_eq!(
            (tcp.name.as_str(), udp.name.as_str()),
            ("web-tcp-80", "web-udp-80")
        );
        assert_eq!(udp.protocol, FrontendProtocol::Udp);
        assert_eq!(
            udp.listen, tcp.listen,
            "one frontend IP and port, two transports"
        );
        assert_eq!(udp.health.kind, ProbeKind::None);
        assert!(!udp.tcp_reset_on_idle);
        assert_eq!(
            udp.idle_timeout,
            crate::config::DEFAULT_UDP_IDLE_TIMEOUT,
            "Azure uses idleTimeoutInMinutes (10 here) on TCP rules only"
        );
        assert_eq!(tcp.idle_timeout, Duration::from_secs(600));
        assert_eq!(udp.origin.as_ref().unwrap().protocol, FrontendProtocol::Udp);
    }

    /// Lab mode under Local: the TCP rule's pods are probed over TCP, the UDP
    /// rule's are not (a TCP connect to a UDP-only pod would fail and take it out).
    #[test]
    fn lab_mode_probes_tcp_rules_pods_and_leaves_udp_rules_pods_passive() {
        let cluster = parse_lab("lab.toml", LAB).unwrap();
        let mut plan = web(ExternalTrafficPolicy::Local);
        plan.name = "testapp".into();
        plan.source_ranges.clear();
        let mut udp = plan.rules[0].clone();
        (udp.name, udp.protocol, udp.enable_tcp_reset) =
            ("aweb-UDP-80".into(), RuleProtocol::Udp, None);
        plan.rules.push(udp);
        let c = config_from_plans(&[plan], &cluster, &settings()).unwrap();
        let kinds: Vec<_> = c.frontends.iter().map(|f| f.health.kind.clone()).collect();
        assert_eq!(kinds, [ProbeKind::Tcp, ProbeKind::None]);
    }

    #[test]
    fn ports_map_or_shift_and_a_mapping_of_no_port_is_refused() {
        let cluster = parse_kubectl("c.json", KUBECTL).unwrap();
        let plan = web(ExternalTrafficPolicy::Cluster);
        let shifted = RunSettings {
            port_map: vec![],
            port_offset: 8000,
            ..settings()
        };
        let c = config_from_plans(std::slice::from_ref(&plan), &cluster, &shifted).unwrap();
        assert_eq!(c.frontends[0].listen.port(), 8080);
        let typo = RunSettings {
            port_map: vec![(81, 8081)],
            ..settings()
        };
        let e = config_from_plans(&[plan], &cluster, &typo).unwrap_err();
        assert!(e.to_string().contains("--port 81"), "{e}");
    }
}
