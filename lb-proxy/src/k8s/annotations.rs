//! The Service annotations cloud-provider-azure reads, in one table
//! ([`ANNOTATIONS`]): for each key, whether lb-proxy translates it, accepts it
//! as not emulated (it changes no rule, probe or allowed prefix), or refuses
//! it. The translation, the "not emulated" note `lb-proxy rules` prints and
//! the README's table all read this one slice, so they cannot disagree.
//!
//! Keys and meanings: `docs/research/cloud-provider-azure.md` §1–§3 (CPA
//! `pkg/consts/consts.go`); the per-port keys are built as
//! `service.beta.kubernetes.io/port_{port}_{param}` (§2.3, helpers.go L88–95)
//! with `{port}` the Service `port`, not the nodePort.

use std::collections::BTreeMap;

/// The prefix of every Kubernetes cloud-provider Service annotation.
pub const PREFIX: &str = "service.beta.kubernetes.io/";
/// Per-port keys: `service.beta.kubernetes.io/port_{port}_{param}`.
const PORT_PREFIX: &str = "service.beta.kubernetes.io/port_";
/// Where `{port}` goes in a per-port key of [`ANNOTATIONS`].
const PORT_SLOT: &str = "{port}";
/// Azure's annotations: every key under it must be in [`ANNOTATIONS`].
const AZURE_PREFIX: &str = "service.beta.kubernetes.io/azure-";

/// What lb-proxy does with an annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Changes the rules, probes or allowed prefixes exactly as cloud-provider-azure does.
    Translated,
    /// Accepted, changes nothing lb-proxy emulates (names, IPs, tags, placement); listed in the
    /// "not emulated" note.
    NotEmulated,
    /// Refused when its value is `true` (case-insensitive, as CPA compares); accepted otherwise.
    UnsupportedWhenTrue,
    /// Refused whatever its value: it changes rules, probes or the NSG in a way lb-proxy does not model.
    Unsupported,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct KnownAnnotation {
    /// The full key; per-port keys hold `{port}`.
    pub key: &'static str,
    pub handling: Handling,
    /// What it does in AKS, and for the unsupported ones why lb-proxy refuses it.
    pub what: &'static str,
}

/// Global annotation keys the translation reads (the table below names them all).
pub mod key {
    pub const IDLE_TIMEOUT: &str =
        "service.beta.kubernetes.io/azure-load-balancer-tcp-idle-timeout";
    pub const DISABLE_TCP_RESET: &str =
        "service.beta.kubernetes.io/azure-load-balancer-disable-tcp-reset";
    pub const DISABLE_FLOATING_IP: &str =
        "service.beta.kubernetes.io/azure-disable-load-balancer-floating-ip";
    pub const PROBE_PROTOCOL: &str =
        "service.beta.kubernetes.io/azure-load-balancer-health-probe-protocol";
    pub const PROBE_REQUEST_PATH: &str =
        "service.beta.kubernetes.io/azure-load-balancer-health-probe-request-path";
    pub const PROBE_INTERVAL: &str =
        "service.beta.kubernetes.io/azure-load-balancer-health-probe-interval";
    pub const PROBE_NUM_OF_PROBE: &str =
        "service.beta.kubernetes.io/azure-load-balancer-health-probe-num-of-probe";
    pub const ALLOWED_IP_RANGES: &str = "service.beta.kubernetes.io/azure-allowed-ip-ranges";
    pub const UPSTREAM_SOURCE_RANGES: &str =
        "service.beta.kubernetes.io/load-balancer-source-ranges";
}

/// Per-port parameters: the `{param}` of `port_{port}_{param}`.
pub mod param {
    pub const NO_LB_RULE: &str = "no_lb_rule";
    pub const NO_PROBE_RULE: &str = "no_probe_rule";
    pub const PROBE_PROTOCOL: &str = "health-probe_protocol";
    pub const PROBE_PORT: &str = "health-probe_port";
    pub const PROBE_INTERVAL: &str = "health-probe_interval";
    pub const PROBE_NUM_OF_PROBE: &str = "health-probe_num-of-probe";
    pub const PROBE_REQUEST_PATH: &str = "health-probe_request-path";
}

use Handling::{NotEmulated, Translated, Unsupported, UnsupportedWhenTrue};

