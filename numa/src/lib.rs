//! Where rmig's data-plane threads run, and which memory each one serves.
//!
//! On a migration host the guest's RAM is spread over NUMA nodes and the NIC hangs off one of
//! them; copying, hashing or posting pages from a remote node costs bandwidth. This crate reads
//! the machine's topology through hwloc ([`topology`]), finds where a region's pages really are
//! ([`placement`]), turns both into a plain, printable [`Plan`] (which lane runs on which node
//! and serves which spans of memory), and runs workers pinned to the plan's CPUs ([`pool`]).
//! Where hwloc or NUMA is missing it falls back to one flat node and says so once.

pub mod placement;
pub mod plan;
pub mod pool;
pub mod topology;

pub use placement::{region_spans, MemSpan};
pub use plan::{LanePlacement, Plan, SpanAssignment};
pub use pool::{current_cpu, Role, WorkerPool};
pub use topology::{netdev_of, Nic, Node, Topology, TopologySource};

/// Errors of topology discovery.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// hwloc could not load the topology.
    #[error("hwloc: {0}")]
    Hwloc(String),
    /// A topology file could not be read.
    #[error("reading {path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        err: std::io::Error,
    },
}
