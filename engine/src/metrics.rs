//! The engine's figures as metrics (the `metrics` crate facade), for Prometheus and the like.
//!
//! Names follow Prometheus conventions: `rmig_` prefix, base unit in the name (seconds, bytes,
//! ratios in 0..1), `_total` for counters. With no recorder installed every call is a no-op on
//! a static, so an embedder that does not care pays nothing. Handles are taken once per lane,
//! not per batch. Every metric is described (Prometheus `# HELP`) the first time a migration
//! reports anything, so the description reaches whatever recorder is installed by then.

use std::sync::Once;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Unit};

/// What a metric is, for its description.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: its kind, name, unit and help text (Prometheus `# HELP`).
const METRICS: &[(Kind, &str, Unit, &str)] = &[
    (
        Kind::Counter,
        "rmig_sent_bytes_total",
        Unit::Bytes,
        "Bytes put on the wire by the source, per lane.",
    ),
    (
        Kind::Counter,
        "rmig_sent_pages_total",
        Unit::Count,
        "Pages sent by the source, per lane and kind (normal or zero).",
    ),
    (
        Kind::Counter,
        "rmig_acked_batches_total",
        Unit::Count,
        "Batches the destination acknowledged, per lane.",
    ),
    (
        Kind::Counter,
        "rmig_rounds_total",
        Unit::Count,
        "Pre-copy rounds finished (the stop-and-copy included).",
    ),
    (
        Kind::Counter,
        "rmig_lane_failures_total",
        Unit::Count,
        "Data lanes that failed, per transport.",
    ),
    (
        Kind::Counter,
        "rmig_transport_fallbacks_total",
        Unit::Count,
        "Times RDMA lanes were replaced by TCP lanes.",
    ),
    (
        Kind::Counter,
        "rmig_migrations_total",
        Unit::Count,
        "Migrations ended, per status.",
    ),
    (
        Kind::Counter,
        "rmig_received_bytes_total",
        Unit::Bytes,
        "Page bytes landed in destination memory.",
    ),
    (
        Kind::Gauge,
        "rmig_round",
        Unit::Count,
        "The current round (0 sends all of memory).",
    ),
    (
        Kind::Gauge,
        "rmig_remaining_bytes",
        Unit::Bytes,
        "Dirty bytes still to send.",
    ),
    (
        Kind::Gauge,
        "rmig_dirty_rate_bytes_per_second",
        Unit::Bytes,
        "Rate at which the guest dirtied memory in the last round.",
    ),
    (
        Kind::Gauge,
        "rmig_bandwidth_bytes_per_second",
        Unit::Bytes,
        "Measured sending rate.",
    ),
    (
        Kind::Gauge,
        "rmig_expected_downtime_seconds",
        Unit::Seconds,
        "Downtime expected if the switchover came now.",
    ),
    (
        Kind::Gauge,
        "rmig_throttle_ratio",
        Unit::Count,
        "Share of guest CPU time taken away by auto-converge (0 to 1).",
    ),
    (
        Kind::Gauge,
        "rmig_setup_seconds",
        Unit::Seconds,
        "Time to connect, authenticate and open the lanes.",
    ),
    (Kind::Gauge, "rmig_lanes", Unit::Count, "Data lanes opened."),
    (
        Kind::Gauge,
        "rmig_ram_total_bytes",
        Unit::Bytes,
        "Guest memory migrated.",
    ),
    (
        Kind::Gauge,
        "rmig_downtime_seconds",
        Unit::Seconds,
        "Downtime of the last completed migration.",
    ),
    (
        Kind::Gauge,
        "rmig_build_info",
        Unit::Count,
        "Always 1; the labels say which rmig this is.",
    ),
    (
        Kind::Histogram,
        "rmig_round_duration_seconds",
        Unit::Seconds,
        "Wall time of each round.",
    ),
];

/// Describes every metric once per process, and sets `rmig_build_info`.
fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for &(kind, name, unit, help) in METRICS {
            match kind {
                Kind::Counter => describe_counter!(name, unit, help),
                Kind::Gauge => describe_gauge!(name, unit, help),
                Kind::Histogram => describe_histogram!(name, unit, help),
            }
        }
        gauge!("rmig_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    });
}

/// Per-lane counters of a source lane.
pub(crate) struct LaneMetrics {
    pub bytes: Counter,
    pub normal_pages: Counter,
    pub zero_pages: Counter,
    pub batches: Counter,
}

impl LaneMetrics {
    pub fn new(transport: &'static str, lane: usize) -> Self {
        describe();
        let l = lane.to_string();
        LaneMetrics {
            bytes: counter!("rmig_sent_bytes_total", "transport" => transport, "lane" => l.clone()),
            normal_pages: counter!("rmig_sent_pages_total", "transport" => transport, "lane" => l.clone(), "kind" => "normal"),
            zero_pages: counter!("rmig_sent_pages_total", "transport" => transport, "lane" => l.clone(), "kind" => "zero"),
            batches: counter!("rmig_acked_batches_total", "transport" => transport, "lane" => l),
        }
    }
}

/// Figures of a finished round.
pub(crate) fn round_done(
    dirty_rate: f64,
    bandwidth: f64,
    expected_downtime_s: f64,
    remaining: u64,
    duration_s: f64,
) {
    counter!("rmig_rounds_total").increment(1);
    gauge!("rmig_dirty_rate_bytes_per_second").set(dirty_rate);
    gauge!("rmig_bandwidth_bytes_per_second").set(bandwidth);
    gauge!("rmig_expected_downtime_seconds").set(expected_downtime_s);
    gauge!("rmig_remaining_bytes").set(remaining as f64);
    histogram!("rmig_round_duration_seconds").record(duration_s);
}

/// A round started with `round` as its number.
pub(crate) fn round_started(round: u32, bytes: u64) {
    describe();
    gauge!("rmig_round").set(round as f64);
    gauge!("rmig_remaining_bytes").set(bytes as f64);
}

/// A lane failed.
pub(crate) fn lane_failed(transport: &'static str) {
    counter!("rmig_lane_failures_total", "transport" => transport).increment(1);
}

/// The embedder was asked to throttle.
pub(crate) fn throttle(percent: u8) {
    gauge!("rmig_throttle_ratio").set(f64::from(percent) / 100.0);
}

/// Setup finished.
pub(crate) fn setup_done(seconds: f64, lanes: usize, total: u64) {
    describe();
    gauge!("rmig_setup_seconds").set(seconds);
    gauge!("rmig_lanes").set(lanes as f64);
    gauge!("rmig_ram_total_bytes").set(total as f64);
    counter!("rmig_transport_fallbacks_total").absolute(0);
}

/// A migration ended with `status`.
pub(crate) fn finished(status: &'static str, downtime_s: Option<f64>) {
    describe();
    counter!("rmig_migrations_total", "status" => status).increment(1);
    if let Some(d) = downtime_s {
        gauge!("rmig_downtime_seconds").set(d);
    }
}

/// Destination: bytes landed on a lane.
pub(crate) fn received(bytes: u64) {
    describe();
    counter!("rmig_received_bytes_total").increment(bytes);
}
