//! The control plane: one async connection per migration, on tokio.
//!
//! Control traffic is small and latency-bound (handshake, fences, heartbeats), while the data
//! plane is bulk and CPU-bound; so the control connection lives on a small tokio runtime of its
//! own and talks to the engine's threads through channels. Heartbeats flow both ways on their
//! own timer, so a peer that goes silent is noticed within seconds even while the engine is
//! busy in a long round.

pub mod auth;
pub mod handshake;
pub mod link;
pub mod nosigpipe;
pub mod tls;

/// A runtime for one session's control connection.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, crate::EngineError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("rmig-control")
        .enable_all()
        .build()
        .map_err(crate::EngineError::from)
}
