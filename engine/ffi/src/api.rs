//! The `rmig_` functions.
//!
//! Threading: the contract is in the crate documentation (and the header's preamble); each
//! function says whether it is an *any thread* or a *driving* call.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use rmig_engine::{
    ConvergePolicy, DestConfig, DestEmbedder, DestListener, Encryption, EngineError, Key,
    MigrationStatus, NoConvergence, Postcopy, Region, SourceConfig, SourceSession, Step,
    TransportChoice, VerifyMode, X509Creds, PAGE_2M, PAGE_4K,
};

use crate::embedder::{CDirty, C};
use crate::handles::{self, Entry, Inner, Phase};
use crate::status::{fail, from_engine, RmigStatus};
use crate::types::*;

use RmigStatus::*;

/// Runs `f`, turning a panic into `RMIG_ERR_INTERNAL`.
fn guard(f: impl FnOnce() -> Result<(), RmigStatus>) -> RmigStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => RmigOk,
        Ok(Err(s)) => s,
        Err(_) => fail(
            RmigErrInternal,
            "internal error: a panic was caught at the C boundary",
        ),
    }
}

/// Borrows a `T` from a C pointer, refusing null and misaligned ones.
///
/// # Safety
/// A non-null, aligned `p` must point to a valid `T` for the returned lifetime.
unsafe fn borrow<'a, T>(p: *const T, what: &str) -> Result<&'a T, RmigStatus> {
    if p.is_null() {
        return Err(fail(RmigErrInvalidArgument, &format!("{what} is NULL")));
    }
    if !p
        .cast::<u8>()
        .align_offset(std::mem::align_of::<T>())
        .eq(&0)
    {
        return Err(fail(
            RmigErrInvalidArgument,
            &format!("{what} is misaligned"),
        ));
    }
    // SAFETY: non-null and aligned (checked); validity is the caller's contract.
    Ok(unsafe { &*p })
}

/// Writes the default configuration into `out` (address and key still to be set).
/// *Any thread*; involves no session.
///
/// # Safety
/// `out` must be NULL or point to writable memory for an `rmig_config`.
#[no_mangle]
pub unsafe extern "C" fn rmig_config_default(out: *mut RmigConfig) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract; null and alignment are checked by `borrow`.
        unsafe { borrow(out.cast_const(), "out")? };
        let d = ConvergePolicy::default();
        let c = RmigConfig {
            address: std::ptr::null(),
            key: std::ptr::null(),
            key_len: 0,
            lanes: 0,
            transport: RmigTransport::RmigTransportAuto as u32,
            downtime_limit_ms: d.downtime_limit.as_millis() as u64,
            max_bandwidth: 0,
            max_rounds: d.max_rounds,
            force_switchover: 0,
            auto_converge: 1,
            verify: RmigVerify::RmigVerifyReceived as u32,
            encryption: RmigEncryption::RmigEncryptionTlsPsk as u32,
            tls_creds: std::ptr::null(),
            tls_hostname: std::ptr::null(),
            postcopy: 0,
            postcopy_after_rounds: 0,
            rdma_cleartext_lanes: 0,
        };
        // SAFETY: checked non-null and aligned above; writable by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}

struct Parsed {
    address: String,
    key: Key,
    transport: TransportChoice,
    encryption: Encryption,
    verify: VerifyMode,
}

/// An optional UTF-8 string from C (`None` for NULL).
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
unsafe fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, RmigStatus> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; a NUL-terminated string by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) }.to_str();
    let s = s.map_err(|_| fail(RmigErrInvalidArgument, &format!("{what} is not UTF-8")))?;
    Ok(Some(s.to_string()))
}

/// The engine's encryption from `c.encryption`, `c.tls_creds` and `c.tls_hostname`.
///
/// # Safety
/// The strings of `c` are NULL or valid.
unsafe fn encryption(c: &RmigConfig) -> Result<Encryption, RmigStatus> {
    let e = RmigEncryption::try_from(c.encryption)
        .map_err(|e| fail(RmigErrInvalidArgument, &e.message("config.encryption")))?;
    // SAFETY: the caller's contract.
    let creds = unsafe { opt_str(c.tls_creds, "config.tls_creds")? };
    // SAFETY: as above.
    let hostname = unsafe { opt_str(c.tls_hostname, "config.tls_hostname")? };
    Ok(match (e, creds) {
        (RmigEncryption::RmigEncryptionOff, _) => Encryption::Off,
        (RmigEncryption::RmigEncryptionTlsPsk, _) => Encryption::Psk,
        (RmigEncryption::RmigEncryptionTlsX509, Some(dir)) => Encryption::X509(X509Creds {
            dir: dir.into(),
            hostname,
        }),
        (RmigEncryption::RmigEncryptionTlsX509, None) => {
            let why = "config.encryption is RMIG_ENCRYPTION_TLS_X509 but config.tls_creds is NULL";
            return Err(fail(RmigErrInvalidArgument, why));
        }
    })
}

