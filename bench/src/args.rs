//! The command line: every subcommand's flags, checked as they are parsed.
//!
//! Value parsers (`crate::parse`) refuse a bad value on its own; [`validate`] then refuses
//! combinations and what depends on the machine (free memory, NUMA nodes), still before
//! anything is allocated or connected. Both exit with clap's usage message and code 2.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use rmig_engine::{DestConfig, Key, Postcopy, PAGE_2M, PAGE_4K};

use crate::mem::Fill;
use crate::parse;

/// What each exit code means, for `--help`.
pub const EXIT_CODES: &str = "Exit status:
  0    the migration completed (and verified, when verifying)
  1    the migration failed, or could not start (the last line on stderr says why)
  2    usage error: a flag or value that cannot work (nothing was allocated or connected)
  3    handover unknown: the link failed during the handover and no --on-handover-unknown
       decision was given; neither end runs the guest until an operator decides
  4    guest lost: post-copy broke after the destination resumed the guest, so neither end
       holds all of its memory and it cannot run on either
  130  cancelled here by Ctrl-C or SIGTERM (the peer is told; the source guest keeps running)";

/// What each exit code of the commands that migrate nothing means, for `--help`.
pub const TOOL_EXIT_CODES: &str = "Exit status:
  0    done
  1    failed (the last line on stderr says why)
  2    usage error: a flag or value that cannot work";

/// The most data lanes a destination accepts.
const MAX_LANES: u16 = 64;

/// The lanes used without `--lanes`: one per CPU (`cpus`), at most what a destination
/// accepts, so that a large host does not ask for lanes that would be refused.
pub fn default_lanes(cpus: usize) -> usize {
    cpus.clamp(1, MAX_LANES.into())
}

/// `rmig-bench` and its subcommands.
#[derive(Parser)]
#[command(
    name = "rmig-bench",
    version,
    about = "Measure rmig live-migration throughput",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// The subcommand (default: `loopback` with its defaults).
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

/// What to run.
#[derive(Subcommand)]
pub enum Cmd {
    /// Source and destination in one process over 127.0.0.1 (the default).
    #[command(after_help = EXIT_CODES)]
    Loopback(LoopbackArgs),
    /// Migrate this host's synthetic guest to a destination.
    #[command(after_help = EXIT_CODES)]
    Source(SourceArgs),
    /// Receive a migration from a source.
    #[command(after_help = EXIT_CODES)]
    Dest(DestArgs),
    /// Draw a result (`--json` output) round by round into an SVG or PNG file.
    #[command(after_help = TOOL_EXIT_CODES)]
    Plot(PlotArgs),
    /// Print the NUMA topology and the placement plan for a migration.
    #[command(after_help = TOOL_EXIT_CODES)]
    Topology(TopologyArgs),
    /// Move the same bytes over plain loopback TCP connections, no protocol: the honest limit.
    #[command(after_help = TOOL_EXIT_CODES)]
    Bare(BareArgs),
}

