//! RDMA lanes: the source writes guest pages straight into the destination's registered memory
//! with one-sided RDMA WRITEs, so the destination's CPU is not on the data path.
//!
//! Each lane is one reliable-connected (RC) queue pair plus the authenticated TCP socket the
//! lane joined the session with. The socket carries what is small and rare: the queue pair's
//! address at setup and the destination's replies (batch acknowledgements, keys of chunks it
//! registered on request). The queue pair carries the data:
//!
//! ```text
//!   source                                     destination
//!   WRITE run 1 ──────────────────────────────▶ guest memory (no CPU)
//!   WRITE run 2 ──────────────────────────────▶ guest memory
//!   SEND  batch descriptor (runs, zero runs) ──▶ receive buffer: hash the runs, zero the zero
//!                                               runs, repost the buffer
//!                       ◀──────── ack (TCP) ──── batch n has landed
//! ```
//!
//! An RC queue pair executes its work requests in order, so when the descriptor's receive
//! completes on the destination, every WRITE posted before it has been placed in memory. That
//! is the per-batch fence; the engine's round fence (`RoundEnd` on the control connection)
//! follows once every batch of the round is acknowledged.
//!
//! Post-copy uses the same devices the other way round: the source exposes its memory for
//! remote read (`exposure.rs`) and the destination fetches the pages it lacks with one-sided
//! RDMA READs (`reader.rs`), so no thread of the source is on the path of a fault.
//!
//! The verbs come from [`sideway`], which loads `libibverbs` at run time: one binary runs with
//! or without rdma-core installed, and a missing library or a kernel without RDMA (where
//! `ibv_get_device_list` fails with `ENOSYS`) is simply "no device".

mod connector;
mod device;
mod error;
mod memory;
mod queue;
pub mod wire;

mod dest;
mod exposure;
pub mod read_wire;
mod reader;
mod source;

pub use connector::{accept_dest_lane, connect_source_lane, Setup};
pub use dest::{DestPrepared, RdmaDestLane};
pub use device::RdmaDevice;
pub use error::RdmaError;
pub use exposure::{serve_reader, ExposedMemory, ReadExposure};
pub use memory::{LocalMemory, Registration, RemoteMemory, RemoteRegion};
pub use queue::QpEndpoint;
pub use read_wire::{ExposedRegion, ReadSetup};
pub use reader::{RdmaPageReader, ReadError, ReaderConfig};
pub use source::{RdmaSourceLane, SourcePrepared};

/// How long the end of a lane may take under a slow device (soft-RoCE under emulation): the
/// source waits this long for its close message's completion before it shuts the socket, and
/// a destination told [`wire::CLOSING`] waits this long for that message.
pub(crate) const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// How long a destination whose lane socket ended without [`wire::CLOSING`] (the source is
/// gone) still polls for a receive already on its way.
pub(crate) const EOF_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// A lane's setup channel: its bare socket, or the lane's TLS session over it.
pub(crate) trait SetupChannel: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> SetupChannel for T {}

/// Runs `f` on the channel a lane's setup exchange takes: the lane's TLS session `tls` over
/// `sock` when the session is encrypted (queue pair addresses and memory keys then cross only
/// inside TLS), `sock` itself otherwise. Either way the socket's read timeout bounds every read.
pub(crate) fn on_setup_channel<C, S, T>(
    sock: &std::net::TcpStream,
    tls: Option<&mut C>,
    f: impl FnOnce(&mut dyn SetupChannel) -> T,
) -> T
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    match tls {
        None => f(&mut &*sock),
        Some(conn) => f(&mut rustls::Stream::new(conn, &mut &*sock)),
    }
}
