//! What the bench prints: one JSON object, or a human table.
//!
//! Each end reports what it knows and nothing else: the source does not know how the
//! destination's memory was prepared, and the destination does not know the workload, so
//! those figures are `null` in the JSON and left out of the table rather than guessed. What
//! the other end knows arrives with its own figures after the handover (`peer` in the JSON,
//! the rows named after that end in the table), as iperf3 shows sender and receiver at both
//! ends. A failed run's table says what did not happen (`not reached`) instead of printing
//! defaults that read like results (`verified off`, `0 Mbit/s`).

use rmig_engine::stats::{LandingReport, PostcopyReport};
use rmig_engine::{MemoryFacts, MigrationStats, MigrationStatus};
use serde::Serialize;

use crate::mem::Fill;
use crate::parse::{iec, si_rate};

/// The workload and setup that produced a result; `None` where this end cannot know.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `loopback`, `source` or `dest`.
    pub mode: &'static str,
    /// Bytes of guest memory.
    pub size: u64,
    /// Page size.
    pub page_size: u64,
    /// How memory was filled.
    pub fill: Option<Fill>,
    /// Fraction of zero pages (mixed fill).
    pub zero_fraction: Option<f64>,
    /// Writers' dirty rate, MB/s.
    pub dirty_rate_mbs: Option<f64>,
    /// Fraction of memory the writers touch.
    pub hot_set: Option<f64>,
    /// Destination memory populated before the migration (`-mem-prealloc`).
    pub prealloc: Option<bool>,
    /// Whether end-to-end verification was on.
    pub verify: bool,
    /// Pages the writers dirtied while the migration ran.
    pub pages_dirtied: Option<u64>,
    /// The downtime ceiling asked for, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Time to allocate and fill the source (not part of the migration).
    pub source_prepare_ms: Option<f64>,
    /// Time to allocate the destination (not part of the migration).
    pub dest_prepare_ms: Option<f64>,
    /// Where guest memory asked for transparent huge pages (`--thp`) on this host.
    pub thp: crate::Thp,
    /// Bytes of source memory in huge pages when the migration started.
    pub source_huge_bytes: Option<u64>,
    /// Bytes of destination memory in huge pages when the migration started.
    pub dest_huge_bytes: Option<u64>,
}

/// The destination's own figures, from its monitor: what landed, and its phases as it saw
/// them (times from the moment the source connected).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DestFigures {
    /// Bytes of page data that landed in guest memory.
    pub received_bytes: u64,
    /// Rounds received (the stop-and-copy round included).
    pub rounds: u64,
    /// `received_bytes` over the time from the end of setup to the end.
    pub rate: f64,
    /// From the start of the stop-and-copy round to the guest's resumption here.
    pub downtime_ms: Option<f64>,
    /// From the connection to the end (waiting for the source left out).
    pub total_ms: Option<f64>,
}

/// What the destination's guest did after it resumed (dest, loopback). After a post-copy
/// switch it ran before all of its memory was there; its writes are why `loopback` leaves
/// pages out of the memory comparison.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DestGuestFigures {
    /// Pages its writers wrote since it resumed (each counted once).
    pub pages_written: u64,
    /// Seconds its writers ran, from the resumption to the end of the run.
    pub seconds: f64,
}

impl DestGuestFigures {
    /// The figures of what the guest wrote.
    pub fn of(w: &crate::guest::Written) -> DestGuestFigures {
        DestGuestFigures {
            pages_written: w.pages,
            seconds: w.seconds,
        }
    }
}

