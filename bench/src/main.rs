//! `rmig-bench`: rmig's standalone throughput tool.
//!
//! `loopback` runs a source and a destination in one process over 127.0.0.1 with a synthetic
//! guest (memory filled as asked, writer threads dirtying it), migrates, verifies, compares
//! both memories byte for byte, and reports. `source` and `dest` do the same across two hosts.
//!
//! Order matters for a user's time: flags are checked as they are parsed (`args`), the
//! listening port is bound, and only then is guest memory allocated; every failure ends with
//! one line on stderr that says what to change (`fail`), and Ctrl-C cancels like QEMU's
//! `migrate_cancel` (`signals`).

mod args;
mod bare;
mod fail;
mod guest;
mod mem;
mod parse;
mod plot;
mod progress;
mod report;
mod signals;
mod topology;
mod workload;

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rmig_engine::{
    ConvergePolicy, DestListener, Encryption, EngineError, Key, MigrationStats, MigrationStatus,
    Monitor, NoConvergence, Region, SharedDirtyLog, SourceConfig, SourceSession, Step,
    TransportChoice,
};

pub use args::Thp;
use args::{
    Cmd, DestArgs, GuestArgs, LoopbackArgs, MigrateArgs, NumaArg, OnHandoverUnknown,
    OnNoConvergence, OnOff, OutputArgs, SourceArgs, WorkloadArgs,
};
use fail::Side;
use guest::DestGuest;
use mem::Mapping;
use report::{DestFigures, DestGuestFigures, Report, RunInfo};
use workload::{Workload, WorkloadSpec};

/// Exit code of a failed migration, or of one that could not start.
const EXIT_FAILED: i32 = 1;
/// Exit code when the handover is unknown and nobody decided.
const EXIT_HANDOVER_UNKNOWN: i32 = 3;
/// Exit code when post-copy broke after the destination resumed: the guest is lost.
const EXIT_GUEST_LOST: i32 = 4;

/// What the synthetic guest does, from its flags.
fn spec_of(w: &WorkloadArgs) -> WorkloadSpec {
    WorkloadSpec {
        dirty_rate: w.dirty_rate * 1e6,
        hot_set: w.hot_set,
        writers: w.writers.into(),
        seed: w.seed,
    }
}

/// Device state the bench's guest "has": its workload (so that the destination's guest goes
/// on doing the same), then bytes derived from the seed, checked at the far end.
fn device_state(w: &WorkloadArgs) -> Vec<u8> {
    spec_of(w).device_state(64 * 1024)
}

fn source_config(dest: String, key: Key, m: &MigrateArgs) -> SourceConfig {
    let mut c = SourceConfig::new(dest, key);
    c.lanes = m
        .lanes
        .map_or_else(|| args::default_lanes(c.lanes), usize::from);
    c.policy = ConvergePolicy {
        downtime_limit: Duration::from_millis(m.downtime_limit),
        max_rounds: m.max_rounds,
        on_no_convergence: match m.on_no_convergence {
            OnNoConvergence::Fail => NoConvergence::Fail,
            OnNoConvergence::Switchover => NoConvergence::ForceSwitchover,
        },
        auto_converge: m.auto_converge == OnOff::On,
        postcopy: m.postcopy(),
        ..Default::default()
    };
    c.max_bandwidth = m.max_bandwidth;
    c.verify = m.verify.mode();
    c.encryption = m.transport.encryption(true);
    c.rdma_cleartext_lanes = m.transport.rdma_cleartext_lanes;
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
    let workload = Workload::start(mem.ptr(), pages, g.page_size, spec_of(w), log.clone());
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
    std::io::stdout().flush()?;
    Ok(())
}

/// What a source run left behind.
struct SourceRun {
    /// The engine's verdict (a handover settled by the operator still reads as its error).
    result: Result<(), EngineError>,
    stats: MigrationStats,
    cpu: f64,
    /// Whether the source guest runs after the migration.
    guest_running: bool,
}

