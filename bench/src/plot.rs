//! `rmig-bench plot`: one picture of a run, round by round: bytes sent, dirty rate, bandwidth,
//! and the expected downtime against the limit (with the real downtime at the end).
//!
//! Bytes per round are on a logarithmic scale because round 0 sends all of memory and later
//! rounds only what was dirtied meanwhile, a hundredth to a millionth of it: on a linear
//! scale every round after the first is a flat line. The labels' font is built in, so a
//! plot draws the same on a host without fonts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::parse::iec;

/// Registers DejaVu Sans, built into the binary, as the labels' font: a plot needs no font
/// installed where it is drawn. The SVG holds `<text>` elements naming `sans-serif`, which
/// every viewer renders with a font of its own.
fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("cannot load the built-in DejaVu Sans font"))
}

struct Round {
    n: f64,
    last: bool,
    bytes: f64,
    dirty: f64,
    bw: f64,
    expected: f64,
}

fn rounds(j: &Value) -> Result<Vec<Round>> {
    let rs = j["rounds"].as_array().context("no rounds in the result")?;
    if rs.is_empty() {
        bail!("the result has no rounds to plot");
    }
    Ok(rs
        .iter()
        .map(|r| Round {
            n: r["round"].as_f64().unwrap_or(0.0),
            last: r["last"].as_bool().unwrap_or(false),
            bytes: r["bytes"].as_f64().unwrap_or(0.0),
            dirty: r["dirty_rate"].as_f64().unwrap_or(0.0) / 1e6,
            bw: r["mbps"].as_f64().unwrap_or(0.0) / 8.0,
            expected: r["expected_downtime_ms"].as_f64().unwrap_or(0.0),
        })
        .collect())
}

/// Draws `result` (a `--json` output of rmig-bench) into `out` (.svg or .png).
pub fn plot(result: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(result).with_context(|| format!("reading {}", result.display()))?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON object in the file")?;
    let j: Value = serde_json::from_str(line).context("parsing the result")?;
    let rs = rounds(&j)?;
    register_font()?;
    let size = (1000, 1100);
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(SVGBackend::new(out, size).into_drawing_area(), &j, &rs),
        Some("png") => draw(BitMapBackend::new(out, size).into_drawing_area(), &j, &rs),
        _ => bail!("the output must end in .svg or .png"),
    }
}

/// Bytes sent per round on a logarithmic scale: round 0 sends all of memory and later rounds
/// only what was dirtied, often a thousandth of it or less, which a linear scale flattens to
/// nothing. Each bar is labelled with its size; a round that sent nothing has no bar and a
/// `0 B` label on the floor.
fn bytes_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, rs: &[Round]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (floor, top) = log_range(rs.iter().map(|r| r.bytes));
    let xmax = rs.last().map_or(1.0, |r| r.n) + 0.5;
    let mut c = ChartBuilder::on(area)
        .caption(
            "bytes sent per round (logarithmic scale)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..xmax, (floor..top).log_scale())?;
    c.configure_mesh()
        .x_desc("round (last: stop-and-copy)")
        .y_desc("bytes")
        .x_labels(rs.len().min(20) + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| decimal_bytes(*y))
        .draw()?;
    c.draw_series(rs.iter().filter(|r| r.bytes >= floor).map(|r| {
        let col = if r.last { RED.mix(0.7) } else { BLUE.mix(0.7) };
        Rectangle::new([(r.n - 0.35, floor), (r.n + 0.35, r.bytes)], col.filled())
    }))?;
    c.draw_series(rs.iter().map(|r| {
        Text::new(
            iec(r.bytes as u64),
            (r.n - 0.3, r.bytes.max(floor) * 1.6),
            ("sans-serif", 14),
        )
    }))?;
    Ok(())
}

/// A byte count at a power-of-ten tick, in SI units (`100 kB`, `1 GB`).
fn decimal_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = b;
    let mut u = 0;
    while v >= 999.5 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.0} {}", UNITS[u])
}

/// The range of a log axis that shows every positive value: from the power of ten a decade
/// below the smallest (at least 1) to ten times the largest, with room above for the labels.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo = if lo == f64::MAX { 1.0 } else { lo };
    // A decade below the smallest, so that its bar is a decade tall.
    let floor = 10f64.powf((lo.max(1.0).log10().floor() - 1.0).max(0.0));
    (floor, (hi * 10.0).max(floor * 10.0))
}

#[allow(clippy::too_many_arguments)]
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    unit: &str,
    rs: &[Round],
    ymax: f64,
    color: RGBColor,
    bars: bool,
    value: impl Fn(&Round) -> f64,
) -> Result<
    ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
