//! librmig: the C ABI of rmig's engine.
//!
//! VMMs are written in C; they link a library, hand it their RAM blocks and a dirty-log
//! callback, and drive the migration from their own migration thread. This crate is that
//! library: plain `#[repr(C)]` types, functions prefixed `rmig_`, sessions named by checked
//! handles rather than pointers, every error a status code plus a message, and no Rust panic
//! crossing the boundary. `include/rmig.h` is generated from this crate by cbindgen.
//!
//! Threading contract: a session is driven by one thread at a time. The *driving* calls
//! (`rmig_dest_port`, `rmig_add_region`, `rmig_setup`, `rmig_iterate`, `rmig_complete`,
//! `rmig_migrate`, `rmig_resolve_handover`) must not overlap on one session; they may come from different threads one
//! after another, and one that overlaps another fails with `RMIG_ERR_STATE` without doing
//! anything. The *any thread* calls (`rmig_cancel`, `rmig_set_max_bandwidth`,
//! `rmig_set_downtime_limit`, `rmig_start_postcopy`,
//! `rmig_get_stats`, `rmig_stats_json`, `rmig_free`) may be made from any thread at any time,
//! also while a driving call runs on the same session. `rmig_free` makes the handle invalid at
//! once, cancels the migration and returns only after every call in flight on the session has
//! returned. Callbacks run on the thread inside the driving call.
//!
//! Enumerations that C fills in cross the ABI as `uint32_t` fields holding one of the named
//! constants (`rmig_config.transport`: `RMIG_TRANSPORT_*`; the `decision` of
//! `rmig_resolve_handover`: `RMIG_HANDOVER_*`) and are checked; `rmig_status` and
//! `rmig_state` stay C enums because only the library writes them.

mod api;
mod embedder;
mod handles;
mod status;
mod types;

pub use api::*;
pub use status::{rmig_last_error, RmigStatus};
pub use types::*;
