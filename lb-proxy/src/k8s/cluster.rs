//! The cluster description `run --service` fronts (`--cluster FILE`, repeatable),
//! in one of two forms, told apart by the first character of each file:
//!
//! - **kubectl JSON** (`{`): what `kubectl get nodes,endpointslices -o json`
//!   prints (`kind: List`, each item a `v1` Node or a `discovery.k8s.io/v1`
//!   EndpointSlice; `NodeList`/`EndpointSliceList` and single objects too), read
//!   with k8s-openapi's types. Real-cluster mode: lb-proxy forwards to each node's
//!   `InternalIP:nodePort` and kube-proxy on the node does the hop. Shape and
//!   fields per docs/research/cloud-provider-azure.md §5.
//! - **lab TOML** (anything else): nodes on 127.x with the pods on each, for the
//!   hop model (lb_core's HopModel) on one machine. Lab mode.
//!
//! Several files merge (e.g. `kubectl get nodes -o json` and
//! `kubectl get endpointslices -o json` saved apart); mixing the two forms is an
//! error. Every error names the file and the field path.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::SnatScope;
use serde::Deserialize;

// The namespace a lab pod or an object without `metadata.namespace` is in:
// the one the translation gives a Service without one.
use super::translate::DEFAULT_NAMESPACE;

/// The node label that carries the zone (`LabelTopologyZone`, research §5).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// A node with this label is left out of the load balancer's backend pool (research §5).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The EndpointSlice label naming its Service (`LabelServiceName`, research §5).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A cluster description that could not be read, located: `file: path: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ClusterError {
    pub file: String,
    /// The field path (`items[2].status.addresses`), empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

/// Which form the description came in, which decides how frontends are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    /// kubectl JSON: forward to `nodeIP:nodePort`.
    Real,
    /// Lab TOML: the hop model on 127.x.
    Lab,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// InternalIP (real) or the lab address.
    pub address: IpAddr,
    pub zone: Option<String>,
    /// Labelled `node.kubernetes.io/exclude-from-external-load-balancers`.
    pub excluded: bool,
}

/// One endpoint (pod address) of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEndpoint {
    pub namespace: String,
    pub service: String,
    /// The node it runs on (`nodeName`), when known.
    pub node: Option<String>,
    pub address: IpAddr,
    /// Lab only: the port the pod listens on, standing in for the Service's
    /// `targetPort` (one below 1024 would need root); `None`: the targetPort.
    pub port: Option<u16>,
    /// `conditions.ready`; missing means ready (research §5).
    pub ready: bool,
}

/// Nodes and the Services' endpoints, from every `--cluster` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub mode: ClusterMode,
    pub nodes: Vec<ClusterNode>,
    pub endpoints: Vec<ClusterEndpoint>,
    /// Lab only: which flows the hop SNATs (`snat = "always"` as kube-proxy does).
    pub snat: SnatScope,
}

impl Cluster {
    /// The endpoints of Service `namespace/name`.
    pub fn endpoints_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a ClusterEndpoint> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| e.namespace == namespace && e.service == service)
    }
}

/// Reads and merges every file; an error names the first bad one.
pub fn load_cluster(paths: &[PathBuf]) -> Result<Cluster, ClusterError> {
    let mut merged: Option<Cluster> = None;
    for path in paths {
        let file = path.display().to_string();
        let next = load_one(path)?;
        merged = Some(match merged {
            None => next,
            Some(mut acc) => {
                if acc.mode != next.mode {
                    return Err(error(
                        &file,
                        "",
                        "mixes a lab TOML with kubectl JSON: give one form of --cluster",
                    ));
                }
                acc.nodes.extend(next.nodes);
                acc.endpoints.extend(next.endpoints);
                acc
            }
        });
    }
    let cluster = merged.ok_or_else(|| error("--cluster", "", "no cluster file given"))?;
    check_unique_nodes(&cluster, paths)?;
    Ok(cluster)
}

fn error(file: &str, path: &str, message: impl Into<String>) -> ClusterError {
    ClusterError {
        file: file.to_owned(),
        path: path.to_owned(),
        message: message.into(),
    }
}

fn load_one(path: &Path) -> Result<Cluster, ClusterError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| error(&file, "", e.to_string()))?;
    if text.trim_start().starts_with('{') {
        parse_kubectl(&file, &text)
    } else {
        parse_lab(&file, &text)
    }
}

