//! File-descriptor exhaustion: the balancer must not crash, spin or blame
//! backends when it runs out of fds, and must recover once fds are freed.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::{connect, one_frontend_config, read_line, wait_until, Backend, Proxy};

/// Descriptors the balancer keeps back for its admin endpoint (config `fd_reserve`).
const FD_RESERVE: usize = 16;
/// Proxied connections the lowered fd limit leaves room for; each costs two fds.
const ROOM_FOR: usize = 6;
const CLIENTS: usize = 60;

fn proc_fds(pid: u32) -> usize {
    open_fd_numbers(pid).len()
}

fn open_fd_numbers(pid: u32) -> Vec<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(Vec::new(), |d| {
        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    })
}

/// The fds of `pid`'s TCP sockets listening on `port` (from /proc/PID/net/tcp).
fn listening_fds(pid: u32, port: u16) -> Vec<usize> {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            // State 0A is LISTEN; field 9 is the socket's inode.
            let inode = f.get(9)?;
            (local_port == port && f.get(3) == Some(&"0A")).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    open_fd_numbers(pid)
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|t| inodes.iter().any(|i| t.as_os_str() == i.as_str()))
        })
        .collect()
}

/// The fds registered with any of `pid`'s epoll instances (`tfd:` lines in
/// the fdinfo of each `anon_inode:[eventpoll]`).
fn epoll_watched_fds(pid: u32) -> Vec<usize> {
    open_fd_numbers(pid)
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]")
        })
        .flat_map(|fd| {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            info.lines()
                .filter_map(|l| {
                    l.strip_prefix("tfd:")?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .collect::<Vec<usize>>()
        })
        .collect()
}

/// Asserts that every listening socket of the frontend is already watched by
/// an event loop: the ready file promises that every worker accepts, with
/// every fd its runtime holds, so the fd baseline taken next is complete.
fn assert_workers_accepting(pid: u32, port: u16) {
    let listeners = listening_fds(pid, port);
    let watched = epoll_watched_fds(pid);
    assert!(
        !listeners.is_empty() && listeners.iter().all(|fd| watched.contains(fd)),
        "ready file written before every worker watched its listener: listeners {listeners:?}, watched {watched:?}"
    );
}

/// The io_uring engine's workers have their rings (the fds counted in the
/// baseline) by the time the ready file is written.
fn assert_rings_running(proxy: &Proxy) {
    assert_eq!(
        proxy.metric("lb_io_uring_available", &[]),
        Some(1.0),
        "{}",
        proxy.stderr()
    );
    let rings = open_fd_numbers(proxy.pid())
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{}/fd/{fd}", proxy.pid()))
                .is_ok_and(|t| t.as_os_str() == "anon_inode:[io_uring]")
        })
        .count();
    assert_eq!(rings, 2, "one ring per worker");
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
    out_of_fds("engine = \"tokio\"\ncopy = \"auto\"");
}

/// The io_uring engine sheds at the same line: its accepts, connect sockets
/// and backoff follow the same reserve.
#[test]
fn running_out_of_fds_on_the_io_uring_engine_sheds_and_recovers() {
    out_of_fds("engine = \"io-uring\"");
}

/// With splice, pipes are fds too: at the reserve line a connection falls
/// back to copying through userspace instead of failing.
#[test]
fn running_out_of_fds_with_splice_falls_back_to_userspace_copies() {
    out_of_fds("copy = \"splice\"");
}

/// A bulk transfer on a served connection while no fd is left: its reads
/// fill whole buffers, so a bulk run (`auto` on either engine) or `splice`
/// wants a pipe, which the reserve refuses; the bytes go through userspace
/// instead, whole and in order, and the connection does not fail.
fn assert_bulk_echoed_whole(c: &mut TcpStream) {
    const LEN: usize = 4 << 20;
    let sent: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = c.try_clone().expect("clone the client");
    let to_send = sent.clone();
    let writing = std::thread::spawn(move || writer.write_all(&to_send));
    let mut echoed = vec![0u8; LEN];
    c.read_exact(&mut echoed).expect("the bulk echo");
    writing.join().expect("writer").expect("the bulk write");
    assert!(echoed == sent, "bulk bytes came back changed");
}

