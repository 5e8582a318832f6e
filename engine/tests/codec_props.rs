//! Properties of the control codec, over generated messages of every type and generated or
//! damaged frames: every message round-trips and fits its type's limit, and nothing a peer
//! can send makes the decoder panic.
//!
//! The case count comes from `PROPTEST_CASES` (256 by default, a short run in the test
//! suite); `scripts/fuzz.sh` runs them with a million cases in all. Allocation is measured in
//! its own binary (`codec_alloc.rs`), which needs a counting global allocator.

use proptest::prelude::*;
use rmig_engine::protocol::codec::{body_len, decode, encode, read_sync, tag, Limits, MAX_TEXT};
use rmig_engine::protocol::Message;

mod codec_gen;
use codec_gen::{apply, damage, raw_body};

/// `s` cut to at most `MAX_TEXT` bytes at a character boundary, as the encoder does.
fn cut(s: &str) -> String {
    let mut n = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s[..n].to_string()
}

/// The message the peer decodes: `m` with its texts cut.
fn as_received(m: &Message) -> Message {
    match m {
        Message::Cancel { reason } => Message::Cancel {
            reason: cut(reason),
        },
        Message::Error { message } => Message::Error {
            message: cut(message),
        },
        Message::TransportAccept { kind, lanes, note } => Message::TransportAccept {
            kind: *kind,
            lanes: *lanes,
            note: cut(note),
        },
        m => m.clone(),
    }
}

/// Whatever decodes must encode to a frame that decodes to the same message.
fn check_decoded(body: &[u8]) {
    if let Ok(m) = decode(body) {
        let again = encode(&m);
        assert_eq!(decode(&again[4..]).expect("re-encoded frame decodes"), m);
    }
}

proptest! {
    #[test]
    fn every_message_round_trips_and_fits_its_limit(m in codec_gen::message()) {
        let f = encode(&m);
        let n = body_len(f[..4].try_into().unwrap()).unwrap();
        prop_assert_eq!(n, f.len() - 4);
        let t = f[4];
        prop_assert_eq!(tag::name(t), m.name());
        let max = Limits::default().max_body(t).unwrap();
        prop_assert!(n <= max, "{} of {} bytes, limit {}", m.name(), n, max);
        prop_assert!(n >= Limits::min_body(t).unwrap());
        prop_assert_eq!(decode(&f[4..]).unwrap(), as_received(&m));
        let mut cursor = std::io::Cursor::new(&f);
        prop_assert_eq!(read_sync(&mut cursor).unwrap(), as_received(&m));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(body in raw_body()) {
        check_decoded(&body);
    }

    #[test]
    fn decode_never_panics_on_damaged_frames(
        m in codec_gen::message(),
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        let mut body = encode(&m)[4..].to_vec();
        for d in &damages {
            apply(&mut body, d);
        }
        check_decoded(&body);
    }

    #[test]
    fn a_damaged_stream_never_panics_the_reader(
        m in codec_gen::message(),
        d in damage(),
    ) {
        // The length prefix is part of what may be damaged.
        let mut frame = encode(&m);
        apply(&mut frame, &d);
        let mut cursor = std::io::Cursor::new(&frame);
        if let Ok(got) = read_sync(&mut cursor) {
            let again = encode(&got);
            prop_assert_eq!(decode(&again[4..]).unwrap(), got);
        }
    }
}
