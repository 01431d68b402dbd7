//! Which handed-over socket serves what. The old process describes every
//! socket it hands over; the new one checks that description against what
//! its own config would bind (same frontends by name, protocol, listen
//! address and accept mode, one socket per worker, the same admin endpoint)
//! and refuses the lot, naming every difference, when they do not match. An
//! `accept` left to `auto` matches either mode and keeps the running one.
//!
//! A configured port 0 matches whatever port the old process was given: a
//! fresh start would have bound "any port" too, and keeping the one clients
//! already use is the point of the upgrade.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{AcceptMode, Config, FrontendConfig};

/// One socket in the hand-over, in the order its descriptor is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// The frontend it serves; `None` for the admin endpoint's listener.
    pub frontend: Option<String>,
    /// `tcp`, `udp` or `quic` (the admin endpoint is `tcp`).
    pub protocol: String,
    /// Every worker shares this one TCP listener (`accept = "shared"`, or
    /// `auto` where it picked or kept that).
    pub shared_accept: bool,
    /// The address as configured (port 0: any).
    pub listen: SocketAddr,
    /// The address the socket is bound to.
    pub bound: SocketAddr,
    /// The worker it was bound for (0 for the admin endpoint).
    pub worker: usize,
}

impl SocketInfo {
    /// Whether the descriptor must be a TCP listener (else a UDP socket).
    pub fn is_tcp(&self) -> bool {
        self.protocol == crate::config::FrontendProtocol::Tcp.as_str()
    }

    pub fn for_frontend(fe: &FrontendConfig, bound: SocketAddr, worker: usize) -> SocketInfo {
        SocketInfo {
            frontend: Some(fe.name.clone()),
            protocol: fe.protocol.as_str().to_owned(),
            shared_accept: !fe.protocol.is_udp() && fe.accept == AcceptMode::Shared,
            listen: fe.listen,
            bound,
            worker,
        }
    }

    pub fn for_admin(listen: SocketAddr, bound: SocketAddr) -> SocketInfo {
        SocketInfo {
            frontend: None,
            protocol: crate::config::FrontendProtocol::Tcp.as_str().to_owned(),
            shared_accept: false,
            listen,
            bound,
            worker: 0,
        }
    }
}

/// Where each offered socket goes: per frontend of the config (in its
/// order) the offered indices by worker, and the admin listener's index.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub frontends: Vec<Vec<usize>>,
    pub admin: Option<usize>,
}

/// Matches `offered` to what `config` would bind; the error names every difference.
pub fn plan(config: &Config, offered: &[SocketInfo]) -> Result<Plan, String> {
    let mut differences: Vec<String> = Vec::new();
    for (i, info) in offered.iter().enumerate() {
        if let Some(name) = &info.frontend {
            let first_of_its_frontend = offered[..i].iter().all(|s| s.frontend != info.frontend);
            if first_of_its_frontend && !config.frontends.iter().any(|fe| &fe.name == name) {
                differences.push(format!(
                    "frontend `{name}` ({} {}) is served by the running process but is not in this config",
                    info.protocol, info.bound
                ));
            }
        }
    }
    let mut frontends = Vec::with_capacity(config.frontends.len());
    for fe in &config.frontends {
        match plan_frontend(fe, config.workers, offered) {
            Ok(indices) => frontends.push(indices),
            Err(why) => differences.push(format!("frontend `{}`: {why}", fe.name)),
        }
    }
    let admin = plan_admin(config.admin.listen, offered).unwrap_or_else(|why| {
        differences.push(format!("admin endpoint: {why}"));
        None
    });
    if differences.is_empty() {
        Ok(Plan { frontends, admin })
    } else {
        Err(differences.join("; "))
    }
}