/// Every annotation cloud-provider-azure reads on a Service, and lb-proxy's handling.
pub const ANNOTATIONS: &[KnownAnnotation] = &[
    // Rules (research doc §1).
    KnownAnnotation {
        key: key::IDLE_TIMEOUT,
        handling: Translated,
        what: "idleTimeoutInMinutes of every rule, 4-100, default 4 (§1.3)",
    },
    KnownAnnotation {
        key: key::DISABLE_TCP_RESET,
        handling: Translated,
        what: "enableTcpReset: false on TCP rules (§1.1 step 5)",
    },
    KnownAnnotation {
        key: key::DISABLE_FLOATING_IP,
        handling: Translated,
        what: "enableFloatingIP: false, backendPort = nodePort (§1.1 step 6)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_no_lb_rule",
        handling: Translated,
        what: "no rule and no probe for that port (§2.4)",
    },
    // Probes (§2).
    KnownAnnotation {
        key: key::PROBE_PROTOCOL,
        handling: Translated,
        what: "probe protocol Tcp/Http/Https for Cluster services (§2.1)",
    },
    KnownAnnotation {
        key: key::PROBE_REQUEST_PATH,
        handling: Translated,
        what: "probe requestPath for Http(s), default / (§2.1)",
    },
    KnownAnnotation {
        key: key::PROBE_INTERVAL,
        handling: Translated,
        what: "intervalInSeconds, >= 5, default 5 (§2.3)",
    },
    KnownAnnotation {
        key: key::PROBE_NUM_OF_PROBE,
        handling: Translated,
        what: "probeThreshold, >= 2, default 2; interval x count < 120 (§2.3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_no_probe_rule",
        handling: Translated,
        what: "the port's rule gets no probe (§2.4)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_health-probe_protocol",
        handling: Translated,
        what: "the port's probe protocol, beats appProtocol and the global key (§2.1)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_health-probe_port",
        handling: Translated,
        what: "the port's probe port: a port name or number (§2.2)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_health-probe_interval",
        handling: Translated,
        what: "the port's probe interval (§2.3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_health-probe_num-of-probe",
        handling: Translated,
        what: "the port's probe count (§2.3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/port_{port}_health-probe_request-path",
        handling: Translated,
        what: "the port's probe path (§2.1)",
    },
    // NSG (§3).
    KnownAnnotation {
        key: key::ALLOWED_IP_RANGES,
        handling: Translated,
        what:
            "allowed client prefixes, comma-separated; not with spec.loadBalancerSourceRanges (§3)",
    },
    KnownAnnotation {
        key: key::UPSTREAM_SOURCE_RANGES,
        handling: Translated,
        what: "merged with azure-allowed-ip-ranges (§3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-deny-all-except-load-balancer-source-ranges",
        handling: NotEmulated,
        what: "NSG deny-all rule; lb-proxy's allowlist already refuses every other client (§3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-shared-securityrule",
        handling: NotEmulated,
        what: "NSG rule sharing; the allowed prefixes are the same (§3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-allowed-service-tags",
        handling: Unsupported,
        what:
            "NSG allow by Azure service tag: tags are Azure address sets lb-proxy cannot check (§3)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-disable-load-balancer-nsg-rule",
        handling: UnsupportedWhenTrue,
        what: "no NSG rules at all: who gets through depends on NSGs lb-proxy does not see (§3)",
    },
    // Internal LB and HA ports (§1.2, §1.6): other LB, other rule names, protocol All.
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-internal",
        handling: UnsupportedWhenTrue,
        what: "internal load balancer `kubernetes-internal` (§1.2, §1.6)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-internal-subnet",
        handling: Unsupported,
        what: "internal LB subnet; changes rule names (§1.6)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-enable-high-availability-ports",
        handling: UnsupportedWhenTrue,
        what: "one HA-ports rule, protocol All, port 0 (§1.2)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-create",
        handling: UnsupportedWhenTrue,
        what: "Private Link Service; with proxy protocol it changes Local probes (§2.1)",
    },
    // Names, addresses, placement: no effect on rules, probes or who gets through.
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-dns-label-name",
        handling: NotEmulated,
        what: "DNS label of the public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-name",
        handling: NotEmulated,
        what: "name of the public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-name-ipv6",
        handling: NotEmulated,
        what: "name of the IPv6 public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-prefix-id",
        handling: NotEmulated,
        what: "public IP prefix",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-prefix-id-ipv6",
        handling: NotEmulated,
        what: "IPv6 public IP prefix",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-ip-tags",
        handling: NotEmulated,
        what: "IP tags of the public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pip-tags",
        handling: NotEmulated,
        what: "Azure tags of the public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-ipv4",
        handling: NotEmulated,
        what: "the frontend IPv4 address",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-ipv6",
        handling: NotEmulated,
        what: "the frontend IPv6 address",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-resource-group",
        handling: NotEmulated,
        what: "resource group of the public IP",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-mode",
        handling: NotEmulated,
        what: "which load balancer (VMSS/availability set) carries the rules",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-load-balancer-configurations",
        handling: NotEmulated,
        what: "which of several standard load balancers carries the rules",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-additional-public-ips",
        handling: NotEmulated,
        what: "extra IPs kube-proxy accepts; not configured on the Azure LB",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-name",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-ip-configuration-subnet",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-ip-configuration-ip-address-count",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-ip-configuration-ip-address",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-fqdns",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-proxy-protocol",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-visibility",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
    KnownAnnotation {
        key: "service.beta.kubernetes.io/azure-pls-auto-approval",
        handling: NotEmulated,
        what: "Private Link Service (only with azure-pls-create)",
    },
];

