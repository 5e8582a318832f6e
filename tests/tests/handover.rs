//! The handover under faults: whatever breaks, wherever in the protocol, exactly one guest may
//! run — never two — and a failure before `Commit` leaves the source's guest running.
//!
//! A relay between the ends breaks the link right after a chosen control frame (or mid-round,
//! after some lane bytes): `Cut` shuts every connection (a process that dies), `Freeze` lets
//! nothing more through (`kill -STOP`, a silent network). Each row of the table is one
//! migration; the test prints the table and checks, for every row, that the two guests never
//! both run, that a guest is never silently lost (if neither runs, an end says
//! `handover-unknown`), that failures before `Commit` resume the source, and that both ends
//! return within a bound derived from the peer timeout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmig_engine::control::link::Liveness;
use rmig_engine::protocol::{codec, Message};
use rmig_engine::{driver, DestOutcome, EngineError, MigrationStats, MigrationStatus};
use rmig_engine::{DestEmbedder, SharedDirtyLog};
use rmig_tests::proxy::{Break, Proxy, Trigger};
use rmig_tests::{Deadline, Mem, RecordingDest, Setup, Writer};

const MIB: usize = 1 << 20;
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(3);
const RECONNECT_WINDOW: Duration = Duration::from_secs(2);

fn tag(m: Message) -> u8 {
    codec::encode(&m)[4]
}

/// Right after the `nth` frame like `m` went `to_dest` (or back).
fn after(to_dest: bool, m: Message, nth: u32) -> Trigger {
    Trigger::Frame {
        to_dest,
        tag: tag(m),
        nth,
    }
}

fn verified() -> Message {
    Message::Verified {
        ok: true,
        mismatches: vec![],
    }
}

/// The protocol steps at which the link breaks, in order, and whether the source may have sent
/// `Commit` by then (once `Ready` reached it, it commits at once).
fn steps() -> Vec<(&'static str, Trigger, bool)> {
    let (s, d) = (true, false);
    vec![
        (
            "handshake: HelloAck",
            after(
                d,
                Message::HelloAck {
                    version: 2,
                    nonce: [0; 32],
                },
                1,
            ),
            false,
        ),
        (
            "setup: TransportAccept",
            after(
                d,
                Message::TransportAccept {
                    kind: rmig_engine::protocol::TransportKind::Tcp,
                    lanes: 1,
                    note: String::new(),
                },
                1,
            ),
            false,
        ),
        (
            "round 0: RoundStart",
            after(
                s,
                Message::RoundStart {
                    round: 0,
                    last: false,
                },
                1,
            ),
            false,
        ),
        (
            "round 0: mid-data",
            Trigger::LaneBytes(6 * MIB as u64),
            false,
        ),
        (
            "round 0: RoundEndAck",
            after(d, Message::RoundEndAck { round: 0 }, 1),
            false,
        ),
        (
            "stop-and-copy: RoundStart",
            after(
                s,
                Message::RoundStart {
                    round: 0,
                    last: true,
                },
                2,
            ),
            false,
        ),
        (
            "DeviceState",
            after(
                s,
                Message::DeviceState {
                    data: vec![],
                    last: true,
                },
                1,
            ),
            false,
        ),
        (
            "Checksums (before the pause)",
            after(s, Message::Checksums { regions: vec![] }, 1),
            false,
        ),
        (
            "Verified (before the pause)",
            after(d, verified(), 1),
            false,
        ),
        (
            "Digests (in the pause)",
            after(s, Message::Digests { chunks: vec![] }, 1),
            false,
        ),
        ("Verified (in the pause)", after(d, verified(), 2), false),
        ("Ready", after(d, Message::Ready, 1), true),
        ("Commit", after(s, Message::Commit, 1), true),
        ("Done", after(d, Message::Done, 1), true),
    ]
}

/// What one migration through a breaking relay left behind.
struct Row {
    source: Result<MigrationStats, EngineError>,
    source_status: MigrationStatus,
    source_runs: bool,
    source_ms: Option<u128>,
    dest: Result<DestOutcome, EngineError>,
    dest_status: MigrationStatus,
    dest_runs: bool,
    dest_ms: Option<u128>,
}

fn brief<T>(r: &Result<T, EngineError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => {
            let s = e.to_string();
            s.chars().take(60).collect()
        }
    }
}

/// One migration of 16 MiB whose link breaks at `trigger` with `action`.
fn run_case(trigger: Trigger, action: Break) -> Row {
    let len = 16 * MIB;
    let src = Mem::random(len, 0.0, 11);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let w = Writer::start(&src, log.clone(), 1, 0); // no writes: tracks pause and resume
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    let live = Liveness {
        heartbeat: Duration::from_millis(200),
        peer_timeout: PEER_TIMEOUT,
    };
    setup.src.liveness = live;
    setup.dst.liveness = live;
    setup.src.handshake_timeout = HANDSHAKE_TIMEOUT;
    setup.dst.handshake_timeout = HANDSHAKE_TIMEOUT;
    setup.src.ready_timeout = READY_TIMEOUT;
    // Pre-copy breaks are retried within the window (the relay never lets them through).
    setup.src.reconnect_window = RECONNECT_WINDOW;
    setup.dst.reconnect_window = RECONNECT_WINDOW;
    setup.dst.incoming_timeout = Some(Duration::from_secs(4));
    // A pace that makes round 0 last long enough to be broken in the middle.
    setup.src.max_bandwidth = 40_000_000;
    let rec = setup.dest_embedder.clone();
    let dm = setup.dst_monitor.clone();
    let (d, port) = setup.spawn_dest("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        trigger,
        action,
    );
    setup.src.dest = proxy.addr().to_string();
    let sm = setup.src_monitor.clone();
    let source = driver::migrate(
        setup.src,
        setup.src_regions,
        setup.dirty,
        setup.embedder,
        sm.clone(),
    );
    let source_done = Instant::now();
    let dest = d.join().unwrap();
    let dest_done = Instant::now();
    let since = |t: Instant| {
        proxy
            .fired_at()
            .map(|f| t.saturating_duration_since(f).as_millis())
    };
    let row = Row {
        source_status: sm.stats().status,
        source_runs: !w.is_paused(),
        source_ms: since(source_done),
        source,
        dest_status: dm.stats().status,
        dest_runs: rec.resumed.load(Ordering::Acquire),
        dest_ms: since(dest_done),
        dest,
    };
    drop(proxy);
    row
}

