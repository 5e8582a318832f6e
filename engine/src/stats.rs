//! Migration statistics, named after QEMU's `query-migrate` (in snake_case).

use std::time::Duration;

use serde::Serialize;

/// One pre-copy round.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RoundStats {
    /// Round number (0 sends everything).
    pub round: u32,
    /// Whether this was the stop-and-copy round (or a re-send inside it).
    pub last: bool,
    /// Pages sent (data and zero).
    pub pages: u64,
    /// Of which zero pages (sent as markers).
    pub zero_pages: u64,
    /// Bytes of guest memory those pages hold (each at its region's page size).
    pub memory_bytes: u64,
    /// Bytes put on the wire (payload and framing).
    pub bytes: u64,
    /// Wall time of the round.
    pub duration_ms: f64,
    /// Pages dirtied while the round ran, per second, in bytes/s.
    pub dirty_rate: f64,
    /// Bytes still dirty after the round.
    pub remaining: u64,
    /// Bandwidth of the round in megabits/s.
    pub mbps: f64,
    /// Expected downtime after the round.
    pub expected_downtime_ms: f64,
    /// Lanes that carried the round.
    pub lanes: usize,
}

/// RAM figures (QEMU's `ram` object).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RamStats {
    /// Bytes of guest memory.
    pub total: u64,
    /// Bytes put on the wire.
    pub transferred: u64,
    /// Bytes still dirty.
    pub remaining: u64,
    /// Zero pages sent as markers.
    pub duplicate: u64,
    /// Pages sent with their bytes.
    pub normal: u64,
    /// Payload bytes of those pages.
    pub normal_bytes: u64,
    /// Dirty-log syncs.
    pub dirty_sync_count: u64,
    /// Average bandwidth in megabits/s over the migration (setup excluded).
    pub mbps: f64,
    /// Pages dirtied per second in the last round.
    pub dirty_pages_rate: f64,
    /// Page size of the first region.
    pub page_size: u64,
}

/// Where a migration stands, on either end. Serialised with QEMU's `query-migrate` names
/// where QEMU has one.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// Connecting, handshake, lanes.
    #[default]
    Setup,
    /// Pre-copy rounds.
    Active,
    /// The guest is paused: stop-and-copy, device state, verification, handover.
    Device,
    /// Post-copy: the guest runs on the destination and the pages it still lacks follow it
    /// (QEMU's `postcopy-active`).
    Postcopy,
    /// The destination's guest runs.
    Completed,
    /// Failed before the handover: the source's guest runs, the destination discarded.
    Failed,
    /// Cancelled by either side before the handover.
    Cancelled,
    /// The link failed during the handover (after `Ready` on the destination, after `Commit`
    /// on the source): this end's guest stays paused until an operator decides which end
    /// runs it.
    HandoverUnknown,
    /// Post-copy broke past its reconnect window: the guest ran on the destination with pages
    /// still on the source, so neither end can run it.
    GuestLost,
}

