//! The merged tally turned into a [`LoadReport`]: latency quantiles and
//! hey's histogram, dial times, the per-backend distribution against the
//! expected shares (max/mean, chi-square over responses and over flows),
//! backends per source address, and the recorded flows in time order.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::report::{BackendRow, Distribution, Latency, LoadReport};
use super::spec::LoadSpec;
use super::tally::{new_histogram, WorkerStats};
use crate::net::Target;
use crate::stats;

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The report of a run of `spec` that took `elapsed`, from its merged tally.
pub(super) fn finish(spec: &LoadSpec, mut total: WorkerStats, elapsed: Duration) -> LoadReport {
    let hist = total.hist.take().unwrap_or_else(new_histogram);
    let responses = hist.len();
    let dial_ms = dial_ms(&total);
    let names = by_name(&total.nodes);
    let flow_names = by_name(&total.node_flows);
    let distribution =
        (!names.is_empty()).then(|| distribution(spec, &names, &flow_names, total.unnamed));
    let per_source = spec.per_source.then(|| per_source(&total.per_source));
    let mut flows = total.flows;
    flows.retain(|f| f.requests > 0);
    flows.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    LoadReport {
        tool: "lb-bench",
        target: spec.target.to_string(),
        protocol: match spec.target {
            Target::Http { .. } => "http",
            Target::Tcp { .. } => "tcp",
        },
        keepalive: spec.keepalive,
        concurrency: spec.concurrency,
        sources: spec.sources.map(|s| s.to_string()),
        total_secs: elapsed.as_secs_f64(),
        responses,
        requests_per_sec: responses as f64 / elapsed.as_secs_f64().max(1e-9),
        bytes: total.bytes,
        connections: total.connections,
        latency: latency(&hist),
        dial_ms,
        errors_total: total.errors.values().sum(),
        status: total.status,
        errors: total.errors,
        distribution,
        per_source,
        flows,
    }
}

/// Mean, fastest and slowest connect time in ms.
fn dial_ms(t: &WorkerStats) -> [f64; 3] {
    if t.connections == 0 {
        return [0.0; 3];
    }
    [
        ms(t.dial_us_sum) / t.connections as f64,
        ms(t.dial_us_min),
        ms(t.dial_us_max),
    ]
}

fn latency(hist: &Histogram<u64>) -> Latency {
    if hist.is_empty() {
        return Latency::default();
    }
    let q = |p: f64| ms(hist.value_at_quantile(p));
    Latency {
        fastest_ms: ms(hist.min()),
        slowest_ms: ms(hist.max()),
        mean_ms: hist.mean() / 1000.0,
        p10_ms: q(0.10),
        p25_ms: q(0.25),
        p50_ms: q(0.50),
        p75_ms: q(0.75),
        p90_ms: q(0.90),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        histogram: hey_histogram(hist),
    }
}

/// hey's response time histogram: 11 marks evenly from the fastest to the
/// slowest (in ms), each counting the responses above the previous mark.
fn hey_histogram(hist: &Histogram<u64>) -> Vec<(f64, u64)> {
    let (fastest, slowest) = (hist.min(), hist.max());
    let mut buckets: Vec<(f64, u64)> = (0..=10)
        .map(|i| {
            let mark = fastest as f64 + (slowest - fastest) as f64 * f64::from(i) / 10.0;
            (mark / 1000.0, 0)
        })
        .collect();
    for v in hist.iter_recorded() {
        let value = v.value_iterated_to() as f64 / 1000.0;
        let i = buckets
            .iter()
            .position(|(mark, _)| value <= *mark)
            .unwrap_or(buckets.len() - 1);
        buckets[i].1 += v.count_at_value();
    }
    buckets
}

fn by_name(m: &BTreeMap<Vec<u8>, u64>) -> BTreeMap<String, u64> {
    m.iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
        .collect()
}

fn per_source(
    m: &BTreeMap<IpAddr, BTreeMap<Vec<u8>, u64>>,
) -> BTreeMap<IpAddr, BTreeMap<String, u64>> {
    m.iter().map(|(ip, names)| (*ip, by_name(names))).collect()
}

