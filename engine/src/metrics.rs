//! The engine's figures as metrics (the `metrics` crate facade), for Prometheus and the like.
//!
//! Names follow Prometheus conventions: `rmig_` prefix, unit in the name, `_total` for
//! counters. With no recorder installed every call is a no-op on a static, so an embedder that
//! does not care pays nothing. Handles are taken once per lane, not per batch.

use metrics::{counter, gauge, histogram, Counter};

/// Per-lane counters of a source lane.
pub(crate) struct LaneMetrics {
    pub bytes: Counter,
    pub normal_pages: Counter,
    pub zero_pages: Counter,
    pub batches: Counter,
}

impl LaneMetrics {
    pub fn new(transport: &'static str, lane: usize) -> Self {
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
    gauge!("rmig_round").set(round as f64);
    gauge!("rmig_remaining_bytes").set(bytes as f64);
}

/// A lane failed.
pub(crate) fn lane_failed(transport: &'static str) {
    counter!("rmig_lane_failures_total", "transport" => transport).increment(1);
}

/// The embedder was asked to throttle.
pub(crate) fn throttle(percent: u8) {
    gauge!("rmig_throttle_percent").set(percent as f64);
}

/// Setup finished.
pub(crate) fn setup_done(seconds: f64, lanes: usize, total: u64) {
    gauge!("rmig_setup_seconds").set(seconds);
    gauge!("rmig_lanes").set(lanes as f64);
    gauge!("rmig_ram_total_bytes").set(total as f64);
    counter!("rmig_transport_fallbacks_total").absolute(0);
}

/// A migration ended with `status`.
pub(crate) fn finished(status: &'static str, downtime_s: Option<f64>) {
    counter!("rmig_migrations_total", "status" => status).increment(1);
    if let Some(d) = downtime_s {
        gauge!("rmig_downtime_seconds").set(d);
    }
}

/// Destination: bytes landed on a lane.
pub(crate) fn received(bytes: u64) {
    counter!("rmig_received_bytes_total").increment(bytes);
}
