//! rmig's migration engine: moves a running guest's memory to another host.
//!
//! The engine owns the policy of a pre-copy live migration: which pages to send in each round
//! (dirty tracking), when to stop iterating (convergence), the final stop-and-copy, and the
//! end-to-end check that the destination holds exactly the source's bytes. It never touches a
//! socket or a verbs object itself: the data moves on [`rmig_transport`] lanes, and the
//! control plane ([`control`]) is a small tokio connection next to them.
//!
//! Embedders drive a source [`SourceSession`] one step at a time, the way QEMU calls its
//! `save_live_*` handlers (`setup`, then `iterate` until it reports readiness, then
//! `complete`), or hand everything to the [`driver`], which runs the whole loop on its own
//! thread. A destination runs passively from a [`DestListener`].

pub mod bitmap;
mod cancel;
pub mod config;
pub mod control;
pub mod converge;
mod dest;
pub mod dirty;
pub mod driver;
pub mod embedder;
mod error;
mod metrics;
pub mod monitor;
pub mod protocol;
pub mod region;
mod source;
pub mod stats;
pub mod verify;

pub use cancel::CancelToken;
#[cfg(feature = "fault-injection")]
pub use config::DestFault;
pub use config::{
    DestConfig, Encryption, NumaMode, RdmaConfig, SourceConfig, TransportChoice, X509Creds,
};
pub use control::auth::Key;
pub use converge::{ConvergePolicy, NoConvergence, Postcopy};
pub use dest::{DestListener, DestOutcome};
pub use dirty::{CallbackDirtyLog, DirtySource, SharedDirtyLog};
pub use embedder::{DestEmbedder, NullDest, SourceEmbedder, StaticSource};
pub use error::EngineError;
pub use monitor::{Monitor, Progress};
pub use region::{Region, RegionDesc, PAGE_2M, PAGE_4K};
pub use rmig_transport::rdma::Registration;
pub use source::{SourceSession, Step};
pub use stats::{
    EndFigures, LaneObserved, MemoryFacts, MigrationStats, MigrationStatus, NumaReport, RamStats,
    RdmaReport, RoundStats,
};
pub use verify::VerifyMode;

/// A fault plan that kills a lane once `bytes` of payload went out on it (tests).
#[cfg(feature = "fault-injection")]
pub fn fail_after(bytes: u64) -> rmig_transport::FaultPlan {
    rmig_transport::FaultPlan {
        fail_after_bytes: Some(bytes),
        ..Default::default()
    }
}

/// A fault plan that, on RDMA, writes with a wrong remote key once `bytes` of payload went
/// out on the lane (tests).
#[cfg(feature = "fault-injection")]
pub fn bad_rkey_after(bytes: u64) -> rmig_transport::FaultPlan {
    rmig_transport::FaultPlan {
        bad_rkey_after_bytes: Some(bytes),
        ..Default::default()
    }
}
