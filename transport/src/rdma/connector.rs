//! Connecting a lane's queue pairs over the lane's own socket.
//!
//! An RDMA lane first joins the session over TCP like any lane (the engine authenticates it).
//! The two queue pairs then learn each other's address on that socket, and the source learns
//! where the destination's memory is: this exchange belongs to the transport, not to the
//! engine's control protocol, because only the transport knows what a queue pair needs.
//!
//! ```text
//!   source                                   destination
//!   CONNECT{qpn, psn, gid} ────────────────▶ registers nothing new; creates and connects its QP
//!                 ◀──────────────────────── ACCEPT{qpn, psn, gid, memory}   (or REFUSE{why})
//! ```
//!
//! Frames are `u32 body length (LE) | u8 kind | body`, integers little-endian. Every read has
//! a deadline and every length is checked before anything is allocated.
//!
//! In an encrypted session (whose RDMA lanes carry pages in clear, by the operator's explicit
//! choice) the exchange runs inside the lane's TLS session: ACCEPT hands out where the
//! destination's memory is and the keys that write it, and those only ever cross in TLS. The
//! frame I/O is generic over `Read + Write` for that; the deadline stays the socket's read
//! timeout, which bounds every socket read `rustls::Stream` makes. Afterwards the lane leaves
//! TLS: nothing more goes through the session.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::dest::{DestPrepared, RdmaDestLane};
use super::memory::{LocalMemory, RemoteMemory, RemoteRegion};
use super::queue::QpEndpoint;
use super::source::{RdmaSourceLane, SourcePrepared};
use super::{on_setup_channel, RdmaDevice, RdmaError};
use crate::Pacer;

/// Most regions a destination's memory may list.
pub const MAX_REGIONS: usize = 4096;
/// Longest refusal text.
const MAX_WHY: usize = 4096;
/// Largest frame body: an ACCEPT with every region.
const MAX_BODY: usize = 1 + 24 + 1 + 4 + 12 * MAX_REGIONS;

const CONNECT: u8 = 1;
const ACCEPT: u8 = 2;
const REFUSE: u8 = 3;
const PIN_ALL: u8 = 1;
const CHUNKED: u8 = 2;

/// A message of the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setup {
    /// The source's queue pair.
    Connect(QpEndpoint),
    /// The destination's queue pair and where its memory is.
    Accept(QpEndpoint, RemoteMemory),
    /// The destination could not set the lane up, and why.
    Refuse(String),
}

/// Source side: creates the lane's queue pair, sends its address, and connects to the
/// destination's answer. The exchange runs inside the lane's TLS session `tls` when the
/// session is encrypted (the answer carries the destination's memory addresses and keys), and
/// on the bare socket otherwise; the lane itself then runs on the socket. `wait` bounds the
/// answer (the destination may be registering its memory first): it is the socket's read
/// timeout, which bounds reads under TLS too.
pub fn connect_source_lane(
    sock: TcpStream,
    mut tls: Option<rustls::ClientConnection>,
    dev: &Arc<RdmaDevice>,
    mem: &Arc<LocalMemory>,
    pacer: Arc<Pacer>,
    wait: Duration,
) -> Result<RdmaSourceLane, RdmaError> {
    let prep = SourcePrepared::new(dev.clone(), mem.clone())?;
    sock.set_read_timeout(Some(wait)).map_err(exchange)?;
    let answer = on_setup_channel(&sock, tls.as_mut(), |mut ch| ask(&mut ch, prep.endpoint()));
    sock.set_read_timeout(None).map_err(exchange)?;
    let (peer, remote) = answer?;
    prep.connect(&peer, remote, sock, pacer)
}

/// Sends our queue pair's address on `ch` and reads the destination's answer: its queue pair
/// and where its memory is.
fn ask(
    ch: &mut (impl Read + Write),
    ours: QpEndpoint,
) -> Result<(QpEndpoint, RemoteMemory), RdmaError> {
    write_frame(ch, &Setup::Connect(ours))?;
    match read_frame(ch)? {
        Setup::Accept(endpoint, memory) => Ok((endpoint, memory)),
        Setup::Refuse(why) => Err(RdmaError::Setup(format!("destination: {why}"))),
        Setup::Connect(_) => Err(RdmaError::Setup("expected ACCEPT, got CONNECT".into())),
    }
}

