//! Registering guest memory with the RDMA device.
//!
//! A NIC may only touch memory that is registered (pinned, with keys). Two ways, as in QEMU:
//! - **pin-all**: each region is registered once at setup. Cheapest on the data path; needs a
//!   locked-memory limit as large as guest RAM.
//! - **chunked**: fixed-size chunks are registered when first written and kept in a bounded
//!   cache per lane, for hosts that cannot pin all guest RAM. The source asks the destination
//!   for a chunk's key over the lane and names the chunk the destination may drop in exchange,
//!   once no write to it is outstanding; so the destination never holds more than
//!   `lanes × max_chunks` registrations.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::AccessFlags;

use super::error::io_of;
use super::{RdmaDevice, RdmaError};
use crate::{MemRegion, MemoryMap};

/// How memory is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Registration {
    /// Every region once, at setup.
    #[default]
    PinAll,
    /// Chunks of `chunk_bytes` on demand, at most `max_chunks` per lane.
    Chunked {
        /// Chunk size (a power of two, a multiple of the page size).
        chunk_bytes: u64,
        /// Registrations kept per lane.
        max_chunks: u32,
    },
}

impl Registration {
    /// Chunked registration with QEMU's chunk size (1 MiB) and a cache of 256 chunks a lane.
    pub const CHUNKED_DEFAULT: Registration = Registration::Chunked {
        chunk_bytes: 1 << 20,
        max_chunks: 256,
    };

    /// Name as shown in statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Registration::PinAll => "pin-all",
            Registration::Chunked { .. } => "chunked",
        }
    }
}

/// Where a region of the destination lives for the source's WRITEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address of the region's first byte in the destination's address space.
    pub addr: u64,
    /// Remote key of its registration.
    pub rkey: u32,
}

/// The destination's memory as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteMemory {
    /// Registered whole, one key per region.
    PinAll(Vec<RemoteRegion>),
    /// Registered by chunk on request.
    Chunked {
        /// Chunk size.
        chunk_bytes: u64,
        /// Chunks the destination keeps registered for one lane.
        max_chunks: u32,
    },
}

/// Registers `len` bytes at `ptr`.
pub(crate) fn register(
    dev: &RdmaDevice,
    ptr: *mut u8,
    len: usize,
    remote_write: bool,
) -> Result<Arc<MemoryRegion>, RdmaError> {
    let mut access = AccessFlags::LocalWrite;
    if remote_write {
        access |= AccessFlags::RemoteWrite;
    }
    register_with(dev, ptr, len, access)
}

/// Registers `len` bytes at `ptr` with `access` (e.g. remote read for post-copy's exposure).
pub(crate) fn register_with(
    dev: &RdmaDevice,
    ptr: *mut u8,
    len: usize,
    access: AccessFlags,
) -> Result<Arc<MemoryRegion>, RdmaError> {
    // SAFETY: the memory is guest memory, which `MemRegion`'s contract keeps mapped for the
    // session, or a buffer of a lane or reader, which owns it and drops the registration
    // (deregisters) before the buffer; every registration is dropped before the session ends.
    let r = unsafe { dev.pd.reg_mr(ptr as usize, len, access) };
    r.map_err(|e| {
        let io = io_of(&e);
        match io.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EPERM) | Some(libc::EAGAIN) => {
                RdmaError::LockedMemory {
                    bytes: len as u64,
                    source: io,
                }
            }
            _ => RdmaError::verbs(format!("ibv_reg_mr of {len} bytes"), io),
        }
    })
}

/// One side's registrations of its guest memory: all of it (pin-all) or none up front.
pub struct LocalMemory {
    pub(crate) map: MemoryMap,
    pub(crate) mode: Registration,
    /// Pin-all: one registration per region.
    pub(crate) regions: Vec<Arc<MemoryRegion>>,
    took: Duration,
}

impl LocalMemory {
    /// Registers `map` as `mode` says (nothing yet when chunked). `remote_write`: the peer
    /// writes into it (a destination).
    pub fn register(
        dev: &RdmaDevice,
        map: &MemoryMap,
        mode: Registration,
        remote_write: bool,
    ) -> Result<LocalMemory, RdmaError> {
        let t0 = Instant::now();
        if let Registration::Chunked { chunk_bytes, .. } = mode {
            let ok = chunk_bytes.is_power_of_two()
                && map
                    .regions()
                    .iter()
                    .all(|r| chunk_bytes >= r.page_size() as u64);
            if !ok {
                return Err(RdmaError::Setup(format!(
                    "chunk size {chunk_bytes} must be a power of two and at least a page"
                )));
            }
        }
        let mut regions = Vec::new();
        if mode == Registration::PinAll {
            for r in map.regions() {
                regions.push(register(dev, r.as_ptr(), r.len(), remote_write)?);
            }
        }
        Ok(LocalMemory {
            map: map.clone(),
            mode,
            regions,
            took: t0.elapsed(),
        })
    }