/// # Safety
/// `cfg` must satisfy `borrow`'s contract, and its `address`/`key` point to valid memory.
unsafe fn parse(cfg: *const RmigConfig) -> Result<(RmigConfig, Parsed), RmigStatus> {
    // SAFETY: forwarded contract.
    let c = *unsafe { borrow(cfg, "config")? };
    if c.address.is_null() {
        return Err(fail(RmigErrInvalidArgument, "config.address is NULL"));
    }
    // SAFETY: non-null; a NUL-terminated string by the caller's contract.
    let address = unsafe { CStr::from_ptr(c.address) }
        .to_str()
        .map_err(|_| fail(RmigErrInvalidArgument, "config.address is not UTF-8"))?
        .to_string();
    let t = RmigTransport::try_from(c.transport)
        .map_err(|e| fail(RmigErrInvalidArgument, &e.message("config.transport")))?;
    // SAFETY: the caller's contract covers the config's strings.
    let encryption = unsafe { encryption(&c)? };
    let key = if c.key.is_null() || c.key_len == 0 {
        // x509 certificates authenticate both ends without a key (each session's key then
        // comes from its control connection's TLS session), as QEMU's tls-creds-x509 does.
        if !matches!(encryption, Encryption::X509(_)) {
            return Err(fail(RmigErrInvalidArgument, "config.key is NULL or empty"));
        }
        Key::per_session()
    } else {
        // SAFETY: non-null, `key_len` bytes by the caller's contract.
        let kb = unsafe { std::slice::from_raw_parts(c.key, c.key_len) };
        Key::new(kb).map_err(|e| from_engine(&e))?
    };
    let v = RmigVerify::try_from(c.verify)
        .map_err(|e| fail(RmigErrInvalidArgument, &e.message("config.verify")))?;
    let p = Parsed {
        address,
        key,
        transport: transport(t),
        encryption,
        verify: match v {
            RmigVerify::RmigVerifyOff => VerifyMode::Off,
            RmigVerify::RmigVerifyReceived => VerifyMode::Received,
            RmigVerify::RmigVerifyMemory => VerifyMode::Memory,
        },
    };
    Ok((c, p))
}

fn transport(t: RmigTransport) -> TransportChoice {
    match t {
        RmigTransport::RmigTransportTcp => TransportChoice::Tcp,
        RmigTransport::RmigTransportAuto => TransportChoice::Auto,
        RmigTransport::RmigTransportRdma => TransportChoice::Rdma,
    }
}

/// Registers a new session and writes its handle to `out`.
///
/// # Safety
/// `out` must be non-null, aligned and writable (checked by the callers with `borrow`).
unsafe fn register(
    out: *mut RmigSession,
    role: RmigRole,
    source_cfg: Option<SourceConfig>,
    cb: RmigCallbacks,
    phase: Phase,
) {
    let h = handles::insert(Entry {
        role,
        monitor: rmig_engine::Monitor::new(),
        inner: std::sync::Mutex::new(Inner {
            source_cfg,
            callbacks: C(cb),
            regions: Vec::new(),
            phase,
        }),
    });
    // SAFETY: the caller's contract.
    unsafe { out.write(h) };
}

