//! The metrics as Prometheus sees them: a real Prometheus server scraping the
//! balancer with the shipped scrape config and alert rules, `promtool` linting
//! a live scrape and the shipped files, every required metric present with
//! bounded-cardinality labels, and byte counters exact to the byte.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{
    finish, http_get, one_frontend_config, read_line, wait_until, Backend, BoundClient, Proxy,
    TempDir,
};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
/// The target address in the shipped scrape config (the default admin address).
const SHIPPED_TARGET: &str = "127.0.0.1:9180";
/// Prometheus start-up (TSDB, rules) on a busy 2-core machine.
const PROM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A few scrape and evaluation intervals of 1 s.
const SCRAPE_WAIT: Duration = Duration::from_secs(20);

/// The workspace root (this package lives in `<root>/tests`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the workspace")
        .to_path_buf()
}

/// `path` if it is an executable file, else a panic that says how to get it.
fn require_tool(path: &str) -> &Path {
    let p = Path::new(path);
    if !p.is_file() {
        panic!(
            "{path} not found: install Debian's `prometheus` package \
             (apt-get install prometheus; .ci/run does this in CI)"
        );
    }
    p
}

/// Three echo backends `a`, `b`, `c` behind frontend `web` (Default mode, TCP probes).
fn three_backends() -> Vec<Backend> {
    ["a", "b", "c"].iter().map(|n| Backend::echo(n)).collect()
}

fn proxy_for(backends: &[Backend]) -> Proxy {
    let tables: Vec<String> = backends.iter().map(Backend::toml).collect();
    Proxy::run(&one_frontend_config(
        "web",
        "distribution = \"Default\"\n[frontends.health]\nkind = \"tcp\"\ninterval = \"1s\"",
        &tables,
    ))
}

/// One flow through the balancer from `ip`: reads the backend's name line,
/// sends `payload`, reads the echo, closes. Returns the backend's name.
fn one_flow(frontend: SocketAddr, ip: Ipv4Addr, payload: &[u8]) -> String {
    let mut c = BoundClient::new(ip)
        .and_then(|b| b.connect(frontend))
        .unwrap_or_else(|e| panic!("connect from {ip} to {frontend}: {e}"));
    let name = read_line(&mut c).expect("the echo backend's name line");
    c.write_all(payload).expect("write payload");
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, payload, "echo from {name}");
    assert!(finish(&mut c).expect("finish").is_empty());
    name
}

/// A client address spread over 127.0.1.1 ..= 127.0.1.200.
fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, 1 + (i % 200) as u8)
}

// ---------------------------------------------------------------------------
// The exposition format.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses `a="x",b="y"` with `\\`, `\"` and `\n` escapes.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label {key} in {text:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(e) => value.push(e),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_owned(), value));
    }
}

fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = match line.rfind('}') {
                Some(end) => (&line[..=end], line[end + 1..].trim()),
                None => line.split_once(' ').expect("`name value`"),
            };
            let value = value.split_whitespace().next().unwrap_or("");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            Sample {
                name: name.to_owned(),
                labels,
                value: value
                    .parse()
                    .unwrap_or_else(|e| panic!("value of {line:?}: {e}")),
            }
        })
        .collect()
}

/// `# TYPE name kind` lines.
fn parse_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

fn label<'a>(s: &'a Sample, key: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------
// A Prometheus server.