/// The offered sockets of one frontend, by worker.
fn plan_frontend(
    fe: &FrontendConfig,
    workers: usize,
    offered: &[SocketInfo],
) -> Result<Vec<usize>, String> {
    let mine: Vec<(usize, &SocketInfo)> = offered
        .iter()
        .enumerate()
        .filter(|(_, s)| s.frontend.as_deref() == Some(fe.name.as_str()))
        .collect();
    let Some((_, first)) = mine.first() else {
        return Err("in this config but not served by the running process".to_owned());
    };
    let wanted = SocketInfo::for_frontend(fe, first.bound, 0);
    if first.protocol != wanted.protocol {
        return Err(format!(
            "protocol {} in the running process, {} in this config",
            first.protocol, wanted.protocol
        ));
    }
    check_listen(fe.listen, first)?;
    // `auto` keeps whichever mode the running process's listeners have
    // (the server then runs them as such: `Config::keep_running_accept_modes`).
    if first.shared_accept != wanted.shared_accept && !fe.accept_auto {
        let mode = |shared| if shared { "shared" } else { "reuseport" };
        return Err(format!(
            "accept = \"{}\" in the running process, \"{}\" in this config",
            mode(first.shared_accept),
            mode(wanted.shared_accept)
        ));
    }
    let mut by_worker = vec![None; workers];
    for (index, info) in &mine {
        if info.protocol != first.protocol || info.bound != first.bound {
            return Err(format!(
                "the running process's sockets disagree ({} {} and {} {})",
                first.protocol, first.bound, info.protocol, info.bound
            ));
        }
        match by_worker.get_mut(info.worker) {
            Some(slot @ None) => *slot = Some(*index),
            _ => {
                return Err(format!(
                "the running process has {} worker sockets, this config asks for {workers} workers",
                mine.len()
            ))
            }
        }
    }
    by_worker
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            format!(
                "the running process has {} worker sockets, this config asks for {workers} workers",
                mine.len()
            )
        })
}

/// The admin listener's index, if both sides have one at the same address.
fn plan_admin(wanted: Option<SocketAddr>, offered: &[SocketInfo]) -> Result<Option<usize>, String> {
    let found = offered.iter().position(|s| s.frontend.is_none());
    match (wanted, found) {
        (None, None) => Ok(None),
        (Some(listen), Some(i)) => check_listen(listen, &offered[i]).map(|()| Some(i)),
        (Some(listen), None) => Err(format!(
            "the running process has none, this config asks for {listen}"
        )),
        (None, Some(i)) => Err(format!(
            "the running process serves it on {}, this config has none",
            offered[i].bound
        )),
    }
}

