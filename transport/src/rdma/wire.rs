//! The small messages of an RDMA lane.
//!
//! Source → destination, as SENDs on the queue pair (so they arrive after the WRITEs posted
//! before them): batch descriptors, chunk registration requests and the close, announced on
//! the lane's TCP socket by the one byte [`CLOSING`]. Destination → source, on that socket:
//! fixed 24-byte replies. All little-endian.

use crate::{Run, RunKind};

/// Size of one receive buffer on the destination, and so the largest message.
pub const SLOT_BYTES: usize = 8192;
/// Bytes before the runs of a batch descriptor.
const DESC_HEAD: usize = 16;
/// Bytes per run in a descriptor.
const RUN_BYTES: usize = 16;
/// Most runs one descriptor lists.
pub const MAX_DESC_RUNS: usize = (SLOT_BYTES - DESC_HEAD) / RUN_BYTES;
/// Length of a reply.
pub const REPLY_LEN: usize = 24;
/// The one byte a source sends on the lane socket: it has posted its close message and will
/// end the socket once that completed (so the destination waits for the message, however
/// slow the device, instead of taking the socket's end for a crash).
pub const CLOSING: u8 = 0xC1;

const KIND_BATCH: u8 = 1;
const KIND_REGISTER: u8 = 2;
const KIND_CLOSE: u8 = 3;
/// Top bit of a run's page count: a zero run.
const ZERO_BIT: u32 = 1 << 31;
/// Most pages one descriptor entry carries (the page count shares its word with
/// [`ZERO_BIT`]); [`encode_batch`] splits longer runs into several entries.
pub const MAX_ENTRY_PAGES: u32 = ZERO_BIT - 1;
/// "No chunk" in a register request, as older sources wrote it.
const NO_REGION: u32 = u32::MAX;
/// Byte 1 of a register request: set when it names a chunk to evict. The region field alone
/// used [`NO_REGION`] for "none", which made region `u32::MAX` unsayable; the flag sits in
/// what was padding, and a request without it still means what it meant.
const EVICT_FLAG: u8 = 1;

/// A message from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Batch `seq` was written; these are its runs.
    Batch {
        /// Batch sequence number.
        seq: u64,
        /// Data runs (already written) and zero runs (for the destination to zero).
        runs: Vec<Run>,
    },
    /// Register `chunk` of `region`; `evict` may be deregistered first.
    Register {
        /// Region index.
        region: u32,
        /// Chunk index.
        chunk: u64,
        /// A chunk no longer written to.
        evict: Option<(u32, u64)>,
    },
    /// The lane ends.
    Close,
}

/// The descriptor entries `runs` take: one per run, more for a run of more than
/// [`MAX_ENTRY_PAGES`] pages. At most [`MAX_DESC_RUNS`] fit one descriptor.
pub fn entries(runs: &[Run]) -> usize {
    runs.iter()
        .map(|r| r.npages.div_ceil(MAX_ENTRY_PAGES).max(1) as usize)
        .sum()
}

