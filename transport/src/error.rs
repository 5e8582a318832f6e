//! Errors of one data lane.

use std::io;

/// Why a lane stopped. A failed lane never takes the migration down by itself: the engine
/// re-marks the pages it could not confirm and carries on over the remaining lanes.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The socket or device reported an I/O error.
    #[error("lane I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the lane.
    #[error("peer closed the lane")]
    Closed,
    /// The peer sent a frame that does not fit the protocol or the region table.
    #[error("malformed lane frame: {0}")]
    Malformed(String),
    /// The destination refused a run (no round open, or its pages are being written by
    /// another lane): nothing of it landed, and the lane ends.
    #[error("run refused: {0}")]
    Refused(String),
    /// No acknowledgement arrived in time.
    #[error("no acknowledgement within {0:?}")]
    AckTimeout(std::time::Duration),
    /// The RDMA device reported a failed work request or verbs call.
    #[error("RDMA: {0}")]
    Rdma(String),
    /// The session stopped the lane on purpose (another failure, a cancel): not a fault of
    /// this lane.
    #[error("stopped by the session")]
    Aborted,
    /// A fault injected on purpose (tests; the `fault-injection` feature) ended the lane.
    #[cfg(feature = "fault-injection")]
    #[error("injected fault: {0}")]
    Injected(&'static str),
}
