//! The unit of work on a lane: runs of contiguous pages of one region.

/// What a run carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// The pages' bytes follow.
    Data,
    /// The pages are all zero: only a marker travels.
    Zero,
}

/// Contiguous pages of one region, all of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of the region in the session's region table.
    pub region: u32,
    /// First page of the run, counted in the region's page size.
    pub first_page: u64,
    /// Number of pages (at least one).
    pub npages: u32,
    /// Data or zero marker.
    pub kind: RunKind,
}

/// A numbered group of runs; the destination acknowledges batches, not runs.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Sequence number, strictly increasing per lane from 1.
    pub seq: u64,
    /// The runs, in the order they go on the wire.
    pub runs: Vec<Run>,
    /// Payload bytes (data runs only), kept by whoever builds the batch.
    pub data_bytes: u64,
}

impl Batch {
    /// Empties the batch for reuse, keeping its allocation.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.data_bytes = 0;
    }

    /// Whether the batch holds no run.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}