/// The shedding and recovery of a frontend with `settings` (its copy or engine).
fn out_of_fds(settings: &str) {
    let backend = Backend::echo("a");
    let proxy = Proxy::run(&format!(
        "fd_reserve = {FD_RESERVE}\n{}",
        one_frontend_config(
            "web",
            &format!("{settings}\n[frontends.health]\nkind = \"none\""),
            &[backend.toml()],
        )
    ));
    let pid = proxy.pid();
    let fe = proxy.frontend("web");
    if settings.contains("io-uring") {
        assert_rings_running(&proxy);
    } else {
        assert_workers_accepting(pid, fe.port());
    }
    let at_start = open_fd_numbers(pid);
    let baseline = at_start.len();
    let fd_limit = baseline + FD_RESERVE + 2 * ROOM_FOR;
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={fd_limit}:{fd_limit}"),
        ])
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(status.success(), "prlimit failed");

    // Open more clients than the balancer has fds for; each proxied one costs it two.
    let mut served = Vec::new();
    let (mut refused, mut waiting) = (0, Vec::new());
    for _ in 0..CLIENTS {
        let attempt = connect(fe).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            let line = read_line(&mut c);
            Ok((c, line))
        });
        match attempt {
            Ok((c, Ok(line))) => {
                assert_eq!(line, "a");
                served.push(c);
            }
            // No answer: queued in a backlog nobody accepts from.
            Ok((c, Err(e))) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                waiting.push(c)
            }
            // Reset: shed (sometimes before connect() even returned).
            Ok((_, Err(_))) | Err(_) => refused += 1,
        }
    }
    assert!(!served.is_empty(), "some clients must be served");
    assert!(
        served.len() < CLIENTS,
        "the fd limit should have been reached"
    );
    // The data plane stopped at the reserve line: every fd numbered above it
    // was already open before the clients came (inherited ones can sit high).
    let line = fd_limit - FD_RESERVE;
    let taken_above: Vec<usize> = open_fd_numbers(pid)
        .into_iter()
        .filter(|fd| *fd >= line && !at_start.contains(fd))
        .collect();
    assert!(
        taken_above.is_empty(),
        "fds {taken_above:?} taken at or above the reserve line {line} (limit {fd_limit})"
    );

    // While starved, the balancer must not spin: accept errors back off.
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_millis(500));
    let ticks_per_sec = (cpu_ticks(pid) - c0) as f64 / t0.elapsed().as_secs_f64();
    assert!(
        ticks_per_sec < 30.0,
        "busy-looping while out of fds: {ticks_per_sec:.0} ticks/s"
    );

    // The admin endpoint still answers (from the reserve), and every client the
    // balancer could not serve was refused at once and counted, not left to
    // wait in the backlog while accept fails.
    let shed = proxy
        .metric(
            "lb_frontend_rejected_connections_total",
            &[("frontend", "web"), ("reason", "local_resources")],
        )
        .unwrap_or(0.0);
    assert_eq!(
        shed as usize,
        CLIENTS - served.len(),
        "served {}, shed {shed}",
        served.len()
    );
    assert_eq!(refused, CLIENTS - served.len());
    assert!(waiting.is_empty(), "{} clients left waiting", waiting.len());
    let stderr = proxy.stderr();
    assert!(
        !stderr.contains("accept failed"),
        "the reserve should keep accept from failing; stderr:\n{stderr}"
    );
    assert!(stderr.contains("local resources exhausted"), "{stderr}");

    // Served connections keep working while it is starved.
    for c in served.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"still here\n").expect("write");
        assert_eq!(read_line(c).expect("echo"), "still here");
    }
    assert_bulk_echoed_whole(&mut served[0]);
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
