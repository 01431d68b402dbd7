//! Reloads under load end to end (issue 12): while `hey -z 10s -c 50` runs
//! against three HTTP backends, SIGHUP applies in turn
//! 1. a weight change (the table follows it),
//! 2. a backend removed (an established flow to it carries on; new flows avoid it),
//! 3. a backend added (new flows reach it),
//! 4. a bad config (refused and counted; the previous config keeps serving),
//!
//! each once the previous reload has been counted and hey's traffic has moved
//! on since, and hey sees no error and only 200s. One round keeps hey's
//! connections alive (its default: about 50 flows that outlive every reload);
//! the other disables keep-alive, so new connections are routed through every
//! table the reloads publish.

use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lb_tests::{
    assert_hey_all_ok, connect, header, http_get_close, http_keepalive_get, one_frontend_config,
    spawn_hey, wait_until, Backend, HeyRun, Proxy, NO_PROBES,
};

/// hey's run: the issue's `-z 10s -c 50`.
const HEY_LOAD: [&str; 4] = ["-z", "10s", "-c", "50"];
/// Failure bound for hey's 10-second run to end.
const HEY_LIMIT: Duration = Duration::from_secs(60);
/// Failure bound for a reload to be counted, or a metric to follow it.
const WAIT: Duration = Duration::from_secs(5);
/// Response bytes hey must pull from the backend that is never touched
/// between two reloads (a few hundred responses), so the reloads are spread
/// over its run rather than landing together.
const TRAFFIC_BETWEEN_RELOADS: f64 = 32.0 * 1024.0;
/// New flows opened to look for a backend, or to check one is avoided.
const PROBE_FLOWS: usize = 60;
/// The weight given to backend `c` by the first reload.
const NEW_WEIGHT: u32 = 3;

/// The two rounds both run hey with 50 workers on two cores; run at once they
/// would measure each other's load, so they take turns.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frontend `web` (no probes) over `backends`, each with its weight.
fn config(backends: &[(&Backend, u32)]) -> String {
    let tables: Vec<String> = backends
        .iter()
        .map(|(b, weight)| format!("{}weight = {weight}\n", b.toml()))
        .collect();
    one_frontend_config("web", NO_PROBES, &tables)
}

/// The backend that served one request on a new connection.
fn served_by(frontend: SocketAddr, what: &str) -> String {
    let (status, head, body) =
        http_get_close(frontend, "/").unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(status, 200, "{what}: {head}");
    let node = header(&head, "X-Node")
        .unwrap_or_else(|| panic!("{what}: no X-Node in {head}"))
        .to_owned();
    assert_eq!(body, format!("{node}\n"), "{what}");
    node
}

/// One request on the kept-alive `flow`; returns the backend that answered.
fn request_on(flow: &mut TcpStream, what: &str) -> String {
    let (status, head, _) = http_keepalive_get(flow, "/").unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(status, 200, "{what}: {head}");
    header(&head, "X-Node")
        .unwrap_or_else(|| panic!("{what}: no X-Node in {head}"))
        .to_owned()
}

/// A kept-alive connection through `frontend` that landed on `backend`.
fn flow_to(frontend: SocketAddr, backend: &str) -> TcpStream {
    for i in 0..PROBE_FLOWS {
        let mut flow = connect(frontend).unwrap_or_else(|e| panic!("flow #{i}: {e}"));
        if request_on(&mut flow, &format!("flow #{i}")) == backend {
            return flow;
        }
    }
    panic!("none of {PROBE_FLOWS} new flows reached {backend}");
}

/// The balancer under test, with the counters the steps wait on.
struct Reloads<'a> {
    proxy: &'a Proxy,
    /// The backend no reload touches: its response bytes show hey's progress.
    steady: &'a str,
    succeeded: f64,
    failed: f64,
    /// When hey started, and when each step's reload was counted, for the report.
    hey_started: Instant,
    counted: Vec<(&'static str, Duration)>,
}

impl Reloads<'_> {
    fn count(&self, result: &str) -> f64 {
        self.proxy
            .metric("lb_config_reloads_total", &[("result", result)])
            .unwrap_or(0.0)
    }

    fn steady_bytes(&self) -> f64 {
        self.proxy
            .metric(
                "lb_backend_received_bytes_total",
                &[("frontend", "web"), ("backend", self.steady)],
            )
            .unwrap_or(0.0)
    }

    /// Writes `config`, sends SIGHUP while hey still runs, waits for the reload
    /// to be counted as `result` (and the other count to stay), then for hey's
    /// traffic to move on.
    fn reload(&mut self, hey: &mut HeyRun, step: &'static str, config: &str, result: &str) {
        assert!(
            hey.running(),
            "hey ended before step `{step}`: the reloads were not under load"
        );
        self.proxy.write_config(config);
        let (want_success, want_failure) = match result {
            "success" => (self.succeeded + 1.0, self.failed),
            _ => (self.succeeded, self.failed + 1.0),
        };
        let before = self.steady_bytes();
        self.proxy.signal(libc::SIGHUP);
        wait_until(
            &format!("step `{step}` to be counted as {result}"),
            WAIT,
            || {
                (self.count("success") == want_success && self.count("failure") == want_failure)
                    .then_some(())
            },
        );
        (self.succeeded, self.failed) = (want_success, want_failure);
        self.counted.push((step, self.hey_started.elapsed()));
        wait_until(&format!("hey's traffic after step `{step}`"), WAIT, || {
            (self.steady_bytes() >= before + TRAFFIC_BETWEEN_RELOADS).then_some(())
        });
    }
}

