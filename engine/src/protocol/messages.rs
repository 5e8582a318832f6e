//! Control-plane messages.

use crate::region::RegionDesc;
use crate::stats::EndFigures;

/// Lowest protocol version this build speaks. Version 2 brought the two-phase handover
/// (`Ready`/`Commit`); a version-1 peer would resume its guest on its own, so it is refused.
pub const PROTOCOL_MIN: u16 = 2;
/// Highest protocol version this build speaks. Version 3 added post-copy
/// (`PostcopyPages`, `Resumed`, `PostcopyEnd`): a source switches to post-copy only with a
/// peer that agreed on 3.
pub const PROTOCOL_MAX: u16 = 3;

/// A data transport that a session may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP lanes.
    Tcp,
    /// RDMA lanes (RC queue pairs, one-sided WRITEs).
    Rdma,
}

impl TransportKind {
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            TransportKind::Tcp => 1,
            TransportKind::Rdma => 2,
        }
    }

    /// From a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(TransportKind::Tcp),
            2 => Some(TransportKind::Rdma),
            _ => None,
        }
    }

    /// Name as shown in statistics.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

/// Every message of the control connection (and the first frame of a data lane).
///
/// Order of a migration (S = source, D = destination):
/// `Hello` S→D, `HelloAck` D→S, `AuthProof` S→D, `AuthOk` D→S, `RegionTable` S→D, `RegionsOk`
/// D→S, `TransportOffer` S→D, `TransportAccept` D→S, lanes join (`LaneJoin` / `LaneAccepted`
/// on each lane socket), then per round `RoundStart`, data on the lanes, `RoundEnd` S→D,
/// `RoundEndAck` D→S; before the pause (when verifying) `Checksums` S→D and `Verified` D→S;
/// after the final round `DeviceState`, `Digests` S→D, `Verified` D→S;
/// then the two-phase handover: `Ready` D→S (device state loaded, guest still paused), `Commit`
/// S→D (from here on the source never resumes on its own), `Done` D→S (the destination's guest
/// runs). With post-copy, the pause carries `PostcopyPages` S→D instead of a final round and
/// no `Digests`; `Commit` is answered by `Resumed` D→S (the guest runs there with pages still
/// missing), then rounds send the rest while the destination fetches what its guest touches,
/// `PostcopyEnd` S→D and `Digests` S→D (when verifying), `Verified` D→S and `Done` D→S once
/// every page has landed. `Heartbeat`, `Cancel` and `Error` may come at any time before `Commit`. After `Done`
/// each end sends its own `Figures` (D→S right after `Done`, S→D once `Done` arrived), so
/// both reports show both ends; the guest already runs, so this cannot lengthen the pause.
///
/// Each variant's tag and field order on the wire are declared once, in the message table of
/// [`codec`](super::codec); the compiler keeps that table and this enum in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a session: the versions the source speaks.
    Hello {
        /// Lowest version.
        min_version: u16,
        /// Highest version.
        max_version: u16,
    },
    /// The version picked and the destination's challenge.
    HelloAck {
        /// The highest version both speak.
        version: u16,
        /// Destination's random challenge.
        nonce: [u8; 32],
    },
    /// The source's answer to the challenge and its own challenge.
    AuthProof {
        /// Source's random challenge.
        nonce: [u8; 32],
        /// HMAC of both challenges under the pre-shared key.
        mac: [u8; 32],
    },
    /// The destination proves the key too (mutual authentication).
    AuthOk {
        /// HMAC of both challenges under the key, other label.
        mac: [u8; 32],
    },
    /// The source's regions.
    RegionTable {
        /// In table order.
        regions: Vec<RegionDesc>,
    },
    /// The destination's regions match.
    RegionsOk,
    /// Transports the source can use, best first, and the lanes it wants.
    TransportOffer {
        /// Best first.
        kinds: Vec<TransportKind>,
        /// Lanes wanted.
        lanes: u16,
        /// What end-to-end verification the destination must do (hash what lands; with
        /// `Memory` also re-hash its memory in the pause).
        verify: crate::verify::VerifyMode,
    },
    /// The transport and lane count the destination picked.
    TransportAccept {
        /// Picked transport.
        kind: TransportKind,
        /// Lanes to open.
        lanes: u16,
        /// Why the destination did not pick the source's first choice (empty if it did).
        note: String,
    },
    /// First frame on a data lane: proves it belongs to the session.
    LaneJoin {
        /// Session identifier.
        session: [u8; 16],
        /// Lane number.
        lane: u16,
        /// HMAC over the session's challenges and the lane number.
        mac: [u8; 32],
    },
    /// The lane may carry data.
    LaneAccepted,
    /// First frame of a new control connection for a session whose connection broke during
    /// pre-copy: proves that the source holds the session.
    Rejoin {
        /// Session identifier.
        session: [u8; 16],
        /// Reconnect attempt (each number is accepted once).
        attempt: u32,
        /// HMAC over the session's challenges and the attempt.
        mac: [u8; 32],
    },
    /// The destination took the session back; the next round must be `next_round`.
    RejoinOk {
        /// The round the source starts next (the interrupted one is abandoned).
        next_round: u32,
        /// HMAC over the challenges, the attempt and `next_round`.
        mac: [u8; 32],
    },
    /// A pre-copy round begins.
    RoundStart {
        /// Round number (0 sends everything).
        round: u32,
        /// Whether this is the final (stop-and-copy) round.
        last: bool,
    },
    /// All data of the round is acknowledged by the destination.
    RoundEnd {
        /// Round number.
        round: u32,
    },
    /// The destination closed the round.
    RoundEndAck {
        /// Round number.
        round: u32,
    },
    /// A piece of the embedder's own state (device state), after the final round.
    DeviceState {
        /// Bytes.
        data: Vec<u8>,
        /// Whether this is the last piece.
        last: bool,
    },
    /// The source's chunk digests, per region, sent before the pause while the guest still
    /// runs; `verify::SKIP` for chunks compared at the end instead.
    Checksums {
        /// Per region, one digest per chunk.
        regions: Vec<Vec<u64>>,
    },
    /// The source's digests of the chunks changed since `Checksums`, sent in the pause.
    Digests {
        /// (region, chunk, digest), in order.
        chunks: Vec<(u32, u64, u64)>,
    },
    /// The destination's verdict.
    Verified {
        /// Whether every chunk matched.
        ok: bool,
        /// (region, chunk) pairs that differ (first few).
        mismatches: Vec<(u32, u64)>,
    },
    /// The destination has verified and loaded the device state; its guest is still paused
    /// and it waits for `Commit`.
    Ready,
    /// The source hands the guest over: it will not resume its own copy; the destination
    /// resumes its guest.
    Commit,
    /// The destination's guest runs.
    Done,
    /// One end's own figures of the completed migration, sent after `Done` (either way).
    Figures {
        /// What this end measured, and how its memory was prepared.
        figures: EndFigures,
    },
    /// Post-copy: a piece of the set of pages the destination does not hold yet (dirty when
    /// the source paused), sent in the pause instead of a stop-and-copy round. The
    /// destination drops those pages and fetches them when its guest touches them.
    PostcopyPages {
        /// (region, first page, pages), in order.
        runs: Vec<(u32, u64, u64)>,
        /// Whether this is the last piece.
        last: bool,
    },
    /// Post-copy: the destination's guest runs (after `Commit`), with the pages of
    /// `PostcopyPages` still to come. From here on neither end may run the guest alone.
    Resumed,
    /// Post-copy: the source has sent every page that was missing (in the background or on
    /// request); `Digests` follows when verifying, and the destination answers `Done` once
    /// every page has landed.
    PostcopyEnd,
    /// Liveness.
    Heartbeat,
    /// Either side gives up on purpose.
    Cancel {
        /// Why.
        reason: String,
    },
    /// Either side failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

