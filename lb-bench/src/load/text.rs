//! The text report: hey's layout (summary, response time histogram, latency
//! distribution, details, status codes, errors), plus p99.9, the per-backend
//! table and, when asked, the backends each source address was served by.
//! Depends on the report types only, never on the runner.

use std::fmt::Write;

use super::report::{Distribution, LoadReport};
use crate::stats::ChiSquare;

fn secs(ms: f64) -> f64 {
    ms / 1000.0
}

/// hey's text layout, plus p99.9, the per-backend table and, when asked, the
/// backends each source address was served by.
pub fn render_text(r: &LoadReport, per_source: bool) -> String {
    let mut o = String::new();
    summary(&mut o, r);
    if r.responses > 0 {
        histogram(&mut o, r);
        latency_distribution(&mut o, r);
        details(&mut o, r);
    }
    outcomes(&mut o, r);
    errors(&mut o, r);
    if let Some(d) = &r.distribution {
        backends(&mut o, d);
    }
    if per_source {
        sources(&mut o, r);
    }
    o
}

fn summary(o: &mut String, r: &LoadReport) {
    let l = &r.latency;
    let _ = writeln!(o, "\nSummary:");
    let _ = writeln!(o, "  Total:\t{:.4} secs", r.total_secs);
    let _ = writeln!(o, "  Slowest:\t{:.4} secs", secs(l.slowest_ms));
    let _ = writeln!(o, "  Fastest:\t{:.4} secs", secs(l.fastest_ms));
    let _ = writeln!(o, "  Average:\t{:.4} secs", secs(l.mean_ms));
    let _ = writeln!(o, "  Requests/sec:\t{:.4}", r.requests_per_sec);
    let _ = writeln!(o, "  ");
    let _ = writeln!(o, "  Total data:\t{} bytes", r.bytes);
    if let Some(size) = r.bytes.checked_div(r.responses) {
        let _ = writeln!(o, "  Size/request:\t{size} bytes");
    }
}

fn histogram(o: &mut String, r: &LoadReport) {
    let h = &r.latency.histogram;
    let _ = writeln!(o, "\nResponse time histogram:");
    let max = h.iter().map(|b| b.1).max().unwrap_or(1).max(1);
    for (mark, count) in h {
        let bar = "■".repeat((count * 40 / max) as usize);
        let _ = writeln!(o, "  {:.3} [{count}]\t|{bar}", secs(*mark));
    }
}

fn latency_distribution(o: &mut String, r: &LoadReport) {
    let l = &r.latency;
    let _ = writeln!(o, "\n\nLatency distribution:");
    for (p, v) in [
        ("10%", l.p10_ms),
        ("25%", l.p25_ms),
        ("50%", l.p50_ms),
        ("75%", l.p75_ms),
        ("90%", l.p90_ms),
        ("95%", l.p95_ms),
        ("99%", l.p99_ms),
        ("99.9%", l.p999_ms),
    ] {
        let _ = writeln!(o, "  {p} in {:.4} secs", secs(v));
    }
}

fn details(o: &mut String, r: &LoadReport) {
    let _ = writeln!(o, "\nDetails (average, fastest, slowest):");
    let _ = writeln!(
        o,
        "  DNS+dialup:\t{:.4} secs, {:.4} secs, {:.4} secs",
        secs(r.dial_ms[0]),
        secs(r.dial_ms[1]),
        secs(r.dial_ms[2])
    );
    let _ = writeln!(o, "  Connections:\t{}", r.connections);
}

/// HTTP: the status codes; TCP: the round trips.
fn outcomes(o: &mut String, r: &LoadReport) {
    if r.protocol == "http" {
        let _ = writeln!(o, "\nStatus code distribution:");
        for (code, n) in &r.status {
            let _ = writeln!(o, "  [{code}]\t{n} responses");
        }
    } else {
        let _ = writeln!(o, "\nEchoes:\n  {} round trips", r.responses);
    }
}

fn errors(o: &mut String, r: &LoadReport) {
    if r.errors.is_empty() {
        return;
    }
    let _ = writeln!(o, "\nError distribution:");
    for (kind, n) in &r.errors {
        let _ = writeln!(o, "  [{n}]\t{kind}");
    }
}

fn backends(o: &mut String, d: &Distribution) {
    let _ = writeln!(o, "\nBackend distribution ({}):", d.source);
    let width = d
        .backends
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4)
        .max(7);
    let _ = writeln!(
        o,
        "  {:<width$}  {:>9}  {:>7}  {:>7}  {:>8}",
        "backend", "responses", "share", "flows", "expected"
    );
    for b in &d.backends {
        let _ = writeln!(
            o,
            "  {:<width$}  {:>9}  {:>6.1}%  {:>7}  {:>7.1}%",
            b.name,
            b.responses,
            b.share * 100.0,
            b.flows,
            b.expected_share * 100.0
        );
    }
    if d.unnamed > 0 {
        let _ = writeln!(o, "  ({} responses named no backend)", d.unnamed);
    }
    fits(o, d);
}

fn fit(c: &Option<ChiSquare>) -> String {
    match c {
        Some(c) => format!(
            "chi-square {:.2} (df {}), p-value {:.4}",
            c.statistic, c.df, c.p_value
        ),
        None => "chi-square n/a (fewer than two expected backends)".into(),
    }
}

/// How well responses and flows fit the expected shares.
fn fits(o: &mut String, d: &Distribution) {
    let _ = writeln!(
        o,
        "  responses: max/mean {:.3}, {}",
        d.max_mean,
        fit(&d.chi_square)
    );
    let _ = writeln!(
        o,
        "  flows:     {} (with keep-alive the balancer spreads flows, not requests)",
        fit(&d.chi_square_flows)
    );
    let _ = writeln!(o, "  expected shares: {}", d.expected_from);
}

fn sources(o: &mut String, r: &LoadReport) {
    let Some(ps) = &r.per_source else {
        return;
    };
    let _ = writeln!(o, "\nBackends by source address:");
    for (ip, m) in ps {
        let list: Vec<String> = m.iter().map(|(n, c)| format!("{n} ({c})")).collect();
        let _ = writeln!(o, "  {ip:<15}  {}", list.join(", "));
    }
    let single = ps.values().filter(|m| m.len() == 1).count();
    let _ = writeln!(
        o,
        "  {single} of {} source addresses were served by exactly one backend",
        ps.len()
    );
}