/// Encodes a batch descriptor into `buf`; returns its length. A run longer than
/// [`MAX_ENTRY_PAGES`] becomes several entries (the decoder returns them as consecutive
/// runs of the same kind).
///
/// # Panics
/// If `runs` take more than [`MAX_DESC_RUNS`] entries (callers check with [`entries`]).
pub fn encode_batch(buf: &mut [u8], seq: u64, runs: &[Run]) -> usize {
    let n = entries(runs);
    assert!(n <= MAX_DESC_RUNS, "too many runs for one descriptor");
    buf[0] = KIND_BATCH;
    buf[1..4].fill(0);
    buf[4..8].copy_from_slice(&(n as u32).to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut o = DESC_HEAD;
    for r in runs {
        let (mut first, mut left) = (r.first_page, r.npages);
        loop {
            let take = left.min(MAX_ENTRY_PAGES);
            let word = if r.kind == RunKind::Zero {
                take | ZERO_BIT
            } else {
                take
            };
            buf[o..o + 4].copy_from_slice(&r.region.to_le_bytes());
            buf[o + 4..o + 8].copy_from_slice(&word.to_le_bytes());
            buf[o + 8..o + 16].copy_from_slice(&first.to_le_bytes());
            o += RUN_BYTES;
            (first, left) = (first.wrapping_add(take as u64), left - take);
            if left == 0 {
                break;
            }
        }
    }
    o
}

/// Encodes a register request into `buf`; returns its length.
pub fn encode_register(
    buf: &mut [u8],
    region: u32,
    chunk: u64,
    evict: Option<(u32, u64)>,
) -> usize {
    buf[..32].fill(0);
    buf[0] = KIND_REGISTER;
    buf[1] = if evict.is_some() { EVICT_FLAG } else { 0 };
    buf[4..8].copy_from_slice(&region.to_le_bytes());
    buf[8..16].copy_from_slice(&chunk.to_le_bytes());
    let (er, ec) = evict.unwrap_or((NO_REGION, 0));
    buf[16..20].copy_from_slice(&er.to_le_bytes());
    buf[24..32].copy_from_slice(&ec.to_le_bytes());
    32
}

/// Encodes the close message; returns its length.
pub fn encode_close(buf: &mut [u8]) -> usize {
    buf[..DESC_HEAD].fill(0);
    buf[0] = KIND_CLOSE;
    DESC_HEAD
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Decodes a message from the source; anything that does not fit is refused.
pub fn decode_request(b: &[u8]) -> Result<Request, String> {
    if b.len() < DESC_HEAD {
        return Err(format!("message of {} bytes is too short", b.len()));
    }
    match b[0] {
        KIND_BATCH => {
            let n = u32_at(b, 4) as usize;
            if n > MAX_DESC_RUNS || b.len() != DESC_HEAD + n * RUN_BYTES {
                return Err(format!(
                    "batch descriptor of {} bytes lists {n} runs",
                    b.len()
                ));
            }
            let seq = u64_at(b, 8);
            let runs = (0..n)
                .map(|i| {
                    let o = DESC_HEAD + i * RUN_BYTES;
                    let cnt = u32_at(b, o + 4);
                    Run {
                        region: u32_at(b, o),
                        npages: cnt & !ZERO_BIT,
                        first_page: u64_at(b, o + 8),
                        kind: if cnt & ZERO_BIT != 0 {
                            RunKind::Zero
                        } else {
                            RunKind::Data
                        },
                    }
                })
                .collect();
            Ok(Request::Batch { seq, runs })
        }
        KIND_REGISTER if b.len() == 32 => {
            let er = u32_at(b, 16);
            Ok(Request::Register {
                region: u32_at(b, 4),
                chunk: u64_at(b, 8),
                evict: (b[1] & EVICT_FLAG != 0 || er != NO_REGION).then(|| (er, u64_at(b, 24))),
            })
        }
        KIND_CLOSE if b.len() == DESC_HEAD => Ok(Request::Close),
        k => Err(format!("unknown message kind {k} ({} bytes)", b.len())),
    }
}

/// A reply from the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Batches up to `seq` have landed and been handled.
    Ack(u64),
    /// The chunk asked for is registered at `addr` with `rkey`.
    Key {
        /// Address of the chunk's first byte.
        addr: u64,
        /// Its remote key.
        rkey: u32,
    },
    /// The chunk could not be registered (an errno).
    Refused(u32),
}

const REPLY_ACK: u8 = 1;
const REPLY_KEY: u8 = 2;
const REPLY_REFUSED: u8 = 3;

/// Encodes a reply.
pub fn encode_reply(r: Reply) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    let (k, x, y) = match r {
        Reply::Ack(s) => (REPLY_ACK, 0, s),
        Reply::Key { addr, rkey } => (REPLY_KEY, rkey, addr),
        Reply::Refused(e) => (REPLY_REFUSED, e, 0),
    };
    b[0] = k;
    b[4..8].copy_from_slice(&x.to_le_bytes());
    b[8..16].copy_from_slice(&y.to_le_bytes());
    b
}

/// Decodes a reply.
pub fn decode_reply(b: &[u8; REPLY_LEN]) -> Result<Reply, String> {
    let (x, y) = (u32_at(b, 4), u64_at(b, 8));
    match b[0] {
        REPLY_ACK => Ok(Reply::Ack(y)),
        REPLY_KEY => Ok(Reply::Key { addr: y, rkey: x }),
        REPLY_REFUSED => Ok(Reply::Refused(x)),
        k => Err(format!("unknown reply kind {k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let mut buf = [0u8; SLOT_BYTES];
        let runs = vec![
            Run {
                region: 1,
                first_page: 7,
                npages: 3,
                kind: RunKind::Data,
            },
            Run {
                region: 0,
                first_page: 1 << 40,
                npages: 9,
                kind: RunKind::Zero,
            },
        ];
        let n = encode_batch(&mut buf, 42, &runs);
        assert_eq!(
            decode_request(&buf[..n]),
            Ok(Request::Batch { seq: 42, runs })
        );
        let n = encode_register(&mut buf, 2, 5, Some((1, 3)));
        assert_eq!(
            decode_request(&buf[..n]),
            Ok(Request::Register {
                region: 2,
                chunk: 5,
                evict: Some((1, 3))
            })
        );
        let n = encode_close(&mut buf);
        assert_eq!(decode_request(&buf[..n]), Ok(Request::Close));
        for r in [
            Reply::Ack(9),
            Reply::Key {
                addr: 1 << 44,
                rkey: 77,
            },
            Reply::Refused(12),
        ] {
            assert_eq!(decode_reply(&encode_reply(r)), Ok(r));
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        let mut buf = [0u8; SLOT_BYTES];
        let n = encode_batch(&mut buf, 1, &[]);
        buf[4] = 200; // claims 200 runs in a 16-byte message
        assert!(decode_request(&buf[..n]).is_err());
        assert!(decode_request(&buf[..3]).is_err());
        buf[0] = 99;
        assert!(decode_request(&buf[..16]).is_err());
    }
}
