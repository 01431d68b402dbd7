//! `lb-bench load` against `lb-proxy demo --distribution SourceIP`, with
//! `--sources` over 50 client addresses: in SourceIP mode the balancer hashes
//! the source IP only, so each source is served by exactly one backend.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{lb_proxy, run_lb_bench, text};
use lb_bench::lbproxy::LbProxy;

#[test]
fn each_of_50_source_addresses_is_served_by_exactly_one_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy =
        LbProxy::demo(&lb_proxy(), dir.path(), "lb-proxy", "SourceIP").expect("start the demo");
    let url = format!(
        "http://{}/",
        proxy.frontend(None).expect("the demo frontend")
    );
    let admin = proxy.admin.expect("the demo's admin endpoint").to_string();
    let out = run_lb_bench(
        &[
            "load",
            "--json",
            "-n",
            "250",
            "-c",
            "5",
            "-t",
            "10",
            "--disable-keepalive",
            "--sources",
            "127.0.0.2-127.0.0.51",
            "--per-source",
            "--expect-from-admin",
            &admin,
            &url,
        ],
        Duration::from_secs(30),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "lb-bench failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{stdout}"));

    assert_eq!(report["responses"], 250, "{stdout}");
    assert_eq!(report["status"]["200"], 250, "{stdout}");
    assert_eq!(report["errors_total"], 0, "{stdout}");
    assert_eq!(report["connections"], 250, "one connection per request");

    let per_source = report["per_source"].as_object().expect("per_source");
    assert_eq!(
        per_source.len(),
        50,
        "every source address was used: {per_source:?}"
    );
    let mut used = BTreeSet::new();
    for (ip, backends) in per_source {
        let backends = backends.as_object().expect("backend counts");
        assert_eq!(
            backends.len(),
            1,
            "source {ip} was served by more than one backend: {backends:?}"
        );
        let (name, count) = backends.iter().next().unwrap();
        assert_eq!(count, 5, "{ip}: 250 requests round-robin over 50 sources");
        used.insert(name.clone());
    }
    assert!(
        used.len() > 1,
        "50 source addresses should land on more than one of the 3 backends: {used:?}"
    );
    // The expected shares came from the balancer's /backends.
    let dist = &report["distribution"];
    assert_eq!(dist["expected_from"], "given", "{dist}");
    assert_eq!(dist["backends"].as_array().map(Vec::len), Some(3), "{dist}");
}