/// Creates a source session that will migrate to `config->address`. *Any thread*; the new
/// session may then be driven from any one thread at a time.
///
/// Fails with `RMIG_ERR_INVALID_ARGUMENT` for a NULL or misaligned pointer, a NULL or non-UTF-8
/// address, an empty key (unless x509), a `config->transport` that is no `RMIG_TRANSPORT_*` value, or no
/// `dirty_sync` callback; with `RMIG_ERR_CONFIG` for a key shorter than 16 bytes.
///
/// # Safety
/// `config` must point to a valid `rmig_config` whose strings are valid; `callbacks` to a valid
/// `rmig_callbacks` (copied); `out` to writable memory for an `rmig_session`.
#[no_mangle]
pub unsafe extern "C" fn rmig_source_new(
    config: *const RmigConfig,
    callbacks: *const RmigCallbacks,
    out: *mut RmigSession,
) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract (checked for null and alignment).
        let (c, p) = unsafe { parse(config)? };
        // SAFETY: as above.
        let cb = *unsafe { borrow(callbacks, "callbacks")? };
        // SAFETY: as above.
        unsafe { borrow(out.cast_const(), "out")? };
        if cb.dirty_sync.is_none() {
            return Err(fail(
                RmigErrInvalidArgument,
                "a source needs a dirty_sync callback",
            ));
        }
        let mut s = SourceConfig::new(p.address, p.key);
        if c.lanes > 0 {
            s.lanes = c.lanes as usize;
        }
        s.transport = p.transport;
        s.encryption = p.encryption;
        s.rdma_cleartext_lanes = c.rdma_cleartext_lanes != 0;
        s.max_bandwidth = c.max_bandwidth;
        s.verify = p.verify;
        s.policy = ConvergePolicy {
            downtime_limit: Duration::from_millis(c.downtime_limit_ms),
            max_rounds: c.max_rounds.max(1),
            on_no_convergence: if c.force_switchover != 0 {
                NoConvergence::ForceSwitchover
            } else {
                NoConvergence::Fail
            },
            auto_converge: c.auto_converge != 0,
            postcopy: match (c.postcopy, c.postcopy_after_rounds) {
                (_, n) if n > 0 => Postcopy::AfterRounds(n),
                (0, _) => Postcopy::Off,
                _ => Postcopy::WhenStalled,
            },
            ..Default::default()
        };
        // SAFETY: `out` was checked above.
        unsafe { register(out, RmigRole::RmigSource, Some(s), cb, Phase::New(None)) };
        Ok(())
    })
}

/// Creates a destination session listening on `config->address` now (before any source
/// connects, like a VMM started with `-incoming`). *Any thread*; checks `config` as
/// `rmig_source_new` does.
///
/// # Safety
/// As `rmig_source_new`.
#[no_mangle]
pub unsafe extern "C" fn rmig_dest_new(
    config: *const RmigConfig,
    callbacks: *const RmigCallbacks,
    out: *mut RmigSession,
) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, p) = unsafe { parse(config)? };
        // SAFETY: as above.
        let cb = *unsafe { borrow(callbacks, "callbacks")? };
        // SAFETY: as above.
        unsafe { borrow(out.cast_const(), "out")? };
        let mut d = DestConfig::new(p.key);
        d.transport = p.transport;
        d.encryption = p.encryption;
        d.rdma_cleartext_lanes = c.rdma_cleartext_lanes != 0;
        let l = DestListener::bind(&p.address, d).map_err(|e| from_engine(&e))?;
        // SAFETY: `out` was checked above.
        unsafe {
            register(
                out,
                RmigRole::RmigDestination,
                None,
                cb,
                Phase::New(Some(Box::new(l))),
            )
        };
        Ok(())
    })
}

/// The port a destination listens on. *Driving* call: before `rmig_migrate` (while that runs
/// it fails with `RMIG_ERR_STATE`).
///
/// # Safety
/// `port` must point to writable memory for a `uint16_t`.
#[no_mangle]
pub unsafe extern "C" fn rmig_dest_port(session: RmigSession, port: *mut u16) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        unsafe { borrow(port.cast_const(), "port")? };
        let e = handles::get(session)?;
        let g = e.lock()?;
        match &g.phase {
            Phase::New(Some(l)) => {
                let p = l.local_addr().map_err(|e| from_engine(&e))?.port();
                // SAFETY: checked above.
                unsafe { port.write(p) };
                Ok(())
            }
            _ => Err(fail(
                RmigErrState,
                "not a destination waiting for its source",
            )),
        }
    })
}

