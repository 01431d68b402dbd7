//! SIGTERM drain end to end: listeners close at once, in-flight connections
//! finish, and the process exits when they are done or at `drain_timeout`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use lb_tests::{
    connect, connect_refused, finish, one_frontend_config, read_line, wait_until, Backend, Proxy,
};

fn config(drain_timeout: &str, a: &Backend) -> String {
    format!(
        "drain_timeout = \"{drain_timeout}\"\n{}",
        one_frontend_config("web", "[frontends.health]\nkind = \"none\"", &[a.toml()])
    )
}

#[test]
fn sigterm_refuses_new_connections_and_exits_when_in_flight_ones_finish() {
    let a = Backend::echo("a");
    let mut proxy = Proxy::run(&config("10s", &a));
    let fe = proxy.frontend("web");

    let mut in_flight = connect(fe).expect("connect");
    assert_eq!(read_line(&mut in_flight).expect("greeting"), "a");
    in_flight.write_all(b"one").expect("write");
    let mut buf = [0u8; 3];
    in_flight.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"one");

    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    wait_until(
        "the frontend to refuse new connections",
        Duration::from_secs(5),
        || connect_refused(fe).then_some(()),
    );
    assert!(
        connect_refused(fe),
        "a new connection got through while draining"
    );

    // The in-flight connection still works, and keeps the process alive.
    in_flight.write_all(b"two").expect("write while draining");
    in_flight.read_exact(&mut buf).expect("read while draining");
    assert_eq!(&buf, b"two");
    assert!(
        proxy.try_wait().is_none(),
        "exited with a connection in flight"
    );

    assert!(finish(&mut in_flight).expect("finish").is_empty());
    drop(in_flight);
    let status = proxy.wait_exit(Duration::from_secs(5));
    let took = term.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(9),
        "exited {took:?} after SIGTERM: it waited for the drain timeout"
    );
    assert!(proxy.stderr().contains("drained"), "{}", proxy.stderr());
}

#[test]
fn sigterm_exits_at_drain_timeout_when_a_connection_stays_open() {
    let a = Backend::echo("a");
    let mut proxy = Proxy::run(&config("1s", &a));
    let mut idle = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut idle).expect("greeting"), "a");

    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5));
    let took = term.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM with drain_timeout = 1s"
    );
    assert!(
        proxy.stderr().contains("drain timeout"),
        "{}",
        proxy.stderr()
    );

    // The connection the balancer held is gone with it.
    let mut buf = [0u8; 8];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF or reset after exit, got {other:?}"),
    }
}

/// A supervisor may stop the balancer as soon as its ready file appears; that
/// must still be a graceful drain (exit 0), not death by SIGTERM's default
/// action. The window is small, hence the repeats.
#[test]
fn sigterm_sent_the_moment_the_ready_file_appears_drains() {
    const ATTEMPTS: usize = 50;
    let a = Backend::echo("a");
    let config = config("5s", &a);
    for attempt in 1..=ATTEMPTS {
        let mut proxy = Proxy::run_eager(&config);
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "attempt {attempt}/{ATTEMPTS}: SIGTERM sent as soon as the ready file appeared: \
             lb-proxy ended with {status} instead of draining and exiting 0: the ready file \
             is written before the signal handlers are installed"
        );
    }
}
