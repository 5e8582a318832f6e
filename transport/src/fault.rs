//! Faults injected on purpose, so that tests can kill a lane at a chosen point.

/// A fault to inject into a source lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Shut the lane's socket down once this many payload bytes have been sent on it.
    pub fail_after_bytes: Option<u64>,
}