/// Adds a region of guest memory: `len` bytes at `host` (4 KiB aligned), `page_size` 4096 or
/// 2097152, guest physical address `gpa` (`UINT64_MAX` for none), a name (copied). Regions go in
/// table order; both ends must add the same table. Only before the migration starts.
/// The memory stays the caller's and must stay mapped until `rmig_free` returns.
/// *Driving* call: must not overlap another driving call on the session.
///
/// # Safety
/// `host..host+len` must be mapped memory of the caller; `name` NULL or a valid C string.
#[no_mangle]
pub unsafe extern "C" fn rmig_add_region(
    session: RmigSession,
    id: u32,
    name: *const c_char,
    host: *mut u8,
    len: u64,
    gpa: u64,
    page_size: u64,
) -> RmigStatus {
    guard(|| {
        let e = handles::get(session)?;
        let mut g = e.lock()?;
        if !matches!(g.phase, Phase::New(_)) {
            return Err(fail(
                RmigErrState,
                "regions can only be added before the migration starts",
            ));
        }
        if host.is_null() || len == 0 {
            return Err(fail(RmigErrInvalidArgument, "host is NULL or len is 0"));
        }
        if page_size != PAGE_4K && page_size != PAGE_2M {
            return Err(fail(
                RmigErrInvalidArgument,
                "page_size must be 4096 or 2097152",
            ));
        }
        if !(host as usize).is_multiple_of(PAGE_4K as usize) || !len.is_multiple_of(page_size) {
            return Err(fail(
                RmigErrInvalidArgument,
                "host must be 4 KiB aligned and len a multiple of page_size",
            ));
        }
        let name = if name.is_null() {
            format!("region{id}")
        } else {
            // SAFETY: non-null C string by the caller's contract.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        // SAFETY: the caller keeps the memory mapped until rmig_free (documented contract).
        let mut r =
            unsafe { Region::new(id, name, host, len, page_size) }.map_err(|e| from_engine(&e))?;
        if gpa != u64::MAX {
            r = r.with_gpa(gpa);
        }
        let mut all = g.regions.clone();
        all.push(r);
        rmig_engine::region::validate(&all).map_err(|e| from_engine(&e))?;
        g.regions = all;
        Ok(())
    })
}

fn run_source_step(
    g: &mut Inner,
    e: &Entry,
    step: impl FnOnce(&mut SourceSession) -> Result<Option<Step>, rmig_engine::EngineError>,
) -> Result<Option<Step>, RmigStatus> {
    if let Phase::New(_) = g.phase {
        let cfg = g.source_cfg.clone().expect("source");
        if g.regions.is_empty() {
            return Err(fail(RmigErrState, "add regions before starting"));
        }
        let s = SourceSession::setup(
            cfg,
            g.regions.clone(),
            Box::new(CDirty {
                c: g.callbacks,
                buf: Vec::new(),
            }),
            Box::new(g.callbacks),
            e.monitor.clone(),
        )
        .map_err(|err| {
            g.phase = Phase::Ended;
            from_engine(&err)
        })?;
        g.phase = Phase::Running(Box::new(s));
    }
    let s = match &mut g.phase {
        Phase::Running(s) => s,
        Phase::Unsettled(_) => return Err(unsettled()),
        _ => return Err(fail(RmigErrState, "the migration has ended")),
    };
    match step(s) {
        Ok(r) => Ok(r),
        Err(err) => {
            let was = std::mem::replace(&mut g.phase, Phase::Ended);
            // Past `Commit` the engine session stays, for `rmig_resolve_handover`.
            if let (EngineError::HandoverUnknown(_), Phase::Running(s)) = (&err, was) {
                g.phase = Phase::Unsettled(Some(s));
            }
            Err(from_engine(&err))
        }
    }
}

/// The error of a driving call made while a handover waits for the operator's decision.
fn unsettled() -> RmigStatus {
    fail(
        RmigErrState,
        "the handover's outcome is unknown: decide which end runs the guest with \
         rmig_resolve_handover",
    )
}

fn source_entry(session: RmigSession) -> Result<handles::Call, RmigStatus> {
    let e = handles::get(session)?;
    if e.role != RmigRole::RmigSource {
        return Err(fail(RmigErrState, "this call is for a source session"));
    }
    Ok(e)
}

/// Source step 1 (QEMU's `save_live_setup`): connect, authenticate, agree on regions and
/// transport, open the lanes. *Driving* call: must not overlap another driving call on the
/// session. Blocks; it looks for `rmig_cancel` or `rmig_free` from another thread once only,
/// after the connection and handshake (each bounded by a 10 s timeout); a cancel that comes
/// later (while lanes open) ends the next step instead.
#[no_mangle]
pub extern "C" fn rmig_setup(session: RmigSession) -> RmigStatus {
    guard(|| {
        let e = source_entry(session)?;
        let mut g = e.lock()?;
        if !matches!(g.phase, Phase::New(_)) {
            return Err(fail(RmigErrState, "setup was already called"));
        }
        run_source_step(&mut g, &e, |_| Ok(None)).map(|_| ())
    })
}

/// Source step 2 (QEMU's `save_live_iterate`): one pre-copy round. `*ready` becomes 1 when the
/// convergence policy says to switch over (call `rmig_complete`), else 0. *Driving* call:
/// must not overlap another driving call on the session. Blocks for the round;
/// `rmig_cancel` or `rmig_free` from another thread ends the sending within about 50 ms
/// (`RMIG_ERR_CANCELLED`), though not a `dirty_sync` callback in progress.
///
/// # Safety
/// `ready` must point to writable memory for an `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn rmig_iterate(session: RmigSession, ready: *mut i32) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        unsafe { borrow(ready.cast_const(), "ready")? };
        let e = source_entry(session)?;
        let mut g = e.lock()?;
        if matches!(g.phase, Phase::New(_)) {
            return Err(fail(RmigErrState, "call rmig_setup first"));
        }
        let r = run_source_step(&mut g, &e, |s| s.iterate().map(Some))?;
        // SAFETY: checked above.
        unsafe { ready.write((r == Some(Step::ReadyForSwitchover)) as i32) };
        Ok(())
    })
}