/// The source's steps on the migration thread. A session whose handover is unknown comes
/// back with the error, so that the operator's decision can be applied to it.
fn drive(
    cfg: SourceConfig,
    regions: Vec<Region>,
    dirty: SharedDirtyLog,
    emb: workload::BenchEmbedder,
    m: Arc<Monitor>,
) -> (Result<MigrationStats, EngineError>, Option<SourceSession>) {
    let mut s = match SourceSession::setup(cfg, regions, Box::new(dirty), Box::new(emb), m) {
        Ok(s) => s,
        Err(e) => return (Err(e), None),
    };
    loop {
        match s.iterate() {
            Ok(Step::Continue) => {}
            Ok(Step::ReadyForSwitchover) => break,
            Err(e) => return (Err(e), None),
        }
    }
    match s.complete() {
        Ok(st) => (Ok(st), None),
        Err(e @ EngineError::HandoverUnknown(_)) => (Err(e), Some(s)),
        Err(e) => (Err(e), None),
    }
}

/// Runs the source side on a thread of its own while showing progress.
fn run_source(
    src: &mut SourceGuest,
    cfg: SourceConfig,
    g: &GuestArgs,
    dev: Vec<u8>,
    out: &OutputArgs,
    on_unknown: OnHandoverUnknown,
) -> Result<SourceRun> {
    let monitor = Monitor::new();
    signals::cancel_on_signal(&monitor);
    let rdma_wanted = cfg.transport != TransportChoice::Tcp;
    // The source's memory is filled (so faulted in) before the migration starts.
    monitor.set_memory_facts(report::facts(true, src.huge_bytes, g.thp));
    let regions = vec![region_of(&src.mem, g, false)?];
    let (log, emb, m) = (src.log.clone(), src.workload.embedder(dev), monitor.clone());
    let join = std::thread::Builder::new()
        .name("rmig-migrate".into())
        .spawn(move || drive(cfg, regions, log, emb, m))?;
    let cpu0 = cpu_time();
    progress::watch(&monitor, Side::Source, out.progress_json.as_deref(), || {
        join.is_finished()
    })?;
    let (result, session) = join
        .join()
        .map_err(|_| anyhow!("the migration thread panicked"))?;
    if let Some(mut s) = session {
        if let Some(run_here) = decide(on_unknown, Side::Source) {
            s.resolve_handover(run_here)?;
        }
    }
    let cpu = cpu_time() - cpu0;
    let guest_running = src.workload.guest_running();
    // The source guest stays paused after a successful switchover; stop its writers for good.
    src.workload.stop();
    let mut stats = monitor.stats();
    if let Err(EngineError::PeerError(m)) = &result {
        stats.error = Some(format!(
            "the destination reported an error: {}",
            fail::from_the_peer(m)
        ));
    }
    if let Some(w) = stats.numa.as_ref().and_then(|n| n.fallback.as_ref()) {
        eprintln!("rmig-bench: NUMA placement: {w}; using a flat pool");
    }
    // The library prints nothing; the reason is in the report. Said here only when RDMA was
    // possible on this host and not refused by the operator (`--transport tcp`).
    if let Some(why) = &stats.fallback_reason {
        if rdma_wanted && rdma_device_here() {
            eprintln!("rmig-bench: using TCP, not RDMA: {why}");
        }
    }
    Ok(SourceRun {
        result: result.map(|_| ()),
        stats,
        cpu,
        guest_running,
    })
}

/// Whether this host has an RDMA device at all (any entry in `/sys/class/infiniband`).
fn rdma_device_here() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// The operator's decision on an unknown handover: `Some(true)` runs the guest here.
fn decide(choice: OnHandoverUnknown, side: Side) -> Option<bool> {
    match choice {
        OnHandoverUnknown::RunHere => Some(true),
        OnHandoverUnknown::RunThere => Some(false),
        OnHandoverUnknown::Ask => ask(side),
    }
}

/// Asks on the terminal which end runs the guest; `None` without a terminal or an answer.
fn ask(side: Side) -> Option<bool> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    let other = match side {
        Side::Source => "destination",
        Side::Dest => "source",
    };
    eprint!(
        "rmig-bench: the link failed during the handover; this host cannot know whether the \
         {other} runs the guest. Check it, then type `here` to run the guest on this host, \
         `there` to leave it to the {other}, or anything else to decide later: "
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).ok()?;
    match line.trim() {
        "here" => Some(true),
        "there" => Some(false),
        _ => None,
    }
}

