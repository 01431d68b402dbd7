//! `lb-bench pool`: the round-by-round table over the rounds of several
//! `compare` runs. A run's rounds are few (each one costs minutes), and two
//! runs of the same builds on the same machine measure the same thing, so
//! their rounds can be taken together: every ratio in the table is paired
//! within its own round, which is what makes rounds from different runs
//! (on a machine whose speed drifted between them) comparable at all.

use std::path::{Path, PathBuf};

use super::render::round_ratios;
use super::results::{Frontend, Sample};
use super::rounds;
use crate::error::{Error, IoContext, Result};

/// What `compare.json` holds that pooling reads.
#[derive(serde::Deserialize)]
struct RecordedRun {
    samples: Vec<Sample>,
}

/// The pooled table, and what went into it.
#[derive(Debug)]
pub struct Pooled {
    pub markdown: String,
    pub rounds: usize,
}

/// Reads each `compare.json`, numbers its rounds after the previous run's,
/// and renders the round-by-round table over them all, with the ratio
/// columns of the front ends any of them measured.
pub fn pool(paths: &[PathBuf]) -> Result<Pooled> {
    let mut samples = Vec::new();
    let mut runs = Vec::new();
    for path in paths {
        let offset = samples.iter().map(|s: &Sample| s.round).max().unwrap_or(0);
        let run = read_run(path, offset)?;
        let rounds = run.iter().map(|s| s.round).max().unwrap_or(offset) - offset;
        runs.push(format!("`{}` ({rounds} rounds)", path.display()));
        samples.extend(run);
    }
    let mut frontends: Vec<Frontend> = samples.iter().map(|s| s.frontend).collect();
    frontends.sort_unstable();
    frontends.dedup();
    let rounds = samples.iter().map(|s| s.round).max().unwrap_or(0);
    let mut markdown = format!(
        "Pooled: {rounds} rounds from {} run(s): {}.\n",
        runs.len(),
        runs.join(", ")
    );
    // Only the columns whose two front ends both ran: the medians table's
    // columns need only the first (they show the other's status instead).
    let ratios: Vec<_> = round_ratios(&frontends)
        .into_iter()
        .filter(|(num, den, _)| frontends.contains(num) && frontends.contains(den))
        .collect();
    rounds::table(&mut markdown, &samples, &ratios, rounds);
    Ok(Pooled { markdown, rounds })
}

/// One run's samples, their rounds moved up by `offset`.
fn read_run(path: &Path, offset: usize) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).ctx(|| format!("read {}", path.display()))?;
    let run: RecordedRun = serde_json::from_str(&text).map_err(|e| Error::Unreadable {
        path: path.to_owned(),
        detail: format!(
            "not a compare.json (line {}, column {}): {e}",
            e.line(),
            e.column()
        ),
    })?;
    let mut samples = run.samples;
    for s in &mut samples {
        s.round += offset;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::results::NEW;

    /// A compare.json with new-connection rates of the ring and HAProxy,
    /// one (ring, haproxy) per round.
    fn run_file(dir: &Path, name: &str, rounds: &[(f64, f64)]) -> PathBuf {
        let samples: Vec<Sample> = rounds
            .iter()
            .enumerate()
            .flat_map(|(i, &(ring, ha))| {
                [
                    Sample::figure(i + 1, Frontend::LbProxyIoUring, NEW, "wrk", ring),
                    Sample::figure(i + 1, Frontend::Haproxy, NEW, "wrk", ha),
                ]
            })
            .collect();
        let path = dir.join(name);
        let json = serde_json::json!({ "samples": samples, "rows": [] });
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[test]
    fn rounds_of_two_runs_are_paired_within_each_and_pooled() {
        let dir = tempfile::tempdir().unwrap();
        // Run 1 ahead in 2 of 3 rounds; run 2, on a machine twice as fast,
        // ahead in 2 of 2. A round from one run is never paired with one
        // from the other: every ratio is 1.10 or 0.90, none 2.2 or 0.45.
        let a = run_file(
            dir.path(),
            "a.json",
            &[(110.0, 100.0), (90.0, 100.0), (110.0, 100.0)],
        );
        let b = run_file(dir.path(), "b.json", &[(220.0, 200.0), (220.0, 200.0)]);
        let pooled = pool(&[a, b]).unwrap();
        assert_eq!(pooled.rounds, 5);
        let o = &pooled.markdown;
        assert!(o.contains("Pooled: 5 rounds from 2 run(s)"), "{o}");
        assert!(o.contains("(3 rounds)") && o.contains("(2 rounds)"), "{o}");
        // Five rounds give the 90 % interval as their range (0.938 sure).
        assert!(
            o.contains("| new connections/s | wrk | 1.10 [0.90–1.10] 4/5 |"),
            "{o}"
        );
        assert!(
            o.contains("| figure | tool | io_uring / haproxy |\n"),
            "only the columns both of whose front ends ran: {o}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_compare_json_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("compare.md");
        std::fs::write(&bad, "| not | json |").unwrap();
        let e = pool(&[bad]).unwrap_err().to_string();
        assert!(
            e.contains("compare.md") && e.contains("not a compare.json"),
            "{e}"
        );
        let odd = dir.path().join("odd.json");
        let json = r#"{"samples": [{"round": 1, "frontend": "Haproxy", "metric": "odd",
            "tool": "wrk", "value": 1.0, "p50_ms": null, "p99_ms": null, "cpu_us": null,
            "machine_cpu_us": null, "errors": 0}]}"#;
        std::fs::write(&odd, json).unwrap();
        let e = pool(&[odd]).unwrap_err().to_string();
        assert!(
            e.contains("odd.json") && e.contains("unknown metric \"odd\""),
            "{e}"
        );
        let missing = dir.path().join("missing.json");
        let e = pool(&[missing]).unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
    }
}
