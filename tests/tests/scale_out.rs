//! Scale-out end to end (issue 15): lb-proxy instances announced over BGP by
//! ExaBGP to BIRD in a router namespace, ECMP over them, in network namespaces
//! built from the shipped `config/bgp/` files (see tests/src/netns.rs).
//!
//! Each routing variant (BIRD's multipath route; a resilient nexthop group)
//! runs one sequence on one lab, each step a named function asserting one of
//! the points: spread (1) and agreement (2) over two instances, join
//! (5) of a third, crash (3) of the first, graceful leave (4) of the third.
//! The figures (breaks, times) are printed as a table: run with --nocapture.
//! Mismatch (6) needs no routing and has its own lab.
//!
//! A flow is one TCP connection from the client namespace to VIP:80; it
//! breaks when an exchange on it is reset, ends or times out. Long-lived flows
//! keep talking (one exchange per flow every [`TICK`]) through each membership
//! change, as a download or a busy connection does; idle ones are not studied.

use std::collections::BTreeMap;
use std::io;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_tests::netns::{
    bgp_config, bgp_hold_time, enter_netns, netns_list, Flow, Lab, Routing, DAEMON_TIMEOUT,
};
use lb_tests::wait_until;

/// Flows for the spread (the figure), opened this many at a time.
const SPREAD_FLOWS: usize = 1000;
const SPREAD_PARALLEL: usize = 8;
/// The share of the spread each of two instances must carry.
const SPREAD_SHARE: RangeInclusive<f64> = 0.30..=0.70;
/// Long-lived flows per membership change.
const LONG_FLOWS: usize = 60;
/// How often each long-lived flow exchanges; well under the resilient group's
/// idle_timer (1 s, resilient-sync.sh), so its bucket never counts as idle.
const TICK: Duration = Duration::from_millis(100);
/// How often the prober opens a new short flow during a change.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// New flows checked after a change has reached the router.
const AFTER_FLOWS: usize = 50;

#[test]
fn multipath_routes_spread_agree_join_crash_leave() {
    scale_out(Routing::Multipath);
}

#[test]
fn resilient_nexthop_group_spread_agree_join_crash_leave() {
    scale_out(Routing::Resilient);
}

/// The sequence on one lab; prints the figures.
fn scale_out(routing: Routing) {
    let mut lab = Lab::up();
    lab.start_router(routing);
    let config = bgp_config("lb-proxy.toml");
    for i in [1, 2] {
        lab.start_proxy(i, &config);
        lab.start_speaker(i);
    }
    lab.wait_paths(&[1, 2], DAEMON_TIMEOUT);
    let mut report = Report::default();
    spread_and_agreement(&lab, &mut report);
    join(&mut lab, &config, routing, &mut report);
    crash(&mut lab, routing, &mut report);
    graceful_leave(&mut lab, &mut report);
    report.print(routing);
}

/// The figures of one sequence, printed as a table at the end.
#[derive(Default)]
struct Report(Vec<(String, String)>);

impl Report {
    /// Records a figure (printed at once too, so a failure shows those before it).
    fn add(&mut self, what: &str, figure: String) {
        println!("  {what:<44} {figure}");
        self.0.push((what.to_owned(), figure));
    }

    fn print(&self, routing: Routing) {
        println!("\nscale-out, {} routing:", routing.name());
        for (what, figure) in &self.0 {
            println!("  {what:<44} {figure}");
        }
    }
}

// ---------------------------------------------------------------------------
// 1 and 2: spread and agreement.