impl MigrationStatus {
    /// The name used in the JSON and in reports.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::Postcopy => "postcopy-active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::HandoverUnknown => "handover-unknown",
            MigrationStatus::GuestLost => "guest-lost",
        }
    }

    /// The status a failure with `e` leaves behind.
    pub fn of_error(e: &crate::EngineError) -> MigrationStatus {
        match e {
            e if e.is_cancel() => MigrationStatus::Cancelled,
            crate::EngineError::HandoverUnknown(_) => MigrationStatus::HandoverUnknown,
            crate::EngineError::GuestLost(_) => MigrationStatus::GuestLost,
            _ => MigrationStatus::Failed,
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A migration's statistics.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStats {
    /// Where the migration stands.
    pub status: MigrationStatus,
    /// From start to completion (setup included).
    pub total_time_ms: f64,
    /// Connecting, handshake, lanes.
    pub setup_time_ms: f64,
    /// From the pause to the destination's `Done`.
    pub downtime_ms: f64,
    /// Expected downtime before the switchover.
    pub expected_downtime_ms: f64,
    /// `tcp`.
    pub transport: String,
    /// How the connections were protected: `tls-x509`, `tls-psk` or `off` (cleartext). This
    /// is what the control connection did; see `data_lanes_encrypted` for the pages.
    pub encryption: String,
    /// Whether every page crossed inside TLS: `true` for an encrypted session over TCP lanes;
    /// `false` with encryption off, and for an encrypted session that moved pages over RDMA
    /// lanes (`rdma_cleartext_lanes`: the pages crossed in clear, the control connection and
    /// the lanes' key exchange in TLS), even if TCP lanes took over later.
    pub data_lanes_encrypted: bool,
    /// Why the preferred transport was not used, if it was not.
    pub fallback_reason: Option<String>,
    /// The RDMA device and registration, when the transport is RDMA.
    pub rdma: Option<RdmaReport>,
    /// Lanes opened.
    pub lanes: usize,
    /// Lanes that failed on the way.
    pub lanes_failed: usize,
    /// Destination: connections dropped because they failed the handshake or could not
    /// prove that they belong to the session (scanners, wrong key or version, idle).
    pub connections_refused: u64,
    /// Times the control connection broke during pre-copy and came back within the
    /// reconnect window.
    pub reconnects: u64,
    /// `true`/`false` after verification; `null` when verification is off or did not run.
    pub verified: Option<bool>,
    /// The guest throttle asked for (auto-converge), in percent.
    pub cpu_throttle_percentage: u8,
    /// RAM figures.
    pub ram: RamStats,
    /// Every round.
    pub rounds: Vec<RoundStats>,
    /// What went wrong, for `failed` and `cancelled`.
    pub error: Option<String>,
    /// NUMA placement: topology, plan, and where each lane really ran (source only).
    pub numa: Option<NumaReport>,
    /// How this end's guest memory was prepared, as its embedder stated it
    /// ([`Monitor::set_memory_facts`](crate::Monitor::set_memory_facts)); `null` if it did not.
    pub memory: Option<MemoryFacts>,
    /// The other end's own figures, as it sent them after the handover (`Figures`); `null`
    /// when the migration did not complete or the peer sent none.
    pub peer: Option<EndFigures>,
    /// The post-copy phase, when the migration switched to it; `null` otherwise.
    pub postcopy: Option<PostcopyReport>,
    /// Destination: how pre-copy pages were put into guest memory; `null` on the source, and
    /// over RDMA (the NIC writes them).
    pub landing: Option<LandingReport>,
}

/// How a destination put pre-copy pages into its guest memory.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LandingReport {
    /// `userfaultfd`: pages not yet in memory were placed with `UFFDIO_COPY`, without a page
    /// fault; `copy`: every page was copied in place (faulting in those not yet in memory).
    pub method: String,
    /// Why `copy` (e.g. every page was resident already, or no userfaultfd for this process).
    pub why_not: Option<String>,
    /// Pages placed with `UFFDIO_COPY`.
    pub placed_pages: u64,
    /// Pages something touched before they landed, given the zero page.
    pub zero_filled_pages: u64,
}

/// The post-copy phase as one end saw it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PostcopyReport {
    /// From the destination's resume (the end of the downtime) to the last page landing.
    pub duration_ms: f64,
    /// Pages the destination still lacked when its guest resumed.
    pub pages_at_switch: u64,
    /// Destination: pages that landed because the guest touched them (fetched on fault).
    /// Source: pages a source thread served on request (over RDMA, where the destination
    /// reads them itself, this stays zero).
    pub pages_on_fault: u64,
    /// Pages that landed (destination) or were sent (source) in the background.
    pub pages_background: u64,
    /// Destination: faults on missing pages the guest took, and how long each waited for its
    /// page, from the fault's report to the page in place.
    pub faults: u64,
    /// Fault latency, median, in microseconds.
    pub fault_p50_us: f64,
    /// Fault latency, 99th percentile, in microseconds.
    pub fault_p99_us: f64,
    /// Longest fault latency, in microseconds.
    pub fault_max_us: f64,
}