/// One bench result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The migration's statistics, at the top level like `query-migrate`. Each round's
    /// `mbps` is that round's own bytes over its own duration.
    #[serde(flatten)]
    pub stats: MigrationStats,
    /// Byte-for-byte comparison of the two memories after the migration (loopback only), on
    /// every page but those the destination's guest wrote after it resumed.
    pub memory_equal: Option<bool>,
    /// Pages left out of `memory_equal`: written by the destination's guest since it resumed
    /// (loopback; `null` when the memories were not compared).
    pub memory_pages_left_out: Option<u64>,
    /// Data rate in bytes/s: `ram.transferred` over `total_time_ms - setup_time_ms`.
    pub data_rate: f64,
    /// CPU seconds (user and system, all threads of this process) spent while the migration
    /// ran; in `loopback` that is both ends.
    pub cpu_seconds: f64,
    /// `running` or `paused`: the source guest after the run (source and loopback).
    pub source_guest: Option<&'static str>,
    /// The destination's own figures (dest).
    pub dest: Option<DestFigures>,
    /// The destination's post-copy figures (loopback; `postcopy` holds the source's): pages
    /// fetched on fault and in the background, fault latency.
    pub dest_postcopy: Option<PostcopyReport>,
    /// How the destination put pre-copy pages into its memory (loopback; in dest the stats'
    /// own `landing` says it).
    pub dest_landing: Option<LandingReport>,
    /// What the destination's guest did once resumed (dest, loopback; `null` without writers).
    pub dest_guest: Option<DestGuestFigures>,
    /// How the run was set up.
    pub run: RunInfo,
}

impl Report {
    /// Builds a report, computing the data rate and each round's own bandwidth.
    pub fn new(
        mut stats: MigrationStats,
        memory_equal: Option<bool>,
        cpu_seconds: f64,
        run: RunInfo,
    ) -> Report {
        for r in &mut stats.rounds {
            r.mbps = crate::progress::round_mbps(r);
        }
        // A guest lost in post-copy never finished verifying, whatever the pages that landed
        // before the loss matched: the report must not read `verified: true` beside it.
        if stats.status == MigrationStatus::GuestLost {
            stats.verified = None;
        }
        let secs = (stats.total_time_ms - stats.setup_time_ms) / 1e3;
        let data_rate = if secs > 0.0 {
            stats.ram.transferred as f64 / secs
        } else {
            0.0
        };
        Report {
            stats,
            memory_equal,
            memory_pages_left_out: None,
            data_rate,
            cpu_seconds,
            source_guest: None,
            dest: None,
            dest_postcopy: None,
            dest_landing: None,
            dest_guest: None,
            run,
        }
    }

    /// Whether the run succeeded: completed, verified (when on), memories equal (when known).
    pub fn ok(&self) -> bool {
        self.stats.status == MigrationStatus::Completed
            && self.stats.verified != Some(false)
            && (!self.run.verify || self.stats.verified == Some(true) || self.run.mode == "dest")
            && self.memory_equal != Some(false)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let s = &self.stats;
        let mut o = String::new();
        let mut row = |k: &str, v: String| o.push_str(&format!("{k:<22} {v}\n"));
        row("status", s.status.to_string());
        if let Some(e) = &s.error {
            row("error", e.clone());
        }
        for (k, v) in self.setup_rows() {
            row(k, v);
        }
        match self.dest.as_ref().and_then(|d| d.total_ms) {
            Some(t) => row(
                "total time",
                format!(
                    "{t:.1} ms from the connection ({:.1} ms with the wait for the source)",
                    s.total_time_ms
                ),
            ),
            None => row("total time", format!("{:.1} ms", s.total_time_ms)),
        }
        row(
            "cpu time",
            format!(
                "{:.2} s (this process, during the migration)",
                self.cpu_seconds
            ),
        );
        row("setup time", format!("{:.1} ms", s.setup_time_ms));
        for (k, v) in self.result_rows() {
            row(k, v);
        }
        for (k, v) in self.postcopy_rows() {
            row(k, v);
        }
        for (k, v) in self.peer_rows() {
            row(&k, v);
        }
        o.push_str(&self.rounds_table());
        o
    }

