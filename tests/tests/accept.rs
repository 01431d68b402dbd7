//! Accept modes: one SO_REUSEPORT listener per worker or one listener shared
//! by every worker (`auto`, the default, shares one between two workers).
//! Both serve every client; the kernel's listening-socket table shows which
//! one is in place.

use std::collections::HashSet;
use std::time::Duration;

use lb_tests::{connect, one_frontend_config, read_line, wait_until, Backend, Proxy};

/// Distinct listening sockets (by inode) on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A = LISTEN), inode
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| i.to_string()))
                .flatten()
        })
        .collect::<HashSet<_>>()
        .len()
}

/// `workers` workers; `accept` as given, or no `accept` line for "".
fn config_with(workers: usize, accept: &str, backend: &Backend) -> String {
    let line = match accept {
        "" => String::new(),
        mode => format!("accept = \"{mode}\"\n"),
    };
    one_frontend_config(
        "web",
        &format!("{line}[frontends.health]\nkind = \"none\""),
        &[backend.toml()],
    )
    .replace("workers = 2", &format!("workers = {workers}"))
}

fn config(accept: &str, backend: &Backend) -> String {
    config_with(2, accept, backend)
}

fn serves_everyone(accept: &str, expected_listeners: usize) -> (Proxy, Backend) {
    serves_everyone_with(2, accept, expected_listeners)
}

fn serves_everyone_with(
    workers: usize,
    accept: &str,
    expected_listeners: usize,
) -> (Proxy, Backend) {
    let backend = Backend::echo("a");
    let proxy = Proxy::run(&config_with(workers, accept, &backend));
    let fe = proxy.frontend("web");
    assert_eq!(
        listening_sockets(fe.port()),
        expected_listeners,
        "accept = {accept:?} with {workers} workers"
    );
    // Enough connections that each worker takes some, held open together.
    let mut clients = Vec::new();
    for i in 0..64 {
        let mut c = connect(fe).unwrap_or_else(|e| panic!("client {i}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(read_line(&mut c).expect("served"), "a", "client {i}");
        clients.push(c);
    }
    assert_eq!(
        proxy.metric("lb_frontend_active_connections", &[("frontend", "web")]),
        Some(64.0)
    );
    (proxy, backend)
}

#[test]
fn reuseport_gives_each_worker_its_own_listener() {
    serves_everyone("reuseport", 2);
}

#[test]
fn shared_accept_uses_one_listener_for_all_workers() {
    serves_everyone("shared", 1);
}

/// Left to `auto`, two workers share one listener; three (past
/// `SHARED_ACCEPT_MAX_WORKERS`) get one each, as does a lone worker.
#[test]
fn the_default_shares_a_listener_between_two_workers_only() {
    serves_everyone("", 1);
    serves_everyone_with(2, "auto", 1);
    serves_everyone_with(3, "", 3);
    serves_everyone_with(1, "", 1);
}

/// Switching modes needs new sockets: a reload that asks for it is refused,
/// and the listeners in place keep serving.
#[test]
fn a_reload_cannot_switch_the_accept_mode() {
    let (proxy, backend) = serves_everyone("reuseport", 2);
    proxy.write_config(&config("shared", &backend));
    proxy.signal(libc::SIGHUP);
    proxy.wait_metric(
        "lb_config_reloads_total",
        &[("result", "failure")],
        Duration::from_secs(10),
        |v| v >= 1.0,
    );
    let refused = wait_until("the refusal in the log", Duration::from_secs(10), || {
        proxy
            .stderr()
            .lines()
            .find(|l| l.contains("reload refused"))
            .map(str::to_owned)
    });
    assert!(refused.contains("Shared"), "{refused}");
    let fe = proxy.frontend("web");
    assert_eq!(listening_sockets(fe.port()), 2);
    let mut c = connect(fe).expect("connect after the refused reload");
    assert_eq!(read_line(&mut c).expect("served"), "a");
}