/// Source step 3 (QEMU's `save_live_complete_precopy`): pause (callback), final copy, device
/// state, verification, then the handover: the destination says `Ready` (its guest loaded and
/// still paused), the source sends `Commit`, the destination starts its guest and answers
/// `Done`. *Driving* call: must not overlap another driving call on the session. Blocks;
/// `rmig_cancel` or `rmig_free` from another thread ends the final copy, but not a callback
/// in progress, nor the wait for the destination's last answers (up to twice the peer
/// timeout, 10 s).
///
/// A failure before `Commit` calls `resume` (the guest is the source's again). A link that
/// fails after `Commit` returns `RMIG_ERR_HANDOVER_UNKNOWN`: the destination may be running
/// the guest, so `resume` is not called and the guest stays paused until
/// `rmig_resolve_handover`.
#[no_mangle]
pub extern "C" fn rmig_complete(session: RmigSession) -> RmigStatus {
    guard(|| {
        let e = source_entry(session)?;
        let mut g = e.lock()?;
        if matches!(g.phase, Phase::New(_)) {
            return Err(fail(RmigErrState, "call rmig_setup first"));
        }
        run_source_step(&mut g, &e, |s| s.complete().map(|_| None))?;
        g.phase = Phase::Ended;
        Ok(())
    })
}

/// Runs a whole migration and returns when it ended: on a source, setup, every round and the
/// completion (as `rmig_complete`); on a destination, waiting for the source, receiving
/// everything, `load_device_state`, `Ready`, and on the source's `Commit` `resume` and
/// `Done`. *Driving* call: must not overlap another driving call on the session. Blocks;
/// `rmig_cancel` or `rmig_free` from another thread ends it (on a source, see the steps for
/// the limits; a destination notices within about 100 ms while it waits for its source or
/// receives, but only after its handshake and lane setup, each bounded by 10 s, and not
/// inside a callback).
///
/// `RMIG_ERR_HANDOVER_UNKNOWN`: the link failed after `Commit` was sent (source) or after
/// `Ready` was (destination); this end's guest stays paused until `rmig_resolve_handover`.
#[no_mangle]
pub extern "C" fn rmig_migrate(session: RmigSession) -> RmigStatus {
    guard(|| {
        let e = handles::get(session)?;
        let mut g = e.lock()?;
        match e.role {
            RmigRole::RmigSource => {
                run_source_step(&mut g, &e, |s| {
                    while s.iterate()? == Step::Continue {}
                    s.complete().map(|_| None)
                })?;
                g.phase = Phase::Ended;
                Ok(())
            }
            RmigRole::RmigDestination => {
                let l = match &mut g.phase {
                    Phase::New(l) => l,
                    Phase::Unsettled(_) => return Err(unsettled()),
                    _ => return Err(fail(RmigErrState, "the migration has ended")),
                };
                let l = l.take().expect("destinations start with a listener");
                if g.regions.is_empty() {
                    g.phase = Phase::New(Some(l));
                    return Err(fail(RmigErrState, "add regions before starting"));
                }
                let regions = g.regions.clone();
                g.phase = Phase::Ended;
                match l.serve(regions, Box::new(g.callbacks), e.monitor.clone()) {
                    Ok(_) => Ok(()),
                    Err(err) => {
                        if let EngineError::HandoverUnknown(_) = err {
                            g.phase = Phase::Unsettled(None);
                        }
                        Err(from_engine(&err))
                    }
                }
            }
        }
    })
}