    /// What was migrated and how: the workload, memory, transport.
    fn setup_rows(&self) -> Vec<(&'static str, String)> {
        let s = &self.stats;
        let r = &self.run;
        let mut v = Vec::new();
        let mem = format!("{}, page {}", iec(r.size), iec(r.page_size));
        match (r.fill, r.dirty_rate_mbs, r.hot_set) {
            (Some(fill), Some(d), Some(h)) => v.push((
                "workload",
                if d > 0.0 {
                    format!(
                        "{mem}, {fill:?} fill, dirty {} over {:.0}% of memory",
                        si_rate(d * 1e6),
                        h * 100.0
                    )
                } else {
                    format!("{mem}, {fill:?} fill, no writers")
                },
            )),
            _ => v.push(("guest memory", mem)),
        }
        if let Some(h) = r.source_huge_bytes {
            v.push(("source pages", host_pages(r.thp, h)));
        }
        // In loopback both ends are this process: the destination's word is in its rows below.
        let peer_says = s.peer.is_some() && r.mode != "dest";
        if let Some(h) = r.dest_huge_bytes.filter(|_| !peer_says) {
            v.push(("destination pages", host_pages(r.thp, h)));
        }
        if let Some(p) = r.prealloc.filter(|_| !peer_says) {
            v.push((
                "destination memory",
                if p {
                    "preallocated (faulted in before the migration)".into()
                } else {
                    "not preallocated (faulted in during the migration)".into()
                },
            ));
        }
        if let Some(l) = s.landing.as_ref().or(self.dest_landing.as_ref()) {
            v.push(("landing", landing(l)));
        }
        if s.lanes > 0 {
            v.push((
                "transport",
                format!(
                    "{} x {} lanes ({} failed)",
                    s.transport, s.lanes, s.lanes_failed
                ),
            ));
        }
        let enc = match s.encryption.as_str() {
            "tls-psk" => "tls-psk (TLS 1.3, pre-shared key proven on each connection)",
            "tls-x509" => "tls-x509 (TLS 1.3, mutual certificates)",
            "off" => "off (cleartext: anyone on the path can read and change guest memory)",
            other => other,
        };
        if !enc.is_empty() {
            v.push(("encryption", enc.to_string()));
        }
        if s.encryption != "off" && !s.encryption.is_empty() && !s.data_lanes_encrypted {
            let why = "cleartext (RDMA, --rdma-cleartext-lanes): guest pages crossed the \
                       network unencrypted; the control connection and the lanes' key \
                       exchange were TLS";
            v.push(("data lanes", why.to_string()));
        }
        if let Some(f) = &s.fallback_reason {
            v.push(("fallback reason", f.clone()));
        }
        if let Some(r) = &s.rdma {
            v.push((
                "rdma",
                format!(
                    "{} port {} GID index {}, {} registration ({:.1} ms)",
                    r.device, r.port, r.gid_index, r.registration, r.registration_ms
                ),
            ));
        }
        v
    }

    /// What came of it: downtime, bytes, verification.
    fn result_rows(&self) -> Vec<(&'static str, String)> {
        let s = &self.stats;
        let done = s.status == MigrationStatus::Completed;
        let mut v = Vec::new();
        if let Some(d) = &self.dest {
            v.push((
                "received",
                format!(
                    "{} in {} round(s){}",
                    iec(d.received_bytes),
                    d.rounds,
                    if d.rate > 0.0 {
                        format!(" at {}", si_rate(d.rate))
                    } else {
                        String::new()
                    }
                ),
            ));
            if let Some(t) = d.downtime_ms {
                v.push(("downtime", format!("{t:.1} ms (as seen here)")));
            }
        } else if done || s.downtime_ms > 0.0 {
            v.push((
                "downtime",
                format!(
                    "{:.1} ms (expected {:.1} ms)",
                    s.downtime_ms, s.expected_downtime_ms
                ),
            ));
        } else {
            v.push(("downtime", "none (the guest was not paused)".into()));
        }
        if self.dest.is_none() {
            let rate = if self.data_rate > 0.0 && s.ram.transferred > 0 {
                format!(" at {}", si_rate(self.data_rate))
            } else {
                String::new()
            };
            v.push((
                "transferred",
                format!(
                    "{}{rate}{}",
                    iec(s.ram.transferred),
                    if done { "" } else { " before the run ended" }
                ),
            ));
            v.push((
                "pages",
                format!(
                    "{} normal, {} zero (markers)",
                    s.ram.normal, s.ram.duplicate
                ),
            ));
        }
        v.push((
            "verified",
            match (s.verified, self.run.verify || !done) {
                (Some(v), _) => v.to_string(),
                (None, false) => "off".into(),
                (None, true) => "not reached".into(),
            },
        ));
        if let Some(eq) = self.memory_row() {
            v.push(("memory equal", eq));
        }
        if let Some(g) = self.source_guest {
            v.push(("source guest", g.into()));
        }
        if s.cpu_throttle_percentage > 0 {
            v.push(("throttle", format!("{}%", s.cpu_throttle_percentage)));
        }
        v
    }

