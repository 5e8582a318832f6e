//! The frames that set up post-copy's RDMA READs, on an authenticated lane socket (inside
//! its TLS session when the session is encrypted: the ACCEPT carries the source's memory keys).
//!
//! After the switch to post-copy the destination fetches the pages it still lacks itself, with
//! one-sided RDMA READs from the source's registered memory. Before it can, the two queue pairs
//! must learn each other's address and the reader must learn where the source's memory is and
//! with which keys: three frames, exchanged once per reader.
//!
//! ```text
//!   reader (destination)                       exposure (source)
//!   CONNECT{qpn, psn, gid, depth} ───────────▶ creates an RC queue pair that allows remote
//!                                              reads and connects it
//!              ◀───────────────────────────── ACCEPT{qpn, psn, gid, depth, regions}
//!                                              (or REFUSE{why})
//! ```
//!
//! `depth` in CONNECT is how many READs the reader wants outstanding; in ACCEPT it is how many
//! the source's queue pair will answer at once (never more than asked): the reader keeps at most
//! that many outstanding, as `rdma_cm`'s initiator depth and responder resources do.
//!
//! Frames are `u32 body length (LE) | u8 kind | body`, integers little-endian, as the lane
//! connector's (`connector.rs`); the kinds differ from the connector's so that a peer speaking
//! the other exchange is refused at its first frame. A region is 24 bytes:
//! `addr u64 | len u64 | rkey u32 | page_size u32`. Decoding checks every count against the
//! bytes left and every region for sense (a power-of-two page size, a whole number of pages,
//! no address overflow) before anything is allocated or believed, and never panics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::queue::QpEndpoint;
use super::RdmaError;

/// Most regions an ACCEPT may list.
pub const MAX_REGIONS: usize = 4096;
/// Longest refusal text, in bytes.
pub const MAX_WHY: usize = 4096;
/// Bytes of an endpoint on the wire: qpn, psn, gid.
const ENDPOINT_BYTES: usize = 24;
/// Bytes of a region on the wire.
const REGION_BYTES: usize = 24;
/// Largest frame body: an ACCEPT with every region.
pub const MAX_BODY: usize = 1 + ENDPOINT_BYTES + 1 + 4 + REGION_BYTES * MAX_REGIONS;

/// Kind of a CONNECT frame.
pub const KIND_CONNECT: u8 = 0x21;
/// Kind of an ACCEPT frame.
pub const KIND_ACCEPT: u8 = 0x22;
/// Kind of a REFUSE frame.
pub const KIND_REFUSE: u8 = 0x23;

/// One region of the source's memory as a reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposedRegion {
    /// Address of the region's first byte in the source's address space.
    pub addr: u64,
    /// Length in bytes (a whole number of pages).
    pub len: u64,
    /// Remote key of its registration (remote read only).
    pub rkey: u32,
    /// The region's page size: reads are asked for in pages of it.
    pub page_size: u32,
}

impl ExposedRegion {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size as u64
    }
}

/// A message of the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSetup {
    /// The reader's queue pair and the READs it wants outstanding.
    Connect(QpEndpoint, u8),
    /// The source's queue pair, the READs it answers at once, and its memory.
    Accept(QpEndpoint, u8, Vec<ExposedRegion>),
    /// The source could not expose its memory, and why.
    Refuse(String),
}