>
where
    DB::ErrorType: 'static,
{
    let xmax = rs.last().map_or(1.0, |r| r.n) + 0.5;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..xmax, 0.0..(ymax * 1.15).max(1e-3))?;
    c.configure_mesh()
        .x_desc("round (last: stop-and-copy)")
        .y_desc(unit)
        .x_labels(rs.len().min(20) + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    if bars {
        c.draw_series(rs.iter().map(|r| {
            let col = if r.last { RED.mix(0.7) } else { color.mix(0.7) };
            Rectangle::new([(r.n - 0.35, 0.0), (r.n + 0.35, value(r))], col.filled())
        }))?;
        // Small rounds vanish on a linear scale: print every value above its bar.
        c.draw_series(rs.iter().map(|r| {
            Text::new(
                format!("{:.3} {unit}", value(r)),
                (r.n - 0.3, value(r) + ymax * 0.1),
                ("sans-serif", 14),
            )
        }))?;
    } else {
        c.draw_series(LineSeries::new(
            rs.iter().map(|r| (r.n, value(r))),
            color.stroke_width(2),
        ))?;
        c.draw_series(
            rs.iter()
                .map(|r| Circle::new((r.n, value(r)), 4, color.filled())),
        )?;
        c.draw_series(rs.iter().map(|r| {
            Text::new(
                format!("{:.1}", value(r)),
                (r.n + 0.05, value(r) + ymax * 0.06),
                ("sans-serif", 13),
            )
        }))?;
    }
    Ok(c)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, j: &Value, rs: &[Round]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let title = format!(
        "rmig {}: {} in {:.0} ms, downtime {:.1} ms, {}",
        j["run"]["mode"].as_str().unwrap_or("run"),
        j["status"].as_str().unwrap_or("?"),
        j["total_time_ms"].as_f64().unwrap_or(0.0),
        j["downtime_ms"].as_f64().unwrap_or(0.0),
        match j["verified"].as_bool() {
            Some(true) => "verified",
            Some(false) => "NOT verified",
            None => "verification off",
        }
    );
    let (top, body) = root.split_vertically(40);
    top.titled(&title, ("sans-serif", 24))?;
    let areas = body.split_evenly((4, 1));
    let max = |f: &dyn Fn(&Round) -> f64| rs.iter().map(f).fold(0.0, f64::max);
    bytes_panel(&areas[0], rs)?;
    panel(
        &areas[1],
        "dirty rate while the round ran",
        "MB/s",
        rs,
        max(&|r| r.dirty),
        MAGENTA,
        false,
        |r| r.dirty,
    )?;
    panel(
        &areas[2],
        "bandwidth measured in the round",
        "MB/s",
        rs,
        max(&|r| r.bw),
        GREEN,
        false,
        |r| r.bw,
    )?;
    let limit = j["run"]["downtime_limit_ms"].as_f64().unwrap_or(300.0);
    let downtime = j["downtime_ms"].as_f64().unwrap_or(0.0);
    let ymax = max(&|r| r.expected).max(limit).max(downtime);
    let mut c = panel(
        &areas[3],
        "expected downtime after the round vs the limit",
        "ms",
        rs,
        ymax,
        BLACK,
        false,
        |r| r.expected,
    )?;
    let xmax = rs.last().map_or(1.0, |r| r.n) + 0.5;
    c.draw_series(LineSeries::new(
        [(-0.5, limit), (xmax, limit)],
        RED.stroke_width(2),
    ))?
    .label(format!("downtime limit {limit:.0} ms"))
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    if let Some(last) = rs.last() {
        c.draw_series([TriangleMarker::new((last.n, downtime), 8, RED.filled())])?
            .label(format!("measured downtime {downtime:.1} ms"))
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, RED.filled()));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_axis_shows_the_smallest_and_largest_round() {
        let (floor, top) = log_range([2.0e9, 4096.0 * 3.0, 0.0].into_iter());
        assert_eq!(floor, 1e3);
        assert!(top >= 2.0e10, "{top}");
        assert_eq!(log_range(std::iter::empty()), (1.0, 10.0));
        assert_eq!(log_range([0.5].into_iter()).0, 1.0);
        assert_eq!(decimal_bytes(1e5), "100 kB");
        assert_eq!(decimal_bytes(1e9), "1 GB");
        assert_eq!(decimal_bytes(10.0), "10 B");
    }

    #[test]
    fn a_round_a_millionth_of_round_0_still_has_a_bar() {
        let dir = std::env::temp_dir().join(format!("rmig-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let result = dir.join("r.json");
        let round = |n: u32, bytes: u64, last: bool| {
            serde_json::json!({"round": n, "last": last, "bytes": bytes, "dirty_rate": 1e6,
                "mbps": 8000.0, "expected_downtime_ms": 1.0})
        };
        let j = serde_json::json!({"status": "completed", "total_time_ms": 900.0,
            "downtime_ms": 2.0, "verified": true, "run": {"mode": "loopback"},
            "rounds": [round(0, 2 << 30, false), round(1, 2 << 20, false),
                round(2, 2 << 10, true)]});
        std::fs::write(&result, j.to_string()).unwrap();
        let svg = dir.join("p.svg");
        plot(&result, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        // The bars of the bytes panel: blue, and red for the stop-and-copy round.
        let heights: Vec<f64> = text
            .split("<rect ")
            .skip(1)
            .filter(|r| r.contains("opacity=\"0.7\""))
            .map(|r| {
                let h = r.split("height=\"").nth(1).unwrap();
                h[..h.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert_eq!(heights.len(), 3, "{heights:?}");
        assert!(heights.iter().all(|h| *h >= 20.0), "{heights:?}");
        assert!(
            heights[0] > heights[1] && heights[1] > heights[2],
            "{heights:?}"
        );
        // Labels are SVG text in a generic family: no font file is named or needed.
        assert!(text.contains("font-family=\"sans-serif\""));
        assert!(!text.contains(".ttf"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