/// A `prometheus` child process in its own temporary directory, killed on drop.
struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus on the shipped scrape config, pointed at `target`,
    /// with 1 s scrape and evaluation intervals, and waits for `/-/ready`.
    fn start(target: SocketAddr) -> PrometheusServer {
        let bin = require_tool(PROMETHEUS);
        let dir = tempfile::tempdir().expect("tempdir");
        let shipped = fs::read_to_string(root().join("config/prometheus/prometheus.yml"))
            .expect("read config/prometheus/prometheus.yml");
        let config = rewrite_scrape_config(&shipped, target);
        fs::write(dir.path().join("prometheus.yml"), &config).expect("write prometheus.yml");
        fs::copy(
            root().join("config/prometheus/alerts.yml"),
            dir.path().join("alerts.yml"),
        )
        .expect("copy alerts.yml");
        // The port is found free and then handed over, so another process could
        // take it in between: try again on an early exit.
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let data = dir.path().join(format!("data-{port}"));
            let log = dir.path().join(format!("prometheus-{port}.log"));
            let mut child = Command::new(bin)
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log).expect("log"))
                .stderr(
                    fs::File::create(dir.path().join(format!("stderr-{port}.log"))).expect("log"),
                )
                .spawn()
                .expect("spawn prometheus");
            let deadline = Instant::now() + PROM_READY_TIMEOUT;
            loop {
                if matches!(http_get(addr, "/-/ready"), Ok((200, _, _))) {
                    return PrometheusServer { child, addr, dir };
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    last_log = format!(
                        "prometheus exited ({status}):\n{}",
                        fs::read_to_string(dir.path().join(format!("stderr-{port}.log")))
                            .unwrap_or_default()
                    );
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "prometheus not ready within {PROM_READY_TIMEOUT:?}; its log:\n{}",
                        fs::read_to_string(dir.path().join(format!("stderr-{port}.log")))
                            .unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("prometheus did not start:\n{last_log}\nconfig:\n{config}");
    }

    /// `GET path` on the HTTP API, as JSON with `"status": "success"`.
    fn api(&self, path: &str) -> serde_json::Value {
        let (status, _, body) =
            http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {body}");
        v
    }

    fn log(&self) -> String {
        let mut out = String::new();
        for entry in fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                out += &fs::read_to_string(&p).unwrap_or_default();
            }
        }
        out
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

/// The shipped scrape config with only the target address and the intervals changed.
fn rewrite_scrape_config(shipped: &str, target: SocketAddr) -> String {
    assert!(
        shipped.contains(SHIPPED_TARGET),
        "the shipped prometheus.yml no longer scrapes {SHIPPED_TARGET}:\n{shipped}"
    );
    let mut intervals = BTreeSet::new();
    let lines: Vec<String> = shipped
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            for key in [
                "scrape_interval:",
                "evaluation_interval:",
                "scrape_timeout:",
            ] {
                if trimmed.starts_with(key) {
                    intervals.insert(key);
                    return format!("{indent}{key} 1s");
                }
            }
            line.replace(SHIPPED_TARGET, &target.to_string())
        })
        .collect();
    assert!(
        intervals.contains("scrape_interval:") && intervals.contains("evaluation_interval:"),
        "expected scrape_interval and evaluation_interval in the shipped config:\n{shipped}"
    );
    lines.join("\n") + "\n"
}

