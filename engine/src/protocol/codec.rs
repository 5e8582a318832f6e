//! Length-prefixed binary frames: `u32 length (LE) | u8 tag | fields`, integers little-endian,
//! strings and vectors prefixed by a `u32` count.
//!
//! [`decode`] is the only way in: it refuses unknown tags, truncated or trailing bytes,
//! invalid UTF-8, counts that cannot fit in the frame, and frames above [`MAX_FRAME`].
//!
//! Readers learn a frame's type before they allocate its body: the length prefix and the tag
//! byte are read first and checked against that type's own limit ([`Limits::max_body`]), so a
//! peer cannot make us allocate 16 MiB for a message that holds a few bytes. Decoding never
//! allocates much more than the frame it reads (every count is checked against what is left,
//! and nested counts are capped).

use super::{Message, QpEndpoint, RemoteMemory, RemoteRegion, TransportKind};
use crate::region::RegionDesc;
use crate::EngineError;

/// Largest frame body accepted (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest string accepted inside a frame.
const MAX_STR: usize = 64 << 10;
/// Most regions a session may have (region tables, checksums, RDMA keys).
pub const MAX_REGIONS: usize = 4096;
/// Largest piece of device state in one frame.
pub const MAX_DEVICE_PIECE: usize = 1 << 20;

/// The largest body each message type may have. The defaults are what a well-formed message
/// can need; a destination lowers `checksums` to what its own region table implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `Checksums` body.
    pub checksums: usize,
    /// Largest `Digests` body.
    pub digests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            checksums: MAX_FRAME,
            digests: MAX_FRAME,
        }
    }
}

impl Limits {
    /// Limits for a destination whose regions have these numbers of checksum chunks: a
    /// `Checksums` or `Digests` frame can be no larger than their digests.
    pub fn for_chunks(chunks: impl IntoIterator<Item = u64>) -> Limits {
        let (body, total) = chunks.into_iter().fold((5u64, 0u64), |(n, t), c| {
            (
                n.saturating_add(4).saturating_add(c.saturating_mul(8)),
                t.saturating_add(c),
            )
        });
        let digests = total.saturating_mul(20).saturating_add(5);
        Limits {
            checksums: body.min(MAX_FRAME as u64) as usize,
            digests: digests.min(MAX_FRAME as u64) as usize,
        }
    }

    /// The largest body of a frame of type `t`; `None` for an unknown type.
    pub fn max_body(&self, t: u8) -> Option<usize> {
        const STR: usize = 4 + MAX_STR;
        Some(match t {
            tag::HELLO => 5,
            tag::HELLO_ACK => 35,
            tag::AUTH_PROOF => 65,
            tag::AUTH_OK => 33,
            tag::REGION_TABLE => 1 << 20,
            tag::REGIONS_OK | tag::LANE_ACCEPTED | tag::READY | tag::COMMIT | tag::DONE => 1,
            tag::HEARTBEAT => 1,
            tag::TRANSPORT_OFFER => 1 + 4 + 256 + 3,
            tag::TRANSPORT_ACCEPT => 1 + 3 + STR,
            tag::LANE_JOIN => 51,
            tag::REJOIN => 53,
            tag::REJOIN_OK => 37,
            tag::RDMA_CONNECT => 25,
            tag::RDMA_ACCEPT => 26 + 4 + 12 * MAX_REGIONS,
            tag::ROUND_START => 6,
            tag::ROUND_END | tag::ROUND_END_ACK => 5,
            tag::DEVICE_STATE => 1 + 4 + MAX_DEVICE_PIECE + 1,
            tag::CHECKSUMS => self.checksums,
            tag::DIGESTS => self.digests,
            tag::VERIFIED => 1 + 1 + 4 + 12 * MAX_MISMATCHES,
            tag::CANCEL | tag::ERROR => 1 + STR,
            _ => return None,
        })
    }

    /// Checks a frame of `len` bytes whose first body byte is `t`, before its body is read.
    pub fn check(&self, t: u8, len: usize) -> Result<(), EngineError> {
        let Some(max) = self.max_body(t) else {
            return Err(bad(&format!("unknown message type {t}")));
        };
        if len > max {
            return Err(EngineError::Protocol(format!(
                "a {} frame of {len} bytes exceeds its limit of {max}",
                tag::name(t)
            )));
        }
        Ok(())
    }
}

