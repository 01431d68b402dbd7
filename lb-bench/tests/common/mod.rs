//! Shared by lb-bench's integration tests: running the `lb-bench` binary with
//! a deadline, and finding `lb-proxy` next to the test executable.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `lb-bench` binary cargo built for these tests.
pub fn lb_bench() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-bench"))
}

/// `target/<profile>/lb-proxy`, next to this test's target directory.
pub fn lb_proxy() -> PathBuf {
    lb_bench::procs::lb_proxy_bin(None).unwrap_or_else(|e| {
        panic!("{e} (these tests run the real binary: cargo build -p lb-proxy first)")
    })
}

/// Runs `lb-bench ARGS`, killing it after `limit`; returns its output.
pub fn run_lb_bench(args: &[&str], limit: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(lb_bench())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("start lb-bench");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lb-bench {args:?} did not finish within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// stdout and stderr as text, for assertion messages.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
