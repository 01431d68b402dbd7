//! File-descriptor exhaustion: the balancer must not crash, spin or blame
//! backends when it runs out of fds, and must recover once fds are freed.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::{backend_bin, connect, one_frontend_config, read_line, wait_until, Backend, Proxy};

/// A low fd limit: the process's own fds (listeners, epoll, admin, log) plus a handful of connections.
const FD_LIMIT: u32 = 48;
const CLIENTS: usize = 60;

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn running_out_of_fds_sheds_clients_without_crashing_and_recovers() {
    let backend = Backend::echo(backend_bin!(), "a");
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        "[frontends.health]\nkind = \"none\"",
        &[backend.toml()],
    ));
    let pid = proxy.pid();
    let baseline = proc_fds(pid);
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={FD_LIMIT}:{FD_LIMIT}"),
        ])
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(status.success(), "prlimit failed");
    let fe = proxy.frontend("web");

    // Open more clients than the balancer has fds for; each proxied one costs it two.
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for _ in 0..CLIENTS {
        let Ok(mut c) = connect(fe) else { continue };
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        match read_line(&mut c) {
            Ok(line) => {
                assert_eq!(line, "a");
                served.push(c);
            }
            // Reset (shed) or still queued in the backlog while accept backs off.
            Err(_) => waiting.push(c),
        }
    }
    assert!(!served.is_empty(), "some clients must be served");
    assert!(
        served.len() < CLIENTS,
        "the fd limit should have been reached"
    );
    assert!(proc_fds(pid) <= FD_LIMIT as usize);

    // While starved, the balancer must not spin: accept errors back off.
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_millis(500));
    let ticks_per_sec = (cpu_ticks(pid) - c0) as f64 / t0.elapsed().as_secs_f64();
    assert!(
        ticks_per_sec < 30.0,
        "busy-looping while out of fds: {ticks_per_sec:.0} ticks/s"
    );

    // It noticed, and said so: accept backed off or clients were shed.
    let shed = proxy
        .metric(
            "lb_frontend_rejected_connections_total",
            &[("frontend", "web"), ("reason", "local_resources")],
        )
        .unwrap_or(0.0);
    let stderr = proxy.stderr();
    assert!(
        shed > 0.0 || stderr.contains("accept failed, backing off"),
        "no sign of fd exhaustion handling; stderr:\n{stderr}"
    );
    eprintln!(
        "shed for local resources: {shed}; accept backoff logged: {}",
        stderr.contains("backing off")
    );

    // Served connections keep working while it is starved.
    for c in served.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"still here\n").expect("write");
        assert_eq!(read_line(c).expect("echo"), "still here");
    }
    // The backend was never blamed for the balancer's own shortage.
    assert_eq!(
        proxy.metric("lb_backend_up", &[("frontend", "web"), ("backend", "a")]),
        Some(1.0)
    );
    for reason in ["refused", "timeout", "other"] {
        assert_eq!(
            proxy.metric(
                "lb_backend_connect_errors_total",
                &[("frontend", "web"), ("backend", "a"), ("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }

    // Free the fds: the balancer recovers and serves new clients.
    drop(served);
    drop(waiting);
    wait_until(
        "the balancer to release its fds",
        Duration::from_secs(10),
        || (proc_fds(pid) <= baseline + 2).then_some(()),
    );
    let mut fresh: TcpStream =
        wait_until("a new client to be served", Duration::from_secs(10), || {
            let mut c = connect(fe).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            (read_line(&mut c).ok()? == "a").then_some(c)
        });
    fresh.write_all(b"recovered\n").expect("write");
    assert_eq!(read_line(&mut fresh).expect("echo"), "recovered");
}