impl RunInfo {
    fn of_source(
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
            fill: Some(w.fill),
            zero_fraction: Some(w.zero_fraction),
            dirty_rate_mbs: Some(w.dirty_rate),
            hot_set: Some(w.hot_set),
            pages_dirtied: Some(src.workload.pages_written()),
            prealloc: None,
            verify: m.verify.mode().is_on(),
            downtime_limit_ms: Some(m.downtime_limit),
            source_prepare_ms: Some(src.prepare_ms),
            dest_prepare_ms: None,
            thp: g.thp,
            source_huge_bytes: Some(src.huge_bytes),
            dest_huge_bytes: None,
        }
    }
}

/// The exit code of a finished run, after printing the line that explains a failure.
fn conclude(report: &Report, errors: &[(Side, &EngineError)]) -> i32 {
    for (side, e) in errors {
        eprintln!("{}", fail::line(*side, e));
    }
    let status = report.stats.status;
    let lost = status == MigrationStatus::GuestLost
        || errors
            .iter()
            .any(|(_, e)| matches!(e, EngineError::GuestLost(_)));
    if errors.is_empty() && !report.ok() {
        eprintln!(
            "rmig-bench: {}: the migration ended {status} but {}; this is a bug, please report \
             it with this output",
            report.run.mode,
            match (report.memory_equal, report.stats.verified) {
                (Some(false), _) => "the memories differ",
                (_, Some(false)) => "verification failed",
                _ => "verification did not run",
            }
        );
    }
    match status {
        MigrationStatus::Cancelled if signals::interrupted() => signals::EXIT_CANCELLED,
        MigrationStatus::HandoverUnknown => EXIT_HANDOVER_UNKNOWN,
        _ if lost => EXIT_GUEST_LOST,
        _ if report.ok() => 0,
        _ => EXIT_FAILED,
    }
}

/// How long the loopback's destination gets to end on its own after its source failed in
/// the middle of a session: it notices a peer that went away within twice its peer timeout.
const DEST_ENDS_WITHIN: Duration = Duration::from_secs(12);