/// Settles a handover whose outcome is unknown: after `RMIG_ERR_HANDOVER_UNKNOWN`, while
/// `rmig_stats.state` is `RMIG_STATE_HANDOVER_UNKNOWN`. The control link failed after the
/// destination said `Ready` (destination) or after the source sent `Commit` (source), so this
/// end cannot know whether the other end runs the guest; its own guest stays paused until
/// this call, and the library never decides on its own.
///
/// Before deciding, learn the other end's state from its VMM (not from this end's library),
/// and never let both ends run the guest:
///  - the other end runs the guest (a destination in `RMIG_STATE_COMPLETED`, or whose guest
///    is running): `RMIG_HANDOVER_RUN_THERE` here;
///  - the other end does not run it and never will (a source that failed before `Commit` and
///    resumed, a destination in `RMIG_STATE_FAILED` or `RMIG_STATE_CANCELLED`, or one that
///    is itself in `RMIG_STATE_HANDOVER_UNKNOWN` and is told `RMIG_HANDOVER_RUN_THERE`
///    first): `RMIG_HANDOVER_RUN_HERE` here;
///  - the other end cannot be reached: `RMIG_HANDOVER_RUN_HERE` only once its VMM is known
///    stopped (killed, fenced); until then, wait.
///
/// `decision` is one of the `RMIG_HANDOVER_*` values of `rmig_handover`:
///  - `RMIG_HANDOVER_RUN_HERE`: calls this session's `resume` callback (if set), on the
///    calling thread, before returning; the state becomes `RMIG_STATE_FAILED` on a source (the
///    guest stayed here) and `RMIG_STATE_COMPLETED` on a destination;
///  - `RMIG_HANDOVER_RUN_THERE`: calls nothing; this end's copy of the guest stays paused for
///    good (discard it); the state becomes `RMIG_STATE_COMPLETED` on a source and
///    `RMIG_STATE_FAILED` on a destination.
///
/// Fails with `RMIG_ERR_INVALID_ARGUMENT` for any other `decision` (0 included), and with
/// `RMIG_ERR_STATE` when the session's state is not `RMIG_STATE_HANDOVER_UNKNOWN` (a decision
/// is final: a second call fails too) or another driving call is running on the session.
///
/// *Driving* call: must not overlap another driving call on the session; it may come from any
/// thread once the call that returned `RMIG_ERR_HANDOVER_UNKNOWN` has returned (e.g. the
/// monitor thread), but not from inside one of the session's callbacks. `rmig_free` without
/// this call leaves the guest paused and calls no callback.
#[no_mangle]
pub extern "C" fn rmig_resolve_handover(session: RmigSession, decision: u32) -> RmigStatus {
    guard(|| {
        let e = handles::get(session)?;
        let run_here = match RmigHandover::try_from(decision)
            .map_err(|x| fail(RmigErrInvalidArgument, &x.message("decision")))?
        {
            RmigHandover::RmigHandoverRunHere => true,
            RmigHandover::RmigHandoverRunThere => false,
        };
        let mut g = e.lock()?;
        let status = e.monitor.stats().status;
        if status != MigrationStatus::HandoverUnknown {
            return Err(fail(
                RmigErrState,
                &format!(
                    "rmig_resolve_handover is only for a handover whose outcome is unknown \
                     (RMIG_STATE_HANDOVER_UNKNOWN); this session's state is {status}"
                ),
            ));
        }
        match (e.role, std::mem::replace(&mut g.phase, Phase::Ended)) {
            (RmigRole::RmigSource, Phase::Unsettled(Some(mut s))) => {
                // Resumes through the embedder (our `resume` callback) when `run_here`.
                s.resolve_handover(run_here).map(|_| ()).map_err(|err| {
                    g.phase = Phase::Unsettled(Some(s));
                    from_engine(&err)
                })
            }
            (RmigRole::RmigDestination, Phase::Unsettled(None)) => {
                // `serve` has consumed its embedder: the C callbacks are resumed from here.
                let (status, note) = if run_here {
                    if let Err(m) = DestEmbedder::resume(&mut g.callbacks) {
                        g.phase = Phase::Unsettled(None);
                        return Err(fail(RmigErrEmbedder, &m));
                    }
                    (
                        MigrationStatus::Completed,
                        "the operator resumed the guest on the destination after an unknown \
                         handover",
                    )
                } else {
                    (
                        MigrationStatus::Failed,
                        "the operator gave the guest to the source after an unknown handover",
                    )
                };
                if e.monitor.settle_handover(status, note) {
                    Ok(())
                } else {
                    Err(fail(
                        RmigErrInternal,
                        "the handover-unknown status changed while the session was locked",
                    ))
                }
            }
            (_, phase) => {
                g.phase = phase;
                Err(fail(
                    RmigErrInternal,
                    "the session is handover-unknown but holds no handover to resolve",
                ))
            }
        }
    })
}

