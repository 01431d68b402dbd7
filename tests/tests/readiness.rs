//! Readiness, withdraw-before-drain and the config fingerprint, end to end
//! (issue 15's balancer side, which a routing daemon and the scale-out test
//! build on):
//! - `GET /ready` (and `lb_ready`) answers 503 while a frontend has no
//!   healthy backend and 200 once it has one; `?frontend=` asks about one;
//! - SIGTERM with `withdraw_delay`: `/ready` turns 503 at once, the listener
//!   keeps serving new connections for the delay, then refuses; a second
//!   SIGTERM cuts the delay short, a SIGINT exits at once;
//! - the fingerprint in `/backends` and `lb_config_fingerprint` agrees
//!   between instances of one config, differs for another backend set, and
//!   follows a reload that changes routing but not one that changes a timeout.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use lb_tests::{
    connect, connect_refused, finish, one_frontend_config, read_line, wait_until, Backend, Proxy,
    NO_PROBES,
};

/// How long the tests wait for a state a probe or a signal brings about.
const SETTLE: Duration = Duration::from_secs(10);

/// `/ready` (or `/ready?frontend=NAME`): status and body.
fn ready(proxy: &Proxy, frontend: Option<&str>) -> (u16, String) {
    match frontend {
        None => proxy.admin_get("/ready"),
        Some(name) => proxy.admin_get(&format!("/ready?frontend={name}")),
    }
}

fn lb_ready(proxy: &Proxy) -> f64 {
    proxy.metric("lb_ready", &[]).expect("lb_ready is exported")
}

/// A second `[[frontends]]` section `name`, after [`one_frontend_config`]'s.
fn another_frontend(name: &str, settings: &str, backend: &Backend) -> String {
    format!(
        "\n[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{settings}\n\n{}",
        backend.toml()
    )
}

/// TCP probes fast enough that a dead backend is down, and a live one up,
/// within a fraction of a second.
const FAST_PROBES: &str =
    "[frontends.health]\nkind = \"tcp\"\ninterval = \"50ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1";

#[test]
fn ready_is_503_until_every_frontend_has_a_healthy_backend() {
    let mut a = Backend::echo("a");
    let b = Backend::echo("b");
    let config = one_frontend_config("web", FAST_PROBES, &[a.toml()])
        + &another_frontend("api", FAST_PROBES, &b);
    a.kill();
    let proxy = Proxy::run(&config);

    let down = wait_until("/ready to see web's backend down", SETTLE, || {
        let (status, body) = ready(&proxy, None);
        (status == 503).then_some(body)
    });
    assert_eq!(down, "not ready: frontend web has no healthy backend\n");
    assert_eq!(lb_ready(&proxy), 0.0, "lb_ready agrees with /ready");
    assert_eq!(ready(&proxy, Some("web")).0, 503);
    assert_eq!(ready(&proxy, Some("api")), (200, "ready\n".to_owned()));
    let (status, body) = ready(&proxy, Some("nope"));
    assert_eq!(status, 404, "an unknown frontend: {body}");
    let fingerprint_down = fingerprint(&proxy);

    a.restart();
    wait_until("/ready to answer 200", SETTLE, || {
        (ready(&proxy, None) == (200, "ready\n".to_owned())).then_some(())
    });
    assert_eq!(lb_ready(&proxy), 1.0, "lb_ready agrees with /ready");
    assert_eq!(ready(&proxy, Some("web")).0, 200);
    assert_eq!(
        fingerprint(&proxy),
        fingerprint_down,
        "health is not part of the fingerprint"
    );
}

/// Connects, checks the backend's greeting, and echoes `msg` through.
fn echo_through(fe: std::net::SocketAddr, msg: &[u8]) -> std::net::TcpStream {
    let mut s = connect(fe).expect("connect");
    assert_eq!(read_line(&mut s).expect("greeting"), "a");
    s.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).expect("read the echo");
    assert_eq!(buf, msg);
    s
}

#[test]
fn sigterm_withdraws_then_stops_accepting_after_the_delay_then_drains() {
    const DELAY: Duration = Duration::from_secs(2);
    let a = Backend::echo("a");
    let config = format!(
        "withdraw_delay = \"2s\"\ndrain_timeout = \"10s\"\n{}",
        one_frontend_config("web", NO_PROBES, &[a.toml()])
    );
    let mut proxy = Proxy::run(&config);
    let fe = proxy.frontend("web");
    assert_eq!(ready(&proxy, None), (200, "ready\n".to_owned()));

    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    let body = wait_until("/ready to answer 503", DELAY, || {
        let (status, body) = ready(&proxy, None);
        (status == 503).then_some(body)
    });
    assert_eq!(body, "not ready: withdrawing (SIGTERM)\n");
    assert_eq!(lb_ready(&proxy), 0.0);

    // A new connection during the delay is served end to end.
    let mut during = echo_through(fe, b"during the withdrawal");
    assert!(
        term.elapsed() < DELAY,
        "the connection was made after the delay ({:?}): the test proves nothing",
        term.elapsed()
    );

    wait_until("the listener to refuse", DELAY + SETTLE, || {
        connect_refused(fe).then_some(())
    });
    let closed = term.elapsed();
    assert!(
        closed >= DELAY,
        "the listener closed {closed:?} after SIGTERM, before withdraw_delay = {DELAY:?}"
    );

    // The connection made during the delay is drained, not cut.
    during.write_all(b"while draining").expect("write");
    let mut buf = [0u8; 14];
    during.read_exact(&mut buf).expect("read while draining");
    assert_eq!(&buf, b"while draining");
    assert!(finish(&mut during).expect("finish").is_empty());
    drop(during);
    assert!(proxy.wait_exit(SETTLE).success());
    let log = proxy.stderr();
    assert!(
        log.contains("withdrawing: /ready answers 503 for 2s before draining"),
        "{log}"
    );
    assert!(log.contains("SIGTERM: draining"), "{log}");
}

