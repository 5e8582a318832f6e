//! The byte layout of a TCP data lane.
//!
//! Source to destination, a stream of 24-byte headers, each data header followed by its
//! payload:
//! ```text
//! 0      1      4          8               16              24
//! | kind | 0 0 0| region   | first_page    | count          |
//! ```
//! `kind` is [`KIND_DATA`] (count = pages, payload = count * page size), [`KIND_ZERO`]
//! (count = pages, no payload), [`KIND_BATCH_END`] (count = batch sequence number) or
//! [`KIND_CLOSE`] (orderly end of the lane). Destination to source, 16-byte acknowledgements:
//! `| KIND_ACK | 0 * 7 | seq |`. All integers little-endian.

/// Size of a run header.
pub const HEADER_LEN: usize = 24;
/// Size of an acknowledgement.
pub const ACK_LEN: usize = 16;
/// A data run: header, then the pages' bytes.
pub const KIND_DATA: u8 = 1;
/// A zero run: header only.
pub const KIND_ZERO: u8 = 2;
/// End of a batch; `count` is its sequence number.
pub const KIND_BATCH_END: u8 = 3;
/// The source ends the lane.
pub const KIND_CLOSE: u8 = 4;
/// Destination to source: every batch up to `seq` has landed.
pub const KIND_ACK: u8 = 5;

/// A decoded run header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// One of the `KIND_*` constants.
    pub kind: u8,
    /// Region number in the session's table.
    pub region: u32,
    /// First page of the run.
    pub first_page: u64,
    /// Pages, or a sequence number for [`KIND_BATCH_END`].
    pub count: u64,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_page.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Decodes a header; the kind and padding are checked here, bounds by the receiver.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if b[1..4] != [0, 0, 0] {
            return Err("nonzero header padding".into());
        }
        let h = Header {
            kind: b[0],
            region: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            first_page: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            count: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        };
        match h.kind {
            KIND_DATA | KIND_ZERO | KIND_BATCH_END | KIND_CLOSE => Ok(h),
            k => Err(format!("unknown run kind {k}")),
        }
    }
}

/// Encodes an acknowledgement of every batch up to `seq`.
pub fn encode_ack(seq: u64) -> [u8; ACK_LEN] {
    let mut b = [0u8; ACK_LEN];
    b[0] = KIND_ACK;
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

/// Decodes an acknowledgement.
pub fn decode_ack(b: &[u8; ACK_LEN]) -> Result<u64, String> {
    if b[0] != KIND_ACK || b[1..8].iter().any(|&x| x != 0) {
        return Err("malformed acknowledgement".into());
    }
    Ok(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_refusals() {
        let h = Header {
            kind: KIND_DATA,
            region: 7,
            first_page: 1 << 40,
            count: 3,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = 9;
        assert!(Header::decode(&bad).is_err());
        let mut bad = h.encode();
        bad[2] = 1;
        assert!(Header::decode(&bad).is_err());
        assert_eq!(decode_ack(&encode_ack(42)), Ok(42));
        assert!(decode_ack(&[0u8; ACK_LEN]).is_err());
    }
}
