//! Strategies shared by the codec's property tests: every message, and ways to damage a
//! frame. Lists are mostly short (cases stay fast) but reach their limits now and then, and
//! texts sometimes exceed theirs.
#![allow(dead_code)] // each test binary uses its own part

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::SizeRange;
use rmig_engine::protocol::codec::{
    MAX_DEVICE_PIECE, MAX_KINDS, MAX_MISMATCHES, MAX_NAME, MAX_POSTCOPY_RUNS, MAX_REGIONS, MAX_TEXT,
};
use rmig_engine::protocol::{Message, TransportKind};
use rmig_engine::region::RegionDesc;
use rmig_engine::verify::VerifyMode;
use rmig_engine::{EndFigures, MemoryFacts};

/// Lengths mostly small, sometimes exactly `max` or near it.
pub fn len_upto(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0..=max.min(16),
        1 => Just(max),
        1 => (max.saturating_sub(3))..=max,
    ]
}

/// A vector of `item`s whose length follows [`len_upto`].
pub fn list<S: Strategy + 'static>(item: S, max: usize) -> BoxedStrategy<Vec<S::Value>>
where
    S::Value: std::fmt::Debug + Clone,
{
    let item = std::sync::Arc::new(item);
    len_upto(max)
        .prop_flat_map(move |n| vec(item.clone(), SizeRange::from(n..=n)))
        .boxed()
}

/// `n` pseudo-random words from `seed` (large lists of numbers, cheaper to make than
/// element by element).
fn words(n: usize, mut seed: u64) -> impl Iterator<Item = u64> {
    seed |= 1;
    (0..n).map(move |_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    })
}

/// A list of up to `max` values made from pseudo-random words by `f`.
pub fn cheap<T: std::fmt::Debug + Clone + 'static>(
    max: usize,
    f: fn(u64) -> T,
) -> BoxedStrategy<Vec<T>> {
    (len_upto(max), any::<u64>())
        .prop_map(move |(n, seed)| words(n, seed).map(f).collect())
        .boxed()
}

/// Text of any characters, sometimes longer than `max` bytes (cut when encoded).
pub fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        6 => ".{0,40}",
        // Around `max` bytes, so that a cut often falls inside a character.
        1 => (any::<char>(), max - 8..=max + 8).prop_map(|(c, bytes)| {
            std::iter::repeat_n(c, bytes / c.len_utf8() + 1).collect::<String>()
        }),
    ]
    .boxed()
}

/// A region name of at most `MAX_NAME` bytes (longer ones are refused by validation):
/// any text, or only names of exactly `MAX_NAME` bytes (the largest tables).
fn name(longest: bool) -> impl Strategy<Value = String> {
    let s = if longest {
        format!("[a-z]{{{MAX_NAME}}}")
    } else {
        ".{0,80}".to_string()
    };
    proptest::string::string_regex(&s)
        .expect("regex")
        .prop_map(|s: String| {
            let mut n = s.len().min(MAX_NAME);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            s[..n].to_string()
        })
}

fn region(longest: bool) -> impl Strategy<Value = RegionDesc> {
    (
        any::<u32>(),
        name(longest),
        any::<u64>(),
        any::<u64>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(id, name, len, page_size, gpa)| RegionDesc {
            id,
            name,
            len,
            page_size,
            gpa,
        })
}

fn kind() -> impl Strategy<Value = TransportKind> {
    prop_oneof![Just(TransportKind::Tcp), Just(TransportKind::Rdma)]
}

/// Messages made of fixed-size fields only.
fn fixed() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<(u16, u16)>().prop_map(|(min_version, max_version)| Message::Hello {
            min_version,
            max_version
        }),
        any::<(u16, [u8; 32])>().prop_map(|(version, nonce)| Message::HelloAck { version, nonce }),
        any::<([u8; 32], [u8; 32])>().prop_map(|(nonce, mac)| Message::AuthProof { nonce, mac }),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthOk { mac }),
        any::<([u8; 16], u16, [u8; 32])>().prop_map(|(session, lane, mac)| Message::LaneJoin {
            session,
            lane,
            mac
        }),
        any::<([u8; 16], u32, [u8; 32])>().prop_map(|(session, attempt, mac)| {
            Message::Rejoin {
                session,
                attempt,
                mac,
            }
        }),
        any::<(u32, [u8; 32])>()
            .prop_map(|(next_round, mac)| Message::RejoinOk { next_round, mac }),
        any::<(u32, bool)>().prop_map(|(round, last)| Message::RoundStart { round, last }),
        any::<u32>().prop_map(|round| Message::RoundEnd { round }),
        any::<u32>().prop_map(|round| Message::RoundEndAck { round }),
        prop_oneof![
            Just(Message::RegionsOk),
            Just(Message::LaneAccepted),
            Just(Message::Ready),
            Just(Message::Commit),
            Just(Message::Done),
            Just(Message::Heartbeat),
            Just(Message::Resumed),
            Just(Message::PostcopyEnd),
        ],
    ]
}