/// Cancels the migration; the call driving it returns `RMIG_ERR_CANCELLED` and the peer is
/// told `reason` (NULL: "cancelled"). *Any thread*, also while another thread is inside a
/// call on the session; returns at once, without waiting for that call to end.
///
/// # Safety
/// `reason` must be NULL or a valid C string.
#[no_mangle]
pub unsafe extern "C" fn rmig_cancel(session: RmigSession, reason: *const c_char) -> RmigStatus {
    guard(|| {
        let e = handles::get(session)?;
        let r = if reason.is_null() {
            "cancelled".to_string()
        } else {
            // SAFETY: non-null C string by the caller's contract.
            unsafe { CStr::from_ptr(reason) }
                .to_string_lossy()
                .into_owned()
        };
        e.monitor.cancel(&r);
        Ok(())
    })
}

/// Changes the bandwidth ceiling (bytes/s, 0 unlimited), also mid-migration. *Any thread*,
/// also while another thread is inside a call on the session.
#[no_mangle]
pub extern "C" fn rmig_set_max_bandwidth(session: RmigSession, bytes_per_sec: u64) -> RmigStatus {
    guard(|| {
        handles::get(session)?
            .monitor
            .set_max_bandwidth(bytes_per_sec);
        Ok(())
    })
}

/// Source: changes the downtime limit (milliseconds) mid-migration, as QEMU's
/// `downtime-limit` set while migrating: the convergence decision after the round in progress
/// uses it. *Any thread*, also while another thread is inside a call on the session.
#[no_mangle]
pub extern "C" fn rmig_set_downtime_limit(session: RmigSession, ms: u64) -> RmigStatus {
    guard(|| {
        handles::get(session)?
            .monitor
            .set_downtime_limit(Duration::from_millis(ms));
        Ok(())
    })
}

/// Source: switches to post-copy once the current round ends (QEMU's
/// `migrate-start-postcopy`), if the session was configured with `postcopy` and runs over
/// TCP lanes with a destination that speaks post-copy; otherwise the request is ignored.
/// *Any thread*, also while another thread is inside a call on the session.
#[no_mangle]
pub extern "C" fn rmig_start_postcopy(session: RmigSession) -> RmigStatus {
    guard(|| {
        handles::get(session)?.monitor.start_postcopy();
        Ok(())
    })
}

/// Fills `out` with the statistics as they stand. *Any thread*, any time, also while another
/// thread is inside a call on the session (or from one of its callbacks).
///
/// # Safety
/// `out` must point to writable memory for an `rmig_stats`.
#[no_mangle]
pub unsafe extern "C" fn rmig_get_stats(session: RmigSession, out: *mut RmigStats) -> RmigStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        unsafe { borrow(out.cast_const(), "out")? };
        let e = handles::get(session)?;
        let s = e.monitor.stats();
        let state = match s.status {
            MigrationStatus::Setup if s.total_time_ms == 0.0 && s.setup_time_ms == 0.0 => {
                RmigState::RmigStateNew
            }
            MigrationStatus::Setup => RmigState::RmigStateSetup,
            MigrationStatus::Active => RmigState::RmigStateActive,
            MigrationStatus::Device => RmigState::RmigStateDevice,
            MigrationStatus::Completed => RmigState::RmigStateCompleted,
            MigrationStatus::Cancelled => RmigState::RmigStateCancelled,
            MigrationStatus::Failed => RmigState::RmigStateFailed,
            MigrationStatus::HandoverUnknown => RmigState::RmigStateHandoverUnknown,
            MigrationStatus::Postcopy => RmigState::RmigStatePostcopy,
            MigrationStatus::GuestLost => RmigState::RmigStateGuestLost,
        };
        let pc = s.postcopy.clone();
        let st = RmigStats {
            state,
            verified: s.verified.map_or(-1, i32::from),
            lanes: s.lanes as u32,
            rounds: s.rounds.len() as u32,
            total_time_ms: s.total_time_ms,
            setup_time_ms: s.setup_time_ms,
            downtime_ms: s.downtime_ms,
            expected_downtime_ms: s.expected_downtime_ms,
            mbps: s.ram.mbps,
            ram_total: s.ram.total,
            ram_transferred: s.ram.transferred,
            ram_remaining: s.ram.remaining,
            ram_duplicate: s.ram.duplicate,
            ram_normal: s.ram.normal,
            ram_normal_bytes: s.ram.normal_bytes,
            dirty_sync_count: s.ram.dirty_sync_count,
            encryption: match s.encryption.as_str() {
                "tls-x509" => RmigEncryption::RmigEncryptionTlsX509,
                "off" => RmigEncryption::RmigEncryptionOff,
                _ => RmigEncryption::RmigEncryptionTlsPsk,
            } as u32,
            postcopy: u32::from(pc.is_some()),
            postcopy_ms: pc.as_ref().map_or(0.0, |p| p.duration_ms),
            postcopy_pages_at_switch: pc.as_ref().map_or(0, |p| p.pages_at_switch),
            postcopy_pages_on_fault: pc.as_ref().map_or(0, |p| p.pages_on_fault),
            postcopy_pages_background: pc.as_ref().map_or(0, |p| p.pages_background),
            postcopy_fault_p50_us: pc.as_ref().map_or(0.0, |p| p.fault_p50_us),
            postcopy_fault_p99_us: pc.as_ref().map_or(0.0, |p| p.fault_p99_us),
            postcopy_fault_max_us: pc.as_ref().map_or(0.0, |p| p.fault_max_us),
            data_lanes_encrypted: u32::from(s.data_lanes_encrypted),
            transport: match s.transport.as_str() {
                "rdma" => RmigTransport::RmigTransportRdma as u32,
                "tcp" => RmigTransport::RmigTransportTcp as u32,
                _ => 0,
            },
        };
        // SAFETY: checked above.
        unsafe { out.write(st) };
        Ok(())
    })
}