/// Alert names in alerts.yml (`- alert: NAME` lines).
fn alert_names(alerts: &str) -> BTreeSet<String> {
    alerts
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().trim_matches('"').to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// a. A real Prometheus scrapes exactly what the backends saw.

#[test]
fn prometheus_scrapes_per_backend_connection_counts_that_match_the_backends() {
    require_tool(PROMETHEUS);
    const FLOWS: usize = 300;
    let backends = three_backends();
    let proxy = proxy_for(&backends);
    let prom = PrometheusServer::start(proxy.admin());
    let started = Instant::now();

    // The target is up and the shipped rules are loaded and evaluate cleanly.
    let admin = proxy.admin().to_string();
    wait_until("the lb-proxy target to be up", SCRAPE_WAIT, || {
        let v = prom.api("/api/v1/targets");
        let targets = v["data"]["activeTargets"].as_array()?.clone();
        // Service discovery fills the list shortly after start-up.
        let t = targets.iter().find(|t| t["labels"]["job"] == "lb-proxy")?;
        assert!(
            t["scrapeUrl"].as_str().unwrap_or("").contains(&admin),
            "target scrapes {} instead of {admin}",
            t["scrapeUrl"]
        );
        assert_eq!(targets.len(), 1, "one target: {v}");
        (t["health"] == "up").then_some(())
    });

    let alerts = fs::read_to_string(root().join("config/prometheus/alerts.yml")).expect("alerts");
    let expected_rules = alert_names(&alerts);
    let known: BTreeSet<String> = [
        "LbBackendDown",
        "LbNoHealthyBackend",
        "LbBackendShareSkewed",
        "LbConnectErrorsRising",
        "LbQuicCidsNotRoutable",
        "LbUdpFlowsEvicted",
        "LbUdpDatagramsDropped",
    ]
    .map(str::to_owned)
    .into();
    assert!(
        expected_rules.is_superset(&known),
        "alerts.yml lost a rule: {expected_rules:?}"
    );
    let rules = wait_until(
        "every alert rule to be loaded and evaluated without error",
        SCRAPE_WAIT,
        || {
            let v = prom.api("/api/v1/rules");
            let mut rules = BTreeMap::new();
            for g in v["data"]["groups"].as_array()? {
                for r in g["rules"].as_array()? {
                    let name = r["name"].as_str()?.to_owned();
                    assert_eq!(r["type"], "alerting", "{r}");
                    assert_ne!(r["health"], "err", "rule {name} fails to evaluate: {r}");
                    rules.insert(name, r["health"].as_str()?.to_owned());
                }
            }
            (rules.len() == expected_rules.len() && rules.values().all(|h| h == "ok"))
                .then_some(rules)
        },
    );
    assert_eq!(
        rules.keys().cloned().collect::<BTreeSet<_>>(),
        expected_rules,
        "rules Prometheus loaded vs alerts.yml"
    );
    assert_eq!(rules.len(), known.len(), "{rules:?}");

    // Traffic, counted on the backend side (the name line says who served).
    let frontend = proxy.frontend("web");
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..FLOWS {
        let name = one_flow(frontend, client_ip(i), format!("flow {i}\n").as_bytes());
        *counted.entry(name).or_default() += 1;
    }
    assert_eq!(counted.values().sum::<u64>(), FLOWS as u64);
    assert_eq!(
        counted.len(),
        3,
        "{FLOWS} flows should reach all three backends: {counted:?}"
    );

    let query = "/api/v1/query?query=lb_backend_connections_total";
    let last = std::cell::RefCell::new(BTreeMap::new());
    let scraped = wait_until_or(
        "Prometheus to scrape the final connection counts",
        SCRAPE_WAIT,
        || {
            let v = prom.api(query);
            let mut got: BTreeMap<String, u64> = BTreeMap::new();
            for r in v["data"]["result"].as_array()? {
                assert_eq!(r["metric"]["frontend"], "web", "{r}");
                assert_eq!(r["metric"]["job"], "lb-proxy", "{r}");
                let backend = r["metric"]["backend"].as_str()?.to_owned();
                let value: f64 = r["value"][1].as_str()?.parse().ok()?;
                got.insert(backend, value as u64);
            }
            *last.borrow_mut() = got.clone();
            (got == counted).then_some(got)
        },
        || {
            format!(
                "last scraped {:?}, backends counted {counted:?}",
                last.borrow()
            )
        },
    );
    assert_eq!(scraped, counted);
    eprintln!(
        "prometheus saw {scraped:?} {:?} after start",
        started.elapsed()
    );

    // Healthy and balanced: no alert is pending or firing.
    let v = prom.api("/api/v1/alerts");
    assert_eq!(
        v["data"]["alerts"].as_array().map(Vec::len),
        Some(0),
        "alerts while every backend is healthy: {v}"
    );

    // A dead backend: LbBackendDown goes pending for exactly that backend.
    let mut backends = backends;
    backends[2].kill();
    let dead = backends[2].name.clone();
    let alert = wait_until_or(
        "LbBackendDown to go pending for the killed backend",
        SCRAPE_WAIT,
        || {
            let v = prom.api("/api/v1/alerts");
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "LbBackendDown")
                .cloned()
        },
        || format!("alerts: {}", prom.api("/api/v1/alerts")),
    );
    assert_eq!(alert["labels"]["backend"], dead.as_str(), "{alert}");
    assert_eq!(alert["labels"]["frontend"], "web", "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert!(
        alert["state"] == "pending" || alert["state"] == "firing",
        "{alert}"
    );
    let v = prom.api("/api/v1/alerts");
    let names: BTreeSet<&str> = v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["labels"]["alertname"].as_str())
        .collect();
    assert!(
        !names.contains("LbNoHealthyBackend"),
        "two of three backends are up: {v}"
    );
}

/// [`wait_until`] with a message built at the deadline.
fn wait_until_or<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    detail: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}: {}",
                detail()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// b. promtool lints a scrape taken under load.

