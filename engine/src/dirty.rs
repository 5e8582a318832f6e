//! Dirty-page tracking behind one small trait.
//!
//! At every sync the engine asks its [`DirtySource`] for the pages written since the previous
//! sync. Where those bits come from is the embedder's business: KVM's dirty log copied into a
//! bitmap (QEMU, the C ABI), or writers that mark a shared bitmap themselves (the bench).

use std::sync::Arc;

use crate::bitmap::AtomicBitmap;
use crate::EngineError;

/// Reports pages written since the previous sync.
pub trait DirtySource: Send {
    /// A sync of every region begins: [`DirtySource::sync`] follows once per region, in table
    /// order. An embedder whose log is synced as a whole (QEMU's
    /// `migration_bitmap_sync_precopy`) syncs it here, rather than on some region's call.
    fn begin(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// ORs the pages of region number `region` (table order) dirtied since the previous sync
    /// into `into`, and forgets them. Returns how many bits it reported.
    fn sync(&mut self, region: usize, into: &AtomicBitmap) -> Result<u64, EngineError>;
}

/// A dirty log that writers mark directly: one shared atomic bitmap per region.
///
/// A writer must write the page first and set its bit after (release), so that a sync that
/// misses the bit cannot miss the write: the write is then simply reported by the next sync.
#[derive(Debug, Clone)]
pub struct SharedDirtyLog {
    maps: Arc<Vec<AtomicBitmap>>,
}

impl SharedDirtyLog {
    /// A log for regions of these page counts.
    pub fn new(pages_per_region: &[u64]) -> Self {
        SharedDirtyLog {
            maps: Arc::new(
                pages_per_region
                    .iter()
                    .map(|&p| AtomicBitmap::new(p))
                    .collect(),
            ),
        }
    }

    /// Marks page `page` of region `region` dirty.
    #[inline]
    pub fn mark(&self, region: usize, page: u64) {
        self.maps[region].set(page);
    }

    /// The bitmap of region `region`.
    pub fn bitmap(&self, region: usize) -> &AtomicBitmap {
        &self.maps[region]
    }
}

impl DirtySource for SharedDirtyLog {
    fn sync(&mut self, region: usize, into: &AtomicBitmap) -> Result<u64, EngineError> {
        let src = self
            .maps
            .get(region)
            .ok_or_else(|| EngineError::Config(format!("dirty log has no region {region}")))?;
        Ok(into.take_from(src))
    }
}

/// A dirty log filled by the embedder at each sync, the way QEMU fetches KVM's dirty log:
/// the callback receives the region number and a zeroed word buffer (one bit per page) that
/// the engine owns, and sets the bits of pages written since the previous call.
pub struct CallbackDirtyLog<F> {
    fill: F,
    buf: Vec<u64>,
}

impl<F> CallbackDirtyLog<F>
where
    F: FnMut(usize, &mut [u64]) -> Result<(), String> + Send,
{
    /// A log that asks `fill` at every sync.
    pub fn new(fill: F) -> Self {
        CallbackDirtyLog {
            fill,
            buf: Vec::new(),
        }
    }
}

impl<F> DirtySource for CallbackDirtyLog<F>
where
    F: FnMut(usize, &mut [u64]) -> Result<(), String> + Send,
{
    fn sync(&mut self, region: usize, into: &AtomicBitmap) -> Result<u64, EngineError> {
        let words = into.len().div_ceil(64) as usize;
        self.buf.clear();
        self.buf.resize(words, 0);
        (self.fill)(region, &mut self.buf).map_err(EngineError::Embedder)?;
        Ok(into.or_words(&self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_log_reports_once() {
        let mut log = SharedDirtyLog::new(&[100]);
        log.mark(0, 5);
        log.mark(0, 99);
        let into = AtomicBitmap::new(100);
        assert_eq!(log.sync(0, &into).unwrap(), 2);
        assert_eq!(log.sync(0, &into).unwrap(), 0);
        assert!(into.test(5) && into.test(99));
        assert!(log.sync(1, &into).is_err());
    }

    #[test]
    fn callback_log_fills_words() {
        let mut log = CallbackDirtyLog::new(|r, w: &mut [u64]| {
            assert_eq!(r, 0);
            w[1] = 0b101;
            Ok(())
        });
        let into = AtomicBitmap::new(128);
        assert_eq!(log.sync(0, &into).unwrap(), 2);
        assert!(into.test(64) && into.test(66));
    }
}
