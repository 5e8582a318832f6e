//! Encrypted migrations: what a relay on the path can see and do, and the credentials checks.
//!
//! Relays here: a tap that forwards bytes and keeps what went to the destination (optionally
//! flipping one byte of a data lane), and a man in the middle that terminates TLS towards
//! both ends with its own certificate. Certificates are made in the test with rcgen, with
//! chosen names and validity dates.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rmig_engine::X509Creds;
use rmig_engine::{
    DestListener, DestOutcome, Encryption, EngineError, Key, MigrationStats, MigrationStatus,
};
use rmig_tests::{assert_same, last_refusal, Deadline, Mem, Setup};

const MIB: usize = 1 << 20;

/// 32 bytes no random memory holds by chance.
const MARKER: &[u8; 32] = b"rmig-secret-marker-0123456789abc";

// ---------------------------------------------------------------------------------------
// A tap: forwards every connection to the target, keeps what went to it, and may flip one
// byte of one connection.

/// Flip the byte at `offset` of the `conn`th connection's bytes towards the destination
/// (connections counted from 0 in accept order: 0 is the control connection); with `back`,
/// instead the last byte of the first piece the destination sends back once `offset` bytes
/// went towards it (the end of an acknowledgement's record: its tag).
#[derive(Clone, Copy)]
struct Flip {
    conn: usize,
    offset: u64,
    back: bool,
}

struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    flipped: Arc<AtomicBool>,
}