/// (1) 1000 flows reach both instances, each with 30–70%; (2) every flow
/// reached the backend `/explain` names for it on each instance, whose
/// fingerprints agree.
fn spread_and_agreement(lab: &Lab, report: &mut Report) {
    let flows: Vec<(u16, u8, String)> = lab
        .on_client_threads(SPREAD_FLOWS, SPREAD_PARALLEL, || {
            let flow = Flow::open()?;
            let seen = (flow.src_port, flow.instance, flow.backend.clone());
            flow.finish()?;
            io::Result::Ok(seen)
        })
        .into_iter()
        .collect::<io::Result<_>>()
        .expect("every spread flow completes");
    let per_instance = count_by(flows.iter().map(|f| f.1));
    for i in [1, 2] {
        let share = per_instance.get(&i).copied().unwrap_or(0) as f64 / flows.len() as f64;
        assert!(
            SPREAD_SHARE.contains(&share),
            "instance {i} carried {share:.3} of {} flows: {per_instance:?}",
            flows.len()
        );
    }
    report.add(
        "spread: flows per instance (1000)",
        format!("{per_instance:?}"),
    );

    let fingerprint = fingerprints_agree(lab, &[1, 2]).expect("the instances agree");
    let ports: Vec<u16> = flows.iter().map(|f| f.0).collect();
    for i in [1, 2] {
        let named = lab.explain_backends(i, &ports);
        let disagree = flows.iter().zip(&named).filter(|(f, n)| f.2 != **n).count();
        assert_eq!(
            disagree, 0,
            "flows whose backend differs from /explain on instance {i}"
        );
    }
    report.add(
        "agreement: flows off /explain (instances 1, 2)",
        format!("0 of {} (fingerprint {fingerprint})", flows.len()),
    );
}

