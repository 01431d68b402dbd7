//! The comparison chart: one SVG (plotters, SVG backend only) with a bar
//! panel per headline metric and a bar per front end; a front end that is
//! missing or failed is labelled so instead of drawn.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::results::{fmt_num, CompareResult, Row};
use crate::error::{Error, Result};

const COLORS: [RGBColor; 5] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x6b, 0xae, 0xd6),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// A plotters error as this crate's [`Error::Chart`] (plotters' errors are
/// generic over the backend, so they travel as their message).
pub(crate) fn chart_err(e: impl std::fmt::Display) -> Error {
    Error::Chart(e.to_string())
}

/// The rows drawn: the lb-bench figures of each headline metric.
fn panels(res: &CompareResult) -> Vec<(String, &Row)> {
    let wanted = [
        ("keep-alive req/s", "keep-alive req/s (lb-bench)"),
        ("new connections/s", "new connections/s (lb-bench)"),
        ("keep-alive p99 ms", "keep-alive p99 ms (lb-bench)"),
        ("bulk Gbit/s, 1 stream", "bulk Gbit/s, 1 stream"),
        ("bulk Gbit/s, 4 streams", "bulk Gbit/s, 4 streams"),
        ("RSS KiB per idle connection", "RSS KiB per idle connection"),
    ];
    wanted
        .iter()
        .filter_map(|(prefix, title)| {
            let mut rows = res.rows.iter().filter(|r| r.metric.starts_with(prefix));
            let row = rows
                .clone()
                .find(|r| r.tool == "lb-bench")
                .or_else(|| rows.next())?;
            Some((title.to_string(), row))
        })
        .collect()
}

/// Writes the chart of `res` to `path` (SVG).
pub fn write_compare_chart(res: &CompareResult, path: &Path) -> Result<()> {
    let labels: Vec<(&str, &str)> = res
        .frontends
        .iter()
        .map(|s| (s.frontend.short_label(), s.status))
        .collect();
    let panels = panels(res);
    let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let root = root
        .titled(
            "lb-bench compare: medians per front end",
            ("sans-serif", 22),
        )
        .map_err(chart_err)?;
    let areas = root.split_evenly((2, 3));
    let n = labels.len() as i32;
    for (area, (title, row)) in areas.iter().zip(&panels) {
        let top = row
            .values
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top * 1.2 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            // A segmented range over 0..=last has one segment per front end.
            .build_cartesian_2d((0..(n - 1).max(1)).into_segmented(), 0f64..top)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .y_labels(6)
            .x_labels(labels.len())
            .x_label_style(("sans-serif", 11))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                    .get(*i as usize)
                    .map(|l| l.0.to_owned())
                    .unwrap_or_default(),
                SegmentValue::Last => String::new(),
            })
            .y_label_formatter(&|y| fmt_num(Some(*y)))
            .draw()
            .map_err(chart_err)?;
        let bars = row.values.iter().enumerate().filter_map(|(i, v)| {
            let v = (*v)?;
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i as i32), 0.0),
                    (SegmentValue::Exact(i as i32 + 1), v),
                ],
                COLORS[i % COLORS.len()].filled(),
            );
            bar.set_margin(0, 0, 8, 8);
            Some(bar)
        });
        chart.draw_series(bars).map_err(chart_err)?;
        let notes = row.values.iter().enumerate().map(|(i, v)| {
            let text = match (v, labels.get(i).map(|l| l.1)) {
                (Some(v), _) => fmt_num(Some(*v)),
                (None, Some(status)) if status != "ok" => status.to_owned(),
                _ => "n/a".to_owned(),
            };
            let y = v.unwrap_or(0.0) + top * 0.01;
            let style = TextStyle::from(("sans-serif", 12).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            Text::new(text, (SegmentValue::CenterOf(i as i32), y), style)
        });
        chart.draw_series(notes).map_err(chart_err)?;
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::results::Frontend;

    fn result(frontends: &[(Frontend, &'static str)], values: Vec<Option<f64>>) -> CompareResult {
        let rows = vec![
            Row {
                metric: "keep-alive req/s".into(),
                tool: "lb-bench".into(),
                values: values.clone(),
            },
            Row {
                metric: "RSS KiB per idle connection (10 conns)".into(),
                tool: "lb-bench".into(),
                values,
            },
        ];
        CompareResult::for_test(frontends, rows)
    }

    #[test]
    fn charts_draw_bars_and_missing_front_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let res = result(
            &[(Frontend::Direct, "ok"), (Frontend::Haproxy, "missing")],
            vec![Some(1234.0), None],
        );
        write_compare_chart(&res, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("missing") && svg.contains("1234") && svg.contains("RSS KiB"));
        // One front end only, and nothing measured at all.
        let res = result(&[(Frontend::LbProxy, "failed")], vec![None]);
        write_compare_chart(&res, &path).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("failed"));
    }
}