/// `bare`: a plain TCP transfer of guest-sized memory, the yardstick for `loopback`.
#[derive(Args, Clone)]
pub struct BareArgs {
    /// Bytes to move (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "2GiB", value_parser = parse::size, allow_hyphen_values = true)]
    pub size: u64,
    /// TCP connections, one thread each, 1 to 64 (default: one per CPU, at most 64, like
    /// `loopback`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_LANES as i64))]
    pub lanes: Option<u16>,
    /// Prefault both mappings (with huge pages) before the transfer, as `loopback` does by
    /// default; without it both are unfaulted: freshly mapped, never touched. Either way the
    /// memory is cold in the cache sense (far larger than the caches), unlike iperf3's buffer.
    #[arg(long)]
    pub prefault: bool,
    /// Fill the source with random bytes first, then compare both ends and print their hashes
    /// (touches the source, so only the destination stays unfaulted).
    #[arg(long)]
    pub check: bool,
    /// Seed of the `--check` fill.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `topology`: the NUMA plan for a migration.
#[derive(Args, Clone)]
pub struct TopologyArgs {
    /// Guest memory size to plan for.
    #[arg(long, default_value = "2GiB", value_parser = parse::size, allow_hyphen_values = true)]
    pub size: u64,
    /// Lanes to plan for (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub lanes: Option<u16>,
    /// Read the topology from an hwloc XML file instead of this machine.
    #[arg(long)]
    pub hwloc_xml: Option<std::path::PathBuf>,
    /// Use an hwloc synthetic topology (e.g. "pack:2 numa:2 core:4 pu:2").
    #[arg(long, conflicts_with = "hwloc_xml")]
    pub hwloc_synthetic: Option<String>,
    /// The network or RDMA device the migration uses (its NUMA node attracts lanes).
    #[arg(long)]
    pub nic: Option<String>,
    /// Assume the guest memory sits on this node (default: spread evenly over all nodes).
    #[arg(long)]
    pub memory_node: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `plot`: a result drawn round by round.
#[derive(Args, Clone)]
pub struct PlotArgs {
    /// A file holding the JSON output of loopback or source.
    pub result: std::path::PathBuf,
    /// The picture to write (.svg or .png).
    #[arg(short, long)]
    pub out: std::path::PathBuf,
}

/// The synthetic guest's memory.
#[derive(Args, Clone)]
#[command(next_help_heading = "Guest memory")]
pub struct GuestArgs {
    /// Guest memory size (e.g. 2GiB, 512MiB; KiB/MiB/GiB are powers of 1024, k/M/G of 1000).
    #[arg(long, default_value = "2GiB", value_parser = parse::size, allow_hyphen_values = true)]
    pub size: u64,
    /// Page size of the region: 4KiB or 2MiB.
    #[arg(long, default_value = "4KiB", value_parser = page_size)]
    pub page_size: u64,
    /// Back guest memory with transparent huge pages (`MADV_HUGEPAGE`), as QEMU does for
    /// guest RAM: `auto` for memory faulted in before the migration (the source, and a
    /// preallocated destination), `on` for all, `off` for none (4 KiB host pages).
    #[arg(long, value_enum, default_value_t = Thp::Auto)]
    pub thp: Thp,
}

/// Where guest memory asks for transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Thp {
    /// Memory faulted in before the migration. A huge page first touched during the
    /// migration cost more than 512 small ones on the development host (2 GiB with
    /// `--no-prealloc`: 0.5 GB/s with huge pages, 1.05 GB/s without).
    Auto,
    /// All guest memory.
    On,
    /// None.
    Off,
}

impl Thp {
    /// Whether memory that is (`prefaulted`) or is not faulted in before the migration asks
    /// for huge pages.
    pub fn huge(self, prefaulted: bool) -> bool {
        match self {
            Thp::Auto => prefaulted,
            Thp::On => true,
            Thp::Off => false,
        }
    }
}

/// What the synthetic guest does while it migrates.
#[derive(Args, Clone)]
#[command(next_help_heading = "Workload")]
pub struct WorkloadArgs {
    /// How to fill source memory.
    #[arg(long, value_enum, default_value_t = Fill::Random)]
    pub fill: Fill,
    /// Fraction of zero pages for `--fill mixed` (0 to 1).
    #[arg(long, default_value_t = 0.5, value_parser = parse::fraction, allow_hyphen_values = true)]
    pub zero_fraction: f64,
    /// Rate at which writer threads dirty pages, MB/s (0: no writers).
    #[arg(long, default_value_t = 0.0, value_parser = parse::mb_per_s, allow_hyphen_values = true)]
    pub dirty_rate: f64,
    /// Fraction of memory the writers touch (more than 0, at most 1).
    #[arg(long, default_value_t = 0.1, value_parser = parse::positive_fraction, allow_hyphen_values = true)]
    pub hot_set: f64,
    /// Writer threads (at least 1 when --dirty-rate is above 0).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub writers: u16,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A switch.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// What end-to-end verification proves (`rmig_engine::VerifyMode`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    /// Every page received equals the page sent last.
    On,
    /// No checksums.
    Off,
    /// As `on`, and in the pause the destination re-reads its memory: it still holds what it
    /// received (costs downtime).
    Memory,
}

impl VerifyArg {
    /// The engine's mode.
    pub fn mode(self) -> rmig_engine::VerifyMode {
        match self {
            VerifyArg::On => rmig_engine::VerifyMode::Received,
            VerifyArg::Off => rmig_engine::VerifyMode::Off,
            VerifyArg::Memory => rmig_engine::VerifyMode::Memory,
        }
    }
}

/// What to do when the round limit is reached above the downtime limit.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnNoConvergence {
    Fail,
    Switchover,
}

