//! Progress that does not lie: a bar on a terminal and JSON lines for machines.
//!
//! The source shows the round, what is left, the rate measured from acknowledged bytes and a
//! time to switchover, at least once a second and from the first round on: round 0 is most of
//! a migration, so waiting for a round to end before showing a rate would show nothing for
//! most of the run. When the guest dirties faster than rmig sends, the remainder grows; the
//! display then says so instead of running backwards. The bar covers the current round, so
//! it starts again with each round instead of sitting at 100 % after the first.
//!
//! The destination shows the bytes landed so far, which its engine publishes several times a
//! second while lanes land data, so its lines and gauges move within round 0 too; rounds
//! count as they close.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rmig_engine::{MigrationStats, MigrationStatus, Monitor, Progress, RoundStats};
use serde::Serialize;

use crate::fail::Side;
use crate::parse::{iec, si_rate};

/// One line of `--progress-json`: `kind` is `tick` (live figures) or `round` (a round that
/// just ended, with its own figures). Rates are bytes/s; `mbps` is megabits/s.
#[derive(Debug, Serialize)]
struct Line<'a> {
    kind: &'static str,
    side: &'static str,
    t_ms: f64,
    status: &'a str,
    round: u32,
    transferred: u64,
    total: u64,
    remaining: u64,
    rate: f64,
    bandwidth: f64,
    mbps: f64,
    dirty_rate: f64,
    eta_switchover_s: Option<f64>,
    growing: bool,
}

/// A rate measured over windows of a quarter of a second from a byte counter.
struct Meter {
    t0: Instant,
    b0: u64,
    rate: f64,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            t0: Instant::now(),
            b0: 0,
            rate: 0.0,
        }
    }

    fn sample(&mut self, bytes: u64) -> f64 {
        let dt = self.t0.elapsed().as_secs_f64();
        if dt >= 0.25 {
            self.rate = bytes.saturating_sub(self.b0) as f64 / dt;
            (self.t0, self.b0) = (Instant::now(), bytes);
        }
        self.rate
    }
}

/// Seconds to switchover: the engine's estimate once a round has been measured, else (round
/// 0) what is left over the rate measured now, less the last known dirty rate.
fn eta(p: &Progress, rate: f64) -> Option<f64> {
    p.eta_switchover_s.or_else(|| {
        (rate > 0.0 && rate > p.dirty_rate && !p.growing)
            .then(|| p.remaining as f64 / (rate - p.dirty_rate))
    })
}

/// Megabits/s of one round from its own bytes and duration.
pub fn round_mbps(r: &RoundStats) -> f64 {
    if r.duration_ms > 0.0 {
        r.bytes as f64 * 8.0 / (r.duration_ms * 1e3)
    } else {
        0.0
    }
}

fn bar() -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} round {prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    })
}

