//! The soak as `BENCHMARKS.md`'s Soak section: what ran, the start/end table
//! and the checks. `lb-bench soak --benchmarks FILE` puts it in place of the
//! file's previous Soak section.

use std::fmt::Write as _;
use std::path::Path;

use super::verdict::Check;
use super::SoakReport;
use crate::error::{IoContext, Result};
use crate::report::splice;

/// The section's heading.
pub const HEADING: &str = "## Soak (`lb-bench soak`)";

/// The section for `report`, produced by `command` on `date`.
pub fn section(report: &SoakReport, command: &str, date: &str) -> String {
    let mut o = format!("{HEADING}\n\n");
    let _ = writeln!(
        o,
        "_Produced by `{command}` on {date} ({}; lb-proxy `{}`)._\n",
        if report.passed { "PASS" } else { "FAIL" },
        report.lb_proxy
    );
    let _ = writeln!(
        o,
        "{} s of mixed load after {} s of warm-up: {}; {}. \
         Start and end are quiesced samples: the load stopped and no connection active. \
         PASS needs the fds back to the start (+{} at most), no active connection, \
         VmRSS growth under {}, no failure outside a flap's window \
         (from the kill until lb-proxy marked the node down) and every part of the load run.\n",
        report.duration_s,
        report.warmup_s,
        report.mix,
        report.disturbances,
        report.bounds.fd_slack,
        report.bounds.rss_rule()
    );
    table(&mut o, report);
    o.push('\n');
    checks(&mut o, &report.checks);
    let _ = writeln!(
        o,
        "\nSamples every {} s are in `soak-samples.csv` and `soak.json` (`--out`).",
        report.sample_every_s
    );
    o
}

fn table(o: &mut String, r: &SoakReport) {
    let (s, e) = (&r.start, &r.end);
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let _ = writeln!(
        o,
        "| | start (after warm-up) | end (quiesced) |\n|---|---:|---:|"
    );
    let rows = [
        ("resident memory (VmRSS)", mib(s.rss_kib), mib(e.rss_kib)),
        ("open fds", s.fds.to_string(), e.fds.to_string()),
        (
            "active connections (frontend / backend)",
            format!("{} / {}", s.frontend_active, s.backend_active),
            format!("{} / {}", e.frontend_active, e.backend_active),
        ),
        ("flows accepted", s.flows.to_string(), e.flows.to_string()),
        ("reloads", s.reloads.to_string(), e.reloads.to_string()),
        (
            "requests answered",
            s.requests.to_string(),
            e.requests.to_string(),
        ),
        (
            "request errors (all)",
            s.errors.to_string(),
            e.errors.to_string(),
        ),
    ];
    for (what, a, b) in rows {
        let _ = writeln!(o, "| {what} | {a} | {b} |");
    }
}

fn checks(o: &mut String, checks: &[Check]) {
    for c in checks {
        let mark = if c.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(o, "- **{mark}** {}: {}", c.what, c.detail);
    }
}

/// Puts `section` into the Markdown file at `path` in place of its Soak section.
pub fn write_into(path: &Path, section: &str) -> Result<()> {
    let doc = std::fs::read_to_string(path).ctx(|| format!("read {}", path.display()))?;
    let text = splice(&doc, HEADING, section);
    std::fs::write(path, text).ctx(|| format!("write {}", path.display()))
}
