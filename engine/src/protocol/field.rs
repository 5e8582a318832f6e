//! The pieces frames are made of: each type that appears in a message says once how it is
//! written, how it is read back, and the fewest and most bytes it can take.
//!
//! The codec's message table ([`super::codec`]) only lists fields in order; encode, decode
//! and every size limit follow from the [`Field`] impls here, so a field cannot be written in
//! one order and read in another, and a limit cannot drift from the layout it bounds.
//!
//! Reading is defensive in one place, [`R`]: every count is checked against the bytes left
//! (times the fewest bytes one item takes) before anything is allocated, so decoding never
//! allocates much more than the frame it reads.

use super::TransportKind;
use crate::region::RegionDesc;
use crate::stats::{EndFigures, MemoryFacts, MAX_NOTE};
use crate::verify::VerifyMode;
use crate::EngineError;

/// Longest human-readable text in a frame (`Error`, `Cancel`, a transport note); longer text
/// is cut at a character boundary when encoded.
pub const MAX_TEXT: usize = 64 << 10;
pub use crate::region::{MAX_NAME, MAX_REGIONS};

/// A malformed-frame error.
pub(crate) fn bad(what: &str) -> EngineError {
    EngineError::Protocol(format!("malformed frame: {what}"))
}

/// A frame body being read: the bytes not yet consumed.
pub(crate) struct R<'a>(pub(crate) &'a [u8]);

impl<'a> R<'a> {
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    /// The next `N` bytes as an array.
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    /// A `u32` count of items of at least `min_size` bytes each, at most `max`, that must fit
    /// in what is left.
    fn count(&mut self, min_size: usize, max: usize) -> Result<usize, EngineError> {
        let n = u32::get(self)? as usize;
        if n.saturating_mul(min_size.max(1)) > self.0.len() {
            return Err(bad("count larger than the frame"));
        }
        if n > max {
            return Err(bad("count above its limit"));
        }
        Ok(n)
    }

    /// Whether every byte was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A value with a fixed layout inside a frame.
pub(crate) trait Field: Sized {
    /// Fewest bytes the encoding takes.
    const MIN: usize;
    /// Most bytes the encoding takes (`usize::MAX`: only the frame bounds it).
    const MAX: usize;
    /// Appends the encoding.
    fn put(&self, w: &mut Vec<u8>);
    /// Reads one value.
    fn get(r: &mut R<'_>) -> Result<Self, EngineError>;

    /// Appends every item of a list (after its count).
    fn put_all(items: &[Self], w: &mut Vec<u8>) {
        items.iter().for_each(|i| i.put(w));
    }

    /// Reads the `n` items of a list whose count was checked against what is left.
    fn get_n(r: &mut R<'_>, n: usize) -> Result<Vec<Self>, EngineError> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(Self::get(r)?);
        }
        Ok(v)
    }
}

/// Most bytes of a list of at most `cap` items of at most `item_max` bytes each.
pub(crate) const fn list_max(item_max: usize, cap: usize) -> usize {
    4usize.saturating_add(item_max.saturating_mul(cap))
}

/// Writes a list of at most `cap` items: a `u32` count, then the items. Lists are never cut:
/// a longer one is the caller's bug, and the peer refuses it loudly rather than losing data.
pub(crate) fn put_list<T: Field>(w: &mut Vec<u8>, items: &[T], cap: usize) {
    debug_assert!(
        items.len() <= cap,
        "a list of {} items, at most {cap}",
        items.len()
    );
    (items.len() as u32).put(w);
    T::put_all(items, w);
}

/// Reads a list of at most `cap` items.
pub(crate) fn get_list<T: Field>(r: &mut R<'_>, cap: usize) -> Result<Vec<T>, EngineError> {
    let n = r.count(T::MIN, cap)?;
    T::get_n(r, n)
}

/// The element type of a list field (lets the message table name a list's item size).
pub(crate) trait Listed {
    /// The element.
    type Item: Field;
}

impl<T: Field> Listed for Vec<T> {
    type Item = T;
}

/// Integers, little-endian.
macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            const MIN: usize = std::mem::size_of::<$t>();
            const MAX: usize = std::mem::size_of::<$t>();
            fn put(&self, w: &mut Vec<u8>) {
                w.extend_from_slice(&self.to_le_bytes());
            }
            fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
                Ok(<$t>::from_le_bytes(r.arr()?))
            }
        }
    )*};
}
int_field!(u16, u32, u64);

impl Field for u8 {
    const MIN: usize = 1;
    const MAX: usize = 1;
    fn put(&self, w: &mut Vec<u8>) {
        w.push(*self);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok(r.take(1)?[0])
    }
    /// Byte strings are copied at once.
    fn put_all(items: &[Self], w: &mut Vec<u8>) {
        w.extend_from_slice(items);
    }
    fn get_n(r: &mut R<'_>, n: usize) -> Result<Vec<Self>, EngineError> {
        Ok(r.take(n)?.to_vec())
    }
}