impl ReadSetup {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ReadSetup::Connect(..) => "CONNECT",
            ReadSetup::Accept(..) => "ACCEPT",
            ReadSetup::Refuse(_) => "REFUSE",
        }
    }

    /// The frame body: kind, then fields. A refusal longer than [`MAX_WHY`] is cut at a
    /// character boundary; more than [`MAX_REGIONS`] regions cannot be encoded (the exposure
    /// refuses such a map before it gets here).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            ReadSetup::Connect(e, depth) => {
                b.push(KIND_CONNECT);
                put_endpoint(&mut b, e);
                b.push(*depth);
            }
            ReadSetup::Accept(e, depth, regions) => {
                b.push(KIND_ACCEPT);
                put_endpoint(&mut b, e);
                b.push(*depth);
                b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for r in regions {
                    b.extend_from_slice(&r.addr.to_le_bytes());
                    b.extend_from_slice(&r.len.to_le_bytes());
                    b.extend_from_slice(&r.rkey.to_le_bytes());
                    b.extend_from_slice(&r.page_size.to_le_bytes());
                }
            }
            ReadSetup::Refuse(why) => {
                b.push(KIND_REFUSE);
                let mut end = why.len().min(MAX_WHY);
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                b.extend_from_slice(&why.as_bytes()[..end]);
            }
        }
        b
    }

    /// Decodes a frame body; refuses unknown kinds, short or trailing bytes, region counts that
    /// do not fit and regions that make no sense.
    pub fn decode(body: &[u8]) -> Result<ReadSetup, RdmaError> {
        let (&kind, mut rest) = body.split_first().ok_or_else(|| bad("empty frame"))?;
        let m = match kind {
            KIND_CONNECT => {
                let e = take_endpoint(&mut rest)?;
                ReadSetup::Connect(e, take::<1>(&mut rest)?[0])
            }
            KIND_ACCEPT => {
                let e = take_endpoint(&mut rest)?;
                let depth = take::<1>(&mut rest)?[0];
                ReadSetup::Accept(e, depth, take_regions(&mut rest)?)
            }
            KIND_REFUSE => {
                if rest.len() > MAX_WHY {
                    return Err(bad("refusal text too long"));
                }
                let why = String::from_utf8_lossy(rest).into_owned();
                rest = &[];
                ReadSetup::Refuse(why)
            }
            k => return Err(bad(&format!("unknown kind {k:#04x}"))),
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

fn take<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], RdmaError> {
    let Some((a, b)) = rest.split_first_chunk::<N>() else {
        return Err(bad("truncated"));
    };
    *rest = b;
    Ok(*a)
}

fn take_endpoint(rest: &mut &[u8]) -> Result<QpEndpoint, RdmaError> {
    Ok(QpEndpoint {
        qpn: u32::from_le_bytes(take(rest)?),
        psn: u32::from_le_bytes(take(rest)?),
        gid: take(rest)?,
    })
}

fn take_regions(rest: &mut &[u8]) -> Result<Vec<ExposedRegion>, RdmaError> {
    let n = u32::from_le_bytes(take(rest)?) as usize;
    if n > MAX_REGIONS || n * REGION_BYTES != rest.len() {
        return Err(bad("region count does not fit"));
    }
    (0..n)
        .map(|i| {
            let r = ExposedRegion {
                addr: u64::from_le_bytes(take(rest)?),
                len: u64::from_le_bytes(take(rest)?),
                rkey: u32::from_le_bytes(take(rest)?),
                page_size: u32::from_le_bytes(take(rest)?),
            };
            check_region(&r).map_err(|why| bad(&format!("region {i}: {why}")))?;
            Ok(r)
        })
        .collect()
}

/// Why a region cannot be read from as described, if it cannot.
fn check_region(r: &ExposedRegion) -> Result<(), &'static str> {
    if !r.page_size.is_power_of_two() {
        return Err("page size is not a power of two");
    }
    if !r.len.is_multiple_of(r.page_size as u64) {
        return Err("length is not a whole number of pages");
    }
    if r.addr.checked_add(r.len).is_none() {
        return Err("address and length overflow");
    }
    Ok(())
}

fn bad(what: &str) -> RdmaError {
    RdmaError::Setup(format!("malformed post-copy read setup frame: {what}"))
}

fn sock_err(e: std::io::Error) -> RdmaError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            RdmaError::Setup("the peer did not answer in time".into())
        }
        std::io::ErrorKind::UnexpectedEof => RdmaError::Setup("the peer closed the socket".into()),
        _ => RdmaError::Setup(format!("lane socket: {e}")),
    }
}

/// Writes one frame on `s` (the lane socket, or its TLS session over it) and flushes it.
pub(crate) fn write_frame(s: &mut impl Write, m: &ReadSetup) -> Result<(), RdmaError> {
    let body = m.encode();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).map_err(sock_err)?;
    s.flush().map_err(sock_err)
}

