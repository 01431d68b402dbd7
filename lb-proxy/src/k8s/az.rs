//! Plans → the YAML `az network lb rule list -o yaml` and
//! `az network lb probe list -o yaml` print, so a user can diff lb-proxy's
//! translation with their cluster's (research doc §4): `properties` flattened
//! to the top level, `resourceGroup` added to every mapping with an `id`, keys
//! sorted, block style with list items not indented under their key (PyYAML's
//! `safe_dump(default_flow_style=False)`), absent fields omitted.
//!
//! The ids live under a fake subscription and the AKS node resource group
//! ([`SUBSCRIPTION`], [`RESOURCE_GROUP`]) on the load balancer `kubernetes`
//! (the one the seed article lists), so only the names (from the Service uid)
//! and the values differ from a real cluster's output.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::plan::{HealthProbe, LbRule, ProbeProtocol, RuleProtocol, ServicePlan};

/// The subscription in every id (research doc §4's example).
pub const SUBSCRIPTION: &str = "SUB";
/// The node resource group in every id.
pub const RESOURCE_GROUP: &str = "mc_rg";
/// The public load balancer AKS creates, and its backend pool (both named after the cluster).
pub const LOAD_BALANCER: &str = "kubernetes";
const BACKEND_POOL: &str = "kubernetes";
/// ARM's etag placeholder and state of a rule or probe that exists.
const ETAG: &str = "W/\"00000000-0000-0000-0000-000000000000\"";
const PROVISIONED: &str = "Succeeded";

/// A YAML value; mappings keep their keys sorted as `az` prints them.
enum Node {
    Int(u64),
    Bool(bool),
    Str(String),
    Map(BTreeMap<&'static str, Node>),
    List(Vec<Node>),
}

/// The rules of every plan, in plan then port order.
pub fn render_rules(plans: &[ServicePlan]) -> String {
    let rules = plans
        .iter()
        .flat_map(|p| p.rules.iter().map(rule_node))
        .collect();
    to_yaml(&Node::List(rules))
}

/// The probes of every plan, each with the rules that refer to it.
pub fn render_probes(plans: &[ServicePlan]) -> String {
    let probes = plans
        .iter()
        .flat_map(|p| p.probes.iter().map(move |pr| probe_node(p, pr)))
        .collect();
    to_yaml(&Node::List(probes))
}

/// `/subscriptions/SUB/resourceGroups/mc_rg/providers/Microsoft.Network/loadBalancers/kubernetes/{child}/{name}`.
fn lb_id(child: &str, name: &str) -> String {
    format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/loadBalancers/{LOAD_BALANCER}/{child}/{name}")
}

/// `{id, resourceGroup}`: az adds the resource group to every mapping with an id.
fn reference(id: String) -> Node {
    Node::Map(BTreeMap::from([
        ("id", Node::Str(id)),
        ("resourceGroup", Node::Str(RESOURCE_GROUP.into())),
    ]))
}

/// The frontend IP configuration is named like the rules' prefix (`a` + uid, research doc §1.6).
fn frontend_ip_config(rule: &LbRule) -> String {
    let prefix = rule.name.rsplitn(3, '-').nth(2).unwrap_or(&rule.name);
    lb_id("frontendIPConfigurations", prefix)
}

fn rule_node(rule: &LbRule) -> Node {
    let mut m = BTreeMap::new();
    let pool = lb_id("backendAddressPools", BACKEND_POOL);
    m.insert("backendAddressPool", reference(pool.clone()));
    m.insert("backendAddressPools", Node::List(vec![reference(pool)]));
    m.insert("backendPort", Node::Int(rule.backend_port.into()));
    m.insert("disableOutboundSnat", Node::Bool(false));
    m.insert("enableFloatingIP", Node::Bool(rule.enable_floating_ip));
    if let Some(reset) = rule.enable_tcp_reset {
        m.insert("enableTcpReset", Node::Bool(reset));
    }
    m.insert("etag", Node::Str(ETAG.into()));
    m.insert(
        "frontendIPConfiguration",
        reference(frontend_ip_config(rule)),
    );
    m.insert("frontendPort", Node::Int(rule.frontend_port.into()));
    m.insert("id", Node::Str(lb_id("loadBalancingRules", &rule.name)));
    m.insert(
        "idleTimeoutInMinutes",
        Node::Int(rule.idle_timeout_minutes.into()),
    );
    m.insert(
        "loadDistribution",
        Node::Str(rule.load_distribution.azure_name().into()),
    );
    m.insert("name", Node::Str(rule.name.clone()));
    if let Some(probe) = &rule.probe {
        m.insert("probe", reference(lb_id("probes", probe)));
    }
    m.insert(
        "protocol",
        Node::Str(
            match rule.protocol {
                RuleProtocol::Tcp => "Tcp",
                RuleProtocol::Udp => "Udp",
            }
            .into(),
        ),
    );
    m.insert("provisioningState", Node::Str(PROVISIONED.into()));
    m.insert("resourceGroup", Node::Str(RESOURCE_GROUP.into()));
    m.insert(
        "type",
        Node::Str("Microsoft.Network/loadBalancers/loadBalancingRules".into()),
    );
    Node::Map(m)
}

/// A probe; the count goes to `probeThreshold`, as cloud-provider-azure writes it (research doc §2.3).
fn probe_node(plan: &ServicePlan, probe: &HealthProbe) -> Node {
    let mut m = BTreeMap::new();
    m.insert("etag", Node::Str(ETAG.into()));
    m.insert("id", Node::Str(lb_id("probes", &probe.name)));
    m.insert(
        "intervalInSeconds",
        Node::Int(probe.interval_seconds.into()),
    );
    let users: Vec<Node> = plan
        .rules
        .iter()
        .filter(|r| r.probe.as_deref() == Some(probe.name.as_str()))
        .map(|r| reference(lb_id("loadBalancingRules", &r.name)))
        .collect();
    m.insert("loadBalancingRules", Node::List(users));
    m.insert("name", Node::Str(probe.name.clone()));
    m.insert("port", Node::Int(probe.port.into()));
    m.insert("probeThreshold", Node::Int(probe.number_of_probes.into()));
    m.insert(
        "protocol",
        Node::Str(
            match probe.protocol {
                ProbeProtocol::Tcp => "Tcp",
                ProbeProtocol::Http => "Http",
                ProbeProtocol::Https => "Https",
            }
            .into(),
        ),
    );
    m.insert("provisioningState", Node::Str(PROVISIONED.into()));
    if let Some(path) = &probe.request_path {
        m.insert("requestPath", Node::Str(path.clone()));
    }
    m.insert("resourceGroup", Node::Str(RESOURCE_GROUP.into()));
    m.insert(
        "type",
        Node::Str("Microsoft.Network/loadBalancers/probes".into()),
    );
    Node::Map(m)
}

fn to_yaml(node: &Node) -> String {
    let mut out = String::new();
    match node {
        Node::List(items) if items.is_empty() => out.push_str("[]\n"),
        Node::Map(m) if m.is_empty() => out.push_str("{}\n"),
        _ => write_block(&mut out, node, 0),
    }
    out
}

/// Writes a list or mapping in block style at `indent`; scalars inline.
fn write_block(out: &mut String, node: &Node, indent: usize) {
    let pad = " ".repeat(indent);
    match node {
        Node::List(items) => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                write_item(out, item, indent + 2);
            }
        }
        Node::Map(m) => {
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(&pad);
                }
                write_entry(out, k, v, indent);
            }
        }
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