#[test]
fn promtool_check_metrics_passes_on_a_scrape_taken_under_load() {
    let promtool = require_tool(PROMTOOL);
    let backends = three_backends();
    let proxy = proxy_for(&backends);
    let frontend = proxy.frontend("web");

    let stop = Arc::new(AtomicBool::new(false));
    let flows = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, flows) = (Arc::clone(&stop), Arc::clone(&flows));
        thread::spawn(move || {
            let started = Instant::now();
            // A few connections stay open, so the active gauges are not all 0.
            let mut held: Vec<TcpStream> = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Acquire)
                && started.elapsed() < Duration::from_secs(1)
                && i < 2000
            {
                let mut c = BoundClient::new(client_ip(i))
                    .and_then(|b| b.connect(frontend))
                    .expect("connect");
                read_line(&mut c).expect("name line");
                if held.len() < 6 {
                    held.push(c);
                } else {
                    assert!(finish(&mut c).expect("finish").is_empty());
                }
                i += 1;
                flows.store(i as u64, Ordering::Release);
            }
            held.len()
        })
    };
    wait_until("some load", Duration::from_secs(10), || {
        (flows.load(Ordering::Acquire) >= 20 || load.is_finished()).then_some(())
    });
    let scrape = proxy.metrics().0;
    stop.store(true, Ordering::Release);
    let held = load.join().expect("load thread");
    eprintln!(
        "scraped during load after {} flows ({held} held open)",
        flows.load(Ordering::Acquire)
    );
    let active = parse_samples(&scrape)
        .iter()
        .filter(|s| s.name == "lb_frontend_active_connections")
        .map(|s| s.value)
        .sum::<f64>();
    assert!(active >= 1.0, "the scrape was taken with connections open");

    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.is_empty() && stderr.is_empty(),
        "promtool check metrics: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

// ---------------------------------------------------------------------------
// c. promtool accepts the shipped rules and scrape config.

fn promtool(args: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(require_tool(PROMTOOL))
        .args(args)
        .arg(file)
        .current_dir(file.parent().expect("dir"))
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_accepts_the_shipped_rules_and_scrape_config() {
    let alerts = root().join("config/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules"], &alerts);
    assert!(ok, "promtool check rules {}:\n{out}", alerts.display());
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");

    let config = root().join("config/prometheus/prometheus.yml");
    let (ok, out) = promtool(&["check", "config"], &config);
    assert!(ok, "promtool check config {}:\n{out}", config.display());
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    // check config also loads the rule files it names.
    assert!(out.contains("alerts.yml"), "{out}");
}

// ---------------------------------------------------------------------------
// d. Every required metric is exported, labels stay bounded, bytes are exact.

const REQUIRED: &[&str] = &[
    "lb_backend_connections_total",
    "lb_backend_active_connections",
    "lb_backend_received_bytes_total",
    "lb_backend_sent_bytes_total",
    "lb_backend_connect_errors_total",
    "lb_backend_connect_duration_seconds",
    "lb_backend_up",
    "lb_backend_health_transitions_total",
    "lb_backend_weight",
    "lb_backend_table_slots",
    "lb_backend_idle_timeouts_total",
    "lb_frontend_connections_total",
    "lb_frontend_active_connections",
    "lb_frontend_rejected_connections_total",
    "lb_frontend_no_backend_total",
    "lb_frontend_spliced_bytes_total",
    "lb_config_reloads_total",
    "lb_table_generation",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
];

/// The only label names allowed (cardinality: nothing per client, IP or port).
/// `by` is `lb_quic_routed_total`'s routing step (cid, flow or hash);
/// `fingerprint` is `lb_config_fingerprint`'s, one series at a time (a reload
/// that changes it removes the old one: tests/tests/readiness.rs).
const ALLOWED_LABELS: &[&str] = &[
    "frontend",
    "backend",
    "reason",
    "result",
    "le",
    "by",
    "fingerprint",
];

