//! Configuration of both ends of a migration.

use std::time::Duration;

use rmig_transport::rdma::Registration;
#[cfg(feature = "fault-injection")]
use rmig_transport::FaultPlan;

use crate::control::auth::Key;
use crate::control::link::Liveness;
pub use crate::control::tls::{Encryption, X509Creds};
use crate::converge::ConvergePolicy;
use crate::protocol::{PROTOCOL_MAX, PROTOCOL_MIN};
use crate::verify::VerifyMode;

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// RDMA when both ends have a device for the session's addresses, else TCP (and the
    /// statistics say why in `fallback_reason`).
    #[default]
    Auto,
    /// TCP lanes only.
    Tcp,
    /// RDMA lanes only: an error when either end has no usable device.
    Rdma,
}

/// RDMA settings of one end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device name (`rxe0`, `mlx5_0`); `None` picks the device whose GID table holds the
    /// address of the control connection.
    pub device: Option<String>,
    /// How this end registers its guest memory.
    pub registration: Registration,
}

/// NUMA placement of the data-plane workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumaMode {
    /// Place and pin lanes next to the memory they serve (flat when there is one node).
    #[default]
    Auto,
    /// Let the scheduler place them.
    Off,
}

/// Configuration of a source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Destination address, `host:port` (IPv4, `[IPv6]:port` or a host name).
    pub dest: String,
    /// Pre-shared key.
    pub key: Key,
    /// Encryption of the control connection and the TCP lanes (default: TLS with the
    /// pre-shared key's proofs bound to each session). RDMA lanes cannot be encrypted
    /// (one-sided WRITEs), so with encryption on `auto` picks TCP and `rdma` is refused,
    /// unless [`rdma_cleartext_lanes`](Self::rdma_cleartext_lanes) says otherwise.
    pub encryption: Encryption,
    /// With encryption on: allow RDMA data lanes, whose pages cross in clear (default off).
    /// The control connection stays TLS, and each lane's queue pair and memory key exchange
    /// runs inside the lane's TLS session; the statistics say `data_lanes_encrypted: false`.
    /// The destination must allow it too. Without encryption it changes nothing.
    pub rdma_cleartext_lanes: bool,
    /// Data lanes (default: one per CPU).
    pub lanes: usize,
    /// Transport preference.
    pub transport: TransportChoice,
    /// RDMA device and registration.
    pub rdma: RdmaConfig,
    /// Convergence policy (downtime limit, rounds, auto-converge).
    pub policy: ConvergePolicy,
    /// Bandwidth ceiling in bytes/s; 0 is unlimited.
    pub max_bandwidth: u64,
    /// End-to-end verification: what it proves at the handover (see [`VerifyMode`]; the
    /// destination does what the source asks).
    pub verify: VerifyMode,
    /// Heartbeats.
    pub liveness: Liveness,
    /// Limit for each step of the handshake and for connecting.
    pub handshake_timeout: Duration,
    /// How long a control connection that broke during pre-copy may take to come back (it
    /// reconnects, re-authenticates and continues; unconfirmed pages are sent again). Zero
    /// fails the migration at once, as before.
    pub reconnect_window: Duration,
    /// How long the destination may take to verify and load the device state before it says
    /// `Ready`; past it the source resumes its guest and the destination discards.
    pub ready_timeout: Duration,
    /// Protocol versions spoken (tests change this).
    pub versions: (u16, u16),
    /// Faults to inject per lane (tests; the `fault-injection` feature).
    #[cfg(feature = "fault-injection")]
    pub lane_faults: Vec<FaultPlan>,
    /// NUMA placement.
    pub numa: NumaMode,
}

impl SourceConfig {
    /// Defaults for a migration to `dest` with `key`.
    pub fn new(dest: impl Into<String>, key: Key) -> Self {
        SourceConfig {
            dest: dest.into(),
            key,
            encryption: Encryption::default(),
            rdma_cleartext_lanes: false,
            lanes: std::thread::available_parallelism().map_or(1, |n| n.get()),
            transport: TransportChoice::Auto,
            rdma: RdmaConfig::default(),
            policy: ConvergePolicy::default(),
            max_bandwidth: 0,
            verify: VerifyMode::Received,
            liveness: Liveness::default(),
            handshake_timeout: Duration::from_secs(10),
            reconnect_window: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(10),
            versions: (PROTOCOL_MIN, PROTOCOL_MAX),
            #[cfg(feature = "fault-injection")]
            lane_faults: Vec::new(),
            numa: NumaMode::Auto,
        }
    }
}

/// Faults to inject into a destination (tests; the `fault-injection` feature).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestFault {
    /// Drop every connection without a word once this many payload bytes have landed, as if
    /// the process had died.
    pub die_after_bytes: Option<u64>,
}

/// Configuration of a destination.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// Pre-shared key.
    pub key: Key,
    /// Encryption: whether every connection must be TLS, and how it authenticates. A
    /// connection that does not match is refused with a message saying so.
    pub encryption: Encryption,
    /// With encryption on: accept RDMA data lanes, whose pages cross in clear (default off:
    /// an encrypted destination then offers TCP only, and says which flag would allow RDMA).
    /// See [`SourceConfig::rdma_cleartext_lanes`].
    pub rdma_cleartext_lanes: bool,
    /// Transport preference.
    pub transport: TransportChoice,
    /// RDMA device and registration.
    pub rdma: RdmaConfig,
    /// Most lanes accepted.
    pub max_lanes: u16,
    /// Heartbeats.
    pub liveness: Liveness,
    /// Limit for each step of the handshake, and for the lanes to join.
    pub handshake_timeout: Duration,
    /// How long to wait for a source to complete the handshake; `None` waits until cancelled
    /// (as QEMU's `-incoming` does). Connections that fail the handshake do not end the wait.
    pub incoming_timeout: Option<Duration>,
    /// How long to wait for the source to reconnect after the control connection broke
    /// during pre-copy; zero fails at once.
    pub reconnect_window: Duration,
    /// Most device state accepted, in bytes.
    pub max_device_state: usize,
    /// Protocol versions spoken (tests change this).
    pub versions: (u16, u16),
    /// On TCP lanes, place pre-copy pages that are not in memory yet with userfaultfd's
    /// `UFFDIO_COPY` rather than fault them in by writing (default on; it needs root or
    /// `vm.unprivileged_userfaultfd=1`, and goes without when it cannot). Memory a VMM did not
    /// preallocate lands several times faster; memory that is all resident is left alone.
    /// The statistics' `landing` says what was done.
    pub land_with_userfaultfd: bool,
    /// Faults to inject (tests; the `fault-injection` feature).
    #[cfg(feature = "fault-injection")]
    pub fault: DestFault,
}

impl DestConfig {
    /// Defaults for a destination with `key`.
    pub fn new(key: Key) -> Self {
        DestConfig {
            key,
            encryption: Encryption::default(),
            rdma_cleartext_lanes: false,
            transport: TransportChoice::Auto,
            rdma: RdmaConfig::default(),
            max_lanes: 64,
            liveness: Liveness::default(),
            handshake_timeout: Duration::from_secs(10),
            incoming_timeout: None,
            reconnect_window: Duration::from_secs(10),
            max_device_state: 1 << 30,
            versions: (PROTOCOL_MIN, PROTOCOL_MAX),
            land_with_userfaultfd: true,
            #[cfg(feature = "fault-injection")]
            fault: DestFault::default(),
        }
    }
}
