//! Guest memory regions as the embedder hands them over, and the table both ends agree on.

use rmig_transport::MemRegion;

use crate::EngineError;

/// Longest region name, in bytes (checked by [`validate`], cut when encoded).
pub const MAX_NAME: usize = 256;
/// Most regions a session may have (region tables, checksums).
pub const MAX_REGIONS: usize = 4096;

/// Default page size: 4 KiB.
pub const PAGE_4K: u64 = 4096;
/// Huge page size allowed for regions backed by 2 MiB pages.
pub const PAGE_2M: u64 = 2 << 20;

/// One guest memory region (a QEMU RAMBlock).
#[derive(Debug, Clone)]
pub struct Region {
    /// The embedder's identifier; both ends must use the same.
    pub id: u32,
    /// A human-readable name ("pc.ram").
    pub name: String,
    /// Guest physical address, if the embedder has one.
    pub gpa: Option<u64>,
    /// Host memory behind the region.
    pub mem: MemRegion,
    /// The destination's memory is known to be all zero (freshly mapped), so zero pages need
    /// no write. Ignored on a source.
    pub known_zero: bool,
}

impl Region {
    /// Describes host memory at `ptr` as a region.
    ///
    /// # Safety
    /// The contract of [`MemRegion::new`]: the memory stays mapped for the session, and a
    /// destination's memory is written by nobody else while the migration runs.
    pub unsafe fn new(
        id: u32,
        name: impl Into<String>,
        ptr: *mut u8,
        len: u64,
        page_size: u64,
    ) -> Result<Self, EngineError> {
        if page_size != PAGE_4K && page_size != PAGE_2M {
            return Err(EngineError::Config(format!(
                "region {id}: page size {page_size} is neither 4 KiB nor 2 MiB"
            )));
        }
        if ptr.is_null() || len == 0 {
            return Err(EngineError::Config(format!(
                "region {id}: null address or zero length"
            )));
        }
        if !len.is_multiple_of(page_size) || !(ptr as u64).is_multiple_of(PAGE_4K) {
            return Err(EngineError::Config(format!(
                "region {id}: address and length must be page-aligned"
            )));
        }
        Ok(Region {
            id,
            name: name.into(),
            gpa: None,
            // SAFETY: forwarded to the caller by this function's own contract.
            mem: unsafe { MemRegion::new(ptr, len as usize, page_size as usize) },
            known_zero: false,
        })
    }

    /// Sets the guest physical address.
    pub fn with_gpa(mut self, gpa: u64) -> Self {
        self.gpa = Some(gpa);
        self
    }

    /// Marks a destination region as freshly mapped (all zero).
    pub fn with_known_zero(mut self, known_zero: bool) -> Self {
        self.known_zero = known_zero;
        self
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Whether the region is empty (never, for a validated region).
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.mem.page_size() as u64
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.mem.pages()
    }

    /// The description that travels to the peer.
    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            id: self.id,
            name: self.name.clone(),
            len: self.len(),
            page_size: self.page_size(),
            gpa: self.gpa,
        }
    }
}

/// What the peer learns of a region: everything but the host address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDesc {
    /// Identifier.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Guest physical address.
    pub gpa: Option<u64>,
}

