//! Workers as named OS threads, pinned to the CPUs a plan gives them.

use std::io;
use std::thread::JoinHandle;

/// What a worker is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Scans, hashes and sends a lane's pages (source).
    SourceLane,
    /// Receives a lane's pages (destination).
    DestLane,
    /// Background work.
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

/// Starts workers, pinned when asked.
#[derive(Debug, Clone, Default)]
pub struct WorkerPool {}

/// Pins the calling thread to `cpus`.
fn pin(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, the capacity of `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as usize)
}

impl WorkerPool {
    /// A pool over every CPU.
    pub fn flat() -> Self {
        WorkerPool {}
    }

    /// How many CPUs the machine offers.
    pub fn cpus(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Starts worker `index` of `role` running `f`, anywhere.
    pub fn spawn<F, T>(&self, role: Role, index: usize, f: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.spawn_on(role, index, &[], f)
    }

    /// Starts worker `index` of `role` running `f`, pinned to `cpus` (anywhere when empty). A
    /// pin that the kernel refuses (a CPU outside this process's cpuset) leaves the worker
    /// unpinned rather than failing the migration.
    pub fn spawn_on<F, T>(
        &self,
        role: Role,
        index: usize,
        cpus: &[usize],
        f: F,
    ) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let cpus = cpus.to_vec();
        std::thread::Builder::new()
            .name(format!("rmig-{}-{index}", role.tag()))
            .spawn(move || {
                if !cpus.is_empty() {
                    let _ = pin(&cpus);
                }
                f()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_run_named_and_pinned() {
        let p = WorkerPool::flat();
        assert!(p.cpus() >= 1);
        let h = p
            .spawn_on(Role::SourceLane, 3, &[0], || {
                (
                    std::thread::current().name().map(str::to_owned),
                    current_cpu(),
                )
            })
            .unwrap();
        let (name, cpu) = h.join().unwrap();
        assert_eq!(name.as_deref(), Some("rmig-src-lane-3"));
        assert_eq!(cpu, Some(0));
    }
}