/// Reads one frame from `ch` (`sock` itself, or its TLS session over it) within `wait` (the
/// whole frame, however it is split), its length checked before the body is allocated. The
/// deadline is enforced through `sock`'s read timeout, whose own value is put back after.
pub(crate) fn read_frame(
    sock: &TcpStream,
    ch: &mut impl Read,
    wait: Duration,
) -> Result<ReadSetup, RdmaError> {
    let before = sock.read_timeout().map_err(sock_err)?;
    let r = read_frame_by(sock, ch, std::time::Instant::now() + wait);
    sock.set_read_timeout(before).map_err(sock_err)?;
    r
}

fn read_frame_by(
    sock: &TcpStream,
    ch: &mut impl Read,
    deadline: std::time::Instant,
) -> Result<ReadSetup, RdmaError> {
    let mut len = [0u8; 4];
    read_by(sock, ch, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(bad(&format!(
            "{len} bytes exceed the maximum of {MAX_BODY}"
        )));
    }
    let mut body = vec![0u8; len];
    read_by(sock, ch, &mut body, deadline)?;
    ReadSetup::decode(&body)
}

/// Fills `buf` from `ch` before `deadline` (each read of `sock` gets what is left of it).
fn read_by(
    sock: &TcpStream,
    ch: &mut impl Read,
    buf: &mut [u8],
    deadline: std::time::Instant,
) -> Result<(), RdmaError> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(sock_err(std::io::ErrorKind::TimedOut.into()));
        }
        sock.set_read_timeout(Some(left)).map_err(sock_err)?;
        match ch.read(&mut buf[got..]) {
            Ok(0) => return Err(sock_err(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(sock_err(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> QpEndpoint {
        QpEndpoint {
            qpn: 0x0102_0304,
            psn: 0x00ab_cdef,
            gid: [7; 16],
        }
    }

    fn region() -> ExposedRegion {
        ExposedRegion {
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            rkey: 0x1234,
            page_size: 4096,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let all = [
            ReadSetup::Connect(endpoint(), 16),
            ReadSetup::Accept(endpoint(), 8, vec![region(), region()]),
            ReadSetup::Accept(endpoint(), 0, vec![]),
            ReadSetup::Refuse("cannot register: ENOMEM".into()),
        ];
        for m in all {
            assert_eq!(ReadSetup::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_cut_and_trailing_byte_is_refused() {
        let good = ReadSetup::Accept(endpoint(), 4, vec![region()]).encode();
        for cut in 0..good.len() {
            assert!(ReadSetup::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(ReadSetup::decode(&trailing).is_err());
        let good = ReadSetup::Connect(endpoint(), 1).encode();
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(ReadSetup::decode(&trailing).is_err());
        assert!(
            ReadSetup::decode(&[0x02]).is_err(),
            "the lane connector's ACCEPT"
        );
    }

    #[test]
    fn senseless_regions_are_refused() {
        let cases = [
            ExposedRegion {
                page_size: 3000,
                ..region()
            },
            ExposedRegion {
                page_size: 0,
                ..region()
            },
            ExposedRegion {
                len: 4097,
                ..region()
            },
            ExposedRegion {
                addr: u64::MAX - 4095,
                ..region()
            },
        ];
        for r in cases {
            let b = ReadSetup::Accept(endpoint(), 1, vec![r]).encode();
            assert!(ReadSetup::decode(&b).is_err(), "{r:?}");
        }
    }

    #[test]
    fn a_silent_peer_times_out_and_a_huge_frame_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let t = std::time::Instant::now();
        let e = read_frame(&s, &mut &s, Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            s.read_timeout().unwrap(),
            None,
            "the socket's timeout is put back"
        );
        (&c).write_all(&(MAX_BODY as u32 + 1).to_le_bytes())
            .unwrap();
        let e = read_frame(&s, &mut &s, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        write_frame(&mut &c, &ReadSetup::Refuse("no".into())).unwrap();
        assert_eq!(
            read_frame(&s, &mut &s, Duration::from_secs(5)).unwrap(),
            ReadSetup::Refuse("no".into())
        );
        drop(c);
        let e = read_frame(&s, &mut &s, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }
}
