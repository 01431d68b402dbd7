//! The round-by-round view of the rate ratios. Rounds are interleaved, so two
//! front ends measured in the same round shared the machine's state (the
//! generator's luck with the scheduler, a neighbour on the host): the ratio
//! of their rates in each round is a paired figure, and its spread over the
//! rounds says whether a ratio of medians near 1 is a difference or noise.

use std::fmt::Write as _;

use super::results::{metric_label, Frontend, Sample, KA, NEW};

/// One ratio's rounds: its range and how many rounds the numerator won.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Paired {
    pub min: f64,
    pub max: f64,
    /// Rounds in which the numerator's rate was at least the denominator's.
    pub at_least: usize,
    pub rounds: usize,
}

/// `num`'s rate over `den`'s in every round that measured both with `tool`;
/// `None` when no round did.
pub(crate) fn paired(
    samples: &[Sample],
    num: Frontend,
    den: Frontend,
    metric: &str,
    tool: &str,
) -> Option<Paired> {
    let rate = |fe: Frontend, round: usize| {
        samples
            .iter()
            .find(|s| s.frontend == fe && s.round == round && s.metric == metric && s.tool == tool)
            .map(|s| s.value)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let mut rounds: Vec<usize> = samples.iter().map(|s| s.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let ratios: Vec<f64> = rounds
        .into_iter()
        .filter_map(|r| Some(rate(num, r)? / rate(den, r)?))
        .collect();
    let first = *ratios.first()?;
    Some(Paired {
        min: ratios.iter().copied().fold(first, f64::min),
        max: ratios.iter().copied().fold(first, f64::max),
        at_least: ratios.iter().filter(|&&x| x >= 1.0).count(),
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

fn cell(p: Option<Paired>) -> String {
    match p {
        Some(p) => format!("{:.2}–{:.2} ({}/{})", p.min, p.max, p.at_least, p.rounds),
        None => "-".into(),
    }
}

/// The round-by-round table under the medians table: a row per rate and
/// tool, a column per ratio (numerator, denominator, header: the medians
/// table's ratio columns). Nothing when there was only one round.
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
        "\nRound by round: each ratio of two front ends' rates in the same round (rounds are interleaved, so a pair shared the machine's state), as its lowest–highest over the rounds, and in how many rounds the first was at least the second. The table above is the ratio of medians.\n"
    );
    let _ = write!(o, "| rate | tool |");
    for (_, _, header) in ratios {
        let _ = write!(o, " {header} |");
    }
    let _ = write!(o, "\n|---|---|");
    for _ in ratios {
        let _ = write!(o, "---:|");
    }
    o.push('\n');
    for metric in [KA, NEW] {
        for tool in tools_of(samples, metric) {
            let _ = write!(o, "| {} | {tool} |", metric_label(metric));
            for &(num, den, _) in ratios {
                let _ = write!(o, " {} |", cell(paired(samples, num, den, metric, &tool)));
            }
            o.push('\n');
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
        paired(samples, Frontend::LbProxy, den, NEW, tool)
    }

    #[test]
    fn each_round_pairs_its_own_two_rates() {
        // Medians alone would say 1.00 (both 100); the rounds say lb lost two of three.
        let samples = lb_and_haproxy(&[(1, 90.0, 100.0), (2, 100.0, 80.0), (3, 120.0, 150.0)]);
        let p = lb_over(Frontend::Haproxy, &samples, "lb-bench").unwrap();
        assert_eq!((p.rounds, p.at_least), (3, 1));
        assert!((p.min - 0.8).abs() < 1e-9, "{p:?}");
        assert!((p.max - 1.25).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn a_round_missing_either_rate_is_left_out() {
        // Round 2: HAProxy measured only keep-alive; round 3: HAProxy's rate is 0.
        let mut samples = lb_and_haproxy(&[(1, 90.0, 100.0), (3, 10.0, 0.0)]);
        samples.push(rate(2, Frontend::LbProxy, NEW, 100.0));
        samples.push(rate(2, Frontend::Haproxy, KA, 80.0));
        let p = lb_over(Frontend::Haproxy, &samples, "lb-bench").unwrap();
        assert_eq!((p.rounds, p.at_least), (1, 0));
        assert_eq!(lb_over(Frontend::NginxStream, &samples, "lb-bench"), None);
        assert_eq!(lb_over(Frontend::Haproxy, &samples, "hey"), None);
    }

    #[test]
    fn the_table_has_a_row_per_rate_and_tool_and_a_column_per_ratio() {
        let mut samples = Vec::new();
        for round in 1..=2 {
            for (fe, v) in [
                (Frontend::Direct, 200.0),
                (Frontend::LbProxy, 100.0),
                (Frontend::Haproxy, 95.0),
                (Frontend::NginxStream, 105.0),
            ] {
                samples.push(rate(round, fe, NEW, v));
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
        assert!(
            o.contains(
                "| rate | tool | lb-proxy / direct | lb-proxy / haproxy | lb-proxy / nginx |"
            ),
            "{o}"
        );
        assert!(
            o.contains(
                "| keep-alive req/s | hey | 0.50–0.50 (0/2) | 1.05–1.05 (2/2) | 0.95–0.95 (0/2) |"
            ),
            "{o}"
        );
        assert!(o.contains("| new connections/s | lb-bench | 0.50–0.50 (0/2) | 1.05–1.05 (2/2) | 0.95–0.95 (0/2) |"), "{o}");
        assert!(
            !o.contains("| keep-alive req/s | lb-bench"),
            "no such samples: {o}"
        );
        let mut one = String::new();
        table(&mut one, &samples, &ratios, 1);
        assert!(one.is_empty(), "one round has no spread");
    }
}
