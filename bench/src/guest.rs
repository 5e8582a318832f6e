//! The destination's guest: it keeps the device state it is handed and, once resumed, runs
//! the writers the source's guest ran (the workload travels in the device state).
//!
//! After a post-copy switch the destination's guest runs before all of its memory is there,
//! so its writers are what makes pages fault as in a real guest. They also change memory the
//! source no longer sees: every page they write is logged, so that `loopback` compares the
//! two memories on every page the destination's guest left alone and says how many it left
//! out, instead of claiming equality for pages it could not compare.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use rmig_engine::{DestEmbedder, SharedDirtyLog};

use crate::mem::Mapping;
use crate::workload::{Workload, WorkloadSpec};

/// The destination guest's memory, as an address (the embedder must be `Send`).
#[derive(Clone, Copy)]
struct GuestMem {
    addr: usize,
    pages: u64,
    page: u64,
}

/// The destination guest's writers, from its resumption on.
struct Running {
    workload: Workload,
    log: SharedDirtyLog,
    since: Instant,
}

/// The bench's handle on the destination's guest, shared with its embedder.
#[derive(Clone)]
pub struct DestGuest {
    state: Arc<Mutex<Option<Vec<u8>>>>,
    running: Arc<Mutex<Option<Running>>>,
    mem: GuestMem,
}

/// What the destination's guest wrote from its resumption until it was stopped.
pub struct Written {
    log: SharedDirtyLog,
    /// Pages written (each counted once).
    pub pages: u64,
    /// Seconds the writers ran.
    pub seconds: f64,
}

impl Written {
    /// Whether the guest wrote page `p` since it resumed.
    pub fn contains(&self, p: u64) -> bool {
        self.log.bitmap(0).test(p)
    }
}

impl DestGuest {
    /// A guest over `mem`, in pages of `page` bytes, not yet resumed.
    pub fn new(mem: &Mapping, page: u64) -> DestGuest {
        DestGuest {
            state: Arc::default(),
            running: Arc::default(),
            mem: GuestMem {
                addr: mem.ptr() as usize,
                pages: mem.len() as u64 / page,
                page,
            },
        }
    }

    /// The engine's embedder for this guest.
    pub fn embedder(&self) -> BenchDest {
        BenchDest(self.clone())
    }

    /// The device state received, if any.
    pub fn device_state(&self) -> Option<Vec<u8>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the guest's writers and waits for them; `None` when none ran.
    pub fn stop(&self) -> Option<Written> {
        let r = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let seconds = r.since.elapsed().as_secs_f64();
        let mut workload = r.workload;
        workload.stop();
        Some(Written {
            pages: r.log.bitmap(0).count(),
            log: r.log,
            seconds,
        })
    }

    /// After a lost post-copy: stops the writers without waiting for those blocked on pages
    /// that will never come. The caller must keep the guest's memory mapped for the rest of
    /// the process.
    pub fn abandon(&self) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            r.workload.abandon();
        }
    }
}

/// [`DestGuest`] as the engine's destination embedder.
pub struct BenchDest(DestGuest);

impl DestEmbedder for BenchDest {
    fn load_device_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        *self.0.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
        Ok(())
    }

    /// Starts the guest's writers when its device state names some (a state the bench did
    /// not make, or a guest without writers, resumes to nothing).
    fn resume(&mut self) -> Result<(), String> {
        let state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(spec) = state.as_deref().and_then(WorkloadSpec::of_device_state) else {
            return Ok(());
        };
        drop(state);
        if spec.dirty_rate <= 0.0 || spec.writers == 0 {
            return Ok(());
        }
        let m = self.0.mem;
        let log = SharedDirtyLog::new(&[m.pages]);
        // The guest goes on writing, not repeating what it wrote on the source.
        let spec = WorkloadSpec {
            seed: spec.seed.wrapping_add(0x5eed_0f0d_e500),
            ..spec
        };
        let workload = Workload::start(m.addr as *mut u8, m.pages, m.page, spec, log.clone());
        *self.0.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
            workload,
            log,
            since: Instant::now(),
        });
        Ok(())
    }
}

/// Compares `src` and `dst` page by page, leaving out the pages the destination's guest
/// wrote since it resumed; returns whether the rest is equal and how many were left out.
pub fn compare(src: &[u8], dst: &[u8], page: usize, written: Option<&Written>) -> (bool, u64) {
    let Some(w) = written else {
        return (src == dst, 0);
    };
    if src.len() != dst.len() {
        return (false, 0);
    }
    let mut equal = true;
    for (i, (a, b)) in src.chunks(page).zip(dst.chunks(page)).enumerate() {
        if !w.contains(i as u64) {
            equal &= a == b;
        }
    }
    (equal, w.pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(pages: &[u64], total: u64) -> Written {
        let log = SharedDirtyLog::new(&[total]);
        for &p in pages {
            log.mark(0, p);
        }
        Written {
            pages: log.bitmap(0).count(),
            log,
            seconds: 0.0,
        }
    }

    #[test]
    fn pages_the_guest_wrote_are_left_out_and_counted_the_rest_compared() {
        let src = vec![7u8; 4096 * 8];
        let mut dst = src.clone();
        dst[4096 * 3 + 5] = 1; // the destination's guest wrote page 3
        let w = written(&[3], 8);
        assert_eq!(compare(&src, &dst, 4096, Some(&w)), (true, 1));
        dst[4096 * 6] = 9; // a page it did not write differs
        assert_eq!(compare(&src, &dst, 4096, Some(&w)), (false, 1));
        assert_eq!(compare(&src, &dst, 4096, None), (false, 0));
    }
}
