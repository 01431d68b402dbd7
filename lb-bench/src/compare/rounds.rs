//! The round-by-round view of the ratios. Rounds are interleaved, so two
//! front ends measured in the same round shared the machine's state (the
//! generator's luck with the scheduler, a neighbour on the host): the ratio
//! of their figures in each round is a paired figure. Its median is the
//! estimate that the machine's drift between rounds does not move (the
//! medians table's ratio of medians is moved by it), and its spread over the
//! rounds says whether a ratio near 1 is a difference or noise: each median
//! comes with the interval that holds it at [`CONFIDENCE`] (the sign
//! test's, which assumes nothing about how a round's ratio is distributed), so a
//! ratio whose interval holds 1 is level within the rounds. Rates, p99
//! latencies and the proxy's CPU per request or connection each get a row:
//! the bars are stated on all three.

use std::fmt::Write as _;

use super::results::{metric_label, Frontend, Sample, KA, NEW};
use crate::stats::{self, MedianInterval};

/// How sure each paired median's interval is.
const CONFIDENCE: f64 = 0.90;

/// Which figure of a sample is paired, and which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Figure {
    /// The rate: higher is better.
    Rate,
    /// The p99 latency: lower is better.
    P99,
    /// The proxy's own CPU per request or connection (`cpu_us`): lower is
    /// better.
    Cpu,
}

impl Figure {
    /// The table's rows, in order.
    const ALL: [Figure; 3] = [Figure::Rate, Figure::P99, Figure::Cpu];

    fn of(self, s: &Sample) -> Option<f64> {
        match self {
            Figure::Rate => Some(s.value),
            Figure::P99 => s.p99_ms,
            Figure::Cpu => s.cpu_us,
        }
    }

    /// Whether a round's ratio (numerator over denominator) has the
    /// numerator at least level.
    fn level_or_better(self, ratio: f64) -> bool {
        match self {
            Figure::Rate => ratio >= 1.0,
            Figure::P99 | Figure::Cpu => ratio <= 1.0,
        }
    }

    fn label(self, metric: &str) -> &'static str {
        match (self, metric) {
            (Figure::Rate, _) => metric_label(metric),
            (Figure::P99, KA) => "keep-alive p99",
            (Figure::P99, NEW) => "new-connection p99",
            (Figure::Cpu, KA) => "keep-alive proxy CPU per request",
            (Figure::Cpu, NEW) => "new-connection proxy CPU per connection",
            (Figure::P99 | Figure::Cpu, _) => "?",
        }
    }
}

/// One ratio's rounds: its median, the interval that holds it at
/// [`CONFIDENCE`], and how many rounds the numerator was level or better.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Paired {
    pub median: f64,
    pub interval: MedianInterval,
    /// Rounds in which the numerator's figure was level with the
    /// denominator's or better (a rate at least, a p99 or CPU at most).
    pub level_or_better: usize,
    pub rounds: usize,
}

