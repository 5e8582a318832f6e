//! The engine's errors: every way a migration can end other than success.

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
    Io(String),
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
    #[error("lane {lane} failed: {reason}")]
    Lane {
        /// Lane number.
        lane: usize,
        /// What went wrong.
        reason: String,
    },
    /// RDMA could not be set up (no device, registration, queue pairs).
    #[error("RDMA: {0}")]
    Rdma(String),
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
}

impl EngineError {
    /// A lane failure as an engine error.
    pub fn lane(lane: usize, e: &LaneError) -> Self {
        EngineError::Lane {
            lane,
            reason: e.to_string(),
        }
    }

    /// Whether the error was a cancellation (by either side).
    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            EngineError::Cancelled(_) | EngineError::PeerCancelled(_)
        )
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::Io(e.to_string())
    }
}

impl From<rmig_transport::rdma::RdmaError> for EngineError {
    fn from(e: rmig_transport::rdma::RdmaError) -> Self {
        EngineError::Rdma(e.to_string())
    }
}
