//! SIGTERM to a running `lb-bench compare` stops the processes it started
//! (its backends and lb-proxy) before it exits, as `kill PID`, `timeout` or
//! a cancelled CI job would send it, and removes its scratch directory.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{lb_bench, lb_proxy};
use lb_bench::procs::{child_pids, send_signal};

/// Whether `pid` still runs (a zombie has stopped running: only its exit
/// status waits for whoever reaps it).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Kills what is still running when the test ends, so that a failing run
/// leaves no backend or proxy behind.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in self.0.iter().filter(|&&p| is_running(p)) {
            send_signal(p, libc::SIGKILL);
        }
    }
}

#[test]
fn sigterm_stops_the_backends_and_proxies_it_started() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let lb = lb_proxy();
    let missing = "/nonexistent/tool";
    let mut bench = Command::new(lb_bench())
        // Not --quiet: its progress names the scratch directory.
        .args(["compare", "--quick", "--out"])
        .arg(out_dir.path().join("out"))
        .arg("--lb-proxy")
        .arg(&lb)
        .args(["--haproxy", missing, "--nginx", missing, "--hey", missing])
        .args(["--wrk", missing, "--iperf3", missing])
        // Long enough that the signal lands mid-run, bounded all the same.
        .args(["--duration", "20s", "--bulk-duration", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb-bench compare");

    // Its backends start first, then every front end: wait for an lb-proxy.
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let children = child_pids(bench.id());
        if children.iter().any(|&c| cmdline(c).contains("lb-proxy")) {
            break children;
        }
        assert!(
            bench.try_wait().expect("try_wait").is_none(),
            "lb-bench exited before starting lb-proxy"
        );
        assert!(Instant::now() < deadline, "no lb-proxy child within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(started.len() >= 2, "backends and a proxy: {started:?}");
    let _leftovers = KillOnDrop(started.clone());

    send_signal(bench.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = bench.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = bench.kill();
            panic!("lb-bench did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(bench.stderr.take().expect("stderr")).unwrap_or_default();

    // SIGKILL has been sent to each before lb-bench exited; give the kernel
    // a bounded moment to finish them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.iter().any(|&p| is_running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<String> = started
        .iter()
        .filter(|&&p| is_running(p))
        .map(|&p| format!("{p}: {}", cmdline(p)))
        .collect();
    assert!(
        left.is_empty(),
        "still running after lb-bench's exit: {left:?}"
    );
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "exits as the signal would ({status:?}); stderr:\n{stderr}"
    );
    assert!(status.signal().is_none(), "it took the signal itself");
    assert!(
        stderr.contains("stopping the"),
        "says what it does: {stderr}"
    );
    let work = stderr
        .lines()
        .find_map(|l| l.split_once("starting backends in ").map(|(_, d)| d.trim()))
        .unwrap_or_else(|| panic!("no scratch directory named: {stderr}"));
    assert!(
        !std::path::Path::new(work).exists(),
        "the scratch directory {work} outlived lb-bench"
    );
}