/// A boolean is one byte, 0 or 1; anything else is refused.
impl Field for bool {
    const MIN: usize = 1;
    const MAX: usize = 1;
    fn put(&self, w: &mut Vec<u8>) {
        w.push(*self as u8);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        match u8::get(r)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("bad boolean")),
        }
    }
}

/// Fixed-size byte arrays (nonces, MACs, session ids, GIDs) travel as they are.
impl<const N: usize> Field for [u8; N] {
    const MIN: usize = N;
    const MAX: usize = N;
    fn put(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(self);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        r.arr()
    }
}

/// An optional `u64`: a flag byte (0 or 1), then the value if present.
impl Field for Option<u64> {
    const MIN: usize = 1;
    const MAX: usize = 9;
    fn put(&self, w: &mut Vec<u8>) {
        match self {
            Some(v) => {
                w.push(1);
                v.put(w);
            }
            None => w.push(0),
        }
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        match u8::get(r)? {
            0 => Ok(None),
            1 => Ok(Some(u64::get(r)?)),
            _ => Err(bad("bad optional")),
        }
    }
}

/// An optional boolean: one byte, 0 absent, 1 false, 2 true; anything else is refused.
impl Field for Option<bool> {
    const MIN: usize = 1;
    const MAX: usize = 1;
    fn put(&self, w: &mut Vec<u8>) {
        w.push(self.map_or(0, |b| 1 + b as u8));
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        match u8::get(r)? {
            0 => Ok(None),
            1 => Ok(Some(false)),
            2 => Ok(Some(true)),
            _ => Err(bad("bad optional boolean")),
        }
    }
}

/// Writes `s`, cut to at most `max` bytes at a character boundary, as a byte list.
pub(crate) fn put_text(w: &mut Vec<u8>, s: &str, max: usize) {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    put_list(w, &s.as_bytes()[..n], max);
}

/// Reads a UTF-8 text of at most `max` bytes.
pub(crate) fn get_text(r: &mut R<'_>, max: usize) -> Result<String, EngineError> {
    let n = r.count(1, usize::MAX)?;
    if n > max {
        return Err(bad("string too long"));
    }
    String::from_utf8(r.take(n)?.to_vec()).map_err(|_| bad("invalid UTF-8"))
}

/// Human-readable text: a byte list of at most [`MAX_TEXT`] bytes of UTF-8. Longer text is
/// cut when encoded, so that an error message too long for the peer still reaches it.
impl Field for String {
    const MIN: usize = 4;
    const MAX: usize = 4 + MAX_TEXT;
    fn put(&self, w: &mut Vec<u8>) {
        put_text(w, self, MAX_TEXT);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        get_text(r, MAX_TEXT)
    }
}

/// A list the frame alone bounds (checksums of one region, digests).
impl<T: Field> Field for Vec<T> {
    const MIN: usize = 4;
    const MAX: usize = usize::MAX;
    fn put(&self, w: &mut Vec<u8>) {
        put_list(w, self, usize::MAX);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        get_list(r, usize::MAX)
    }
}

impl<A: Field, B: Field> Field for (A, B) {
    const MIN: usize = A::MIN + B::MIN;
    const MAX: usize = A::MAX.saturating_add(B::MAX);
    fn put(&self, w: &mut Vec<u8>) {
        self.0.put(w);
        self.1.put(w);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok((A::get(r)?, B::get(r)?))
    }
}

impl<A: Field, B: Field, C: Field> Field for (A, B, C) {
    const MIN: usize = A::MIN + B::MIN + C::MIN;
    const MAX: usize = A::MAX.saturating_add(B::MAX).saturating_add(C::MAX);
    fn put(&self, w: &mut Vec<u8>) {
        self.0.put(w);
        self.1.put(w);
        self.2.put(w);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok((A::get(r)?, B::get(r)?, C::get(r)?))
    }
}

/// A transport by its code; an unknown code is refused where one transport is named.
impl Field for TransportKind {
    const MIN: usize = 1;
    const MAX: usize = 1;
    fn put(&self, w: &mut Vec<u8>) {
        w.push(self.code());
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        TransportKind::from_code(u8::get(r)?).ok_or_else(|| bad("unknown transport"))
    }
    /// In a list of offered transports, unknown codes are skipped: a newer peer may offer
    /// more than we know.
    fn get_n(r: &mut R<'_>, n: usize) -> Result<Vec<Self>, EngineError> {
        let codes = r.take(n)?;
        Ok(codes
            .iter()
            .filter_map(|&c| TransportKind::from_code(c))
            .collect())
    }
}

/// A verification mode is one byte: 0 off and 1 received (the `false`/`true` this field was
/// before), 2 memory; anything else is refused.
impl Field for VerifyMode {
    const MIN: usize = 1;
    const MAX: usize = 1;
    fn put(&self, w: &mut Vec<u8>) {
        w.push(self.wire());
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        VerifyMode::from_wire(u8::get(r)?).ok_or_else(|| bad("unknown verification mode"))
    }
}

