//! `lb-proxy rules --service`: the built binary on Service manifests
//! (tests/fixtures/k8s/) prints what AKS would create, in the shape of
//! `az network lb rule|probe list -o yaml`; malformed manifests exit 1 naming
//! the file and field. The seed article's Service gives `loadDistribution:
//! Default`, and `SourceIP` once `sessionAffinity: ClientIP` is set, as its
//! `az ... | grep loadDistribution` showed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use lb_tests::proxy_bin;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/k8s")
        .join(name)
}

/// Runs `lb-proxy rules --service FIXTURE... EXTRA...`: (exit code, stdout, stderr).
fn run_rules(fixtures: &[&str], extra: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(proxy_bin());
    cmd.arg("rules").env_remove("RUST_LOG");
    for f in fixtures {
        cmd.arg("--service").arg(fixture(f));
    }
    let out = cmd.args(extra).output().expect("run lb-proxy rules");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `rules` expecting success; returns (stdout, stderr).
fn rules_ok(fixtures: &[&str], extra: &[&str]) -> (String, String) {
    let (code, stdout, stderr) = run_rules(fixtures, extra);
    assert_eq!(
        code,
        Some(0),
        "rules {fixtures:?} {extra:?} failed: {stderr}"
    );
    (stdout, stderr)
}

/// One list item of az's YAML: its top-level scalar fields, and for `probe`
/// the probe's name (the last segment of its id).
type Item = BTreeMap<String, String>;

/// Splits az-shaped YAML (a block list of mappings) into items.
fn items(yaml: &str) -> Vec<Item> {
    let mut out: Vec<Item> = Vec::new();
    let mut nested: Option<String> = None;
    for line in yaml.lines() {
        let (top, rest) = if let Some(rest) = line.strip_prefix("- ") {
            out.push(Item::new());
            (true, rest)
        } else if let Some(rest) = line.strip_prefix("  ") {
            (!rest.starts_with(' ') && !rest.starts_with('-'), rest)
        } else {
            (false, line)
        };
        let Some(item) = out.last_mut() else { continue };
        if top {
            let (key, value) = rest.split_once(':').expect("key: value");
            nested = value.is_empty().then(|| key.to_string());
            if !value.is_empty() {
                item.insert(key.to_string(), value.trim().to_string());
            }
        } else if let (Some(key), Some(id)) = (&nested, rest.trim().strip_prefix("id: ")) {
            if key == "probe" {
                let name = id.rsplit('/').next().expect("id has segments");
                item.insert(key.clone(), name.to_string());
            }
        }
    }
    out
}

fn field<'a>(item: &'a Item, key: &str) -> &'a str {
    item.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no `{key}` in {item:?}"))
}

#[test]
fn article_service_gives_default_then_source_ip() {
    for (file, mode) in [
        ("testapp.yaml", "Default"),
        ("testapp-clientip.yaml", "SourceIP"),
    ] {
        let (stdout, stderr) = rules_ok(&[file], &[]);
        // What the article's `az network lb rule list -o yaml | grep loadDistribution` printed.
        let grep: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("loadDistribution"))
            .map(str::trim)
            .collect();
        assert_eq!(grep, [format!("loadDistribution: {mode}")], "{file}");
        let rules = items(&stdout);
        assert_eq!(rules.len(), 1, "{stdout}");
        let r = &rules[0];
        for (key, want) in [
            ("frontendPort", "80"),
            ("backendPort", "80"),
            ("protocol", "Tcp"),
            ("enableFloatingIP", "true"),
            ("enableTcpReset", "true"),
            ("idleTimeoutInMinutes", "4"),
        ] {
            assert_eq!(field(r, key), want, "{key} in {file}");
        }
        assert!(field(r, "name").ends_with("-TCP-80"), "{r:?}");
        assert_eq!(field(r, "probe"), field(r, "name"));
        // The hand-written manifest has no uid and no nodePort: said, not hidden.
        assert!(stderr.contains("metadata.uid: not set"), "{stderr}");
        assert!(
            stderr.contains("spec.ports[0].nodePort: not set"),
            "{stderr}"
        );
    }
}

