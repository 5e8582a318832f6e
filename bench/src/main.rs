//! `rmig-bench`: rmig's standalone throughput tool.
//!
//! `loopback` runs a source and a destination in one process over 127.0.0.1 with a synthetic
//! guest (memory filled as asked, writer threads dirtying it), migrates, verifies, compares
//! both memories byte for byte, and reports. `source` and `dest` do the same across two hosts.

mod mem;
mod plot;
mod progress;
mod report;
mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rmig_engine::{
    driver, ConvergePolicy, DestConfig, DestEmbedder, DestListener, Key, Monitor, NoConvergence,
    Region, SharedDirtyLog, SourceConfig, PAGE_2M, PAGE_4K,
};

use mem::{parse_size, Fill, Mapping};
use report::{Report, RunInfo};
use workload::{Workload, WorkloadSpec};

#[derive(Parser)]
#[command(
    name = "rmig-bench",
    version,
    about = "Measure rmig live-migration throughput"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Source and destination in one process over 127.0.0.1 (the default).
    Loopback(LoopbackArgs),
    /// Migrate this host's synthetic guest to a destination.
    Source(SourceArgs),
    /// Receive a migration from a source.
    Dest(DestArgs),
    /// Draw a result (`--json` output) round by round into an SVG or PNG file.
    Plot(PlotArgs),
    /// Print the NUMA topology and the placement plan for a migration.
    Topology(TopologyArgs),
}

#[derive(Args, Clone)]
struct TopologyArgs {
    /// Guest memory size to plan for.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Lanes to plan for (default: one per CPU).
    #[arg(long)]
    lanes: Option<usize>,
    /// Read the topology from an hwloc XML file instead of this machine.
    #[arg(long)]
    hwloc_xml: Option<std::path::PathBuf>,
    /// Use an hwloc synthetic topology (e.g. "pack:2 numa:2 core:4 pu:2").
    #[arg(long, conflicts_with = "hwloc_xml")]
    hwloc_synthetic: Option<String>,
    /// The network or RDMA device the migration uses (its NUMA node attracts lanes).
    #[arg(long)]
    nic: Option<String>,
    /// Assume the guest memory sits on this node (default: spread evenly over all nodes).
    #[arg(long)]
    memory_node: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn topology(a: TopologyArgs) -> Result<bool> {
    use rmig_numa::{MemSpan, Plan, Topology, TopologySource};
    let (topo, why) = match (&a.hwloc_xml, &a.hwloc_synthetic) {
        (Some(x), _) => (Topology::load(&TopologySource::Xml(x.clone()))?, None),
        (_, Some(s)) => (Topology::load(&TopologySource::Synthetic(s.clone()))?, None),
        _ => Topology::detect(),
    };
    let pages = a.size / PAGE_4K;
    let spans: Vec<MemSpan> = match a.memory_node {
        Some(n) => vec![MemSpan {
            region: 0,
            first_page: 0,
            npages: pages,
            node: Some(n),
        }],
        None => {
            let k = topo.nodes.len().max(1) as u64;
            topo.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let first = pages * i as u64 / k;
                    MemSpan {
                        region: 0,
                        first_page: first,
                        npages: pages * (i as u64 + 1) / k - first,
                        node: Some(n.os_index),
                    }
                })
                .collect()
        }
    };
    let lanes = a
        .lanes
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let nic_node = a.nic.as_deref().and_then(|n| topo.nic_node(n));
    let plan = Plan::build(&topo, lanes, &spans, nic_node);
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "topology": topo, "fallback": why, "plan": plan })
        );
    } else {
        if let Some(w) = why {
            println!("NUMA: falling back to a flat pool: {w}");
        }
        print!("{topo}{plan}");
    }
    Ok(true)
}

#[derive(Args, Clone)]
struct PlotArgs {
    /// A file holding the JSON output of loopback or source.
    result: std::path::PathBuf,
    /// The picture to write (.svg or .png).
    #[arg(short, long)]
    out: std::path::PathBuf,
}

#[derive(Args, Clone)]
struct GuestArgs {
    /// Guest memory size (e.g. 2GiB, 512MiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Page size of the region: 4KiB or 2MiB.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    page_size: u64,
    /// Back guest memory with transparent huge pages (`MADV_HUGEPAGE`), as QEMU does for
    /// guest RAM: `auto` for memory faulted in before the migration (the source, and a
    /// preallocated destination), `on` for all, `off` for none (4 KiB host pages).
    #[arg(long, value_enum, default_value_t = Thp::Auto)]
    thp: Thp,
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
    fn huge(self, prefaulted: bool) -> bool {
        match self {
            Thp::Auto => prefaulted,
            Thp::On => true,
            Thp::Off => false,
        }
    }
}

