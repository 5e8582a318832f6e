//! The C ABI called as C would: bad input gets an error code and a message, never undefined
//! behaviour; a whole migration works through it.

use std::ffi::{c_void, CStr};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use rmig::*;
use RmigStatus::*;

const KEY: &[u8] = b"abi test key, 32 bytes long.....";

/// A watchdog for one test (as `rmig_tests::Deadline`, which this crate cannot depend on):
/// if it is still alive after its time, it names the test and aborts the test process, so a
/// hang fails instead of stalling CI. Dropping it disarms it.
struct Deadline(Option<std::sync::mpsc::Sender<()>>);

impl Deadline {
    fn secs(secs: u64) -> Deadline {
        let name = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Duration::from_secs(secs))
            {
                eprintln!("{name}: still running after its deadline of {secs} s; aborting");
                std::process::abort();
            }
        });
        Deadline(Some(tx))
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

fn last_error() -> String {
    // SAFETY: rmig_last_error returns a valid NUL-terminated string owned by the library.
    unsafe { CStr::from_ptr(rmig_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn config(addr: &CStr) -> RmigConfig {
    let mut c = std::mem::MaybeUninit::<RmigConfig>::uninit();
    // SAFETY: a valid, aligned out pointer.
    assert_eq!(unsafe { rmig_config_default(c.as_mut_ptr()) }, RmigOk);
    // SAFETY: initialised by rmig_config_default.
    let mut c = unsafe { c.assume_init() };
    c.address = addr.as_ptr();
    c.key = KEY.as_ptr();
    c.key_len = KEY.len();
    c.lanes = 2;
    c
}

unsafe extern "C" fn no_dirt(_: *mut c_void, _: u32, _: *mut u64, _: usize) -> i32 {
    0
}

fn callbacks() -> RmigCallbacks {
    RmigCallbacks {
        opaque: null_mut(),
        dirty_sync: Some(no_dirt),
        pause: None,
        resume: None,
        throttle: None,
        save_device_state: None,
        load_device_state: None,
        dirty_sync_begin: None,
    }
}

fn source(addr: &CStr) -> RmigSession {
    let mut s = 0;
    // SAFETY: valid pointers to live values.
    let r = unsafe { rmig_source_new(&config(addr), &callbacks(), &mut s) };
    assert_eq!(r, RmigOk);
    s
}

/// Runs `f` on a thread of its own; its result arrives on the returned channel.
fn spawn_call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// The result of a call started with `spawn_call`, or a failure after `secs` seconds.
fn within<T>(rx: &Receiver<T>, secs: u64, what: &str) -> T {
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("{what} did not return within {secs} s ({e})"))
}

/// Polls `cond` until it holds, or fails after `secs` seconds.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stats(s: RmigSession) -> Result<RmigStats, RmigStatus> {
    let mut st = std::mem::MaybeUninit::<RmigStats>::uninit();
    // SAFETY: a valid out pointer.
    match unsafe { rmig_get_stats(s, st.as_mut_ptr()) } {
        // SAFETY: written by rmig_get_stats.
        RmigOk => Ok(unsafe { st.assume_init() }),
        e => Err(e),
    }
}

/// A destination listening on an ephemeral port, receiving into `len` bytes at `p`; returns
/// the session and the address a source reaches it on.
fn dest_session(cb: &RmigCallbacks, p: *mut u8, len: usize) -> (RmigSession, std::ffi::CString) {
    let mut d = 0;
    let mut port = 0u16;
    // SAFETY: valid pointers; the memory outlives the session (the callers free it first).
    unsafe {
        assert_eq!(rmig_dest_new(&config(c"127.0.0.1:0"), cb, &mut d), RmigOk);
        assert_eq!(rmig_dest_port(d, &mut port), RmigOk);
        assert_eq!(
            rmig_add_region(d, 0, null(), p, len as u64, u64::MAX, 4096),
            RmigOk
        );
    }
    let addr = std::ffi::CString::new(format!("127.0.0.1:{port}")).unwrap();
    (d, addr)
}

/// A source of `len` bytes at `p` configured by `c`.
fn source_session(c: &RmigConfig, p: *mut u8, len: usize) -> RmigSession {
    let mut s = 0;
    // SAFETY: valid pointers; the memory outlives the session (the callers free it first).
    unsafe {
        assert_eq!(rmig_source_new(c, &callbacks(), &mut s), RmigOk);
        assert_eq!(
            rmig_add_region(s, 0, null(), p, len as u64, u64::MAX, 4096),
            RmigOk
        );
    }
    s
}

fn mem(len: usize) -> Vec<u64> {
    // Page alignment: over-allocate and let callers use an aligned offset.
    vec![0u64; len / 8 + 512]
}

fn aligned(v: &mut [u64]) -> *mut u8 {
    let p = v.as_mut_ptr().cast::<u8>();
    // SAFETY: the offset stays inside the vector (512 spare words).
    unsafe { p.add(p.align_offset(4096)) }
}

#[test]
fn null_and_misaligned_pointers_are_refused() {
    let _deadline = Deadline::secs(120);
    let addr = c"127.0.0.1:1";
    let mut s = 0;
    // SAFETY: the library must check these pointers itself.
    unsafe {
        assert_eq!(
            rmig_source_new(null(), &callbacks(), &mut s),
            RmigErrInvalidArgument
        );
        assert!(last_error().contains("config is NULL"));
        assert_eq!(
            rmig_source_new(&config(addr), null(), &mut s),
            RmigErrInvalidArgument
        );
        assert_eq!(
            rmig_source_new(&config(addr), &callbacks(), null_mut()),
            RmigErrInvalidArgument
        );
        let mut words = [0u64; 2];
        let odd = words.as_mut_ptr().cast::<u8>().add(1).cast::<u64>();
        assert_eq!(
            rmig_source_new(&config(addr), &callbacks(), odd),
            RmigErrInvalidArgument
        );
        assert!(last_error().contains("misaligned"));
        assert_eq!(rmig_config_default(null_mut()), RmigErrInvalidArgument);
        let mut c = config(addr);
        c.key_len = 0;
        assert_eq!(
            rmig_source_new(&c, &callbacks(), &mut s),
            RmigErrInvalidArgument
        );
        let mut cb = callbacks();
        cb.dirty_sync = None;
        assert_eq!(
            rmig_source_new(&config(addr), &cb, &mut s),
            RmigErrInvalidArgument
        );
        assert!(last_error().contains("dirty_sync"));
    }
}

#[test]
fn short_keys_are_refused() {
    let _deadline = Deadline::secs(120);
    let key = b"fifteen bytes!!";
    assert_eq!(key.len(), 15);
    let mut c = config(c"127.0.0.1:1");
    c.key = key.as_ptr();
    c.key_len = key.len();
    let mut s = 0;
    // SAFETY: valid pointers; the key's length is the library's to check.
    let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
    assert_eq!(r, RmigErrConfig);
    assert!(last_error().contains("at least 16"), "{}", last_error());
    let mut c = config(c"127.0.0.1:0");
    c.key = key.as_ptr();
    c.key_len = key.len();
    // SAFETY: as above.
    let r = unsafe { rmig_dest_new(&c, &callbacks(), &mut s) };
    assert_eq!(r, RmigErrConfig);
    assert!(last_error().contains("at least 16"), "{}", last_error());
}

/// No key: refused unless x509 certificates authenticate both ends (then each session's key
/// comes from its control connection's TLS session).
#[test]
fn a_null_key_is_accepted_with_x509_only() {
    let _deadline = Deadline::secs(120);
    let mut s = 0;
    let mut c = config(c"127.0.0.1:0");
    c.key = null();
    c.key_len = 0;
    // SAFETY: valid pointers; a NULL key is the library's to judge.
    let r = unsafe { rmig_dest_new(&c, &callbacks(), &mut s) };
    assert_eq!(r, RmigErrInvalidArgument, "PSK mode without a key");
    c.encryption = RmigEncryption::RmigEncryptionTlsX509 as u32;
    c.tls_creds = c"/nonexistent/rmig-creds".as_ptr();
    // SAFETY: as above; the credentials are read when the session starts.
    let r = unsafe { rmig_dest_new(&c, &callbacks(), &mut s) };
    assert_eq!(r, RmigOk, "{}", last_error());
    assert_eq!(rmig_free(s), RmigOk);
    c.address = c"127.0.0.1:1".as_ptr();
    // SAFETY: as above.
    let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
    assert_eq!(r, RmigOk, "{}", last_error());
    assert_eq!(rmig_free(s), RmigOk);
}

#[test]
fn bad_regions_are_refused() {
    let _deadline = Deadline::secs(120);
    let s = source(c"127.0.0.1:1");
    let mut v = mem(1 << 20);
    let p = aligned(&mut v);
    // SAFETY: the memory is live; the library must reject the bad arguments itself.
    unsafe {
        assert_eq!(
            rmig_add_region(s, 0, null(), null_mut(), 4096, u64::MAX, 4096),
            RmigErrInvalidArgument
        );
        assert_eq!(
            rmig_add_region(s, 0, null(), p, 0, u64::MAX, 4096),
            RmigErrInvalidArgument
        );
        assert_eq!(
            rmig_add_region(s, 0, null(), p.add(8), 4096, u64::MAX, 4096),
            RmigErrInvalidArgument
        );
        assert_eq!(
            rmig_add_region(s, 0, null(), p, 4096, u64::MAX, 8192),
            RmigErrInvalidArgument
        );
        assert_eq!(
            rmig_add_region(s, 0, c"a".as_ptr(), p, 65536, u64::MAX, 4096),
            RmigOk
        );
        assert_eq!(
            rmig_add_region(s, 1, c"b".as_ptr(), p.add(32768), 65536, u64::MAX, 4096),
            RmigErrConfig
        );
        assert!(last_error().contains("overlap"), "{}", last_error());
        assert_eq!(
            rmig_add_region(s, 0, c"c".as_ptr(), p.add(65536), 65536, u64::MAX, 4096),
            RmigErrConfig
        );
        assert!(last_error().contains("duplicate"));
    }
    assert_eq!(rmig_free(s), RmigOk);
}

#[test]
fn calls_in_the_wrong_order_and_double_free() {
    let _deadline = Deadline::secs(120);
    let s = source(c"127.0.0.1:1");
    let mut ready = 0;
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { rmig_iterate(s, &mut ready) }, RmigErrState);
    assert_eq!(rmig_complete(s), RmigErrState);
    assert_eq!(rmig_setup(s), RmigErrState, "no regions yet");
    assert!(last_error().contains("add regions"));
    let mut port = 0u16;
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { rmig_dest_port(s, &mut port) }, RmigErrState);
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(s), RmigErrInvalidHandle);
    assert_eq!(rmig_setup(s), RmigErrInvalidHandle);
    assert_eq!(rmig_free(0), RmigErrInvalidHandle);
    assert_eq!(rmig_set_max_bandwidth(0xdead_beef, 1), RmigErrInvalidHandle);
}