fn distribution(
    spec: &LoadSpec,
    names: &BTreeMap<String, u64>,
    flow_names: &BTreeMap<String, u64>,
    unnamed: u64,
) -> Distribution {
    let (expected, expected_from) = expected_shares(spec, names);
    let rows = backend_rows(&expected, names, flow_names);
    let observed: Vec<u64> = rows.iter().map(|r| r.responses).collect();
    let observed_flows: Vec<u64> = rows.iter().map(|r| r.flows).collect();
    let shares: Vec<f64> = rows.iter().map(|r| r.expected_share).collect();
    Distribution {
        source: match spec.target {
            Target::Http { .. } => format!("header {}", display_header(&spec.node_header)),
            Target::Tcp { .. } => "greeting line".into(),
        },
        max_mean: max_over_mean(&rows),
        backends: rows,
        unnamed,
        chi_square: stats::chi_square(&observed, &shares),
        chi_square_flows: stats::chi_square(&observed_flows, &shares),
        expected_from,
    }
}

/// The spec's expected shares, or equal over the backends seen; and where they came from.
fn expected_shares(spec: &LoadSpec, names: &BTreeMap<String, u64>) -> (Vec<(String, f64)>, String) {
    match &spec.expected {
        Some(e) => (e.clone(), "given".into()),
        None => (
            names.keys().map(|n| (n.clone(), 1.0)).collect(),
            "equal over the backends seen".into(),
        ),
    }
}

/// One row per expected backend (in the given order), then one per backend
/// seen but not expected; shares over the named responses.
fn backend_rows(
    expected: &[(String, f64)],
    names: &BTreeMap<String, u64>,
    flow_names: &BTreeMap<String, u64>,
) -> Vec<BackendRow> {
    let share_sum: f64 = expected.iter().map(|(_, s)| s.max(0.0)).sum();
    let row = |name: &String, responses: u64, expected_share: f64| BackendRow {
        name: name.clone(),
        responses,
        flows: flow_names.get(name).copied().unwrap_or(0),
        share: 0.0,
        expected_share,
    };
    let mut rows: Vec<BackendRow> = expected
        .iter()
        .map(|(name, s)| {
            let share = if share_sum > 0.0 {
                s.max(0.0) / share_sum
            } else {
                0.0
            };
            row(name, names.get(name).copied().unwrap_or(0), share)
        })
        .collect();
    for (name, &n) in names {
        if !rows.iter().any(|r| &r.name == name) {
            rows.push(row(name, n, 0.0));
        }
    }
    let named: u64 = rows.iter().map(|r| r.responses).sum();
    for r in &mut rows {
        r.share = if named > 0 {
            r.responses as f64 / named as f64
        } else {
            0.0
        };
    }
    rows
}

/// Max over mean of the responses per expected backend (NaN without any).
fn max_over_mean(rows: &[BackendRow]) -> f64 {
    let expected_rows: Vec<&BackendRow> = rows.iter().filter(|r| r.expected_share > 0.0).collect();
    if expected_rows.is_empty() {
        return f64::NAN;
    }
    let mean =
        expected_rows.iter().map(|r| r.responses).sum::<u64>() as f64 / expected_rows.len() as f64;
    let max = expected_rows.iter().map(|r| r.responses).max().unwrap_or(0) as f64;
    if mean > 0.0 {
        max / mean
    } else {
        f64::NAN
    }
}

/// `x-node` -> `X-Node`.
fn display_header(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_display_in_title_case() {
        assert_eq!(display_header("x-node"), "X-Node");
        assert_eq!(display_header("x-seen-source"), "X-Seen-Source");
    }

    #[test]
    fn distribution_counts_unexpected_and_missing_backends() {
        let mut spec = LoadSpec::new(Target::Tcp {
            addr: "127.0.0.1:1".parse().unwrap(),
        });
        spec.expected = Some(vec![
            ("a".into(), 0.5),
            ("b".into(), 0.5),
            ("c".into(), 0.0),
        ]);
        let names: BTreeMap<String, u64> = [("a".to_owned(), 30), ("d".to_owned(), 10)].into();
        let flows: BTreeMap<String, u64> = [("a".to_owned(), 3), ("b".to_owned(), 3)].into();
        let d = distribution(&spec, &names, &flows, 0);
        let by: BTreeMap<_, _> = d.backends.iter().map(|b| (b.name.as_str(), b)).collect();
        assert_eq!(by["b"].responses, 0);
        assert_eq!(by["d"].expected_share, 0.0);
        assert_eq!(by["a"].share, 0.75);
        assert_eq!(
            d.chi_square.unwrap().p_value,
            0.0,
            "an unexpected backend was used"
        );
        assert_eq!(d.max_mean, 2.0);
        assert_eq!((by["a"].flows, by["b"].flows, by["d"].flows), (3, 3, 0));
        assert!(
            d.chi_square_flows.unwrap().p_value > 0.99,
            "3 and 3 flows fit 50/50"
        );
    }
}
