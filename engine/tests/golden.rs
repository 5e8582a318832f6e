//! Golden byte vectors of the control protocol: one fixed instance of every message and the
//! exact bytes it has on the wire.
//!
//! A round-trip test cannot see a change that both ends share (two fields swapped, a tag
//! renumbered, big-endian instead of little); these bytes can. They were taken from the
//! encoder before the codec was rewritten as declarations, so they also pin that rewrite to
//! the old wire format. A deliberate change of the format changes this file, visibly.

use rmig_engine::protocol::codec::{decode, encode};
use rmig_engine::protocol::{Message, TransportKind};
use rmig_engine::region::RegionDesc;
use rmig_engine::verify::VerifyMode;
use rmig_engine::{EndFigures, MemoryFacts};

/// `n` bytes counting up from `start`, so that a reversed or shifted array shows.
fn seq<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// The handshake's messages.
fn golden_handshake() -> Vec<(Message, &'static str)> {
    vec![
        (
            Message::Hello {
                min_version: 0x0102,
                max_version: 0x0304,
            },
            "050000000102010403",
        ),
        (
            Message::HelloAck {
                version: 0x0a0b,
                nonce: seq(0x10),
            },
            "23000000020b0a101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f",
        ),
        (
            Message::AuthProof {
                nonce: seq(0x20),
                mac: seq(0x40),
            },
            "4100000003202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f",
        ),
        (Message::AuthOk { mac: seq(0x60) }, "2100000004606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"),
        (
            Message::RegionTable {
                regions: vec![
                    RegionDesc {
                        id: 0x01020304,
                        name: "pc.ram".into(),
                        len: 0x0000_0001_0000_0000,
                        page_size: 4096,
                        gpa: Some(0x1122_3344_5566_7788),
                    },
                    RegionDesc {
                        id: 7,
                        name: "vga".into(),
                        len: 0x0020_0000,
                        page_size: 0x0020_0000,
                        gpa: None,
                    },
                ],
            },
            "480000000502000000040302010600000070632e72616d0000000001000000001000000000000001887766554433221107000000030000007667610000200000000000000020000000000000",
        ),
        (Message::RegionsOk, "0100000006"),
    ]
}

