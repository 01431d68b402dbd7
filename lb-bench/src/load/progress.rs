//! The progress bar on stderr: shown only on a terminal, and only for runs
//! over about 2 s (from the start when `-z` says so, else once 2 s have gone).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::spec::LoadSpec;
use super::state::Shared;

/// Draws the bar every 100 ms until `finished`, then clears it.
pub(super) async fn progress_bar(shared: Arc<Shared>, finished: Arc<AtomicBool>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut bar: Option<ProgressBar> = None;
    let long_enough = shared
        .spec
        .duration
        .is_some_and(|d| d > Duration::from_secs(2));
    while !finished.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = shared.start.elapsed();
        if bar.is_none() && (long_enough || elapsed > Duration::from_secs(2)) {
            bar = Some(new_bar(&shared.spec));
        }
        if let Some(b) = &bar {
            update(b, &shared, elapsed);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// A bar over the duration, else over the request count, else none.
fn new_bar(spec: &LoadSpec) -> ProgressBar {
    let (len, template) = match (spec.duration, spec.requests) {
        (Some(d), _) => (d.as_millis() as u64, "{elapsed_precise} [{bar:40}] {msg}"),
        (None, Some(n)) => (n, "{elapsed_precise} [{bar:40}] {pos}/{len} {msg}"),
        (None, None) => (0, "{elapsed_precise} {msg}"),
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

fn update(b: &ProgressBar, shared: &Shared, elapsed: Duration) {
    let done = shared.completed.load(Ordering::Relaxed);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    b.set_message(format!("{done} responses, {rate:.0} req/s"));
    if shared.spec.duration.is_some() {
        b.set_position((elapsed.as_millis() as u64).min(b.length().unwrap_or(0)));
    } else {
        b.set_position(done);
    }
}
