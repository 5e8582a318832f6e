//! The plain C types of the ABI.

use std::ffi::{c_char, c_int, c_void};

/// A session: a handle, not a pointer. 0 is never a valid session.
pub type RmigSession = u64;

/// Which end a session is (kept by the library; never crosses the C ABI).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigRole {
    /// Sends memory.
    RmigSource = 0,
    /// Receives memory.
    RmigDestination = 1,
}

/// Transport preference: the allowed values of `rmig_config.transport`.
///
/// The field itself is a `uint32_t`, so that a value C puts there is never an invalid Rust
/// enum; the library checks it and answers anything else with `RMIG_ERR_INVALID_ARGUMENT`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigTransport {
    /// The best both ends can use.
    RmigTransportAuto = 0,
    /// TCP lanes.
    RmigTransportTcp = 1,
    /// RDMA lanes only (an error without a usable device).
    RmigTransportRdma = 2,
}

impl RmigTransport {
    /// Every value, with its C name.
    const ALL: [(RmigTransport, &'static str); 3] = [
        (RmigTransport::RmigTransportAuto, "RMIG_TRANSPORT_AUTO"),
        (RmigTransport::RmigTransportTcp, "RMIG_TRANSPORT_TCP"),
        (RmigTransport::RmigTransportRdma, "RMIG_TRANSPORT_RDMA"),
    ];
}

/// Encryption of a session: the allowed values of `rmig_config.encryption`, and what
/// `rmig_stats.encryption` reports.
///
/// Zero is TLS with the pre-shared key, so that a configuration left zeroed is encrypted.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigEncryption {
    /// TLS 1.3 on every connection, the pre-shared key's proofs bound to each (the default).
    RmigEncryptionTlsPsk = 0,
    /// Cleartext: anyone on the path can read and change guest memory.
    RmigEncryptionOff = 1,
    /// TLS 1.3 with mutual x509 certificates from `rmig_config.tls_creds`.
    RmigEncryptionTlsX509 = 2,
}

impl RmigEncryption {
    /// Every value, with its C name.
    const ALL: [(RmigEncryption, &'static str); 3] = [
        (
            RmigEncryption::RmigEncryptionTlsPsk,
            "RMIG_ENCRYPTION_TLS_PSK",
        ),
        (RmigEncryption::RmigEncryptionOff, "RMIG_ENCRYPTION_OFF"),
        (
            RmigEncryption::RmigEncryptionTlsX509,
            "RMIG_ENCRYPTION_TLS_X509",
        ),
    ];
}

/// A `uint32_t` from C that names no value of the enum it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// The value found.
    pub value: u32,
    /// The allowed values, as C spells them (`RMIG_TRANSPORT_AUTO (0), ...`).
    pub allowed: String,
}

impl UnknownValue {
    /// The message for `field` (e.g. `config.transport`) holding this value.
    pub fn message(&self, field: &str) -> String {
        format!(
            "{field} is {}, which is not one of {}",
            self.value, self.allowed
        )
    }
}

