//! `lb-bench compare --quick` end to end on a tiny budget, with no comparison
//! peer: HAProxy, nginx, hey, wrk and iperf3 are pointed at paths that do not
//! exist, so the run uses its built-in backends and generator and reports the
//! peers as missing.

mod common;

use std::time::Duration;

use common::{lb_proxy, run_lb_bench, text};

#[test]
fn compare_quick_runs_end_to_end_and_reports_missing_peers() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out_path = out_dir.path().join("out");
    let lb = lb_proxy();
    let out = run_lb_bench(
        &[
            "compare",
            "--quick",
            "--quiet",
            "--out",
            out_path.to_str().unwrap(),
            "--lb-proxy",
            lb.to_str().unwrap(),
            "--haproxy",
            "/nonexistent/haproxy",
            "--nginx",
            "/nonexistent/nginx",
            "--hey",
            "/nonexistent/hey",
            "--wrk",
            "/nonexistent/wrk",
            "--iperf3",
            "/nonexistent/iperf3",
            "--duration",
            "200ms",
            "--bulk-duration",
            "200ms",
            "--idle-connections",
            "50",
        ],
        Duration::from_secs(60),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "compare failed:\n{stdout}\n{stderr}");

    let md = std::fs::read_to_string(out_path.join("compare.md")).expect("compare.md was written");
    let header = md
        .lines()
        .find(|l| l.starts_with("| metric |"))
        .unwrap_or_else(|| panic!("no table header in:\n{md}"));
    for fe in [
        "direct",
        "lb-proxy (tokio)",
        "lb-proxy (io_uring)",
        "lb-proxy (userspace)",
        "lb-proxy (splice)",
        "lb-proxy (sockmap)",
        "haproxy",
        "nginx stream",
    ] {
        assert!(
            header.contains(&format!(" {fe} |")),
            "{fe} is a column, not dropped: {header}"
        );
    }
    // A column's index in a row, by its header.
    let columns: Vec<&str> = header
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let col = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no column `{name}`: {header}"))
    };
    let row = |metric: &str| -> Vec<String> {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {metric} |")))
            .unwrap_or_else(|| panic!("no `{metric}` row in:\n{md}"));
        line.split('|')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let ka = row("keep-alive req/s");
    assert_eq!(ka[col("tool")], "lb-bench", "{ka:?}");
    // The sockmap engine needs root, and the ring a kernel that permits
    // io_uring: elsewhere their columns say they failed.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert_eq!(
            ka[col("lb-proxy (sockmap)")],
            "failed",
            "sockmap without root: {ka:?}"
        );
    }
    let ring = ka[col("lb-proxy (io_uring)")] != "failed";
    let measured = [
        ("direct", true),
        ("lb-proxy (tokio)", true),
        ("lb-proxy (io_uring)", ring),
        ("lb-proxy (userspace)", true),
        ("lb-proxy (splice)", true),
        ("lb-proxy (sockmap)", root),
    ];
    for (fe, _) in measured.into_iter().filter(|&(_, runs)| runs) {
        let v: f64 = ka[col(fe)]
            .parse()
            .unwrap_or_else(|_| panic!("{fe}: {ka:?}"));
        assert!(v > 0.0, "{fe} measured nothing: {ka:?}");
    }
    assert_eq!(
        (
            ka[col("haproxy")].as_str(),
            ka[col("nginx stream")].as_str()
        ),
        ("missing", "missing"),
        "{ka:?}"
    );
    assert_eq!(ka[col("tokio / haproxy")], "haproxy missing", "{ka:?}");
    if ring {
        assert_eq!(ka[col("io_uring / nginx")], "nginx missing", "{ka:?}");
    }
    let bulk = row("bulk Gbit/s, 1 stream");
    assert_eq!(bulk[col("tool")], "built-in sink", "{bulk:?}");
    assert!(
        bulk[col("lb-proxy (tokio)")]
            .parse::<f64>()
            .is_ok_and(|g| g > 0.0),
        "{bulk:?}"
    );
    assert!(md.contains("- **haproxy**: missing"), "{md}");
    assert!(md.contains("- **nginx stream**: missing"), "{md}");
    assert!(
        md.contains("hey not installed"),
        "the generator check says why it is incomplete:\n{md}"
    );
    assert!(
        md.contains("RSS KiB per idle connection (50 conns)"),
        "{md}"
    );

    let svg = std::fs::read_to_string(out_path.join("compare.svg")).expect("compare.svg");
    assert!(svg.starts_with("<svg") && svg.contains("missing"), "{svg}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_path.join("compare.json")).expect("compare.json"),
    )
    .expect("compare.json is JSON");
    assert!(
        json["samples"].as_array().is_some_and(|s| !s.is_empty()),
        "{json}"
    );
}