impl Message {
    /// A short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloAck { .. } => "HelloAck",
            Message::AuthProof { .. } => "AuthProof",
            Message::AuthOk { .. } => "AuthOk",
            Message::RegionTable { .. } => "RegionTable",
            Message::RegionsOk => "RegionsOk",
            Message::TransportOffer { .. } => "TransportOffer",
            Message::TransportAccept { .. } => "TransportAccept",
            Message::LaneJoin { .. } => "LaneJoin",
            Message::LaneAccepted => "LaneAccepted",
            Message::Rejoin { .. } => "Rejoin",
            Message::RejoinOk { .. } => "RejoinOk",
            Message::RoundStart { .. } => "RoundStart",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundEndAck { .. } => "RoundEndAck",
            Message::DeviceState { .. } => "DeviceState",
            Message::Checksums { .. } => "Checksums",
            Message::Digests { .. } => "Digests",
            Message::Verified { .. } => "Verified",
            Message::Ready => "Ready",
            Message::Commit => "Commit",
            Message::Done => "Done",
            Message::Figures { .. } => "Figures",
            Message::PostcopyPages { .. } => "PostcopyPages",
            Message::Resumed => "Resumed",
            Message::PostcopyEnd => "PostcopyEnd",
            Message::Heartbeat => "Heartbeat",
            Message::Cancel { .. } => "Cancel",
            Message::Error { .. } => "Error",
        }
    }
}
