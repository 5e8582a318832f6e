//! Status codes and the per-thread last error message.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use rmig_engine::EngineError;

/// What an `rmig_` function returns: `RMIG_OK` or a negative error.
///
/// Only ever returned by the library, never read from C memory, so it stays a C enum; a later
/// version may add codes: treat any other negative value as an error.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigStatus {
    /// Success.
    RmigOk = 0,
    /// A pointer was null or misaligned, a length zero, or a value out of range.
    RmigErrInvalidArgument = -1,
    /// The session handle is unknown (never created, or already freed).
    RmigErrInvalidHandle = -2,
    /// The call does not fit the session's state (wrong order, or the session is busy).
    RmigErrState = -3,
    /// The configuration or the regions are unusable (overlap, duplicate ids...).
    RmigErrConfig = -4,
    /// Authentication failed.
    RmigErrAuth = -5,
    /// The peer broke the protocol, or the ends do not match (version, regions).
    RmigErrProtocol = -6,
    /// Network failure, or the peer vanished.
    RmigErrIo = -7,
    /// Cancelled (by either side).
    RmigErrCancelled = -8,
    /// The migration did not converge under the policy.
    RmigErrNotConverged = -9,
    /// End-to-end verification failed.
    RmigErrVerify = -10,
    /// A callback reported failure.
    RmigErrEmbedder = -11,
    /// An internal error (a bug) was caught at the boundary.
    RmigErrInternal = -12,
    /// The caller's buffer is too small; the needed size was reported.
    RmigErrBufferTooSmall = -13,
    /// The link failed during the handover: this end's guest stays paused until
    /// `rmig_resolve_handover` decides which end runs it.
    RmigErrHandoverUnknown = -14,
    /// Post-copy broke after the destination resumed the guest: its memory is split between
    /// the hosts and one is gone, so neither end may run it (the destination's threads that
    /// touch a missing page stay blocked).
    RmigErrGuestLost = -15,
}

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = c);
}

/// Records an error and returns its status.
pub(crate) fn fail(s: RmigStatus, msg: &str) -> RmigStatus {
    set_error(msg);
    s
}

/// The status of an engine error (and records its message).
pub(crate) fn from_engine(e: &EngineError) -> RmigStatus {
    set_error(&e.to_string());
    match e {
        EngineError::Config(_) => RmigStatus::RmigErrConfig,
        EngineError::Auth(_) => RmigStatus::RmigErrAuth,
        EngineError::RegionMismatch(_) | EngineError::Version { .. } | EngineError::Protocol(_) => {
            RmigStatus::RmigErrProtocol
        }
        EngineError::Io(_)
        | EngineError::NoReconnect { .. }
        | EngineError::SourceGone { .. }
        | EngineError::NoSource { .. }
        | EngineError::PeerSilent(_)
        | EngineError::PeerClosed
        | EngineError::PeerError(_)
        | EngineError::AllLanesFailed(_)
        | EngineError::Lane { .. }
        | EngineError::Rdma(_) => RmigStatus::RmigErrIo,
        EngineError::Tls(_) => RmigStatus::RmigErrAuth,
        EngineError::Cancelled(_) | EngineError::PeerCancelled(_) => RmigStatus::RmigErrCancelled,
        EngineError::NotConverged(_) => RmigStatus::RmigErrNotConverged,
        EngineError::VerifyFailed(_) => RmigStatus::RmigErrVerify,
        EngineError::Embedder(_) => RmigStatus::RmigErrEmbedder,
        EngineError::State(_) => RmigStatus::RmigErrState,
        EngineError::HandoverUnknown(_) => RmigStatus::RmigErrHandoverUnknown,
        EngineError::GuestLost(_) => RmigStatus::RmigErrGuestLost,
    }
}

/// The message of the last failed call on the calling thread ("" if none). The pointer stays
/// valid until the next `rmig_` call on this thread; do not free it. *Any thread*: each thread
/// has its own last error.
#[no_mangle]
pub extern "C" fn rmig_last_error() -> *const c_char {
    LAST.with(|l| l.borrow().as_ptr())
}
