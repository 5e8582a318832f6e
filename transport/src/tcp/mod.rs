//! TCP lanes: the fallback transport, and the only one where the destination's CPU moves the
//! bytes.
//!
//! Each lane is one TCP connection. The source writes runs with vectored writes straight from
//! guest memory (a 24-byte header per run, no staging copy); the destination reads each run's
//! payload straight into guest memory and acknowledges every batch once it has landed and its
//! pages were handed to the [`PageSink`](crate::PageSink). Zero runs carry no payload.

mod dest;
mod source;
pub mod wire;

pub use crate::DestLaneSummary;
pub use dest::TcpDestLane;
pub use source::TcpSourceLane;
