//! What `lb-bench experiment seed` runs against, and how much of it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::net::SourceRange;

/// What to run the experiment against.
#[derive(Clone, Debug)]
pub struct SeedOptions {
    /// A running balancer's frontend; `None` starts `lb-proxy demo`.
    pub proxy: Option<SocketAddr>,
    /// Its admin endpoint (for flow counts and expected shares).
    pub admin: Option<SocketAddr>,
    /// The lb-proxy binary (default: next to this executable).
    pub lb_proxy: Option<PathBuf>,
    /// Client addresses for the session-affinity step.
    pub sources: SourceRange,
    pub keepalive_requests: u64,
    pub new_connections: u64,
    pub hop_flows: u64,
    /// Flows shown per step.
    pub show_flows: usize,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            proxy: None,
            admin: None,
            lb_proxy: None,
            sources: SourceRange {
                first: Ipv4Addr::new(127, 0, 0, 2),
                last: Ipv4Addr::new(127, 0, 0, 21),
            },
            keepalive_requests: 10,
            new_connections: 300,
            hop_flows: 60,
            show_flows: 5,
        }
    }
}
