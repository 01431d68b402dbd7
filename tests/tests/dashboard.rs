//! The shipped Grafana dashboard and alert rules only reference metrics the
//! balancer really exports, their PromQL parses, and the dashboard has the
//! panels the issue asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb_tests::{finish, one_frontend_config, read_line, wait_until, Backend, BoundClient, Proxy};
use serde_json::Value;

const DASHBOARD: &str = "config/grafana/lb-proxy-dashboard.json";
const ALERTS: &str = "config/prometheus/alerts.yml";
const SCRAPE_CONFIG: &str = "config/prometheus/prometheus.yml";
const PROMTOOL: &str = "/usr/bin/promtool";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// A panel: its title and the PromQL of its targets.
#[derive(Debug)]
struct Panel {
    id: Option<u64>,
    /// Grafana's panel type (`timeseries`, `row`, ...).
    kind: String,
    title: String,
    exprs: Vec<(String, String)>,
    datasource_uids: Vec<String>,
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<Panel> {
    fn walk(list: &Value, out: &mut Vec<Panel>) {
        for p in list.as_array().into_iter().flatten() {
            let mut datasource_uids = Vec::new();
            if let Some(uid) = p["datasource"]["uid"].as_str() {
                datasource_uids.push(uid.to_owned());
            }
            let mut exprs = Vec::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(uid) = t["datasource"]["uid"].as_str() {
                    datasource_uids.push(uid.to_owned());
                }
                if let Some(e) = t["expr"].as_str() {
                    let ref_id = t["refId"].as_str().unwrap_or("?").to_owned();
                    exprs.push((ref_id, e.to_owned()));
                }
            }
            out.push(Panel {
                id: p["id"].as_u64(),
                kind: p["type"].as_str().unwrap_or("").to_owned(),
                title: p["title"].as_str().unwrap_or("").to_owned(),
                exprs,
                datasource_uids,
            });
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The PromQL of templating variables of type `query` (string or `{query: ..}`).
fn templating_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        match &v["query"] {
            Value::String(q) => out.push(q.clone()),
            q => out.extend(q["query"].as_str().map(str::to_owned)),
        }
        out.extend(v["definition"].as_str().map(str::to_owned));
    }
    out
}

fn variable_names(dashboard: &Value) -> BTreeSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// Identifiers starting `lb_` or `process_` (whole tokens, not inside other names).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut token = String::new();
    let mut prev_ok = true;
    for c in text.chars().chain(std::iter::once(' ')) {
        if is_ident(c) {
            token.push(c);
            continue;
        }
        if prev_ok && (token.starts_with("lb_") || token.starts_with("process_")) && token.len() > 3
        {
            out.insert(token.clone());
        }
        token.clear();
        // `$lb_x` or `"lb_x` inside a label value are not metric names; `.` or `-`
        // glue a token to the one before.
        prev_ok = !matches!(c, '$' | '.' | '-' | '"');
    }
    out
}

/// `$name`, `${name}` and `[[name]]` references in `text`.
fn variable_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let body = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// What a running balancer exports.

/// Metric families with at least one sample in a `/metrics` body, and their types.
fn exported(text: &str) -> BTreeMap<String, String> {
    let types: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect();
    let sample_names: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    types
        .into_iter()
        .filter(|(name, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|s| sample_names.contains(format!("{name}{s}").as_str()))
        })
        .collect()
}

/// The family a referenced name belongs to: `x_bucket` etc. of histogram `x` is `x`.
fn family<'a>(name: &'a str, families: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                families.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    name
}

/// A udp frontend over `udp_backend` and a quic frontend (its metrics are
/// per frontend, pre-created at 0), appended to a one-frontend config.
fn udp_and_quic_frontends(udp_backend: &Backend) -> String {
    format!(
        "\n[[frontends]]\nname = \"udp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n[frontends.health]\nkind = \"none\"\n\n{}\n\
         [[frontends]]\nname = \"quic\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"quic\"\n[frontends.health]\nkind = \"none\"\n\
         [frontends.quic]\nconfig_id = 0\nserver_id_length = 3\n\n\
         [[frontends.backends]]\nname = \"q\"\naddress = \"127.0.0.1:9\"\nserver_id = \"010101\"\n",
        udp_backend.toml()
    )
}

/// A balancer with three echo backends, a udp and a quic frontend, that has
/// carried some traffic over TCP and UDP; its `/metrics`.
fn live_scrape() -> String {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::echo(n)).collect();
    let tables: Vec<String> = backends.iter().map(Backend::toml).collect();
    let udp_backend = Backend::start("udp-echo", "u", "127.0.0.1:0".parse().expect("addr"));
    let config = one_frontend_config(
        "web",
        "[frontends.health]\nkind = \"tcp\"\ninterval = \"1s\"",
        &tables,
    ) + &udp_and_quic_frontends(&udp_backend);
    let proxy = Proxy::run(&config);
    for i in 0..30u8 {
        let mut c = BoundClient::new(Ipv4Addr::new(127, 0, 3, 1 + i))
            .and_then(|b| b.connect(proxy.frontend("web")))
            .expect("connect");
        read_line(&mut c).expect("name line");
        assert!(finish(&mut c).expect("finish").is_empty());
    }
    one_udp_round_trip(proxy.frontend("udp"));
    proxy.metrics().0
}