#[test]
fn a_second_sigterm_ends_the_withdrawal_early() {
    let a = Backend::echo("a");
    let config = format!(
        "withdraw_delay = \"5m\"\ndrain_timeout = \"10s\"\n{}",
        one_frontend_config("web", NO_PROBES, &[a.toml()])
    );
    let mut proxy = Proxy::run(&config);
    let fe = proxy.frontend("web");
    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    wait_until("/ready to answer 503", SETTLE, || {
        (ready(&proxy, None).0 == 503).then_some(())
    });
    drop(echo_through(fe, b"still accepting"));
    proxy.signal(libc::SIGTERM);
    wait_until("the listener to refuse", SETTLE, || {
        connect_refused(fe).then_some(())
    });
    assert!(proxy.wait_exit(SETTLE).success());
    // The 5 min delay was cut short: well under it, within the waits above.
    let took = term.elapsed();
    assert!(took < 2 * SETTLE, "exit {took:?} after the first SIGTERM");
    assert!(
        proxy.stderr().contains("SIGTERM again"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn sigint_during_the_withdrawal_exits_at_once() {
    let a = Backend::echo("a");
    let config = format!(
        "withdraw_delay = \"5m\"\ndrain_timeout = \"5m\"\n{}",
        one_frontend_config("web", NO_PROBES, &[a.toml()])
    );
    let mut proxy = Proxy::run(&config);
    let mut open = echo_through(proxy.frontend("web"), b"held open");
    proxy.signal(libc::SIGTERM);
    wait_until("/ready to answer 503", SETTLE, || {
        (ready(&proxy, None).0 == 503).then_some(())
    });
    proxy.signal(libc::SIGINT);
    let status = proxy.wait_exit(SETTLE);
    assert_eq!(status.code(), Some(130), "SIGINT's exit status");
    // Neither the rest of the delay nor the drain waited for the open connection.
    let mut buf = [0u8; 8];
    assert!(matches!(open.read(&mut buf), Ok(0) | Err(_)));
}

/// The whole-config fingerprint from `/backends`, checked against the
/// metric and the documented shape.
fn fingerprint(proxy: &Proxy) -> String {
    let (status, body) = proxy.admin_get("/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/backends JSON");
    let all = v["fingerprint"].as_str().expect("a fingerprint").to_owned();
    assert_eq!(all.len(), 16, "{all}");
    assert!(
        all.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        "{all}"
    );
    let fe = &v["frontends"][0];
    assert_eq!(fe["hash_version"], 1);
    assert_eq!(fe["fingerprint"].as_str().map(str::len), Some(16), "{fe}");
    assert_eq!(
        proxy.metric("lb_config_fingerprint", &[("fingerprint", &all)]),
        Some(1.0),
        "the metric shows the same fingerprint"
    );
    all
}

/// The frontend's own fingerprint from `/backends`.
fn frontend_fingerprint(proxy: &Proxy) -> String {
    let (_, body) = proxy.admin_get("/backends");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/backends JSON");
    v["frontends"][0]["fingerprint"]
        .as_str()
        .expect("a frontend fingerprint")
        .to_owned()
}

#[test]
fn fingerprints_agree_for_one_config_and_differ_for_another() {
    let (a, b, c) = (Backend::echo("a"), Backend::echo("b"), Backend::echo("c"));
    let settings = format!("idle_timeout = \"30s\"\n{NO_PROBES}");
    let base = one_frontend_config("web", &settings, &[a.toml(), b.toml()]);
    let heavier = one_frontend_config(
        "web",
        &settings,
        &[a.toml(), format!("{}weight = 2\n", b.toml())],
    );
    let more = one_frontend_config("web", &settings, &[a.toml(), b.toml(), c.toml()]);

    let first = Proxy::run(&base);
    let second = Proxy::run(&base);
    let agreed = fingerprint(&first);
    assert_eq!(
        fingerprint(&second),
        agreed,
        "same config, same fingerprint"
    );
    assert_eq!(frontend_fingerprint(&second), frontend_fingerprint(&first));
    let weighted = fingerprint(&Proxy::run(&heavier));
    assert_ne!(weighted, agreed, "a backend's weight changed");
    assert_ne!(fingerprint(&Proxy::run(&more)), agreed, "one backend more");

    // A reload that changes only a timeout keeps it ...
    first.write_config(&base.replace("idle_timeout = \"30s\"", "idle_timeout = \"31s\""));
    first.sighup_until("success", 1.0, SETTLE);
    assert_eq!(fingerprint(&first), agreed, "a timeout does not route");
    // ... and one that changes a backend's weight changes it, to what an
    // instance started with that config shows; the old series is gone.
    first.write_config(&heavier);
    first.sighup_until("success", 2.0, SETTLE);
    assert_eq!(fingerprint(&first), weighted);
    assert_eq!(
        first.metric("lb_config_fingerprint", &[("fingerprint", &agreed)]),
        None
    );
    assert_eq!(first.metric("lb_config_fingerprint", &[]), Some(1.0));
}
