//! What `compare` reads from a running proxy rather than from the load: its
//! CPU time (utime + stime) around a measurement, and its anonymous RSS
//! before and after opening many idle connections through it. Also the
//! machine's busy CPU time (/proc/stat's aggregate `cpu` line) around a
//! measurement: every process and kernel thread, so work a proxy hands to the
//! kernel (sockmap's psock backlog runs in kworkers, charged to no proxy
//! process) is counted too.

use std::io::Write;
use std::time::Duration;

use super::options::{log, CompareOptions};
use super::peers::Running;
use super::results::{Sample, IDLE};
use crate::client;
use crate::error::Error;
use crate::net::{self, SourceRange};
use crate::procs;

/// The proxy's CPU seconds so far (nginx: master and workers); `None` for direct.
pub(crate) fn cpu(r: &Running) -> Option<f64> {
    let pid = r.pid?;
    if r.tree {
        procs::cpu_secs_tree(pid)
    } else {
        procs::cpu_secs(pid)
    }
}

fn rss(r: &Running) -> Option<u64> {
    let pid = r.pid?;
    if r.tree {
        procs::rss_anon_kib_tree(pid)
    } else {
        procs::rss_anon_kib(pid)
    }
}

/// The machine's busy CPU seconds so far, over all CPUs: /proc/stat's
/// aggregate `cpu` line; `None` where /proc/stat cannot be read.
pub(crate) fn machine_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_ticks(&stat).map(|t| t as f64 / procs::clk_tck())
}

/// Busy ticks of /proc/stat's aggregate `cpu` line: user + nice + system +
/// irq + softirq + steal. Idle and iowait are waiting, not work; guest time
/// is already inside user, so adding it would count it twice.
pub(crate) fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy = [0, 1, 2, 5, 6, 7].iter().map(|&i| f.get(i).copied());
    busy.sum()
}

/// CPU µs per unit of work between two [`cpu`] readings (none without both or without work).
pub(crate) fn cpu_us_per(before: Option<f64>, after: Option<f64>, count: u64) -> Option<f64> {
    before
        .zip(after)
        .filter(|_| count > 0)
        .map(|(b, a)| (a - b) * 1e6 / count as f64)
}

/// How many idle connections to open: as asked, but each takes two fds.
pub(crate) fn idle_count(opts: &CompareOptions, nofile: u64) -> usize {
    opts.idle_connections
        .min((nofile.saturating_sub(300) / 2) as usize)
        .max(1)
}

/// The memory figure of every proxy (direct has no process): KiB per idle connection.
pub(crate) fn idle_memory_all(
    opts: &CompareOptions,
    running: &[Running],
    idle: usize,
    quiet: bool,
    samples: &mut Vec<Sample>,
    problems: &mut Vec<String>,
) {
    let settle = if opts.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    for r in running.iter().filter(|r| r.pid.is_some()) {
        log(
            quiet,
            &format!(
                "compare: {} idle connections through {}",
                idle,
                r.frontend.label()
            ),
        );
        match idle_memory(r, idle, settle) {
            Ok(kib) => samples.push(Sample::figure(0, r.frontend, IDLE, "lb-bench", kib)),
            Err(e) => problems.push(format!("{}, idle connections: {e}", r.frontend.label())),
        }
    }
}

/// Opens `n` idle connections through `r` (one request each, so both legs are
/// established) and returns the proxy's RssAnon growth per connection in KiB.
fn idle_memory(r: &Running, n: usize, settle: Duration) -> std::result::Result<f64, String> {
    let timeout = Duration::from_secs(10);
    let sources: SourceRange = "127.0.6.1-127.0.6.250"
        .parse()
        .map_err(|e: Error| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", r.http);
    let exchange = |s: &mut std::net::TcpStream| -> std::io::Result<()> {
        s.write_all(request.as_bytes())?;
        client::read_response(s).map(drop)
    };
    // One warm-up connection, so lazily allocated per-thread state is not counted.
    let mut warm = net::connect_std_from(None, r.http, timeout).map_err(|e| e.to_string())?;
    exchange(&mut warm).map_err(|e| format!("warm-up: {e}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let before = rss(r).ok_or("no RssAnon")?;
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let s = net::connect_std_from(Some(sources.nth(i as u64)), r.http, timeout)
            .map_err(|e| format!("connection {i}: {e}"))?;
        socks.push(s);
    }
    for s in &mut socks {
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    }
    for (i, s) in socks.iter_mut().enumerate() {
        client::read_response(s).map_err(|e| format!("response {i}: {e}"))?;
    }
    std::thread::sleep(settle);
    let after = rss(r).ok_or("no RssAnon")?;
    drop(socks);
    Ok((after as f64 - before as f64) / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from this machine's /proc/stat (2 CPUs), `intr` trimmed.
    const STAT: &str = "cpu  5212262 1038340 634538 6139064 53942 0 73947 131906 0 0
cpu0 2601951 527038 318091 3061369 31269 0 36478 65290 0 0
cpu1 2610310 511302 316446 3077694 22673 0 37468 66616 0 0
intr 51326551 0 0 0 0 0 0 0 0 0 0
ctxt 2386219
";

    #[test]
    fn busy_ticks_add_user_nice_system_irq_softirq_steal_of_the_aggregate_line() {
        assert_eq!(
            busy_ticks(STAT),
            Some(5212262 + 1038340 + 634538 + 73947 + 131906)
        );
        // Per-CPU lines are not the aggregate, whatever their order.
        let cpu1_first = STAT.lines().skip(2).chain(STAT.lines().take(2));
        let reordered: String = cpu1_first.map(|l| format!("{l}\n")).collect();
        assert_eq!(busy_ticks(&reordered), busy_ticks(STAT));
        // A kernel that reports only user..steal still parses.
        assert_eq!(busy_ticks("cpu 1 2 3 100 100 4 5 6\n"), Some(21));
        assert_eq!(busy_ticks("cpu 1 2 3\n"), None, "too few fields");
        assert_eq!(busy_ticks("cpu 1 x 3 4 5 6 7 8\n"), None);
        assert_eq!(busy_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
    }

    #[test]
    fn this_machine_reports_busy_time_that_grows() {
        let before = machine_cpu().expect("/proc/stat");
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let after = machine_cpu().expect("/proc/stat");
        assert!(after > before, "{before} -> {after}");
    }
}