/// How the source migrates.
#[derive(Args, Clone)]
#[command(next_help_heading = "Migration")]
pub struct MigrateArgs {
    /// Data lanes, 1 to 64 (default: one per CPU, at most 64).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_LANES as i64))]
    pub lanes: Option<u16>,
    /// Downtime ceiling in milliseconds (at least 1).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub downtime_limit: u64,
    /// Bandwidth ceiling: bytes/s (500MB, 1GB/s) or bits/s (1Gbit, 800Mbps); 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse::rate, allow_hyphen_values = true)]
    pub max_bandwidth: u64,
    /// Most pre-copy rounds (at least 1).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// What to do when the round limit is reached above the downtime limit.
    #[arg(long, value_enum, default_value_t = OnNoConvergence::Fail)]
    pub on_no_convergence: OnNoConvergence,
    /// Throttle the guest when rounds stop shrinking.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub auto_converge: OnOff,
    /// Switch to post-copy when pre-copy does not converge (where auto-converge would
    /// throttle, or at the round limit): the guest resumes on the destination at once and the
    /// pages it still lacks follow it (4KiB pages only). From the switch on the guest
    /// needs both hosts and the link between them (exit status 4 if that breaks).
    #[arg(long)]
    pub postcopy: bool,
    /// As --postcopy, and switch at the latest after N pre-copy rounds (round 0 included; at
    /// least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub postcopy_after: Option<u32>,
    /// End-to-end verification of every page (`memory`: also re-read destination memory in
    /// the pause, so a write after a page landed is caught; costs downtime).
    #[arg(long, value_enum, default_value_t = VerifyArg::On)]
    pub verify: VerifyArg,
    /// Place and pin lanes next to the memory they serve (`off`: let the scheduler decide).
    #[arg(long, value_enum, default_value_t = NumaArg::Auto)]
    pub numa: NumaArg,
    #[command(flatten)]
    pub transport: TransportArgs,
}

impl MigrateArgs {
    /// The engine's post-copy policy: `--postcopy-after N` implies `--postcopy`.
    pub fn postcopy(&self) -> Postcopy {
        match (self.postcopy_after, self.postcopy) {
            (Some(n), _) => Postcopy::AfterRounds(n),
            (None, true) => Postcopy::WhenStalled,
            (None, false) => Postcopy::Off,
        }
    }
}