    /// Whether both ends' memories were equal, and on which pages (after post-copy the
    /// destination's guest wrote some, which are left out).
    fn memory_row(&self) -> Option<String> {
        let eq = self.memory_equal?;
        Some(match self.memory_pages_left_out {
            Some(n) if n > 0 => format!(
                "{eq} on every page but the {n} the destination's guest wrote since it resumed \
                 (left out)"
            ),
            _ => eq.to_string(),
        })
    }

    /// The post-copy phase: its length, where the pages left at the switch came from, and
    /// how long the destination's guest waited on a fault. The source's own figures count the
    /// pages it served on request; the fault figures are the destination's.
    fn postcopy_rows(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        let own = self.stats.postcopy.as_ref();
        let here_is_dest = self.run.mode == "dest";
        if let Some(p) = own.filter(|_| !here_is_dest) {
            v.push(("post-copy", phase(p)));
            v.push((
                "post-copy pages",
                format!(
                    "{} left at the switch: {} served on request, {} sent in the background",
                    p.pages_at_switch, p.pages_on_fault, p.pages_background
                ),
            ));
        }
        let dest = if here_is_dest {
            own
        } else {
            self.dest_postcopy.as_ref()
        };
        if let Some(p) = dest {
            if here_is_dest {
                v.push(("post-copy", phase(p)));
            }
            v.push((
                "post-copy landed",
                format!(
                    "{} pages missing at the switch: {} fetched on fault, {} in the background{}",
                    p.pages_at_switch,
                    p.pages_on_fault,
                    p.pages_background,
                    if here_is_dest { "" } else { " (destination)" }
                ),
            ));
            v.push((
                "fault latency",
                format!(
                    "{} faults: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
                    p.faults, p.fault_p50_us, p.fault_p99_us, p.fault_max_us
                ),
            ));
        }
        if let Some(g) = &self.dest_guest {
            v.push((
                "destination guest",
                format!(
                    "wrote {} pages in {:.1} s after it resumed",
                    g.pages_written, g.seconds
                ),
            ));
        }
        v
    }

    /// The other end's own figures, as it sent them after the handover.
    fn peer_rows(&self) -> Vec<(String, String)> {
        let Some(p) = &self.stats.peer else {
            return Vec::new();
        };
        let (other, moved) = match self.run.mode {
            "dest" => ("source", "sent"),
            _ => ("destination", "received"),
        };
        let ms = |us: u64| us as f64 / 1e3;
        let mut v = vec![
            (
                format!("{other} {moved}"),
                format!(
                    "{} in {} round(s){} (as it reported)",
                    iec(p.page_bytes),
                    p.rounds,
                    if p.rate > 0 {
                        format!(" at {}", si_rate(p.rate as f64))
                    } else {
                        String::new()
                    }
                ),
            ),
            (
                format!("{other} downtime"),
                format!("{:.1} ms (as seen there)", ms(p.downtime_us)),
            ),
            (
                format!("{other} times"),
                format!(
                    "setup {:.1} ms, total {:.1} ms (from its connection)",
                    ms(p.setup_us),
                    ms(p.total_us)
                ),
            ),
        ];
        if let Some(m) = memory_facts(other, &p.memory) {
            v.push((format!("{other} memory"), m));
        }
        v
    }

    /// One line per round.
    fn rounds_table(&self) -> String {
        let s = &self.stats;
        if s.rounds.is_empty() {
            return String::new();
        }
        let mut o = format!(
            "\n{:>5} {:>10} {:>10} {:>11} {:>10} {:>11} {:>11} {:>10}\n",
            "round", "pages", "zero", "bytes", "ms", "rate", "dirty", "exp. ms"
        );
        for r in &s.rounds {
            o.push_str(&format!(
                "{:>5} {:>10} {:>10} {:>11} {:>10.1} {:>11} {:>11} {:>10.1}{}\n",
                r.round,
                r.pages,
                r.zero_pages,
                iec(r.bytes),
                r.duration_ms,
                si_rate(r.mbps * 1e6 / 8.0),
                si_rate(r.dirty_rate),
                r.expected_downtime_ms,
                match (r.last, s.postcopy.is_some()) {
                    (true, false) => "  (stop-and-copy)",
                    (true, true) => "  (post-copy: after the switch)",
                    _ => "",
                }
            ));
        }
        o
    }
}

