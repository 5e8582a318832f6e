//! Golden byte vectors of post-copy's RDMA READ setup frames (CONNECT, ACCEPT, REFUSE), and
//! property tests that their decoder refuses damaged input without panicking.
//!
//! Both ends share the encoder and the decoder, so a round trip cannot see a change of field
//! order, kind number or byte order; these literal bytes can. No RDMA device is needed.

use proptest::prelude::*;
use rmig_transport::rdma::read_wire::{self, KIND_ACCEPT, KIND_CONNECT, KIND_REFUSE};
use rmig_transport::rdma::{ExposedRegion, QpEndpoint, ReadSetup};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn endpoint() -> QpEndpoint {
    QpEndpoint {
        qpn: 0x0001_0203,
        psn: 0x0004_0506,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1],
    }
}

/// Encodes `m`, compares with `want`, and decodes `want` back to `m`.
fn golden(m: ReadSetup, want: &str) {
    assert_eq!(hex(&m.encode()), want, "{m:?}");
    assert_eq!(ReadSetup::decode(&unhex(want)).expect("decodes"), m);
}

#[test]
fn connect_has_its_golden_bytes() {
    golden(
        ReadSetup::Connect(endpoint(), 16),
        "21\
         03020100\
         06050400\
         00000000000000000000ffffc6120001\
         10",
    );
}

#[test]
fn accept_has_its_golden_bytes() {
    let regions = vec![
        ExposedRegion {
            addr: 0x0000_7f01_0203_4000,
            len: 0x0000_0000_4000_0000,
            rkey: 0x0a0b_0c0d,
            page_size: 4096,
        },
        ExposedRegion {
            addr: 0x1122_3344_5560_0000,
            len: 0x20_0000,
            rkey: 0xdead_beef,
            page_size: 0x20_0000,
        },
    ];
    golden(
        ReadSetup::Accept(endpoint(), 8, regions),
        "22\
         03020100\
         06050400\
         00000000000000000000ffffc6120001\
         08\
         02000000\
         00400302017f0000 0000004000000000 0d0c0b0a 00100000\
         0000605544332211 0000200000000000 efbeadde 00002000"
            .replace(' ', "")
            .as_str(),
    );
    golden(
        ReadSetup::Accept(endpoint(), 1, vec![]),
        "22030201000605040000000000000000000000ffffc61200010100000000",
    );
}

#[test]
fn refuse_has_its_golden_bytes() {
    golden(ReadSetup::Refuse("no".into()), "236e6f");
    golden(ReadSetup::Refuse(String::new()), "23");
}

#[test]
fn the_kinds_are_not_the_lane_connectors() {
    // The lane connector uses 1, 2, 3: a peer in the wrong exchange fails at its first frame.
    assert_eq!((KIND_CONNECT, KIND_ACCEPT, KIND_REFUSE), (0x21, 0x22, 0x23));
    for k in 0u8..=255 {
        let known = [KIND_CONNECT, KIND_ACCEPT, KIND_REFUSE].contains(&k);
        if !known {
            assert!(ReadSetup::decode(&[k]).is_err(), "kind {k}");
        }
    }
}

fn region() -> impl Strategy<Value = ExposedRegion> {
    (0u32..=21, 0u64..1 << 20, any::<u32>(), 0u64..1 << 46).prop_map(
        |(shift, pages, rkey, addr)| {
            let page_size = 1u32 << shift;
            ExposedRegion {
                addr,
                len: pages * page_size as u64,
                rkey,
                page_size,
            }
        },
    )
}

fn endpoint_any() -> impl Strategy<Value = QpEndpoint> {
    (any::<u32>(), any::<u32>(), any::<[u8; 16]>()).prop_map(|(qpn, psn, gid)| QpEndpoint {
        qpn,
        psn,
        gid,
    })
}

fn message() -> impl Strategy<Value = ReadSetup> {
    prop_oneof![
        (endpoint_any(), any::<u8>()).prop_map(|(e, d)| ReadSetup::Connect(e, d)),
        (
            endpoint_any(),
            any::<u8>(),
            proptest::collection::vec(region(), 0..8)
        )
            .prop_map(|(e, d, r)| ReadSetup::Accept(e, d, r)),
        "[a-z é]{0,40}".prop_map(ReadSetup::Refuse),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(m in message()) {
        prop_assert_eq!(ReadSetup::decode(&m.encode()).expect("decodes"), m);
    }

    /// Any byte changed, cut or appended: the decoder answers (a message or an error) and
    /// never panics; a decoded ACCEPT's regions are always usable.
    #[test]
    fn damaged_frames_never_panic(
        m in message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        how in 0u8..3,
    ) {
        let mut b = m.encode();
        let i = at.index(b.len());
        match how {
            0 => b[i] = byte,
            1 => b.truncate(i),
            _ => b.insert(i, byte),
        }
        if let Ok(ReadSetup::Accept(_, _, regions)) = ReadSetup::decode(&b) {
            for r in regions {
                prop_assert!(r.page_size.is_power_of_two());
                prop_assert_eq!(r.len % r.page_size as u64, 0);
                prop_assert!(r.addr.checked_add(r.len).is_some());
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = ReadSetup::decode(&b);
    }
}

#[test]
fn an_accept_claiming_more_regions_than_it_carries_is_refused() {
    let mut b = ReadSetup::Accept(endpoint(), 1, vec![]).encode();
    let n = b.len() - 4;
    b[n..].copy_from_slice(&(read_wire::MAX_REGIONS as u32 + 1).to_le_bytes());
    assert!(ReadSetup::decode(&b).is_err());
    b[n..].copy_from_slice(&1u32.to_le_bytes());
    assert!(ReadSetup::decode(&b).is_err());
}
