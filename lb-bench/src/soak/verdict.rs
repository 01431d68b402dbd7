//! The soak's verdict, a pure function of two quiesced samples (after the
//! warm-up, and after the soak) and the tally: PASS when the open fds came
//! back to where they started (within [`Bounds::fd_slack`]), no connection is
//! left active, resident memory grew less than the bound, nothing failed that
//! a flap does not explain, and every part of the load actually ran. Also the
//! start/end table it is printed with.

use std::fmt::Write as _;

use serde::Serialize;

use super::sample::Sample;
use super::timeline::Tally;

/// How far the end may be from the start and still pass.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Bounds {
    /// Extra fds allowed at the end: a health probe per backend may be open
    /// at any read.
    pub fd_slack: u64,
    /// RSS growth always allowed, in KiB: allocator arenas settle slowly.
    pub rss_growth_kib: u64,
    /// RSS growth allowed as a share of the start, when that is more.
    pub rss_growth_ratio: f64,
}

/// The bounds `lb-bench soak` applies (stated in BENCHMARKS.md's Soak section).
pub const BOUNDS: Bounds = Bounds {
    fd_slack: 4,
    rss_growth_kib: 8 * 1024,
    rss_growth_ratio: 0.10,
};

impl Bounds {
    /// The RSS bound in words.
    pub fn rss_rule(&self) -> String {
        format!(
            "{} or {} %, whichever is more",
            mib(self.rss_growth_kib),
            self.rss_growth_ratio * 100.0
        )
    }

    /// The RSS growth allowed from `start_kib`: 8 MiB or 10 %, whichever is more.
    pub fn rss_limit_kib(&self, start_kib: u64) -> u64 {
        let ratio = (start_kib as f64 * self.rss_growth_ratio) as u64;
        self.rss_growth_kib.max(ratio)
    }
}

/// Which scheduled parts of the soak must have happened at least once.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Expected {
    pub reloads: bool,
    pub flaps: bool,
}

/// One line of the verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub what: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Every check, in the order they are printed.
pub fn verdict(
    start: &Sample,
    end: &Sample,
    tally: &Tally,
    expected: Expected,
    bounds: &Bounds,
) -> Vec<Check> {
    vec![
        fds_check(start, end, bounds),
        active_check(end),
        rss_check(start, end, bounds),
        errors_check(tally),
        ran_check(tally, expected),
    ]
}

/// PASS when every check passed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.passed)
}

fn fds_check(start: &Sample, end: &Sample, b: &Bounds) -> Check {
    Check {
        what: "open fds back to the start",
        passed: end.fds <= start.fds + b.fd_slack,
        detail: format!(
            "{} -> {} (at most +{} allowed)",
            start.fds, end.fds, b.fd_slack
        ),
    }
}

fn active_check(end: &Sample) -> Check {
    Check {
        what: "no active connection left",
        passed: end.frontend_active == 0 && end.backend_active == 0,
        detail: format!(
            "frontend {}, backend {}",
            end.frontend_active, end.backend_active
        ),
    }
}

fn rss_check(start: &Sample, end: &Sample, b: &Bounds) -> Check {
    let limit = b.rss_limit_kib(start.rss_kib);
    let growth = end.rss_kib as i64 - start.rss_kib as i64;
    Check {
        what: "resident memory flat",
        passed: growth <= limit as i64,
        detail: format!(
            "{} -> {} ({} MiB; at most +{}: {})",
            mib(start.rss_kib),
            mib(end.rss_kib),
            signed_mib(growth),
            mib(limit),
            b.rss_rule()
        ),
    }
}

fn errors_check(t: &Tally) -> Check {
    let unexpected = t.unexpected_total();
    let mut detail = format!(
        "{unexpected} unexpected; {} on connections the killed node held (expected)",
        t.during_flaps
    );
    for (what, n) in &t.unexpected {
        let _ = write!(detail, "; {n} × {what}");
    }
    Check {
        what: "no unexpected errors",
        passed: unexpected == 0,
        detail,
    }
}