/// A post-copy phase's length in words.
/// How the destination put pre-copy pages into its memory, in words.
fn landing(l: &LandingReport) -> String {
    match &l.why_not {
        None => format!(
            "{}: {} pages placed without a page fault, {} touched first (zero page)",
            l.method, l.placed_pages, l.zero_filled_pages
        ),
        Some(why) => format!("{} into place ({why})", l.method),
    }
}

fn phase(p: &PostcopyReport) -> String {
    format!(
        "{:.1} ms from the destination's resumption to the last page",
        p.duration_ms
    )
}

/// How an end's memory was prepared, in words; `None` when it stated nothing.
fn memory_facts(end: &str, m: &MemoryFacts) -> Option<String> {
    let mut parts = Vec::new();
    match (m.prefaulted, end) {
        (Some(true), "destination") => parts.push("preallocated".to_string()),
        (Some(false), "destination") => parts.push("not preallocated".to_string()),
        (Some(true), _) => parts.push("prefaulted".to_string()),
        (Some(false), _) => parts.push("not prefaulted".to_string()),
        (None, _) => {}
    }
    if let Some(h) = m.huge_bytes {
        parts.push(format!("{} in huge pages", iec(h)));
    }
    let mut text = parts.join(", ");
    if !m.huge_pages.is_empty() {
        text = format!("{text} ({})", m.huge_pages)
            .trim_start()
            .to_string();
    }
    (!text.is_empty()).then_some(text)
}

/// This end's memory facts as the bench states them to the engine (and so to the peer).
pub fn facts(prefaulted: bool, huge_bytes: u64, thp: crate::Thp) -> MemoryFacts {
    MemoryFacts {
        prefaulted: Some(prefaulted),
        huge_bytes: Some(huge_bytes),
        huge_pages: format!(
            "--thp {}",
            match thp {
                crate::Thp::On => "on",
                crate::Thp::Off => "off",
                crate::Thp::Auto => "auto",
            }
        ),
    }
}

