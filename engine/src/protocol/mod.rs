//! The control protocol as plain types and one codec.
//!
//! Every message is a variant of [`Message`]; [`codec`] turns it into a length-prefixed frame
//! and back, and its single decode function refuses anything malformed, oversized or
//! unknown, so that a hostile peer meets one well-tested gate.

pub mod codec;
mod field;
mod messages;

pub use messages::{Message, TransportKind, PROTOCOL_MAX, PROTOCOL_MIN};