fn check_unique_nodes(cluster: &Cluster, paths: &[PathBuf]) -> Result<(), ClusterError> {
    let mut seen = BTreeSet::new();
    for n in &cluster.nodes {
        if !seen.insert(n.name.as_str()) {
            let files = paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(error(
                &files,
                "",
                format!("node `{}` is described twice", n.name),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// kubectl JSON.

/// Parses `kubectl get nodes,endpointslices -o json` (or a single object).
pub fn parse_kubectl(file: &str, text: &str) -> Result<Cluster, ClusterError> {
    let root: serde_json::Value =
        serde_json::from_str(text).map_err(|e| error(file, "", format!("not JSON: {e}")))?;
    let mut cluster = Cluster {
        mode: ClusterMode::Real,
        nodes: Vec::new(),
        endpoints: Vec::new(),
        snat: SnatScope::default(),
    };
    match root.get("kind").and_then(|k| k.as_str()) {
        Some("List" | "NodeList" | "EndpointSliceList") => {
            let items = root
                .get("items")
                .and_then(|i| i.as_array())
                .ok_or_else(|| error(file, "items", "a List needs an `items` array"))?;
            for (i, item) in items.iter().enumerate() {
                add_object(&mut cluster, file, &format!("items[{i}]"), item)?;
            }
        }
        _ => add_object(&mut cluster, file, "", &root)?,
    }
    Ok(cluster)
}

/// Adds one Node or EndpointSlice, dispatched on its `kind`.
fn add_object(
    cluster: &mut Cluster,
    file: &str,
    at: &str,
    item: &serde_json::Value,
) -> Result<(), ClusterError> {
    let field = |name: &str| join_path(at, name);
    match item.get("kind").and_then(|k| k.as_str()) {
        Some("Node") => {
            let node: Node = typed(file, at, item)?;
            cluster.nodes.push(node_from(file, at, &node)?);
        }
        Some("EndpointSlice") => {
            let slice: EndpointSlice = typed(file, at, item)?;
            cluster
                .endpoints
                .extend(endpoints_from(file, at, &slice)?);
        }
        Some(other) => {
            return Err(error(
                file,
                &field("kind"),
                format!(
                    "`{other}` is neither a Node nor an EndpointSlice (give `kubectl get nodes,endpointslices -o json`)"
                ),
            ))
        }
        None => return Err(error(file, &field("kind"), "missing: each object needs a kind")),
    }
    Ok(())
}

fn join_path(at: &str, name: &str) -> String {
    match (at.is_empty(), name.is_empty()) {
        (true, _) => name.to_owned(),
        (false, true) => at.to_owned(),
        (false, false) => format!("{at}.{name}"),
    }
}

/// Deserializes into a k8s-openapi type, locating a wrong shape by field path.
fn typed<T: serde::de::DeserializeOwned>(
    file: &str,
    at: &str,
    item: &serde_json::Value,
) -> Result<T, ClusterError> {
    serde_path_to_error::deserialize(item).map_err(|e| {
        let inner = e.path().to_string();
        let inner = if inner == "." { String::new() } else { inner };
        error(file, &join_path(at, &inner), e.into_inner().to_string())
    })
}

fn node_from(file: &str, at: &str, node: &Node) -> Result<ClusterNode, ClusterError> {
    let name = node
        .metadata
        .name
        .clone()
        .ok_or_else(|| error(file, &join_path(at, "metadata.name"), "missing"))?;
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let (i, internal) = addresses
        .iter()
        .enumerate()
        .find(|(_, a)| a.type_ == "InternalIP")
        .ok_or_else(|| {
            error(
                file,
                &join_path(at, "status.addresses"),
                format!("node `{name}` has no InternalIP address"),
            )
        })?;
    let address = internal.address.parse().map_err(|_| {
        error(
            file,
            &join_path(at, &format!("status.addresses[{i}].address")),
            format!("`{}` is not an IP address", internal.address),
        )
    })?;
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).cloned();
    Ok(ClusterNode {
        name,
        address,
        zone: label(ZONE_LABEL),
        excluded: label(EXCLUDE_LABEL).is_some(),
    })
}

fn endpoints_from(
    file: &str,
    at: &str,
    slice: &EndpointSlice,
) -> Result<Vec<ClusterEndpoint>, ClusterError> {
    let meta = &slice.metadata;
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        // A slice no Service owns (managed by hand for something else): no endpoints of ours.
        return Ok(Vec::new());
    };
    if slice.address_type == "FQDN" {
        return Ok(Vec::new()); // FQDN slices name hosts, not pods a node routes to.
    }
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let mut out = Vec::new();
    for (i, ep) in slice
        .endpoints
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        for (j, a) in ep.addresses.iter().enumerate() {
            let address = a.parse().map_err(|_| {
                error(
                    file,
                    &join_path(at, &format!("endpoints[{i}].addresses[{j}]")),
                    format!("`{a}` is not an IP address"),
                )
            })?;
            out.push(ClusterEndpoint {
                namespace: namespace.clone(),
                service: service.clone(),
                node: ep.node_name.clone(),
                address,
                port: None,
                ready,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Lab TOML.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLab {
    #[serde(default)]
    snat: SnatScope,
    #[serde(default)]
    nodes: Vec<RawLabNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabNode {
    name: String,
    address: IpAddr,
    zone: Option<String>,
    #[serde(default)]
    pods: Vec<RawLabPod>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabPod {
    /// `name` or `namespace/name` of the Service the pod backs.
    service: String,
    address: IpAddr,
    /// Instead of the Service's targetPort (e.g. 8000 for an unprivileged 80).
    port: Option<u16>,
    #[serde(default = "ready_by_default")]
    ready: bool,
}

fn ready_by_default() -> bool {
    true
}

/// Parses a lab description: `snat`, and `[[nodes]]` with `name`, `address`,
/// `zone` and `pods = [{ service = "ns/name", address = "127.0.2.2", port = 8000, ready = true }]`
/// (`port` and `ready` optional).
pub fn parse_lab(file: &str, text: &str) -> Result<Cluster, ClusterError> {
    let de = toml::Deserializer::new(text);
    let raw: RawLab = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        error(file, &path, toml_error(file, text, &inner).message)
    })?;
    if raw.nodes.is_empty() {
        return Err(error(file, "nodes", "a lab needs at least one [[nodes]]"));
    }
    let mut cluster = Cluster {
        mode: ClusterMode::Lab,
        nodes: Vec::new(),
        endpoints: Vec::new(),
        snat: raw.snat,
    };
    for (i, n) in raw.nodes.into_iter().enumerate() {
        if !n.address.is_loopback() {
            return Err(error(
                file,
                &format!("nodes[{i}].address"),
                format!("`{}`: a lab node lives on 127.0.0.0/8", n.address),
            ));
        }
        for p in n.pods {
            let (namespace, service) = match p.service.split_once('/') {
                Some((ns, name)) => (ns.to_owned(), name.to_owned()),
                None => (DEFAULT_NAMESPACE.to_owned(), p.service),
            };
            cluster.endpoints.push(ClusterEndpoint {
                namespace,
                service,
                node: Some(n.name.clone()),
                address: p.address,
                port: p.port,
                ready: p.ready,
            });
        }
        cluster.nodes.push(ClusterNode {
            name: n.name,
            address: n.address,
            zone: n.zone,
            excluded: false,
        });
    }
    Ok(cluster)
}

/// toml's message with its line, as `config` locates its own mistakes.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ClusterError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let message = e.message().trim().to_owned();
    match line {
        Some(l) => error(file, "", format!("line {l}: {message}")),
        None => error(file, "", message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL: &str = r#"{
  "apiVersion": "v1",
  "items": [
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "aks-1", "labels": {"topology.kubernetes.io/zone": "eastus-1"}},
     "status": {"addresses": [{"type": "Hostname", "address": "aks-1"}, {"type": "InternalIP", "address": "127.0.1.1"}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
     "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
     "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "aks-1"},
                   {"addresses": ["10.244.1.7"], "nodeName": "aks-2", "conditions": {"ready": false}}],
     "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
  ],
  "kind": "List",
  "metadata": {"resourceVersion": ""}
}"#;

    #[test]
    fn kubectl_json_gives_nodes_with_zones_and_endpoints_with_readiness() {
        let c = parse_kubectl("c.json", KUBECTL).unwrap();
        assert_eq!(c.mode, ClusterMode::Real);
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].address, "127.0.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.nodes[0].zone.as_deref(), Some("eastus-1"));
        let eps: Vec<_> = c.endpoints_of("shop", "web").collect();
        assert_eq!(eps.len(), 2);
        assert!(eps[0].ready, "a missing ready condition means ready");
        assert!(!eps[1].ready);
        assert_eq!(eps[1].node.as_deref(), Some("aks-2"));
    }

    #[test]
    fn kubectl_mistakes_name_the_field_path() {
        let bad = KUBECTL.replace("\"127.0.1.1\"", "\"not-an-ip\"");
        let e = parse_kubectl("c.json", &bad).unwrap_err();
        assert_eq!(e.path, "items[0].status.addresses[1].address", "{e}");
        let bad = KUBECTL.replace("\"InternalIP\"", "\"ExternalIP\"");
        let e = parse_kubectl("c.json", &bad).unwrap_err();
        assert_eq!(e.path, "items[0].status.addresses", "{e}");
        let bad = KUBECTL.replace("\"addresses\": [\"10.244.0.5\"]", "\"addresses\": 5");
        let e = parse_kubectl("c.json", &bad).unwrap_err();
        assert!(e.path.starts_with("items[1].endpoints"), "{e}");
        let bad = KUBECTL.replace("\"kind\": \"Node\"", "\"kind\": \"Pod\"");
        let e = parse_kubectl("c.json", &bad).unwrap_err();
        assert_eq!(
            e.to_string().split(": ").nth(1),
            Some("items[0].kind"),
            "{e}"
        );
    }

    #[test]
    fn a_lab_gives_nodes_and_pods_by_service() {
        let lab = "snat = \"always\"\n[[nodes]]\nname = \"node-1\"\naddress = \"127.0.1.1\"\nzone = \"1\"\npods = [{ service = \"testapp\", address = \"127.0.2.1\" }]\n";
        let c = parse_lab("lab.toml", lab).unwrap();
        assert_eq!(c.mode, ClusterMode::Lab);
        assert_eq!(c.snat, SnatScope::Always);
        assert_eq!(c.endpoints_of("default", "testapp").count(), 1);
        let e = parse_lab("lab.toml", &lab.replace("zone", "zon")).unwrap_err();
        assert!(e.message.contains("zon"), "{e}");
        let e = parse_lab("lab.toml", &lab.replace("127.0.1.1", "10.0.0.1")).unwrap_err();
        assert_eq!(e.path, "nodes[0].address", "{e}");
    }
}