/// How one end's guest memory was prepared. Only the embedder knows (it allocated the
/// memory), so it states these facts and the engine passes them on to the other end.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MemoryFacts {
    /// Whether the memory was faulted in before the migration (a destination's
    /// preallocation, `-mem-prealloc`; a source's memory touched before it started).
    pub prefaulted: Option<bool>,
    /// Bytes of the memory backed by huge pages when the migration started.
    pub huge_bytes: Option<u64>,
    /// The end's huge page setting in its own words (for example `thp auto`); at most
    /// [`MAX_NOTE`] bytes travel.
    pub huge_pages: String,
}

/// Longest [`MemoryFacts::huge_pages`] text on the wire.
pub const MAX_NOTE: usize = 64;

/// One end's own figures of a completed migration. Each end sends its own to the other
/// after the handover, so that both reports hold both ends' views, as iperf3's do. Times are
/// whole microseconds and the rate whole bytes/s, so that the message has an exact layout.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EndFigures {
    /// Bytes of page data this end sent (source) or that landed in its guest memory
    /// (destination); zero pages travel as markers and are not counted.
    pub page_bytes: u64,
    /// Rounds this end ran (source) or closed (destination), the stop-and-copy included.
    pub rounds: u32,
    /// `page_bytes` over the time from the end of setup to the end, bytes/s.
    pub rate: u64,
    /// The pause as this end saw it: on the source from pausing the guest to `Done`, on the
    /// destination from the stop-and-copy round's start to resuming its guest.
    pub downtime_us: u64,
    /// From the start of the connection to the lanes being open.
    pub setup_us: u64,
    /// From the start of the connection to the end of the handover (a destination's wait
    /// for its source is not counted).
    pub total_us: u64,
    /// How this end's memory was prepared.
    pub memory: MemoryFacts,
}

impl EndFigures {
    /// Figures from durations; the rate is `page_bytes` over `total - setup`.
    pub fn new(
        page_bytes: u64,
        rounds: u32,
        downtime: Duration,
        setup: Duration,
        total: Duration,
        memory: MemoryFacts,
    ) -> EndFigures {
        let moving = total.saturating_sub(setup).as_secs_f64();
        let rate = if moving > 0.0 {
            (page_bytes as f64 / moving) as u64
        } else {
            0
        };
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        EndFigures {
            page_bytes,
            rounds,
            rate,
            downtime_us: us(downtime),
            setup_us: us(setup),
            total_us: us(total),
            memory,
        }
    }
}

/// Where a lane was planned and where it ran.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LaneObserved {
    /// Lane number.
    pub lane: usize,
    /// The node the plan put it on.
    pub planned_node: usize,
    /// CPUs it was seen running on (sampled at every batch).
    pub cpus: Vec<usize>,
    /// The nodes of those CPUs.
    pub nodes: Vec<usize>,
}

/// NUMA placement of a migration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NumaReport {
    /// Where the topology came from (`hwloc`, or `flat (why)`).
    pub topology: String,
    /// NUMA nodes.
    pub nodes: usize,
    /// The network interface of the control connection.
    pub nic: Option<String>,
    /// Why placement fell back to a flat pool, if it did.
    pub fallback: Option<String>,
    /// The plan.
    pub plan: rmig_numa::Plan,
    /// What the lanes did.
    pub observed: Vec<LaneObserved>,
}

/// The RDMA side of a session: which device, and how memory was registered.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RdmaReport {
    /// Device name.
    pub device: String,
    /// Port.
    pub port: u8,
    /// RoCEv2 GID index of the control connection's address.
    pub gid_index: u8,
    /// `pin-all` or `chunked`.
    pub registration: String,
    /// Time spent registering memory up front (part of `setup_time_ms`).
    pub registration_ms: f64,
}

impl RdmaReport {
    /// The report of a device and this end's registrations.
    pub fn of(
        dev: &rmig_transport::rdma::RdmaDevice,
        mem: &rmig_transport::rdma::LocalMemory,
    ) -> Self {
        RdmaReport {
            device: dev.name().to_string(),
            port: dev.port(),
            gid_index: dev.gid_index(),
            registration: mem.mode().name().to_string(),
            registration_ms: mem.took().as_secs_f64() * 1e3,
        }
    }
}
