//! The engine's errors: every way a migration can end other than success.
//!
//! Errors that come from the operating system, a lane or the RDMA device keep their typed
//! source (behind an `Arc`, since an error is recorded in the statistics and returned too), so
//! a caller can still ask for the `io::ErrorKind` ([`EngineError::io_kind`]) and walk the cause
//! chain; `source()` yields the `Arc<io::Error>`, `Arc<LaneError>`, `Arc<RdmaError>` or, for
//! the reconnect failures, the `Box<EngineError>` of the cause.

use std::io;
use std::sync::Arc;

use rmig_transport::rdma::RdmaError;
use rmig_transport::LaneError;

/// Why a migration (or one of its steps) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The embedder's configuration or regions are unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The peer's regions do not match ours.
    #[error("region table mismatch: {0}")]
    RegionMismatch(String),
    /// No protocol version is supported by both ends.
    #[error("no common protocol version: we support {ours_min}..={ours_max}, peer {peer_min}..={peer_max}")]
    Version {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// The peer's lowest version.
        peer_min: u16,
        /// The peer's highest version.
        peer_max: u16,
    },
    /// The peer could not prove that it holds the pre-shared key (or we could not).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer broke the protocol (malformed, oversized or out-of-order messages).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Network failure on the control connection.
    #[error("control connection failed: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The control connection broke during pre-copy and the source could not reconnect
    /// within the reconnect window.
    #[error("{cause}; no reconnect within {window_ms} ms (last attempt: {last})")]
    NoReconnect {
        /// What broke the connection.
        #[source]
        cause: Box<EngineError>,
        /// The reconnect window.
        window_ms: u64,
        /// Why the last attempt failed.
        last: Box<EngineError>,
    },
    /// The control connection broke during pre-copy and the source did not come back within
    /// the destination's reconnect window.
    #[error("{cause}; the source did not reconnect within {window_ms} ms")]
    SourceGone {
        /// What broke the connection.
        #[source]
        cause: Box<EngineError>,
        /// The reconnect window.
        window_ms: u64,
    },
    /// The peer stopped answering (no heartbeat in time).
    #[error("peer silent for {0} ms")]
    PeerSilent(u64),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The peer reported an error and gave up.
    #[error("peer reported an error: {0}")]
    PeerError(String),
    /// Every data lane failed.
    #[error("all data lanes failed; last error: {0}")]
    AllLanesFailed(String),
    /// A data lane failed (alone this is not fatal).
    #[error("lane {lane} failed: {source}")]
    Lane {
        /// Lane number.
        lane: usize,
        /// What went wrong.
        #[source]
        source: Arc<LaneError>,
    },
    /// RDMA could not be set up (no device, registration, queue pairs).
    #[error("RDMA: {0}")]
    Rdma(#[source] Arc<RdmaError>),
    /// The migration did not converge under the configured policy.
    #[error("did not converge: {0}")]
    NotConverged(String),
    /// The end-to-end checksums differ.
    #[error("verification failed: {0}")]
    VerifyFailed(String),
    /// The embedder refused a step (pause, device state, resume).
    #[error("embedder error: {0}")]
    Embedder(String),
    /// Cancelled by this side.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Cancelled by the peer.
    #[error("cancelled by peer: {0}")]
    PeerCancelled(String),
    /// The link failed during the handover, so this end cannot know whether the other end
    /// runs the guest: its own copy stays paused until an operator decides.
    #[error("handover unknown: {0}; this end's guest stays paused until an operator decides which end runs it")]
    HandoverUnknown(String),
    /// No source completed the handshake before the destination's incoming timeout.
    #[error("no source completed the handshake within {waited_ms} ms ({refused} connections refused{})", last.as_ref().map(|l| format!("; last: {l}")).unwrap_or_default())]
    NoSource {
        /// How long the destination waited.
        waited_ms: u64,
        /// Connections dropped because they failed the handshake.
        refused: u64,
        /// Why the last one was dropped.
        last: Option<Box<EngineError>>,
    },
    /// A step was called in a state that does not allow it.
    #[error("invalid state: {0}")]
    State(String),
    /// TLS could not be set up (credentials) or a TLS handshake failed.
    #[error("{0}")]
    Tls(#[source] Arc<crate::control::tls::TlsError>),
    /// Post-copy broke after the destination resumed the guest: its memory is split between
    /// the hosts and one of them is gone, so the guest cannot continue anywhere. The
    /// destination keeps its faulting threads blocked (never given a page that is not the
    /// source's) and the source keeps its copy paused; neither may run the guest.
    #[error("the guest is lost: {0}")]
    GuestLost(String),
}

impl EngineError {
    /// A lane failure as an engine error.
    pub fn lane(lane: usize, e: LaneError) -> Self {
        EngineError::Lane {
            lane,
            source: Arc::new(e),
        }
    }

    /// The kind of the operating system's error behind a control connection failure.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            EngineError::Io(e) => Some(e.kind()),
            _ => None,
        }
    }

    /// A control connection failure of kind `kind` that `what` describes.
    pub fn io(kind: io::ErrorKind, what: impl Into<String>) -> Self {
        EngineError::Io(Arc::new(io::Error::new(kind, what.into())))
    }

    /// Whether the error was a cancellation (by either side).
    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            EngineError::Cancelled(_) | EngineError::PeerCancelled(_)
        )
    }
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Io(Arc::new(e))
    }
}

impl From<crate::control::tls::TlsError> for EngineError {
    fn from(e: crate::control::tls::TlsError) -> Self {
        EngineError::Tls(Arc::new(e))
    }
}

impl From<rmig_transport::rdma::RdmaError> for EngineError {
    fn from(e: rmig_transport::rdma::RdmaError) -> Self {
        EngineError::Rdma(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn causes_keep_their_type() {
        let e = EngineError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::ConnectionReset));
        let io = e.source().and_then(|s| s.downcast_ref::<Arc<io::Error>>());
        assert_eq!(io.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));

        let e = EngineError::lane(
            3,
            LaneError::AckTimeout(std::time::Duration::from_millis(7)),
        );
        let lane = e.source().and_then(|s| s.downcast_ref::<Arc<LaneError>>());
        let lane = lane.map(|l| l.as_ref());
        assert!(
            matches!(lane, Some(LaneError::AckTimeout(d)) if d.as_millis() == 7),
            "{e}"
        );
        assert!(e.to_string().starts_with("lane 3 failed: "), "{e}");

        let cause = EngineError::PeerSilent(5000);
        let last = EngineError::io(io::ErrorKind::TimedOut, "connecting timed out");
        let e = EngineError::NoReconnect {
            cause: Box::new(cause),
            window_ms: 2000,
            last: Box::new(last),
        };
        let inner = e
            .source()
            .and_then(|s| s.downcast_ref::<Box<EngineError>>());
        let inner = inner.map(|b| b.as_ref());
        assert!(matches!(inner, Some(EngineError::PeerSilent(5000))));
        assert_eq!(
            e.to_string(),
            "peer silent for 5000 ms; no reconnect within 2000 ms \
             (last attempt: control connection failed: connecting timed out)"
        );
    }
}