/// Transport choice and RDMA settings (both ends).
#[derive(Args, Clone)]
#[command(next_help_heading = "Transport and RDMA")]
pub struct TransportArgs {
    /// `auto`: RDMA when both ends have a device for the control connection's address, else
    /// TCP (saying why); `rdma`: RDMA or fail; `tcp`: TCP only.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
    /// RDMA device (default: the one whose GID table holds the address used).
    #[arg(long)]
    pub rdma_dev: Option<String>,
    /// How guest memory is registered with the RDMA device: all of it up front, or chunks on
    /// demand with a bounded cache (for hosts that cannot pin all guest RAM).
    #[arg(long, value_enum, default_value_t = RegArg::PinAll)]
    pub rdma_registration: RegArg,
    /// Chunk size of chunked registration.
    #[arg(long, default_value = "1MiB", value_parser = parse::size)]
    pub rdma_chunk: u64,
    /// Registrations kept per lane with chunked registration.
    #[arg(long, default_value_t = 256)]
    pub rdma_max_chunks: u32,
    /// Seconds within which a connection that broke during pre-copy may come back (TCP);
    /// 0 fails the migration at once.
    #[arg(long, default_value_t = 10.0, value_parser = parse::seconds)]
    pub reconnect_window: f64,
    /// Destination, TCP: place pre-copy pages that are not in memory yet with userfaultfd's
    /// UFFDIO_COPY (no page fault, no zeroing); `off` writes every page in place, faulting in
    /// those not yet in memory. Matters for a destination that is not preallocated; the
    /// report's `landing` says what was done.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub uffd_landing: OnOff,
    /// TLS 1.3 on the control connection and every TCP lane [default: on for source and
    /// dest, off for loopback]. RDMA lanes cannot be encrypted: with it on, `auto` uses TCP
    /// unless both ends give --rdma-cleartext-lanes.
    #[arg(long, value_enum, help_heading = "Encryption")]
    pub encryption: Option<OnOff>,
    /// With encryption on, allow RDMA data lanes anyway: guest pages then cross the network
    /// in clear (one-sided WRITEs cannot be encrypted); the control connection and each
    /// lane's queue pair and memory key exchange stay TLS. Needed on both ends; the report
    /// says `data lanes: cleartext`.
    #[arg(long, help_heading = "Encryption")]
    pub rdma_cleartext_lanes: bool,
    /// x509 credentials directory laid out as QEMU's tls-creds-x509 (ca-cert.pem,
    /// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem); without it, TLS
    /// authenticates with the pre-shared key.
    #[arg(long, value_name = "DIR", help_heading = "Encryption")]
    pub tls_creds: Option<std::path::PathBuf>,
    /// Name the destination's certificate must carry (x509; default: the host of the
    /// destination address).
    #[arg(long, value_name = "NAME", help_heading = "Encryption")]
    pub tls_hostname: Option<String>,
}

/// The data transport.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Auto,
    Tcp,
    Rdma,
}

/// How RDMA registers guest memory.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegArg {
    PinAll,
    Chunked,
}

impl TransportArgs {
    /// The engine's transport choice.
    pub fn choice(&self) -> rmig_engine::TransportChoice {
        match self.transport {
            TransportArg::Auto => rmig_engine::TransportChoice::Auto,
            TransportArg::Tcp => rmig_engine::TransportChoice::Tcp,
            TransportArg::Rdma => rmig_engine::TransportChoice::Rdma,
        }
    }

    /// The engine's RDMA settings.
    pub fn rdma(&self) -> rmig_engine::RdmaConfig {
        rmig_engine::RdmaConfig {
            device: self.rdma_dev.clone(),
            registration: match self.rdma_registration {
                RegArg::PinAll => rmig_engine::Registration::PinAll,
                RegArg::Chunked => rmig_engine::Registration::Chunked {
                    chunk_bytes: self.rdma_chunk,
                    max_chunks: self.rdma_max_chunks,
                },
            },
        }
    }

    /// The engine's encryption: `--encryption` (or `default_on`), with x509 credentials when
    /// `--tls-creds` names them.
    pub fn encryption(&self, default_on: bool) -> rmig_engine::Encryption {
        let on = self.encryption.map_or(default_on, |e| e == OnOff::On);
        match (&self.tls_creds, on) {
            (_, false) => rmig_engine::Encryption::Off,
            (None, true) => rmig_engine::Encryption::Psk,
            (Some(dir), true) => rmig_engine::Encryption::X509(rmig_engine::X509Creds {
                dir: dir.clone(),
                hostname: self.tls_hostname.clone(),
            }),
        }
    }

    /// A destination configuration with these transport settings (encryption on unless
    /// `--encryption off`).
    pub fn dest_config(&self, key: Key) -> DestConfig {
        let mut d = DestConfig::new(key);
        d.encryption = self.encryption(true);
        d.rdma_cleartext_lanes = self.rdma_cleartext_lanes;
        d.transport = self.choice();
        d.rdma = self.rdma();
        d.reconnect_window = Duration::from_secs_f64(self.reconnect_window);
        d.land_with_userfaultfd = self.uffd_landing == OnOff::On;
        d
    }
}