#[test]
fn unreachable_destination_fails_setup_cleanly() {
    let _deadline = Deadline::secs(120);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = std::ffi::CString::new(format!("127.0.0.1:{port}")).unwrap();
    let s = source(&addr);
    let mut v = mem(1 << 20);
    // SAFETY: the memory outlives the session.
    let r = unsafe { rmig_add_region(s, 0, null(), aligned(&mut v), 1 << 20, 0, 4096) };
    assert_eq!(r, RmigOk);
    assert_eq!(rmig_setup(s), RmigErrIo);
    assert!(last_error().contains("connecting"), "{}", last_error());
    assert_eq!(rmig_free(s), RmigOk);
}

static DEVICE_LOADED: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn load_dev(_: *mut c_void, data: *const u8, len: usize) -> i32 {
    // SAFETY: the library hands `len` readable bytes.
    let d = unsafe { std::slice::from_raw_parts(data, len) };
    if d == b"state" {
        DEVICE_LOADED.fetch_add(1, Ordering::Relaxed);
    }
    0
}

unsafe extern "C" fn save_dev(_: *mut c_void, out: *mut RmigBytes) -> i32 {
    // SAFETY: `out` is the library's buffer for this call.
    unsafe { rmig_bytes_append(out, b"state".as_ptr(), 5) as i32 }
}

