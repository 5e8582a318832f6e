//! Length-prefixed binary frames: `u32 length (LE) | u8 tag | fields`, integers little-endian,
//! strings and vectors prefixed by a `u32` count.
//!
//! Every message declares its tag and its fields in order once, in the table below
//! (`messages!`); encode, decode and each type's smallest and largest body follow from that
//! table and from the field types' own layouts (`field.rs`). So a field cannot be written in
//! one order and read in another, and a size limit cannot drift from the layout it bounds
//! (it did: a table of 4096 regions with 256-byte names was larger than the hand-written
//! limit of its frame). The golden vectors in `engine/tests/golden.rs` pin the bytes.
//!
//! [`decode`] is the only way in: it refuses unknown tags, truncated or trailing bytes,
//! invalid UTF-8, counts that cannot fit in the frame, and frames above their type's limit.
//!
//! Readers learn a frame's type before they allocate its body: the length prefix and the tag
//! byte are read first and checked against that type's own limit ([`Limits::max_body`]), so a
//! peer cannot make us allocate 16 MiB for a message that holds a few bytes. Decoding never
//! allocates much more than the frame it reads (every count is checked against what is left,
//! and nested counts are capped).

use super::field::{bad, get_list, list_max, put_list, Field, Listed, R};
use super::{Message, TransportKind};
use crate::region::RegionDesc;
use crate::stats::EndFigures;
use crate::verify::VerifyMode;
use crate::EngineError;

pub use super::field::{MAX_NAME, MAX_REGIONS, MAX_TEXT};

/// Largest frame body accepted (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest piece of device state in one frame.
pub const MAX_DEVICE_PIECE: usize = 1 << 20;
/// Most mismatching chunks a `Verified` names.
pub const MAX_MISMATCHES: usize = 64;
/// Most runs in one `PostcopyPages` piece (a larger set travels in several pieces).
pub const MAX_POSTCOPY_RUNS: usize = 1 << 16;
/// Most transports one `TransportOffer` lists.
pub const MAX_KINDS: usize = 256;

/// Encodes one field: a list with its cap, or a plain field.
macro_rules! put_field {
    ($w:expr, $v:expr) => {
        Field::put($v, $w)
    };
    ($w:expr, $v:expr, $cap:expr) => {
        put_list($w, $v, $cap)
    };
}

/// Decodes one field, as [`put_field`] encoded it.
macro_rules! get_field {
    ($r:expr, $t:ty) => {
        <$t as Field>::get($r)?
    };
    ($r:expr, $t:ty, $cap:expr) => {
        get_list($r, $cap)?
    };
}

/// The largest encoding of one field.
macro_rules! field_max {
    ($t:ty) => {
        <$t as Field>::MAX
    };
    ($t:ty, $cap:expr) => {
        list_max(<<$t as Listed>::Item as Field>::MAX, $cap)
    };
}

/// The message table: `TAG = code => Variant { field: Type [cap], ... }`, fields in wire
/// order; `[cap]` after a list type bounds its length. Generates the tags, their names,
/// encoding, decoding and each type's smallest and largest body.
macro_rules! messages {
    ($($tag:ident = $code:literal => $name:ident {
        $($f:ident: $t:ty $([$cap:expr])?),* $(,)?
    }),* $(,)?) => {
        /// The tag byte of each message type.
        pub mod tag {
            $(
                #[doc = concat!("Tag of `Message::", stringify!($name), "`.")]
                pub const $tag: u8 = $code;
            )*

            /// The message name of a known tag (for error messages); "?" for others.
            pub fn name(t: u8) -> &'static str {
                match t {
                    $($code => stringify!($name),)*
                    _ => "?",
                }
            }
        }

        /// Appends `m`'s body (tag and fields).
        fn put_body(w: &mut Vec<u8>, m: &Message) {
            match m {
                $(Message::$name { $($f),* } => {
                    w.push(tag::$tag);
                    $(put_field!(w, $f $(, $cap)?);)*
                })*
            }
        }

        /// Reads the fields of a message of type `t`.
        fn get_body(t: u8, r: &mut R<'_>) -> Result<Message, EngineError> {
            Ok(match t {
                $(tag::$tag => Message::$name {
                    $($f: get_field!(r, $t $(, $cap)?)),*
                },)*
                t => return Err(bad(&format!("unknown message type {t}"))),
            })
        }

        /// The smallest and largest body of a message of type `t` as its layout allows
        /// (`usize::MAX`: only the frame bounds it); `None` for an unknown type.
        const fn body_bounds(t: u8) -> Option<(usize, usize)> {
            match t {
                $($code => Some((
                    1 $(+ <$t as Field>::MIN)*,
                    sum(&[1 $(, field_max!($t $(, $cap)?))*]),
                )),)*
                _ => None,
            }
        }
    };
}

