//! TCP lanes: the fallback transport, and the only one where the destination's CPU moves the
//! bytes.
//!
//! Each lane is one TCP connection. The source writes runs with vectored writes straight from
//! guest memory (a 24-byte header per run, no staging copy); the destination reads each run's
//! payload straight into guest memory and acknowledges every batch once it has landed and its
//! pages were handed to the [`PageSink`](crate::PageSink). Zero runs carry no payload.
//!
//! An encrypted lane carries the same stream inside one TLS 1.3 session (rustls): the source
//! gathers headers and pages into a buffer in cache and seals it into records, the destination
//! opens records into its staging buffer and streams them into guest memory. A record that
//! fails authentication ends the lane like any broken connection.

mod dest;
pub mod fetch;
mod seal;
mod sendmsg;
mod source;
pub mod wire;

pub use crate::DestLaneSummary;
pub use dest::TcpDestLane;
pub use source::TcpSourceLane;
