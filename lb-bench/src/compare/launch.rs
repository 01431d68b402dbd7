//! Starting a server program that `compare` configured (nginx as backends or
//! as a peer, HAProxy, iperf3 -s): write its config, spawn it with its output
//! in the work directory, and wait until its ports accept connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::error::{IoContext, Result};
use crate::procs::Managed;

/// How long a started program may take to open its ports.
const PORTS_TIMEOUT: Duration = Duration::from_secs(15);

/// Writes `text` to `<dir>/<file>` and returns that path.
pub(crate) fn write_config(dir: &Path, file: &str, text: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(file);
    std::fs::write(&path, text).ctx(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// `nginx -c CONF -p DIR -e DIR/<name>.error.log`, in the foreground (the
/// config says `daemon off`).
pub(crate) fn nginx_command(bin: &Path, conf: &Path, dir: &Path, name: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join(format!("{name}.error.log")));
    cmd
}

/// Spawns `cmd` as `name` and waits for `ports`. nginx wants SIGTERM
/// (`graceful`), so that its master stops its workers before it exits.
pub(crate) fn start_listening(
    cmd: Command,
    name: &str,
    dir: &Path,
    ports: &[SocketAddr],
    graceful: bool,
) -> Result<Managed> {
    let mut m = Managed::spawn(cmd, name, dir)?;
    if graceful {
        m.stop_signal = Some(libc::SIGTERM);
    }
    m.wait_ports(ports, PORTS_TIMEOUT)?;
    Ok(m)
}
