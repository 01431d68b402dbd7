//! What a soak runs against: two steady HTTP nodes and an echo server in one
//! `lb-bench serve`, the flapped node in a `lb-bench serve` of its own (so it
//! can be SIGKILLed and restarted on the same address), and lb-proxy with a
//! config written to the work directory: a `web` frontend over the three
//! nodes and a `bulk` frontend over the echo server, both with TCP health
//! probes every [`PROBE_INTERVAL`]. A reload rewrites that config with
//! node-1's weight changed, sends SIGHUP and checks that the reload counter
//! and the weight moved.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sample::{Probe, BACKEND_UP, BACKEND_WEIGHT, RELOADS};
use super::schedule::poll_until;
use crate::compare::backends::{serve_builtin, start_serve_process, Served};
use crate::error::{Error, Result};
use crate::lbproxy::LbProxy;
use crate::procs::{self, Managed};
use crate::serve::ServerSpec;
use crate::signals::WorkDir;

/// The node that is killed and restarted.
pub const FLAPPED: &str = "node-3";
/// The node whose weight each reload changes.
const REWEIGHED: &str = "node-1";
/// lb-proxy's health probe interval (and timeout): a killed node is refused
/// at once and marked down at the next probe.
const PROBE_INTERVAL: &str = "200ms";
/// lb-proxy's idle timeout; the idle connections are held for less.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a reload, or a health transition after a kill or restart, may take
/// to show in `/metrics` (a flapping node needs up to 8 × 2 probes to rise).
const METRIC_WAIT: Duration = Duration::from_secs(10);

/// The running backends and balancer, stopped on drop.
pub(super) struct Rig {
    pub dir: WorkDir,
    nodes: Vec<(String, SocketAddr)>,
    echo: SocketAddr,
    _steady: Served,
    /// `None` while killed; behind a lock so the flapper and the reloader
    /// can share the rig.
    flapped: Mutex<Option<Managed>>,
    pub proxy: LbProxy,
    pub probe: Probe,
    pub web: SocketAddr,
    pub bulk: SocketAddr,
}