/// NUMA placement of the lanes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NumaArg {
    Auto,
    Off,
}

/// Where results and progress go.
#[derive(Args, Clone)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write progress as JSON lines to this file (one per round, at least one a second).
    #[arg(long)]
    pub progress_json: Option<std::path::PathBuf>,
    /// Serve metrics in Prometheus text format on this address (e.g. 127.0.0.1:9100) while
    /// the command runs.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Keep serving the final metrics this many seconds after the run, so that a scraper
    /// sees them before the process ends.
    #[arg(long, default_value_t = 0.0, value_parser = parse::seconds, requires = "metrics_addr")]
    pub metrics_linger: f64,
}

impl OutputArgs {
    /// Starts the Prometheus endpoint if one was asked for.
    pub fn start_metrics(&self) -> anyhow::Result<()> {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        if let Some(a) = self.metrics_addr {
            // Durations as histograms (aggregatable across hosts), not summaries: 1 ms to
            // 2 min, roughly ×2.5 per bucket.
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                60.0, 120.0,
            ];
            PrometheusBuilder::new()
                .with_http_listener(a)
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
                .install()
                .with_context(|| {
                    format!("serving metrics on {a} (choose another --metrics-addr)")
                })?;
        }
        Ok(())
    }

    /// After a run with `--metrics-linger`: keeps the endpoint up that long.
    pub fn linger(&self) {
        if let (Some(a), true) = (self.metrics_addr, self.metrics_linger > 0.0) {
            eprintln!(
                "rmig-bench: serving the final metrics at http://{a}/metrics for {} s",
                self.metrics_linger
            );
            std::thread::sleep(Duration::from_secs_f64(self.metrics_linger));
        }
    }
}

/// Whether destination memory is faulted in before the migration.
#[derive(Args, Clone)]
#[command(next_help_heading = "Guest memory")]
pub struct PreallocArgs {
    /// Populate destination memory before the migration (like QEMU's -mem-prealloc).
    #[arg(long, overrides_with = "no_prealloc", default_value_t = true)]
    pub prealloc: bool,
    /// Leave destination memory to be faulted in during the migration.
    #[arg(long)]
    pub no_prealloc: bool,
}

impl PreallocArgs {
    /// Whether destination memory is preallocated.
    pub fn on(&self) -> bool {
        !self.no_prealloc
    }
}

