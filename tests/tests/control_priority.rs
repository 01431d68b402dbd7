//! The control thread (admin endpoint, probes, reloads) runs at nice -5 when
//! the balancer may raise its priority, so scrapes and probes do not queue
//! behind a saturated data plane; worker threads keep the default.

use lb_tests::{web_proxy, Backend, NO_PROBES};

/// The nice value of one thread, from /proc/PID/task/TID/stat (field 19).
fn nice(pid: u32, tid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    let after_name = stat.rsplit_once(')').expect("comm").1;
    after_name
        .split_whitespace()
        .nth(16)
        .expect("nice field")
        .parse()
        .expect("number")
}

fn thread_name(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn the_control_thread_outranks_the_workers_when_it_may() {
    let backend = Backend::echo("a");
    let proxy = web_proxy(NO_PROBES, &[&backend]);
    let pid = proxy.pid();
    // The control runtime runs on the main thread, whose id is the pid.
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0;
    assert_eq!(nice(pid, pid), if privileged { -5 } else { 0 });
    let workers: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| thread_name(pid, *tid).starts_with("lb-worker"))
        .collect();
    assert_eq!(workers.len(), 2, "workers = 2 in the test config");
    for tid in workers {
        assert_eq!(nice(pid, tid), 0, "worker {tid} keeps the default priority");
    }
}