/// Joins the loopback's destination thread. After a failed source it is cancelled when no
/// session is under way (the source failed before it got there: no RDMA device, say, and the
/// destination would listen for ever), or when it has not ended within [`DEST_ENDS_WITHIN`].
fn join_dest<T>(
    dest: std::thread::JoinHandle<std::result::Result<T, EngineError>>,
    monitor: &Monitor,
    source_failed: bool,
) -> Result<std::result::Result<T, EngineError>> {
    let until = Instant::now() + DEST_ENDS_WITHIN;
    while source_failed && !dest.is_finished() {
        let no_session = monitor.stats().status == MigrationStatus::Setup;
        if no_session || Instant::now() >= until {
            monitor.cancel("the source failed (its reason is above)");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    dest.join()
        .map_err(|_| anyhow!("destination thread panicked"))
}

fn loopback(a: LoopbackArgs) -> Result<i32> {
    a.out.start_metrics()?;
    let key = Key::random()?;
    let bind = if a.addr.contains(':') {
        format!("[{}]:0", a.addr)
    } else {
        format!("{}:0", a.addr)
    };
    // Both ends in one process: cleartext unless `--encryption on`.
    let mut dcfg = a.migrate.transport.dest_config(key.clone());
    dcfg.encryption = a.migrate.transport.encryption(false);
    let listener = DestListener::bind(&bind, dcfg)?;
    let addr = listener.local_addr()?;
    let mut src = prepare_source(&a.guest, &a.workload)?;
    let t = Instant::now();
    let dst = Mapping::new(
        a.guest.size as usize,
        a.prealloc.on(),
        a.guest.thp.huge(a.prealloc.on()),
    )?;
    let dest_ms = t.elapsed().as_secs_f64() * 1e3;
    let dest_huge = dst.huge_bytes();
    let dregion = region_of(&dst, &a.guest, true)?;
    let guest = DestGuest::new(&dst, a.guest.page_size);
    let dest_embedder = guest.embedder();
    let dm = Monitor::new();
    dm.set_memory_facts(report::facts(a.prealloc.on(), dest_huge, a.guest.thp));
    let dest_monitor = dm.clone();
    let dest = std::thread::Builder::new()
        .name("bench-dest".into())
        .spawn(move || listener.serve(vec![dregion], Box::new(dest_embedder), dm))?;

    let mut cfg = source_config(addr.to_string(), key, &a.migrate);
    cfg.encryption = a.migrate.transport.encryption(false);
    let dev = device_state(&a.workload);
    // No operator between two ends of one process: an unknown handover stays unknown.
    let on_unknown = OnHandoverUnknown::Ask;
    let run = run_source(&mut src, cfg, &a.guest, dev.clone(), &a.out, on_unknown)?;
    let dest_result = join_dest(dest, &dest_monitor, run.result.is_err())?;
    let lost = [run.result.as_ref().err(), dest_result.as_ref().err()]
        .iter()
        .any(|e| matches!(e, Some(EngineError::GuestLost(_))));
    let completed = run.result.is_ok() && dest_result.is_ok();
    let (memory_equal, left_out, written) = compare_ends(
        &src,
        dst,
        &guest,
        &dev,
        a.guest.page_size,
        (completed, lost),
    );
    let mut info = RunInfo::of_source("loopback", &a.guest, &a.workload, &a.migrate, &src);
    info.prealloc = Some(a.prealloc.on());
    info.dest_prepare_ms = Some(dest_ms);
    info.dest_huge_bytes = Some(dest_huge);
    let mut report = Report::new(run.stats, memory_equal, run.cpu, info);
    report.memory_pages_left_out = left_out;
    let dest_stats = dest_monitor.stats();
    report.dest_postcopy = dest_stats.postcopy;
    report.dest_landing = dest_stats.landing;
    report.dest_guest = written.as_ref().map(DestGuestFigures::of);
    report.source_guest = Some(if run.guest_running {
        "running"
    } else {
        "paused"
    });
    print(&report, a.out.json)?;
    let code = conclude(&report, &loopback_errors(&run.result, &dest_result));
    a.out.linger();
    Ok(code)
}

/// A loopback run's errors to tell: the source's first; the destination's only when it adds
/// something (not an echo of the source's own failure).
fn loopback_errors<'a, S, D>(
    source: &'a Result<S, EngineError>,
    dest: &'a Result<D, EngineError>,
) -> Vec<(Side, &'a EngineError)> {
    let mut errors = Vec::new();
    if let Err(e) = source {
        errors.push((Side::Source, e));
    }
    if let Err(e) = dest {
        let echo = matches!(
            e,
            EngineError::PeerError(_) | EngineError::PeerCancelled(_) | EngineError::PeerClosed
        );
        if source.is_ok() || !echo {
            errors.push((Side::Dest, e));
        }
    }
    errors
}

/// After a loopback run: stops the destination's guest and compares both ends (memory on
/// every page that guest did not write since it resumed, and the device state) when the run
/// `completed`. Returns whether they are equal, the pages left out, and what the guest wrote.
/// After a `lost` guest nothing is compared, and the destination's memory stays mapped for
/// the rest of the process: its writers wait on pages that will never come.
fn compare_ends(
    src: &SourceGuest,
    dst: Mapping,
    guest: &DestGuest,
    dev: &[u8],
    page: u64,
    (completed, lost): (bool, bool),
) -> (Option<bool>, Option<u64>, Option<guest::Written>) {
    if lost {
        guest.abandon();
        std::mem::forget(dst);
        return (None, None, None);
    }
    let written = guest.stop();
    if !completed {
        return (None, None, written);
    }
    let (eq, left_out) = guest::compare(
        src.mem.bytes(),
        dst.bytes(),
        page as usize,
        written.as_ref(),
    );
    let state_equal = guest.device_state().as_deref() == Some(dev);
    (Some(eq && state_equal), Some(left_out), written)
}

fn source(a: SourceArgs) -> Result<i32> {
    a.out.start_metrics()?;
    let x509 = matches!(a.migrate.transport.encryption(true), Encryption::X509(_));
    let key = a.key.load(x509)?;
    // A name that does not resolve is found before the guest is allocated and filled.
    if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(a.connect.as_str()) {
        eprintln!(
            "rmig-bench: source: cannot resolve --connect {}: {e}; check the host name",
            a.connect
        );
        return Ok(EXIT_FAILED);
    }
    let mut src = prepare_source(&a.guest, &a.workload)?;
    let cfg = source_config(a.connect.clone(), key, &a.migrate);
    let dev = device_state(&a.workload);
    let run = run_source(
        &mut src,
        cfg,
        &a.guest,
        dev,
        &a.out,
        a.handover.on_handover_unknown,
    )?;
    let info = RunInfo::of_source("source", &a.guest, &a.workload, &a.migrate, &src);
    let mut report = Report::new(run.stats, None, run.cpu, info);
    report.source_guest = Some(if run.guest_running {
        "running"
    } else {
        "paused"
    });
    print(&report, a.out.json)?;
    let errors: Vec<(Side, &EngineError)> = run
        .result
        .as_ref()
        .err()
        .map(|e| (Side::Source, e))
        .into_iter()
        .collect();
    let code = conclude(&report, &errors);
    a.out.linger();
    Ok(code)
}

/// The destination's figures from its monitor: what landed, and its phases.
fn dest_figures(stats: &MigrationStats, monitor: &Monitor) -> DestFigures {
    let t = monitor.timeline();
    let at = |s: MigrationStatus| t.iter().find(|(x, _)| *x == s).map(|(_, d)| *d);
    let end = t
        .iter()
        .rev()
        .find(|(s, _)| {
            !matches!(
                s,
                MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Device
            )
        })
        .map(|(_, d)| *d);
    let active = at(MigrationStatus::Active);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let connected = active.map(|a| ms(a) - stats.setup_time_ms);
    let rate = match (active, end) {
        (Some(a), Some(e)) if e > a => stats.ram.normal_bytes as f64 / (e - a).as_secs_f64(),
        _ => 0.0,
    };
    DestFigures {
        received_bytes: stats.ram.normal_bytes,
        rounds: stats.ram.dirty_sync_count,
        rate,
        // Completed: the engine's own figure, the one it sent the source (after post-copy,
        // the pause ended when the guest resumed here at the switch). A guest lost in
        // post-copy resumed at the switch too; paused and not resumed (an unknown handover):
        // the pause so far.
        downtime_ms: match (
            at(MigrationStatus::Device),
            at(MigrationStatus::Postcopy),
            stats.status,
        ) {
            (Some(_), _, MigrationStatus::Completed) => Some(stats.downtime_ms),
            (Some(d), Some(p), _) => Some(ms(p.saturating_sub(d))),
            (Some(_), None, _) => Some(stats.downtime_ms),
            _ => None,
        },
        total_ms: connected.zip(end).map(|(c, e)| ms(e) - c),
    }
}

fn dest(a: DestArgs) -> Result<i32> {
    let x509 = matches!(a.transport.encryption(true), Encryption::X509(_));
    let key = a.key.load(x509)?;
    let mut cfg = a.transport.dest_config(key);
    cfg.incoming_timeout =
        (a.incoming_timeout > 0.0).then(|| Duration::from_secs_f64(a.incoming_timeout));
    // The port first: one already in use is found before any memory is allocated.
    let listener = match DestListener::bind(&a.listen, cfg) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("{}", fail::line(Side::Dest, &e));
            return Ok(EXIT_FAILED);
        }
    };
    a.out.start_metrics()?;
    // With --keep-serving the listener stays bound between migrations: a source that
    // connects while the last report prints waits in the backlog and is served next.
    loop {
        let (code, r) = serve_one(&a, listener.clone())?;
        let no_source = matches!(r, Some(EngineError::NoSource { .. }));
        if !a.keep_serving || signals::interrupted() || no_source {
            a.out.linger();
            return Ok(code);
        }
        eprintln!("migration ended (exit code {code}); waiting for the next source");
    }
}