/// One datagram through the udp frontend and its echo back (resent until
/// answered, within a deadline, as UDP may drop the first).
fn one_udp_round_trip(frontend: std::net::SocketAddr) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    wait_until(
        "a UDP echo through the udp frontend",
        Duration::from_secs(10),
        || {
            socket.send_to(b"ping", frontend).expect("send");
            socket.recv(&mut buf).ok().filter(|&n| n > 0)
        },
    );
}

/// Names in `referenced` (by where they came from) that `families` lacks.
fn unexported(
    referenced: &BTreeMap<String, BTreeSet<String>>,
    families: &BTreeMap<String, String>,
) -> Vec<String> {
    referenced
        .iter()
        .filter(|(name, _)| !families.contains_key(family(name, families)))
        .map(|(name, wher)| format!("{name} (in {wher:?})"))
        .collect()
}

// ---------------------------------------------------------------------------

#[test]
fn dashboard_and_alerts_reference_only_exported_metrics() {
    let d = dashboard();
    let mut referenced: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in panels(&d) {
        for (ref_id, e) in &p.exprs {
            for m in metric_names(e) {
                referenced
                    .entry(m)
                    .or_default()
                    .insert(format!("panel {:?} {ref_id}", p.title));
            }
        }
    }
    for q in templating_queries(&d) {
        for m in metric_names(&q) {
            referenced.entry(m).or_default().insert("templating".into());
        }
    }
    assert!(
        referenced.len() >= 10,
        "the dashboard references only {referenced:?}"
    );
    let mut in_alerts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in metric_names(&read(ALERTS)) {
        in_alerts.entry(m).or_default().insert(ALERTS.into());
    }
    assert!(in_alerts.len() >= 3, "alerts.yml references {in_alerts:?}");

    let scrape = live_scrape();
    let families = exported(&scrape);
    let missing_dashboard = unexported(&referenced, &families);
    let missing_alerts = unexported(&in_alerts, &families);
    assert!(
        missing_dashboard.is_empty() && missing_alerts.is_empty(),
        "referenced but not exported after traffic:\n dashboard: {missing_dashboard:?}\n alerts: {missing_alerts:?}\n\nexported: {:?}",
        families.keys().collect::<Vec<_>>()
    );
}

/// The panel whose expressions satisfy `pred`, or a panic naming `what`.
fn find_panel<'a>(panels: &'a [Panel], what: &str, pred: impl Fn(&str) -> bool) -> &'a Panel {
    panels
        .iter()
        .find(|p| {
            let all: String = p
                .exprs
                .iter()
                .map(|(_, e)| e.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            pred(&all.replace(' ', ""))
        })
        .unwrap_or_else(|| {
            panic!(
                "no dashboard panel for {what}; panels: {:#?}",
                panels
                    .iter()
                    .map(|p| (&p.title, &p.exprs))
                    .collect::<Vec<_>>()
            )
        })
}

#[test]
fn dashboard_has_the_required_panels() {
    let d = dashboard();
    let panels = panels(&d);
    let has = |all: &str, s: &str| all.contains(&s.replace(' ', ""));

    let p = find_panel(&panels, "per-backend new-connection rate", |e| {
        has(e, "rate(lb_backend_connections_total") && has(e, "by (backend)")
    });
    eprintln!("new connections: {:?}", p.title);
    let p = find_panel(&panels, "new-connection share vs expected share", |e| {
        has(e, "rate(lb_backend_connections_total") && has(e, "lb_backend_table_slots")
    });
    eprintln!("share vs expected: {:?}", p.title);
    find_panel(&panels, "active connections", |e| {
        has(e, "lb_backend_active_connections")
    });
    find_panel(&panels, "bytes/s", |e| {
        has(e, "rate(lb_backend_sent_bytes_total") && has(e, "rate(lb_backend_received_bytes_total")
    });
    find_panel(&panels, "health", |e| has(e, "lb_backend_up"));
    find_panel(&panels, "connect errors", |e| {
        has(e, "rate(lb_backend_connect_errors_total")
    });
    let p99 = find_panel(&panels, "p99 connect time", |e| {
        has(e, "histogram_quantile(0.99") && has(e, "lb_backend_connect_duration_seconds_bucket")
    });
    // histogram_quantile needs `le` kept through the aggregation.
    for (_, e) in &p99.exprs {
        if let Some(i) = e.find(" by (") {
            let by = &e[i + 5..];
            let by = &by[..by.find(')').expect("closing paren")];
            assert!(
                by.split(',').any(|l| l.trim() == "le"),
                "p99 panel aggregates away `le`: {e}"
            );
        }
    }
    find_panel(&panels, "config reloads", |e| {
        has(e, "lb_config_reloads_total")
    });

    // UDP and QUIC.
    find_panel(&panels, "UDP datagrams/s each way", |e| {
        has(e, "rate(lb_backend_sent_datagrams_total")
            && has(e, "rate(lb_backend_received_datagrams_total")
    });
    find_panel(&panels, "active UDP flows", |e| {
        has(e, "lb_backend_active_udp_flows") && has(e, "by (backend)")
    });
    find_panel(&panels, "UDP flow ends and moves", |e| {
        has(e, "rate(lb_udp_flows_ended_total")
            && has(e, "by (reason)")
            && has(e, "lb_udp_flows_moved_total")
    });
    find_panel(&panels, "UDP drops", |e| {
        has(e, "rate(lb_udp_dropped_datagrams_total") && has(e, "by (reason)")
    });
    find_panel(&panels, "QUIC routing step", |e| {
        has(e, "rate(lb_quic_routed_total") && has(e, "by (by)")
    });
    find_panel(&panels, "QUIC unroutable reasons", |e| {
        has(e, "rate(lb_quic_unroutable_total") && has(e, "by (reason)")
    });
}

