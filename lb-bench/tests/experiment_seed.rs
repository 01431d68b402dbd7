//! `lb-bench experiment seed` passes against `lb-proxy demo`: started by the
//! command itself, and started by the test and given with --proxy/--admin.

mod common;

use std::time::Duration;

use common::{lb_proxy, run_lb_bench, text};
use lb_bench::lbproxy::LbProxy;

fn assert_all_steps_pass(args: &[&str]) -> String {
    let out = run_lb_bench(args, Duration::from_secs(45));
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "the experiment failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.matches("  PASS  ").count(), 4, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.contains("seed experiment: 4 of 4 steps passed"),
        "{stdout}"
    );
    // The capture-style table: source → destination, proto, node, and what the pod saw.
    assert!(stdout.contains("Source seen by the pod"), "{stdout}");
    assert!(stdout.contains(" → "), "{stdout}");
    stdout
}

#[test]
fn seed_passes_against_a_demo_it_starts() {
    let lb = lb_proxy();
    let stdout = assert_all_steps_pass(&["experiment", "seed", "--lb-proxy", lb.to_str().unwrap()]);
    assert!(
        stdout.contains("lb-proxy demo started by lb-bench"),
        "{stdout}"
    );
}

#[test]
fn seed_passes_against_a_running_demo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy =
        LbProxy::demo(&lb_proxy(), dir.path(), "lb-proxy", "Default").expect("start the demo");
    let frontend = proxy.frontend(None).expect("frontend").to_string();
    let admin = proxy.admin.expect("admin").to_string();
    let stdout = assert_all_steps_pass(&[
        "experiment",
        "seed",
        "--proxy",
        &frontend,
        "--admin",
        &admin,
        "--sources",
        "127.0.0.60-127.0.0.79",
    ]);
    assert!(
        stdout.contains(&format!("balancer: http://{frontend}/")),
        "{stdout}"
    );
}

#[test]
fn seed_fails_with_a_nonzero_exit_when_lb_proxy_is_missing() {
    let out = run_lb_bench(
        &["experiment", "seed", "--lb-proxy", "/nonexistent/lb-proxy"],
        Duration::from_secs(20),
    );
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("/nonexistent/lb-proxy"), "{stderr}");
}