#[derive(Args, Clone)]
struct WorkloadArgs {
    /// How to fill source memory.
    #[arg(long, value_enum, default_value_t = Fill::Random)]
    fill: Fill,
    /// Fraction of zero pages for `--fill mixed`.
    #[arg(long, default_value_t = 0.5)]
    zero_fraction: f64,
    /// Rate at which writer threads dirty pages, MB/s (0: no writers).
    #[arg(long, default_value_t = 0.0)]
    dirty_rate: f64,
    /// Fraction of memory the writers touch.
    #[arg(long, default_value_t = 0.1)]
    hot_set: f64,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnNoConvergence {
    Fail,
    Switchover,
}

#[derive(Args, Clone)]
struct MigrateArgs {
    /// Data lanes (default: one per CPU).
    #[arg(long)]
    lanes: Option<usize>,
    /// Downtime ceiling in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Bandwidth ceiling in bytes/s (e.g. 500MB); 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    max_bandwidth: u64,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// What to do when the round limit is reached above the downtime limit.
    #[arg(long, value_enum, default_value_t = OnNoConvergence::Fail)]
    on_no_convergence: OnNoConvergence,
    /// Throttle the guest when rounds stop shrinking.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    auto_converge: OnOff,
    /// End-to-end verification of every page.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    verify: OnOff,
    /// Place and pin lanes next to the memory they serve (`off`: let the scheduler decide).
    #[arg(long, value_enum, default_value_t = NumaArg::Auto)]
    numa: NumaArg,
    #[command(flatten)]
    transport: TransportArgs,
}

/// Transport choice and RDMA settings (both ends).
#[derive(Args, Clone)]
struct TransportArgs {
    /// `auto`: RDMA when both ends have a device for the control connection's address, else
    /// TCP (saying why); `rdma`: RDMA or fail; `tcp`: TCP only.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// RDMA device (default: the one whose GID table holds the address used).
    #[arg(long)]
    rdma_dev: Option<String>,
    /// How guest memory is registered with the RDMA device: all of it up front, or chunks on
    /// demand with a bounded cache (for hosts that cannot pin all guest RAM).
    #[arg(long, value_enum, default_value_t = RegArg::PinAll)]
    rdma_registration: RegArg,
    /// Chunk size of chunked registration.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    rdma_chunk: u64,
    /// Registrations kept per lane with chunked registration.
    #[arg(long, default_value_t = 256)]
    rdma_max_chunks: u32,
    /// Seconds within which a connection that broke during pre-copy may come back (TCP);
    /// 0 fails the migration at once.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    reconnect_window: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Auto,
    Tcp,
    Rdma,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RegArg {
    PinAll,
    Chunked,
}

impl TransportArgs {
    fn choice(&self) -> rmig_engine::TransportChoice {
        match self.transport {
            TransportArg::Auto => rmig_engine::TransportChoice::Auto,
            TransportArg::Tcp => rmig_engine::TransportChoice::Tcp,
            TransportArg::Rdma => rmig_engine::TransportChoice::Rdma,
        }
    }

