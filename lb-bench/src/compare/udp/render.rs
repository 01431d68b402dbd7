//! What a reader sees of `compare --proto udp`: the medians table, the
//! generator check, the bar (lb-proxy against nginx at every size)
//! and the Markdown page (compare-udp.md).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::peers::UdpStatus;
use super::{UdpFrontend, UdpSample};
use crate::compare::options::CompareOptions;
use crate::compare::results::fmt_num;
use crate::load::udp::DEFAULT_SOURCES;
use crate::stats;

/// One row of the medians table: a value per front end, in [`UdpFrontend::ALL`] order.
#[derive(Clone, Debug, Serialize)]
pub struct UdpRow {
    pub metric: String,
    pub values: Vec<Option<f64>>,
}

impl UdpRow {
    fn get(&self, fe: UdpFrontend) -> Option<f64> {
        let i = UdpFrontend::ALL.iter().position(|f| *f == fe)?;
        self.values.get(i).copied().flatten()
    }
}

/// The samples of one front end at one size.
fn of(samples: &[UdpSample], fe: UdpFrontend, size: usize) -> impl Iterator<Item = &UdpSample> {
    samples
        .iter()
        .filter(move |s| s.frontend == fe && s.size == size)
}

fn median(
    samples: &[UdpSample],
    fe: UdpFrontend,
    size: usize,
    f: fn(&UdpSample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = of(samples, fe, size).filter_map(f).collect();
    stats::median(&v)
}

/// Loss over every round: datagrams never echoed over datagrams sent, in percent.
fn loss_percent(samples: &[UdpSample], fe: UdpFrontend, size: usize) -> Option<f64> {
    let (lost, sent) =
        of(samples, fe, size).fold((0u64, 0u64), |(l, s), x| (l + x.load.lost, s + x.load.sent));
    (sent > 0).then(|| lost as f64 * 100.0 / sent as f64)
}

fn rate(s: &UdpSample) -> Option<f64> {
    Some(s.load.echoed_per_sec)
}

fn cpu(s: &UdpSample) -> Option<f64> {
    s.cpu_us
}

/// Per size: datagrams/s, loss, RTT p50 and p99, proxy CPU per datagram.
pub(crate) fn rows(samples: &[UdpSample], sizes: &[usize]) -> Vec<UdpRow> {
    let mut rows = Vec::new();
    for &size in sizes {
        let row = |metric: String, f: &dyn Fn(UdpFrontend) -> Option<f64>| UdpRow {
            metric,
            values: UdpFrontend::ALL.iter().map(|&fe| f(fe)).collect(),
        };
        rows.push(row(format!("datagrams/s, {size} B"), &|fe| {
            median(samples, fe, size, rate)
        }));
        rows.push(row(format!("loss %, {size} B"), &|fe| {
            loss_percent(samples, fe, size)
        }));
        rows.push(row(format!("RTT p50 µs, {size} B"), &|fe| {
            median(samples, fe, size, |s| Some(s.load.rtt_p50_us))
        }));
        rows.push(row(format!("RTT p99 µs, {size} B"), &|fe| {
            median(samples, fe, size, |s| Some(s.load.rtt_p99_us))
        }));
        rows.push(row(format!("proxy CPU µs per datagram, {size} B"), &|fe| {
            median(samples, fe, size, cpu)
        }));
    }
    rows
}

/// The fastest proxied front end at `size`: its rate and label.
fn fastest_proxy(samples: &[UdpSample], size: usize) -> Option<(f64, &'static str)> {
    UdpFrontend::ALL
        .iter()
        .filter(|fe| **fe != UdpFrontend::Direct)
        .filter_map(|&fe| median(samples, fe, size, rate).map(|r| (r, fe.label())))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// How far the generator's own capacity must exceed the fastest proxied
/// rate for it to be ruled out as the limit.
const CAPACITY_MARGIN: f64 = 1.5;

/// Whether the generator kept up, per size: what it drove direct to one
/// echo backend against the fastest proxied rate, and its own CPU per datagram.
pub(crate) fn generator_check(samples: &[UdpSample], sizes: &[usize]) -> Vec<String> {
    let mut lines = Vec::new();
    for &size in sizes {
        let direct = median(samples, UdpFrontend::Direct, size, rate);
        let own = median(samples, UdpFrontend::Direct, size, |s| {
            s.load.generator_cpu_us_per_echo()
        });
        let busy = median(samples, UdpFrontend::Direct, size, |s| {
            Some(s.load.generator_busy())
        });
        let (Some(direct), Some(own), Some(busy)) = (direct, own, busy) else {
            lines.push(format!(
                "generator check, {size} B: no direct-to-backend measurement"
            ));
            continue;
        };
        let mut line = format!(
            "generator check, {size} B: direct to one echo backend {direct:.0} datagrams/s; the generator's own CPU {own:.2} µs per datagram (busy {:.0}% of its thread's time), so one generator thread can drive about {:.0}/s",
            busy * 100.0,
            1e6 / own
        );
        if let Some((p, label)) = fastest_proxy(samples, size) {
            // The generator keeps up when it out-drove the proxies direct, or
            // when its own CPU per datagram leaves it well clear of their rate.
            let ok = direct > p || 1e6 / own > CAPACITY_MARGIN * p;
            let _ = write!(
                line,
                "; the fastest proxied rate was {p:.0}/s ({label}), direct/that = {:.2}: {}",
                direct / p,
                if ok {
                    "the generator is not the bottleneck"
                } else {
                    "the generator MAY be the bottleneck (try --udp-threads 2)"
                }
            );
        }
        lines.push(line);
    }
    lines
}

/// "by how much": `a` against `b` as a signed percentage.
fn pct(a: f64, b: f64) -> f64 {
    (a / b - 1.0) * 100.0
}

/// The bar at each size: lb-proxy's datagrams/s at least nginx's,
/// and its CPU per datagram no more than nginx's.
pub(crate) fn bar(samples: &[UdpSample], sizes: &[usize], statuses: &[UdpStatus]) -> Vec<String> {
    let nginx_ok = statuses
        .iter()
        .any(|s| s.frontend == UdpFrontend::Nginx && s.status == "ok");
    if !nginx_ok {
        return vec!["bar: not judged, nginx stream udp did not run (see Front ends)".into()];
    }
    let mut lines = Vec::new();
    for &size in sizes {
        let get = |fe, f| median(samples, fe, size, f);
        let (lr, nr) = (
            get(UdpFrontend::LbProxy, rate),
            get(UdpFrontend::Nginx, rate),
        );
        let (lc, nc) = (get(UdpFrontend::LbProxy, cpu), get(UdpFrontend::Nginx, cpu));
        let rate_part = match (lr, nr) {
            (Some(l), Some(n)) if l >= n => format!(
                "datagrams/s {l:.0} vs nginx {n:.0} ({:+.1}%): met",
                pct(l, n)
            ),
            (Some(l), Some(n)) => format!(
                "datagrams/s {l:.0} vs nginx {n:.0}: MISSED by {:.1}%",
                -pct(l, n)
            ),
            _ => "datagrams/s: not measured".into(),
        };
        let cpu_part = match (lc, nc) {
            (Some(l), Some(n)) if l <= n => format!(
                "CPU {l:.2} vs {n:.2} µs per datagram ({:+.1}%): met",
                pct(l, n)
            ),
            (Some(l), Some(n)) => format!(
                "CPU {l:.2} vs {n:.2} µs per datagram: MISSED by {:.1}%",
                pct(l, n)
            ),
            _ => "CPU per datagram: not measured".into(),
        };
        lines.push(format!("bar, {size} B: lb-proxy {rate_part}; {cpu_part}"));
    }
    lines
}

/// The load each measurement ran, in words.
pub(crate) fn load_line(opts: &CompareOptions, grace: Duration) -> String {
    format!(
        "lb-bench's UDP generator (built in): {} flows, each a connected socket on its own address of {DEFAULT_SOURCES}, a window of {} datagrams in flight per flow (closed loop), {} generator thread(s) with recvmmsg/sendmmsg, {:?} per measurement plus {:?} for late echoes; payload sizes {:?} B",
        opts.udp.flows, opts.udp.window, opts.udp.threads, opts.duration, grace, opts.udp.sizes
    )
}

/// compare-udp.md.
pub(crate) fn markdown(res: &super::UdpCompareResult, opts: &CompareOptions) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Medians of {} interleaved round(s) (loss: over all rounds); {} worker(s) per proxy (lb-proxy `workers`, nginx `worker_processes`); {} flows, a window of {} per flow, {:?} per measurement. Proxy CPU is utime + stime from /proc per echoed datagram, which crossed the proxy once each way.\n",
        opts.rounds, opts.workers, opts.udp.flows, opts.udp.window, opts.duration
    );
    table(&mut o, res);
    let _ = writeln!(o);
    let counts = res.proxy_counts.iter().map(ToString::to_string);
    for l in res
        .generator_check
        .iter()
        .chain(&res.bar)
        .cloned()
        .chain(counts)
    {
        let _ = writeln!(o, "- {l}");
    }
    let _ = writeln!(o, "\nFront ends:\n");
    for s in &res.frontends {
        let _ = writeln!(o, "- **{}**: {} — {}", s.label, s.status, s.detail);
    }
    let _ = writeln!(o, "\nBackends: {}.\n\nLoad: {}.", res.backends, res.load);
    let errs = res
        .samples
        .iter()
        .filter(|s| s.load.corrupt > 0 || s.load.send_errors > 0)
        .map(|s| {
            format!(
                "round {}, {}, {} B: {} corrupt replies, {} send errors",
                s.round,
                s.frontend.label(),
                s.size,
                s.load.corrupt,
                s.load.send_errors
            )
        });
    let problems: Vec<String> = errs.chain(res.problems.iter().cloned()).collect();
    if !problems.is_empty() {
        let _ = writeln!(o, "\nProblems:\n");
        for p in problems {
            let _ = writeln!(o, "- {p}");
        }
    }
    let _ = writeln!(o, "\nUDP compare run time: {:.1} s.", res.elapsed_secs);
    o
}