/// Receives one migration on `listener` into fresh memory and reports it; returns the exit
/// code of that migration and its error, if any.
fn serve_one(a: &DestArgs, listener: Arc<DestListener>) -> Result<(i32, Option<EngineError>)> {
    let t = Instant::now();
    let dst = Mapping::new(
        a.guest.size as usize,
        a.prealloc.on(),
        a.guest.thp.huge(a.prealloc.on()),
    )?;
    let prep = t.elapsed().as_secs_f64() * 1e3;
    let dest_huge = dst.huge_bytes();
    let monitor = Monitor::new();
    signals::cancel_on_signal(&monitor);
    monitor.set_memory_facts(report::facts(a.prealloc.on(), dest_huge, a.guest.thp));
    let guest = DestGuest::new(&dst, a.guest.page_size);
    let region = region_of(&dst, &a.guest, true)?;
    let emb = guest.embedder();
    let m = monitor.clone();
    eprintln!("listening on {}", listener.local_addr()?);
    let cpu0 = cpu_time();
    let join = std::thread::Builder::new()
        .name("bench-dest".into())
        .spawn(move || listener.serve(vec![region], Box::new(emb), m))?;
    progress::watch(&monitor, Side::Dest, a.out.progress_json.as_deref(), || {
        join.is_finished()
    })?;
    let r = join
        .join()
        .map_err(|_| anyhow!("the destination thread panicked"))?;
    if let Err(EngineError::HandoverUnknown(_)) = &r {
        settle_dest(&monitor, decide(a.handover.on_handover_unknown, Side::Dest));
    }
    let written = if let Err(EngineError::GuestLost(_)) = &r {
        // Writers wait on pages that will never come: the memory stays for the process's life.
        guest.abandon();
        std::mem::forget(dst);
        None
    } else {
        guest.stop()
    };
    let stats = monitor.stats();
    let figures = dest_figures(&stats, &monitor);
    let info = dest_info(a, prep, dest_huge, stats.verified.is_some());
    let mut report = Report::new(stats, None, cpu_time() - cpu0, info);
    report.stats.ram.transferred = figures.received_bytes;
    report.dest = Some(figures);
    report.dest_guest = written.as_ref().map(DestGuestFigures::of);
    print(&report, a.out.json)?;
    let err = r.err();
    let errors: Vec<(Side, &EngineError)> = err.iter().map(|e| (Side::Dest, e)).collect();
    let code = conclude(&report, &errors);
    Ok((code, err))
}

