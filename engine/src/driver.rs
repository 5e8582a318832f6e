//! Runs a whole source migration on a thread of its own, for embedders that do not want to
//! drive the steps themselves (the bench, `rmig_migrate` in the C ABI).

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::dirty::DirtySource;
use crate::embedder::SourceEmbedder;
use crate::monitor::Monitor;
use crate::region::Region;
use crate::source::{SourceSession, Step};
use crate::stats::MigrationStats;
use crate::{EngineError, SourceConfig};

/// Runs setup, every round and the completion on the calling thread.
pub fn migrate(
    cfg: SourceConfig,
    regions: Vec<Region>,
    dirty: Box<dyn DirtySource>,
    embedder: Box<dyn SourceEmbedder>,
    monitor: Arc<Monitor>,
) -> Result<MigrationStats, EngineError> {
    let mut s = SourceSession::setup(cfg, regions, dirty, embedder, monitor)?;
    while s.iterate()? == Step::Continue {}
    s.complete()
}

/// A migration running on its own thread.
pub struct MigrationHandle {
    monitor: Arc<Monitor>,
    join: JoinHandle<Result<MigrationStats, EngineError>>,
}

impl MigrationHandle {
    /// The monitor: statistics, progress, bandwidth ceiling, cancel.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// Whether the migration has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Waits for the end.
    pub fn wait(self) -> Result<MigrationStats, EngineError> {
        self.join
            .join()
            .unwrap_or_else(|_| Err(EngineError::State("migration thread panicked".into())))
    }
}

/// Starts [`migrate`] on a new thread.
pub fn spawn(
    cfg: SourceConfig,
    regions: Vec<Region>,
    dirty: Box<dyn DirtySource>,
    embedder: Box<dyn SourceEmbedder>,
    monitor: Arc<Monitor>,
) -> Result<MigrationHandle, EngineError> {
    let m = monitor.clone();
    let join = std::thread::Builder::new()
        .name("rmig-migrate".into())
        .spawn(move || migrate(cfg, regions, dirty, embedder, m))?;
    Ok(MigrationHandle { monitor, join })
}