/// Most mismatching chunks a `Verified` names.
pub const MAX_MISMATCHES: usize = 64;

mod tag {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const AUTH_PROOF: u8 = 3;
    pub const AUTH_OK: u8 = 4;
    pub const REGION_TABLE: u8 = 5;
    pub const REGIONS_OK: u8 = 6;
    pub const TRANSPORT_OFFER: u8 = 7;
    pub const TRANSPORT_ACCEPT: u8 = 8;
    pub const LANE_JOIN: u8 = 9;
    pub const LANE_ACCEPTED: u8 = 10;
    pub const ROUND_START: u8 = 11;
    pub const ROUND_END: u8 = 12;
    pub const ROUND_END_ACK: u8 = 13;
    pub const DEVICE_STATE: u8 = 14;
    pub const CHECKSUMS: u8 = 15;
    pub const VERIFIED: u8 = 16;
    pub const COMMIT: u8 = 17;
    pub const DONE: u8 = 18;
    pub const HEARTBEAT: u8 = 19;
    pub const CANCEL: u8 = 20;
    pub const ERROR: u8 = 21;
    pub const RDMA_CONNECT: u8 = 22;
    pub const RDMA_ACCEPT: u8 = 23;
    pub const READY: u8 = 24;
    pub const DIGESTS: u8 = 25;
    pub const REJOIN: u8 = 26;
    pub const REJOIN_OK: u8 = 27;

    /// The message name of a known tag (for error messages).
    pub fn name(t: u8) -> &'static str {
        const NAMES: [&str; 28] = [
            "?",
            "Hello",
            "HelloAck",
            "AuthProof",
            "AuthOk",
            "RegionTable",
            "RegionsOk",
            "TransportOffer",
            "TransportAccept",
            "LaneJoin",
            "LaneAccepted",
            "RoundStart",
            "RoundEnd",
            "RoundEndAck",
            "DeviceState",
            "Checksums",
            "Verified",
            "Commit",
            "Done",
            "Heartbeat",
            "Cancel",
            "Error",
            "RdmaConnect",
            "RdmaAccept",
            "Ready",
            "Digests",
            "Rejoin",
            "RejoinOk",
        ];
        NAMES.get(t as usize).copied().unwrap_or("?")
    }
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn endpoint(&mut self, e: &QpEndpoint) {
        self.u32(e.qpn);
        self.u32(e.psn);
        self.0.extend_from_slice(&e.gid);
    }
}

struct R<'a>(&'a [u8]);

