//! Why an RDMA device or lane could not be set up.

use std::io;

/// An RDMA setup failure. Data-path failures of a running lane are [`LaneError`]s instead.
///
/// [`LaneError`]: crate::LaneError
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No usable device: no verbs library, a kernel without RDMA, or no device that serves the
    /// address.
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{what}: {source}")]
    Verbs {
        /// The call.
        what: String,
        /// The error it returned.
        source: io::Error,
    },
    /// Registering memory hit the locked-memory limit.
    #[error(
        "cannot register {bytes} bytes of memory with the RDMA device ({source}): the \
         locked-memory limit is too low; raise it with `ulimit -l unlimited` (or LimitMEMLOCK= \
         for a service), or use chunked registration"
    )]
    LockedMemory {
        /// Bytes that were being registered.
        bytes: u64,
        /// The error of `ibv_reg_mr`.
        source: io::Error,
    },
    /// The peer's setup data does not fit.
    #[error("RDMA setup: {0}")]
    Setup(String),
}

impl RdmaError {
    pub(crate) fn verbs(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        RdmaError::Verbs {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// The `io::Error` inside one of sideway's error types (they wrap it a level or two deep).
pub(crate) fn io_of(e: &(dyn std::error::Error + 'static)) -> io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        // sideway's kinds are `#[error(transparent)]` over the io::Error, so the chain of
        // sources skips it: look inside the two whose errno matters.
        use sideway::ibverbs::device::GetDeviceListErrorKind;
        use sideway::ibverbs::memory_region::RegisterMemoryRegionErrorKind;
        if let Some(GetDeviceListErrorKind::Ibverbs(io)) =
            c.downcast_ref::<GetDeviceListErrorKind>()
        {
            return same(io);
        }
        if let Some(RegisterMemoryRegionErrorKind::Ibverbs(io)) =
            c.downcast_ref::<RegisterMemoryRegionErrorKind>()
        {
            return same(io);
        }
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return same(io);
        }
        cur = c.source();
    }
    io::Error::other(e.to_string())
}

fn same(io: &io::Error) -> io::Error {
    match io.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(io.kind(), io.to_string()),
    }
}