impl Tap {
    fn start(target: SocketAddr, flip: Option<Flip>) -> Tap {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let flipped = Arc::new(AtomicBool::new(false));
        let (seen2, stop2, flipped2) = (seen.clone(), stop.clone(), flipped.clone());
        std::thread::spawn(move || {
            let n = AtomicUsize::new(0);
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((a, _)) => {
                        a.set_nonblocking(false).unwrap();
                        let i = n.fetch_add(1, Ordering::Relaxed);
                        let b = TcpStream::connect(target).unwrap();
                        let f = flip.filter(|f| f.conn == i);
                        let sent = Arc::new(AtomicU64::new(0));
                        let there = f.filter(|f| !f.back).map(|f| Trigger::At(f.offset));
                        let back = f
                            .filter(|f| f.back)
                            .map(|f| Trigger::After(sent.clone(), f.offset));
                        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                        pump(a2, b2, Some(seen2.clone()), there, sent, flipped2.clone());
                        let none = Arc::new(AtomicU64::new(0));
                        pump(b, a, None, back, none, flipped2.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Tap {
            addr,
            seen,
            stop,
            flipped,
        }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    fn bytes_seen(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Which byte a pump flips.
enum Trigger {
    /// The byte at this offset.
    At(u64),
    /// The last byte of the first piece read once the counter has reached this many bytes.
    After(Arc<AtomicU64>, u64),
}

/// Copies `from` to `to` on a thread of its own, keeping the bytes in `keep`, counting them
/// in `count`, flipping one byte as `flip` says.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    keep: Option<Arc<Mutex<Vec<u8>>>>,
    flip: Option<Trigger>,
    count: Arc<AtomicU64>,
    flipped: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let hit = match &flip {
                Some(Trigger::At(f)) => (*f >= at && *f < at + n as u64).then(|| *f - at),
                Some(Trigger::After(c, f)) if !flipped.load(Ordering::Relaxed) => {
                    (c.load(Ordering::Relaxed) >= *f).then_some(n as u64 - 1)
                }
                _ => None,
            };
            if let Some(i) = hit {
                buf[i as usize] ^= 0x01;
                flipped.store(true, Ordering::Relaxed);
            }
            at += n as u64;
            if let Some(k) = &keep {
                k.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Source memory of `len` random bytes with the marker at the start of every 64th page.
fn marked(len: usize) -> Mem {
    let mut m = Mem::random(len, 0.0, 7);
    for page in (0..len / 4096).step_by(64) {
        m.bytes_mut()[page * 4096..page * 4096 + 32].copy_from_slice(MARKER);
    }
    m
}

type Outcome = (
    Result<MigrationStats, EngineError>,
    Result<DestOutcome, EngineError>,
);

/// A setup with `enc` at both ends and short deadlines.
fn setup(src: &Mem, dst: &Mem, len: usize, enc: Encryption) -> Setup {
    let mut s = Setup::new(src, dst, len);
    s.src.encryption = enc.clone();
    s.dst.encryption = enc;
    s.src.handshake_timeout = Duration::from_secs(3);
    s.src.reconnect_window = Duration::ZERO;
    s.dst.incoming_timeout = Some(Duration::from_secs(4));
    s
}

/// Runs `s` through a tap; returns the outcome and the tap.
fn run_tapped(mut s: Setup, flip: Option<Flip>) -> (Outcome, Tap) {
    let (d, port) = s.spawn_dest("127.0.0.1:0").expect("destination");
    let tap = Tap::start(([127, 0, 0, 1], port).into(), flip);
    s.src.dest = tap.addr.to_string();
    let r = migrate(s);
    ((r, d.join().expect("destination thread")), tap)
}

/// Runs the source of `s` (its destination started elsewhere).
fn migrate(s: Setup) -> Result<MigrationStats, EngineError> {
    rmig_engine::driver::migrate(s.src, s.src_regions, s.dirty, s.embedder, s.src_monitor)
}

#[test]
fn psk_migration_verifies_and_reports_encryption() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.3, 3);
    let dst = Mem::new(len);
    let (s, d) = setup(&src, &dst, len, Encryption::Psk).run();
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(s.verified, Some(true));
    assert_eq!(s.encryption, "tls-psk");
    assert_eq!(d.stats.encryption, "tls-psk");
    assert!(s.data_lanes_encrypted && d.stats.data_lanes_encrypted);
    // `auto` over TLS: why not RDMA is in the statistics (the library prints nothing).
    let why = s.fallback_reason.as_deref().unwrap_or_default();
    assert!(why.contains("encryption is on"), "{why:?}");
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn marker_never_on_the_wire_with_encryption() {
    let _deadline = Deadline::secs(120);
    let len = 16 * MIB;
    let src = marked(len);
    for (enc, visible) in [(Encryption::Off, true), (Encryption::Psk, false)] {
        let dst = Mem::new(len);
        let name = enc.name();
        let ((s, d), tap) = run_tapped(setup(&src, &dst, len, enc), None);
        let s = s.unwrap_or_else(|e| panic!("{name}: source: {e}"));
        d.unwrap_or_else(|e| panic!("{name}: destination: {e}"));
        assert_eq!(s.verified, Some(true), "{name}");
        assert_same(src.bytes(), dst.bytes());
        assert!(
            tap.bytes_seen() >= len,
            "{name}: the tap saw {} bytes",
            tap.bytes_seen()
        );
        assert_eq!(tap.saw(MARKER), visible, "{name}: marker on the wire");
    }
}

#[test]
fn flipped_byte_ends_the_lane_and_never_lands() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 11);
    let dst = Mem::new(len);
    // Connection 1 is the first data lane; 1 MiB in, its records carry pages.
    let flip = Flip {
        conn: 1,
        offset: MIB as u64,
        back: false,
    };
    let ((s, d), tap) = run_tapped(setup(&src, &dst, len, Encryption::Psk), Some(flip));
    assert!(
        tap.flipped.load(Ordering::Relaxed),
        "the tap flipped no byte"
    );
    match (s, d) {
        (Ok(s), Ok(d)) => {
            // The lane ended and its pages went over the other lane.
            assert_eq!(s.verified, Some(true));
            assert_eq!(d.stats.status, MigrationStatus::Completed);
            assert!(s.lanes_failed >= 1, "no lane ended: {s:?}");
            assert_same(src.bytes(), dst.bytes());
        }
        (s, d) => {
            // Or it failed cleanly: the destination did not resume.
            let d_ok = d
                .as_ref()
                .map(|d| d.stats.status == MigrationStatus::Completed);
            assert_ne!(d_ok.ok(), Some(true), "destination resumed after {s:?}");
        }
    }
}

#[test]
fn flipped_acknowledgement_ends_the_lane_at_once() {
    let _deadline = Deadline::secs(120);
    let len = 32 * MIB;
    let src = Mem::random(len, 0.0, 12);
    let dst = Mem::new(len);
    // The first acknowledgement the first data lane carries after 1 MiB of pages: its
    // record's tag changed, so it fails to open at the source.
    let flip = Flip {
        conn: 1,
        offset: MIB as u64,
        back: true,
    };
    let mut s = setup(&src, &dst, len, Encryption::Psk);
    // A lane that ignored the broken record would only end when its acknowledgements time out
    // (twice this): far longer than the migration may take here.
    s.src.liveness.peer_timeout = Duration::from_secs(30);
    let t = std::time::Instant::now();
    let ((s, d), tap) = run_tapped(s, Some(flip));
    let took = t.elapsed();
    assert!(
        tap.flipped.load(Ordering::Relaxed),
        "the tap flipped no byte"
    );
    let s = s.expect("the source completes on the other lane");
    assert!(s.lanes_failed >= 1, "no lane ended: {s:?}");
    assert_eq!(s.verified, Some(true));
    assert_eq!(
        d.expect("destination").stats.status,
        MigrationStatus::Completed
    );
    assert_same(src.bytes(), dst.bytes());
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

// ---------------------------------------------------------------------------------------
// A man in the middle that terminates TLS with its own certificate at both ends.

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Starts a relay that terminates TLS from the source with its own certificate and opens
/// TLS to `target`, passing plaintext between them. Returns its address.
fn mitm(target: SocketAddr) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ck = rcgen::generate_simple_self_signed(vec!["rmig".into(), "127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let until = tokio::time::sleep(Duration::from_secs(30));
            tokio::pin!(until);
            loop {
                let (a, _) = tokio::select! {
                    r = l.accept() => r.unwrap(),
                    _ = &mut until => return,
                };
                let (acceptor, connector) = (acceptor.clone(), connector.clone());
                tokio::spawn(async move {
                    let Ok(mut a) = acceptor.accept(a).await else {
                        return;
                    };
                    let b = tokio::net::TcpStream::connect(target).await.unwrap();
                    let name = rustls::pki_types::ServerName::try_from("rmig").unwrap();
                    let Ok(mut b) = connector.connect(name, b).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
            }
        });
    });
    addr
}

#[test]
fn psk_relay_with_its_own_tls_fails_the_bound_proof() {
    let _deadline = Deadline::secs(60);
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 5);
    let dst = Mem::new(len);
    let mut s = setup(&src, &dst, len, Encryption::Psk);
    let (d, port) = s.spawn_dest("127.0.0.1:0").unwrap();
    s.src.dest = mitm(([127, 0, 0, 1], port).into()).to_string();
    let r = migrate(s);
    let e = r.expect_err("the source must refuse a relayed session");
    assert!(e.to_string().contains("could not prove"), "source: {e}");
    let d = last_refusal(d.join().unwrap().expect_err("no source may be accepted"));
    assert!(matches!(d, EngineError::Auth(_)), "destination: {d}");
    assert!(
        dst.bytes().iter().all(|&b| b == 0),
        "bytes landed through the relay"
    );
}

// ---------------------------------------------------------------------------------------
// x509 credentials.

/// A certificate's validity and names.
#[derive(Clone, Copy)]
struct Spec {
    names: &'static [&'static str],
    from: i32,
    until: i32,
}

const GOOD: Spec = Spec {
    names: &["localhost", "127.0.0.1"],
    from: 2020,
    until: 2099,
};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes `stem-cert.pem` and `stem-key.pem` (mode 600) into `dir`, signed by `ca`.
fn issue(dir: &Path, stem: &str, ca: &Ca, spec: Spec, usage: ExtendedKeyUsagePurpose) {
    use std::os::unix::fs::PermissionsExt;
    let names: Vec<String> = spec.names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names).unwrap();
    p.not_before = rcgen::date_time_ymd(spec.from, 1, 1);
    p.not_after = rcgen::date_time_ymd(spec.until, 1, 1);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.join(format!("{stem}-cert.pem")), cert.pem()).unwrap();
    let kp = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&kp, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A credentials directory as QEMU lays it out: `ca` as ca-cert.pem, server and client
/// certificates signed by `signer`.
fn creds(name: &str, ca_in_dir: &Ca, signer: &Ca, server: Spec, client: Spec) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rmig-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_in_dir.cert.pem()).unwrap();
    issue(
        &dir,
        "server",
        signer,
        server,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    issue(
        &dir,
        "client",
        signer,
        client,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    dir
}

fn x509(dir: &Path) -> Encryption {
    Encryption::X509(X509Creds {
        dir: dir.to_path_buf(),
        hostname: None,
    })
}

/// Migrates 4 MiB with the source using `src_dir` and the destination `dst_dir`; returns
/// both results (the destination's error is its last refusal when it gave up waiting).
fn run_x509(
    src_enc: Encryption,
    dst_enc: Encryption,
) -> (
    Result<MigrationStats, EngineError>,
    Result<DestOutcome, EngineError>,
    Mem,
    Mem,
) {
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 9);
    let dst = Mem::new(len);
    let mut s = setup(&src, &dst, len, src_enc);
    s.dst.encryption = dst_enc;
    let (a, b) = s.run();
    let b = b.map_err(|e| match e {
        e @ EngineError::NoSource { .. } => last_refusal(e),
        e => e,
    });
    (a, b, src, dst)
}

#[test]
fn x509_mutual_migration_verifies() {
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let dir = creds("good", &ca, &ca, GOOD, GOOD);
    let (s, d, src, dst) = run_x509(x509(&dir), x509(&dir));
    let s = s.expect("source");
    assert_eq!(s.verified, Some(true));
    assert_eq!(s.encryption, "tls-x509");
    assert_eq!(d.expect("destination").stats.encryption, "tls-x509");
    assert_same(src.bytes(), dst.bytes());
}

/// Runs a migration with credentials that must fail; checks both ends' messages.
fn refused(src: Encryption, dst: Encryption, src_says: &str, dst_says: &str) {
    let (s, d, _, dst_mem) = run_x509(src, dst);
    let s = s.expect_err("the source must fail").to_string();
    let d = d.expect_err("the destination must fail").to_string();
    assert!(s.contains(src_says), "source said: {s}");
    assert!(d.contains(dst_says), "destination said: {d}");
    assert!(dst_mem.bytes().iter().all(|&b| b == 0), "bytes landed");
}

#[test]
fn x509_wrong_ca_is_refused_on_both_sides() {
    let _deadline = Deadline::secs(60);
    let (ca1, ca2) = (ca("CA one"), ca("CA two"));
    let good = creds("ca-good", &ca1, &ca1, GOOD, GOOD);
    // The destination's certificate comes from another CA than the source trusts.
    let other = creds("ca-other", &ca2, &ca2, GOOD, GOOD);
    refused(
        x509(&good),
        x509(&other),
        "not signed by our CA",
        "not signed by its CA",
    );
}

#[test]
fn x509_expired_and_not_yet_valid_are_refused() {
    let _deadline = Deadline::secs(90);
    let ca = ca("rmig test CA");
    let good = creds("time-good", &ca, &ca, GOOD, GOOD);
    let old = Spec {
        from: 2010,
        until: 2015,
        ..GOOD
    };
    let expired = creds("expired", &ca, &ca, old, old);
    refused(
        x509(&good),
        x509(&expired),
        "has expired",
        "refused our certificate: it has expired",
    );
    let future = Spec {
        from: 2090,
        until: 2099,
        ..GOOD
    };
    let early = creds("early", &ca, &ca, GOOD, future);
    // The source's client certificate is not valid yet: the destination refuses it.
    refused(
        x509(&early),
        x509(&good),
        "refused our certificate",
        "not valid yet",
    );
}

#[test]
fn x509_wrong_hostname_is_refused_unless_overridden() {
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let other = Spec {
        names: &["dest.example"],
        ..GOOD
    };
    let dir = creds("name", &ca, &ca, other, GOOD);
    refused(
        x509(&dir),
        x509(&dir),
        "not valid for the name",
        "refused our certificate",
    );
    let named = Encryption::X509(X509Creds {
        dir: dir.clone(),
        hostname: Some("dest.example".into()),
    });
    let (s, _, src, dst) = run_x509(named, x509(&dir));
    assert_eq!(s.expect("with --tls-hostname").verified, Some(true));
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn x509_missing_files_and_readable_keys_are_clear_errors() {
    use std::os::unix::fs::PermissionsExt;
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let dir = creds("files", &ca, &ca, GOOD, GOOD);
    let missing = creds("missing", &ca, &ca, GOOD, GOOD);
    std::fs::remove_file(missing.join("client-key.pem")).unwrap();
    std::fs::remove_file(missing.join("server-cert.pem")).unwrap();
    let (s, d, _, _) = run_x509(x509(&missing), x509(&missing));
    let s = s.unwrap_err().to_string();
    assert!(
        s.contains("client-key.pem") && s.contains("cannot read"),
        "source: {s}"
    );
    let d = d.unwrap_err().to_string();
    assert!(
        d.contains("server-cert.pem") && d.contains("cannot read"),
        "destination: {d}"
    );
    for f in ["client-key.pem", "server-key.pem"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (s, d, _, _) = run_x509(x509(&dir), x509(&dir));
    let s = s.unwrap_err().to_string();
    assert!(
        s.contains("client-key.pem") && s.contains("chmod 600"),
        "source: {s}"
    );
    let d = d.unwrap_err().to_string();
    assert!(
        d.contains("server-key.pem") && d.contains("chmod 600"),
        "destination: {d}"
    );
}

#[test]
fn mismatched_encryption_is_a_clear_error() {
    let _deadline = Deadline::secs(60);
    let (s, d, _, _) = run_x509(Encryption::Psk, Encryption::Off);
    let s = s.unwrap_err().to_string();
    assert!(s.contains("does not speak TLS"), "source: {s}");
    assert!(d.unwrap_err().to_string().contains("encryption is off"));
    let (s, d, _, _) = run_x509(Encryption::Off, Encryption::Psk);
    assert!(s.unwrap_err().to_string().contains("requires encryption"));
    assert!(d.unwrap_err().to_string().contains("requires encryption"));
}

#[test]
fn x509_relay_with_its_own_certificate_is_refused() {
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let dir = creds("mitm", &ca, &ca, GOOD, GOOD);
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 5);
    let dst = Mem::new(len);
    let mut s = setup(&src, &dst, len, x509(&dir));
    let (d, port) = s.spawn_dest("127.0.0.1:0").unwrap();
    s.src.dest = mitm(([127, 0, 0, 1], port).into()).to_string();
    let r = migrate(s);
    let e = r.expect_err("the source must refuse the relay's certificate");
    assert!(
        e.to_string().contains("not signed by our CA"),
        "source: {e}"
    );
    let _ = d.join();
    assert!(
        dst.bytes().iter().all(|&b| b == 0),
        "bytes landed through the relay"
    );
}

// ---------------------------------------------------------------------------------------
// x509 without a pre-shared key: the certificates authenticate both ends, and each session's
// key is derived from its control connection's TLS session.

/// `run_x509`, with the given keys at the source and the destination.
fn run_x509_keys(
    enc: Encryption,
    src_key: Key,
    dst_key: Key,
) -> (
    Result<MigrationStats, EngineError>,
    Result<DestOutcome, EngineError>,
    Mem,
    Mem,
) {
    let len = 4 * MIB;
    let src = Mem::random(len, 0.0, 11);
    let dst = Mem::new(len);
    let mut s = setup(&src, &dst, len, enc);
    s.src.key = src_key;
    s.dst.key = dst_key;
    let (a, b) = s.run();
    (a, b.map_err(last_refusal), src, dst)
}

#[test]
fn x509_without_a_key_migrates_and_verifies() {
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let dir = creds("keyless", &ca, &ca, GOOD, GOOD);
    let (s, d, src, dst) = run_x509_keys(x509(&dir), Key::per_session(), Key::per_session());
    let s = s.expect("source");
    assert_eq!(s.verified, Some(true));
    assert_eq!(s.encryption, "tls-x509");
    assert_eq!(s.lanes, 2, "both lanes proved the session");
    d.expect("destination");
    assert_same(src.bytes(), dst.bytes());
}

#[test]
fn a_key_at_one_end_only_is_refused() {
    let _deadline = Deadline::secs(60);
    let ca = ca("rmig test CA");
    let dir = creds("one-key", &ca, &ca, GOOD, GOOD);
    let (s, d, _, dst) = run_x509_keys(x509(&dir), Key::per_session(), rmig_tests::key());
    let s = s.expect_err("the source must fail").to_string();
    let d = d.expect_err("the destination must fail").to_string();
    assert!(s.contains("could not prove"), "source: {s}");
    assert!(d.contains("could not prove"), "destination: {d}");
    assert!(dst.bytes().iter().all(|&b| b == 0), "bytes landed");
}

#[test]
fn no_key_without_x509_is_refused_before_connecting() {
    let _deadline = Deadline::secs(60);
    for enc in [Encryption::Psk, Encryption::Off] {
        let (src, dst) = (Mem::new(MIB), Mem::new(MIB));
        let mut s = setup(&src, &dst, MIB, enc.clone());
        s.dst.key = Key::per_session();
        let e = match DestListener::bind("127.0.0.1:0", s.dst.clone()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a {} destination without a key was accepted", enc.name()),
        };
        assert!(e.contains("no pre-shared key"), "destination: {e}");
        // The source: refused before it connects (nothing listens at port 1).
        s.src.key = Key::per_session();
        s.src.dest = "127.0.0.1:1".into();
        let e = migrate(s).expect_err("the source must refuse").to_string();
        assert!(e.contains("no pre-shared key"), "source: {e}");
    }
}

/// A reset of every connection mid-round: the source reconnects, its proof made with the
/// session's derived key (from the first control connection) and bound to the new one.
#[test]
fn x509_without_a_key_reconnects_after_a_reset() {
    use rmig_tests::proxy::{Break, Proxy};
    let _deadline = Deadline::secs(120);
    let ca = ca("rmig test CA");
    let dir = creds("keyless-reset", &ca, &ca, GOOD, GOOD);
    let len = 48 * MIB;
    let src = Mem::random(len, 0.1, 13);
    let dst = Mem::new(len);
    let mut s = setup(&src, &dst, len, x509(&dir));
    s.src.key = Key::per_session();
    s.dst.key = Key::per_session();
    s.src.reconnect_window = Duration::from_secs(10);
    s.dst.reconnect_window = Duration::from_secs(10);
    s.dst.incoming_timeout = Some(Duration::from_secs(20));
    s.src.max_bandwidth = 40_000_000;
    let (sm, dm) = (s.src_monitor.clone(), s.dst_monitor.clone());
    let (d, port) = s.spawn_dest("127.0.0.1:0").unwrap();
    let target = ([127, 0, 0, 1], port).into();
    let proxy = Proxy::start_opaque(target, 8 * MIB as u64, Break::Reset);
    s.src.dest = proxy.addr().to_string();
    let r = migrate(s);
    let d = d.join().expect("destination thread");
    drop(proxy);
    let s = r.expect("the migration completes after the reset");
    d.expect("the destination completes after the reset");
    assert_eq!(s.verified, Some(true));
    assert!(sm.stats().reconnects >= 1 && dm.stats().reconnects >= 1);
    assert_same(src.bytes(), dst.bytes());
}