fn bad(what: &str) -> EngineError {
    EngineError::Protocol(format!("malformed frame: {what}"))
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EngineError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn endpoint(&mut self) -> Result<QpEndpoint, EngineError> {
        Ok(QpEndpoint {
            qpn: self.u32()?,
            psn: self.u32()?,
            gid: self.arr()?,
        })
    }
    fn bool(&mut self) -> Result<bool, EngineError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("bad boolean")),
        }
    }
    /// A count of items at least `min_size` bytes each that must fit in what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, EngineError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size.max(1)) > self.0.len() {
            return Err(bad("count larger than the frame"));
        }
        Ok(n)
    }
    /// A count as [`R::count`], and at most `max`.
    fn count_at_most(&mut self, min_size: usize, max: usize) -> Result<usize, EngineError> {
        let n = self.count(min_size)?;
        if n > max {
            return Err(bad("count above its limit"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, EngineError> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, EngineError> {
        let b = self.bytes()?;
        if b.len() > MAX_STR {
            return Err(bad("string too long"));
        }
        String::from_utf8(b).map_err(|_| bad("invalid UTF-8"))
    }
}

/// Encodes `m` as a whole frame, length prefix included.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut w = W(vec![0, 0, 0, 0]);
    match m {
        Message::Hello {
            min_version,
            max_version,
        } => {
            w.u8(tag::HELLO);
            w.u16(*min_version);
            w.u16(*max_version);
        }
        Message::HelloAck { version, nonce } => {
            w.u8(tag::HELLO_ACK);
            w.u16(*version);
            w.0.extend_from_slice(nonce);
        }
        Message::AuthProof { nonce, mac } => {
            w.u8(tag::AUTH_PROOF);
            w.0.extend_from_slice(nonce);
            w.0.extend_from_slice(mac);
        }
        Message::AuthOk { mac } => {
            w.u8(tag::AUTH_OK);
            w.0.extend_from_slice(mac);
        }
        Message::RegionTable { regions } => {
            w.u8(tag::REGION_TABLE);
            w.u32(regions.len() as u32);
            for r in regions {
                w.u32(r.id);
                w.str(&r.name);
                w.u64(r.len);
                w.u64(r.page_size);
                match r.gpa {
                    Some(g) => {
                        w.u8(1);
                        w.u64(g);
                    }
                    None => w.u8(0),
                }
            }
        }
        Message::RegionsOk => w.u8(tag::REGIONS_OK),
        Message::TransportOffer {
            kinds,
            lanes,
            verify,
        } => {
            w.u8(tag::TRANSPORT_OFFER);
            w.u32(kinds.len() as u32);
            for k in kinds {
                w.u8(k.code());
            }
            w.u16(*lanes);
            w.u8(*verify as u8);
        }
        Message::TransportAccept { kind, lanes, note } => {
            w.u8(tag::TRANSPORT_ACCEPT);
            w.u8(kind.code());
            w.u16(*lanes);
            w.str(note);
        }
        Message::RdmaConnect { endpoint } => {
            w.u8(tag::RDMA_CONNECT);
            w.endpoint(endpoint);
        }
        Message::RdmaAccept { endpoint, memory } => {
            w.u8(tag::RDMA_ACCEPT);
            w.endpoint(endpoint);
            match memory {
                RemoteMemory::PinAll(regions) => {
                    w.u8(1);
                    w.u32(regions.len() as u32);
                    for r in regions {
                        w.u64(r.addr);
                        w.u32(r.rkey);
                    }
                }
                RemoteMemory::Chunked {
                    chunk_bytes,
                    max_chunks,
                } => {
                    w.u8(2);
                    w.u64(*chunk_bytes);
                    w.u32(*max_chunks);
                }
            }
        }
        Message::LaneJoin { session, lane, mac } => {
            w.u8(tag::LANE_JOIN);
            w.0.extend_from_slice(session);
            w.u16(*lane);
            w.0.extend_from_slice(mac);
        }
        Message::LaneAccepted => w.u8(tag::LANE_ACCEPTED),
        Message::Rejoin {
            session,
            attempt,
            mac,
        } => {
            w.u8(tag::REJOIN);
            w.0.extend_from_slice(session);
            w.u32(*attempt);
            w.0.extend_from_slice(mac);
        }
        Message::RejoinOk { next_round, mac } => {
            w.u8(tag::REJOIN_OK);
            w.u32(*next_round);
            w.0.extend_from_slice(mac);
        }
        Message::RoundStart { round, last } => {
            w.u8(tag::ROUND_START);
            w.u32(*round);
            w.u8(*last as u8);
        }
        Message::RoundEnd { round } => {
            w.u8(tag::ROUND_END);
            w.u32(*round);
        }
        Message::RoundEndAck { round } => {
            w.u8(tag::ROUND_END_ACK);
            w.u32(*round);
        }
        Message::DeviceState { data, last } => {
            w.u8(tag::DEVICE_STATE);
            w.bytes(data);
            w.u8(*last as u8);
        }
        Message::Checksums { regions } => {
            w.u8(tag::CHECKSUMS);
            w.u32(regions.len() as u32);
            for r in regions {
                w.u32(r.len() as u32);
                for d in r {
                    w.u64(*d);
                }
            }
        }
        Message::Digests { chunks } => {
            w.u8(tag::DIGESTS);
            w.u32(chunks.len() as u32);
            for (r, c, d) in chunks {
                w.u32(*r);
                w.u64(*c);
                w.u64(*d);
            }
        }
        Message::Verified { ok, mismatches } => {
            w.u8(tag::VERIFIED);
            w.u8(*ok as u8);
            w.u32(mismatches.len() as u32);
            for (r, c) in mismatches {
                w.u32(*r);
                w.u64(*c);
            }
        }
        Message::Ready => w.u8(tag::READY),
        Message::Commit => w.u8(tag::COMMIT),
        Message::Done => w.u8(tag::DONE),
        Message::Heartbeat => w.u8(tag::HEARTBEAT),
        Message::Cancel { reason } => {
            w.u8(tag::CANCEL);
            w.str(reason);
        }
        Message::Error { message } => {
            w.u8(tag::ERROR);
            w.str(message);
        }
    }
    let len = (w.0.len() - 4) as u32;
    w.0[..4].copy_from_slice(&len.to_le_bytes());
    w.0
}

/// Checks a frame's length prefix; returns the body length to read next.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, EngineError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n == 0 {
        return Err(bad("empty frame"));
    }
    if n > MAX_FRAME {
        return Err(EngineError::Protocol(format!(
            "frame of {n} bytes exceeds the maximum of {MAX_FRAME}"
        )));
    }
    Ok(n)
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<Message, EngineError> {
    let mut r = R(body);
    let m = match r.u8()? {
        tag::HELLO => Message::Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
        },
        tag::HELLO_ACK => Message::HelloAck {
            version: r.u16()?,
            nonce: r.arr()?,
        },
        tag::AUTH_PROOF => Message::AuthProof {
            nonce: r.arr()?,
            mac: r.arr()?,
        },
        tag::AUTH_OK => Message::AuthOk { mac: r.arr()? },
        tag::REGION_TABLE => {
            let n = r.count_at_most(25, MAX_REGIONS)?;
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.u32()?;
                let name = r.str()?;
                let len = r.u64()?;
                let page_size = r.u64()?;
                let gpa = match r.u8()? {
                    0 => None,
                    1 => Some(r.u64()?),
                    _ => return Err(bad("bad optional")),
                };
                regions.push(RegionDesc {
                    id,
                    name,
                    len,
                    page_size,
                    gpa,
                });
            }
            Message::RegionTable { regions }
        }
        tag::REGIONS_OK => Message::RegionsOk,
        tag::TRANSPORT_OFFER => {
            let n = r.count(1)?;
            let mut kinds = Vec::with_capacity(n);
            for _ in 0..n {
                // Unknown kinds are skipped: a newer peer may offer more than we know.
                if let Some(k) = TransportKind::from_code(r.u8()?) {
                    kinds.push(k);
                }
            }
            Message::TransportOffer {
                kinds,
                lanes: r.u16()?,
                verify: r.bool()?,
            }
        }
        tag::TRANSPORT_ACCEPT => Message::TransportAccept {
            kind: TransportKind::from_code(r.u8()?).ok_or_else(|| bad("unknown transport"))?,
            lanes: r.u16()?,
            note: r.str()?,
        },
        tag::RDMA_CONNECT => Message::RdmaConnect {
            endpoint: r.endpoint()?,
        },
        tag::RDMA_ACCEPT => {
            let endpoint = r.endpoint()?;
            let memory = match r.u8()? {
                1 => {
                    let n = r.count_at_most(12, MAX_REGIONS)?;
                    let mut regions = Vec::with_capacity(n);
                    for _ in 0..n {
                        regions.push(RemoteRegion {
                            addr: r.u64()?,
                            rkey: r.u32()?,
                        });
                    }
                    RemoteMemory::PinAll(regions)
                }
                2 => RemoteMemory::Chunked {
                    chunk_bytes: r.u64()?,
                    max_chunks: r.u32()?,
                },
                _ => return Err(bad("unknown registration mode")),
            };
            Message::RdmaAccept { endpoint, memory }
        }
        tag::LANE_JOIN => Message::LaneJoin {
            session: r.arr()?,
            lane: r.u16()?,
            mac: r.arr()?,
        },
        tag::LANE_ACCEPTED => Message::LaneAccepted,
        tag::REJOIN => Message::Rejoin {
            session: r.arr()?,
            attempt: r.u32()?,
            mac: r.arr()?,
        },
        tag::REJOIN_OK => Message::RejoinOk {
            next_round: r.u32()?,
            mac: r.arr()?,
        },
        tag::ROUND_START => Message::RoundStart {
            round: r.u32()?,
            last: r.bool()?,
        },
        tag::ROUND_END => Message::RoundEnd { round: r.u32()? },
        tag::ROUND_END_ACK => Message::RoundEndAck { round: r.u32()? },
        tag::DEVICE_STATE => Message::DeviceState {
            data: r.bytes()?,
            last: r.bool()?,
        },
        tag::CHECKSUMS => {
            let n = r.count_at_most(4, MAX_REGIONS)?;
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let k = r.count(8)?;
                let mut v = Vec::with_capacity(k);
                for _ in 0..k {
                    v.push(r.u64()?);
                }
                regions.push(v);
            }
            Message::Checksums { regions }
        }
        tag::DIGESTS => {
            let n = r.count(20)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                chunks.push((r.u32()?, r.u64()?, r.u64()?));
            }
            Message::Digests { chunks }
        }
        tag::VERIFIED => {
            let ok = r.bool()?;
            let n = r.count_at_most(12, MAX_MISMATCHES)?;
            let mut mismatches = Vec::with_capacity(n);
            for _ in 0..n {
                mismatches.push((r.u32()?, r.u64()?));
            }
            Message::Verified { ok, mismatches }
        }
        tag::READY => Message::Ready,
        tag::COMMIT => Message::Commit,
        tag::DONE => Message::Done,
        tag::HEARTBEAT => Message::Heartbeat,
        tag::CANCEL => Message::Cancel { reason: r.str()? },
        tag::ERROR => Message::Error { message: r.str()? },
        t => return Err(bad(&format!("unknown message type {t}"))),
    };
    if !r.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(m)
}