#[test]
fn dashboard_is_internally_consistent() {
    let d = dashboard();
    let panels = panels(&d);
    assert!(!panels.is_empty());

    // Unique panel ids, every panel has a title and at least one query.
    let mut ids = BTreeSet::new();
    for p in &panels {
        if let Some(id) = p.id {
            assert!(ids.insert(id), "duplicate panel id {id}");
        }
        assert!(!p.title.is_empty(), "untitled panel {:?}", p.id);
        // A row only groups the panels under it.
        assert!(
            !p.exprs.is_empty() || p.kind == "row",
            "panel {:?} has no queries",
            p.title
        );
    }

    // Every variable used is defined (or one of Grafana's built-ins).
    let defined = variable_names(&d);
    for p in &panels {
        let mut used = BTreeSet::new();
        for (_, e) in &p.exprs {
            used.extend(variable_refs(e));
        }
        used.extend(p.datasource_uids.iter().flat_map(|u| variable_refs(u)));
        for v in used {
            assert!(
                defined.contains(&v) || v.starts_with("__"),
                "panel {:?} uses ${v}, which the dashboard does not define ({defined:?})",
                p.title
            );
        }
    }

    // `job="..."` matchers name the job the shipped scrape config uses.
    let scrape_config = read(SCRAPE_CONFIG);
    let jobs: BTreeSet<String> = scrape_config
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .trim_start_matches("- ")
                .strip_prefix("job_name:")
        })
        .map(|j| j.trim().trim_matches('"').to_owned())
        .collect();
    assert!(!jobs.is_empty(), "no job_name in {SCRAPE_CONFIG}");
    for p in &panels {
        for (_, e) in &p.exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("job=\"") {
                rest = &rest[i + 5..];
                let job = &rest[..rest.find('"').expect("closing quote")];
                assert!(
                    jobs.contains(job),
                    "panel {:?} selects job=\"{job}\", but {SCRAPE_CONFIG} has jobs {jobs:?}",
                    p.title
                );
            }
        }
    }
}

/// Every dashboard expression is valid PromQL: wrapped as recording rules
/// (Grafana variables substituted) and checked by `promtool check rules`.
#[test]
fn dashboard_queries_are_valid_promql() {
    let promtool = Path::new(PROMTOOL);
    assert!(
        promtool.is_file(),
        "{PROMTOOL} not found: install Debian's `prometheus` package (.ci/run does this in CI)"
    );
    let d = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in panels(&d) {
        for (ref_id, e) in &p.exprs {
            let promql = e
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "5m")
                .replace("${frontend}", ".*")
                .replace("$frontend", ".*");
            let name = format!("dashboard:panel_{}_{ref_id}", p.id.unwrap_or(0));
            rules += &format!(
                "      - record: {name}\n        expr: {}\n",
                serde_json::to_string(&promql).expect("json string")
            );
            n += 1;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    fs::write(&file, &rules).expect("write rules");
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "dashboard PromQL does not parse:\n{text}\n{rules}"
    );
    assert!(
        text.contains(&format!("SUCCESS: {n} rules found")),
        "{text}"
    );
}

#[test]
fn metric_name_extraction() {
    let e = r#"histogram_quantile(0.99, sum by (backend, le) (rate(lb_backend_connect_duration_seconds_bucket{frontend=~"$frontend",job="lb-proxy"}[5m]))) / process_open_fds"#;
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        [
            "lb_backend_connect_duration_seconds_bucket",
            "process_open_fds"
        ]
    );
    assert_eq!(
        variable_refs("a{x=~\"$frontend\"} ${datasource} $__rate_interval"),
        ["__rate_interval", "datasource", "frontend"]
            .map(str::to_owned)
            .into()
    );
}
