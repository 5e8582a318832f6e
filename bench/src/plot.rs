//! `rmig-bench plot`: one picture of a run, round by round: bytes sent, dirty rate, bandwidth,
//! and the expected downtime against the limit (with the real downtime at the end).

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

/// Fonts tried for the labels (Debian's fonts-dejavu-core first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVu Sans font found (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("cannot load the font {path}"))?;
    Ok(())
}

struct Round {
    n: f64,
    last: bool,
    mb: f64,
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
            mb: r["bytes"].as_f64().unwrap_or(0.0) / 1e6,
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
    panel(
        &areas[0],
        "bytes sent per round",
        "MB",
        rs,
        max(&|r| r.mb),
        BLUE,
        true,
        |r| r.mb,
    )?;
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
