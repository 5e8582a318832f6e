//! What the bench prints: one JSON object, or a human table.

use rmig_engine::MigrationStats;
use serde::Serialize;

use crate::mem::Fill;

/// The workload and setup that produced a result.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `loopback`, `source` or `dest`.
    pub mode: &'static str,
    /// Bytes of guest memory.
    pub size: u64,
    /// Page size.
    pub page_size: u64,
    /// How memory was filled.
    pub fill: Fill,
    /// Fraction of zero pages (mixed fill).
    pub zero_fraction: f64,
    /// Writers' dirty rate, MB/s.
    pub dirty_rate_mbs: f64,
    /// Fraction of memory the writers touch.
    pub hot_set: f64,
    /// Destination memory populated before the migration (`-mem-prealloc`).
    pub prealloc: bool,
    /// Whether end-to-end verification was on.
    pub verify: bool,
    /// Pages the writers dirtied while the migration ran.
    pub pages_dirtied: u64,
    /// The downtime ceiling asked for, ms.
    pub downtime_limit_ms: u64,
    /// Time to allocate and fill the source (not part of the migration).
    pub source_prepare_ms: f64,
    /// Time to allocate the destination (not part of the migration).
    pub dest_prepare_ms: f64,
    /// Where guest memory asked for transparent huge pages (`--thp`).
    pub thp: crate::Thp,
    /// Bytes of source memory in huge pages when the migration started (0 when not known).
    pub source_huge_bytes: u64,
    /// Bytes of destination memory in huge pages when the migration started.
    pub dest_huge_bytes: u64,
}

/// One bench result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The migration's statistics, at the top level like `query-migrate`.
    #[serde(flatten)]
    pub stats: MigrationStats,
    /// Byte-for-byte comparison of the two memories after the migration (loopback only).
    pub memory_equal: Option<bool>,
    /// Data rate in bytes/s: `ram.transferred` over `total_time_ms - setup_time_ms`.
    pub data_rate: f64,
    /// CPU seconds (user and system, all threads of this process) spent while the migration
    /// ran; in `loopback` that is both ends.
    pub cpu_seconds: f64,
    /// How the run was set up.
    pub run: RunInfo,
}

impl Report {
    /// Builds a report, computing the data rate.
    pub fn new(
        stats: MigrationStats,
        memory_equal: Option<bool>,
        cpu_seconds: f64,
        run: RunInfo,
    ) -> Report {
        let secs = (stats.total_time_ms - stats.setup_time_ms) / 1e3;
        let data_rate = if secs > 0.0 {
            stats.ram.transferred as f64 / secs
        } else {
            0.0
        };
        Report {
            stats,
            memory_equal,
            data_rate,
            cpu_seconds,
            run,
        }
    }

    /// Whether the run succeeded: completed, verified (when on), memories equal (when known).
    pub fn ok(&self) -> bool {
        self.stats.status == rmig_engine::MigrationStatus::Completed
            && self.stats.verified != Some(false)
            && (!self.run.verify || self.stats.verified == Some(true) || self.run.mode == "dest")
            && self.memory_equal != Some(false)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let s = &self.stats;
        let gb = |b: f64| b / 1e9;
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("{k:<22} {v}\n"));
        row("status", s.status.to_string());
        if let Some(e) = &s.error {
            row("error", e.clone());
        }
        row(
            "workload",
            format!(
                "{:.2} GiB, {:?} fill, page {} B, dirty {} MB/s over {:.0}% of memory",
                self.run.size as f64 / (1u64 << 30) as f64,
                self.run.fill,
                self.run.page_size,
                self.run.dirty_rate_mbs,
                self.run.hot_set * 100.0
            ),
        );
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        row(
            "host pages",
            if self.run.thp == crate::Thp::Off {
                "4 KiB (--thp off)".into()
            } else {
                format!(
                    "transparent huge pages (--thp {}): {:.2} GiB of the source and {:.2} GiB \
                     of the destination in huge pages",
                    if self.run.thp == crate::Thp::On {
                        "on"
                    } else {
                        "auto"
                    },
                    gib(self.run.source_huge_bytes),
                    gib(self.run.dest_huge_bytes)
                )
            },
        );
        row(
            "destination memory",
            if self.run.prealloc {
                "preallocated (faulted in before the migration)".into()
            } else {
                "not preallocated (faulted in during the migration)".into()
            },
        );
        row(
            "transport",
            format!(
                "{} x {} lanes ({} failed)",
                s.transport, s.lanes, s.lanes_failed
            ),
        );
        if let Some(f) = &s.fallback_reason {
            row("fallback reason", f.clone());
        }
        if let Some(r) = &s.rdma {
            row(
                "rdma",
                format!(
                    "{} port {} GID index {}, {} registration ({:.1} ms)",
                    r.device, r.port, r.gid_index, r.registration, r.registration_ms
                ),
            );
        }
        row("total time", format!("{:.1} ms", s.total_time_ms));
        row(
            "cpu time",
            format!(
                "{:.2} s (this process, during the migration)",
                self.cpu_seconds
            ),
        );
        row("setup time", format!("{:.1} ms", s.setup_time_ms));
        row(
            "downtime",
            format!(
                "{:.1} ms (expected {:.1} ms)",
                s.downtime_ms, s.expected_downtime_ms
            ),
        );
        row(
            "transferred",
            format!(
                "{:.3} GB at {:.2} GB/s ({:.0} Mbit/s)",
                gb(s.ram.transferred as f64),
                gb(self.data_rate),
                s.ram.mbps
            ),
        );
        row(
            "pages",
            format!(
                "{} normal, {} zero (markers)",
                s.ram.normal, s.ram.duplicate
            ),
        );
        row(
            "verified",
            match s.verified {
                Some(v) => v.to_string(),
                None => "off".into(),
            },
        );
        if let Some(eq) = self.memory_equal {
            row("memory equal", eq.to_string());
        }
        if s.cpu_throttle_percentage > 0 {
            row("throttle", format!("{}%", s.cpu_throttle_percentage));
        }
        o.push_str(&format!(
            "\n{:>5} {:>10} {:>10} {:>12} {:>10} {:>12} {:>12} {:>10}\n",
            "round", "pages", "zero", "bytes", "ms", "Mbit/s", "dirty MB/s", "exp. ms"
        ));
        for r in &s.rounds {
            o.push_str(&format!(
                "{:>5} {:>10} {:>10} {:>12} {:>10.1} {:>12.0} {:>12.1} {:>10.1}{}\n",
                r.round,
                r.pages,
                r.zero_pages,
                r.bytes,
                r.duration_ms,
                r.mbps,
                r.dirty_rate / 1e6,
                r.expected_downtime_ms,
                if r.last { "  (stop-and-copy)" } else { "" }
            ));
        }
        o
    }
}