/// Writes one message to a blocking stream (data lanes' first frame).
pub fn write_sync(w: &mut impl std::io::Write, m: &Message) -> Result<(), EngineError> {
    w.write_all(&encode(m))?;
    Ok(())
}

/// Reads one message from a blocking stream (default limits).
pub fn read_sync(r: &mut impl std::io::Read) -> Result<Message, EngineError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let mut body = checked_body(head, &Limits::default())?;
    r.read_exact(&mut body[1..])?;
    decode(&body)
}

/// Checks a frame's length prefix and tag (`head`) against `limits`; returns a buffer for the
/// body with the tag in place, allocated only once the size is known to be acceptable.
fn checked_body(head: [u8; 5], limits: &Limits) -> Result<Vec<u8>, EngineError> {
    let n = body_len(head[..4].try_into().expect("4 bytes"))?;
    limits.check(head[4], n)?;
    let mut body = vec![0u8; n];
    body[0] = head[4];
    Ok(body)
}

/// Reads one message from an async stream with default limits. `Ok(None)` on a clean end of
/// stream.
pub async fn read_async<S>(s: &mut S) -> Result<Option<Message>, EngineError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    read_async_limited(s, &Limits::default()).await
}

/// Reads one message from an async stream, each type held to `limits` before its body is
/// allocated. `Ok(None)` on a clean end of stream.
pub async fn read_async_limited<S>(
    s: &mut S,
    limits: &Limits,
) -> Result<Option<Message>, EngineError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let truncated = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad("truncated")
        } else {
            e.into()
        }
    };
    let mut head = [0u8; 5];
    match s.read_exact(&mut head[..4]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    body_len(head[..4].try_into().expect("4 bytes"))?;
    s.read_exact(&mut head[4..]).await.map_err(truncated)?;
    let mut body = checked_body(head, limits)?;
    s.read_exact(&mut body[1..]).await.map_err(truncated)?;
    decode(&body).map(Some)
}