/// Checks a local region table: at most [`MAX_REGIONS`] regions with names of at most
/// [`MAX_NAME`] bytes, unique ids, no overlapping host ranges or guest ranges.
pub fn validate(regions: &[Region]) -> Result<(), EngineError> {
    if regions.is_empty() {
        return Err(EngineError::Config("no memory regions".into()));
    }
    // The region table must fit its frame: the peer refuses longer tables and names.
    if regions.len() > MAX_REGIONS {
        return Err(EngineError::Config(format!(
            "{} regions, at most {MAX_REGIONS}",
            regions.len()
        )));
    }
    if let Some(r) = regions.iter().find(|r| r.name.len() > MAX_NAME) {
        return Err(EngineError::Config(format!(
            "region {}: a name of {} bytes, at most {MAX_NAME}",
            r.id,
            r.name.len()
        )));
    }
    let mut ids: Vec<u32> = regions.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(EngineError::Config("duplicate region id".into()));
    }
    let overlap = |spans: &mut Vec<(u64, u64, u32)>, what: &str| {
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(EngineError::Config(format!(
                    "regions {} and {} overlap in {what}",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    };
    let mut host: Vec<(u64, u64, u32)> = regions
        .iter()
        .map(|r| {
            let a = r.mem.as_ptr() as u64;
            (a, a + r.len(), r.id)
        })
        .collect();
    overlap(&mut host, "host memory")?;
    let mut guest: Vec<(u64, u64, u32)> = regions
        .iter()
        .filter_map(|r| r.gpa.map(|g| (g, g.saturating_add(r.len()), r.id)))
        .collect();
    overlap(&mut guest, "guest physical memory")
}

/// Checks that the peer's table is the same as ours, region by region and in order.
pub fn compare(ours: &[RegionDesc], theirs: &[RegionDesc]) -> Result<(), EngineError> {
    if ours.len() != theirs.len() {
        return Err(EngineError::RegionMismatch(format!(
            "{} regions here, {} at the peer",
            ours.len(),
            theirs.len()
        )));
    }
    for (a, b) in ours.iter().zip(theirs) {
        if a != b {
            return Err(EngineError::RegionMismatch(format!(
                "region {} ({}, {} bytes, page {}) here vs {} ({}, {} bytes, page {}) at the peer",
                a.id, a.name, a.len, a.page_size, b.id, b.name, b.len, b.page_size
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8], id: u32, off: usize, len: usize) -> Region {
        // SAFETY: the test's buffer outlives the region.
        unsafe { Region::new(id, "r", buf.as_mut_ptr().add(off), len as u64, PAGE_4K) }.unwrap()
    }

    #[test]
    fn overlap_and_mismatch_are_refused() {
        let mut v = vec![0u8; 64 << 10];
        let base = v.as_ptr() as usize;
        let pad = (4096 - base % 4096) % 4096;
        let a = region(&mut v, 1, pad, 16384);
        let b = region(&mut v, 2, pad + 8192, 16384);
        assert!(validate(&[a.clone(), b]).is_err());
        let c = region(&mut v, 2, pad + 16384, 16384);
        assert!(validate(&[a.clone(), c.clone()]).is_ok());
        assert!(validate(&[a.clone(), a.clone()]).is_err());
        let g1 = a.clone().with_gpa(0);
        let g2 = c.clone().with_gpa(8192);
        assert!(validate(&[g1, g2]).is_err());
        assert!(compare(&[a.desc()], &[a.desc()]).is_ok());
        assert!(compare(&[a.desc()], &[c.desc()]).is_err());
        assert!(compare(&[a.desc()], &[]).is_err());
        // SAFETY: never dereferenced; construction must fail first.
        assert!(unsafe { Region::new(1, "x", base as *mut u8, 100, PAGE_4K) }.is_err());
        // SAFETY: as above.
        assert!(unsafe { Region::new(1, "x", base as *mut u8, 4096, 8192) }.is_err());
    }

    #[test]
    fn tables_that_do_not_fit_their_frame_are_refused() {
        let mut v = vec![0u8; 8 << 10];
        let pad = (4096 - v.as_ptr() as usize % 4096) % 4096;
        let mut a = region(&mut v, 1, pad, 4096);
        a.name = "é".repeat(MAX_NAME / 2);
        assert!(validate(std::slice::from_ref(&a)).is_ok());
        a.name.push('x');
        let e = validate(std::slice::from_ref(&a)).unwrap_err().to_string();
        assert!(e.contains("name of 257 bytes"), "{e}");
        // Too many regions (the same host range: the count is checked first).
        a.name = "r".into();
        let many = vec![a; MAX_REGIONS + 1];
        let e = validate(&many).unwrap_err().to_string();
        assert!(e.contains("at most 4096"), "{e}");
    }
}