/// Destination side: reads the source's queue pair address within `wait`, creates and
/// connects ours, and answers with it and `mem`'s keys, inside the lane's TLS session `tls`
/// when the session is encrypted (the keys never cross in clear then). The lane runs on
/// `sock` afterwards. A failure after the source's address came is told to the source
/// (REFUSE) before it is returned.
pub fn accept_dest_lane(
    sock: &TcpStream,
    mut tls: Option<&mut rustls::ServerConnection>,
    dev: &Arc<RdmaDevice>,
    mem: &Arc<LocalMemory>,
    wait: Duration,
) -> Result<RdmaDestLane, RdmaError> {
    sock.set_read_timeout(Some(wait)).map_err(exchange)?;
    let peer = on_setup_channel(sock, tls.as_deref_mut(), |mut ch| read_connect(&mut ch));
    sock.set_read_timeout(None).map_err(exchange)?;
    let peer = peer?;
    let lane = DestPrepared::new(dev.clone(), mem.clone()).and_then(|prep| {
        let endpoint = prep.endpoint();
        let stream = sock.try_clone().map_err(exchange)?;
        Ok((endpoint, prep.connect(&peer, stream)?))
    });
    let (answer, result) = match lane {
        Ok((endpoint, lane)) => (Setup::Accept(endpoint, mem.remote()), Ok(lane)),
        Err(e) => (Setup::Refuse(e.to_string()), Err(e)),
    };
    let sent = on_setup_channel(sock, tls, |mut ch| write_frame(&mut ch, &answer));
    // A refusal that could not be sent is still the refusal's error.
    let lane = result?;
    sent.map(|()| lane)
}

/// Reads the source's CONNECT from `ch`.
fn read_connect(ch: &mut impl Read) -> Result<QpEndpoint, RdmaError> {
    match read_frame(ch)? {
        Setup::Connect(endpoint) => Ok(endpoint),
        other => Err(RdmaError::Setup(format!(
            "expected CONNECT, got {}",
            other.name()
        ))),
    }
}

impl Setup {
    fn name(&self) -> &'static str {
        match self {
            Setup::Connect(_) => "CONNECT",
            Setup::Accept(..) => "ACCEPT",
            Setup::Refuse(_) => "REFUSE",
        }
    }

    /// The frame body: kind, then fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Setup::Connect(e) => {
                b.push(CONNECT);
                put_endpoint(&mut b, e);
            }
            Setup::Accept(e, memory) => {
                b.push(ACCEPT);
                put_endpoint(&mut b, e);
                put_memory(&mut b, memory);
            }
            Setup::Refuse(why) => {
                b.push(REFUSE);
                let mut end = why.len().min(MAX_WHY);
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                b.extend_from_slice(&why.as_bytes()[..end]);
            }
        }
        b
    }

    /// Decodes a frame body; refuses unknown kinds, short or trailing bytes.
    pub fn decode(body: &[u8]) -> Result<Setup, RdmaError> {
        let (&kind, mut rest) = body.split_first().ok_or_else(|| bad("empty frame"))?;
        let m = match kind {
            CONNECT => Setup::Connect(take_endpoint(&mut rest)?),
            ACCEPT => {
                let e = take_endpoint(&mut rest)?;
                Setup::Accept(e, take_memory(&mut rest)?)
            }
            REFUSE => {
                let why = String::from_utf8_lossy(rest).into_owned();
                rest = &[];
                Setup::Refuse(why)
            }
            k => return Err(bad(&format!("unknown kind {k}"))),
        };
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(m)
    }
}

fn put_endpoint(b: &mut Vec<u8>, e: &QpEndpoint) {
    b.extend_from_slice(&e.qpn.to_le_bytes());
    b.extend_from_slice(&e.psn.to_le_bytes());
    b.extend_from_slice(&e.gid);
}

fn put_memory(b: &mut Vec<u8>, memory: &RemoteMemory) {
    match memory {
        RemoteMemory::PinAll(regions) => {
            b.push(PIN_ALL);
            b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for r in regions {
                b.extend_from_slice(&r.addr.to_le_bytes());
                b.extend_from_slice(&r.rkey.to_le_bytes());
            }
        }
        RemoteMemory::Chunked {
            chunk_bytes,
            max_chunks,
        } => {
            b.push(CHUNKED);
            b.extend_from_slice(&chunk_bytes.to_le_bytes());
            b.extend_from_slice(&max_chunks.to_le_bytes());
        }
    }
}

fn take<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], RdmaError> {
    if rest.len() < N {
        return Err(bad("truncated"));
    }
    let (a, b) = rest.split_at(N);
    *rest = b;
    Ok(a.try_into().expect("length checked"))
}

fn take_endpoint(rest: &mut &[u8]) -> Result<QpEndpoint, RdmaError> {
    Ok(QpEndpoint {
        qpn: u32::from_le_bytes(take(rest)?),
        psn: u32::from_le_bytes(take(rest)?),
        gid: take(rest)?,
    })
}