/// The medians table with lb-proxy's ratios to nginx and to its unbatched self.
fn table(o: &mut String, res: &super::UdpCompareResult) {
    let _ = write!(o, "| metric |");
    for fe in UdpFrontend::ALL {
        let _ = write!(o, " {} |", fe.label());
    }
    let _ = writeln!(o, " lb-proxy / nginx | lb-proxy / udp_batch = 1 |");
    let _ = writeln!(
        o,
        "|---|{}---:|---:|",
        "---:|".repeat(UdpFrontend::ALL.len())
    );
    for row in &res.rows {
        let _ = write!(o, "| {} |", row.metric);
        for fe in UdpFrontend::ALL {
            let status = res
                .frontends
                .iter()
                .find(|s| s.frontend == fe)
                .map_or("-", |s| s.status);
            let cell = if status == "ok" {
                fmt_num(row.get(fe))
            } else {
                status.to_owned()
            };
            let _ = write!(o, " {cell} |");
        }
        let ratio = |other: UdpFrontend| match (row.get(UdpFrontend::LbProxy), row.get(other)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            " {} | {} |",
            ratio(UdpFrontend::Nginx),
            ratio(UdpFrontend::LbProxyUnbatched)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::udp::UdpLoadReport;

    fn sample(
        fe: UdpFrontend,
        size: usize,
        rate: f64,
        cpu: Option<f64>,
        sent: u64,
        lost: u64,
    ) -> UdpSample {
        UdpSample {
            round: 1,
            frontend: fe,
            size,
            load: UdpLoadReport {
                target: "127.0.0.1:1".parse().unwrap(),
                flows: 50,
                size,
                window: 4,
                threads: 1,
                duration_secs: 1.0,
                sent,
                echoed: sent - lost,
                lost,
                corrupt: 0,
                stalls: 0,
                send_errors: 0,
                echoed_per_sec: rate,
                loss_ratio: lost as f64 / sent as f64,
                rtt_p50_us: 100.0,
                rtt_p99_us: 300.0,
                flow_echoed_min: 1,
                flow_echoed_max: 2,
                generator_cpu_secs: (sent - lost) as f64 * 2e-6,
            },
            cpu_us: cpu,
        }
    }

    fn ok(fe: UdpFrontend) -> UdpStatus {
        UdpStatus {
            frontend: fe,
            label: fe.label(),
            status: "ok",
            detail: String::new(),
        }
    }

    #[test]
    fn the_bar_says_met_or_by_how_much_it_missed() {
        let samples = vec![
            sample(UdpFrontend::LbProxy, 64, 110_000.0, Some(4.0), 1000, 0),
            sample(UdpFrontend::Nginx, 64, 100_000.0, Some(5.0), 1000, 0),
            sample(UdpFrontend::LbProxy, 1200, 80_000.0, Some(6.0), 1000, 0),
            sample(UdpFrontend::Nginx, 1200, 100_000.0, Some(5.0), 1000, 0),
        ];
        let st = [ok(UdpFrontend::LbProxy), ok(UdpFrontend::Nginx)];
        let b = bar(&samples, &[64, 1200], &st);
        assert!(
            b[0].contains("(+10.0%): met") && b[0].contains("(-20.0%): met"),
            "{b:?}"
        );
        assert!(
            b[1].contains("MISSED by 20.0%") && b[1].contains("MISSED by 20.0%"),
            "{b:?}"
        );
        let no_nginx = bar(&samples, &[64], &st[..1]);
        assert!(no_nginx[0].contains("not judged"), "{no_nginx:?}");
    }

    #[test]
    fn loss_sums_over_rounds_and_rates_are_medians() {
        let samples = vec![
            sample(UdpFrontend::Nginx, 64, 10.0, None, 1000, 10),
            sample(UdpFrontend::Nginx, 64, 30.0, None, 3000, 0),
            sample(UdpFrontend::Nginx, 64, 20.0, None, 1000, 0),
        ];
        let r = rows(&samples, &[64]);
        assert_eq!(r[0].get(UdpFrontend::Nginx), Some(20.0));
        assert_eq!(r[1].get(UdpFrontend::Nginx), Some(0.2));
        assert_eq!(r[0].get(UdpFrontend::LbProxy), None);
    }

    #[test]
    fn the_generator_check_compares_direct_with_the_fastest_proxy() {
        let samples = vec![
            sample(UdpFrontend::Direct, 64, 200_000.0, None, 1000, 0),
            sample(UdpFrontend::LbProxy, 64, 90_000.0, Some(4.0), 1000, 0),
            sample(UdpFrontend::Nginx, 64, 100_000.0, Some(5.0), 1000, 0),
        ];
        let g = generator_check(&samples, &[64, 1200]);
        assert!(
            g[0].contains("direct/that = 2.00") && g[0].contains("not the bottleneck"),
            "{g:?}"
        );
        assert!(g[0].contains("(nginx stream udp)"), "{g:?}");
        assert!(g[1].contains("no direct-to-backend measurement"), "{g:?}");
    }
}