/// Messages with lists or texts.
fn sized() -> impl Strategy<Value = Message> {
    prop_oneof![
        prop_oneof![
            list(region(false), MAX_REGIONS),
            list(region(true), MAX_REGIONS)
        ]
        .prop_map(|regions| Message::RegionTable { regions }),
        (list(kind(), MAX_KINDS), any::<u16>(), 0u8..3).prop_map(|(kinds, lanes, verify)| {
            Message::TransportOffer {
                kinds,
                lanes,
                verify: VerifyMode::from_wire(verify).expect("0..3 are modes"),
            }
        }),
        (kind(), any::<u16>(), text(MAX_TEXT))
            .prop_map(|(kind, lanes, note)| Message::TransportAccept { kind, lanes, note }),
        (cheap(MAX_DEVICE_PIECE, |w| w as u8), any::<bool>())
            .prop_map(|(data, last)| Message::DeviceState { data, last }),
        list(cheap(4096, |w| w), 64).prop_map(|regions| Message::Checksums { regions }),
        cheap(20_000, |w| (w as u32, w >> 7, w.rotate_left(29)))
            .prop_map(|chunks| Message::Digests { chunks }),
        (any::<bool>(), list(any::<(u32, u64)>(), MAX_MISMATCHES))
            .prop_map(|(ok, mismatches)| Message::Verified { ok, mismatches }),
        text(MAX_TEXT).prop_map(|reason| Message::Cancel { reason }),
        text(MAX_TEXT).prop_map(|message| Message::Error { message }),
        figures(),
        (
            cheap(MAX_POSTCOPY_RUNS, |w| (w as u32, w >> 3, w.rotate_left(17))),
            any::<bool>()
        )
            .prop_map(|(runs, last)| Message::PostcopyPages { runs, last }),
    ]
}

/// One end's figures; the note stays within its limit (the cut is a unit test's).
fn figures() -> impl Strategy<Value = Message> {
    (
        any::<(u64, u32, u64, u64, u64, u64)>(),
        any::<(Option<bool>, Option<u64>)>(),
        "[a-z0-9 ]{0,64}",
    )
        .prop_map(
            |((page_bytes, rounds, rate, downtime_us, setup_us, total_us), (p, h), note)| {
                Message::Figures {
                    figures: EndFigures {
                        page_bytes,
                        rounds,
                        rate,
                        downtime_us,
                        setup_us,
                        total_us,
                        memory: MemoryFacts {
                            prefaulted: p,
                            huge_bytes: h,
                            huge_pages: note,
                        },
                    },
                }
            },
        )
}

/// Any message, within its type's limits except for texts.
pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![fixed(), sized()]
}

/// Ways to damage a valid frame body.
#[derive(Debug, Clone)]
pub enum Damage {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    /// A `u32` at `at` replaced (counts and lengths).
    Count {
        at: usize,
        value: u32,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

pub fn damage() -> impl Strategy<Value = Damage> {
    let at = any::<usize>();
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        (at, any::<u8>()).prop_map(|(at, value)| Damage::Set { at, value }),
        (
            // Counts sit near the start of most bodies.
            prop_oneof![at, 0usize..48],
            prop_oneof![
                any::<u32>(),
                Just(u32::MAX),
                Just(0),
                0u32..64,
                64u32..100_000
            ]
        )
            .prop_map(|(at, value)| Damage::Count { at, value }),
        at.prop_map(|at| Damage::Truncate { at }),
        (at, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
    ]
}

pub fn apply(body: &mut Vec<u8>, d: &Damage) {
    let len = body.len().max(1);
    match d {
        Damage::Flip { at, bit } => {
            if !body.is_empty() {
                body[at % len] ^= 1 << bit;
            }
        }
        Damage::Set { at, value } => {
            if !body.is_empty() {
                body[at % len] = *value;
            }
        }
        Damage::Count { at, value } => {
            let at = at % len;
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                if let Some(x) = body.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        Damage::Truncate { at } => body.truncate(at % len),
        Damage::Insert { at, bytes } => {
            let at = at % (body.len() + 1);
            body.splice(at..at, bytes.iter().copied());
        }
    }
}

/// Bodies that start with a known tag (or near one) more often than chance would.
pub fn raw_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![0u8..=30, any::<u8>()],
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(t, mut rest)| {
            rest.insert(0, t);
            rest
        })
}