fn take_memory(rest: &mut &[u8]) -> Result<RemoteMemory, RdmaError> {
    match take::<1>(rest)?[0] {
        PIN_ALL => {
            let n = u32::from_le_bytes(take(rest)?) as usize;
            if n > MAX_REGIONS || n * 12 > rest.len() {
                return Err(bad("region count does not fit"));
            }
            let regions = (0..n)
                .map(|_| {
                    Ok(RemoteRegion {
                        addr: u64::from_le_bytes(take(rest)?),
                        rkey: u32::from_le_bytes(take(rest)?),
                    })
                })
                .collect::<Result<_, RdmaError>>()?;
            Ok(RemoteMemory::PinAll(regions))
        }
        CHUNKED => Ok(RemoteMemory::Chunked {
            chunk_bytes: u64::from_le_bytes(take(rest)?),
            max_chunks: u32::from_le_bytes(take(rest)?),
        }),
        m => Err(bad(&format!("unknown registration mode {m}"))),
    }
}

fn bad(what: &str) -> RdmaError {
    RdmaError::Setup(format!("malformed setup frame: {what}"))
}

fn exchange(e: std::io::Error) -> RdmaError {
    RdmaError::Setup(format!("lane socket: {e}"))
}

/// Writes one frame on `s` (a socket, or a TLS stream over one) and flushes it.
fn write_frame(s: &mut impl Write, m: &Setup) -> Result<(), RdmaError> {
    let body = m.encode();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).map_err(exchange)?;
    s.flush().map_err(exchange)
}