/// A list item's content: a mapping continues on the `- ` line.
fn write_item(out: &mut String, node: &Node, indent: usize) {
    match node {
        Node::Map(m) if !m.is_empty() => write_block(out, node, indent),
        Node::List(l) if !l.is_empty() => {
            out.push('\n');
            write_block(out, node, indent);
        }
        other => {
            out.push_str(&scalar_text(other));
            out.push('\n');
        }
    }
}

/// `key: value`; a non-empty mapping nests by two, a non-empty list stays at the key's indent.
fn write_entry(out: &mut String, key: &str, value: &Node, indent: usize) {
    let _ = write!(out, "{key}:");
    match value {
        Node::Map(m) if !m.is_empty() => {
            out.push('\n');
            out.push_str(&" ".repeat(indent + 2));
            write_block(out, value, indent + 2);
        }
        Node::List(l) if !l.is_empty() => {
            out.push('\n');
            write_block(out, value, indent);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar_text(other));
            out.push('\n');
        }
    }
}

fn scalar_text(node: &Node) -> String {
    match node {
        Node::Int(n) => n.to_string(),
        Node::Bool(b) => b.to_string(),
        Node::Str(s) => quote_if_needed(s),
        Node::List(_) => "[]".into(),
        Node::Map(_) => "{}".into(),
    }
}

/// A string as PyYAML writes it: plain when it reads back as the same string,
/// single-quoted otherwise (a request path from an annotation can hold anything).
/// The reserved words are PyYAML's bool/null resolver's (it leaves `y`/`n` plain).
fn quote_if_needed(s: &str) -> String {
    let plain_char = |c: char| c.is_ascii_alphanumeric() || "/_.-~%?=&+\"()@,;".contains(c);
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "" | "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
    );
    let numeric = s.parse::<f64>().is_ok();
    let starts_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '_' || c == '.');
    if !reserved && !numeric && starts_ok && s.chars().all(plain_char) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_style_sorted_lists_flush_with_their_key() {
        let node = Node::List(vec![Node::Map(BTreeMap::from([
            ("b", Node::List(vec![reference("x".into())])),
            ("a", Node::Int(1)),
            (
                "c",
                Node::Map(BTreeMap::from([("id", Node::Str("y".into()))])),
            ),
        ]))]);
        assert_eq!(
            to_yaml(&node),
            "- a: 1\n  b:\n  - id: x\n    resourceGroup: mc_rg\n  c:\n    id: y\n"
        );
    }

    #[test]
    fn strings_that_would_read_back_differently_are_quoted() {
        assert_eq!(quote_if_needed("/healthz"), "/healthz");
        assert_eq!(quote_if_needed(ETAG), ETAG);
        assert_eq!(quote_if_needed("true"), "'true'");
        assert_eq!(quote_if_needed("123"), "'123'");
        assert_eq!(quote_if_needed("/a: b #c"), "'/a: b #c'");
        assert_eq!(quote_if_needed("it's"), "'it''s'");
    }

    #[test]
    fn no_plans_print_an_empty_list() {
        assert_eq!(render_rules(&[]), "[]\n");
        assert_eq!(render_probes(&[]), "[]\n");
    }
}