/// Writes one message to an async stream.
pub async fn write_async<S>(s: &mut S, m: &Message) -> Result<(), EngineError>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    s.write_all(&encode(m)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
            },
            Message::HelloAck {
                version: 1,
                nonce: [7; 32],
            },
            Message::AuthProof {
                nonce: [1; 32],
                mac: [2; 32],
            },
            Message::AuthOk { mac: [3; 32] },
            Message::RegionTable {
                regions: vec![RegionDesc {
                    id: 4,
                    name: "pc.ram".into(),
                    len: 1 << 30,
                    page_size: 4096,
                    gpa: Some(0),
                }],
            },
            Message::RegionsOk,
            Message::TransportOffer {
                kinds: vec![TransportKind::Tcp],
                lanes: 2,
                verify: true,
            },
            Message::TransportAccept {
                kind: TransportKind::Tcp,
                lanes: 2,
                note: "destination: no RDMA device".into(),
            },
            Message::TransportOffer {
                kinds: vec![TransportKind::Rdma, TransportKind::Tcp],
                lanes: 4,
                verify: false,
            },
            Message::RdmaConnect {
                endpoint: QpEndpoint {
                    qpn: 17,
                    psn: 0xabcdef,
                    gid: [3; 16],
                },
            },
            Message::RdmaAccept {
                endpoint: QpEndpoint {
                    qpn: 18,
                    psn: 1,
                    gid: [4; 16],
                },
                memory: RemoteMemory::PinAll(vec![RemoteRegion {
                    addr: 1 << 40,
                    rkey: 99,
                }]),
            },
            Message::RdmaAccept {
                endpoint: QpEndpoint {
                    qpn: 19,
                    psn: 2,
                    gid: [5; 16],
                },
                memory: RemoteMemory::Chunked {
                    chunk_bytes: 1 << 20,
                    max_chunks: 256,
                },
            },
            Message::LaneJoin {
                session: [9; 16],
                lane: 1,
                mac: [5; 32],
            },
            Message::LaneAccepted,
            Message::Rejoin {
                session: [1; 16],
                attempt: 2,
                mac: [3; 32],
            },
            Message::RejoinOk {
                next_round: 4,
                mac: [5; 32],
            },
            Message::RoundStart {
                round: 3,
                last: true,
            },
            Message::RoundEnd { round: 3 },
            Message::RoundEndAck { round: 3 },
            Message::DeviceState {
                data: b"dev".to_vec(),
                last: true,
            },
            Message::Checksums {
                regions: vec![vec![1, 2, 3], vec![]],
            },
            Message::Digests {
                chunks: vec![(0, 3, 77), (1, 0, u64::MAX)],
            },
            Message::Verified {
                ok: false,
                mismatches: vec![(0, 12)],
            },
            Message::Ready,
            Message::Commit,
            Message::Done,
            Message::Heartbeat,
            Message::Cancel {
                reason: "operator".into(),
            },
            Message::Error {
                message: "boom".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let f = encode(&m);
            let n = body_len(f[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, f.len() - 4);
            assert_eq!(decode(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        // A small deterministic fuzz: random bodies, and valid bodies with one byte flipped.
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: Vec<Vec<u8>> = all_messages()
            .iter()
            .map(|m| encode(m)[4..].to_vec())
            .collect();
        for i in 0..200_000 {
            let body: Vec<u8> = if i % 2 == 0 {
                let n = (next() % 64) as usize;
                (0..n).map(|_| next() as u8).collect()
            } else {
                let mut b = valid[(next() % valid.len() as u64) as usize].clone();
                let at = (next() % b.len() as u64) as usize;
                b[at] ^= 1 << (next() % 8);
                b
            };
            if let Ok(m) = decode(&body) {
                // Whatever decodes is a message that survives its own round trip (bytes may
                // differ: unknown transport kinds are skipped for forward compatibility).
                assert_eq!(decode(&encode(&m)[4..]).unwrap(), m);
            }
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        for m in all_messages() {
            let f = encode(&m);
            let body = &f[4..];
            // Every truncation fails (bodies of one byte are complete messages).
            for cut in 1..body.len() {
                assert!(decode(&body[..cut]).is_err(), "{} cut at {cut}", m.name());
            }
            let mut long = body.to_vec();
            long.push(0);
            assert!(decode(&long).is_err(), "{} with trailing byte", m.name());
        }
        assert!(decode(&[0xee]).is_err());
        assert!(decode(&[]).is_err());
        assert!(body_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert!(body_len([0; 4]).is_err());
        // A count that claims more items than the frame can hold.
        let mut f = vec![tag::CHECKSUMS];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&f).is_err());
        // Invalid UTF-8.
        let mut f = vec![tag::ERROR, 2, 0, 0, 0, 0xff, 0xfe];
        assert!(decode(&f).is_err());
        f[0] = tag::ROUND_START;
        assert!(decode(&[tag::ROUND_START, 0, 0, 0, 0, 2]).is_err());
    }
}