/// Transport negotiation and lanes.
fn golden_lanes() -> Vec<(Message, &'static str)> {
    vec![
        (
            Message::TransportOffer {
                kinds: vec![TransportKind::Rdma, TransportKind::Tcp],
                lanes: 0x0102,
                verify: VerifyMode::Received,
            },
            "0a00000007020000000201020101",
        ),
        (
            Message::TransportOffer {
                kinds: vec![TransportKind::Rdma, TransportKind::Tcp],
                lanes: 0x0102,
                verify: VerifyMode::Memory,
            },
            "0a00000007020000000201020102",
        ),
        (
            Message::TransportAccept {
                kind: TransportKind::Tcp,
                lanes: 0x0304,
                note: "no RDMA".into(),
            },
            "0f00000008010403070000006e6f2052444d41",
        ),
        (
            Message::LaneJoin {
                session: seq(0x80),
                lane: 0x0506,
                mac: seq(0x90),
            },
            "3300000009808182838485868788898a8b8c8d8e8f0605909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        ),
        (Message::LaneAccepted, "010000000a"),
        (
            Message::Rejoin {
                session: seq(0xa0),
                attempt: 0x0708_090a,
                mac: seq(0xb0),
            },
            "350000001aa0a1a2a3a4a5a6a7a8a9aaabacadaeaf0a090807b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf",
        ),
        (
            Message::RejoinOk {
                next_round: 0x0b0c_0d0e,
                mac: seq(0xd0),
            },
            "250000001b0e0d0c0bd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef",
        ),
    ]
}

/// Rounds, verification, handover and errors.
fn golden_rounds() -> Vec<(Message, &'static str)> {
    vec![
        (
            Message::RoundStart {
                round: 0x0102_0304,
                last: true,
            },
            "060000000b0403020101",
        ),
        (
            Message::RoundEnd { round: 0x0506_0708 },
            "050000000c08070605",
        ),
        (
            Message::RoundEndAck { round: 0x090a_0b0c },
            "050000000d0c0b0a09",
        ),
        (
            Message::DeviceState {
                data: b"dev\x00\xff".to_vec(),
                last: false,
            },
            "0b0000000e0500000064657600ff00",
        ),
        (
            Message::Checksums {
                regions: vec![vec![0x0102_0304_0506_0708, u64::MAX], vec![]],
            },
            "1d0000000f02000000020000000807060504030201ffffffffffffffff00000000",
        ),
        (
            Message::Digests {
                chunks: vec![(1, 0x0203, 0x0405_0607_0809_0a0b)],
            },
            "1900000019010000000100000003020000000000000b0a090807060504",
        ),
        (
            Message::Verified {
                ok: false,
                mismatches: vec![(0x0102, 0x0304_0506), (7, 8)],
            },
            "1e000000100002000000020100000605040300000000070000000800000000000000",
        ),
        (Message::Ready, "0100000018"),
        (Message::Commit, "0100000011"),
        (Message::Done, "0100000012"),
        (
            Message::Figures {
                figures: EndFigures {
                    page_bytes: 0x0102_0304_0506_0708,
                    rounds: 0x090a_0b0c,
                    rate: 0x1112_1314_1516_1718,
                    downtime_us: 0x2122_2324_2526_2728,
                    setup_us: 0x3132_3334_3536_3738,
                    total_us: 0x4142_4344_4546_4748,
                    memory: MemoryFacts {
                        prefaulted: Some(true),
                        huge_bytes: Some(0x5152_5354_5556_5758),
                        huge_pages: "thp".into(),
                    },
                },
            },
            concat!(
                "3e0000001c",
                "0807060504030201",
                "0c0b0a09",
                "1817161514131211",
                "2827262524232221",
                "3837363534333231",
                "4847464544434241",
                "02",
                "015857565554535251",
                "03000000746870",
            ),
        ),
        (
            Message::Figures {
                figures: EndFigures {
                    memory: MemoryFacts {
                        prefaulted: Some(false),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
            concat!(
                "330000001c",
                "0000000000000000",
                "00000000",
                "0000000000000000",
                "0000000000000000",
                "0000000000000000",
                "0000000000000000",
                "01",
                "00",
                "00000000",
            ),
        ),
        (Message::Heartbeat, "0100000013"),
        (
            Message::PostcopyPages {
                runs: vec![(1, 0x0203, 0x0405)],
                last: true,
            },
            concat!(
                "1a0000001d",
                "01000000",
                "01000000",
                "0302000000000000",
                "0504000000000000",
                "01",
            ),
        ),
        (Message::Resumed, "010000001e"),
        (Message::PostcopyEnd, "010000001f"),
        (
            Message::Cancel {
                reason: "operator".into(),
            },
            "0d00000014080000006f70657261746f72",
        ),
        (
            Message::Error {
                message: "boom é".into(),
            },
            "0c0000001507000000626f6f6d20c3a9",
        ),
    ]
}

/// One instance of every message, with values whose
/// bytes differ, so that byte order and field order both show in the vector.
fn golden() -> Vec<(Message, &'static str)> {
    [golden_handshake(), golden_lanes(), golden_rounds()].concat()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_message_has_its_golden_bytes() {
    let cases = golden();
    let mut names: Vec<&str> = cases.iter().map(|(m, _)| m.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 29, "one golden vector per message type");
    for (m, want) in cases {
        assert_eq!(hex(&encode(&m)), want, "{} encodes differently", m.name());
        assert_eq!(
            decode(&unhex(want)[4..]).expect("decodes"),
            m,
            "{}",
            m.name()
        );
    }
}
