//! Frontend connection limits end to end.

use std::time::Duration;

use lb_tests::{connect, finish, read_line, web_proxy, Backend, NO_PROBES};

#[test]
fn a_connection_over_max_connections_is_closed_without_reaching_a_backend() {
    let a = Backend::echo("a");
    let proxy = web_proxy(&format!("max_connections = 2\n{NO_PROBES}"), &[&a]);
    let fe = proxy.frontend("web");
    let web = [("frontend", "web")];
    let web_a = [("frontend", "web"), ("backend", "a")];

    let mut c1 = connect(fe).expect("connect 1");
    assert_eq!(read_line(&mut c1).expect("greeting 1"), "a");
    let mut c2 = connect(fe).expect("connect 2");
    assert_eq!(read_line(&mut c2).expect("greeting 2"), "a");

    // The kernel completes the handshake; the balancer must then close it unproxied.
    // (The reset can come so fast that setting socket options after connect sees it.)
    match connect(fe).and_then(|mut c3| read_line(&mut c3)) {
        Ok(line) => panic!("the third connection reached backend {line:?}"),
        Err(e) => eprintln!("third connection closed: {e}"),
    }
    proxy.wait_metric(
        "lb_frontend_rejected_connections_total",
        &[("frontend", "web"), ("reason", "max_connections")],
        Duration::from_secs(5),
        |v| v == 1.0,
    );
    assert_eq!(
        proxy.metric("lb_backend_connections_total", &web_a),
        Some(2.0)
    );
    assert_eq!(
        proxy.metric("lb_frontend_connections_total", &web),
        Some(3.0)
    );

    // A slot frees when a connection ends; the next one is served.
    assert!(finish(&mut c1).expect("finish 1").is_empty());
    drop(c1);
    proxy.wait_metric(
        "lb_frontend_active_connections",
        &web,
        Duration::from_secs(5),
        |v| v == 1.0,
    );
    let mut c4 = connect(fe).expect("connect 4");
    assert_eq!(read_line(&mut c4).expect("greeting 4"), "a");
    assert_eq!(
        proxy.metric(
            "lb_frontend_rejected_connections_total",
            &[("frontend", "web"), ("reason", "max_connections")]
        ),
        Some(1.0)
    );
    assert!(finish(&mut c2).expect("finish 2").is_empty());
    assert!(finish(&mut c4).expect("finish 4").is_empty());
}