    fn rdma(&self) -> rmig_engine::RdmaConfig {
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

    fn dest_config(&self, key: Key) -> DestConfig {
        let mut d = DestConfig::new(key);
        d.transport = self.choice();
        d.rdma = self.rdma();
        d.reconnect_window = Duration::from_secs_f64(self.reconnect_window);
        d
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NumaArg {
    Auto,
    Off,
}

#[derive(Args, Clone)]
struct OutputArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Write progress as JSON lines to this file (one per round, at least one a second).
    #[arg(long)]
    progress_json: Option<std::path::PathBuf>,
    /// Serve metrics in Prometheus text format on this address (e.g. 127.0.0.1:9100) while
    /// the command runs.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl OutputArgs {
    /// Starts the Prometheus endpoint if one was asked for.
    fn start_metrics(&self) -> Result<()> {
        if let Some(a) = self.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(a)
                .install()
                .with_context(|| format!("serving metrics on {a}"))?;
        }
        Ok(())
    }
}

#[derive(Args, Clone)]
struct PreallocArgs {
    /// Populate destination memory before the migration (like QEMU's -mem-prealloc).
    #[arg(long, overrides_with = "no_prealloc", default_value_t = true)]
    prealloc: bool,
    /// Leave destination memory to be faulted in during the migration.
    #[arg(long)]
    no_prealloc: bool,
}

impl PreallocArgs {
    fn on(&self) -> bool {
        !self.no_prealloc
    }
}

#[derive(Args, Clone)]
struct LoopbackArgs {
    /// Address both ends use (an RDMA device's address for `--transport rdma`).
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    migrate: MigrateArgs,
    #[command(flatten)]
    prealloc: PreallocArgs,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Clone)]
struct KeyArgs {
    /// File holding the pre-shared key (else the RMIG_KEY environment variable).
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

impl KeyArgs {
    fn load(&self) -> Result<Key> {
        if let Some(p) = &self.key_file {
            return Ok(Key::from_file(p)?);
        }
        let bytes = std::env::var("RMIG_KEY")
            .context("no key: pass --key-file or set RMIG_KEY")?
            .into_bytes();
        Ok(Key::new(&bytes)?)
    }
}

#[derive(Args, Clone)]
struct SourceArgs {
    /// Destination address (host:port).
    #[arg(long)]
    connect: String,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    migrate: MigrateArgs,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Clone)]
struct DestArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// Seconds to wait for a source to complete the handshake (0: until Ctrl-C). Connections
    /// that fail the handshake (wrong key or version, scanners) do not end the wait.
    #[arg(long, default_value_t = 0.0, value_parser = parse_seconds)]
    incoming_timeout: f64,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    prealloc: PreallocArgs,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// A non-negative, finite number of seconds.
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds (0 or more)")),
    }
}

/// Device state the bench's guest "has": bytes derived from the seed, checked at the far end.
fn device_state(seed: u64) -> Vec<u8> {
    let mut r = mem::Rng::new(seed ^ 0xdead_beef);
    (0..64 * 1024).map(|_| r.next_u64() as u8).collect()
}

/// A destination embedder that keeps the device state it is handed.
struct BenchDest {
    got: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl DestEmbedder for BenchDest {
    fn load_device_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        *self.got.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
        Ok(())
    }
}

fn check_guest(g: &GuestArgs) -> Result<()> {
    if g.page_size != PAGE_4K && g.page_size != PAGE_2M {
        bail!("--page-size must be 4KiB or 2MiB");
    }
    if g.size == 0 || !g.size.is_multiple_of(g.page_size) {
        bail!("--size must be a non-zero multiple of the page size");
    }
    Ok(())
}

fn source_config(dest: String, key: Key, m: &MigrateArgs) -> SourceConfig {
    let mut c = SourceConfig::new(dest, key);
    if let Some(l) = m.lanes {
        c.lanes = l;
    }
    c.policy = ConvergePolicy {
        downtime_limit: Duration::from_millis(m.downtime_limit),
        max_rounds: m.max_rounds,
        on_no_convergence: match m.on_no_convergence {
            OnNoConvergence::Fail => NoConvergence::Fail,
            OnNoConvergence::Switchover => NoConvergence::ForceSwitchover,
        },
        auto_converge: m.auto_converge == OnOff::On,
        ..Default::default()
    };
    c.max_bandwidth = m.max_bandwidth;
    c.verify = m.verify == OnOff::On;
    c.transport = m.transport.choice();
    c.rdma = m.transport.rdma();
    c.reconnect_window = Duration::from_secs_f64(m.transport.reconnect_window);
    c.numa = match m.numa {
        NumaArg::Auto => rmig_engine::NumaMode::Auto,
        NumaArg::Off => rmig_engine::NumaMode::Off,
    };
    c
}

/// Prepared source side: memory, writers, region.
struct SourceGuest {
    mem: Mapping,
    log: SharedDirtyLog,
    workload: Workload,
    prepare_ms: f64,
    /// Bytes of source memory in transparent huge pages once filled.
    huge_bytes: u64,
}