/// Reads one frame from `s` (a socket, or a TLS stream over one), its length checked before
/// the body is allocated. A read that times out (the socket's read timeout) or a socket that
/// ends says so.
fn read_frame(s: &mut impl Read) -> Result<Setup, RdmaError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(timed)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(bad(&format!(
            "{len} bytes exceed the maximum of {MAX_BODY}"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(timed)?;
    Setup::decode(&body)
}

fn timed(e: std::io::Error) -> RdmaError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            RdmaError::Setup("the peer did not answer in time".into())
        }
        std::io::ErrorKind::UnexpectedEof => RdmaError::Setup("the peer closed the lane".into()),
        _ => exchange(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn endpoint() -> QpEndpoint {
        QpEndpoint {
            qpn: 0x0102_0304,
            psn: 0x00ab_cdef,
            gid: [7; 16],
        }
    }

    #[test]
    fn every_setup_message_round_trips() {
        let all = [
            Setup::Connect(endpoint()),
            Setup::Accept(
                endpoint(),
                RemoteMemory::PinAll(vec![
                    RemoteRegion { addr: 1, rkey: 2 },
                    RemoteRegion {
                        addr: u64::MAX,
                        rkey: u32::MAX,
                    },
                ]),
            ),
            Setup::Accept(
                endpoint(),
                RemoteMemory::Chunked {
                    chunk_bytes: 64 << 20,
                    max_chunks: 9,
                },
            ),
            Setup::Refuse("no queue pair: ENOMEM".into()),
        ];
        for m in all {
            assert_eq!(Setup::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn the_wire_is_what_the_docs_say() {
        let b = Setup::Connect(endpoint()).encode();
        let mut want = vec![CONNECT, 4, 3, 2, 1, 0xef, 0xcd, 0xab, 0];
        want.extend_from_slice(&[7; 16]);
        assert_eq!(b, want);
        let chunked = RemoteMemory::Chunked {
            chunk_bytes: 0x10,
            max_chunks: 3,
        };
        let b = Setup::Accept(endpoint(), chunked).encode();
        assert_eq!(&b[25..], &[CHUNKED, 0x10, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let good = Setup::Accept(endpoint(), RemoteMemory::PinAll(vec![])).encode();
        for cut in 0..good.len() {
            assert!(Setup::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Setup::decode(&trailing).is_err());
        assert!(Setup::decode(&[9]).is_err());
        let mut huge = good[..26].to_vec();
        huge.extend_from_slice(&(MAX_REGIONS as u32 + 1).to_le_bytes());
        assert!(Setup::decode(&huge).is_err());
    }

    #[test]
    fn a_long_refusal_is_cut_at_a_character() {
        let why = "é".repeat(MAX_WHY);
        let b = Setup::Refuse(why).encode();
        assert!(b.len() <= 1 + MAX_WHY);
        assert!(matches!(Setup::decode(&b).unwrap(), Setup::Refuse(s) if !s.is_empty()));
    }

    /// A relay that forwards one connection both ways and keeps every byte it saw.
    fn tap(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let keep = seen.clone();
        std::thread::spawn(move || {
            let (a, _) = l.accept().unwrap();
            let b = TcpStream::connect(target).unwrap();
            for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let keep = keep.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        keep.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        (addr, seen)
    }

    /// A TLS 1.3 client and server configuration around a throwaway certificate.
    fn tls_configs() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["lane.test".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(client), Arc::new(server))
    }

    /// What a destination's ACCEPT carries that an observer must not learn.
    const SECRET: RemoteRegion = RemoteRegion {
        addr: 0x7e57_5ec2_e7ad_d2e5,
        rkey: 0x5ec2_e7f0,
    };

    /// Runs the exchange (`ask` on the source, `read_connect` and an ACCEPT on the
    /// destination) through a tap, in TLS or not; returns what the source learnt and what the
    /// tap saw. The destination answers after `answer_after` (or never), the source's socket
    /// reads time out after `wait`.
    fn exchange_through_tap(
        tls: bool,
        answer_after: Option<Duration>,
        wait: Duration,
    ) -> (Result<(QpEndpoint, RemoteMemory), RdmaError>, Vec<u8>) {
        let (client, server) = tls_configs();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (via, seen) = tap(l.local_addr().unwrap());
        let dest = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let answer = Setup::Accept(endpoint(), RemoteMemory::PinAll(vec![SECRET]));
            let mut conn = rustls::ServerConnection::new(server).unwrap();
            let mut plain = &s;
            let mut sealed = rustls::Stream::new(&mut conn, &mut plain);
            let ch: &mut dyn ReadWrite = if tls { &mut sealed } else { &mut &s };
            let peer = read_connect(&mut &mut *ch).unwrap();
            assert_eq!(peer, endpoint());
            match answer_after {
                Some(d) => {
                    std::thread::sleep(d);
                    write_frame(&mut &mut *ch, &answer).unwrap();
                }
                // Holds the connection open, silent, until the source gives up.
                None => while ch.read(&mut [0u8; 64]).is_ok_and(|n| n > 0) {},
            }
        });
        let sock = TcpStream::connect(via).unwrap();
        sock.set_read_timeout(Some(wait)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("lane.test").unwrap();
        let got = if tls {
            let mut conn = rustls::ClientConnection::new(client, name).unwrap();
            ask(&mut rustls::Stream::new(&mut conn, &mut &sock), endpoint())
        } else {
            ask(&mut &sock, endpoint())
        };
        drop(sock);
        dest.join().unwrap();
        let seen = seen.lock().unwrap().clone();
        (got, seen)
    }

    use crate::rdma::SetupChannel as ReadWrite;

    fn saw(seen: &[u8], needle: &[u8]) -> bool {
        seen.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_key_exchange_inside_tls_never_shows_the_addresses_or_keys() {
        let quick = Some(Duration::ZERO);
        let wait = Duration::from_secs(10);
        for tls in [false, true] {
            let (got, seen) = exchange_through_tap(tls, quick, wait);
            let (peer, memory) = got.expect("the exchange completes");
            assert_eq!(peer, endpoint());
            assert_eq!(memory, RemoteMemory::PinAll(vec![SECRET]));
            let visible = !tls;
            let what = if tls { "in TLS" } else { "in clear" };
            assert_eq!(
                saw(&seen, &SECRET.addr.to_le_bytes()),
                visible,
                "{what}: address"
            );
            assert_eq!(
                saw(&seen, &SECRET.rkey.to_le_bytes()),
                visible,
                "{what}: rkey"
            );
            assert_eq!(saw(&seen, &endpoint().gid), visible, "{what}: gid");
        }
    }

    #[test]
    fn under_tls_the_sockets_read_timeout_still_bounds_the_answer() {
        let t = std::time::Instant::now();
        let (got, _) = exchange_through_tap(true, None, Duration::from_millis(200));
        let e = got.unwrap_err();
        assert!(e.to_string().contains("in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // And an answer that comes in time is read through TLS.
        let slow = Some(Duration::from_millis(100));
        let (got, _) = exchange_through_tap(true, slow, Duration::from_secs(5));
        assert!(got.is_ok(), "{got:?}");
    }

    #[test]
    fn a_silent_peer_times_out_and_an_oversized_frame_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let t = std::time::Instant::now();
        let e = read_frame(&mut s).unwrap_err();
        assert!(e.to_string().contains("in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        c.write_all(&(MAX_BODY as u32 + 1).to_le_bytes()).unwrap();
        let e = read_frame(&mut s).unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        drop(c);
        let e = read_frame(&mut s).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }
}