/// `num`'s `figure` over `den`'s in every round that measured both with
/// `tool`; `None` when no round did.
pub(crate) fn paired(
    samples: &[Sample],
    (num, den): (Frontend, Frontend),
    metric: &str,
    tool: &str,
    figure: Figure,
) -> Option<Paired> {
    let value = |fe: Frontend, round: usize| {
        samples
            .iter()
            .find(|s| s.frontend == fe && s.round == round && s.metric == metric && s.tool == tool)
            .and_then(|s| figure.of(s))
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let mut rounds: Vec<usize> = samples.iter().map(|s| s.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let ratios: Vec<f64> = rounds
        .into_iter()
        .filter_map(|r| Some(value(num, r)? / value(den, r)?))
        .collect();
    Some(Paired {
        median: stats::median(&ratios)?,
        interval: stats::median_interval(&ratios, CONFIDENCE)?,
        level_or_better: ratios
            .iter()
            .filter(|&&x| figure.level_or_better(x))
            .count(),
        rounds: ratios.len(),
    })
}

/// The tools that measured `metric`, in the order they first appear.
fn tools_of(samples: &[Sample], metric: &str) -> Vec<String> {
    let mut tools: Vec<String> = Vec::new();
    for s in samples.iter().filter(|s| s.metric == metric) {
        if !tools.contains(&s.tool) {
            tools.push(s.tool.clone());
        }
    }
    tools
}

/// `median [low–high] level/rounds`; the interval's confidence is added
/// where too few rounds gave [`CONFIDENCE`] (it is then their range).
fn cell(p: Option<Paired>) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let i = p.interval;
    let short = if i.confidence < CONFIDENCE {
        format!(" at {:.0} %", i.confidence * 100.0)
    } else {
        String::new()
    };
    format!(
        "{:.2} [{:.2}–{:.2}{short}] {}/{}",
        p.median, i.low, i.high, p.level_or_better, p.rounds
    )
}

/// The round-by-round table under the medians table: a row per figure
/// (rates, p99s, then CPU), metric and tool, a column per ratio (numerator,
/// denominator, header: the medians table's ratio columns). Nothing when
/// there was only one round.
pub(crate) fn table(
    o: &mut String,
    samples: &[Sample],
    ratios: &[(Frontend, Frontend, &str)],
    rounds: usize,
) {
    if rounds < 2 {
        return;
    }
    let _ = writeln!(
        o,
        "\nRound by round: each ratio of two front ends' figures in the same round (rounds are interleaved, so a pair shared the machine's state), as its median over the rounds, [the interval that holds that median with {:.0} % confidence, whatever a round's ratio's distribution (the sign test's; with too few rounds, their range and what it holds)], and in how many rounds the first was level with the second or better (a rate at least, a p99 or CPU at most). A ratio whose interval holds 1.00 is level within the rounds' noise; one whose interval lies wholly on one side of 1.00 is a difference. Unlike a ratio of medians, the paired median is not moved by the machine's drift between rounds.\n",
        CONFIDENCE * 100.0
    );
    let _ = write!(o, "| figure | tool |");
    for (_, _, header) in ratios {
        let _ = write!(o, " {header} |");
    }
    let _ = write!(o, "\n|---|---|");
    for _ in ratios {
        let _ = write!(o, "---:|");
    }
    o.push('\n');
    for figure in Figure::ALL {
        for metric in [KA, NEW] {
            for tool in tools_of(samples, metric) {
                let cells: Vec<Option<Paired>> = ratios
                    .iter()
                    .map(|&(num, den, _)| paired(samples, (num, den), metric, &tool, figure))
                    .collect();
                if cells.iter().all(Option::is_none) {
                    continue;
                }
                let _ = write!(o, "| {} | {tool} |", figure.label(metric));
                for p in cells {
                    let _ = write!(o, " {} |", cell(p));
                }
                o.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(round: usize, fe: Frontend, metric: &'static str, value: f64) -> Sample {
        Sample::figure(round, fe, metric, "lb-bench", value)
    }

    /// lb-proxy's and HAProxy's new connections/s, one (round, lb, haproxy) per round.
    fn lb_and_haproxy(rounds: &[(usize, f64, f64)]) -> Vec<Sample> {
        rounds
            .iter()
            .flat_map(|&(r, lb, ha)| {
                [
                    rate(r, Frontend::LbProxy, NEW, lb),
                    rate(r, Frontend::Haproxy, NEW, ha),
                ]
            })
            .collect()
    }

    fn lb_over(den: Frontend, samples: &[Sample], tool: &str) -> Option<Paired> {
        paired(samples, (Frontend::LbProxy, den), NEW, tool, Figure::Rate)
    }

    #[test]
    fn each_round_pairs_its_own_two_rates() {
        // Medians alone would say 1.00 (both 100); the rounds say lb lost two of three.
        let samples = lb_and_haproxy(&[(1, 90.0, 100.0), (2, 100.0, 80.0), (3, 120.0, 150.0)]);
        let p = lb_over(Frontend::Haproxy, &samples, "lb-bench").unwrap();
        assert_eq!((p.rounds, p.level_or_better), (3, 1));
        assert!((p.median - 0.9).abs() < 1e-9, "{p:?}");
        // Three rounds are too few for 90 %: their range, which holds the
        // median 3 times in 4.
        let i = p.interval;
        assert!((i.low - 0.8).abs() < 1e-9, "{p:?}");
        assert!((i.high - 1.25).abs() < 1e-9, "{p:?}");
        assert!((i.confidence - 0.75).abs() < 1e-9, "{p:?}");
        assert_eq!(cell(Some(p)), "0.90 [0.80–1.25 at 75 %] 1/3");
    }

    #[test]
    fn a_round_missing_either_rate_is_left_out() {
        // Round 2: HAProxy measured only keep-alive; round 3: HAProxy's rate is 0.
        let mut samples = lb_and_haproxy(&[(1, 90.0, 100.0), (3, 10.0, 0.0)]);
        samples.push(rate(2, Frontend::LbProxy, NEW, 100.0));
        samples.push(rate(2, Frontend::Haproxy, KA, 80.0));
        let p = lb_over(Frontend::Haproxy, &samples, "lb-bench").unwrap();
        assert_eq!((p.rounds, p.level_or_better), (1, 0));
        assert_eq!(lb_over(Frontend::NginxStream, &samples, "lb-bench"), None);
        assert_eq!(lb_over(Frontend::Haproxy, &samples, "hey"), None);
    }

    #[test]
    fn the_table_has_a_row_per_figure_metric_and_tool_and_a_column_per_ratio() {
        // New connections' p99 per round: lb-proxy 4 ms in both, HAProxy 5 then 3,
        // nginx 3 then 5, direct 2; keep-alive samples carry no p99.
        let p99 = |round: usize, fe: Frontend| match (round, fe) {
            (_, Frontend::Direct) => 2.0,
            (_, Frontend::LbProxy) => 4.0,
            (1, Frontend::Haproxy) | (2, Frontend::NginxStream) => 5.0,
            _ => 3.0,
        };
        let mut samples = Vec::new();
        for round in 1..=2 {
            for (fe, v) in [
                (Frontend::Direct, 200.0),
                (Frontend::LbProxy, 100.0),
                (Frontend::Haproxy, 95.0),
                (Frontend::NginxStream, 105.0),
            ] {
                let mut new = rate(round, fe, NEW, v);
                new.p99_ms = Some(p99(round, fe));
                new.cpu_us = Some(v / 2.0);
                samples.push(new);
                samples.push(Sample::figure(round, fe, KA, "hey", v * 10.0));
            }
        }
        let ratios = [
            (Frontend::LbProxy, Frontend::Direct, "lb-proxy / direct"),
            (Frontend::LbProxy, Frontend::Haproxy, "lb-proxy / haproxy"),
            (Frontend::LbProxy, Frontend::NginxStream, "lb-proxy / nginx"),
        ];
        let mut o = String::new();
        table(&mut o, &samples, &ratios, 2);
        let rows = [
            "| figure | tool | lb-proxy / direct | lb-proxy / haproxy | lb-proxy / nginx |",
            "| keep-alive req/s | hey | 0.50 [0.50–0.50 at 50 %] 0/2 | 1.05 [1.05–1.05 at 50 %] 2/2 | 0.95 [0.95–0.95 at 50 %] 0/2 |",
            "| new connections/s | lb-bench | 0.50 [0.50–0.50 at 50 %] 0/2 | 1.05 [1.05–1.05 at 50 %] 2/2 | 0.95 [0.95–0.95 at 50 %] 0/2 |",
            // A p99 is level or better when it is at most the other's: 0.80 is, 1.33 is not.
            "| new-connection p99 | lb-bench | 2.00 [2.00–2.00 at 50 %] 0/2 | 1.07 [0.80–1.33 at 50 %] 1/2 | 1.07 [0.80–1.33 at 50 %] 1/2 |",
            // CPU, as a p99, is level or better when at most the other's.
            "| new-connection proxy CPU per connection | lb-bench | 0.50 [0.50–0.50 at 50 %] 2/2 | 1.05 [1.05–1.05 at 50 %] 0/2 | 0.95 [0.95–0.95 at 50 %] 2/2 |",
        ];
        let at: Vec<usize> = rows
            .iter()
            .map(|r| {
                o.find(r)
                    .unwrap_or_else(|| panic!("{r} missing from:\n{o}"))
            })
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "rates first, then p99s, then CPU: {o}"
        );
        assert!(
            !o.contains("| keep-alive req/s | lb-bench"),
            "no such samples: {o}"
        );
        assert!(
            !o.contains("| keep-alive p99"),
            "no keep-alive p99 was measured: {o}"
        );
        let mut one = String::new();
        table(&mut one, &samples, &ratios, 1);
        assert!(one.is_empty(), "one round has no spread");
    }
}