#[test]
fn a_whole_migration_through_the_abi() {
    let _deadline = Deadline::secs(120);
    let len = 8 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let sp = aligned(&mut sv);
    let dp = aligned(&mut dv);
    for i in 0..len / 8 {
        // SAFETY: inside the aligned buffer.
        unsafe {
            sp.cast::<u64>()
                .add(i)
                .write((i as u64).wrapping_mul(0x9e37_79b9))
        };
    }
    let mut d = 0;
    let mut cb = callbacks();
    cb.load_device_state = Some(load_dev);
    // SAFETY: valid pointers.
    let r = unsafe { rmig_dest_new(&config(c"127.0.0.1:0"), &cb, &mut d) };
    assert_eq!(r, RmigOk);
    let mut port = 0u16;
    // SAFETY: valid pointers; the memory outlives the session.
    unsafe {
        assert_eq!(rmig_dest_port(d, &mut port), RmigOk);
        assert_eq!(
            rmig_add_region(d, 7, c"ram".as_ptr(), dp, len as u64, 0, 4096),
            RmigOk
        );
    }
    let dt = spawn_call(move || rmig_migrate(d));
    let addr = std::ffi::CString::new(format!("127.0.0.1:{port}")).unwrap();
    let mut s = 0;
    let mut scb = callbacks();
    scb.save_device_state = Some(save_dev);
    // SAFETY: valid pointers; the memory outlives the session.
    unsafe {
        assert_eq!(rmig_source_new(&config(&addr), &scb, &mut s), RmigOk);
        assert_eq!(
            rmig_add_region(s, 7, c"ram".as_ptr(), sp, len as u64, 0, 4096),
            RmigOk
        );
    }
    assert_eq!(rmig_migrate(s), RmigOk, "{}", last_error());
    assert_eq!(within(&dt, 60, "destination migrate"), RmigOk);
    // SAFETY: both buffers are live and no longer written.
    unsafe {
        assert_eq!(
            std::slice::from_raw_parts(sp, len),
            std::slice::from_raw_parts(dp, len)
        );
    }
    assert_eq!(DEVICE_LOADED.load(Ordering::Relaxed), 1);
    let mut st = std::mem::MaybeUninit::<RmigStats>::uninit();
    // SAFETY: valid out pointer.
    assert_eq!(unsafe { rmig_get_stats(s, st.as_mut_ptr()) }, RmigOk);
    // SAFETY: written by rmig_get_stats.
    let st = unsafe { st.assume_init() };
    assert_eq!(st.state, RmigState::RmigStateCompleted);
    assert_eq!(st.verified, 1);
    assert_eq!(st.ram_total, len as u64);
    assert_eq!(
        (st.encryption, st.data_lanes_encrypted),
        (RmigEncryption::RmigEncryptionTlsPsk as u32, 1),
        "encrypted by default, pages included (TCP lanes)"
    );
    assert_eq!(st.transport, RmigTransport::RmigTransportTcp as u32);
    let mut need = 0usize;
    let mut small = [0i8; 4];
    // SAFETY: valid buffers of the stated sizes.
    unsafe {
        assert_eq!(
            rmig_stats_json(s, small.as_mut_ptr(), small.len(), &mut need),
            RmigErrBufferTooSmall
        );
        let mut buf = vec![0i8; need];
        assert_eq!(
            rmig_stats_json(s, buf.as_mut_ptr(), buf.len(), null_mut()),
            RmigOk
        );
        let j = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
        assert!(j.contains("\"status\":\"completed\""), "{j}");
    }
    assert_eq!(rmig_complete(s), RmigErrState, "nothing after the end");
    for h in [s, d] {
        assert_eq!(
            rmig_resolve_handover(h, RmigHandover::RmigHandoverRunHere as u32),
            RmigErrState,
            "nothing to resolve after a completed handover"
        );
        assert_eq!(stats(h).unwrap().state, RmigState::RmigStateCompleted);
    }
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

/// RDMA under encryption needs `rdma_cleartext_lanes`: without it the source refuses with
/// the flag's name; with it the engine goes on to look for a device (none for 127.0.0.1).
#[test]
fn rdma_under_encryption_needs_the_cleartext_lanes_field() {
    let _deadline = Deadline::secs(60);
    let mut v = mem(1 << 20);
    let p = aligned(&mut v);
    let cases = [
        (0, RmigErrConfig, "rdma_cleartext_lanes"),
        (1, RmigErrIo, "no RDMA device"),
    ];
    for (flag, status, want) in cases {
        // The source decides before its TLS handshake: a listener that never accepts will do.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std::ffi::CString::new(l.local_addr().unwrap().to_string()).unwrap();
        let mut c = config(&addr);
        assert_eq!(c.rdma_cleartext_lanes, 0, "off by default");
        c.transport = RmigTransport::RmigTransportRdma as u32;
        c.rdma_cleartext_lanes = flag;
        let s = source_session(&c, p, 1 << 20);
        assert_eq!(rmig_migrate(s), status, "{}", last_error());
        let e = last_error();
        assert!(e.contains(want), "flag {flag}: {e}");
        assert_eq!(rmig_free(s), RmigOk);
    }
}

#[test]
fn cancel_from_another_thread() {
    let _deadline = Deadline::secs(120);
    let len = 64 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let sp = aligned(&mut sv);
    let dp = aligned(&mut dv);
    for i in 0..len / 8 {
        // SAFETY: inside the aligned buffer.
        unsafe { sp.cast::<u64>().add(i).write(i as u64 | 1) };
    }
    let (d, addr) = dest_session(&callbacks(), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut c = config(&addr);
    c.max_bandwidth = 20_000_000;
    let s = source_session(&c, sp, len);
    let st = spawn_call(move || rmig_migrate(s));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rmig_setup(s),
        RmigErrState,
        "driving calls must not overlap"
    );
    assert!(last_error().contains("in use"), "{}", last_error());
    assert!(stats(s).is_ok(), "statistics are for any thread");
    assert_eq!(rmig_set_max_bandwidth(s, 20_000_000), RmigOk);
    // SAFETY: a valid C string.
    assert_eq!(unsafe { rmig_cancel(s, c"operator".as_ptr()) }, RmigOk);
    assert_eq!(within(&st, 20, "source migrate"), RmigErrCancelled);
    assert_eq!(within(&dt, 20, "destination migrate"), RmigErrCancelled);
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

#[test]
fn out_of_range_transport_is_refused_by_name() {
    let _deadline = Deadline::secs(120);
    let addr = c"127.0.0.1:1";
    for bad in [3, 7, u32::MAX] {
        let mut c = config(addr);
        c.transport = bad;
        let mut s = 0;
        // SAFETY: valid pointers; the value is the library's to check.
        let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
        assert_eq!(r, RmigErrInvalidArgument, "transport {bad}");
        let msg = last_error();
        assert!(msg.contains("config.transport"), "{msg}");
        assert!(msg.contains(&format!("is {bad},")), "{msg}");
        assert!(msg.contains("RMIG_TRANSPORT_TCP (1)"), "{msg}");
        let mut d = 0;
        let mut c = config(c"127.0.0.1:0");
        c.transport = bad;
        // SAFETY: as above.
        let r = unsafe { rmig_dest_new(&c, &callbacks(), &mut d) };
        assert_eq!(r, RmigErrInvalidArgument, "transport {bad}");
        assert!(
            last_error().contains("config.transport"),
            "{}",
            last_error()
        );
    }
    for good in [
        RmigTransport::RmigTransportAuto,
        RmigTransport::RmigTransportTcp,
        RmigTransport::RmigTransportRdma,
    ] {
        let mut c = config(addr);
        c.transport = good as u32;
        let mut s = 0;
        // SAFETY: valid pointers.
        let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
        assert_eq!(r, RmigOk, "{good:?}: {}", last_error());
        assert_eq!(rmig_free(s), RmigOk);
    }
    assert_eq!(
        config(addr).transport,
        RmigTransport::RmigTransportAuto as u32
    );
}

#[test]
fn out_of_range_verify_mode_is_refused_by_name() {
    let _deadline = Deadline::secs(120);
    let addr = c"127.0.0.1:1";
    for bad in [3, u32::MAX] {
        let mut c = config(addr);
        c.verify = bad;
        let mut s = 0;
        // SAFETY: valid pointers; the value is the library's to check.
        let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
        assert_eq!(r, RmigErrInvalidArgument, "verify {bad}");
        let msg = last_error();
        assert!(msg.contains("config.verify"), "{msg}");
        assert!(msg.contains("RMIG_VERIFY_MEMORY (2)"), "{msg}");
    }
    for good in [
        RmigVerify::RmigVerifyOff,
        RmigVerify::RmigVerifyReceived,
        RmigVerify::RmigVerifyMemory,
    ] {
        let mut c = config(addr);
        c.verify = good as u32;
        let mut s = 0;
        // SAFETY: valid pointers.
        let r = unsafe { rmig_source_new(&c, &callbacks(), &mut s) };
        assert_eq!(r, RmigOk, "{good:?}: {}", last_error());
        assert_eq!(rmig_free(s), RmigOk);
    }
    assert_eq!(config(addr).verify, RmigVerify::RmigVerifyReceived as u32);
}

// The destination's `load_device_state` of `free_waits_for_the_call_in_flight`: it blocks
// until released (at most 20 s), so that `rmig_free` meets a call in flight.
static GATE_ENTERED: AtomicBool = AtomicBool::new(false);
static GATE_RELEASE: AtomicBool = AtomicBool::new(false);
static GATE_LEFT: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn gated_load(_: *mut c_void, _: *const u8, _: usize) -> i32 {
    GATE_ENTERED.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !GATE_RELEASE.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    GATE_LEFT.store(true, Ordering::SeqCst);
    0
}

#[test]
fn free_waits_for_the_call_in_flight() {
    let _deadline = Deadline::secs(120);
    let len = 1 << 20;
    let (mut sv, mut dv) = (mem(len), mem(len));
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    let mut cb = callbacks();
    cb.load_device_state = Some(gated_load);
    let (d, addr) = dest_session(&cb, dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let s = source_session(&config(&addr), sp, len);
    let st = spawn_call(move || rmig_migrate(s));
    // The destination's receiving call is now inside its callback, still in flight.
    wait_until(20, "load_device_state called", || {
        GATE_ENTERED.load(Ordering::SeqCst)
    });
    let freed = spawn_call(move || {
        let r = rmig_free(d);
        (r, GATE_LEFT.load(Ordering::SeqCst))
    });
    // The handle is gone at once, while rmig_free still waits.
    wait_until(10, "handle invalid", || {
        stats(d).err() == Some(RmigErrInvalidHandle)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        freed.try_recv().err(),
        Some(TryRecvError::Empty),
        "rmig_free returned while a call on the session was still running"
    );
    GATE_RELEASE.store(true, Ordering::SeqCst);
    let (r, left) = within(&freed, 20, "rmig_free");
    assert_eq!(r, RmigOk);
    assert!(
        left,
        "rmig_free returned before the call in flight had returned"
    );
    within(&dt, 5, "destination migrate");
    assert_eq!(rmig_free(d), RmigErrInvalidHandle);
    assert_eq!(rmig_migrate(d), RmigErrInvalidHandle);
    within(&st, 20, "source migrate");
    assert_eq!(rmig_free(s), RmigOk);
}

#[test]
fn free_cancels_a_blocked_receive() {
    let _deadline = Deadline::secs(120);
    let len = 64 << 20;
    let (mut sv, mut dv) = (mem(len), mem(len));
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    for i in 0..len / 8 {
        // SAFETY: inside the aligned buffer.
        unsafe { sp.cast::<u64>().add(i).write(i as u64 | 1) };
    }
    let (d, addr) = dest_session(&callbacks(), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut c = config(&addr);
    c.max_bandwidth = 4_000_000; // 64 MiB take 16 s: the receive blocks long enough.
    let s = source_session(&c, sp, len);
    let st = spawn_call(move || rmig_migrate(s));
    wait_until(20, "destination receiving", || {
        stats(d).is_ok_and(|x| x.state == RmigState::RmigStateActive)
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let freed = spawn_call(move || rmig_free(d));
    assert_eq!(
        within(&freed, 5, "rmig_free of a receiving session"),
        RmigOk
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(within(&dt, 1, "destination migrate"), RmigErrCancelled);
    assert_eq!(stats(d).err(), Some(RmigErrInvalidHandle));
    assert_eq!(rmig_free(d), RmigErrInvalidHandle);
    assert_eq!(within(&st, 20, "source migrate"), RmigErrCancelled);
    assert_eq!(rmig_free(s), RmigOk);
}

#[test]
fn resolve_handover_refuses_bad_decisions_and_settled_sessions() {
    let _deadline = Deadline::secs(120);
    let s = source(c"127.0.0.1:1");
    for bad in [0, 3, u32::MAX] {
        assert_eq!(rmig_resolve_handover(s, bad), RmigErrInvalidArgument);
        let msg = last_error();
        assert!(msg.contains(&format!("decision is {bad},")), "{msg}");
        assert!(msg.contains("RMIG_HANDOVER_RUN_HERE (1)"), "{msg}");
        assert!(msg.contains("RMIG_HANDOVER_RUN_THERE (2)"), "{msg}");
    }
    for good in [
        RmigHandover::RmigHandoverRunHere,
        RmigHandover::RmigHandoverRunThere,
    ] {
        assert_eq!(rmig_resolve_handover(s, good as u32), RmigErrState);
        assert!(
            last_error().contains("only for a handover whose outcome is unknown"),
            "{}",
            last_error()
        );
    }
    assert_eq!(stats(s).unwrap().state, RmigState::RmigStateNew);
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(
        rmig_resolve_handover(s, RmigHandover::RmigHandoverRunHere as u32),
        RmigErrInvalidHandle
    );
}

/// A TCP relay between a source and its destination that can cut the control connection (the
/// first connection the source opens; its lanes come after the handshake) at a chosen moment.
struct Relay {
    addr: std::ffi::CString,
    /// Each relayed connection: the source's side and the destination's, in accept order.
    conns: std::sync::Arc<std::sync::Mutex<Vec<(TcpStream, TcpStream)>>>,
    stop: std::sync::Arc<AtomicBool>,
}

/// Copies `from` into `to` until either closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Relay {
    /// Relays connections to `to` until dropped (or for 60 s at most).
    fn start(to: &CStr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = std::ffi::CString::new(format!("127.0.0.1:{}", l.local_addr().unwrap().port()))
            .unwrap();
        let to = to.to_str().unwrap().to_string();
        let relay = Relay {
            addr,
            conns: Default::default(),
            stop: Default::default(),
        };
        let (conns, stop) = (relay.conns.clone(), relay.stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match l.accept() {
                    Ok((a, _)) => {
                        a.set_nonblocking(false).unwrap();
                        let b = TcpStream::connect(&to).unwrap();
                        let _ = (a.set_nodelay(true), b.set_nodelay(true));
                        let pair = (a.try_clone().unwrap(), b.try_clone().unwrap());
                        conns.lock().unwrap().push(pair);
                        pipe(a.try_clone().unwrap(), b.try_clone().unwrap());
                        pipe(b, a);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("relay accept: {e}"),
                }
            }
        });
        relay
    }

    /// Breaks the control connection at once, both ways; the lanes stay.
    fn cut_control(&self) {
        let c = self.conns.lock().unwrap();
        let (a, b) = c.first().expect("the control connection was relayed");
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (a, b) in self.conns.lock().unwrap().iter() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// The two ends of a handover test, as the callbacks see them through `opaque`.
#[derive(Default)]
struct Ends {
    relay: std::sync::OnceLock<Relay>,
    /// Cut the control connection in the destination's `load_device_state`: just before it
    /// sends `Ready`.
    cut_on_load: AtomicBool,
    /// Cut the control connection in the destination's `resume`: on `Commit`, before `Done`.
    cut_on_resume: AtomicBool,
    source_paused: AtomicU64,
    source_resumed: AtomicU64,
    dest_loaded: AtomicU64,
    dest_resumed: AtomicU64,
}

/// # Safety
/// `opaque` must point to a live `Ends`.
unsafe fn ends<'a>(opaque: *mut c_void) -> &'a Ends {
    // SAFETY: the caller's contract; the tests keep their `Ends` alive past both sessions.
    unsafe { &*opaque.cast_const().cast::<Ends>() }
}

unsafe extern "C" fn ends_pause(opaque: *mut c_void) -> i32 {
    // SAFETY: the tests hand an `Ends` as `opaque`.
    unsafe { ends(opaque) }
        .source_paused
        .fetch_add(1, Ordering::SeqCst);
    0
}

unsafe extern "C" fn ends_source_resume(opaque: *mut c_void) {
    // SAFETY: as in `ends_pause`.
    unsafe { ends(opaque) }
        .source_resumed
        .fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn ends_load(opaque: *mut c_void, _: *const u8, _: usize) -> i32 {
    // SAFETY: as in `ends_pause`.
    let e = unsafe { ends(opaque) };
    e.dest_loaded.fetch_add(1, Ordering::SeqCst);
    if e.cut_on_load.swap(false, Ordering::SeqCst) {
        e.relay.get().expect("relay").cut_control();
    }
    0
}

unsafe extern "C" fn ends_dest_resume(opaque: *mut c_void) {
    // SAFETY: as in `ends_pause`.
    let e = unsafe { ends(opaque) };
    e.dest_resumed.fetch_add(1, Ordering::SeqCst);
    if e.cut_on_resume.swap(false, Ordering::SeqCst) {
        e.relay.get().expect("relay").cut_control();
    }
}

/// Migrates 1 MiB from a source to a destination through a `Relay`, with the callbacks of
/// `ends` (which says where the relay cuts the control connection). Returns the sessions and
/// each end's `rmig_migrate` status with its message; the caller frees the sessions, then
/// drops `ends` and the memory.
fn migrate_through_relay(
    ends: &Ends,
    sp: *mut u8,
    dp: *mut u8,
    len: usize,
) -> (
    (RmigSession, RmigStatus, String),
    (RmigSession, RmigStatus, String),
) {
    let opaque = std::ptr::from_ref(ends).cast_mut().cast::<c_void>();
    let mut dcb = callbacks();
    dcb.opaque = opaque;
    dcb.load_device_state = Some(ends_load);
    dcb.resume = Some(ends_dest_resume);
    let (d, daddr) = dest_session(&dcb, dp, len);
    assert!(ends.relay.set(Relay::start(&daddr)).is_ok());
    let mut c = config(&ends.relay.get().unwrap().addr);
    c.transport = RmigTransport::RmigTransportTcp as u32;
    let mut scb = callbacks();
    scb.opaque = opaque;
    scb.pause = Some(ends_pause);
    scb.resume = Some(ends_source_resume);
    let mut s = 0;
    // SAFETY: valid pointers; the memory outlives the session (the callers free it first).
    unsafe {
        assert_eq!(rmig_source_new(&c, &scb, &mut s), RmigOk);
        assert_eq!(
            rmig_add_region(s, 0, null(), sp, len as u64, u64::MAX, 4096),
            RmigOk
        );
    }
    let dt = spawn_call(move || (rmig_migrate(d), last_error()));
    let st = spawn_call(move || (rmig_migrate(s), last_error()));
    let (sr, smsg) = within(&st, 30, "source migrate");
    let (dr, dmsg) = within(&dt, 30, "destination migrate");
    ((s, sr, smsg), (d, dr, dmsg))
}

fn json(s: RmigSession) -> String {
    let mut buf = vec![0i8; 1 << 16];
    // SAFETY: a buffer of the stated size.
    let r = unsafe { rmig_stats_json(s, buf.as_mut_ptr(), buf.len(), null_mut()) };
    assert_eq!(r, RmigOk);
    // SAFETY: NUL-terminated by rmig_stats_json.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The link fails after the destination said `Ready` and before `Commit` came: the source
/// never committed (it resumes its guest), the destination cannot know that and keeps its
/// guest paused until the operator decides.
#[test]
fn destination_handover_unknown_is_settled_by_the_operator() {
    let _deadline = Deadline::secs(120);
    for decision in [
        RmigHandover::RmigHandoverRunThere,
        RmigHandover::RmigHandoverRunHere,
    ] {
        let len = 1 << 20;
        let (mut sv, mut dv) = (mem(len), mem(len));
        let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
        let ends = Ends::default();
        ends.cut_on_load.store(true, Ordering::SeqCst);
        let ((s, sr, smsg), (d, dr, dmsg)) = migrate_through_relay(&ends, sp, dp, len);

        // The source failed before Commit: its guest is its own again.
        assert_eq!(sr, RmigErrIo, "{smsg}");
        assert_eq!(stats(s).unwrap().state, RmigState::RmigStateFailed);
        assert_eq!(ends.source_paused.load(Ordering::SeqCst), 1);
        assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 1);
        assert_eq!(
            rmig_resolve_handover(s, RmigHandover::RmigHandoverRunHere as u32),
            RmigErrState,
            "a failed source has nothing to resolve"
        );

        // The destination said Ready and lost the link: paused, undecided.
        assert_eq!(dr, RmigErrHandoverUnknown, "{dmsg}");
        assert!(dmsg.contains("after Ready"), "{dmsg}");
        assert_eq!(ends.dest_loaded.load(Ordering::SeqCst), 1);
        assert_eq!(ends.dest_resumed.load(Ordering::SeqCst), 0);
        assert_eq!(stats(d).unwrap().state, RmigState::RmigStateHandoverUnknown);
        assert_eq!(rmig_migrate(d), RmigErrState);
        assert!(
            last_error().contains("rmig_resolve_handover"),
            "{}",
            last_error()
        );
        assert_eq!(rmig_resolve_handover(d, 0), RmigErrInvalidArgument);
        assert_eq!(stats(d).unwrap().state, RmigState::RmigStateHandoverUnknown);

        assert_eq!(
            rmig_resolve_handover(d, decision as u32),
            RmigOk,
            "{}",
            last_error()
        );
        let st = stats(d).unwrap();
        match decision {
            // The right call here: the source runs the guest.
            RmigHandover::RmigHandoverRunThere => {
                assert_eq!(ends.dest_resumed.load(Ordering::SeqCst), 0);
                assert_eq!(st.state, RmigState::RmigStateFailed);
                assert!(
                    json(d).contains("gave the guest to the source"),
                    "{}",
                    json(d)
                );
            }
            // What the library does for it (an operator would not: the source runs it).
            RmigHandover::RmigHandoverRunHere => {
                assert_eq!(ends.dest_resumed.load(Ordering::SeqCst), 1);
                assert_eq!(st.state, RmigState::RmigStateCompleted);
                assert!(json(d).contains("resumed the guest on the destination"));
            }
        }
        // A decision is final.
        for again in [
            RmigHandover::RmigHandoverRunHere,
            RmigHandover::RmigHandoverRunThere,
        ] {
            assert_eq!(rmig_resolve_handover(d, again as u32), RmigErrState);
        }
        assert_eq!(stats(d).unwrap().state, st.state);
        assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 1);
        assert_eq!(rmig_free(s), RmigOk);
        assert_eq!(rmig_free(d), RmigOk);
    }
}

/// The link fails after the source sent `Commit` and before `Done` came back: the destination
/// runs the guest, the source cannot know that and keeps its guest paused until the operator
/// decides.
#[test]
fn source_handover_unknown_is_settled_by_the_operator() {
    let _deadline = Deadline::secs(120);
    for decision in [
        RmigHandover::RmigHandoverRunThere,
        RmigHandover::RmigHandoverRunHere,
    ] {
        let len = 1 << 20;
        let (mut sv, mut dv) = (mem(len), mem(len));
        let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
        let ends = Ends::default();
        ends.cut_on_resume.store(true, Ordering::SeqCst);
        let ((s, sr, smsg), (d, dr, dmsg)) = migrate_through_relay(&ends, sp, dp, len);

        // The destination got Commit and runs the guest.
        assert_eq!(dr, RmigOk, "{dmsg}");
        assert_eq!(stats(d).unwrap().state, RmigState::RmigStateCompleted);
        assert_eq!(ends.dest_resumed.load(Ordering::SeqCst), 1);
        assert_eq!(
            rmig_resolve_handover(d, RmigHandover::RmigHandoverRunHere as u32),
            RmigErrState,
            "a completed destination has nothing to resolve"
        );

        // The source sent Commit and heard nothing back: paused, undecided.
        assert_eq!(sr, RmigErrHandoverUnknown, "{smsg}");
        assert!(smsg.contains("Commit was sent"), "{smsg}");
        assert_eq!(ends.source_paused.load(Ordering::SeqCst), 1);
        assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 0);
        assert_eq!(stats(s).unwrap().state, RmigState::RmigStateHandoverUnknown);
        assert_eq!(rmig_complete(s), RmigErrState);
        assert!(
            last_error().contains("rmig_resolve_handover"),
            "{}",
            last_error()
        );
        let mut ready = 0;
        // SAFETY: a valid out pointer.
        assert_eq!(unsafe { rmig_iterate(s, &mut ready) }, RmigErrState);
        assert_eq!(rmig_resolve_handover(s, 7), RmigErrInvalidArgument);
        assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 0);

        assert_eq!(
            rmig_resolve_handover(s, decision as u32),
            RmigOk,
            "{}",
            last_error()
        );
        let st = stats(s).unwrap();
        match decision {
            // The right call here: the destination runs the guest.
            RmigHandover::RmigHandoverRunThere => {
                assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 0);
                assert_eq!(st.state, RmigState::RmigStateCompleted);
                assert!(json(s).contains("gave the guest to the destination"));
            }
            // What the library does for it (an operator would not: the destination runs it).
            RmigHandover::RmigHandoverRunHere => {
                assert_eq!(ends.source_resumed.load(Ordering::SeqCst), 1);
                assert_eq!(st.state, RmigState::RmigStateFailed);
                assert!(json(s).contains("resumed the guest on the source"));
            }
        }
        for again in [
            RmigHandover::RmigHandoverRunHere,
            RmigHandover::RmigHandoverRunThere,
        ] {
            assert_eq!(rmig_resolve_handover(s, again as u32), RmigErrState);
        }
        assert_eq!(stats(s).unwrap().state, st.state);
        assert_eq!(ends.dest_resumed.load(Ordering::SeqCst), 1);
        assert_eq!(rmig_free(s), RmigOk);
        assert_eq!(rmig_free(d), RmigOk);
    }
}

/// What the embedder callbacks of a scripted session do, and what they saw; `opaque` points
/// at one, which outlives the session.
#[derive(Default)]
struct Script {
    fail_dirty_sync: bool,
    fail_sync_begin: bool,
    /// `dirty_sync` reports every page written at every sync until the pause: a guest that
    /// never converges.
    all_dirty: bool,
    /// With `all_dirty`: also after the pause (a `pause` that does not stop every writer).
    writes_when_paused: bool,
    /// The dirty-log calls in order: -1 for `dirty_sync_begin`, else the region synced.
    syncs: std::sync::Mutex<Vec<i64>>,
    fail_pause: bool,
    fail_save: bool,
    fail_load: bool,
    pauses: AtomicU64,
    resumes: AtomicU64,
    loads: AtomicU64,
}

/// The script behind `opaque`.
///
/// # Safety
/// `opaque` is the pointer [`scripted`] put in the callbacks, to a `Script` that outlives the
/// session.
unsafe fn script<'a>(opaque: *mut c_void) -> &'a Script {
    // SAFETY: per this function's contract.
    unsafe { &*(opaque as *const Script) }
}

unsafe extern "C" fn s_dirty(o: *mut c_void, region: u32, bits: *mut u64, words: usize) -> i32 {
    // SAFETY: `o` is the session's script.
    let s = unsafe { script(o) };
    s.syncs.lock().unwrap().push(region.into());
    // A paused guest writes nothing, unless the script says it keeps writing.
    if s.all_dirty && (s.pauses.load(Ordering::Relaxed) == 0 || s.writes_when_paused) {
        // SAFETY: the library's bitmap of `words` words, for this call.
        unsafe { std::slice::from_raw_parts_mut(bits, words) }.fill(u64::MAX);
    }
    -i32::from(s.fail_dirty_sync)
}

unsafe extern "C" fn s_sync_begin(o: *mut c_void) -> i32 {
    // SAFETY: `o` is the session's script.
    let s = unsafe { script(o) };
    s.syncs.lock().unwrap().push(-1);
    -i32::from(s.fail_sync_begin)
}

unsafe extern "C" fn s_pause(o: *mut c_void) -> i32 {
    // SAFETY: `o` is the session's script.
    let s = unsafe { script(o) };
    s.pauses.fetch_add(1, Ordering::Relaxed);
    -i32::from(s.fail_pause)
}

unsafe extern "C" fn s_resume(o: *mut c_void) {
    // SAFETY: `o` is the session's script.
    unsafe { script(o) }.resumes.fetch_add(1, Ordering::Relaxed);
}

unsafe extern "C" fn s_save(o: *mut c_void, out: *mut RmigBytes) -> i32 {
    // SAFETY: `o` is the session's script.
    if unsafe { script(o) }.fail_save {
        return -1;
    }
    // SAFETY: `out` is the library's buffer for this call.
    unsafe { rmig_bytes_append(out, b"state".as_ptr(), 5) as i32 }
}

unsafe extern "C" fn s_load(o: *mut c_void, _: *const u8, _: usize) -> i32 {
    // SAFETY: `o` is the session's script.
    let s = unsafe { script(o) };
    s.loads.fetch_add(1, Ordering::Relaxed);
    -i32::from(s.fail_load)
}

fn scripted(s: &Script) -> RmigCallbacks {
    RmigCallbacks {
        opaque: s as *const Script as *mut c_void,
        dirty_sync: Some(s_dirty),
        pause: Some(s_pause),
        resume: Some(s_resume),
        throttle: None,
        save_device_state: Some(s_save),
        load_device_state: Some(s_load),
        dirty_sync_begin: Some(s_sync_begin),
    }
}

/// A 4 MiB migration between scripted ends: the source's status and last error, and the
/// destination's status. Both sessions are freed before it returns.
fn migrate_scripted(src: &Script, dst: &Script) -> (RmigStatus, String, RmigStatus) {
    migrate_scripted_with(src, dst, |_| {}, |_| {})
}

/// [`migrate_scripted`] with the source configured by `tune`, and `meanwhile` run on the
/// source session while it migrates; the two halves of the memory are two regions.
fn migrate_scripted_with(
    src: &Script,
    dst: &Script,
    tune: impl FnOnce(&mut RmigConfig),
    meanwhile: impl FnOnce(RmigSession),
) -> (RmigStatus, String, RmigStatus) {
    let len = 4 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    // SAFETY: inside the aligned buffer.
    unsafe { sp.write_bytes(0x5a, len) };
    let (d, addr) = dest_session(&scripted(dst), dp, len / 2);
    // SAFETY: the second half of the buffer, which outlives the session.
    let r = unsafe {
        rmig_add_region(
            d,
            1,
            null(),
            dp.add(len / 2),
            len as u64 / 2,
            u64::MAX,
            4096,
        )
    };
    assert_eq!(r, RmigOk);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut s = 0;
    let mut c = config(&addr);
    tune(&mut c);
    // SAFETY: valid pointers; the memory and the script outlive the session.
    unsafe {
        assert_eq!(rmig_source_new(&c, &scripted(src), &mut s), RmigOk);
        for (i, p) in [sp, sp.add(len / 2)].into_iter().enumerate() {
            let r = rmig_add_region(s, i as u32, null(), p, len as u64 / 2, u64::MAX, 4096);
            assert_eq!(r, RmigOk);
        }
    }
    let st = spawn_call(move || (rmig_migrate(s), last_error()));
    meanwhile(s);
    let (sr, smsg) = within(&st, 30, "source migrate");
    let dr = within(&dt, 30, "destination migrate");
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
    (sr, smsg, dr)
}

#[test]
fn a_failing_dirty_sync_callback_fails_the_source_before_the_pause() {
    let _deadline = Deadline::secs(120);
    let src = Script {
        fail_dirty_sync: true,
        ..Default::default()
    };
    let dst = Script::default();
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!(sr, RmigErrEmbedder, "{smsg}");
    assert!(smsg.contains("dirty_sync"), "names the callback: {smsg}");
    assert_eq!(dr, RmigErrIo, "the destination is told");
    assert_eq!(src.pauses.load(Ordering::Relaxed), 0);
    assert_eq!(src.resumes.load(Ordering::Relaxed), 0);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_pause_callback_fails_without_a_resume() {
    let _deadline = Deadline::secs(120);
    let src = Script {
        fail_pause: true,
        ..Default::default()
    };
    let dst = Script::default();
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!(sr, RmigErrEmbedder, "{smsg}");
    assert!(smsg.contains("pause"), "names the callback: {smsg}");
    assert_eq!(dr, RmigErrIo);
    assert_eq!(src.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(src.resumes.load(Ordering::Relaxed), 0, "it never stopped");
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_save_device_state_callback_resumes_the_source() {
    let _deadline = Deadline::secs(120);
    let src = Script {
        fail_save: true,
        ..Default::default()
    };
    let dst = Script::default();
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!(sr, RmigErrEmbedder, "{smsg}");
    assert!(smsg.contains("save_device_state"), "{smsg}");
    assert_eq!(dr, RmigErrIo);
    assert_eq!(src.resumes.load(Ordering::Relaxed), 1);
    assert_eq!(dst.loads.load(Ordering::Relaxed), 0);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_load_device_state_callback_refuses_and_the_source_resumes() {
    let _deadline = Deadline::secs(120);
    let src = Script::default();
    let dst = Script {
        fail_load: true,
        ..Default::default()
    };
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!(dr, RmigErrEmbedder);
    assert_eq!(sr, RmigErrIo, "{smsg}");
    assert!(smsg.contains("load_device_state"), "{smsg}");
    assert_eq!(dst.loads.load(Ordering::Relaxed), 1);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
    assert_eq!(src.resumes.load(Ordering::Relaxed), 1, "the source runs on");
}

#[test]
fn scripted_callbacks_migrate_when_nothing_fails() {
    let _deadline = Deadline::secs(120);
    // The control case of the four above: the same ends, nothing failing, complete.
    let (src, dst) = (Script::default(), Script::default());
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!((sr, dr), (RmigOk, RmigOk), "{smsg}");
    assert_eq!(src.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(src.resumes.load(Ordering::Relaxed), 0);
    assert_eq!(dst.loads.load(Ordering::Relaxed), 1);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 1);
}

#[test]
fn set_max_bandwidth_takes_effect_while_running() {
    let _deadline = Deadline::secs(120);
    let len = 32 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    // SAFETY: inside the aligned buffer.
    unsafe { sp.write_bytes(0x33, len) };
    let (d, addr) = dest_session(&callbacks(), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut c = config(&addr);
    c.max_bandwidth = 2_000_000; // 32 MiB would take 17 s
    let s = source_session(&c, sp, len);
    let t = Instant::now();
    let st = spawn_call(move || rmig_migrate(s));
    std::thread::sleep(Duration::from_secs(1));
    // The ceiling held: 2 MB/s for a second, plus a 1 MiB batch per lane and the burst.
    let sent = stats(s).unwrap().ram_transferred;
    assert!(sent <= 5 << 20, "{sent} bytes in the first second");
    assert_eq!(rmig_set_max_bandwidth(s, 0), RmigOk);
    assert_eq!(within(&st, 20, "source migrate"), RmigOk, "{}", json(s));
    assert_eq!(within(&dt, 20, "destination migrate"), RmigOk);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

#[test]
fn cancel_on_a_destination_ends_both_ends() {
    let _deadline = Deadline::secs(120);
    let len = 64 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    // SAFETY: inside the aligned buffer.
    unsafe { sp.write_bytes(0x77, len) };
    let dst = Script::default();
    let (d, addr) = dest_session(&scripted(&dst), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut c = config(&addr);
    c.max_bandwidth = 20_000_000;
    let s = source_session(&c, sp, len);
    let st = spawn_call(move || rmig_migrate(s));
    wait_until(10, "the source's first bytes", || {
        stats(s).is_ok_and(|st| st.ram_transferred > 0)
    });
    let reason = c"destination host going down";
    // SAFETY: a valid C string.
    let r = unsafe { rmig_cancel(d, reason.as_ptr()) };
    assert_eq!(r, RmigOk);
    assert_eq!(within(&dt, 20, "destination migrate"), RmigErrCancelled);
    assert_eq!(within(&st, 20, "source migrate"), RmigErrCancelled);
    assert!(
        json(s).contains("destination host going down"),
        "the source learns why: {}",
        json(s)
    );
    assert_eq!(stats(d).unwrap().state, RmigState::RmigStateCancelled);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

#[test]
fn the_step_api_driven_from_rust_as_c_would() {
    let _deadline = Deadline::secs(120);
    let len = 8 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
    for i in 0..len / 8 {
        // SAFETY: inside the aligned buffer.
        unsafe { sp.cast::<u64>().add(i).write(!(i as u64)) };
    }
    let (src, dst) = (Script::default(), Script::default());
    let (d, addr) = dest_session(&scripted(&dst), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut s = 0;
    // SAFETY: valid pointers; the memory and the script outlive the session.
    unsafe {
        assert_eq!(
            rmig_source_new(&config(&addr), &scripted(&src), &mut s),
            RmigOk
        );
        assert_eq!(
            rmig_add_region(s, 0, null(), sp, len as u64, u64::MAX, 4096),
            RmigOk
        );
    }
    let mut ready = 0;
    // SAFETY: a valid out pointer.
    let iterate = |ready: &mut i32| unsafe { rmig_iterate(s, ready) };
    assert_eq!(iterate(&mut ready), RmigErrState, "iterate before setup");
    assert_eq!(rmig_setup(s), RmigOk, "{}", last_error());
    assert_eq!(stats(s).unwrap().state, RmigState::RmigStateActive);
    let mut rounds = 0;
    while ready == 0 {
        assert_eq!(iterate(&mut ready), RmigOk, "{}", last_error());
        rounds += 1;
        assert!(rounds < 30, "nothing is written: ready within a few rounds");
    }
    assert_eq!(
        src.pauses.load(Ordering::Relaxed),
        0,
        "not paused before complete"
    );
    assert_eq!(rmig_complete(s), RmigOk, "{}", last_error());
    assert_eq!(src.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(within(&dt, 30, "destination migrate"), RmigOk);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 1);
    let st = stats(s).unwrap();
    assert_eq!((st.state, st.verified), (RmigState::RmigStateCompleted, 1));
    // SAFETY: both buffers are live and no longer written.
    unsafe {
        assert_eq!(
            std::slice::from_raw_parts(sp, len),
            std::slice::from_raw_parts(dp, len)
        );
    }
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

/// Reports the first 64 pages dirty at every sync, as a guest that keeps rewriting them
/// would: they are still dirty when the source switches.
unsafe extern "C" fn first_64_dirty(_: *mut c_void, _: u32, bitmap: *mut u64, words: usize) -> i32 {
    if words > 0 {
        // SAFETY: the library hands `words` writable words.
        unsafe { bitmap.write(u64::MAX) };
    }
    0
}

#[test]
fn postcopy_through_the_abi_on_request() {
    let _deadline = Deadline::secs(120);
    let len = 8 << 20;
    let mut sv = mem(len);
    let mut dv = mem(len);
    let sp = aligned(&mut sv);
    let dp = aligned(&mut dv);
    for i in 0..len / 8 {
        // SAFETY: inside the aligned buffer.
        unsafe { sp.cast::<u64>().add(i).write((i as u64) ^ 0x5555) };
    }
    let (d, addr) = dest_session(&callbacks(), dp, len);
    let dt = spawn_call(move || rmig_migrate(d));
    let mut c = config(&addr);
    c.postcopy = 1;
    let mut s = 0;
    let mut scb = callbacks();
    scb.dirty_sync = Some(first_64_dirty);
    // SAFETY: valid pointers; the memory outlives the session.
    unsafe {
        assert_eq!(rmig_source_new(&c, &scb, &mut s), RmigOk);
        assert_eq!(
            rmig_add_region(s, 0, null(), sp, len as u64, u64::MAX, 4096),
            RmigOk
        );
    }
    // Asked for before the first round: the source switches right after it.
    assert_eq!(rmig_start_postcopy(s), RmigOk);
    assert_eq!(rmig_migrate(s), RmigOk, "{}", last_error());
    assert_eq!(within(&dt, 60, "destination migrate"), RmigOk);
    // SAFETY: both buffers are live and no longer written.
    unsafe {
        assert_eq!(
            std::slice::from_raw_parts(sp, len),
            std::slice::from_raw_parts(dp, len)
        );
    }
    for h in [s, d] {
        let st = stats(h).unwrap();
        assert_eq!(st.state, RmigState::RmigStateCompleted);
        assert_eq!(st.postcopy, 1, "both ends report the switch");
        assert_eq!(st.postcopy_pages_at_switch, 64);
        assert_eq!(st.verified, 1);
    }
    assert_eq!(rmig_free(s), RmigOk);
    assert_eq!(rmig_free(d), RmigOk);
}

#[test]
fn dirty_sync_begin_opens_every_sync_of_every_region() {
    let _deadline = Deadline::secs(120);
    let (src, dst) = (Script::default(), Script::default());
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!((sr, dr), (RmigOk, RmigOk), "{smsg}");
    let syncs = src.syncs.lock().unwrap().clone();
    assert!(
        syncs.len() >= 6,
        "round 0, a pre-copy round and the pause: {syncs:?}"
    );
    for (i, group) in syncs.chunks(3).enumerate() {
        assert_eq!(
            group,
            [-1, 0, 1],
            "sync {i}: begin, then region 0, then region 1"
        );
    }
}

#[test]
fn a_failing_dirty_sync_begin_callback_fails_the_source_before_the_pause() {
    let _deadline = Deadline::secs(120);
    let src = Script {
        fail_sync_begin: true,
        ..Default::default()
    };
    let dst = Script::default();
    let (sr, smsg, dr) = migrate_scripted(&src, &dst);
    assert_eq!(sr, RmigErrEmbedder, "{smsg}");
    assert!(
        smsg.contains("dirty_sync_begin"),
        "names the callback: {smsg}"
    );
    assert_eq!(dr, RmigErrIo, "the destination is told");
    assert_eq!(src.pauses.load(Ordering::Relaxed), 0);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 0);
}

#[test]
fn a_downtime_limit_raised_mid_migration_lets_a_stuck_migration_switch_over() {
    let _deadline = Deadline::secs(120);
    // Every page is dirty at every sync, and no downtime is short enough: without a new
    // limit this source iterates for ever (no round limit, no throttle).
    let src = Script {
        all_dirty: true,
        ..Default::default()
    };
    let dst = Script::default();
    let tune = |c: &mut RmigConfig| {
        c.downtime_limit_ms = 0;
        c.max_rounds = u32::MAX;
        c.auto_converge = 0;
    };
    let rounds_before = AtomicU64::new(0);
    let raise = |s: RmigSession| {
        wait_until(30, "five syncs", || {
            stats(s).is_ok_and(|st| st.dirty_sync_count >= 5)
        });
        rounds_before.store(stats(s).unwrap().dirty_sync_count, Ordering::Relaxed);
        assert_eq!(rmig_set_downtime_limit(s, 60_000), RmigOk);
    };
    let (sr, smsg, dr) = migrate_scripted_with(&src, &dst, tune, raise);
    assert_eq!((sr, dr), (RmigOk, RmigOk), "{smsg}");
    assert!(
        rounds_before.load(Ordering::Relaxed) >= 5,
        "it was stuck before"
    );
    assert_eq!(src.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(dst.resumes.load(Ordering::Relaxed), 1);
    assert_eq!(rmig_set_downtime_limit(0, 10), RmigErrInvalidHandle);
}

#[test]
fn a_guest_still_written_after_the_pause_fails_the_migration_and_resumes_the_source() {
    let _deadline = Deadline::secs(120);
    let src = Script {
        all_dirty: true,
        writes_when_paused: true,
        ..Default::default()
    };
    let dst = Script::default();
    let tune = |c: &mut RmigConfig| c.downtime_limit_ms = 60_000;
    let (sr, smsg, dr) = migrate_scripted_with(&src, &dst, tune, |_| {});
    assert_eq!(sr, RmigErrEmbedder, "{smsg}");
    assert!(smsg.contains("guest paused"), "says why: {smsg}");
    assert_eq!(dr, RmigErrIo, "the destination is told");
    assert_eq!(src.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(
        src.resumes.load(Ordering::Relaxed),
        1,
        "the source runs again"
    );
    assert_eq!(
        dst.resumes.load(Ordering::Relaxed),
        0,
        "one guest, never two"
    );
}

#[test]
fn a_source_cancel_answered_by_the_destination_reports_the_sources_reason() {
    let _deadline = Deadline::secs(120);
    // QEMU's `migrate_cancel`: the source's session is cancelled, then the destination, seeing
    // its stream end, cancels (frees) its own; that answer may reach the source first.
    for _ in 0..3 {
        let len = 16 << 20;
        let (mut sv, mut dv) = (mem(len), mem(len));
        let (sp, dp) = (aligned(&mut sv), aligned(&mut dv));
        // SAFETY: inside the aligned buffer.
        unsafe { sp.write_bytes(0x5a, len) };
        let (d, addr) = dest_session(&callbacks(), dp, len);
        let dt = spawn_call(move || rmig_migrate(d));
        let mut c = config(&addr);
        c.max_bandwidth = 4_000_000;
        let s = source_session(&c, sp, len);
        let st = spawn_call(move || (rmig_migrate(s), last_error()));
        wait_until(30, "round 0 under way", || {
            stats(s).is_ok_and(|st| st.ram_transferred > 0)
        });
        // SAFETY: valid C strings.
        unsafe {
            assert_eq!(rmig_cancel(s, c"operator asked".as_ptr()), RmigOk);
            assert_eq!(rmig_cancel(d, c"stream ended".as_ptr()), RmigOk);
        }
        let (sr, smsg) = within(&st, 20, "source migrate");
        assert_eq!(sr, RmigErrCancelled, "{smsg}");
        assert!(
            smsg.contains("operator asked"),
            "the source's own reason: {smsg}"
        );
        within(&dt, 20, "destination migrate");
        assert_eq!(rmig_free(s), RmigOk);
        assert_eq!(rmig_free(d), RmigOk);
    }
}