impl Handling {
    /// How the README and `lb-proxy rules --annotations` name it.
    pub const fn label(self) -> &'static str {
        match self {
            Translated => "translated",
            NotEmulated => "accepted, not emulated",
            UnsupportedWhenTrue => "refused when \"true\"",
            Unsupported => "refused",
        }
    }
}

/// [`ANNOTATIONS`] as a Markdown table (`lb-proxy rules --annotations`), so
/// the docs are printed from the table the code reads. `§` = a section of
/// docs/research/cloud-provider-azure.md.
pub fn markdown_table() -> String {
    let mut out = String::from("| annotation | lb-proxy | what it does in AKS |\n|---|---|---|\n");
    for a in ANNOTATIONS {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            a.key,
            a.handling.label(),
            a.what
        ));
    }
    out
}

/// The field path of an annotation, for error messages.
pub fn path(key: &str) -> String {
    format!("metadata.annotations[\"{key}\"]")
}

/// A Service's annotations, with the per-port ones looked up by port.
pub struct Annotations<'a> {
    map: &'a BTreeMap<String, String>,
}

/// Why an annotation was refused: its key and the message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub message: String,
}

/// An annotation present on the Service that lb-proxy accepts without
/// emulating it, for the "not emulated" note.
#[derive(Debug, PartialEq, Eq)]
pub struct NotEmulatedKey {
    pub key: String,
    pub what: &'static str,
}

impl<'a> Annotations<'a> {
    pub fn new(map: &'a BTreeMap<String, String>) -> Self {
        Annotations { map }
    }

    /// The value of a global key, trimmed; `None` when absent.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.map.get(key).map(|v| v.trim())
    }

    /// The key of the per-port parameter for `port`.
    pub fn port_key(port: i32, param: &str) -> String {
        format!("{PORT_PREFIX}{port}_{param}")
    }

    /// A per-port parameter, trimmed, with its key (for error paths).
    pub fn get_port(&self, port: i32, param: &str) -> Option<(String, &'a str)> {
        let key = Self::port_key(port, param);
        self.map.get(&key).map(|v| (key, v.trim()))
    }

    /// `true` when the key is set to `true`, compared as CPA does (`strings.EqualFold`).
    pub fn is_true(value: Option<&str>) -> bool {
        value.is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// Checks every annotation against [`ANNOTATIONS`]: an unknown Azure key, an
    /// unsupported one, or a per-port key for a port the Service does not have
    /// is refused; the accepted-but-not-emulated ones are returned for the note.
    /// `ports` are the Service ports (and the healthCheckNodePort, whose probe
    /// reads the per-port keys too, §2.1).
    pub fn check(&self, ports: &[i32]) -> Result<Vec<NotEmulatedKey>, Refused> {
        let mut not_emulated = Vec::new();
        for (key, value) in self.map {
            let Some(known) = lookup(key, ports)? else {
                continue;
            };
            let refused = match known.handling {
                Translated => false,
                NotEmulated => {
                    not_emulated.push(NotEmulatedKey {
                        key: key.clone(),
                        what: known.what,
                    });
                    false
                }
                UnsupportedWhenTrue => Self::is_true(Some(value.trim())),
                Unsupported => true,
            };
            if refused {
                return Err(Refused {
                    key: key.clone(),
                    message: format!("not supported by lb-proxy: {}", known.what),
                });
            }
        }
        Ok(not_emulated)
    }
}

/// The table row for a key: `None` for keys that are not cloud-provider
/// annotations (kubectl's, the user's own); an error for an unknown Azure or
/// per-port key (a typo AKS would silently ignore).
fn lookup(key: &str, ports: &[i32]) -> Result<Option<&'static KnownAnnotation>, Refused> {
    if let Some(rest) = key.strip_prefix(PORT_PREFIX) {
        return lookup_port(key, rest, ports).map(Some);
    }
    if let Some(row) = ANNOTATIONS.iter().find(|a| a.key == key) {
        return Ok(Some(row));
    }
    if key.starts_with(AZURE_PREFIX) {
        return Err(Refused {
            key: key.to_string(),
            message: "unknown Azure annotation (see README \"From your Service manifest\" for the ones lb-proxy knows)".into(),
        });
    }
    Ok(None)
}

