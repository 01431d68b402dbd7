//! The experiment's verdicts and how it prints them: the flow tables (as a
//! capture lists flows), the PASS/FAIL line per step, and the closing count.

use std::io::Write;

use crate::load::{FlowRecord, LoadReport};

/// One step's verdict.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub name: String,
    pub expected: String,
    pub got: String,
    pub pass: bool,
}

/// All steps of one experiment.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub steps: Vec<Step>,
}

/// The seed experiment's verdicts (the name the report uses).
pub type SeedOutcome = Outcome;

impl Outcome {
    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.pass)
    }
}

/// The flows as a capture lists them, with the node and what the backend saw.
pub fn flow_table(flows: &[&FlowRecord], seen_label: &str) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "    {:>3}  {:>9}  {:<21}    {:<21}  {:<5}  {:<7}  {}",
        "No.", "Time", "Source", "Destination", "Proto", "Node", seen_label
    );
    for (i, f) in flows.iter().enumerate() {
        let _ = writeln!(
            o,
            "    {:>3}  {:>9.6}  {:<21} →  {:<21}  {:<5}  {:<7}  {}",
            i + 1,
            f.t_ms / 1000.0,
            f.src.to_string(),
            f.dst.to_string(),
            f.proto,
            f.node.as_deref().unwrap_or("-"),
            f.seen.as_deref().unwrap_or("-"),
        );
    }
    o
}

/// The nodes that answered, with their response counts.
pub(super) fn nodes_summary(r: &LoadReport) -> String {
    match &r.distribution {
        Some(d) => d
            .backends
            .iter()
            .filter(|b| b.responses > 0)
            .map(|b| format!("{} ×{}", b.name, b.responses))
            .collect::<Vec<_>>()
            .join(", "),
        None => "no backend named".into(),
    }
}

/// How many nodes answered.
pub(super) fn nodes_used(r: &LoadReport) -> usize {
    r.distribution
        .as_ref()
        .map(|d| d.backends.iter().filter(|b| b.responses > 0).count())
        .unwrap_or(0)
}

/// Prints as the experiment goes and keeps the verdicts.
pub(super) struct Reporter<'a> {
    out: &'a mut dyn Write,
    /// How the closing line names the experiment.
    title: &'static str,
    outcome: Outcome,
}

impl<'a> Reporter<'a> {
    pub(super) fn new(out: &'a mut dyn Write, title: &'static str) -> Reporter<'a> {
        Reporter {
            out,
            title,
            outcome: Outcome::default(),
        }
    }

    pub(super) fn say(&mut self, text: &str) {
        let _ = write!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// Shows `flows` as a capture lists them.
    pub(super) fn show_flows(&mut self, flows: &[&FlowRecord], seen_label: &str) {
        self.say(&flow_table(flows, seen_label));
    }

    pub(super) fn verdict(&mut self, name: &str, expected: &str, got: String, pass: bool) {
        let line = format!(
            "  {}  {name}: expected {expected}; got {got}\n\n",
            if pass { "PASS" } else { "FAIL" }
        );
        self.say(&line);
        self.outcome.steps.push(Step {
            name: name.into(),
            expected: expected.into(),
            got,
            pass,
        });
    }

    /// The closing count; the verdicts.
    pub(super) fn conclude(mut self) -> Outcome {
        let passed = self.outcome.steps.iter().filter(|s| s.pass).count();
        let total = self.outcome.steps.len();
        self.say(&format!(
            "{}: {passed} of {total} steps passed{}\n",
            self.title,
            if passed == total { "" } else { " — FAIL" }
        ));
        self.outcome
    }
}