/// Watches `monitor` until `done()`: a bar on a terminal stderr, JSON lines into `json` (one
/// per round and at least one a second).
pub fn watch(
    monitor: &Monitor,
    side: Side,
    json: Option<&std::path::Path>,
    done: impl Fn() -> bool,
) -> Result<()> {
    let mut out = match json {
        Some(p) => Some(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let bar = bar();
    let start = Instant::now();
    let mut meter = Meter::new();
    let mut last_line: Option<Instant> = None;
    let mut rounds_seen = 0;
    let mut events = Events::default();
    loop {
        let finished = done();
        let stats = monitor.stats();
        events.tell(&stats, bar.as_ref());
        let mut p = monitor.progress();
        if side == Side::Dest {
            // The destination's figures: what has landed so far (live within a round).
            p.transferred = p.transferred.max(stats.ram.normal_bytes);
            p.total = stats.ram.total;
            p.remaining = p.total.saturating_sub(p.transferred);
            p.round_bytes = p.total;
            p.round_sent = p.transferred;
        }
        let rate = meter.sample(p.transferred);
        let eta_s = eta(&p, rate);
        metrics::gauge!("rmig_remaining_bytes").set(p.remaining as f64);
        metrics::gauge!("rmig_bandwidth_bytes_per_second").set(rate);
        if let Some(b) = &bar {
            show(b, &p, &stats, rate, eta_s);
        }
        if let Some(f) = out.as_mut() {
            for r in stats.rounds.iter().skip(rounds_seen) {
                let line = Line::of_round(r, side, start, &stats, &p);
                writeln!(f, "{}", serde_json::to_string(&line)?)?;
            }
            rounds_seen = stats.rounds.len();
            let due = last_line.is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
            if due || finished {
                let tick = Tick {
                    rate,
                    eta_s,
                    finished,
                };
                let line = Line::tick(side, start, &stats, &p, tick);
                writeln!(f, "{}", serde_json::to_string(&line)?)?;
                f.flush()?;
                last_line = Some(Instant::now());
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

/// What happened to the session that the user should hear of as it happens (the library
/// prints nothing; its statistics say it).
#[derive(Default)]
struct Events {
    reconnects: u64,
    fell_back: bool,
}

impl Events {
    /// Says on stderr (above the bar, if there is one) what is new since the last call.
    fn tell(&mut self, stats: &MigrationStats, bar: Option<&indicatif::ProgressBar>) {
        let mut lines = Vec::new();
        if stats.reconnects > self.reconnects {
            self.reconnects = stats.reconnects;
            lines.push(format!(
                "rmig-bench: the link broke and the session came back (reconnect {})",
                stats.reconnects
            ));
        }
        let fallback = stats.rdma.is_some() && stats.transport == "tcp";
        if fallback && !self.fell_back {
            self.fell_back = true;
            let why = stats
                .fallback_reason
                .as_deref()
                .unwrap_or("every RDMA lane failed");
            lines.push(format!("rmig-bench: continuing over TCP: {why}"));
        }
        for l in lines {
            match bar {
                Some(b) => b.println(l),
                None => eprintln!("{l}"),
            }
        }
    }
}

/// What a tick line adds to the monitor's figures.
struct Tick {
    rate: f64,
    eta_s: Option<f64>,
    finished: bool,
}

impl Line<'static> {
    /// The line of a round that ended.
    fn of_round(
        r: &RoundStats,
        side: Side,
        start: Instant,
        stats: &MigrationStats,
        p: &Progress,
    ) -> Line<'static> {
        let mbps = round_mbps(r);
        Line {
            kind: "round",
            side: side_name(side),
            t_ms: start.elapsed().as_secs_f64() * 1e3,
            status: stats.status.name(),
            round: r.round,
            transferred: p.transferred,
            total: p.total,
            remaining: r.remaining,
            rate: mbps * 1e6 / 8.0,
            bandwidth: mbps * 1e6 / 8.0,
            mbps,
            dirty_rate: r.dirty_rate,
            eta_switchover_s: None,
            growing: r.dirty_rate >= mbps * 1e6 / 8.0,
        }
    }

    /// A line of the figures as they stand (twice a second, and at the end).
    fn tick(
        side: Side,
        start: Instant,
        stats: &MigrationStats,
        p: &Progress,
        t: Tick,
    ) -> Line<'static> {
        Line {
            kind: "tick",
            side: side_name(side),
            t_ms: start.elapsed().as_secs_f64() * 1e3,
            status: stats.status.name(),
            round: p.round,
            transferred: p.transferred,
            total: p.total,
            remaining: if t.finished { 0 } else { p.remaining },
            rate: t.rate,
            bandwidth: if p.bandwidth > 0.0 {
                p.bandwidth
            } else {
                t.rate
            },
            mbps: t.rate * 8.0 / 1e6,
            dirty_rate: p.dirty_rate,
            eta_switchover_s: if t.finished { None } else { t.eta_s },
            growing: p.growing,
        }
    }
}

/// Puts the figures on the progress bar.
fn show(
    b: &indicatif::ProgressBar,
    p: &Progress,
    stats: &MigrationStats,
    rate: f64,
    eta_s: Option<f64>,
) {
    b.set_length(p.round_bytes.max(p.round_sent).max(1));
    b.set_position(p.round_sent);
    b.set_prefix(p.round.to_string());
    b.set_message(match stats.status {
        MigrationStatus::Setup => "setting up: connecting, handshake, lanes".into(),
        MigrationStatus::Device => "guest paused: final copy, device state, verification".into(),
        MigrationStatus::Postcopy => {
            "post-copy: the guest runs on the destination; its missing pages follow".into()
        }
        _ => message(p, rate, eta_s),
    });
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Source => "source",
        Side::Dest => "destination",
    }
}

/// The bar's text: rate, what is left, and the time to switchover or why there is none.
fn message(p: &Progress, rate: f64, eta_s: Option<f64>) -> String {
    let eta = if p.growing {
        format!(
            "dirty set growing: guest dirties {}, rmig sends {}",
            si_rate(p.dirty_rate),
            si_rate(p.bandwidth)
        )
    } else {
        match eta_s {
            Some(s) => format!("switchover in ~{s:.1} s"),
            None => "measuring".into(),
        }
    };
    format!("{}, {} left, {eta}", si_rate(rate), iec(p.remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_rate_is_the_round_s_own() {
        let r = RoundStats {
            bytes: 125_000_000,
            duration_ms: 1000.0,
            mbps: 12345.0, // whatever the engine carried: not used
            ..Default::default()
        };
        assert_eq!(round_mbps(&r), 1000.0);
        assert_eq!(
            round_mbps(&RoundStats {
                duration_ms: 0.0,
                ..r
            }),
            0.0
        );
    }

    #[test]
    fn round_zero_has_an_eta_from_the_measured_rate() {
        let p = Progress {
            remaining: 100_000_000,
            ..Default::default()
        };
        assert_eq!(eta(&p, 50e6), Some(2.0));
        assert_eq!(eta(&p, 0.0), None);
        let growing = Progress {
            growing: true,
            dirty_rate: 60e6,
            ..p
        };
        assert_eq!(eta(&growing, 50e6), None);
    }
}
