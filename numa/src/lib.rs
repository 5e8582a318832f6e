//! The worker pool that runs rmig's data-plane threads.
//!
//! Lanes and scanners are plain OS threads (no async on the data path). The pool is the one
//! place that decides where such a thread runs, so that a NUMA-aware placement can replace
//! this flat one without the engine changing: the engine asks for a worker by role and index
//! and gets a named thread.

use std::io;
use std::thread::JoinHandle;

/// What a worker is for; placement may differ by role (lanes near the NIC, scanners near
/// memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends a lane's batches (source).
    SourceLane,
    /// Receives a lane's batches (destination).
    DestLane,
    /// Background work such as hashing.
    Helper,
}

impl Role {
    fn tag(self) -> &'static str {
        match self {
            Role::SourceLane => "src-lane",
            Role::DestLane => "dst-lane",
            Role::Helper => "helper",
        }
    }
}

/// A flat pool: every worker may run on any CPU.
#[derive(Debug, Clone, Default)]
pub struct WorkerPool {}

impl WorkerPool {
    /// A pool over every CPU of the machine.
    pub fn flat() -> Self {
        WorkerPool {}
    }

    /// How many CPUs the pool may use.
    pub fn cpus(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Starts worker `index` of `role` running `f`.
    pub fn spawn<F, T>(&self, role: Role, index: usize, f: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        std::thread::Builder::new()
            .name(format!("rmig-{}-{index}", role.tag()))
            .spawn(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_run_and_are_named() {
        let p = WorkerPool::flat();
        assert!(p.cpus() >= 1);
        let h = p
            .spawn(Role::SourceLane, 3, || {
                std::thread::current().name().map(str::to_owned)
            })
            .unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("rmig-src-lane-3"));
    }
}