impl Rig {
    /// Starts the backends, then lb-proxy with node-1 at weight 1.
    pub fn start(lb_proxy: &Path) -> Result<Rig> {
        let dir = WorkDir::new("lb-soak-")?;
        let specs: Vec<ServerSpec> = [
            "http:node-1=127.0.0.1:0",
            "http:node-2=127.0.0.1:0",
            "echo:echo=127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
        let (servers, steady) = serve_builtin(&specs, dir.path(), "backends")?;
        let (flapped, flapped_addr) =
            start_flapped(dir.path(), "127.0.0.1:0".parse().expect("an address"))?;
        let mut nodes: Vec<(String, SocketAddr)> = servers[..2]
            .iter()
            .map(|s| (s.name.clone(), s.addr))
            .collect();
        nodes.push((FLAPPED.to_owned(), flapped_addr));
        let echo = servers[2].addr;
        let proxy =
            LbProxy::run_config(lb_proxy, dir.path(), "lb-proxy", &config(&nodes, echo, 1))?;
        let admin = proxy.admin.ok_or_else(|| Error::Protocol {
            what: "lb-proxy's ready file".into(),
            detail: "no admin address".into(),
        })?;
        let probe = Probe {
            pid: proxy.pid(),
            admin,
        };
        Ok(Rig {
            web: proxy.frontend(Some("web"))?,
            bulk: proxy.frontend(Some("bulk"))?,
            dir,
            nodes,
            echo,
            _steady: steady,
            flapped: Mutex::new(Some(flapped)),
            proxy,
            probe,
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("lb-proxy.toml")
    }

    fn flapped_addr(&self) -> SocketAddr {
        self.nodes[2].1
    }

    /// Rewrites the config with node-1 at `weight`, sends SIGHUP, and waits
    /// until the success counter moved and the weight shows in `/metrics`.
    pub fn reload(&self, weight: u32) -> std::result::Result<(), String> {
        let text = config(&self.nodes, self.echo, weight);
        std::fs::write(self.config_path(), text).map_err(|e| format!("write the config: {e}"))?;
        let ok = [("result", "success")];
        let before = self.probe.value(RELOADS, &ok).map_err(|e| e.to_string())?;
        procs::send_signal(self.proxy.pid(), libc::SIGHUP);
        let weight_label = [("frontend", "web"), ("backend", REWEIGHED)];
        let applied = poll_until(METRIC_WAIT, || {
            self.probe.value(RELOADS, &ok).is_ok_and(|n| n > before)
                && self
                    .probe
                    .value(BACKEND_WEIGHT, &weight_label)
                    .is_ok_and(|w| w == f64::from(weight))
        });
        match applied {
            Some(_) => Ok(()),
            None => Err(format!(
                "a reload to weight {weight} was not counted, or not applied, within {} s",
                METRIC_WAIT.as_secs()
            )),
        }
    }

    /// SIGKILLs the flapped node; `Some(when)` once lb-proxy shows it down.
    pub fn kill_flapped(&self) -> Option<Instant> {
        drop(self.flapped_process().take());
        self.wait_flapped_up(false)
    }

    /// Restarts the flapped node on its address; `Some(when)` once lb-proxy
    /// shows it up again. Does nothing but wait when it is running.
    pub fn restart_flapped(&self) -> Result<Option<Instant>> {
        {
            let mut process = self.flapped_process();
            if process.is_none() {
                *process = Some(start_flapped(self.dir.path(), self.flapped_addr())?.0);
            }
        }
        Ok(self.wait_flapped_up(true))
    }

    fn flapped_process(&self) -> std::sync::MutexGuard<'_, Option<Managed>> {
        // A panicked holder left a process or none: either is usable.
        self.flapped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_flapped_up(&self, up: bool) -> Option<Instant> {
        let labels = [("frontend", "web"), ("backend", FLAPPED)];
        let want = if up { 1.0 } else { 0.0 };
        poll_until(METRIC_WAIT, || {
            self.probe
                .value(BACKEND_UP, &labels)
                .is_ok_and(|v| v == want)
        })
    }
}

/// The disturbances in words, from the figures above (for the report).
pub(super) fn describe(reload_every: Duration, flap_every: Duration) -> String {
    format!(
        "a SIGHUP reload every {} s ({REWEIGHED}'s weight alternating, the reload counter and the weight checked) \
         and {FLAPPED} SIGKILLed every {} s and restarted half a period later (TCP probes every {PROBE_INTERVAL})",
        reload_every.as_secs_f64(),
        flap_every.as_secs_f64()
    )
}

/// `lb-bench serve http:node-3=ADDR` as its own process; its bound address.
fn start_flapped(dir: &Path, addr: SocketAddr) -> Result<(Managed, SocketAddr)> {
    let spec: ServerSpec = format!("http:{FLAPPED}={addr}").parse()?;
    let (process, servers) = start_serve_process(&[spec], dir, FLAPPED)?.ok_or_else(|| {
        Error::BadArgument(format!(
            "soak restarts {FLAPPED} as `lb-bench serve`, so it must run as the lb-bench binary"
        ))
    })?;
    Ok((process, servers[0].addr))
}

/// The config: `web` over the nodes (node-1 at `weight`), `bulk` over the echo server.
fn config(nodes: &[(String, SocketAddr)], echo: SocketAddr, weight: u32) -> String {
    let health = format!(
        "[frontends.health]\nkind = \"tcp\"\ninterval = \"{PROBE_INTERVAL}\"\ntimeout = \"{PROBE_INTERVAL}\"\n"
    );
    let mut text = format!(
        "workers = 2\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"{}s\"\n{health}",
        IDLE_TIMEOUT.as_secs()
    );
    for (name, addr) in nodes {
        let w = if name == REWEIGHED { weight } else { 1 };
        text.push_str(&format!(
            "\n[[frontends.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {w}\n"
        ));
    }
    text.push_str(&format!(
        "\n[[frontends]]\nname = \"bulk\"\nlisten = \"127.0.0.1:0\"\n{health}\n\
         [[frontends.backends]]\nname = \"echo\"\naddress = \"{echo}\"\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_reweighs_node_1_only() {
        let nodes: Vec<(String, SocketAddr)> = (1..=3)
            .map(|i| {
                (
                    format!("node-{i}"),
                    SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                )
            })
            .collect();
        let text = config(&nodes, "127.0.0.1:9100".parse().unwrap(), 2);
        assert_eq!(text.matches("[[frontends]]").count(), 2);
        assert_eq!(text.matches("weight = 2").count(), 1);
        assert_eq!(text.matches("weight = 1").count(), 2);
        assert!(text.contains("name = \"node-1\"\naddress = \"127.0.0.1:9001\"\nweight = 2"));
        assert_eq!(text.matches("interval = \"200ms\"").count(), 2);
        assert!(text.contains("idle_timeout = \"120s\""));
    }
}