#[test]
fn every_required_metric_is_exported_with_bounded_labels() {
    let backends = three_backends();
    let proxy = proxy_for(&backends);
    let frontend = proxy.frontend("web");
    for i in 0..30 {
        one_flow(frontend, client_ip(i), b"some traffic");
    }
    let text = proxy.metrics().0;
    let samples = parse_samples(&text);
    let types = parse_types(&text);
    let names: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();

    let mut missing = Vec::new();
    for &m in REQUIRED {
        if m == "lb_backend_connect_duration_seconds" {
            assert_eq!(
                types.get(m).map(String::as_str),
                Some("histogram"),
                "{m} is a histogram"
            );
            for suffix in ["_bucket", "_sum", "_count"] {
                if !names.contains(format!("{m}{suffix}").as_str()) {
                    missing.push(format!("{m}{suffix}"));
                }
            }
        } else if !names.contains(m) {
            missing.push(m.to_owned());
        }
    }
    // Labels the issue requires.
    let has_label = |metric: &str, key: &str| {
        samples
            .iter()
            .filter(|s| s.name == metric)
            .all(|s| label(s, key).is_some())
    };
    assert!(has_label("lb_backend_connect_errors_total", "reason"));
    assert!(has_label(
        "lb_frontend_rejected_connections_total",
        "reason"
    ));
    assert!(has_label("lb_config_reloads_total", "result"));
    for b in ["a", "b", "c"] {
        for m in [
            "lb_backend_connections_total",
            "lb_backend_up",
            "lb_backend_weight",
        ] {
            assert!(
                samples.iter().any(|s| s.name == m
                    && label(s, "backend") == Some(b)
                    && label(s, "frontend") == Some("web")),
                "{m}{{frontend=\"web\",backend=\"{b}\"}} missing"
            );
        }
    }

    // Cardinality: no label carries anything per client.
    let mut bad = BTreeSet::new();
    for s in &samples {
        for (k, _) in &s.labels {
            if !ALLOWED_LABELS.contains(&k.as_str()) {
                bad.insert(format!("{}{{{k}}}", s.name));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "labels outside {ALLOWED_LABELS:?} (unbounded cardinality): {bad:?}"
    );
    // And no label value is a client address.
    for s in &samples {
        for (k, v) in &s.labels {
            assert!(
                !v.starts_with("127."),
                "{}{{{k}=\"{v}\"}} carries an address",
                s.name
            );
        }
    }

    // Last, so that the label checks above run whatever is missing.
    assert!(
        missing.is_empty(),
        "metrics missing from /metrics after traffic: {missing:?}\n\n{text}"
    );
}

#[test]
fn byte_counters_count_every_byte_exactly_once() {
    const N: usize = 300_000;
    let backends = three_backends();
    let proxy = proxy_for(&backends);
    let before = proxy.metrics();

    let mut c = BoundClient::new(Ipv4Addr::new(127, 0, 2, 1))
        .and_then(|b| b.connect(proxy.frontend("web")))
        .expect("connect");
    let name = read_line(&mut c).expect("name line");
    let mut w = c.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let data: Vec<u8> = (0..N).map(|i| (i % 253) as u8).collect();
        w.write_all(&data).expect("write");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut echoed = Vec::new();
    c.read_to_end(&mut echoed).expect("read the echo to EOF");
    writer.join().expect("writer");
    assert_eq!(echoed.len(), N, "echoed bytes");
    assert!(echoed
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 253) as u8));
    drop(c);

    let labels = [("frontend", "web"), ("backend", name.as_str())];
    let sent0 = before
        .get("lb_backend_sent_bytes_total", &labels)
        .unwrap_or(0.0);
    let recv0 = before
        .get("lb_backend_received_bytes_total", &labels)
        .unwrap_or(0.0);
    let wait = Duration::from_secs(5);
    let sent = proxy.wait_metric("lb_backend_sent_bytes_total", &labels, wait, |v| {
        v - sent0 >= N as f64
    });
    let received = proxy.wait_metric("lb_backend_received_bytes_total", &labels, wait, |v| {
        v - recv0 >= (N + name.len() + 1) as f64
    });
    // Connection closed and counted: the values must be exact, not just at least.
    wait_until("the connection to close", wait, || {
        (proxy.metric("lb_backend_active_connections", &labels) == Some(0.0)).then_some(())
    });
    assert_eq!(
        proxy.metric("lb_backend_sent_bytes_total", &labels),
        Some(sent)
    );
    assert_eq!(sent - sent0, N as f64, "bytes sent to backend {name}");
    assert_eq!(
        received - recv0,
        (N + name.len() + 1) as f64,
        "bytes received from backend {name} (echo + name line)"
    );
    // The other backends saw none of it.
    for other in backends.iter().filter(|b| b.name != name) {
        let l = [("frontend", "web"), ("backend", other.name.as_str())];
        assert_eq!(
            proxy.metric("lb_backend_sent_bytes_total", &l),
            Some(0.0),
            "{}",
            other.name
        );
    }
}
