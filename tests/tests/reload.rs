//! SIGHUP reload end to end: a good config swaps the backends without touching
//! established connections; a bad one, or one that would move a listener, is
//! refused with the same message `lb-proxy check` prints, and the old config
//! keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lb_tests::{
    connect, finish, http_get, one_frontend_config, read_line, run_check, wait_until, Backend,
    Metrics, Proxy,
};

const SETTINGS: &str = "[frontends.health]\nkind = \"none\"";
const WAIT: Duration = Duration::from_secs(5);

fn served_by(proxy: &Proxy) -> String {
    let mut c = connect(proxy.frontend("web")).expect("connect");
    let name = read_line(&mut c).expect("greeting");
    assert!(finish(&mut c).expect("finish").is_empty());
    name
}

fn round_trip(c: &mut TcpStream, msg: &str) {
    c.write_all(msg.as_bytes())
        .expect("write on the old connection");
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).expect("read on the old connection");
    assert_eq!(back, msg.as_bytes());
}

fn reloads(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric("lb_config_reloads_total", &[("result", result)])
        .unwrap_or(0.0)
}

#[test]
fn sighup_applies_a_good_config_and_refuses_bad_ones() {
    let a = Backend::echo("a");
    let b = Backend::echo("b");
    let proxy = Proxy::run(&one_frontend_config("web", SETTINGS, &[a.toml()]));

    let mut old = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut old).expect("greeting"), "a");
    round_trip(&mut old, "before the reload");

    // 1. A good config: the backend set changes from {a} to {b}.
    proxy.write_config(&one_frontend_config("web", SETTINGS, &[b.toml()]));
    proxy.sighup_until("success", 1.0, WAIT);
    assert_eq!(reloads(&proxy, "success"), 1.0);
    assert_eq!(reloads(&proxy, "failure"), 0.0);
    for i in 0..10 {
        assert_eq!(served_by(&proxy), "b", "new flow #{i} after the reload");
    }
    round_trip(&mut old, "after the reload, still on a");

    // 2. A bad config (unknown field): refused, and logged as `check` reports it.
    let bad = one_frontend_config(
        "web",
        &format!("idle_timout = \"30s\"\n{SETTINGS}"),
        &[a.toml()],
    );
    proxy.write_config(&bad);
    let (status, _, check_stderr) = run_check(proxy.config_path());
    assert!(!status.success(), "check accepted the bad config");
    let check_error = check_stderr
        .trim()
        .strip_prefix("error: ")
        .unwrap_or_else(|| panic!("check's message: {check_stderr}"))
        .to_owned();
    assert!(check_error.contains("idle_timout"), "{check_error}");
    proxy.sighup_until("failure", 1.0, WAIT);
    assert_eq!(reloads(&proxy, "failure"), 1.0);
    assert_eq!(reloads(&proxy, "success"), 1.0);
    wait_until("the reload error in the log", WAIT, || {
        proxy.stderr().contains(&check_error).then_some(())
    });
    for i in 0..5 {
        assert_eq!(served_by(&proxy), "b", "flow #{i} after the refused reload");
    }
    round_trip(&mut old, "after the bad reload");

    // 3. A valid config that moves the frontend's listener: refused, clearly.
    let moved = one_frontend_config("web", SETTINGS, &[a.toml()]).replace(
        "name = \"web\"\nlisten = \"127.0.0.1:0\"",
        "name = \"web\"\nlisten = \"127.0.0.2:0\"",
    );
    assert!(moved.contains("127.0.0.2:0"));
    proxy.write_config(&moved);
    let (status, stdout, stderr) = run_check(proxy.config_path());
    assert!(
        status.success(),
        "the moved config is valid: {stdout}{stderr}"
    );
    proxy.sighup_until("failure", 2.0, WAIT);
    assert_eq!(reloads(&proxy, "failure"), 2.0);
    assert_eq!(reloads(&proxy, "success"), 1.0);
    let line = wait_until("the refused listener change in the log", WAIT, || {
        proxy
            .stderr()
            .lines()
            .find(|l| l.contains("reload refused"))
            .map(str::to_owned)
    });
    for needle in ["frontend `web`", "listen", "127.0.0.2:0", "restart"] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    assert_eq!(served_by(&proxy), "b", "after the refused listener change");
    round_trip(&mut old, "at the end");
    assert!(finish(&mut old).expect("finish").is_empty());
}

/// The ready file says the balancer is up; a supervisor that reloads it right
/// then must not kill it. SIGHUP's default action is to terminate, so this
/// fails whenever the ready file is written before the SIGHUP handler is
/// installed. The window is small, hence the repeats.
#[test]
fn sighup_sent_the_moment_the_ready_file_appears_reloads() {
    const ATTEMPTS: usize = 50;
    let a = Backend::echo("a");
    let config = one_frontend_config("web", SETTINGS, &[a.toml()]);
    for attempt in 1..=ATTEMPTS {
        let mut proxy = Proxy::run_eager(&config);
        proxy.signal(libc::SIGHUP);
        let outcome = wait_until("the reload to be counted, or an exit", WAIT, || {
            if let Some(status) = proxy.try_wait() {
                return Some(Err(status));
            }
            let (code, _, body) = http_get(proxy.admin(), "/metrics").ok()?;
            let reloaded = Metrics(body).get("lb_config_reloads_total", &[("result", "success")]);
            (code == 200 && reloaded == Some(1.0)).then_some(Ok(()))
        });
        if let Err(status) = outcome {
            panic!(
                "attempt {attempt}/{ATTEMPTS}: SIGHUP sent as soon as the ready file appeared \
                 killed lb-proxy ({status}): the ready file is written before the signal \
                 handlers are installed"
            );
        }
    }
}