/// The entry of `all` (each value with its C name) whose number, by `num`, is `value`.
fn named<T: Copy>(
    value: u32,
    all: &[(T, &'static str)],
    num: impl Fn(T) -> u32,
) -> Result<T, UnknownValue> {
    all.iter()
        .find(|(t, _)| num(*t) == value)
        .map(|(t, _)| *t)
        .ok_or_else(|| UnknownValue {
            value,
            allowed: all
                .iter()
                .map(|(t, n)| format!("{n} ({})", num(*t)))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl TryFrom<u32> for RmigTransport {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, UnknownValue> {
        named(value, &RmigTransport::ALL, |t| t as u32)
    }
}

impl TryFrom<u32> for RmigEncryption {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, UnknownValue> {
        named(value, &RmigEncryption::ALL, |t| t as u32)
    }
}

/// An operator's decision after `RMIG_ERR_HANDOVER_UNKNOWN`: the allowed values of the
/// `decision` argument of `rmig_resolve_handover`, which says what to check before choosing.
///
/// The argument is a `uint32_t` checked by the library, as `rmig_config.transport` is; 0 is
/// no decision, so that a zeroed variable is refused (`RMIG_ERR_INVALID_ARGUMENT`) rather
/// than taken for one.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigHandover {
    /// This end runs the guest: the library calls this session's `resume` callback. Only
    /// when the other end is known not to run it, and never will.
    RmigHandoverRunHere = 1,
    /// The other end runs the guest: nothing is resumed here, and this end's copy of the
    /// guest stays paused for good (the VMM discards it).
    RmigHandoverRunThere = 2,
}

impl RmigHandover {
    /// Every value, with its C name.
    const ALL: [(RmigHandover, &'static str); 2] = [
        (RmigHandover::RmigHandoverRunHere, "RMIG_HANDOVER_RUN_HERE"),
        (
            RmigHandover::RmigHandoverRunThere,
            "RMIG_HANDOVER_RUN_THERE",
        ),
    ];
}

impl TryFrom<u32> for RmigHandover {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, UnknownValue> {
        named(value, &RmigHandover::ALL, |h| h as u32)
    }
}

/// End-to-end verification: the allowed values of `rmig_config.verify` (a `uint32_t`, checked
/// as `transport` is). The source's value decides; a destination does what its source asks.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigVerify {
    /// No checksums: nothing proves the destination holds the source's memory.
    RmigVerifyOff = 0,
    /// Every page the destination received equals the page the source sent last. Blind to
    /// writes into destination memory after a page landed.
    RmigVerifyReceived = 1,
    /// As `RMIG_VERIFY_RECEIVED`, and in the pause the destination re-reads all of its memory:
    /// it still holds what it received, so it equals the source's memory at the handover.
    /// Costs downtime (one pass over destination memory).
    RmigVerifyMemory = 2,
}

impl RmigVerify {
    /// Every value, with its C name.
    const ALL: [(RmigVerify, &'static str); 3] = [
        (RmigVerify::RmigVerifyOff, "RMIG_VERIFY_OFF"),
        (RmigVerify::RmigVerifyReceived, "RMIG_VERIFY_RECEIVED"),
        (RmigVerify::RmigVerifyMemory, "RMIG_VERIFY_MEMORY"),
    ];
}

impl TryFrom<u32> for RmigVerify {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, UnknownValue> {
        named(value, &RmigVerify::ALL, |v| v as u32)
    }
}

/// Configuration of a session; start from `rmig_config_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RmigConfig {
    /// Source: the destination's `host:port`. Destination: the address to listen on
    /// (`host:0` picks a port; see `rmig_dest_port`). Borrowed during `rmig_*_new` only.
    pub address: *const c_char,
    /// The pre-shared key; borrowed during `rmig_*_new` only. May be NULL with
    /// `RMIG_ENCRYPTION_TLS_X509`: the certificates authenticate both ends, and each session's
    /// key is derived from its control connection's TLS session.
    pub key: *const u8,
    /// Length of `key` in bytes: at least 16 once surrounding whitespace is trimmed (a shorter
    /// key makes `rmig_*_new` fail with `RMIG_ERR_CONFIG`).
    pub key_len: usize,
    /// Data lanes; 0 means one per CPU.
    pub lanes: u32,
    /// Transport preference: one of the `RMIG_TRANSPORT_*` values of `rmig_transport`
    /// (default `RMIG_TRANSPORT_AUTO`). Any other value makes `rmig_*_new` fail with
    /// `RMIG_ERR_INVALID_ARGUMENT`.
    pub transport: u32,
    /// Downtime ceiling in milliseconds (default 300).
    pub downtime_limit_ms: u64,
    /// Bandwidth ceiling in bytes/s; 0 is unlimited.
    pub max_bandwidth: u64,
    /// Most pre-copy rounds (default 30).
    pub max_rounds: u32,
    /// At the round limit above the downtime limit: 0 fails, 1 forces the switchover.
    pub force_switchover: u32,
    /// Ask the embedder to throttle when rounds stop shrinking (default 1).
    pub auto_converge: u32,
    /// End-to-end verification: one of the `RMIG_VERIFY_*` values of `rmig_verify` (default
    /// `RMIG_VERIFY_RECEIVED`, 1). Any other value makes `rmig_*_new` fail with
    /// `RMIG_ERR_INVALID_ARGUMENT`.
    pub verify: u32,
    /// Encryption: one of the `RMIG_ENCRYPTION_*` values of `rmig_encryption` (default
    /// `RMIG_ENCRYPTION_TLS_PSK`). RDMA lanes cannot be encrypted: with encryption on,
    /// `RMIG_TRANSPORT_AUTO` uses TCP unless both ends set `rdma_cleartext_lanes`.
    pub encryption: u32,
    /// With `RMIG_ENCRYPTION_TLS_X509`: a directory laid out as QEMU's tls-creds-x509
    /// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`). Borrowed during `rmig_*_new` only.
    pub tls_creds: *const c_char,
    /// With `RMIG_ENCRYPTION_TLS_X509` on a source: the name the destination's certificate
    /// must carry; NULL: the host of `address`. Borrowed during `rmig_*_new` only.
    pub tls_hostname: *const c_char,
    /// Source: post-copy when pre-copy does not converge (where auto-converge would throttle,
    /// or at the round limit), or when `rmig_start_postcopy` asks (default 0: off). The guest
    /// then resumes on the destination before all of its memory is there; see the user guide
    /// for what that risks. Needs TCP lanes and private anonymous destination memory.
    pub postcopy: u32,
    /// Source: with `postcopy`, switch at the latest after this many rounds (0: no such
    /// limit). Non-zero turns `postcopy` on.
    pub postcopy_after_rounds: u32,
    /// With encryption on: 1 allows RDMA data lanes, whose guest pages cross the network in
    /// clear (one-sided WRITEs cannot be encrypted); the control connection and each lane's
    /// queue pair and memory key exchange stay TLS, and `rmig_stats.data_lanes_encrypted` is
    /// 0. Both ends must set it; a destination that does not offers TCP only. Default 0.
    pub rdma_cleartext_lanes: u32,
}

/// Growable bytes owned by the library, filled by a callback with `rmig_bytes_append`.
pub struct RmigBytes {
    pub(crate) data: Vec<u8>,
}

/// Callbacks into the embedder, all called on the thread that drives the session.
/// Each returning `int` returns 0 for success.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RmigCallbacks {
    /// Handed back to every callback.
    pub opaque: *mut c_void,
    /// Source: set the bit of every page of region `region` (in `rmig_add_region` order)
    /// written since the previous call, in `bitmap` (`words` 64-bit words, zeroed by the
    /// library, bit i of word w = page w*64+i). Required on a source.
    pub dirty_sync: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            region: u32,
            bitmap: *mut u64,
            words: usize,
        ) -> c_int,
    >,
    /// Source: stop the guest for the final copy; return only when no guest write can land.
    pub pause: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// Source: the migration failed after `pause`; let the guest run again.
    /// Destination: everything landed and verified and the source committed; start the guest.
    /// Either end: also called by `rmig_resolve_handover` with `RMIG_HANDOVER_RUN_HERE`.
    pub resume: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Source: slow the guest by `percent` (auto-converge); 0 lifts the throttle.
    pub throttle: Option<unsafe extern "C" fn(opaque: *mut c_void, percent: u32)>,
    /// Source: after the pause, append the device state to `out` with `rmig_bytes_append`.
    pub save_device_state:
        Option<unsafe extern "C" fn(opaque: *mut c_void, out: *mut RmigBytes) -> c_int>,
    /// Destination: the source's device state, before `resume`. `data` is valid during the
    /// call only.
    pub load_device_state:
        Option<unsafe extern "C" fn(opaque: *mut c_void, data: *const u8, len: usize) -> c_int>,
    /// Source, optional (NULL: not called): a sync of the dirty log begins; `dirty_sync` then
    /// follows once per region, in `rmig_add_region` order. An embedder that syncs its whole
    /// log at once (QEMU's `migration_bitmap_sync_precopy`) does it here.
    pub dirty_sync_begin: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
}

/// Outcome of a migration as `rmig_get_stats` reports it.
///
/// Only ever written by the library (into `rmig_stats.state`), never read from C memory, so it
/// stays a C enum; like `rmig_status`, a later version may add values: handle unknown ones.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmigState {
    /// Created, regions being added.
    RmigStateNew = 0,
    /// Connecting or negotiating.
    RmigStateSetup = 1,
    /// Pre-copy rounds.
    RmigStateActive = 2,
    /// Stop-and-copy and device state.
    RmigStateDevice = 3,
    /// Done: the destination runs the guest (on a source, also after `rmig_resolve_handover`
    /// with `RMIG_HANDOVER_RUN_THERE`; on a destination, after `RMIG_HANDOVER_RUN_HERE`).
    RmigStateCompleted = 4,
    /// Failed: the source runs the guest (also after `rmig_resolve_handover` gave it to the
    /// source); the destination discards its copy.
    RmigStateFailed = 5,
    /// Cancelled.
    RmigStateCancelled = 6,
    /// The link failed during the handover: this end's guest stays paused until
    /// `rmig_resolve_handover` decides which end runs it.
    RmigStateHandoverUnknown = 7,
    /// Post-copy: the destination runs the guest while the pages it lacks follow it.
    RmigStatePostcopy = 8,
    /// Post-copy broke: neither end may run the guest.
    RmigStateGuestLost = 9,
}

/// Statistics (QEMU `query-migrate` names).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RmigStats {
    /// Where the migration stands (written by the library only).
    pub state: RmigState,
    /// 1 verified, 0 failed verification, -1 not verified (off, or not yet).
    pub verified: i32,
    /// Lanes opened.
    pub lanes: u32,
    /// Rounds so far (the stop-and-copy included).
    pub rounds: u32,
    /// Milliseconds from start to completion.
    pub total_time_ms: f64,
    /// Milliseconds of setup.
    pub setup_time_ms: f64,
    /// Milliseconds the guest was paused.
    pub downtime_ms: f64,
    /// Expected downtime before the switchover.
    pub expected_downtime_ms: f64,
    /// Average bandwidth in Mbit/s.
    pub mbps: f64,
    /// Bytes of guest memory.
    pub ram_total: u64,
    /// Bytes put on the wire.
    pub ram_transferred: u64,
    /// Dirty bytes still to send.
    pub ram_remaining: u64,
    /// Zero pages sent as markers.
    pub ram_duplicate: u64,
    /// Pages sent with their bytes.
    pub ram_normal: u64,
    /// Bytes of those pages.
    pub ram_normal_bytes: u64,
    /// Dirty-log syncs.
    pub dirty_sync_count: u64,
    /// How the session's connections were protected: one of the `RMIG_ENCRYPTION_*` values
    /// (meaningful once the migration is past its setup). That is the control connection;
    /// `data_lanes_encrypted` says whether the pages were too.
    pub encryption: u32,
    /// 1 if the migration switched to post-copy, else 0.
    pub postcopy: u32,
    /// Post-copy: milliseconds from the destination's resume to the last page landing (so
    /// far, while it runs).
    pub postcopy_ms: f64,
    /// Post-copy: pages the destination lacked when it resumed.
    pub postcopy_pages_at_switch: u64,
    /// Post-copy: pages fetched because the guest touched them (destination), or served on
    /// request (source).
    pub postcopy_pages_on_fault: u64,
    /// Post-copy: pages that landed (destination) or were sent (source) in the background.
    pub postcopy_pages_background: u64,
    /// Post-copy, destination: median wait of a fault for its page, in microseconds.
    pub postcopy_fault_p50_us: f64,
    /// Post-copy, destination: 99th percentile of that wait, in microseconds.
    pub postcopy_fault_p99_us: f64,
    /// Post-copy, destination: longest wait, in microseconds.
    pub postcopy_fault_max_us: f64,
    /// 1 if every guest page crossed inside TLS (encrypted, TCP lanes); 0 with encryption
    /// off, or when an encrypted session moved pages over RDMA lanes in clear
    /// (`rdma_cleartext_lanes`). Meaningful once the migration is past its setup.
    pub data_lanes_encrypted: u32,
    /// The transport the pages took: `RMIG_TRANSPORT_RDMA` or `RMIG_TRANSPORT_TCP` (also
    /// after a fallback from RDMA, whose reason `rmig_stats_json` gives), or 0 while the
    /// setup has not decided yet.
    pub transport: u32,
}