/// `loopback`: both ends in one process.
#[derive(Args, Clone)]
pub struct LoopbackArgs {
    /// Address both ends use (an RDMA device's address for `--transport rdma`).
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: String,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    #[command(flatten)]
    pub prealloc: PreallocArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// The pre-shared key.
#[derive(Args, Clone)]
#[command(next_help_heading = "Connection")]
pub struct KeyArgs {
    /// File holding the pre-shared key (else the RMIG_KEY environment variable; with
    /// --tls-creds, neither is needed).
    #[arg(long)]
    pub key_file: Option<std::path::PathBuf>,
}

impl KeyArgs {
    /// The key from the file or the environment. With x509 encryption (`x509`) the key is
    /// optional, as with QEMU's tls-creds-x509: the certificates authenticate both ends, and
    /// without a key each session's key comes from its control connection's TLS session.
    pub fn load(&self, x509: bool) -> anyhow::Result<Key> {
        if let Some(p) = &self.key_file {
            return Ok(Key::from_file(p)?);
        }
        use std::os::unix::ffi::OsStrExt;
        match std::env::var_os("RMIG_KEY") {
            Some(k) => Ok(Key::new(k.as_bytes())?),
            None if x509 => Ok(Key::per_session()),
            None => anyhow::bail!(
                "no key: pass --key-file or set RMIG_KEY (or use x509 certificates: --tls-creds)"
            ),
        }
    }
}

/// `source`: migrate to a destination on another host.
#[derive(Args, Clone)]
pub struct SourceArgs {
    /// Destination address: HOST:PORT or tcp:HOST:PORT.
    #[arg(long, value_parser = parse::tcp_addr)]
    pub connect: String,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    #[command(flatten)]
    pub handover: HandoverArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `dest`: receive a migration from a source on another host.
#[derive(Args, Clone)]
pub struct DestArgs {
    /// Address to listen on: HOST:PORT or tcp:HOST:PORT.
    #[arg(long, value_parser = parse::tcp_addr)]
    pub listen: String,
    /// Seconds to wait for a source to complete the handshake (0: until Ctrl-C). Connections
    /// that fail the handshake (wrong key or version, scanners) do not end the wait.
    #[arg(long, default_value_t = 0.0, value_parser = parse::seconds)]
    pub incoming_timeout: f64,
    /// After each migration (whatever its outcome), report it and wait for the next source on
    /// the same address, like `iperf3 -s`; Ctrl-C ends it (exit 130).
    #[arg(long)]
    pub keep_serving: bool,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub prealloc: PreallocArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub handover: HandoverArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Who runs the guest when the link fails during the handover.
#[derive(Args, Clone)]
#[command(next_help_heading = "Migration")]
pub struct HandoverArgs {
    /// When the link fails during the handover neither end can know what the other did:
    /// `run-here` runs the guest on this host, `run-there` leaves it to the other end (check
    /// it first: never let both run it), `ask` asks on a terminal and otherwise leaves the
    /// guest paused here and exits 3.
    #[arg(long, value_enum, default_value_t = OnHandoverUnknown::Ask)]
    pub on_handover_unknown: OnHandoverUnknown,
}

/// The operator's decision on a `handover-unknown` outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnHandoverUnknown {
    /// Ask on the terminal (without one: decide nothing, exit 3).
    Ask,
    /// Run the guest on this host.
    RunHere,
    /// The other host runs the guest; this copy stays paused (source) or is discarded.
    RunThere,
}

/// A page size the engine supports: 4KiB or 2MiB.
fn page_size(s: &str) -> Result<u64, String> {
    match parse::size(s)? {
        p @ (PAGE_4K | PAGE_2M) => Ok(p),
        _ => Err(format!("{s:?}: the page size must be 4KiB or 2MiB")),
    }
}

/// The parsed command line with clap's defaults for a bare `rmig-bench` (loopback).
pub fn parse() -> Cmd {
    let cli = Cli::parse();
    let cmd = cli.cmd.unwrap_or_else(|| {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            a: LoopbackArgs,
        }
        Cmd::Loopback(Only::parse_from(["rmig-bench"]).a)
    });
    if let Err(e) = validate(&cmd) {
        e.exit();
    }
    cmd
}

/// A usage error of `sub` in clap's style (exit code 2).
fn usage(sub: &str, msg: String) -> clap::Error {
    let mut c = Cli::command();
    let c = c.find_subcommand_mut(sub).expect("a subcommand of ours");
    c.error(clap::error::ErrorKind::ValueValidation, msg)
}

/// Checks what single values cannot: combinations, and what the machine can hold.
pub fn validate(cmd: &Cmd) -> Result<(), clap::Error> {
    match cmd {
        Cmd::Loopback(a) => {
            check_tls("loopback", &a.migrate.transport, false)?;
            check_guest("loopback", &a.guest)?;
            check_postcopy("loopback", &a.migrate, &a.guest)?;
            check_workload("loopback", &a.workload)?;
            let prealloc = a.prealloc.on();
            let need = a.guest.size.saturating_mul(1 + prealloc as u64);
            let what = if prealloc {
                "source and preallocated destination memory"
            } else {
                "source memory"
            };
            check_memory("loopback", need, what, prealloc)
        }
        Cmd::Source(a) => {
            check_tls("source", &a.migrate.transport, true)?;
            check_guest("source", &a.guest)?;
            check_postcopy("source", &a.migrate, &a.guest)?;
            check_workload("source", &a.workload)?;
            check_memory("source", a.guest.size, "source memory", false)
        }
        Cmd::Dest(a) => {
            check_tls("dest", &a.transport, true)?;
            check_guest("dest", &a.guest)?;
            if a.prealloc.on() {
                check_memory("dest", a.guest.size, "preallocated memory", true)?;
            }
            Ok(())
        }
        Cmd::Bare(a) => {
            if a.size == 0 || usize::try_from(a.size).is_err() {
                return Err(usage(
                    "bare",
                    format!("--size {} is zero or beyond this machine", a.size),
                ));
            }
            // Both ends are written during the transfer: both must fit.
            check_memory(
                "bare",
                a.size.saturating_mul(2),
                "memory for both ends",
                false,
            )
        }
        Cmd::Topology(_) | Cmd::Plot(_) => Ok(()),
    }
}

/// `--tls-creds` and `--tls-hostname` need encryption on (`default_on`: this command's
/// default), and the name needs the credentials it is checked with.
fn check_tls(sub: &str, t: &TransportArgs, default_on: bool) -> Result<(), clap::Error> {
    let on = t.encryption.map_or(default_on, |e| e == OnOff::On);
    if !on && t.tls_creds.is_some() {
        let msg = "--tls-creds needs encryption on (--encryption on)".to_string();
        return Err(usage(sub, msg));
    }
    if t.tls_hostname.is_some() && t.tls_creds.is_none() {
        let msg = "--tls-hostname checks an x509 certificate: give --tls-creds too".to_string();
        return Err(usage(sub, msg));
    }
    Ok(())
}

/// Post-copy places pages with userfaultfd in 4 KiB base pages: a guest that cannot switch is
/// refused now, not after minutes of pre-copy.
fn check_postcopy(sub: &str, m: &MigrateArgs, g: &GuestArgs) -> Result<(), clap::Error> {
    if !m.postcopy().is_on() {
        return Ok(());
    }
    if g.page_size != PAGE_4K {
        let msg = format!(
            "--postcopy needs --page-size 4KiB (the destination places pages with \
             userfaultfd in base pages), not {}",
            parse::iec(g.page_size)
        );
        return Err(usage(sub, msg));
    }
    Ok(())
}

fn check_guest(sub: &str, g: &GuestArgs) -> Result<(), clap::Error> {
    if g.size == 0 || !g.size.is_multiple_of(g.page_size) {
        return Err(usage(
            sub,
            format!(
                "--size {} is not a non-zero multiple of the page size ({})",
                g.size,
                parse::iec(g.page_size)
            ),
        ));
    }
    if usize::try_from(g.size).is_err() {
        return Err(usage(
            sub,
            format!(
                "--size {} does not fit this machine's address space",
                g.size
            ),
        ));
    }
    Ok(())
}

fn check_workload(sub: &str, w: &WorkloadArgs) -> Result<(), clap::Error> {
    if w.dirty_rate > 0.0 && w.writers == 0 {
        return Err(usage(
            sub,
            format!(
                "--dirty-rate {} needs at least one writer: pass --writers 1 or more, or \
                 --dirty-rate 0",
                w.dirty_rate
            ),
        ));
    }
    Ok(())
}

/// Refuses a guest that needs more memory up front than the machine has available, which
/// would otherwise meet the OOM killer halfway through the fill.
fn check_memory(sub: &str, need: u64, what: &str, prealloc: bool) -> Result<(), clap::Error> {
    let Some(avail) = mem_available() else {
        return Ok(());
    };
    if need <= avail {
        return Ok(());
    }
    Err(usage(
        sub,
        format!(
            "--size needs {} of {what} here, but only {} is available (MemAvailable); \
             choose a smaller --size{}",
            parse::iec(need),
            parse::iec(avail),
            if prealloc {
                " or pass --no-prealloc"
            } else {
                ""
            }
        ),
    ))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = m
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    kb.checked_mul(1024)
}

/// A usage error of `topology` (a node the machine does not have).
pub fn topology_usage(msg: String) -> clap::Error {
    usage("topology", msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lanes_are_one_per_cpu_up_to_what_a_destination_accepts() {
        assert_eq!(default_lanes(0), 1);
        assert_eq!(default_lanes(2), 2);
        assert_eq!(default_lanes(64), 64);
        assert_eq!(default_lanes(256), 64);
    }
}
