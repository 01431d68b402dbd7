//! `lb-proxy check`: good files pass, bad ones fail naming file, line and field,
//! and every example config shipped in `config/` passes.

use std::path::{Path, PathBuf};

use lb_tests::run_check;

/// The well-formed config, shared with lb-proxy's config unit tests.
const GOOD: &str = include_str!("../../lb-proxy/tests/fixtures/good.toml");

/// Writes `base` with `from` replaced by `to` (which must occur once) and returns
/// the path and the 1-based line of the replacement.
fn write_variant(dir: &Path, base: &str, file: &str, from: &str, to: &str) -> (PathBuf, usize) {
    assert_eq!(base.matches(from).count(), 1, "`{from}` must occur once");
    let line = base[..base.find(from).expect("occurs")]
        .matches('\n')
        .count()
        + 1;
    let text = base.replacen(from, to, 1);
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write config");
    (path, line)
}

/// Runs check on a bad file and returns its error message.
fn check_fails(path: &Path) -> String {
    let (status, stdout, stderr) = run_check(path);
    assert!(
        !status.success(),
        "check accepted {}: {stdout}",
        path.display()
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}

/// Runs check on [`GOOD`] with `from` replaced by `to`; asserts it fails
/// naming the file and the line of the replacement, and returns its message.
fn check_fails_at_the_variant(file: &str, from: &str, to: &str) -> String {
    check_fails_at_the_variant_of(GOOD, file, from, to)
}

/// [`check_fails_at_the_variant`] of another config than [`GOOD`].
fn check_fails_at_the_variant_of(base: &str, file: &str, from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, line) = write_variant(dir.path(), base, file, from, to);
    let err = check_fails(&path);
    let at = format!("{}:{line}:", path.display());
    assert!(err.contains(&at), "`{at}` missing from: {err}");
    err
}

#[test]
fn check_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("good.toml");
    std::fs::write(&path, GOOD).expect("write");
    let (status, stdout, stderr) = run_check(&path);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("frontend `web` on tcp 127.0.0.1:8080: 2 backend(s)"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
}

/// The shipped UDP and QUIC examples pass, and check says each frontend's
/// protocol (and a QUIC frontend's QUIC-LB layout).
#[test]
fn check_prints_each_frontends_protocol() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for (file, want) in [
        ("udp.toml", "frontend `udp` on udp 127.0.0.1:8053: 3 backend(s)"),
        (
            "quic.toml",
            "frontend `quic` on quic 127.0.0.1:4433: 3 backend(s), QUIC-LB config 0 with 3-byte server IDs and 4-byte nonces",
        ),
    ] {
        let (status, stdout, stderr) = run_check(&dir.join(file));
        assert!(status.success(), "{file}: {stdout}{stderr}");
        assert!(stdout.contains(want), "{file}: `{want}` missing from {stdout}");
    }
}

#[test]
fn check_names_file_line_and_field_of_an_unknown_field() {
    let err = check_fails_at_the_variant("unknown.toml", "idle_timeout", "idle_timout");
    assert!(err.contains("idle_timout"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn check_names_file_line_and_field_of_a_bad_address() {
    let err = check_fails_at_the_variant("address.toml", "127.0.0.1:9002", "127.0.0.1:notaport");
    assert!(err.contains("address"), "{err}");
}

#[test]
fn check_names_file_line_and_field_of_a_duplicate_backend() {
    let err = check_fails_at_the_variant("dup.toml", "name = \"node-2\"", "name = \"node-1\"");
    assert!(err.contains("frontends[0].backends[1].name"), "{err}");
    assert!(err.contains("node-1"), "{err}");
}

/// Node names are Kubernetes node names, RFC 1123 subdomains: a `/` once
/// passed check and then lost the node's health-transition counts.
#[test]
fn check_names_file_line_and_field_of_a_bad_node_name() {
    const LAB: &str = include_str!("../../config/aks-lab.toml");
    for (bad, shown) in [("a/b", "'/'"), ("Node-3", "'N'"), ("node-3.", "node-3.")] {
        let err = check_fails_at_the_variant_of(
            LAB,
            "node.toml",
            "name = \"node-3\"",
            &format!("name = \"{bad}\""),
        );
        assert!(err.contains("field `frontends[0].nodes[2].name`"), "{err}");
        assert!(err.contains("RFC 1123"), "{err}");
        assert!(err.contains(shown), "{err}");
    }
}

#[test]
fn every_example_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    examples.sort();
    assert!(
        !examples.is_empty(),
        "no example configs (*.toml) in {}",
        dir.display()
    );
    for path in &examples {
        let (status, stdout, stderr) = run_check(path);
        assert!(
            status.success(),
            "{} fails check: {stdout}{stderr}",
            path.display()
        );
    }
}
