//! Scale-out end to end (issue 15): lb-proxy instances announced over BGP by
//! ExaBGP to BIRD in a router namespace, ECMP over them, in network namespaces
//! built from the shipped `config/bgp/` files (see tests/src/netns.rs).
//!
//! Each routing variant (BIRD's multipath route; a resilient nexthop group)
//! runs one sequence on one lab, each step a named function asserting one of
//! the points: spread (1) and agreement (2) over two instances, join
//! (5) of a third, crash (3) of the first, then the first restarted and a
//! graceful leave (4) of the third (3 -> 2, so it can move the others' flows),
//! and last a silent crash (3) of the second (its ExaBGP frozen: the BGP hold
//! time bounds it).
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
    bgp_config, bgp_hold_time, enter_netns, netns_list, shell_value, Flow, Lab, Routing,
    DAEMON_TIMEOUT,
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
/// idle_timer (resilient-sync.sh; checked in [`scale_out`]), so its bucket
/// never counts as idle.
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
    let idle_timer: f64 = shell_value("resilient-sync.sh", "IDLE_TIMER")
        .parse()
        .expect("resilient-sync.sh IDLE_TIMER is seconds");
    assert!(
        TICK.as_secs_f64() * 4.0 <= idle_timer,
        "long-lived flows must talk well within idle_timer ({idle_timer} s)"
    );
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
    rejoin(&mut lab, &config, &mut report);
    graceful_leave(&mut lab, routing, &mut report);
    silent_crash(&mut lab, &mut report);
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
/// Dropping it unstopped (a failed assertion) stops the thread too.
struct Talking {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<Fate>>>,
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
            handle: Some(handle),
        }
    }

    /// Waits for two more full rounds (every flow has exchanged since the
    /// caller's change was in place), then stops and returns the fates.
    fn stop(mut self) -> Vec<Fate> {
        let seen = self.rounds.load(Ordering::Relaxed);
        wait_until(
            "two more rounds of exchanges",
            Duration::from_secs(20),
            || (self.rounds.load(Ordering::Relaxed) >= seen + 2).then_some(()),
        );
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("stopped once");
        handle.join().expect("talking thread")
    }
}

