//! Golden byte vectors of the lane wire formats: the TCP run header, batch end, close and
//! acknowledgement, and the RDMA batch descriptor, registration request, close and replies.
//!
//! Both ends of a lane share the encoder and the decoder, so a round trip cannot see a change
//! of field order, kind number or byte order; these literal bytes can.

use rmig_transport::rdma::wire::{self as rdma, Reply, SLOT_BYTES};
use rmig_transport::tcp::wire::{self as tcp, Header};
use rmig_transport::{Run, RunKind};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn header(kind: u8) -> Header {
    Header {
        kind,
        region: 0x0102_0304,
        first_page: 0x0506_0708_090a_0b0c,
        count: 0x0d0e_0f10_1112_1314,
    }
}

#[test]
fn tcp_lane_headers_and_acks_have_their_golden_bytes() {
    let cases = [
        (
            tcp::KIND_DATA,
            "01000000040302010c0b0a090807060514131211100f0e0d",
        ),
        (
            tcp::KIND_ZERO,
            "02000000040302010c0b0a090807060514131211100f0e0d",
        ),
        (
            tcp::KIND_BATCH_END,
            "03000000040302010c0b0a090807060514131211100f0e0d",
        ),
        (
            tcp::KIND_CLOSE,
            "04000000040302010c0b0a090807060514131211100f0e0d",
        ),
    ];
    for (kind, want) in cases {
        let h = header(kind);
        assert_eq!(hex(&h.encode()), want, "kind {kind}");
        let b: [u8; tcp::HEADER_LEN] = unhex(want).try_into().expect("header length");
        assert_eq!(Header::decode(&b), Ok(h));
    }
    let want = "05000000000000000807060504030201";
    assert_eq!(hex(&tcp::encode_ack(0x0102_0304_0506_0708)), want);
    let b: [u8; tcp::ACK_LEN] = unhex(want).try_into().expect("ack length");
    assert_eq!(tcp::decode_ack(&b), Ok(0x0102_0304_0506_0708));
}

/// Encodes with `f` into a fresh slot and checks the bytes and their decoding.
fn check_request(f: impl Fn(&mut [u8]) -> usize, want: &str, req: rdma::Request) {
    let mut buf = vec![0xeeu8; SLOT_BYTES];
    let n = f(&mut buf);
    assert_eq!(hex(&buf[..n]), want, "{req:?}");
    assert_eq!(rdma::decode_request(&unhex(want)), Ok(req));
}

#[test]
fn rdma_lane_messages_have_their_golden_bytes() {
    let runs = vec![
        Run {
            region: 0x0102_0304,
            first_page: 0x0506_0708_090a_0b0c,
            npages: 0x0d0e_0f10,
            kind: RunKind::Data,
        },
        Run {
            region: 2,
            first_page: 3,
            npages: 4,
            kind: RunKind::Zero,
        },
    ];
    check_request(
        |b| rdma::encode_batch(b, 0x1112_1314_1516_1718, &runs),
        "0100000002000000181716151413121104030201100f0e0d0c0b0a0908070605\
         02000000040000800300000000000000",
        rdma::Request::Batch {
            seq: 0x1112_1314_1516_1718,
            runs: runs.clone(),
        },
    );
    // Byte 1 flags the evicted chunk (it was padding; region u32::MAX meant "none" before).
    let evict = Some((0x0d0e_0f10, 0x1112_1314_1516_1718));
    check_request(
        |b| rdma::encode_register(b, 0x0102_0304, 0x0506_0708_090a_0b0c, evict),
        "02010000040302010c0b0a0908070605100f0e0d000000001817161514131211",
        rdma::Request::Register {
            region: 0x0102_0304,
            chunk: 0x0506_0708_090a_0b0c,
            evict,
        },
    );
    check_request(
        |b| rdma::encode_register(b, 5, 6, None),
        "02000000050000000600000000000000ffffffff000000000000000000000000",
        rdma::Request::Register {
            region: 5,
            chunk: 6,
            evict: None,
        },
    );
    check_request(
        rdma::encode_close,
        "03000000000000000000000000000000",
        rdma::Request::Close,
    );
    let replies = [
        (
            Reply::Ack(0x0102_0304_0506_0708),
            "010000000000000008070605040302010000000000000000",
        ),
        (
            Reply::Key {
                addr: 0x1112_1314_1516_1718,
                rkey: 0x090a_0b0c,
            },
            "020000000c0b0a0918171615141312110000000000000000",
        ),
        (
            Reply::Refused(12),
            "030000000c00000000000000000000000000000000000000",
        ),
    ];
    for (r, want) in replies {
        assert_eq!(hex(&rdma::encode_reply(r)), want);
        let b: [u8; rdma::REPLY_LEN] = unhex(want).try_into().expect("reply length");
        assert_eq!(rdma::decode_reply(&b), Ok(r));
    }
}
