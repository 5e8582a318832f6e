//! The embedder's C callbacks behind the engine's Rust traits.

use rmig_engine::{DestEmbedder, DirtySource, EngineError, SourceEmbedder};

use crate::types::{RmigBytes, RmigCallbacks};

/// The callbacks of one session.
#[derive(Clone, Copy)]
pub(crate) struct C(pub RmigCallbacks);

// SAFETY: the header documents that callbacks are called on the thread driving the session and
// that `opaque` must be usable from it; the engine moves the session between calls only as the
// embedder drives it from its migration thread.
unsafe impl Send for C {}

impl SourceEmbedder for C {
    fn pause(&mut self) -> Result<(), String> {
        match self.0.pause {
            // SAFETY: a C function pointer the embedder registered, with its own `opaque`.
            Some(f) => match unsafe { f(self.0.opaque) } {
                0 => Ok(()),
                e => Err(format!("pause callback returned {e}")),
            },
            None => Ok(()),
        }
    }

    fn resume(&mut self) {
        if let Some(f) = self.0.resume {
            // SAFETY: as in `pause`.
            unsafe { f(self.0.opaque) }
        }
    }

    fn throttle(&mut self, percent: u8) {
        if let Some(f) = self.0.throttle {
            // SAFETY: as in `pause`.
            unsafe { f(self.0.opaque, percent as u32) }
        }
    }

    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        let Some(f) = self.0.save_device_state else {
            return Ok(Vec::new());
        };
        let mut out = RmigBytes { data: Vec::new() };
        // SAFETY: as in `pause`; `out` lives across the call and is only appended to through
        // `rmig_bytes_append`.
        match unsafe { f(self.0.opaque, &mut out) } {
            0 => Ok(out.data),
            e => Err(format!("save_device_state callback returned {e}")),
        }
    }
}

impl DestEmbedder for C {
    fn load_device_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        match self.0.load_device_state {
            // SAFETY: as in `pause`; `state` outlives the call.
            Some(f) => match unsafe { f(self.0.opaque, state.as_ptr(), state.len()) } {
                0 => Ok(()),
                e => Err(format!("load_device_state callback returned {e}")),
            },
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), String> {
        SourceEmbedder::resume(self);
        Ok(())
    }
}

/// The dirty log, fetched through `dirty_sync`.
pub(crate) struct CDirty {
    pub c: C,
    pub buf: Vec<u64>,
}

impl DirtySource for CDirty {
    fn begin(&mut self) -> Result<(), EngineError> {
        let Some(f) = self.c.0.dirty_sync_begin else {
            return Ok(());
        };
        // SAFETY: the embedder's callback, called with its own opaque pointer as documented.
        let r = unsafe { f(self.c.0.opaque) };
        if r != 0 {
            return Err(EngineError::Embedder(format!(
                "dirty_sync_begin callback returned {r}"
            )));
        }
        Ok(())
    }

    fn sync(
        &mut self,
        region: usize,
        into: &rmig_engine::bitmap::AtomicBitmap,
    ) -> Result<u64, EngineError> {
        let f =
            self.c.0.dirty_sync.ok_or_else(|| {
                EngineError::Config("a source needs a dirty_sync callback".into())
            })?;
        let words = into.len().div_ceil(64) as usize;
        self.buf.clear();
        self.buf.resize(words, 0);
        // SAFETY: the buffer holds `words` words and lives across the call.
        let r = unsafe { f(self.c.0.opaque, region as u32, self.buf.as_mut_ptr(), words) };
        if r != 0 {
            return Err(EngineError::Embedder(format!(
                "dirty_sync callback returned {r}"
            )));
        }
        Ok(into.or_words(&self.buf))
    }
}