/// The checks every row must pass.
fn check(step: &str, action: Break, committed: bool, r: &Row) {
    let at = format!("{action:?} at {step}");
    assert!(!(r.source_runs && r.dest_runs), "{at}: both guests run");
    if !r.source_runs && !r.dest_runs {
        assert!(
            r.source_status == MigrationStatus::HandoverUnknown
                || r.dest_status == MigrationStatus::HandoverUnknown,
            "{at}: no guest runs and nobody says handover-unknown"
        );
    }
    if !committed {
        assert!(r.source_runs, "{at}: before Commit the source must run on");
        assert!(!r.dest_runs, "{at}: the destination resumed without Commit");
        assert!(
            r.source.is_err() || step == "Done",
            "{at}: the source cannot succeed"
        );
    }
    if r.dest_runs {
        assert_eq!(r.dest_status, MigrationStatus::Completed, "{at}");
    }
    // Every wait is bounded: both ends return within a bound derived from the timeouts.
    let bound = (2 * PEER_TIMEOUT + READY_TIMEOUT + HANDSHAKE_TIMEOUT + RECONNECT_WINDOW)
        .as_millis()
        + 1500;
    for (end, ms) in [("source", r.source_ms), ("destination", r.dest_ms)] {
        if let Some(ms) = ms {
            assert!(
                ms <= bound,
                "{at}: the {end} took {ms} ms after the break (bound {bound})"
            );
        }
    }
}

fn table(action: Break) {
    eprintln!("| break | step | source | source runs | detected (ms) | destination | destination runs | detected (ms) |");
    for (step, trigger, committed) in steps() {
        let r = run_case(trigger, action);
        eprintln!(
            "| {action:?} | {step} | {} ({}) | {} | {} | {} ({}) | {} | {} |",
            r.source_status,
            brief(&r.source),
            r.source_runs,
            r.source_ms.map_or("-".into(), |m| m.to_string()),
            r.dest_status,
            brief(&r.dest),
            r.dest_runs,
            r.dest_ms.map_or("-".into(), |m| m.to_string()),
        );
        check(step, action, committed, &r);
    }
}

#[test]
fn an_end_that_dies_at_any_step_never_leaves_two_guests_running() {
    let _deadline = Deadline::secs(120);
    table(Break::Cut);
}

#[test]
fn a_link_that_goes_silent_at_any_step_never_leaves_two_guests_running() {
    let _deadline = Deadline::secs(120);
    table(Break::Freeze);
}

/// A destination whose device-state load outlasts the source's wait for `Ready`.
#[derive(Clone, Default)]
struct SlowLoad(RecordingDest);

impl DestEmbedder for SlowLoad {
    fn load_device_state(&mut self, s: Vec<u8>) -> Result<(), String> {
        std::thread::sleep(Duration::from_secs(12));
        self.0.load_device_state(s)
    }
    fn resume(&mut self) -> Result<(), String> {
        self.0.resume()
    }
}

#[test]
fn a_destination_slower_than_the_ready_timeout_is_abandoned_and_never_resumes() {
    let _deadline = Deadline::secs(120);
    let len = 8 * MIB;
    let src = Mem::random(len, 0.0, 12);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let w = Writer::start(&src, log.clone(), 1, 0);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    let slow = SlowLoad::default();
    let l = rmig_engine::DestListener::bind("127.0.0.1:0", setup.dst.clone()).unwrap();
    setup.src.dest = l.local_addr().unwrap().to_string();
    let regions = setup.dst_regions.clone();
    let emb = slow.clone();
    let d =
        std::thread::spawn(move || l.serve(regions, Box::new(emb), rmig_engine::Monitor::new()));
    let t0 = Instant::now();
    let s = driver::migrate(
        setup.src,
        setup.src_regions,
        setup.dirty,
        setup.embedder,
        setup.src_monitor,
    );
    let se = s.unwrap_err();
    assert!(se.to_string().contains("no Ready within 10000 ms"), "{se}");
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "the source waited for the slow load"
    );
    assert!(!w.is_paused(), "the source's guest runs on");
    let de = d.join().unwrap().unwrap_err();
    assert!(matches!(de, EngineError::PeerError(_)), "{de}");
    assert!(
        slow.0.device_state.lock().unwrap().is_some(),
        "the load did finish"
    );
    assert!(
        !slow.0.resumed.load(Ordering::Acquire),
        "the destination must not resume"
    );
}