/// A per-port key `port_{port}_{param}`: known param, and a port the Service has.
fn lookup_port(key: &str, rest: &str, ports: &[i32]) -> Result<&'static KnownAnnotation, Refused> {
    let refuse = |message: String| Refused {
        key: key.to_string(),
        message,
    };
    let (port, param) = rest
        .split_once('_')
        .ok_or_else(|| refuse("expected port_{port}_{param}".into()))?;
    // Only the canonical spelling: `port_080_...` or `port_+80_...` would pass
    // here and never be read, since lookups build the key from the number.
    let port: i32 = port
        .parse()
        .ok()
        .filter(|n: &i32| n.to_string() == port)
        .ok_or_else(|| {
            refuse(format!(
                "`{port}` is not a port number as Kubernetes writes it (expected port_{{port}}_{{param}}, e.g. port_80_...)"
            ))
        })?;
    let pattern = format!("{PORT_PREFIX}{PORT_SLOT}_{param}");
    let row = ANNOTATIONS
        .iter()
        .find(|a| a.key == pattern)
        .ok_or_else(|| refuse(format!("unknown per-port parameter `{param}`")))?;
    if !ports.contains(&port) {
        return Err(refuse(format!(
            "no spec.ports[] entry has port {port} (per-port annotations name the Service port, not the nodePort)"
        )));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_key_is_listed_once_and_under_the_prefix() {
        for (i, a) in ANNOTATIONS.iter().enumerate() {
            assert!(a.key.starts_with(PREFIX), "{}", a.key);
            assert!(
                ANNOTATIONS[i + 1..].iter().all(|b| b.key != a.key),
                "{} twice",
                a.key
            );
        }
    }

    #[test]
    fn markdown_table_has_a_row_per_key() {
        let table = markdown_table();
        assert_eq!(table.lines().count(), ANNOTATIONS.len() + 2);
        assert!(table.contains(
            "| `service.beta.kubernetes.io/azure-load-balancer-internal` | refused when \"true\" |"
        ));
    }

    #[test]
    fn foreign_annotations_pass_and_not_emulated_ones_are_listed() {
        let m = map(&[
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ("service.beta.kubernetes.io/azure-dns-label-name", "myapp"),
            (key::IDLE_TIMEOUT, "10"),
        ]);
        let listed = Annotations::new(&m).check(&[80]).unwrap();
        assert_eq!(
            listed,
            vec![NotEmulatedKey {
                key: "service.beta.kubernetes.io/azure-dns-label-name".into(),
                what: "DNS label of the public IP"
            }]
        );
    }

    #[test]
    fn unknown_azure_key_is_refused() {
        let m = map(&[(
            "service.beta.kubernetes.io/azure-load-balancer-tcp-idle-timout",
            "10",
        )]);
        let e = Annotations::new(&m).check(&[80]).unwrap_err();
        assert!(e.key.ends_with("idle-timout"));
        assert!(
            e.message.contains("unknown Azure annotation"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unsupported_keys_are_refused_when_true_or_always() {
        let internal = "service.beta.kubernetes.io/azure-load-balancer-internal";
        assert!(Annotations::new(&map(&[(internal, "false")]))
            .check(&[80])
            .is_ok());
        let e = Annotations::new(&map(&[(internal, "True")]))
            .check(&[80])
            .unwrap_err();
        assert!(
            e.message.contains("internal load balancer"),
            "{}",
            e.message
        );
        let tags = "service.beta.kubernetes.io/azure-allowed-service-tags";
        assert!(Annotations::new(&map(&[(tags, "AzureCloud")]))
            .check(&[80])
            .is_err());
    }

    #[test]
    fn per_port_keys_need_a_known_param_and_an_existing_port() {
        let ok = map(&[(
            "service.beta.kubernetes.io/port_80_health-probe_interval",
            "7",
        )]);
        assert!(Annotations::new(&ok).check(&[80]).is_ok());
        let e = Annotations::new(&ok).check(&[443]).unwrap_err();
        assert!(
            e.message.contains("no spec.ports[] entry has port 80"),
            "{}",
            e.message
        );
        let typo = map(&[(
            "service.beta.kubernetes.io/port_80_health-probe_intervall",
            "7",
        )]);
        let e = Annotations::new(&typo).check(&[80]).unwrap_err();
        assert!(
            e.message.contains("unknown per-port parameter"),
            "{}",
            e.message
        );
        let bad = map(&[("service.beta.kubernetes.io/port_http_no_lb_rule", "true")]);
        assert!(Annotations::new(&bad).check(&[80]).is_err());
        // Spellings that parse as 80 but that no lookup would ever read.
        for key in [
            "service.beta.kubernetes.io/port_080_no_lb_rule",
            "service.beta.kubernetes.io/port_+80_no_lb_rule",
        ] {
            let e = Annotations::new(&map(&[(key, "true")]))
                .check(&[80])
                .unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.message.contains("port_80_"), "{}", e.message);
        }
    }
}