/// Host page facts of one end's memory.
fn host_pages(thp: crate::Thp, huge: u64) -> String {
    match thp {
        crate::Thp::Off => "4 KiB (--thp off)".into(),
        t => format!(
            "{} in transparent huge pages (--thp {})",
            iec(huge),
            if t == crate::Thp::On { "on" } else { "auto" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmig_engine::EndFigures;

    fn run(mode: &'static str) -> RunInfo {
        RunInfo {
            mode,
            size: 64 << 20,
            page_size: 4096,
            fill: None,
            zero_fraction: None,
            dirty_rate_mbs: None,
            hot_set: None,
            prealloc: None,
            verify: true,
            pages_dirtied: None,
            downtime_limit_ms: None,
            source_prepare_ms: None,
            dest_prepare_ms: None,
            thp: crate::Thp::Auto,
            source_huge_bytes: Some(0),
            dest_huge_bytes: None,
        }
    }

    #[test]
    fn a_failed_run_does_not_read_like_a_result() {
        let stats = MigrationStats {
            status: MigrationStatus::Failed,
            error: Some("peer closed the connection".into()),
            total_time_ms: 12.0,
            ..Default::default()
        };
        let t = Report::new(stats, None, 0.1, run("source")).table();
        assert!(t.contains("verified               not reached"), "{t}");
        assert!(!t.contains("verified               off"), "{t}");
        assert!(
            !t.contains("/s"),
            "no rate for a run that sent nothing: {t}"
        );
        assert!(
            !t.contains("destination"),
            "the source knows nothing of it: {t}"
        );
        assert!(t.contains("before the run ended"), "{t}");
    }

    #[test]
    fn each_end_shows_the_other_s_figures_and_no_guesses() {
        let peer = EndFigures {
            page_bytes: 64 << 20,
            rounds: 3,
            rate: 500_000_000,
            downtime_us: 12_500,
            setup_us: 4_000,
            total_us: 150_000,
            memory: facts(false, 2 << 20, crate::Thp::Off),
        };
        let stats = MigrationStats {
            status: MigrationStatus::Completed,
            verified: Some(true),
            peer: Some(peer.clone()),
            ..Default::default()
        };
        let mut info = run("source");
        // What the source would know only by guessing: not shown once the peer has spoken.
        info.prealloc = Some(true);
        info.dest_huge_bytes = Some(1 << 30);
        let t = Report::new(stats.clone(), None, 0.1, info).table();
        assert!(
            t.contains("destination received   64.0 MiB in 3 round(s) at 500 MB/s"),
            "{t}"
        );
        assert!(
            t.contains("destination downtime   12.5 ms (as seen there)"),
            "{t}"
        );
        assert!(
            t.contains(
                "destination memory     not preallocated, 2.00 MiB in huge pages (--thp off)"
            ),
            "{t}"
        );
        assert!(
            !t.contains("preallocated (faulted in"),
            "no guess beside the peer's word: {t}"
        );
        let mut own = run("dest");
        own.prealloc = Some(true);
        let t = Report::new(stats, None, 0.1, own).table();
        assert!(t.contains("source sent            64.0 MiB"), "{t}");
        assert!(
            t.contains("destination memory     preallocated"),
            "its own word: {t}"
        );
        assert!(t.contains("source memory          not prefaulted"), "{t}");
        // Without the peer's figures there are no rows for it.
        let t = Report::new(MigrationStats::default(), None, 0.1, run("dest")).table();
        assert!(!t.contains("source sent"), "{t}");
    }

    #[test]
    fn post_copy_rows_say_where_the_pages_came_from_and_a_lost_guest_is_not_verified() {
        let dest_pc = PostcopyReport {
            duration_ms: 2050.0,
            pages_at_switch: 100,
            pages_on_fault: 30,
            pages_background: 70,
            faults: 31,
            fault_p50_us: 80.0,
            fault_p99_us: 2000.0,
            fault_max_us: 7000.0,
        };
        let src_pc = PostcopyReport {
            pages_on_fault: 31,
            pages_background: 72,
            faults: 0,
            ..dest_pc.clone()
        };
        let stats = MigrationStats {
            status: MigrationStatus::Completed,
            verified: Some(true),
            postcopy: Some(src_pc),
            ..Default::default()
        };
        let mut r = Report::new(stats, Some(true), 0.1, run("loopback"));
        r.dest_postcopy = Some(dest_pc.clone());
        r.memory_pages_left_out = Some(12);
        let t = r.table();
        for want in [
            "post-copy              2050.0 ms from the destination's resumption",
            "100 left at the switch: 31 served on request, 72 sent in the background",
            "100 pages missing at the switch: 30 fetched on fault, 70 in the background",
            "31 faults: p50 80 us, p99 2000 us, max 7000 us",
            "true on every page but the 12 the destination's guest wrote",
        ] {
            assert!(t.contains(want), "{want:?} not in {t}");
        }
        let stats = MigrationStats {
            status: MigrationStatus::GuestLost,
            verified: Some(true),
            postcopy: Some(dest_pc),
            ..Default::default()
        };
        let r = Report::new(stats, None, 0.1, run("dest"));
        assert_eq!(
            r.stats.verified, None,
            "a lost guest never finished verifying"
        );
        assert!(!r.ok());
        let t = r.table();
        assert!(t.contains("verified               not reached"), "{t}");
        assert!(t.contains("30 fetched on fault"), "its own figures: {t}");
    }

    #[test]
    fn rounds_carry_their_own_rate() {
        let stats = MigrationStats {
            status: MigrationStatus::Completed,
            rounds: vec![rmig_engine::RoundStats {
                bytes: 250_000_000,
                duration_ms: 1000.0,
                mbps: 1.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = Report::new(stats, None, 0.1, run("source"));
        assert_eq!(r.stats.rounds[0].mbps, 2000.0);
        assert!(r.table().contains("250 MB/s"), "{}", r.table());
    }
}
