//! Atomic page bitmaps: dirty logs, round sets, known-zero pages.
//!
//! Words are atomics so that writers (a guest, the bench's writer threads, lane workers
//! re-marking pages) and the engine can share a bitmap without locks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bitmap of pages, one bit per page, in atomic 64-bit words.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` pages, all clear.
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// A bitmap of `bits` pages, all set.
    pub fn new_full(bits: u64) -> Self {
        let b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether it covers no page.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// The words, for scanning.
    pub fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    /// Sets bit `i` (release: a reader that sees the bit sees the writes before it).
    #[inline]
    pub fn set(&self, i: u64) {
        debug_assert!(i < self.bits);
        self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
    }

    /// Clears bit `i`.
    #[inline]
    pub fn clear(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }

    /// Whether bit `i` is set.
    #[inline]
    pub fn test(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Mask of the valid bits of word `w`.
    fn word_mask(&self, w: usize) -> u64 {
        let last = (self.bits / 64) as usize;
        if w < last || self.bits.is_multiple_of(64) {
            u64::MAX
        } else {
            (1u64 << (self.bits % 64)) - 1
        }
    }

    /// Applies `f(word, mask)` to the words covering `first..first+n`.
    fn range_words(&self, first: u64, n: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        if n == 0 {
            return;
        }
        let end = (first + n).min(self.bits);
        let mut i = first;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = ((w as u64 + 1) * 64).min(end) - w as u64 * 64;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[w], mask);
            i = w as u64 * 64 + hi;
        }
    }

    /// Sets bits `first..first+n`.
    pub fn set_range(&self, first: u64, n: u64) {
        self.range_words(first, n, |w, m| {
            w.fetch_or(m, Ordering::Release);
        });
    }

    /// Clears bits `first..first+n`.
    pub fn clear_range(&self, first: u64, n: u64) {
        self.range_words(first, n, |w, m| {
            w.fetch_and(!m, Ordering::AcqRel);
        });
    }

    /// Whether all of `first..first+n` are set.
    pub fn all_set(&self, first: u64, n: u64) -> bool {
        let mut all = true;
        self.range_words(first, n, |w, m| {
            all &= w.load(Ordering::Acquire) & m == m;
        });
        all
    }

    /// Sets bits `first..first+n` if none of them is set yet; otherwise leaves the bitmap as
    /// it was and returns false. Two callers racing for overlapping ranges cannot both win.
    pub fn try_claim(&self, first: u64, n: u64) -> bool {
        let mut won = Vec::new();
        let mut clash = false;
        self.range_words(first, n, |w, m| {
            if clash {
                return;
            }
            let before = w.fetch_or(m, Ordering::AcqRel);
            won.push(m & !before);
            clash = before & m != 0;
        });
        if clash {
            // Give back exactly the bits this call set, word by word in the same order.
            let mut i = 0;
            self.range_words(first, n, |w, _| {
                if let Some(bits) = won.get(i) {
                    w.fetch_and(!bits, Ordering::AcqRel);
                }
                i += 1;
            });
        }
        !clash
    }

    /// Whether any of `first..first+n` is set.
    pub fn any_set(&self, first: u64, n: u64) -> bool {
        let mut any = false;
        self.range_words(first, n, |w, m| {
            any |= w.load(Ordering::Acquire) & m != 0;
        });
        any
    }

    /// The set bits, in order, cleared as they are taken.
    pub fn take_set(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel) & self.word_mask(i);
            while bits != 0 {
                out.push(i as u64 * 64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.load(Ordering::Relaxed) & self.word_mask(i)).count_ones() as u64)
            .sum()
    }

    /// ORs `other` into `self` and clears `other`, word by word; returns how many bits were
    /// taken from `other`.
    pub fn take_from(&self, other: &AtomicBitmap) -> u64 {
        assert_eq!(self.bits, other.bits, "bitmaps of different sizes");
        let mut n = 0;
        for (i, (d, s)) in self.words.iter().zip(&other.words).enumerate() {
            let v = s.swap(0, Ordering::AcqRel) & self.word_mask(i);
            if v != 0 {
                n += v.count_ones() as u64;
                d.fetch_or(v, Ordering::AcqRel);
            }
        }
        n
    }

    /// ORs plain words (an embedder's dirty log) into `self`; returns the number of bits set
    /// in `src`.
    pub fn or_words(&self, src: &[u64]) -> u64 {
        let mut n = 0;
        for (i, (d, &v)) in self.words.iter().zip(src).enumerate() {
            let v = v & self.word_mask(i);
            if v != 0 {
                n += v.count_ones() as u64;
                d.fetch_or(v, Ordering::AcqRel);
            }
        }
        n
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_fails_on_any_overlap_and_leaves_nothing_behind() {
        let b = AtomicBitmap::new(300);
        assert!(b.try_claim(10, 100));
        assert!(!b.try_claim(100, 150), "overlaps 100..110");
        assert_eq!(b.count(), 100, "the failed claim gave its bits back");
        assert!(b.try_claim(110, 150));
        b.clear_range(10, 100);
        assert!(b.try_claim(0, 64));
        assert_eq!(b.take_set().len(), 214);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn ranges_counts_and_take() {
        let b = AtomicBitmap::new(200);
        b.set_range(60, 10);
        assert_eq!(b.count(), 10);
        assert!(b.test(60) && b.test(69) && !b.test(70) && !b.test(59));
        assert!(b.all_set(60, 10) && !b.all_set(59, 2));
        b.clear_range(62, 3);
        assert_eq!(b.count(), 7);
        let f = AtomicBitmap::new_full(200);
        assert_eq!(f.count(), 200);
        let d = AtomicBitmap::new(200);
        assert_eq!(d.take_from(&f), 200);
        assert_eq!(f.count(), 0);
        assert_eq!(d.count(), 200);
        assert_eq!(d.or_words(&[u64::MAX; 4]), 200);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    /// The set bits, without clearing them.
    fn bits(b: &AtomicBitmap) -> Vec<u64> {
        (0..b.len()).filter(|&i| b.test(i)).collect()
    }

    #[test]
    fn size_words_and_single_bits() {
        assert!(AtomicBitmap::new(0).is_empty());
        let b = AtomicBitmap::new(130);
        assert!(!b.is_empty());
        assert_eq!((b.len(), b.words().len()), (130, 3));
        for i in [0, 63, 64, 127, 129] {
            b.set(i);
        }
        assert_eq!(bits(&b), vec![0, 63, 64, 127, 129]);
        assert_eq!(b.words()[0].load(Ordering::Relaxed), 1 | 1 << 63);
        assert_eq!(b.words()[1].load(Ordering::Relaxed), 1 | 1 << 63);
        assert_eq!(b.words()[2].load(Ordering::Relaxed), 1 << 1);
        b.clear(63);
        b.clear(129);
        b.clear(5); // clearing a clear bit changes nothing
        assert_eq!(bits(&b), vec![0, 64, 127]);
        assert_eq!(b.words()[0].load(Ordering::Relaxed), 1);
        assert_eq!(b.words()[2].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ranges_across_words_stop_at_their_ends() {
        let b = AtomicBitmap::new(200);
        b.set_range(0, 0);
        assert_eq!(b.count(), 0, "an empty range");
        // From inside word 0 to inside word 2.
        b.set_range(60, 80);
        assert_eq!(bits(&b), (60..140).collect::<Vec<_>>());
        assert!(b.all_set(60, 80) && !b.all_set(60, 81) && !b.all_set(59, 81));
        assert!(b.any_set(139, 10) && !b.any_set(140, 60) && !b.any_set(0, 60));
        assert!(b.all_set(64, 64), "a whole word");
        // Inside one word, away from both of its ends (bits 20..44: 20 + 44 = 64).
        let w = AtomicBitmap::new(64);
        w.set_range(20, 24);
        assert_eq!(bits(&w), (20..44).collect::<Vec<_>>());
        b.clear_range(64, 64);
        assert_eq!(bits(&b), (60..64).chain(128..140).collect::<Vec<_>>());
        assert!(!b.any_set(64, 64));
        // A range past the end is cut at the end.
        b.set_range(190, 100);
        assert_eq!(b.count(), 4 + 12 + 10);
        assert!(b.all_set(190, 100));
        let f = AtomicBitmap::new_full(70);
        assert_eq!(bits(&f), (0..70).collect::<Vec<_>>());
        assert_eq!(f.words()[1].load(Ordering::Relaxed), (1 << 6) - 1);
    }

    #[test]
    fn bits_past_the_end_are_never_reported() {
        let b = AtomicBitmap::new(70);
        // Stray bits past bit 70 in the last word, as a careless writer could leave.
        b.words()[1].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(b.count(), 6);
        assert_eq!(b.take_set(), (64..70).collect::<Vec<_>>());
        let src = AtomicBitmap::new(70);
        src.words()[1].store(u64::MAX, Ordering::Relaxed);
        let d = AtomicBitmap::new(70);
        assert_eq!(d.take_from(&src), 6);
        assert_eq!(d.words()[1].load(Ordering::Relaxed), (1 << 6) - 1);
        let d = AtomicBitmap::new(70);
        assert_eq!(d.or_words(&[0, u64::MAX, u64::MAX]), 6);
        assert_eq!(bits(&d), (64..70).collect::<Vec<_>>());
        let whole = AtomicBitmap::new(128);
        assert_eq!(whole.or_words(&[1, 1 << 63]), 2);
        assert_eq!(bits(&whole), vec![0, 127]);
    }

    #[test]
    fn take_and_or_keep_what_was_there() {
        let d = AtomicBitmap::new(200);
        d.set(3);
        d.set(150);
        let s = AtomicBitmap::new(200);
        s.set(3);
        s.set(70);
        assert_eq!(d.take_from(&s), 2, "bits taken, whether new or not");
        assert_eq!(bits(&d), vec![3, 70, 150]);
        assert_eq!(s.count(), 0, "taken bits are cleared");
        assert_eq!(d.or_words(&[1 << 4]), 1);
        assert_eq!(bits(&d), vec![3, 4, 70, 150]);
        assert_eq!(d.take_set(), vec![3, 4, 70, 150]);
        assert!(d.take_set().is_empty());
        d.set(199);
        d.clear_all();
        assert!(d.take_set().is_empty());
    }

    #[test]
    fn a_claim_that_clashes_in_a_later_word_gives_back_exactly_its_own_bits() {
        let b = AtomicBitmap::new(256);
        b.set(150);
        b.set(10);
        // Claims 100..200: word 1 (100..128) is free, word 2 clashes at 150.
        assert!(!b.try_claim(100, 100));
        assert_eq!(
            bits(&b),
            vec![10, 150],
            "nothing of the failed claim is left"
        );
        // A claim over bits already set by someone else keeps them set when it fails.
        b.set_range(120, 4);
        assert!(!b.try_claim(110, 12));
        assert_eq!(bits(&b), vec![10, 120, 121, 122, 123, 150]);
        assert!(b.try_claim(64, 56));
        assert_eq!(b.count(), 6 + 56);
        assert!(!b.try_claim(0, 11), "clash on the last bit of the range");
        assert!(b.try_claim(0, 10));
    }
}
