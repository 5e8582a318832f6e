//! Ctrl-C and SIGTERM: cancel the migration the way QEMU's `migrate_cancel` does.
//!
//! The signal does not kill the process: it cancels the engine's monitors, so the session
//! tells its peer (`Cancel`), resumes the source guest if it was paused, and the bench prints
//! its report with status `cancelled` and exits 130. Before a migration has started there is
//! nothing to tell anyone, so the process exits 130 at once; a second signal does the same
//! for a user who does not want to wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rmig_engine::Monitor;

/// The exit code of a run cancelled by a signal (128 + SIGINT, as shells report it).
pub const EXIT_CANCELLED: i32 = 130;

/// Why the migration was cancelled, as the peer and the report see it.
const REASON: &str = "interrupted on this host (SIGINT or SIGTERM)";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static WATCHED: Mutex<Vec<Arc<Monitor>>> = Mutex::new(Vec::new());

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn install() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_CANCELLED);
        }
        let w = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_empty() {
            eprintln!("rmig-bench: interrupted before the migration started");
            std::process::exit(EXIT_CANCELLED);
        }
        for m in w.iter() {
            m.cancel(REASON);
        }
    })
    .context("installing the SIGINT/SIGTERM handler")
}

/// From now on a signal cancels `m` (at once if one came already).
pub fn cancel_on_signal(m: &Arc<Monitor>) {
    WATCHED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(m.clone());
    if INTERRUPTED.load(Ordering::SeqCst) {
        m.cancel(REASON);
    }
}

/// Whether a signal has come.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