#[test]
fn kubectl_list_names_rules_from_the_uid_and_probes_the_node_port() {
    let (stdout, stderr) = rules_ok(&["testapp-list.json"], &["--all"]);
    let (rule_doc, probe_doc) = stdout.split_once("---\n").expect("two documents");
    let rules = items(rule_doc);
    let probes = items(probe_doc);
    // The ClusterIP `kubernetes` Service gets no rule, as in AKS.
    assert_eq!(rules.len(), 1, "{rule_doc}");
    assert_eq!(
        field(&rules[0], "name"),
        "a5f0b6c4e8d2a4b1fa3c79e8d7f6a5b4-TCP-80"
    );
    assert_eq!(probes.len(), 1, "{probe_doc}");
    let p = &probes[0];
    assert_eq!(field(p, "name"), field(&rules[0], "name"));
    assert_eq!((field(p, "port"), field(p, "protocol")), ("31857", "Tcp"));
    assert_eq!(
        (field(p, "intervalInSeconds"), field(p, "probeThreshold")),
        ("5", "2")
    );
    assert!(!p.contains_key("requestPath"), "{p:?}");
    assert!(stderr.is_empty(), "{stderr}");

    let (code, _, stderr) = run_rules(&["testapp-list.json"], &["--name", "kubernetes"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("testapp-list.json: items[0].spec.type: `ClusterIP`"),
        "{stderr}"
    );
    let (code, _, stderr) = run_rules(&["testapp-list.json"], &["--name", "default/nope"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("default/kubernetes, default/testapp"),
        "{stderr}"
    );
}

#[test]
fn every_annotation_changes_the_printed_rules_and_probes() {
    let (rules_out, stderr) = rules_ok(&["all-annotations.yaml"], &[]);
    let (probes_out, _) = rules_ok(&["all-annotations.yaml"], &["--probes"]);
    let rules = items(&rules_out);
    let prefix = "a6c8f1a2e3b4d4e5f9a0b1c2d3e4f5a6";
    // port_8080_no_lb_rule: no rule for 8080.
    let names: Vec<&str> = rules.iter().map(|r| field(r, "name")).collect();
    let want: Vec<String> = ["TCP-80", "TCP-443", "TCP-8443", "TCP-9090", "UDP-53"]
        .iter()
        .map(|s| format!("{prefix}-{s}"))
        .collect();
    assert_eq!(names, want);
    for r in &rules {
        // idle timeout 15, floating IP off (backendPort = nodePort), ClientIP -> SourceIP.
        assert_eq!(field(r, "idleTimeoutInMinutes"), "15");
        assert_eq!(field(r, "enableFloatingIP"), "false");
        assert_eq!(field(r, "loadDistribution"), "SourceIP");
        // disable-tcp-reset on TCP rules; UDP rules carry no enableTcpReset.
        let tcp = field(r, "protocol") == "Tcp";
        assert_eq!(
            r.get("enableTcpReset").map(String::as_str),
            tcp.then_some("false")
        );
    }
    let backend: Vec<&str> = rules.iter().map(|r| field(r, "backendPort")).collect();
    assert_eq!(backend, ["30080", "30443", "30843", "30090", "30053"]);
    // port_9090_no_probe_rule, and no probe for UDP under Cluster.
    let probed: Vec<Option<&str>> = rules
        .iter()
        .map(|r| r.get("probe").map(String::as_str))
        .collect();
    assert_eq!(
        probed,
        [
            Some(want[0].as_str()),
            Some(want[1].as_str()),
            Some(want[2].as_str()),
            None,
            None
        ]
    );

    let probes = items(&probes_out);
    let got: Vec<[&str; 5]> = probes
        .iter()
        .map(|p| {
            [
                field(p, "protocol"),
                field(p, "port"),
                field(p, "requestPath"),
                field(p, "intervalInSeconds"),
                field(p, "probeThreshold"),
            ]
        })
        .collect();
    assert_eq!(
        got,
        [
            // Global protocol/path/interval/count.
            ["Http", "30080", "/ready", "10", "3"],
            // Per-port protocol/path/interval/count for 443.
            ["Https", "30443", "/tls-health", "7", "4"],
            // port_8443_health-probe_port: "http" -> the http port's nodePort.
            ["Http", "30080", "/ready", "10", "3"],
        ]
    );
    // Accepted but not emulated: said on stderr.
    assert!(
        stderr.contains("azure-dns-label-name\"]: not emulated"),
        "{stderr}"
    );
    // The UDP rule prints idleTimeoutInMinutes 15 as CPA writes it; Azure
    // ignores it there, and `run` keeps the UDP flow timeout: said on stderr.
    assert!(
        stderr.contains("azure-load-balancer-tcp-idle-timeout\"]: applies to TCP rules only"),
        "{stderr}"
    );
}

#[test]
fn local_policy_probes_healthz_on_the_health_check_node_port() {
    let (stdout, _) = rules_ok(&["local.yaml"], &["--all"]);
    let (rule_doc, probe_doc) = stdout.split_once("---\n").expect("two documents");
    let probes = items(probe_doc);
    assert_eq!(probes.len(), 1, "{probe_doc}");
    let p = &probes[0];
    assert_eq!(
        [
            field(p, "protocol"),
            field(p, "port"),
            field(p, "requestPath"),
            field(p, "intervalInSeconds")
        ],
        ["Http", "32100", "/healthz", "6"]
    );
    // Both rules, the UDP one too, point at it.
    let rules = items(rule_doc);
    assert_eq!(rules.len(), 2);
    assert!(
        rules.iter().all(|r| field(r, "probe") == field(p, "name")),
        "{rules:?}"
    );
}

#[test]
fn malformed_manifests_exit_1_naming_file_and_field() {
    let cases = [
        ("bad-protocol.yaml", "bad-protocol.yaml: spec.ports[1].protocol: `HTTPS`"),
        ("bad-nodeport.yaml", "bad-nodeport.yaml: spec.ports[1].nodePort: invalid type"),
        (
            "bad-idle-timeout.yaml",
            "bad-idle-timeout.yaml: metadata.annotations[\"service.beta.kubernetes.io/azure-load-balancer-tcp-idle-timeout\"]: `120`",
        ),
        (
            "both-source-ranges.yaml",
            "both-source-ranges.yaml: spec.loadBalancerSourceRanges: cannot set both",
        ),
        ("not-yaml.yaml", "not-yaml.yaml: not valid YAML"),
        (
            "unknown-field.yaml",
            "unknown-field.yaml: spec.sessionAfinity: unknown field",
        ),
    ];
    for (file, want) in cases {
        let (code, stdout, stderr) = run_rules(&[file], &[]);
        assert_eq!(code, Some(1), "{file}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{file}: {stderr}");
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
        assert!(stdout.is_empty(), "{file}: printed rules: {stdout}");
    }
}

#[test]
fn annotation_table_lists_every_key_the_fixture_uses() {
    let (table, _) = rules_ok(&[], &["--annotations"]);
    let text = std::fs::read_to_string(fixture("all-annotations.yaml")).expect("fixture");
    let keys: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().split_once(": ").map(|(k, _)| k))
        .filter(|k| k.starts_with("service.beta.kubernetes.io/"))
        .map(
            |k| match k.strip_prefix("service.beta.kubernetes.io/port_") {
                // port_443_health-probe_protocol -> port_{port}_health-probe_protocol
                Some(rest) => {
                    let param = rest.split_once('_').expect("port_N_param").1;
                    format!("service.beta.kubernetes.io/port_{{port}}_{param}")
                }
                None => k.to_string(),
            },
        )
        .collect();
    assert_eq!(keys.len(), 16, "{keys:?}");
    for key in keys {
        assert!(
            table.contains(&format!("| `{key}` |")),
            "{key} missing from:\n{table}"
        );
    }
}
