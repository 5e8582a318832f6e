//! librmig: the C ABI of rmig's engine.
//!
//! VMMs are written in C; they link a library, hand it their RAM blocks and a dirty-log
//! callback, and drive the migration from their own migration thread. This crate is that
//! library: plain `#[repr(C)]` types, functions prefixed `rmig_`, sessions named by checked
//! handles rather than pointers, every error a status code plus a message, and no Rust panic
//! crossing the boundary. `include/rmig.h` is generated from this crate by cbindgen.
//!
//! Enumerations that C fills in cross the ABI as `uint32_t` fields holding one of the named
//! constants (`rmig_config.transport`: `RMIG_TRANSPORT_*`) and are checked; `rmig_status` and
//! `rmig_state` stay C enums because only the library writes them.

mod api;
mod embedder;
mod handles;
mod status;
mod types;

pub use api::*;
pub use status::{rmig_last_error, RmigStatus};
pub use types::*;
