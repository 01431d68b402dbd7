//! A signal that ends lb-bench ends what it started: every process
//! [`crate::procs::Managed`] spawns (backends, proxies, HAProxy, nginx, the
//! flapped node of a soak) is recorded here while it runs, and SIGINT,
//! SIGTERM or SIGHUP stops them (and their children, nginx's workers) before
//! lb-bench exits; then the commands' scratch directories ([`WorkDir`]),
//! where they kept their configs and logs, are removed.
//!
//! Why: `Managed` stops its process on drop, but a signal's default action
//! ends lb-bench without running any drop. Ctrl-C in a terminal reaches the
//! whole process group, but `kill PID`, `timeout` or a CI job's cancel reach
//! lb-bench alone, and what it started kept running: ports held, a CPU busy,
//! and the next benchmark's figures wrong.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::procs::{child_pids, send_signal};

/// The pids of the running managed processes.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// The scratch directories in use.
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The signals that end lb-bench and, with it, what it started.
const ENDING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Records a started process, to be stopped if a signal ends lb-bench.
pub fn started(pid: u32) {
    running().push(pid);
}

/// Forgets a process that has been stopped (called before it is reaped, so
/// that a pid freed for reuse is never signalled).
pub fn stopped(pid: u32) {
    running().retain(|&p| p != pid);
}

/// A command's scratch directory, `prefix` and a random tail under the
/// system's temporary directory: removed on drop, as a `TempDir` is, and
/// also when a signal ends lb-bench, once the processes that wrote there
/// are stopped.
pub struct WorkDir(tempfile::TempDir);

impl WorkDir {
    pub fn new(prefix: &str) -> crate::error::Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| {
                crate::error::Error::io(format!("create a work directory {prefix}*"), e)
            })?;
        dirs().push(dir.path().to_path_buf());
        Ok(WorkDir(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for WorkDir {
    /// Forgets the directory; the `TempDir` inside removes it.
    fn drop(&mut self) {
        let path = self.0.path();
        dirs().retain(|d| d != path);
    }
}

/// Takes the ending signals on a thread of their own: blocks them in the
/// calling thread (call it first in `main`, before any other thread starts,
/// so that every thread inherits the mask) and starts the thread that waits
/// for one, stops every recorded process and exits with 128 + the signal, as
/// the signal itself would have. Processes spawned later start with an empty
/// mask (std's `Command` resets it), so they still take these signals.
pub fn stop_children_on_signals() -> std::io::Result<()> {
    let set = ending_set();
    // SAFETY: a valid, initialised sigset; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = wait_for(&set);
            stop_all(signal);
            remove_work_dirs();
            std::process::exit(128 + signal);
        })?;
    Ok(())
}

fn ending_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset takes valid signals.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in ENDING {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks until one of `set` arrives; returns it.
fn wait_for(set: &libc::sigset_t) -> libc::c_int {
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised and `signal` is a valid out pointer.
        if unsafe { libc::sigwait(set, &mut signal) } == 0 {
            return signal;
        }
    }
}

/// Stops every recorded process and its children (SIGKILL: lb-bench is
/// leaving and cannot wait for a graceful stop), saying so on stderr.
fn stop_all(signal: libc::c_int) {
    let pids = running().clone();
    eprintln!(
        "lb-bench: ended by signal {signal}: stopping the {} process(es) it started",
        pids.len()
    );
    for pid in pids {
        // Its children are found before it dies: after, they belong to
        // init, and nginx's workers outlive a killed master.
        let children = child_pids(pid);
        send_signal(pid, libc::SIGKILL);
        for c in children {
            send_signal(c, libc::SIGKILL);
        }
    }
}

/// Removes every scratch directory in use. A process killed a moment ago
/// may still be writing its last lines there (SIGKILL lands as the kernel
/// gets to it), so a removal that meets a directory filling up is tried a
/// few times.
fn remove_work_dirs() {
    for dir in dirs().clone() {
        for _ in 0..5 {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
}

fn dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // As `running`: a plain list, valid whatever a panic interrupted.
    DIRS.lock().unwrap_or_else(|e| e.into_inner())
}

fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A panic while holding the lock leaves a plain list of pids, still valid.
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_recorded_while_it_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let m = crate::procs::Managed::spawn(cmd, "sleeper", dir.path()).expect("spawn sleep");
        let pid = m.pid();
        assert!(running().contains(&pid), "{pid} recorded while it runs");
        drop(m);
        assert!(!running().contains(&pid), "{pid} forgotten once stopped");
    }
}
