//! An encrypted TCP lane: the source cuts its TLS records so that each data record starts on
//! a page (the destination uses them in place), and a destination fed records cut anywhere
//! still lands every page with its own bytes.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::{bytes, map_of, pair, Reader, PAGE};
use rmig_transport::tcp::wire::{Header, KIND_BATCH_END, KIND_CLOSE, KIND_DATA};
use rmig_transport::tcp::{TcpDestLane, TcpSourceLane};
use rmig_transport::{Batch, Pacer, Run, RunKind, SourceLane};

/// A client and a server session, handshaken in memory.
fn session() -> (rustls::ClientConnection, rustls::ServerConnection) {
    let ck = rcgen::generate_simple_self_signed(vec!["lane".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c =
        rustls::ClientConnection::new(Arc::new(client), "lane".try_into().unwrap()).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut wire.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        wire.clear();
        s.write_tls(&mut wire).unwrap();
        c.read_tls(&mut wire.as_slice()).unwrap();
        c.process_new_packets().unwrap();
    }
    (c, s)
}

/// `pages` pages of page-aligned memory, each word different.
fn memory(pages: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..pages * 512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// Two data runs: pages 0..5 and page 7.
fn batch() -> Batch {
    let run = |first_page, npages| Run {
        region: 0,
        first_page,
        npages,
        kind: RunKind::Data,
    };
    Batch {
        seq: 1,
        runs: vec![run(0, 5), run(7, 1)],
        data_bytes: 6 * PAGE as u64,
    }
}

/// Each record's plaintext, as the destination's lane sees it (one piece per record).
fn records(s: &mut rustls::ServerConnection, mut sealed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !sealed.is_empty() {
        s.read_tls(&mut sealed).unwrap();
        s.process_new_packets().unwrap();
        while let Ok(chunk) = s.reader().into_first_chunk() {
            if chunk.is_empty() {
                break;
            }
            out.push(chunk.to_vec());
            let n = chunk.len();
            std::io::BufRead::consume(&mut s.reader(), n);
        }
    }
    out
}

#[test]
fn every_data_record_starts_on_a_page_and_ends_with_the_next_headers() {
    let (client, mut server) = session();
    let mut src = memory(8);
    let (a, mut b) = pair();
    let mut lane =
        TcpSourceLane::new_tls(a, client, map_of(&mut src), Arc::new(Pacer::new(0))).unwrap();
    lane.send(&batch()).unwrap();
    lane.close();
    let mut sealed = Vec::new();
    b.read_to_end(&mut sealed).unwrap();
    let got = records(&mut server, &sealed);
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    // [header] [4 pages] [page, header] [page, batch end] [close]
    assert_eq!(lens, [24, 4 * PAGE, PAGE + 24, PAGE + 24, 24]);
    let m = bytes(&src);
    assert!(
        got[1] == m[..4 * PAGE],
        "pages 0..4, from the record's first byte"
    );
    assert!(got[2][..PAGE] == m[4 * PAGE..5 * PAGE], "page 4");
    assert!(got[3][..PAGE] == m[7 * PAGE..8 * PAGE], "page 7");
}

#[test]
fn records_cut_across_pages_still_land_every_page_with_its_bytes() {
    let (mut client, server) = session();
    let src = memory(8);
    let mut dst = vec![0u64; 8 * 512];
    let (mut a, b) = pair();
    let dmap = map_of(&mut dst);
    let sink = Arc::new(Reader::new(8));
    let s2 = sink.clone();
    let recv = std::thread::spawn(move || {
        TcpDestLane::new_tls(b, server, dmap)
            .unwrap()
            .run(s2.as_ref())
    });
    // The whole batch in one write: rustls cuts its records every 16 KiB, so pages straddle
    // records and the first record holds a header and three pages and a half.
    let h = |kind, first_page, count| {
        Header {
            kind,
            region: 0,
            first_page,
            count,
        }
        .encode()
    };
    let m = bytes(&src);
    let mut plain = h(KIND_DATA, 0, 5).to_vec();
    plain.extend_from_slice(&m[..5 * PAGE]);
    plain.extend_from_slice(&h(KIND_DATA, 7, 1));
    plain.extend_from_slice(&m[7 * PAGE..]);
    plain.extend_from_slice(&h(KIND_BATCH_END, 0, 1));
    plain.extend_from_slice(&h(KIND_CLOSE, 0, 0));
    client.writer().write_all(&plain).unwrap();
    while client.wants_write() {
        client.write_tls(&mut a).unwrap();
    }
    let sum = recv.join().unwrap().unwrap();
    assert_eq!(sum.data_pages, 6);
    let d = bytes(&dst);
    for p in [0, 1, 2, 3, 4, 7] {
        let want = &m[p * PAGE..(p + 1) * PAGE];
        assert!(d[p * PAGE..(p + 1) * PAGE] == *want, "page {p} in memory");
        let seen = sink.pages.lock().unwrap()[p].clone();
        assert!(seen.as_deref() == Some(want), "page {p} handed to the sink");
    }
    assert!(
        d[5 * PAGE..7 * PAGE].iter().all(|&x| x == 0),
        "pages 5 and 6 untouched"
    );
}