/// Writes the statistics as one JSON object (NUL-terminated) into `buf` of `len` bytes.
/// `*needed` (if not NULL) receives the size required, NUL included; a `buf` too small gives
/// `RMIG_ERR_BUFFER_TOO_SMALL` and writes nothing. *Any thread*, any time, as
/// `rmig_get_stats`.
///
/// # Safety
/// `buf` must be NULL (with `len` 0) or writable for `len` bytes; `needed` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn rmig_stats_json(
    session: RmigSession,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> RmigStatus {
    guard(|| {
        let e = handles::get(session)?;
        let j = serde_json::to_string(&e.monitor.stats())
            .map_err(|x| fail(RmigErrInternal, &x.to_string()))?;
        let n = j.len() + 1;
        if !needed.is_null() {
            // SAFETY: checked for null; alignment of usize by `borrow`.
            unsafe { borrow(needed.cast_const(), "needed")? };
            // SAFETY: as above.
            unsafe { needed.write(n) };
        }
        if buf.is_null() || len < n {
            return Err(fail(
                RmigErrBufferTooSmall,
                &format!("the JSON needs {n} bytes"),
            ));
        }
        // SAFETY: `buf` is writable for `len >= n` bytes by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(j.as_ptr(), buf.cast::<u8>(), j.len());
            buf.add(j.len()).write(0);
        }
        Ok(())
    })
}

/// Appends `len` bytes at `data` to `out`: only inside `save_device_state`, on the thread that
/// called it, with the `out` it was given.
///
/// # Safety
/// `out` must be the pointer handed to the callback; `data` readable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn rmig_bytes_append(
    out: *mut RmigBytes,
    data: *const u8,
    len: usize,
) -> RmigStatus {
    guard(|| {
        if out.is_null() || (data.is_null() && len > 0) {
            return Err(fail(RmigErrInvalidArgument, "out or data is NULL"));
        }
        if len > 0 {
            // SAFETY: the caller's contract.
            let d = unsafe { std::slice::from_raw_parts(data, len) };
            // SAFETY: `out` is the library's own buffer handed to the callback.
            unsafe { (*out).data.extend_from_slice(d) };
        }
        Ok(())
    })
}

/// Frees a session. *Any thread*, also while other threads are inside calls on it:
///  1. the handle is invalid at once: calls that start on it from now on return
///     `RMIG_ERR_INVALID_HANDLE`;
///  2. the migration is cancelled (as by `rmig_cancel`; the peer is told), so that a call
///     blocked on it (`rmig_migrate`, `rmig_setup`, `rmig_iterate`, `rmig_complete`) ends;
///  3. it waits until every call that was already running on the session has returned, then
///     releases the session and returns. After that, the library no longer touches the
///     session's regions or calls its callbacks.
///
/// The wait in 3 has no time limit: it lasts as long as those calls take to return once
/// cancelled. That is normally within about 100 ms, but a call inside an embedder callback
/// first waits for the callback to return, and an end still connecting, handshaking or
/// joining lanes notices the cancel only once that is through (each part bounded by the
/// handshake timeout, 10 s); see each driving call.
///
/// Freeing twice, or a handle that never existed, returns `RMIG_ERR_INVALID_HANDLE`.
/// Calling it from inside a callback of the same session returns `RMIG_ERR_STATE` and frees
/// nothing (it would wait for itself).
#[no_mangle]
pub extern "C" fn rmig_free(session: RmigSession) -> RmigStatus {
    guard(|| handles::free(session, "the session was freed (rmig_free)"))
}