fn prepare_source(g: &GuestArgs, w: &WorkloadArgs) -> Result<SourceGuest> {
    let t = Instant::now();
    // Like a VMM at start-up: read the machine's topology before any migration.
    let _ = rmig_numa::Topology::system();
    let mut mem = Mapping::new(g.size as usize, true, g.thp.huge(true))?;
    mem::fill(
        mem.bytes_mut(),
        g.page_size as usize,
        w.fill,
        w.zero_fraction,
        w.seed,
    );
    let pages = g.size / g.page_size;
    let log = SharedDirtyLog::new(&[pages]);
    let workload = Workload::start(
        mem.ptr(),
        pages,
        g.page_size,
        WorkloadSpec {
            dirty_rate: w.dirty_rate * 1e6,
            hot_set: w.hot_set,
            writers: w.writers,
            seed: w.seed,
        },
        log.clone(),
    );
    Ok(SourceGuest {
        huge_bytes: mem.huge_bytes(),
        mem,
        log,
        workload,
        prepare_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

fn region_of(m: &Mapping, g: &GuestArgs, known_zero: bool) -> Result<Region> {
    // SAFETY: the mapping outlives the migration (it is dropped at the end of the command),
    // and on a destination nothing but rmig writes it while the migration runs.
    let r = unsafe { Region::new(0, "bench.ram", m.ptr(), m.len() as u64, g.page_size) }?;
    Ok(r.with_gpa(0).with_known_zero(known_zero))
}

fn print(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Runs the source side on the driver's thread while showing progress; returns the result,
/// the statistics either way, and the CPU time spent meanwhile.
fn run_source(
    src: &mut SourceGuest,
    cfg: SourceConfig,
    g: &GuestArgs,
    dev: Vec<u8>,
    out: &OutputArgs,
) -> Result<(bool, rmig_engine::MigrationStats, f64)> {
    let monitor = Monitor::new();
    let h = driver::spawn(
        cfg,
        vec![region_of(&src.mem, g, false)?],
        Box::new(src.log.clone()),
        Box::new(src.workload.embedder(dev)),
        monitor.clone(),
    )?;
    let cpu0 = cpu_time();
    progress::watch(&monitor, out.progress_json.as_deref(), || h.is_finished())?;
    let result = h.wait();
    let cpu = cpu_time() - cpu0;
    // The source guest stays paused after a successful switchover; stop its writers for good.
    src.workload.stop();
    let ok = result.is_ok();
    let stats = result.unwrap_or_else(|_| monitor.stats());
    if let Some(w) = stats.numa.as_ref().and_then(|n| n.fallback.as_ref()) {
        eprintln!("rmig-bench: NUMA placement: {w}; using a flat pool");
    }
    Ok((ok, stats, cpu))
}

impl RunInfo {
    fn of(
        mode: &'static str,
        g: &GuestArgs,
        w: &WorkloadArgs,
        m: &MigrateArgs,
        src: &SourceGuest,
    ) -> RunInfo {
        RunInfo {
            mode,
            size: g.size,
            page_size: g.page_size,
            fill: w.fill,
            zero_fraction: w.zero_fraction,
            dirty_rate_mbs: w.dirty_rate,
            hot_set: w.hot_set,
            pages_dirtied: src.workload.pages_written(),
            prealloc: false,
            verify: m.verify == OnOff::On,
            downtime_limit_ms: m.downtime_limit,
            source_prepare_ms: src.prepare_ms,
            dest_prepare_ms: 0.0,
            thp: g.thp,
            source_huge_bytes: src.huge_bytes,
            dest_huge_bytes: 0,
        }
    }
}

fn loopback(a: LoopbackArgs) -> Result<bool> {
    check_guest(&a.guest)?;
    a.out.start_metrics()?;
    let mut src = prepare_source(&a.guest, &a.workload)?;
    let t = Instant::now();
    let dst = Mapping::new(
        a.guest.size as usize,
        a.prealloc.on(),
        a.guest.thp.huge(a.prealloc.on()),
    )?;
    let dest_ms = t.elapsed().as_secs_f64() * 1e3;
    let dest_huge = dst.huge_bytes();

    let key = Key::random()?;
    let bind = if a.addr.contains(':') {
        format!("[{}]:0", a.addr)
    } else {
        format!("{}:0", a.addr)
    };
    let listener = DestListener::bind(&bind, a.migrate.transport.dest_config(key.clone()))?;
    let addr = listener.local_addr()?;
    let dregion = region_of(&dst, &a.guest, true)?;
    let got = Arc::new(std::sync::Mutex::new(None));
    let dest_embedder = BenchDest { got: got.clone() };
    let dest_monitor = Monitor::new();
    let dm = dest_monitor.clone();
    let dest = std::thread::Builder::new()
        .name("bench-dest".into())
        .spawn(move || listener.serve(vec![dregion], Box::new(dest_embedder), dm))?;

    let cfg = source_config(addr.to_string(), key, &a.migrate);
    let dev = device_state(a.workload.seed);
    let (src_ok, stats, cpu) = run_source(&mut src, cfg, &a.guest, dev.clone(), &a.out)?;
    let dest_result = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    let completed = src_ok && dest_result.is_ok();
    let memory_equal = completed.then(|| {
        src.mem.bytes() == dst.bytes()
            && got.lock().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(&dev[..])
    });
    let mut run = RunInfo::of("loopback", &a.guest, &a.workload, &a.migrate, &src);
    run.prealloc = a.prealloc.on();
    run.dest_prepare_ms = dest_ms;
    run.dest_huge_bytes = dest_huge;
    let report = Report::new(stats, memory_equal, cpu, run);
    print(&report, a.out.json)?;
    if let Err(e) = &dest_result {
        eprintln!("destination: {e}");
    }
    Ok(report.ok() && dest_result.is_ok())
}

fn source(a: SourceArgs) -> Result<bool> {
    check_guest(&a.guest)?;
    a.out.start_metrics()?;
    let key = a.key.load()?;
    let mut src = prepare_source(&a.guest, &a.workload)?;
    let cfg = source_config(a.connect.clone(), key, &a.migrate);
    let dev = device_state(a.workload.seed);
    let (_, stats, cpu) = run_source(&mut src, cfg, &a.guest, dev, &a.out)?;
    let run = RunInfo::of("source", &a.guest, &a.workload, &a.migrate, &src);
    let report = Report::new(stats, None, cpu, run);
    print(&report, a.out.json)?;
    Ok(report.ok())
}

fn dest(a: DestArgs) -> Result<bool> {
    check_guest(&a.guest)?;
    a.out.start_metrics()?;
    let key = a.key.load()?;
    let t = Instant::now();
    let dst = Mapping::new(
        a.guest.size as usize,
        a.prealloc.on(),
        a.guest.thp.huge(a.prealloc.on()),
    )?;
    let prep = t.elapsed().as_secs_f64() * 1e3;
    let dest_huge = dst.huge_bytes();
    let mut cfg = a.transport.dest_config(key);
    cfg.incoming_timeout =
        (a.incoming_timeout > 0.0).then(|| Duration::from_secs_f64(a.incoming_timeout));
    let listener = DestListener::bind(&a.listen, cfg)?;
    eprintln!("listening on {}", listener.local_addr()?);
    let monitor = Monitor::new();
    let got = Arc::new(std::sync::Mutex::new(None));
    let cpu0 = cpu_time();
    let r = listener.serve(
        vec![region_of(&dst, &a.guest, true)?],
        Box::new(BenchDest { got: got.clone() }),
        monitor.clone(),
    );
    let report = Report::new(
        monitor.stats(),
        None,
        cpu_time() - cpu0,
        RunInfo {
            mode: "dest",
            size: a.guest.size,
            page_size: a.guest.page_size,
            fill: Fill::Random,
            zero_fraction: 0.0,
            dirty_rate_mbs: 0.0,
            hot_set: 0.0,
            pages_dirtied: 0,
            prealloc: a.prealloc.on(),
            verify: monitor.stats().verified.is_some(),
            downtime_limit_ms: 0,
            source_prepare_ms: 0.0,
            dest_prepare_ms: prep,
            thp: a.guest.thp,
            source_huge_bytes: 0,
            dest_huge_bytes: dest_huge,
        },
    );
    print(&report, a.out.json)?;
    if let Err(e) = &r {
        eprintln!("migration failed: {e}");
    }
    Ok(r.is_ok() && report.ok())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cmd = cli.cmd.unwrap_or_else(|| {
        Cmd::Loopback(LoopbackArgs::try_parse_from_defaults().expect("defaults parse"))
    });
    let ok = match cmd {
        Cmd::Loopback(a) => loopback(a)?,
        Cmd::Source(a) => source(a)?,
        Cmd::Dest(a) => dest(a)?,
        Cmd::Topology(a) => topology(a)?,
        Cmd::Plot(a) => {
            plot::plot(&a.result, &a.out)?;
            true
        }
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

impl LoopbackArgs {
    fn try_parse_from_defaults() -> Result<LoopbackArgs> {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            a: LoopbackArgs,
        }
        Ok(Only::try_parse_from(["rmig-bench"])?.a)
    }
}

/// CPU time (user and system) of this process so far, in seconds.
fn cpu_time() -> f64 {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
