//! Progress that does not lie: a bar on a terminal and JSON lines for machines.
//!
//! Both show the round, what is left, the current rate and a time to switchover derived from
//! measured bandwidth and dirty rate. When the guest dirties faster than rmig sends, the
//! remainder grows; the display then says so instead of running backwards.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rmig_engine::Monitor;
use serde::Serialize;

/// One line of `--progress-json`: `kind` is `tick` (live figures) or `round` (a round that
/// just ended, with its own figures).
#[derive(Debug, Serialize)]
struct Line<'a> {
    kind: &'static str,
    t_ms: f64,
    status: &'a str,
    round: u32,
    transferred: u64,
    total: u64,
    remaining: u64,
    rate: f64,
    bandwidth: f64,
    dirty_rate: f64,
    eta_switchover_s: Option<f64>,
    growing: bool,
}

/// Watches `monitor` until `done()`: a bar on a terminal stderr, JSON lines into `json` (one
/// per round and at least one a second).
pub fn watch(
    monitor: &Monitor,
    json: Option<&std::path::Path>,
    done: impl Fn() -> bool,
) -> Result<()> {
    let mut out = match json {
        Some(p) => Some(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} round {prefix} [{bar:30}] {bytes}/{total_bytes} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    });
    let start = Instant::now();
    let (mut t0, mut b0, mut rate) = (Instant::now(), 0u64, 0.0);
    let mut last_line: Option<(Instant, u32)> = None;
    let mut rounds_seen = 0;
    loop {
        let finished = done();
        let p = monitor.progress();
        let dt = t0.elapsed().as_secs_f64();
        if dt >= 0.25 {
            rate = p.transferred.saturating_sub(b0) as f64 / dt;
            (t0, b0) = (Instant::now(), p.transferred);
        }
        if let Some(b) = &bar {
            b.set_length(p.total.max(p.transferred).max(1));
            b.set_position(p.transferred);
            b.set_prefix(p.round.to_string());
            let eta = if p.growing {
                format!(
                    "dirty set growing: guest dirties {:.0} MB/s, rmig sends {:.0} MB/s",
                    p.dirty_rate / 1e6,
                    p.bandwidth / 1e6
                )
            } else {
                match p.eta_switchover_s {
                    Some(s) => format!("switchover in ~{s:.1} s"),
                    None => "measuring".into(),
                }
            };
            b.set_message(format!(
                "{:.2} GB/s, {:.1} MB left, {eta}",
                rate / 1e9,
                p.remaining as f64 / 1e6
            ));
        }
        if let Some(f) = out.as_mut() {
            let due = match last_line {
                None => true,
                Some((t, r)) => r != p.round || t.elapsed() >= Duration::from_secs(1),
            };
            let stats = monitor.stats();
            for r in stats.rounds.iter().skip(rounds_seen) {
                let line = Line {
                    kind: "round",
                    t_ms: start.elapsed().as_secs_f64() * 1e3,
                    status: stats.status.name(),
                    round: r.round,
                    transferred: p.transferred,
                    total: p.total,
                    remaining: r.remaining,
                    rate: r.mbps * 1e6 / 8.0,
                    bandwidth: r.mbps * 1e6 / 8.0,
                    dirty_rate: r.dirty_rate,
                    eta_switchover_s: None,
                    growing: r.dirty_rate >= r.mbps * 1e6 / 8.0,
                };
                writeln!(f, "{}", serde_json::to_string(&line)?)?;
            }
            rounds_seen = stats.rounds.len();
            if due || finished {
                let status = stats.status;
                let line = Line {
                    kind: "tick",
                    t_ms: start.elapsed().as_secs_f64() * 1e3,
                    status: status.name(),
                    round: p.round,
                    transferred: p.transferred,
                    total: p.total,
                    remaining: if finished { 0 } else { p.remaining },
                    rate,
                    bandwidth: p.bandwidth,
                    dirty_rate: p.dirty_rate,
                    eta_switchover_s: p.eta_switchover_s,
                    growing: p.growing,
                };
                writeln!(f, "{}", serde_json::to_string(&line)?)?;
                f.flush()?;
                last_line = Some((Instant::now(), p.round));
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}