/// What a destination's report states about its run.
fn dest_info(a: &DestArgs, prep_ms: f64, dest_huge: u64, verify: bool) -> RunInfo {
    RunInfo {
        mode: "dest",
        size: a.guest.size,
        page_size: a.guest.page_size,
        fill: None,
        zero_fraction: None,
        dirty_rate_mbs: None,
        hot_set: None,
        pages_dirtied: None,
        prealloc: Some(a.prealloc.on()),
        verify,
        downtime_limit_ms: None,
        source_prepare_ms: None,
        dest_prepare_ms: Some(prep_ms),
        thp: a.guest.thp,
        source_huge_bytes: None,
        dest_huge_bytes: Some(dest_huge),
    }
}

/// Applies the operator's decision on a destination whose handover is unknown: the bench's
/// guest is only memory, so running it here is recording that it runs.
fn settle_dest(monitor: &Monitor, run_here: Option<bool>) {
    let (status, note) = match run_here {
        None => return,
        Some(true) => (
            MigrationStatus::Completed,
            "the operator resumed the guest on the destination after an unknown handover",
        ),
        Some(false) => (
            MigrationStatus::Failed,
            "the operator left the guest to the source after an unknown handover; discarded here",
        ),
    };
    let _settled = monitor.settle_handover(status, note);
}

fn main() {
    let cmd = args::parse();
    if let Err(e) = signals::install() {
        eprintln!("rmig-bench: {e:#}");
        std::process::exit(EXIT_FAILED);
    }
    let r = match cmd {
        Cmd::Loopback(a) => loopback(a),
        Cmd::Source(a) => source(a),
        Cmd::Dest(a) => dest(a),
        Cmd::Topology(a) => topology::topology(a).map(|()| 0),
        Cmd::Bare(a) => bare::bare(&a).map(|()| 0),
        Cmd::Plot(a) => plot::plot(&a.result, &a.out).map(|()| 0),
    };
    let code = r.unwrap_or_else(|e| {
        eprintln!("rmig-bench: {e:#}");
        EXIT_FAILED
    });
    std::process::exit(code);
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