/// The scenario of the module doc, with hey run with `extra` flags.
fn reload_under_load(extra: &[&str]) {
    let _turn = serial();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(Backend::http);
    let proxy = Proxy::run(&config(&[(&a, 1), (&b, 1), (&c, 1)]));
    let frontend = proxy.frontend("web");
    let web = |backend: &'static str| [("frontend", "web"), ("backend", backend)];
    // The flow that must outlive b's removal, established before any reload.
    let mut pinned = flow_to(frontend, "b");

    let args: Vec<&str> = extra.iter().chain(&HEY_LOAD).copied().collect();
    let mut hey = spawn_hey(proxy.dir(), &args, &format!("http://{frontend}/"));
    let mut reloads = Reloads {
        proxy: &proxy,
        steady: "a",
        succeeded: 0.0,
        failed: 0.0,
        hey_started: Instant::now(),
        counted: Vec::new(),
    };
    wait_until("hey's traffic to start", WAIT, || {
        (reloads.steady_bytes() >= TRAFFIC_BETWEEN_RELOADS).then_some(())
    });

    // 1. A weight change: c's share of the table follows its weight.
    let new_weight = config(&[(&a, 1), (&b, 1), (&c, NEW_WEIGHT)]);
    reloads.reload(&mut hey, "weight", &new_weight, "success");
    assert_eq!(
        proxy.metric("lb_backend_weight", &web("c")),
        Some(f64::from(NEW_WEIGHT))
    );
    let slots = |name| {
        proxy
            .metric("lb_backend_table_slots", &web(name))
            .unwrap_or(0.0)
    };
    assert!(
        slots("c") > 2.0 * slots("a"),
        "c (weight {NEW_WEIGHT}) has {} slots, a (weight 1) {}",
        slots("c"),
        slots("a")
    );

    // 2. b removed: its established flow carries on; new flows avoid it.
    let without_b = config(&[(&a, 1), (&c, NEW_WEIGHT)]);
    reloads.reload(&mut hey, "remove b", &without_b, "success");
    assert_eq!(
        request_on(&mut pinned, "the flow to b, after b's removal"),
        "b"
    );
    for i in 0..PROBE_FLOWS {
        let node = served_by(frontend, &format!("new flow #{i} after b's removal"));
        assert_ne!(node, "b", "new flow #{i} reached the removed backend");
    }

    // 3. d added: new flows reach it.
    let with_d = config(&[(&a, 1), (&c, NEW_WEIGHT), (&d, 1)]);
    reloads.reload(&mut hey, "add d", &with_d, "success");
    let before = proxy
        .metric("lb_backend_connections_total", &web("d"))
        .unwrap_or(0.0);
    let reached = (0..PROBE_FLOWS)
        .position(|i| served_by(frontend, &format!("new flow #{i} after d's addition")) == "d");
    assert!(
        reached.is_some(),
        "none of {PROBE_FLOWS} new flows reached d"
    );
    let after = proxy
        .metric("lb_backend_connections_total", &web("d"))
        .unwrap_or(0.0);
    assert!(after > before, "d's connections went {before} -> {after}");

    // 4. A bad config: refused and counted; the previous one keeps serving.
    let bad = one_frontend_config(
        "web",
        &format!("idle_timout = \"30s\"\n{NO_PROBES}"),
        &[a.toml()],
    );
    reloads.reload(&mut hey, "bad config", &bad, "failure");
    let served: Vec<String> = (0..PROBE_FLOWS)
        .map(|i| served_by(frontend, &format!("new flow #{i} after the bad config")))
        .collect();
    assert!(
        served.iter().any(|n| n == "d") && !served.iter().any(|n| n == "b"),
        "after the refused reload new flows should still see a, c and d, not b: {served:?}"
    );
    assert!(
        hey.running(),
        "hey ended during the last step: the reloads were not under load"
    );

    let out = hey.wait(HEY_LIMIT);
    let responses = assert_hey_all_ok(&out);
    assert_eq!(request_on(&mut pinned, "the flow to b, at the end"), "b");
    eprintln!(
        "hey {args:?}: {responses} responses, all 200, across 3 applied reloads and 1 refused \
         (counted at {:?} after hey started); the flow to the removed b carried on",
        reloads.counted
    );
}

#[test]
fn reload_under_load_drops_nothing() {
    reload_under_load(&[]);
}

#[test]
fn reload_under_load_with_new_connections_drops_nothing() {
    reload_under_load(&["-disable-keepalive"]);
}