/// The instances' `/backends` fingerprint when they all agree; otherwise an
/// error naming each instance's.
fn fingerprints_agree(lab: &Lab, instances: &[u8]) -> Result<String, String> {
    let prints: BTreeMap<u8, String> = instances
        .iter()
        .map(|&i| {
            let (status, body) = lab.admin_get(i, "/backends");
            assert_eq!(status, 200, "/backends on instance {i}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("/backends JSON");
            let print = v["fingerprint"].as_str().expect("a top-level fingerprint");
            (i, print.to_owned())
        })
        .collect();
    let first = prints.values().next().cloned().unwrap_or_default();
    if prints.values().all(|p| *p == first) {
        Ok(first)
    } else {
        Err(format!("config fingerprints differ: {prints:?}"))
    }
}

fn count_by(items: impl Iterator<Item = u8>) -> BTreeMap<u8, usize> {
    let mut counts = BTreeMap::new();
    for i in items {
        *counts.entry(i).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// Long-lived flows and the prober.

/// Long-lived flows exchanging every [`TICK`] on a thread of their own.
struct Talking {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: JoinHandle<Vec<Fate>>,
}

/// What became of one long-lived flow.
struct Fate {
    instance: u8,
    broke_at: Option<Instant>,
}

impl Talking {
    /// Opens [`LONG_FLOWS`] flows (all must complete their first exchange)
    /// and starts them talking.
    fn start(lab: &Lab) -> Talking {
        let flows: Vec<Flow> = lab
            .on_client_threads(LONG_FLOWS, SPREAD_PARALLEL, Flow::open)
            .into_iter()
            .collect::<io::Result<_>>()
            .expect("every long-lived flow opens");
        Self::talk(flows)
    }

    fn talk(mut flows: Vec<Flow>) -> Talking {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (Arc::clone(&stop), Arc::clone(&rounds));
        let handle = std::thread::spawn(move || {
            let mut broke_at = vec![None; flows.len()];
            while !stop2.load(Ordering::Relaxed) {
                for (flow, broke) in flows.iter_mut().zip(&mut broke_at) {
                    if broke.is_none() && flow.exchange().is_err() {
                        *broke = Some(Instant::now());
                    }
                }
                rounds2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(TICK);
            }
            flows
                .iter()
                .zip(broke_at)
                .map(|(f, broke_at)| Fate {
                    instance: f.instance,
                    broke_at,
                })
                .collect()
        });
        Talking {
            stop,
            rounds,
            handle,
        }
    }

    /// Waits for two more full rounds (every flow has exchanged since the
    /// caller's change was in place), then stops and returns the fates.
    fn stop(self) -> Vec<Fate> {
        let seen = self.rounds.load(Ordering::Relaxed);
        wait_until(
            "two more rounds of exchanges",
            Duration::from_secs(20),
            || (self.rounds.load(Ordering::Relaxed) >= seen + 2).then_some(()),
        );
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("talking thread")
    }
}

/// (broken, total) of the fates on `instances`.
fn broken_on(fates: &[Fate], instances: &[u8]) -> (usize, usize) {
    let on: Vec<&Fate> = fates
        .iter()
        .filter(|f| instances.contains(&f.instance))
        .collect();
    (on.iter().filter(|f| f.broke_at.is_some()).count(), on.len())
}

/// New short flows opened one after another during a change: when each was
/// opened, and the instance it completed on (or the error).
struct Prober {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(Instant, io::Result<u8>)>>,
}

impl Prober {
    fn start(lab: &Lab) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let client = lab.ns("client");
        let handle = std::thread::spawn(move || {
            enter_netns(&client);
            let mut seen = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let at = Instant::now();
                let flow = Flow::open().and_then(|f| {
                    let i = f.instance;
                    f.finish().map(|()| i)
                });
                seen.push((at, flow));
                std::thread::sleep(PROBE_EVERY);
            }
            seen
        });
        Prober { stop, handle }
    }

    fn stop(self) -> Vec<(Instant, io::Result<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("prober thread")
    }
}

/// Opens [`AFTER_FLOWS`] new flows; all must complete; returns their instances.
fn new_flows(lab: &Lab) -> BTreeMap<u8, usize> {
    let instances: Vec<u8> = lab
        .on_client_threads(AFTER_FLOWS, SPREAD_PARALLEL, || {
            let flow = Flow::open()?;
            let i = flow.instance;
            flow.finish().map(|()| i)
        })
        .into_iter()
        .collect::<io::Result<_>>()
        .expect("every new flow completes");
    count_by(instances.into_iter())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

// ---------------------------------------------------------------------------
// 5: join.

/// (5) A third instance announces: count the long-lived flows on the first two
/// that break. With the resilient group none may; with multipath routes
/// hash-threshold moves some and the count is reported.
fn join(lab: &mut Lab, config: &str, routing: Routing, report: &mut Report) {
    let talking = Talking::start(lab);
    lab.start_proxy(3, config);
    let start = Instant::now();
    lab.start_speaker(3);
    lab.wait_paths(&[1, 2, 3], DAEMON_TIMEOUT);
    let routed = start.elapsed();
    wait_until("a new flow to reach instance 3", DAEMON_TIMEOUT, || {
        lab.open_flow().ok().filter(|f| f.instance == 3).map(|_| ())
    });
    let reached = start.elapsed();
    let fates = talking.stop();
    let (broken, total) = broken_on(&fates, &[1, 2]);
    if routing == Routing::Resilient {
        assert_eq!(broken, 0, "established flows broken by a join");
    }
    fingerprints_agree(lab, &[1, 2, 3]).expect("the third instance agrees");
    report.add("join: route to instance 3 after speaker start", ms(routed));
    report.add("join: first new flow on instance 3 after", ms(reached));
    report.add(
        "join: established flows broken (on 1, 2)",
        format!("{broken} of {total}"),
    );
}

// ---------------------------------------------------------------------------
// 3: crash.

/// (3) SIGKILL instance 1's lb-proxy (its ExaBGP's healthcheck then fails):
/// its flows end; new flows go to the survivors within the hold time. With the
/// resilient group the survivors' flows stay; multipath's count is reported.
fn crash(lab: &mut Lab, routing: Routing, report: &mut Report) {
    let talking = Talking::start(lab);
    let prober = Prober::start(lab);
    let killed = Instant::now();
    lab.signal("lb-proxy-1", libc::SIGKILL);
    lab.wait_paths(&[2, 3], bgp_hold_time());
    let withdrawn = killed.elapsed();
    let after = new_flows(lab);
    assert!(
        !after.contains_key(&1),
        "new flows on the crashed instance: {after:?}"
    );
    let probes = prober.stop();
    let failed: Vec<&Instant> = probes
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(at, _)| at)
        .collect();
    let last_failure = failed.last().map(|at| at.duration_since(killed));
    let fates = talking.stop();
    let (crashed_broken, crashed_total) = broken_on(&fates, &[1]);
    assert_eq!(
        crashed_broken, crashed_total,
        "flows on the crashed instance survived?"
    );
    let (survivors_broken, survivors_total) = broken_on(&fates, &[2, 3]);
    if routing == Routing::Resilient {
        assert_eq!(survivors_broken, 0, "the survivors' flows broke");
    }
    report.add("crash: route withdrawn after SIGKILL", ms(withdrawn));
    report.add(
        "crash: new flows failed (last one after)",
        format!(
            "{} of {} ({})",
            failed.len(),
            probes.len(),
            last_failure.map_or("none".to_owned(), ms)
        ),
    );
    report.add(
        "crash: flows on the crashed instance broken",
        format!("{crashed_broken} of {crashed_total}"),
    );
    report.add(
        "crash: survivors' flows broken (on 2, 3)",
        format!("{survivors_broken} of {survivors_total}"),
    );
}

// ---------------------------------------------------------------------------
// 4: graceful leave.

/// (4) SIGTERM instance 3's lb-proxy: the route is withdrawn before its
/// listener closes, no new flow fails and none arrives there after the
/// withdrawal; of its established flows, those that end at the SIGTERM finish
/// and those still talking when the route moves break.
fn graceful_leave(lab: &mut Lab, report: &mut Report) {
    let flows: Vec<Flow> = lab
        .on_client_threads(LONG_FLOWS, SPREAD_PARALLEL, Flow::open)
        .into_iter()
        .collect::<io::Result<_>>()
        .expect("every long-lived flow opens");
    let (ending, talking): (Vec<Flow>, Vec<Flow>) = split_ending(flows, 3);
    let talking = Talking::talk(talking);
    let prober = Prober::start(lab);
    let term = Instant::now();
    lab.signal("lb-proxy-3", libc::SIGTERM);
    let ending_total = ending.len();
    let finished = ending
        .into_iter()
        .map(|mut f| f.exchange().and_then(|_| f.finish()))
        .filter(Result::is_ok)
        .count();
    assert_eq!(
        finished, ending_total,
        "flows ending within withdraw_delay broke"
    );
    let (withdrawn, closed) = withdrawal_and_close(lab, 3, term);
    assert!(
        withdrawn < closed,
        "the listener closed ({closed:?}) before the route was withdrawn ({withdrawn:?})"
    );
    let after = new_flows(lab);
    assert!(
        !after.contains_key(&3),
        "new flows on the leaving instance: {after:?}"
    );
    let probes = prober.stop();
    let failed = probes.iter().filter(|(_, r)| r.is_err()).count();
    assert_eq!(failed, 0, "new flows failed during the graceful leave");
    let late_on_3 = probes
        .iter()
        .filter(|(at, r)| *at >= term + withdrawn && matches!(r, Ok(3)))
        .count();
    assert_eq!(
        late_on_3, 0,
        "new flows reached instance 3 after the withdrawal"
    );
    let fates = talking.stop();
    let (talking_broken, talking_total) = broken_on(&fates, &[3]);
    let (others_broken, others_total) = broken_on(&fates, &[2]);
    report.add("leave: route withdrawn after SIGTERM", ms(withdrawn));
    report.add("leave: listener closed after SIGTERM", ms(closed));
    report.add(
        "leave: new flows failed",
        format!("{failed} of {}", probes.len()),
    );
    report.add(
        "leave: its flows ending at SIGTERM finished",
        format!("{finished} of {ending_total}"),
    );
    report.add(
        "leave: its flows still talking broken",
        format!("{talking_broken} of {talking_total}"),
    );
    report.add(
        "leave: other instance's flows broken",
        format!("{others_broken} of {others_total}"),
    );
}

/// Splits `flows` into (every other flow on instance `i`: these end at the
/// SIGTERM, the rest: these keep talking).
fn split_ending(flows: Vec<Flow>, i: u8) -> (Vec<Flow>, Vec<Flow>) {
    let mut on_i = 0;
    flows.into_iter().partition(|f| {
        let ends = f.instance == i && on_i % 2 == 0;
        on_i += usize::from(f.instance == i);
        ends
    })
}

/// After the SIGTERM at `term`: when the router stopped routing to instance
/// `i`, and when its listener closed (a connect from inside its namespace
/// refused).
fn withdrawal_and_close(lab: &Lab, i: u8, term: Instant) -> (Duration, Duration) {
    let times = Mutex::new((None, None));
    wait_until(
        "the withdrawal and the listener's close",
        DAEMON_TIMEOUT,
        || {
            let mut t = times.lock().expect("times");
            if t.0.is_none() && !lab.vip_paths().contains(&i) {
                t.0 = Some(term.elapsed());
            }
            if t.1.is_none() && lab.listener_closed(i) {
                t.1 = Some(term.elapsed());
            }
            t.0.zip(t.1)
        },
    )
}

// ---------------------------------------------------------------------------
// 6: mismatch.

/// (6) An instance started with a different backend set shows a different
/// fingerprint, and the check catches it (and the instances then disagree on
/// some flows, which is why it matters).
#[test]
fn mismatched_backend_set_shows_a_different_fingerprint() {
    let mut lab = Lab::up();
    let config = bgp_config("lb-proxy.toml");
    let marker = "[[frontends.backends]]\nname = \"backend-3\"";
    let cut = config.find(marker).expect("lb-proxy.toml lists backend-3");
    let fewer = &config[..cut];
    lab.start_proxy(1, &config);
    lab.start_proxy(2, fewer);
    lab.start_proxy(3, &config);
    let same = fingerprints_agree(&lab, &[1, 3]).expect("identical configs agree");
    let err = fingerprints_agree(&lab, &[1, 2, 3]).expect_err("a different backend set is caught");
    assert!(err.contains(&same), "{err}");
    let (_, metrics) = lab.admin_get(1, "/metrics");
    let gauge = format!("lb_config_fingerprint{{fingerprint=\"{same}\"}} 1");
    assert!(metrics.contains(&gauge), "no `{gauge}` in /metrics");
    let ports: Vec<u16> = (20000..20200).collect();
    let (full, cut) = (
        lab.explain_backends(1, &ports),
        lab.explain_backends(2, &ports),
    );
    let differ = full.iter().zip(&cut).filter(|(a, b)| a != b).count();
    assert!(differ > 0, "the instances route every flow alike");
    println!(
        "\nmismatch: {err}; /explain differs on {differ} of {} flows",
        ports.len()
    );
}

// ---------------------------------------------------------------------------
// Cleanup.

/// A lab dropped by a panic leaves no namespace and no process behind.
#[test]
fn a_panicking_lab_leaves_no_namespace_or_process() {
    let (name, pids) = std::panic::catch_unwind(|| {
        let mut lab = Lab::up();
        lab.start_proxy(1, &bgp_config("lb-proxy.toml"));
        let seen = (lab.name().to_owned(), lab.pids());
        std::panic::panic_any(seen)
    })
    .expect_err("the lab panicked")
    .downcast::<(String, Vec<u32>)>()
    .map(|b| *b)
    .expect("the panic carries the lab's name and pids");
    let prefix = format!("{name}-");
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for pid in pids {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(!alive, "process {pid} left behind");
    }
}