/// A saturating sum.
const fn sum(v: &[usize]) -> usize {
    let mut s = 0usize;
    let mut i = 0;
    while i < v.len() {
        s = s.saturating_add(v[i]);
        i += 1;
    }
    s
}

messages! {
    HELLO = 1 => Hello { min_version: u16, max_version: u16 },
    HELLO_ACK = 2 => HelloAck { version: u16, nonce: [u8; 32] },
    AUTH_PROOF = 3 => AuthProof { nonce: [u8; 32], mac: [u8; 32] },
    AUTH_OK = 4 => AuthOk { mac: [u8; 32] },
    REGION_TABLE = 5 => RegionTable { regions: Vec<RegionDesc> [MAX_REGIONS] },
    REGIONS_OK = 6 => RegionsOk {},
    TRANSPORT_OFFER = 7 => TransportOffer {
        kinds: Vec<TransportKind> [MAX_KINDS],
        lanes: u16,
        verify: VerifyMode,
    },
    TRANSPORT_ACCEPT = 8 => TransportAccept { kind: TransportKind, lanes: u16, note: String },
    LANE_JOIN = 9 => LaneJoin { session: [u8; 16], lane: u16, mac: [u8; 32] },
    LANE_ACCEPTED = 10 => LaneAccepted {},
    ROUND_START = 11 => RoundStart { round: u32, last: bool },
    ROUND_END = 12 => RoundEnd { round: u32 },
    ROUND_END_ACK = 13 => RoundEndAck { round: u32 },
    DEVICE_STATE = 14 => DeviceState { data: Vec<u8> [MAX_DEVICE_PIECE], last: bool },
    CHECKSUMS = 15 => Checksums { regions: Vec<Vec<u64>> [MAX_REGIONS] },
    VERIFIED = 16 => Verified { ok: bool, mismatches: Vec<(u32, u64)> [MAX_MISMATCHES] },
    COMMIT = 17 => Commit {},
    DONE = 18 => Done {},
    HEARTBEAT = 19 => Heartbeat {},
    CANCEL = 20 => Cancel { reason: String },
    ERROR = 21 => Error { message: String },
    READY = 24 => Ready {},
    DIGESTS = 25 => Digests { chunks: Vec<(u32, u64, u64)> },
    REJOIN = 26 => Rejoin { session: [u8; 16], attempt: u32, mac: [u8; 32] },
    REJOIN_OK = 27 => RejoinOk { next_round: u32, mac: [u8; 32] },
    FIGURES = 28 => Figures { figures: EndFigures },
    POSTCOPY_PAGES = 29 => PostcopyPages {
        runs: Vec<(u32, u64, u64)> [MAX_POSTCOPY_RUNS],
        last: bool,
    },
    RESUMED = 30 => Resumed {},
    POSTCOPY_END = 31 => PostcopyEnd {},
}

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
        // A body is the tag and a list's count, then per region a count and its digests, or
        // one (region, chunk, digest) per chunk.
        const HEAD: u64 = 1 + 4;
        const REGION: u64 = <Vec<u64> as Field>::MIN as u64;
        const DIGEST: u64 = <u64 as Field>::MAX as u64;
        const CHUNK: u64 = <(u32, u64, u64) as Field>::MAX as u64;
        let (body, total) = chunks.into_iter().fold((HEAD, 0u64), |(n, t), c| {
            (
                n.saturating_add(REGION)
                    .saturating_add(c.saturating_mul(DIGEST)),
                t.saturating_add(c),
            )
        });
        let digests = total.saturating_mul(CHUNK).saturating_add(HEAD);
        Limits {
            checksums: body.min(MAX_FRAME as u64) as usize,
            digests: digests.min(MAX_FRAME as u64) as usize,
        }
    }

    /// The largest body of a frame of type `t`; `None` for an unknown type.
    pub fn max_body(&self, t: u8) -> Option<usize> {
        let (_, max) = body_bounds(t)?;
        Some(
            match t {
                tag::CHECKSUMS => self.checksums,
                tag::DIGESTS => self.digests,
                _ => max,
            }
            .min(MAX_FRAME),
        )
    }

    /// The smallest body of a frame of type `t`; `None` for an unknown type.
    pub fn min_body(t: u8) -> Option<usize> {
        body_bounds(t).map(|(min, _)| min)
    }

    /// Checks a frame of `len` bytes whose first body byte is `t`, before its body is read.
    pub fn check(&self, t: u8, len: usize) -> Result<(), EngineError> {
        let (Some(min), Some(max)) = (Self::min_body(t), self.max_body(t)) else {
            return Err(bad(&format!("unknown message type {t}")));
        };
        if len > max {
            return Err(EngineError::Protocol(format!(
                "a {} frame of {len} bytes exceeds its limit of {max}",
                tag::name(t)
            )));
        }
        if len < min {
            return Err(bad(&format!(
                "a {} frame of {len} bytes is shorter than its minimum of {min}",
                tag::name(t)
            )));
        }
        Ok(())
    }
}

