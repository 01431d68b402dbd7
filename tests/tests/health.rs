//! Active health probes end to end: a killed backend is marked down within
//! interval × fall (+ probe timeout), new flows avoid it, and it comes back up
//! after a restart on the same port; the probes of many backends are spread
//! over the interval rather than sent in one burst.

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_tests::{backend_toml, header, http_get_close, one_frontend_config, Backend, Proxy};

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// Slack for scheduling on a busy 2-core machine and for the metric poll.
const MARGIN: Duration = Duration::from_secs(1);

/// The node that served one `GET /` through the balancer.
fn served_by(proxy: &Proxy) -> String {
    let (status, head, body) = http_get_close(proxy.frontend("web"), "/").expect("GET / via lb");
    assert_eq!(status, 200, "{head}\n\n{body}");
    let node = header(&head, "X-Node").expect("X-Node header").to_owned();
    assert_eq!(body, format!("{node}\n"));
    node
}

#[test]
fn a_killed_backend_goes_down_in_time_and_comes_back_after_restart() {
    let mut a = Backend::http("a");
    let b = Backend::http("b");
    let settings = format!(
        "[frontends.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {RISE}\nfall = {FALL}",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis()
    );
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        &settings,
        &[a.toml(), b.toml()],
    ));
    let a_labels = [("frontend", "web"), ("backend", "a")];

    // Both serve to begin with.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(served_by(&proxy));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both backends should serve at first: {seen:?}"
    );
    assert_eq!(proxy.metric("lb_backend_up", &a_labels), Some(1.0));

    // Down within interval × fall + probe timeout.
    let down_bound = INTERVAL * FALL + TIMEOUT + MARGIN;
    let killed = Instant::now();
    a.kill();
    proxy.wait_metric("lb_backend_up", &a_labels, down_bound, |v| v == 0.0);
    let took = killed.elapsed();
    eprintln!("marked down {took:?} after the kill");
    assert!(took <= down_bound, "marked down after {took:?}");

    // While it is down, new flows go to b and no connect to a is even tried.
    let connections = proxy.metric("lb_backend_connections_total", &a_labels);
    let errors = proxy.metric("lb_backend_connect_errors_total", &a_labels);
    for i in 0..30 {
        assert_eq!(served_by(&proxy), "b", "flow #{i} while a is down");
    }
    assert_eq!(
        proxy.metric("lb_backend_connections_total", &a_labels),
        connections
    );
    assert_eq!(
        proxy.metric("lb_backend_connect_errors_total", &a_labels),
        errors,
        "connects were tried to a backend that is down"
    );

    // Up again within interval × rise (+ timeout) after it comes back.
    let up_bound = INTERVAL * RISE + TIMEOUT + MARGIN;
    a.restart();
    let restarted = Instant::now();
    proxy.wait_metric("lb_backend_up", &a_labels, up_bound, |v| v == 1.0);
    let took = restarted.elapsed();
    eprintln!("marked up {took:?} after the restart");
    assert_eq!(
        proxy.metric("lb_backend_health_transitions_total", &a_labels),
        Some(2.0)
    );
    let mut back = false;
    for _ in 0..60 {
        if served_by(&proxy) == "a" {
            back = true;
            break;
        }
    }
    assert!(back, "no new flow reached a after it came back up");
}

#[test]
fn probes_of_many_backends_are_spread_over_the_interval() {
    const TARGETS: usize = 4;
    const PROBE_INTERVAL: Duration = Duration::from_millis(400);
    // Each target records when a probe connected; the listeners outlive the test
    // only as long as the test binary does.
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let mut backends = Vec::new();
    for target in 0..TARGETS {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind probe target");
        backends.push(backend_toml(
            &format!("t{target}"),
            listener.local_addr().expect("local addr"),
        ));
        let tx = tx.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let at = Instant::now();
                drop(stream);
                if tx.send((target, at)).is_err() {
                    break;
                }
            }
        });
    }
    let settings = format!(
        "[frontends.health]\nkind = \"tcp\"\ninterval = \"{}ms\"\ntimeout = \"200ms\"",
        PROBE_INTERVAL.as_millis()
    );
    let _proxy = Proxy::run(&one_frontend_config("web", &settings, &backends));

    // The second probe of every target, so that start-up costs don't count.
    let mut seen = [0u32; TARGETS];
    let mut second: [Option<Instant>; TARGETS] = [None; TARGETS];
    let deadline = Instant::now() + PROBE_INTERVAL * 4 + Duration::from_secs(5);
    while second.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (target, at) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("probes seen per target by the deadline: {seen:?}"));
        seen[target] += 1;
        if seen[target] == 2 {
            second[target] = Some(at);
        }
    }
    let times: Vec<Instant> = second.iter().flatten().copied().collect();
    let first = *times.iter().min().expect("targets");
    let last = *times.iter().max().expect("targets");
    let spread = last - first;
    eprintln!("second probes of {TARGETS} targets spread over {spread:?}");
    // Evenly spread they sit 100 ms apart (300 ms end to end); in lock-step all
    // four land within a few milliseconds of each other.
    assert!(
        spread >= PROBE_INTERVAL * 3 / 8,
        "probes of {TARGETS} targets all within {spread:?} of each other: sent in one burst"
    );
}