fn ran_check(t: &Tally, e: Expected) -> Check {
    let missing: Vec<&str> = [
        (t.requests == 0, "requests"),
        (t.bulk_transfers == 0, "bulk transfers"),
        (t.idle_cycles == 0, "idle cycles"),
        (e.reloads && t.reloads == 0, "reloads"),
        (e.flaps && t.flaps == 0, "flaps"),
    ]
    .into_iter()
    .filter_map(|(none, what)| none.then_some(what))
    .collect();
    Check {
        what: "every part of the load ran",
        passed: missing.is_empty(),
        detail: if missing.is_empty() {
            format!(
                "{} requests, {} bulk transfers ({} MiB each way), {} idle cycles ({} connections), {} reloads, \
                 {} flaps (marked down at most {} ms after a kill, up at most {} ms after a restart)",
                t.requests,
                t.bulk_transfers,
                t.bulk_bytes >> 20,
                t.idle_cycles,
                t.idle_checked,
                t.reloads,
                t.flaps,
                t.slowest_down_ms,
                t.slowest_up_ms
            )
        } else {
            format!("none of: {}", missing.join(", "))
        },
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn signed_mib(kib: i64) -> String {
    format!("{:+.1}", kib as f64 / 1024.0)
}

/// The start/end table, the checks, and the verdict line.
pub fn render(start: &Sample, end: &Sample, checks: &[Check]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>22} {:>22}",
        "", "start (after warm-up)", "end (quiesced)"
    );
    let rows: [(&str, String, String); 7] = [
        (
            "resident memory (VmRSS)",
            mib(start.rss_kib),
            mib(end.rss_kib),
        ),
        ("open fds", start.fds.to_string(), end.fds.to_string()),
        (
            "active connections fe/be",
            format!("{}/{}", start.frontend_active, start.backend_active),
            format!("{}/{}", end.frontend_active, end.backend_active),
        ),
        (
            "flows accepted",
            start.flows.to_string(),
            end.flows.to_string(),
        ),
        (
            "reloads",
            start.reloads.to_string(),
            end.reloads.to_string(),
        ),
        (
            "requests answered",
            start.requests.to_string(),
            end.requests.to_string(),
        ),
        (
            "request errors (all)",
            start.errors.to_string(),
            end.errors.to_string(),
        ),
    ];
    for (what, a, b) in rows {
        let _ = writeln!(out, "{what:<28} {a:>22} {b:>22}");
    }
    out.push('\n');
    for c in checks {
        let mark = if c.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(out, "{mark}  {}: {}", c.what, c.detail);
    }
    let _ = writeln!(
        out,
        "\nsoak: {}",
        if passed(checks) { "PASS" } else { "FAIL" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_kib: u64, fds: u64) -> Sample {
        Sample {
            phase: "quiesced".into(),
            rss_kib,
            fds,
            ..Sample::default()
        }
    }

    fn tally() -> Tally {
        Tally {
            requests: 1000,
            during_flaps: 7,
            bulk_transfers: 10,
            bulk_bytes: 80 << 20,
            idle_checked: 200,
            idle_cycles: 1,
            reloads: 2,
            flaps: 3,
            ..Tally::default()
        }
    }

    const ALL: Expected = Expected {
        reloads: true,
        flaps: true,
    };

    fn failed(start: &Sample, end: &Sample, t: &Tally, e: Expected) -> Vec<&'static str> {
        verdict(start, end, t, e, &BOUNDS)
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| c.what)
            .collect()
    }

    #[test]
    fn a_flat_run_with_only_flap_errors_passes() {
        let start = sample(20_000, 30);
        let end = sample(20_000 + 8 * 1024, 30 + BOUNDS.fd_slack);
        let checks = verdict(&start, &end, &tally(), ALL, &BOUNDS);
        assert!(passed(&checks), "{checks:?}");
        let text = render(&start, &end, &checks);
        assert!(text.ends_with("soak: PASS\n"), "{text}");
        // Less than at the start is not a leak.
        assert!(failed(&start, &sample(10_000, 20), &tally(), ALL).is_empty());
    }

    #[test]
    fn leaked_fds_fail() {
        let got = failed(&sample(20_000, 30), &sample(20_000, 35), &tally(), ALL);
        assert_eq!(got, ["open fds back to the start"]);
    }

    #[test]
    fn connections_left_active_fail() {
        let mut end = sample(20_000, 30);
        end.backend_active = 1;
        let got = failed(&sample(20_000, 30), &end, &tally(), ALL);
        assert_eq!(got, ["no active connection left"]);
    }

    #[test]
    fn rss_may_grow_8_mib_or_10_percent_whichever_is_more() {
        let small = sample(20_000, 30);
        let over = sample(20_000 + 8 * 1024 + 1, 30);
        assert_eq!(
            failed(&small, &over, &tally(), ALL),
            ["resident memory flat"]
        );
        // 10 % of 200 MiB is 20 MiB: 15 MiB more passes, 21 MiB does not.
        let big = sample(200 * 1024, 30);
        assert!(failed(&big, &sample(215 * 1024, 30), &tally(), ALL).is_empty());
        assert_eq!(
            failed(&big, &sample(221 * 1024, 30), &tally(), ALL),
            ["resident memory flat"]
        );
    }

    #[test]
    fn an_unexpected_error_fails_and_is_named() {
        let mut t = tally();
        t.unexpected
            .insert("keep-alive: connection reset".into(), 2);
        let checks = verdict(&sample(1, 1), &sample(1, 1), &t, ALL, &BOUNDS);
        let errors = checks.iter().find(|c| !c.passed).expect("a failed check");
        assert_eq!(errors.what, "no unexpected errors");
        assert!(errors.detail.contains("2 × keep-alive: connection reset"));
        assert!(render(&sample(1, 1), &sample(1, 1), &checks).ends_with("soak: FAIL\n"));
    }

    #[test]
    fn a_part_that_never_ran_fails() {
        let t = Tally {
            flaps: 0,
            ..tally()
        };
        assert_eq!(
            failed(&sample(1, 1), &sample(1, 1), &t, ALL),
            ["every part of the load ran"]
        );
        let unscheduled = Expected {
            reloads: true,
            flaps: false,
        };
        assert!(failed(&sample(1, 1), &sample(1, 1), &t, unscheduled).is_empty());
    }
}
