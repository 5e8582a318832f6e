//! Network blips during pre-copy: a control connection or lanes that break, or go silent for
//! longer than the peer timeout, come back within the reconnect window; the migration
//! re-authenticates, sends again what was not confirmed, completes and verifies. A longer
//! outage fails cleanly with the source's guest running.
//!
//! A relay between the ends makes the blip: `Outage` lets nothing through for a while and
//! then resets the connections that were open (by then both ends have given up on them),
//! `Reset` kills every open connection at once (`ss -K`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmig_engine::control::link::Liveness;
use rmig_engine::{driver, Encryption, EngineError, MigrationStatus, SharedDirtyLog};
use rmig_tests::proxy::{Break, Proxy, Trigger};
use rmig_tests::{assert_same, Deadline, Mem, Setup, Writer};

const MIB: usize = 1 << 20;

/// What a migration through a relay that breaks after `after_bytes` of lane data left.
struct Outcome {
    source: Result<rmig_engine::MigrationStats, EngineError>,
    dest: Result<rmig_engine::DestOutcome, EngineError>,
    source_runs: bool,
    dest_runs: bool,
    source_reconnects: u64,
    dest_reconnects: u64,
    src: Mem,
    dst: Mem,
}

/// Encryption of the session through the relay: both ends `Psk`, or both `Off`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Cleartext,
    Tls,
}

fn migrate_through(
    action: Break,
    live: Liveness,
    window: Duration,
    after_bytes: u64,
    wire: Wire,
) -> Outcome {
    let len = 48 * MIB;
    let src = Mem::random(len, 0.1, 31);
    let dst = Mem::new(len);
    let log = SharedDirtyLog::new(&[(len / 4096) as u64]);
    let w = Writer::start(&src, log.clone(), 2048, 20);
    let mut setup = Setup::new(&src, &dst, len);
    setup.dirty = Box::new(log);
    setup.embedder = w.embedder(b"device".to_vec());
    setup.src.liveness = live;
    setup.dst.liveness = live;
    setup.src.reconnect_window = window;
    setup.dst.reconnect_window = window;
    setup.src.handshake_timeout = Duration::from_secs(2);
    setup.src.max_bandwidth = 40_000_000;
    if wire == Wire::Tls {
        setup.src.encryption = Encryption::Psk;
        setup.dst.encryption = Encryption::Psk;
    }
    let rec = setup.dest_embedder.clone();
    let (sm, dm) = (setup.src_monitor.clone(), setup.dst_monitor.clone());
    let (d, port) = setup.spawn_dest("127.0.0.1:0").unwrap();
    let target = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = match wire {
        Wire::Cleartext => Proxy::start(target, Trigger::LaneBytes(after_bytes), action),
        Wire::Tls => Proxy::start_opaque(target, after_bytes, action),
    };
    setup.src.dest = proxy.addr().to_string();
    let source = driver::migrate(
        setup.src,
        setup.src_regions,
        setup.dirty,
        setup.embedder,
        sm.clone(),
    );
    let dest = d.join().unwrap();
    drop(proxy);
    Outcome {
        source_runs: !w.is_paused(),
        dest_runs: rec.resumed.load(Ordering::Acquire),
        source_reconnects: sm.stats().reconnects,
        dest_reconnects: dm.stats().reconnects,
        source,
        dest,
        src,
        dst,
    }
}

fn assert_completed_after_reconnecting(o: Outcome, wire: Wire) {
    let s = o.source.expect("the migration completes after the blip");
    let name = if wire == Wire::Tls { "tls-psk" } else { "off" };
    assert_eq!(s.encryption, name, "the session kept its encryption");
    let d = o
        .dest
        .expect("the destination completes after the blip")
        .stats;
    // Lanes that joined again after the reconnect are the same lanes, not fallback ones.
    assert_eq!(d.fallback_reason, None, "{d:?}");
    assert_eq!(d.lanes, s.lanes, "{d:?}");
    assert_eq!(s.verified, Some(true));
    // The destination took back each reconnect (one more at most: a claim it answered that
    // the outage swallowed).
    assert!(
        o.source_reconnects >= 1 && (1..=o.source_reconnects + 1).contains(&o.dest_reconnects),
        "it reconnected: source {}, destination {}",
        o.source_reconnects,
        o.dest_reconnects
    );
    assert!(
        o.dest_runs && !o.source_runs,
        "exactly the destination's guest runs"
    );
    assert_same(o.src.bytes(), o.dst.bytes());
}

#[test]
fn a_seven_second_outage_mid_round_of_an_encrypted_session_is_ridden_out() {
    let _deadline = Deadline::secs(120);
    // The default peer timeout (5 s) and reconnect window (10 s): the outage outlasts the
    // peer timeout, so both ends give up on their connections, and the source reconnects:
    // a new TLS session for the control connection and each lane, each proof bound to it.
    let t = Instant::now();
    let o = migrate_through(
        Break::Outage(Duration::from_secs(7)),
        Liveness::default(),
        Duration::from_secs(10),
        8 * MIB as u64,
        Wire::Tls,
    );
    eprintln!("7 s outage: migration took {} ms", t.elapsed().as_millis());
    assert_completed_after_reconnecting(o, Wire::Tls);
}

/// Every open connection reset once mid-round (`ss -K`): the source reconnects and completes.
fn reset_mid_round(wire: Wire) {
    let _deadline = Deadline::secs(120);
    let o = migrate_through(
        Break::Reset,
        Liveness::default(),
        Duration::from_secs(10),
        8 * MIB as u64,
        wire,
    );
    assert_completed_after_reconnecting(o, wire);
}

#[test]
fn connections_reset_mid_round_are_reopened() {
    reset_mid_round(Wire::Cleartext);
}

#[test]
fn connections_reset_mid_round_of_an_encrypted_session_are_reopened() {
    reset_mid_round(Wire::Tls);
}

#[test]
fn an_outage_longer_than_the_window_fails_cleanly_and_the_source_runs_on() {
    let _deadline = Deadline::secs(120);
    let live = Liveness {
        heartbeat: Duration::from_millis(200),
        peer_timeout: Duration::from_secs(1),
    };
    let t = Instant::now();
    let o = migrate_through(
        Break::Outage(Duration::from_secs(30)),
        live,
        Duration::from_secs(2),
        8 * MIB as u64,
        Wire::Cleartext,
    );
    let took = t.elapsed();
    let se = o.source.unwrap_err();
    assert!(
        se.to_string().contains("no reconnect within 2000 ms"),
        "{se}"
    );
    let de = o.dest.unwrap_err();
    assert!(de.to_string().contains("did not reconnect"), "{de}");
    assert!(
        o.source_runs && !o.dest_runs,
        "the source's guest runs, only it"
    );
    assert!(
        took < Duration::from_secs(12),
        "failed within the window: {took:?}"
    );
    let _ = MigrationStatus::Failed;
}