    /// How long the registration took.
    pub fn took(&self) -> Duration {
        self.took
    }

    /// How memory is registered.
    pub fn mode(&self) -> Registration {
        self.mode
    }

    /// This memory as the peer writing into it sees it.
    pub fn remote(&self) -> RemoteMemory {
        match self.mode {
            Registration::PinAll => RemoteMemory::PinAll(
                self.regions
                    .iter()
                    .map(|m| RemoteRegion {
                        addr: m.get_ptr() as u64,
                        rkey: m.rkey(),
                    })
                    .collect(),
            ),
            Registration::Chunked {
                chunk_bytes,
                max_chunks,
            } => RemoteMemory::Chunked {
                chunk_bytes,
                max_chunks,
            },
        }
    }
}

/// The span of chunk `chunk` of `region`: pointer and length (the last chunk may be short).
pub(crate) fn chunk_span(
    region: &MemRegion,
    chunk: u64,
    chunk_bytes: u64,
) -> Option<(*mut u8, usize)> {
    let off = chunk.checked_mul(chunk_bytes)?;
    if off >= region.len() as u64 {
        return None;
    }
    let len = chunk_bytes.min(region.len() as u64 - off) as usize;
    // SAFETY: `off` is inside the region (checked above), so the pointer stays in its mapping.
    Some((unsafe { region.as_ptr().add(off as usize) }, len))
}

/// What the destination does with a source's request for a chunk's key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission<'a, V> {
    /// The chunk is registered already: its registration.
    Held(&'a V),
    /// There is room: register it.
    Register,
    /// The cache is full even after the chunk the source gave up left it: refuse. A source
    /// that sizes its cache from the advertised limit never meets this; one that does not
    /// cannot make the destination pin more than its limit (naming a chunk it never held
    /// frees nothing).
    Refuse,
}

/// A bounded cache of chunk registrations, least recently used first out.
pub(crate) struct ChunkCache<V> {
    cap: usize,
    tick: u64,
    entries: HashMap<(u32, u64), (V, u64)>,
}

impl<V> ChunkCache<V> {
    pub(crate) fn new(cap: usize) -> Self {
        ChunkCache {
            cap: cap.max(1),
            tick: 0,
            entries: HashMap::new(),
        }
    }

    /// The entry of `key`, marked as just used.
    pub(crate) fn get(&mut self, key: (u32, u64)) -> Option<&V> {
        self.tick += 1;
        let t = self.tick;
        self.entries.get_mut(&key).map(|(v, used)| {
            *used = t;
            &*v
        })
    }

    /// Whether one more entry needs another to go first.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.cap
    }

    /// The least recently used key.
    pub(crate) fn victim(&self) -> Option<(u32, u64)> {
        self.entries
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(k, _)| *k)
    }

    pub(crate) fn remove(&mut self, key: (u32, u64)) -> Option<V> {
        self.entries.remove(&key).map(|(v, _)| v)
    }

    /// Drops `evict` (the chunk the source gave up, if it names one) and decides on `key`.
    pub(crate) fn admit(&mut self, key: (u32, u64), evict: Option<(u32, u64)>) -> Admission<'_, V> {
        if let Some(v) = evict {
            self.remove(v);
        }
        if self.entries.contains_key(&key) {
            return Admission::Held(self.get(key).expect("present"));
        }
        if self.is_full() {
            return Admission::Refuse;
        }
        Admission::Register
    }

    pub(crate) fn insert(&mut self, key: (u32, u64), v: V) {
        self.tick += 1;
        self.entries.insert(key, (v, self.tick));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used() {
        let mut c = ChunkCache::new(2);
        c.insert((0, 1), 'a');
        c.insert((0, 2), 'b');
        assert!(c.is_full());
        assert_eq!(c.get((0, 1)), Some(&'a'));
        assert_eq!(c.victim(), Some((0, 2)));
        assert_eq!(c.remove((0, 2)), Some('b'));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_request_beyond_the_limit_is_refused_and_pins_nothing() {
        let mut c = ChunkCache::new(2);
        assert_eq!(c.admit((0, 1), None), Admission::Register);
        c.insert((0, 1), 'a');
        assert_eq!(c.admit((0, 2), None), Admission::Register);
        c.insert((0, 2), 'b');
        // Full: a third chunk without one given up is refused, and nothing is dropped.
        assert_eq!(c.admit((0, 3), None), Admission::Refuse);
        assert_eq!(c.len(), 2);
        // Naming a chunk it never held frees nothing either.
        assert_eq!(c.admit((0, 3), Some((1, 9))), Admission::Refuse);
        assert_eq!(c.len(), 2);
        // A chunk held already is answered even when full.
        assert_eq!(c.admit((0, 2), None), Admission::Held(&'b'));
        // Giving one up makes room for exactly one.
        assert_eq!(c.admit((0, 3), Some((0, 1))), Admission::Register);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get((0, 1)), None);
    }
}
