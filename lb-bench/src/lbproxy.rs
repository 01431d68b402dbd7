//! Starting `lb-proxy` (demo mode or a generated config) as a child process,
//! reading its ready file, and talking to its admin endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::net;
use crate::procs::Managed;

/// How long lb-proxy may take to write its ready file.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What `lb-proxy` writes to its `--ready-file` once every worker accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub pid: u32,
    pub frontends: BTreeMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub demo_backends: BTreeMap<String, SocketAddr>,
}

impl Ready {
    /// Parses the ready file; the error says what is missing or malformed.
    pub fn parse(text: &str) -> std::result::Result<Ready, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
        let addr = |a: &serde_json::Value, what: &str| -> std::result::Result<SocketAddr, String> {
            a.as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("{what} is not IP:PORT: {text}"))
        };
        let addrs = |key: &str| -> std::result::Result<BTreeMap<String, SocketAddr>, String> {
            let Some(map) = v.get(key).and_then(|m| m.as_object()) else {
                return Ok(BTreeMap::new());
            };
            map.iter()
                .map(|(k, a)| Ok((k.clone(), addr(a, &format!("{key}.{k}"))?)))
                .collect()
        };
        Ok(Ready {
            pid: v["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| format!("no pid: {text}"))?,
            frontends: addrs("frontends")?,
            admin: v
                .get("admin")
                .filter(|a| !a.is_null())
                .map(|a| addr(a, "admin"))
                .transpose()?,
            demo_backends: addrs("demo_backends")?,
        })
    }
}

/// A running lb-proxy, killed on drop.
#[derive(Debug)]
pub struct LbProxy {
    pub process: Managed,
    pub frontends: BTreeMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub demo_backends: BTreeMap<String, SocketAddr>,
}

impl LbProxy {
    /// `lb-proxy demo --listen 127.0.0.1:0 --admin 127.0.0.1:0 --distribution D`.
    pub fn demo(bin: &Path, dir: &Path, name: &str, distribution: &str) -> Result<LbProxy> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "--log",
            "warn",
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--distribution",
            distribution,
        ]);
        Self::start(cmd, dir, name)
    }

    /// `lb-proxy run --config <dir>/<name>.toml` with `config` written there.
    pub fn run_config(bin: &Path, dir: &Path, name: &str, config: &str) -> Result<LbProxy> {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).ctx(|| format!("write {}", path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--log", "warn", "run", "--config"]).arg(&path);
        Self::start(cmd, dir, name)
    }

    fn start(mut cmd: Command, dir: &Path, name: &str) -> Result<LbProxy> {
        let ready = dir.join(format!("{name}.ready.json"));
        let _ = std::fs::remove_file(&ready);
        cmd.arg("--ready-file").arg(&ready).env_remove("RUST_LOG");
        let mut process = Managed::spawn(cmd, name, dir)?;
        let text = process.wait_file(&ready, READY_TIMEOUT)?;
        let ready = Ready::parse(&text).map_err(|detail| Error::Protocol {
            what: format!("{name}'s ready file"),
            detail,
        })?;
        let proxy = LbProxy {
            frontends: ready.frontends,
            admin: ready.admin,
            demo_backends: ready.demo_backends,
            process,
        };
        if let Some(admin) = proxy.admin {
            let deadline = Instant::now() + READY_TIMEOUT;
            while !matches!(net::http_get(admin, "/healthz"), Ok((200, _))) {
                if Instant::now() >= deadline {
                    return Err(Error::NotReady {
                        what: format!("{name}'s admin endpoint {admin}"),
                        secs: READY_TIMEOUT.as_secs(),
                        log: proxy.process.log_tail(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(proxy)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The address of frontend `name`, or of the only frontend.
    pub fn frontend(&self, name: Option<&str>) -> Result<SocketAddr> {
        match name {
            Some(n) => self.frontends.get(n).copied(),
            None if self.frontends.len() == 1 => self.frontends.values().next().copied(),
            None => None,
        }
        .ok_or_else(|| Error::Protocol {
            what: format!("{}'s ready file", self.process.name),
            detail: format!("no frontend {name:?} in {:?}", self.frontends),
        })
    }
}

/// The balancer's `/metrics` text.
pub fn metrics(admin: SocketAddr) -> Result<String> {
    let (status, body) = net::http_get(admin, "/metrics")?;
    if status != 200 {
        return Err(Error::Protocol {
            what: format!("http://{admin}/metrics"),
            detail: format!("status {status}"),
        });
    }
    Ok(body)
}

/// `/explain?frontend=F&src=IP:PORT`.
pub fn explain(
    admin: SocketAddr,
    frontend: Option<&str>,
    src: SocketAddr,
) -> Result<serde_json::Value> {
    let path = match frontend {
        Some(f) => format!("/explain?frontend={f}&src={src}"),
        None => format!("/explain?src={src}"),
    };
    net::get_json(admin, &path)
}
