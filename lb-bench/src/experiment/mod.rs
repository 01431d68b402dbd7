//! `lb-bench experiment seed`: the seed article, replayed against lb-proxy.
//!
//! 1. keep-alive: 10 requests on one connection are one flow, so one node;
//! 2. `-disable-keepalive`: every request is a new 5-tuple, so flows spread
//!    over the nodes (chi-square against the balancer's expected shares);
//! 3. session affinity (`SourceIP`, what AKS sets for `sessionAffinity:
//!    ClientIP`): one node per client address, over many client addresses;
//! 4. the hop model: the ALB in front of three nodes with the app's only pod
//!    on node 2: flows through node 2 reach the pod from the client's address,
//!    flows through node 1 and 3 from that node's IP (SNAT).
//!
//! Each step prints a few flows as a capture would show them and a PASS or
//! FAIL line against what the article expects.
//!
//! `lb-bench experiment quic-migration` (`migration`) is its QUIC
//! counterpart: a client migrates mid-connection behind a plain UDP and a
//! QUIC-LB frontend, with the same PASS/FAIL reporting.
//!
//! `lb-bench experiment zones` (`zones`) is the article's point 2, the
//! cross-zone bounce: a three-zone lab under Cluster, Local and
//! PreferSameZone, the share of flows that crossed zones, request latency
//! and a chart; whole in its file.
//!
//! The files: `options` (what to run against), `outcome` (the verdicts, and
//! the printing: flow tables, PASS/FAIL lines), `steps` (the lab the steps
//! share, and steps 1 to 3), `hop` (the hop model's config and step 4),
//! `migration` (the QUIC experiment, whole), `zones` (the zones experiment, whole). This file only tells the seed
//! story; the children never import it.

mod hop;
mod migration;
mod options;
mod outcome;
mod steps;
mod zones;

use std::io::Write;

pub use hop::hop_config;
pub use migration::{migration_config, run_quic_migration, MigrationOptions};
pub use options::SeedOptions;
pub use outcome::{flow_table, Outcome, SeedOutcome, Step};
pub use zones::{run_zones, ZonesOptions};

use crate::error::Result;
use crate::procs;
use crate::signals::WorkDir;
use outcome::Reporter;
use steps::{Balancer, Lab};

/// Runs the experiment, printing as it goes; `Err` only when it cannot start.
pub fn run_seed(
    rt: &tokio::runtime::Runtime,
    opts: &SeedOptions,
    out: &mut dyn Write,
) -> Result<SeedOutcome> {
    let dir = WorkDir::new("lb-bench-seed.")?;
    // Steps 3 and 4 start balancers of their own; without the binary they fail, not the run.
    let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref());
    let mut r = Reporter::new(out, "seed experiment");
    let lab = Lab {
        rt,
        opts,
        dir: dir.path(),
        bin: &bin,
    };
    // The balancer for steps 1 and 2; one started here runs until the end.
    let balancer = Balancer::given_or_demo(opts, dir.path())?;
    r.say(&balancer.banner());
    steps::keepalive(&lab, &balancer, &mut r)?;
    steps::new_connections(&lab, &balancer, &mut r)?;
    steps::session_affinity(&lab, &mut r)?;
    hop::hop_model(&lab, &mut r)?;
    Ok(r.conclude())
}