/// A region's description; its name is at most [`MAX_NAME`] bytes.
impl Field for RegionDesc {
    const MIN: usize = 4 + 4 + 8 + 8 + <Option<u64> as Field>::MIN;
    const MAX: usize = 4 + 4 + MAX_NAME + 8 + 8 + <Option<u64> as Field>::MAX;
    fn put(&self, w: &mut Vec<u8>) {
        self.id.put(w);
        put_text(w, &self.name, MAX_NAME);
        self.len.put(w);
        self.page_size.put(w);
        self.gpa.put(w);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok(RegionDesc {
            id: u32::get(r)?,
            name: get_text(r, MAX_NAME)?,
            len: u64::get(r)?,
            page_size: u64::get(r)?,
            gpa: <Option<u64>>::get(r)?,
        })
    }
}

/// How one end's memory was prepared; its note is at most [`MAX_NOTE`] bytes.
impl Field for MemoryFacts {
    const MIN: usize = 1 + <Option<u64> as Field>::MIN + 4;
    const MAX: usize = 1 + <Option<u64> as Field>::MAX + 4 + MAX_NOTE;
    fn put(&self, w: &mut Vec<u8>) {
        self.prefaulted.put(w);
        self.huge_bytes.put(w);
        put_text(w, &self.huge_pages, MAX_NOTE);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok(MemoryFacts {
            prefaulted: <Option<bool>>::get(r)?,
            huge_bytes: <Option<u64>>::get(r)?,
            huge_pages: get_text(r, MAX_NOTE)?,
        })
    }
}

/// One end's figures: byte count, rounds, rate, three durations, then its memory facts.
impl Field for EndFigures {
    const MIN: usize = 8 + 4 + 8 * 4 + MemoryFacts::MIN;
    const MAX: usize = 8 + 4 + 8 * 4 + MemoryFacts::MAX;
    fn put(&self, w: &mut Vec<u8>) {
        self.page_bytes.put(w);
        self.rounds.put(w);
        self.rate.put(w);
        self.downtime_us.put(w);
        self.setup_us.put(w);
        self.total_us.put(w);
        self.memory.put(w);
    }
    fn get(r: &mut R<'_>) -> Result<Self, EngineError> {
        Ok(EndFigures {
            page_bytes: u64::get(r)?,
            rounds: u32::get(r)?,
            rate: u64::get(r)?,
            downtime_us: u64::get(r)?,
            setup_us: u64::get(r)?,
            total_us: u64::get(r)?,
            memory: MemoryFacts::get(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v`'s encoding.
    fn encoded<T: Field>(v: &T) -> Vec<u8> {
        let mut w = Vec::new();
        v.put(&mut w);
        w
    }

    /// `T::MIN` is the length of `small`'s encoding and `T::MAX` of `large`'s, and each reads
    /// back as itself with nothing left over.
    fn assert_bounds<T: Field + PartialEq + std::fmt::Debug>(small: T, large: T) {
        for (v, bound) in [(&small, T::MIN), (&large, T::MAX)] {
            let w = encoded(v);
            assert_eq!(w.len(), bound, "{v:?}");
            let mut r = R(&w);
            assert_eq!(&T::get(&mut r).expect("reads back"), v);
            assert!(r.0.is_empty(), "{v:?}: {} bytes left", r.0.len());
        }
    }

    /// A composite field's bounds are its smallest and its largest encodings. They are what
    /// the decoder refuses frames by before reading them (a body shorter than its type's
    /// fewest bytes) and what bounds a list's count by the bytes left (so a hostile count
    /// allocates nothing): a bound below the smallest encoding lets those through, one above
    /// the largest refuses what a peer may send. Only messages' sums were tested before, and
    /// cargo-mutants found each struct's own bound free to change.
    #[test]
    fn each_fields_bounds_are_its_smallest_and_largest_encodings() {
        assert_eq!(encoded(&0xa5u8), [0xa5]);
        assert_bounds(0u8, u8::MAX);
        assert_bounds((0u32, 0u64), (u32::MAX, u64::MAX));
        assert_bounds((0u32, 0u64, 0u64), (u32::MAX, u64::MAX, u64::MAX));
        let (small_facts, large_facts) = (
            MemoryFacts::default(),
            MemoryFacts {
                prefaulted: Some(true),
                huge_bytes: Some(u64::MAX),
                huge_pages: "h".repeat(MAX_NOTE),
            },
        );
        assert_bounds(small_facts.clone(), large_facts.clone());
        assert_bounds(
            EndFigures {
                memory: small_facts,
                ..EndFigures::default()
            },
            EndFigures {
                page_bytes: u64::MAX,
                rounds: u32::MAX,
                rate: u64::MAX,
                downtime_us: u64::MAX,
                setup_us: u64::MAX,
                total_us: u64::MAX,
                memory: large_facts,
            },
        );
        let region = |id, name: &str, n: u64, gpa| RegionDesc {
            id,
            name: name.to_string(),
            len: n,
            page_size: n,
            gpa,
        };
        assert_bounds(
            region(0, "", 0, None),
            region(u32::MAX, &"n".repeat(MAX_NAME), u64::MAX, Some(u64::MAX)),
        );
    }
}
