//! Child processes and /proc: starting a program with its output in log files
//! (killed and reaped on drop, or by [`crate::signals`] when a signal ends
//! lb-bench), waiting for a ready file, finding binaries,
//! reading a process's CPU time, resident memory and open fds, raising the fd limit, and
//! describing the machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// A child process whose stdout and stderr go to `<dir>/<name>.log`. Killed
/// (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Managed {
    child: Child,
    pub name: String,
    pub log: PathBuf,
    /// Sent first on drop (then up to 3 s to exit), for programs that must
    /// stop their own workers (nginx's master). `None`: SIGKILL at once.
    pub stop_signal: Option<i32>,
}

impl Managed {
    /// Spawns `cmd` with stdin closed and output in `<dir>/<name>.log`.
    pub fn spawn(mut cmd: Command, name: &str, dir: &Path) -> Result<Managed> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).ctx(|| format!("create {}", log.display()))?;
        let err = out.try_clone().ctx(|| format!("dup {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .ctx(|| format!("start {name} ({:?})", cmd.get_program()))?;
        crate::signals::started(child.id());
        Ok(Managed {
            child,
            name: name.to_owned(),
            log,
            stop_signal: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, prefixed with a newline (for error messages).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// `Some(status)` when it has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// Waits until `path` holds something (written atomically by the child),
    /// and returns it; fails if the child exits first or `timeout` passes.
    pub fn wait_file(&mut self, path: &Path, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = fs::read_to_string(path) {
                if !text.trim().is_empty() {
                    return Ok(text);
                }
            }
            self.still_waiting(&self.name.clone(), deadline, timeout)?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a TCP connect to each of `addrs` succeeds.
    pub fn wait_ports(&mut self, addrs: &[std::net::SocketAddr], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for a in addrs {
            loop {
                if std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok() {
                    break;
                }
                let what = format!("{} (port {a})", self.name);
                self.still_waiting(&what, deadline, timeout)?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Fails if the child has exited (as its name) or `deadline` has passed
    /// (as `what`, the thing waited for); else the wait goes on.
    fn still_waiting(&mut self, what: &str, deadline: Instant, timeout: Duration) -> Result<()> {
        if let Some(status) = self.exited() {
            return Err(Error::ExitedEarly {
                what: self.name.clone(),
                status,
                log: self.log_tail(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: what.to_owned(),
                secs: timeout.as_secs(),
                log: self.log_tail(),
            });
        }
        Ok(())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let children = child_pids(self.pid());
            if let Some(sig) = self.stop_signal {
                send_signal(self.pid(), sig);
                let deadline = Instant::now() + Duration::from_secs(3);
                while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = self.child.kill();
            for c in children {
                send_signal(c, libc::SIGKILL);
            }
        }
        crate::signals::stopped(self.pid());
        let _ = self.child.wait();
    }
}

/// Sends `signal` to `pid`, ignoring errors (it may have exited).
pub fn send_signal(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The pids whose parent is `pid` (from /proc).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU seconds of `pid` and its direct children (nginx's master and workers).
pub fn cpu_secs_tree(pid: u32) -> Option<f64> {
    let own = cpu_secs(pid)?;
    Some(
        own + child_pids(pid)
            .into_iter()
            .filter_map(cpu_secs)
            .sum::<f64>(),
    )
}

/// `RssAnon` in KiB of `pid` and its direct children.
pub fn rss_anon_kib_tree(pid: u32) -> Option<u64> {
    let own = rss_anon_kib(pid)?;
    Some(
        own + child_pids(pid)
            .into_iter()
            .filter_map(rss_anon_kib)
            .sum::<u64>(),
    )
}

/// The last 20 lines of a log file, prefixed with a newline, or empty.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(20);
    format!(
        "; last lines of {}:\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

/// Where a program is: `explicit` when given (it must exist), else the first
/// `name` on PATH. `None` when not installed.
pub fn find_program(name: &str, explicit: Option<&Path>) -> Option<PathBuf> {
    let mut name = Path::new(name);
    if let Some(p) = explicit {
        if p.components().count() > 1 {
            return p.is_file().then(|| p.to_path_buf());
        }
        // A bare name: look it up on PATH like the default.
        name = p;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The directory holding the running executable; for a test or bench
/// executable in `target/<profile>/deps`, `target/<profile>`.
pub fn exe_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Some(dir)
}

/// The `lb-proxy` binary: `explicit`, or the one next to this executable.
pub fn lb_proxy_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => exe_dir().unwrap_or_default().join("lb-proxy"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            path,
            hint:
                "build it (cargo build -p lb-proxy, --release for timings) or pass --lb-proxy PATH"
                    .into(),
        })
    }
}

/// Whether a binary path looks like a debug build (`.../debug/...`).
pub fn is_debug_build(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "debug")
}

/// Ticks per second of /proc's CPU times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU time of `pid`, in seconds (from /proc/PID/stat).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here (0-based 11, 12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// `RssAnon` of `pid` in KiB (from /proc/PID/status).
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

/// `VmRSS` of `pid` in KiB: all resident memory, what `ps` calls RSS.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A KiB field of /proc/PID/status, named with its colon (`"VmRSS:"`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of `pid` (the entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> Option<u64> {
    let entries = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.filter(|e| e.is_ok()).count() as u64)
}

/// Raises the soft open-file limit to the hard one; returns (soft, hard).
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (1024, 1024);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// The machine: CPU model, logical CPUs, kernel, memory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub nproc: usize,
    pub kernel: String,
    pub mem_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    Machine {
        cpu,
        nproc,
        kernel,
        mem_gib,
    }
}

/// The first line a program prints for `args` (e.g. `--version`), trimmed.
pub fn version_line(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_rss() {
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(rss_anon_kib(me).unwrap() > 0);
        assert!(vm_rss_kib(me).unwrap() > 0);
        // The directory being read is open while it is counted.
        assert!(fd_count(me).unwrap() > 0);
        assert!(clk_tck() > 0.0);
    }

    #[test]
    fn machine_is_described() {
        let m = machine();
        assert!(m.nproc >= 1);
        assert!(!m.kernel.is_empty());
    }

    #[test]
    fn explicit_missing_programs_are_missing() {
        assert_eq!(find_program("sh", Some(Path::new("/nonexistent"))), None);
        assert!(find_program("sh", None).is_some());
        assert!(is_debug_build(Path::new("/x/target/debug/lb-proxy")));
        assert!(!is_debug_build(Path::new("/x/target/release/lb-proxy")));
    }
}