/// Same IP; same port unless the config leaves it to the kernel (0).
fn check_listen(listen: SocketAddr, offered: &SocketInfo) -> Result<(), String> {
    let port_ok = listen.port() == 0 || listen.port() == offered.bound.port();
    if listen.ip() == offered.bound.ip() && port_ok {
        Ok(())
    } else {
        Err(format!(
            "the running process listens on {}, this config asks for {listen}",
            offered.bound
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse("lb.toml", text).expect("valid config")
    }

    const BASE: &str = "workers = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n\
        [[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
        [[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:9000\"\n";

    /// What a process running `text` would offer, the admin endpoint bound to port 9180.
    fn offered_by(text: &str) -> Vec<SocketInfo> {
        let c = config(text);
        let mut out: Vec<SocketInfo> = c
            .frontends
            .iter()
            .flat_map(|fe| (0..c.workers).map(move |w| SocketInfo::for_frontend(fe, fe.listen, w)))
            .collect();
        if let Some(listen) = c.admin.listen {
            out.push(SocketInfo::for_admin(
                listen,
                "127.0.0.1:9180".parse().unwrap(),
            ));
        }
        out
    }

    #[test]
    fn the_same_config_takes_every_socket_by_worker() {
        let mut offered = offered_by(BASE);
        offered.swap(0, 1);
        let plan = plan(&config(BASE), &offered).expect("match");
        assert_eq!(plan.frontends, vec![vec![1, 0]]);
        assert_eq!(plan.admin, Some(2));
    }

    #[test]
    fn a_different_listen_port_is_refused_naming_the_frontend() {
        let other = BASE.replace("127.0.0.1:8080", "127.0.0.1:8081");
        let why = plan(&config(&other), &offered_by(BASE)).unwrap_err();
        assert_eq!(
            why,
            "frontend `web`: the running process listens on 127.0.0.1:8080, \
             this config asks for 127.0.0.1:8081"
        );
        // Port 0 takes whatever port the running process has.
        let any = BASE.replace("127.0.0.1:8080", "127.0.0.1:0");
        assert!(plan(&config(&any), &offered_by(BASE)).is_ok());
    }

    #[test]
    fn every_difference_is_named() {
        let other = BASE
            .replace("workers = 2", "workers = 3")
            .replace("name = \"web\"", "name = \"api\"")
            .replace("listen = \"127.0.0.1:0\"", "enabled = false");
        let why = plan(&config(&other), &offered_by(BASE)).unwrap_err();
        assert!(why.contains("frontend `web` (tcp 127.0.0.1:8080) is served by the running process but is not in this config"), "{why}");
        assert!(
            why.contains("frontend `api`: in this config but not served"),
            "{why}"
        );
        assert!(why.contains("admin endpoint: the running process serves it on 127.0.0.1:9180, this config has none"), "{why}");

        let more_workers = BASE.replace("workers = 2", "workers = 3");
        let why = plan(&config(&more_workers), &offered_by(BASE)).unwrap_err();
        assert_eq!(
            why,
            "frontend `web`: the running process has 2 worker sockets, this config asks for 3 workers"
        );
    }

    #[test]
    fn protocol_and_accept_mode_must_match() {
        let udp = BASE.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nprotocol = \"udp\"\n",
        );
        let why = plan(&config(&udp), &offered_by(BASE)).unwrap_err();
        assert_eq!(
            why,
            "frontend `web`: protocol tcp in the running process, udp in this config"
        );
        let accept = |mode: &str| {
            BASE.replace(
                "listen = \"127.0.0.1:8080\"\n",
                &format!("listen = \"127.0.0.1:8080\"\naccept = \"{mode}\"\n"),
            )
        };
        let why = plan(
            &config(&accept("shared")),
            &offered_by(&accept("reuseport")),
        )
        .unwrap_err();
        assert!(
            why.contains(
                "accept = \"reuseport\" in the running process, \"shared\" in this config"
            ),
            "{why}"
        );
    }

    /// A config that leaves `accept` to `auto` takes over the listeners of a
    /// process whose `auto` picked the other mode (an older build's default)
    /// or that asked for it, and keeps them.
    #[test]
    fn an_auto_accept_takes_over_either_mode() {
        let reuseport = BASE.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\naccept = \"reuseport\"\n",
        );
        assert_eq!(config(BASE).frontends[0].accept, AcceptMode::Shared);
        let plan_of = |text: &str, offered: &str| plan(&config(text), &offered_by(offered));
        let taken = plan_of(BASE, &reuseport).expect("auto takes per-worker listeners");
        assert_eq!(taken.frontends, vec![vec![0, 1]]);
        // The other way: at 3 workers `auto` would give each its own.
        let three = |text: &str| text.replace("workers = 2", "workers = 3");
        let shared = three(&reuseport).replace("accept = \"reuseport\"", "accept = \"shared\"");
        assert_eq!(
            config(&three(BASE)).frontends[0].accept,
            AcceptMode::Reuseport
        );
        let taken = plan_of(&three(BASE), &shared).expect("auto takes a shared listener");
        assert_eq!(taken.frontends, vec![vec![0, 1, 2]]);
        assert!(
            plan_of(&three(&reuseport), &shared).is_err(),
            "an explicit mode must match"
        );
    }
}