/// Encodes `m` as a whole frame, length prefix included. Text longer than its limit is cut at
/// a character boundary (the peer would refuse the whole message otherwise).
pub fn encode(m: &Message) -> Vec<u8> {
    let mut w = vec![0, 0, 0, 0];
    put_body(&mut w, m);
    let len = (w.len() - 4) as u32;
    w[..4].copy_from_slice(&len.to_le_bytes());
    w
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

/// Decodes one frame body (without its length prefix), held to the default [`Limits`].
pub fn decode(body: &[u8]) -> Result<Message, EngineError> {
    let Some(&t) = body.first() else {
        return Err(bad("truncated"));
    };
    Limits::default().check(t, body.len())?;
    let mut r = R(&body[1..]);
    let m = get_body(t, &mut r)?;
    if !r.is_empty() {
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

    /// One of each message (two layouts of some).
    fn all_messages() -> Vec<Message> {
        [handshake_messages(), session_messages()].concat()
    }

    /// One of each handshake and lane message.
    fn handshake_messages() -> Vec<Message> {
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
                verify: VerifyMode::Received,
            },
            Message::TransportAccept {
                kind: TransportKind::Tcp,
                lanes: 2,
                note: "destination: no RDMA device".into(),
            },
            Message::TransportOffer {
                kinds: vec![TransportKind::Rdma, TransportKind::Tcp],
                lanes: 4,
                verify: VerifyMode::Off,
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
        ]
    }

    /// Figures with every optional part present.
    fn figures() -> EndFigures {
        EndFigures {
            page_bytes: 1 << 31,
            rounds: 4,
            rate: 3_000_000_000,
            downtime_us: 12_345,
            setup_us: 6_789,
            total_us: 1_234_567,
            memory: crate::stats::MemoryFacts {
                prefaulted: Some(true),
                huge_bytes: Some(1 << 30),
                huge_pages: "thp auto".into(),
            },
        }
    }

    /// One of each message after the handshake.
    fn session_messages() -> Vec<Message> {
        vec![
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
            Message::Figures { figures: figures() },
            Message::Figures {
                figures: EndFigures::default(),
            },
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

    #[test]
    fn limits_follow_from_the_layouts() {
        let l = Limits::default();
        // The numbers the hand-written table had, where it was right.
        for (t, max) in [
            (tag::HELLO, 5),
            (tag::HELLO_ACK, 35),
            (tag::AUTH_PROOF, 65),
            (tag::LANE_JOIN, 51),
            (tag::REJOIN, 53),
            (tag::REJOIN_OK, 37),
            (tag::ROUND_START, 6),
            (tag::TRANSPORT_OFFER, 1 + 4 + MAX_KINDS + 3),
            (tag::DEVICE_STATE, 1 + 4 + MAX_DEVICE_PIECE + 1),
            (tag::VERIFIED, 1 + 1 + 4 + 12 * MAX_MISMATCHES),
            (tag::ERROR, 1 + 4 + MAX_TEXT),
            (tag::READY, 1),
            (
                tag::FIGURES,
                1 + 8 + 4 + 8 * 4 + 1 + 9 + 4 + crate::stats::MAX_NOTE,
            ),
            (tag::CHECKSUMS, MAX_FRAME),
        ] {
            assert_eq!(l.max_body(t), Some(max), "{}", tag::name(t));
        }
        // Where it was wrong: 4096 regions with names of 256 bytes.
        let table = Message::RegionTable {
            regions: vec![
                RegionDesc {
                    id: u32::MAX,
                    name: "n".repeat(MAX_NAME),
                    len: u64::MAX,
                    page_size: u64::MAX,
                    gpa: Some(u64::MAX),
                };
                MAX_REGIONS
            ],
        };
        let f = encode(&table);
        assert_eq!(l.max_body(tag::REGION_TABLE), Some(f.len() - 4));
        assert_eq!(decode(&f[4..]).unwrap(), table);
        assert_eq!(Limits::min_body(tag::LANE_JOIN), Some(51));
        assert!(l.check(tag::HELLO, 4).is_err());
        assert!(l.check(0, 1).is_err());
    }

    #[test]
    fn limits_for_chunks_are_the_largest_checksums_and_digests() {
        let l = Limits::for_chunks([3, 0, 5]);
        let sums = Message::Checksums {
            regions: vec![vec![u64::MAX; 3], vec![], vec![7; 5]],
        };
        assert_eq!(l.checksums, encode(&sums).len() - 4);
        let digests = Message::Digests {
            chunks: vec![(1, 2, 3); 8],
        };
        assert_eq!(l.digests, encode(&digests).len() - 4);
        assert_eq!(Limits::for_chunks([u64::MAX]).checksums, MAX_FRAME);
    }

    #[test]
    fn a_long_memory_note_is_cut_and_a_bad_optional_refused() {
        let mut f = figures();
        f.memory.huge_pages = "é".repeat(crate::stats::MAX_NOTE);
        let enc = encode(&Message::Figures { figures: f.clone() });
        let Message::Figures { figures: back } = decode(&enc[4..]).unwrap() else {
            panic!("not Figures");
        };
        assert_eq!(back.memory.huge_pages.len(), crate::stats::MAX_NOTE);
        assert!(f.memory.huge_pages.starts_with(&back.memory.huge_pages));
        // The optional boolean is 0, 1 or 2; 3 is refused.
        let mut body = encode(&Message::Figures { figures: back })[4..].to_vec();
        let at = 1 + 8 + 4 + 8 * 4;
        assert_eq!(body[at], 2);
        body[at] = 3;
        assert!(decode(&body).is_err());
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        // 3-byte characters: MAX_TEXT is not a multiple of 3, so the cut falls inside one.
        let long = "€".repeat(MAX_TEXT / 3 + 10);
        let f = encode(&Message::Error {
            message: long.clone(),
        });
        let Message::Error { message } = decode(&f[4..]).unwrap() else {
            panic!("not an Error");
        };
        assert_eq!(message.len(), MAX_TEXT / 3 * 3);
        assert!(long.starts_with(&message));
        // A peer's longer text is refused.
        let mut body = vec![tag::CANCEL];
        body.extend_from_slice(&(MAX_TEXT as u32 + 1).to_le_bytes());
        body.resize(5 + MAX_TEXT + 1, b'a');
        assert!(Limits::default().check(tag::CANCEL, body.len()).is_err());
        assert!(decode(&body).is_err());
    }

    #[test]
    fn a_frame_of_exactly_the_largest_size_is_accepted() {
        assert_eq!(
            body_len((MAX_FRAME as u32).to_le_bytes()).unwrap(),
            MAX_FRAME
        );
        assert_eq!(body_len(1u32.to_le_bytes()).unwrap(), 1);
    }

    #[test]
    fn lowered_limits_hold_checksums_and_digests_frames_only() {
        let l = Limits::for_chunks([3, 0, 5]);
        for (t, max) in [(tag::CHECKSUMS, l.checksums), (tag::DIGESTS, l.digests)] {
            assert!(max < MAX_FRAME, "{}", tag::name(t));
            assert_eq!(l.max_body(t), Some(max), "{}", tag::name(t));
            assert!(l.check(t, max).is_ok(), "{}", tag::name(t));
            assert!(l.check(t, max + 1).is_err(), "{}", tag::name(t));
        }
        // Other types keep the limits of their layouts.
        for t in [tag::HELLO, tag::VERIFIED, tag::DEVICE_STATE] {
            assert_eq!(l.max_body(t), Limits::default().max_body(t));
        }
    }

    /// Runs `f` to completion on a current-thread runtime.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn streams_carry_every_message_in_order_and_end_cleanly() {
        let msgs = all_messages();
        let mut sync = Vec::new();
        for m in &msgs {
            write_sync(&mut sync, m).unwrap();
        }
        let mut r = &sync[..];
        for m in &msgs {
            assert_eq!(&read_sync(&mut r).unwrap(), m);
        }
        block_on(async {
            let mut written = Vec::new();
            for m in &msgs {
                write_async(&mut written, m).await.unwrap();
            }
            assert_eq!(written, sync, "both writers put the same bytes");
            let mut r = &written[..];
            for m in &msgs {
                assert_eq!(read_async(&mut r).await.unwrap().as_ref(), Some(m));
            }
            assert_eq!(read_async(&mut r).await.unwrap(), None, "a clean end");
        });
    }

    /// A stream whose every read fails as a reset connection does.
    struct Reset;

    impl tokio::io::AsyncRead for Reset {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[test]
    fn a_stream_cut_inside_a_frame_or_failing_is_an_error_not_a_clean_end() {
        let f = encode(&Message::Cancel {
            reason: "operator".into(),
        });
        block_on(async {
            for cut in [4, f.len() - 1] {
                let mut r = &f[..cut];
                let e = read_async(&mut r).await.unwrap_err();
                assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
            }
            let e = read_async(&mut Reset).await.unwrap_err();
            assert!(matches!(e, EngineError::Io(_)), "{e}");
            // Over a lowered limit: refused on the head, before the body is read.
            let l = Limits::for_chunks([1]);
            let sums = encode(&Message::Checksums {
                regions: vec![vec![1, 2]],
            });
            let mut r = &sums[..5];
            let e = read_async_limited(&mut r, &l).await.unwrap_err();
            assert!(e.to_string().contains("exceeds its limit"), "{e}");
        });
    }
}