impl Drop for Talking {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

/// New short flows opened one after another during a change, each recorded
/// as a [`Probe`]. Dropping it unstopped (a failed assertion) stops the thread.
struct Prober {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Probe>>>,
}

/// One short flow of the prober: when it started and ended, and the instance
/// it completed on (or the error).
struct Probe {
    start: Instant,
    end: Instant,
    result: io::Result<u8>,
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
                let start = Instant::now();
                let result = Flow::open().and_then(|f| {
                    let i = f.instance;
                    f.finish().map(|()| i)
                });
                let end = Instant::now();
                seen.push(Probe { start, end, result });
                std::thread::sleep(PROBE_EVERY);
            }
            seen
        });
        Prober {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("stopped once");
        handle.join().expect("prober thread")
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
        .filter(|p| p.result.is_err())
        .map(|p| &p.start)
        .collect();
    let last_failure = failed.last().map(|at| at.duration_since(killed));
    let fates = talking.stop();
    let (crashed_broken, crashed_total) = broken_on(&fates, &[1]);
    assert!(crashed_total > 0, "no long-lived flow was on instance 1");
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

/// Brings crashed instance 1 back (its ExaBGP kept running and announces
/// again once /ready answers 200), so the leave goes 3 -> 2 and a survivor's
/// flow can be moved by it.
fn rejoin(lab: &mut Lab, config: &str, report: &mut Report) {
    let start = Instant::now();
    lab.start_proxy(1, config);
    lab.wait_paths(&[1, 2, 3], DAEMON_TIMEOUT);
    fingerprints_agree(lab, &[1, 2, 3]).expect("the restarted instance agrees");
    report.add(
        "rejoin: route to restarted instance 1 after",
        ms(start.elapsed()),
    );
}

/// (4) SIGTERM instance 3's lb-proxy (1, 2 and 3 up): the route is withdrawn
/// before its listener closes, no new flow is refused and none that starts
/// after the withdrawal fails or arrives there; of its established flows,
/// those that end right after the SIGTERM finish unless the route moved
/// first, and those still talking when the route moves break. With the
/// resilient group the other instances' flows stay; multipath's count is
/// reported.
fn graceful_leave(lab: &mut Lab, routing: Routing, report: &mut Report) {
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
    let ending = finish_in_parallel(ending);
    let change = withdrawal_and_close(lab, 3, term);
    assert!(
        change.withdrawn < change.closed,
        "the listener closed ({:?}) before the route was withdrawn ({:?})",
        change.closed,
        change.withdrawn
    );
    let after = new_flows(lab);
    assert!(
        !after.contains_key(&3),
        "new flows on the leaving instance: {after:?}"
    );
    let probes = prober.stop();
    let fates = talking.stop();
    let ended = ending_fates(&ending, &change);
    let probed = probe_fates(&probes, &change);
    let (talking_broken, talking_total) = broken_on(&fates, &[3]);
    let (others_broken, others_total) = broken_on(&fates, &[1, 2]);
    assert!(
        talking_total > 0 && others_total > 0,
        "no long-lived flow on 3 or on 1, 2"
    );
    if routing == Routing::Resilient {
        assert_eq!(others_broken, 0, "the other instances' flows broke");
    }
    report.add("leave: route withdrawn after SIGTERM", ms(change.withdrawn));
    report.add("leave: listener closed after SIGTERM", ms(change.closed));
    report.add(
        "leave: new flows failed / caught mid-change",
        format!(
            "0 of {} / {} of {}",
            probes.len(),
            probed.mid_change,
            probes.len()
        ),
    );
    report.add(
        "leave: its flows ending at SIGTERM finished",
        format!(
            "{} of {} ({} cut by the route change)",
            ended.finished, ended.total, ended.cut
        ),
    );
    report.add(
        "leave: its flows still talking broken",
        format!("{talking_broken} of {talking_total}"),
    );
    report.add(
        "leave: other instances' flows broken (1, 2)",
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

/// Exchanges once more on each flow and ends it, all at once (so they race
/// the route change as little as they can): when each ended, and whether it
/// finished.
fn finish_in_parallel(flows: Vec<Flow>) -> Vec<(Instant, io::Result<()>)> {
    std::thread::scope(|s| {
        let ends: Vec<_> = flows
            .into_iter()
            .map(|mut f| {
                s.spawn(move || {
                    let done = f.exchange().and_then(|_| f.finish());
                    (Instant::now(), done)
                })
            })
            .collect();
        ends.into_iter()
            .map(|e| e.join().expect("finishing flow"))
            .collect()
    })
}

/// How a leave's route change and listener close went, each measured from
/// the SIGTERM at `term`.
struct Change {
    term: Instant,
    /// The last poll that still saw the route to the instance: anything that
    /// broke before this broke while the route was in place.
    last_routed: Duration,
    /// The first poll that saw the route gone: anything that started after
    /// this went through the changed route.
    withdrawn: Duration,
    /// The first poll that saw the listener refuse.
    closed: Duration,
}

/// After the SIGTERM at `term`: when the router stopped routing to instance
/// `i`, and when its listener closed (a connect from inside its namespace
/// refused).
fn withdrawal_and_close(lab: &Lab, i: u8, term: Instant) -> Change {
    let times = Mutex::new((Duration::ZERO, None, None));
    let (last_routed, withdrawn, closed) = wait_until(
        "the withdrawal and the listener's close",
        DAEMON_TIMEOUT,
        || {
            let mut t = times.lock().expect("times");
            if t.1.is_none() {
                let polled = term.elapsed();
                if lab.vip_paths().contains(&i) {
                    t.0 = polled;
                } else {
                    t.1 = Some(term.elapsed());
                }
            }
            if t.2.is_none() && lab.listener_closed(i) {
                t.2 = Some(term.elapsed());
            }
            Some(t.0).zip(t.1).zip(t.2).map(|((a, b), c)| (a, b, c))
        },
    );
    Change {
        term,
        last_routed,
        withdrawn,
        closed,
    }
}

/// The leave's flows that ended at the SIGTERM: how many finished, and how
/// many broke once the route may have moved. One that broke while the route
/// was still in place fails the test.
struct Ended {
    total: usize,
    finished: usize,
    cut: usize,
}

fn ending_fates(ending: &[(Instant, io::Result<()>)], change: &Change) -> Ended {
    let routed_until = change.term + change.last_routed;
    let mut ended = Ended {
        total: ending.len(),
        finished: 0,
        cut: 0,
    };
    for (at, done) in ending {
        match done {
            Ok(()) => ended.finished += 1,
            Err(_) if *at > routed_until => ended.cut += 1,
            Err(e) => panic!(
                "a flow ending at the SIGTERM broke {:?} after it, while still routed ({e})",
                at.duration_since(change.term)
            ),
        }
    }
    assert!(ended.total > 0, "no long-lived flow was on instance 3");
    ended
}

/// The leave's probes: none refused (the listener closed while still
/// routed), none that started after the withdrawal failed or reached the
/// leaving instance (3), and a failure only in one that was in flight when
/// the route may have moved (counted as caught mid-change).
struct Probed {
    mid_change: usize,
}

fn probe_fates(probes: &[Probe], change: &Change) -> Probed {
    let routed_until = change.term + change.last_routed;
    let withdrawn = change.term + change.withdrawn;
    let mut mid_change = 0;
    for p in probes {
        let when = p.start.saturating_duration_since(change.term);
        match &p.result {
            Ok(3) => assert!(
                p.start < withdrawn,
                "a flow started {when:?} after the SIGTERM reached instance 3"
            ),
            Ok(_) => {}
            Err(e) => {
                assert_ne!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused,
                    "a flow started {when:?} after the SIGTERM was refused"
                );
                assert!(
                    p.start < withdrawn && p.end > routed_until,
                    "a flow started {when:?} after the SIGTERM failed outside the route change: {e}"
                );
                mid_change += 1;
            }
        }
    }
    Probed { mid_change }
}

// ---------------------------------------------------------------------------
// 3, silent: the whole instance stops answering.

/// How long past the hold time the router may take to drop a silent peer's
/// route (BIRD's timer tick, the kernel update, resilient-sync's interval).
const HOLD_MARGIN: Duration = Duration::from_secs(2);

/// (3) Instance 2 goes silent: its ExaBGP frozen (SIGSTOP: no keepalive, no
/// withdrawal) and its lb-proxy killed, as when a host is lost. The route
/// must go within the BGP hold time plus [`HOLD_MARGIN`], and new flows then
/// reach only instance 1. (It can go sooner: the last keepalive came up to a
/// keepalive interval before the freeze, and BIRD shortens its timers by up
/// to a quarter, as RFC 4271 section 10 allows.)
fn silent_crash(lab: &mut Lab, report: &mut Report) {
    let hold = bgp_hold_time();
    lab.signal("exabgp-2", libc::SIGSTOP);
    let stopped = Instant::now();
    lab.signal("lb-proxy-2", libc::SIGKILL);
    lab.wait_paths(&[1], hold + HOLD_MARGIN);
    let withdrawn = stopped.elapsed();
    let after = new_flows(lab);
    assert_eq!(
        after.keys().copied().collect::<Vec<u8>>(),
        vec![1],
        "new flows after the silent crash: {after:?}"
    );
    report.add(
        &format!("silent crash: route gone (hold time {} s)", hold.as_secs()),
        ms(withdrawn),
    );
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

/// A lab left by a killed test process (its pid gone) is removed by the next
/// `Lab::up`; a live process's lab is not.
#[test]
fn a_dead_processs_lab_is_removed_by_the_next() {
    let lab_sh = lb_tests::netns::bgp_config_dir().join("lab.sh");
    // A pid no process has: above the kernel's pid_max ceiling (2^22).
    let dead = "lbt4194305-0";
    let up = {
        // No other test's sweep may remove it while it is being built.
        let _building = lb_tests::netns::LAB_SWEEP
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::process::Command::new("sh")
            .arg(&lab_sh)
            .args(["up", dead])
            .output()
            .expect("lab.sh up")
    };
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let live = Lab::up();
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{dead}-")))
        .collect();
    assert!(
        left.is_empty(),
        "a dead process's namespaces stayed: {left:?}"
    );
    let ours = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", live.name())))
        .count();
    assert!(ours > 0, "the live lab's namespaces were removed");
}
