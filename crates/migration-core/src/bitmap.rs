//! A plain page bitmap, and an atomic one that threads mark concurrently.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// A bitmap of `len` bits, all set.
    pub fn full(len: u64) -> Self {
        let mut map = Self::new(len);
        map.set_range(0, len);
        map
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set. Bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears bit `i`, returning whether it was set.
    pub fn test_and_clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let word = &mut self.words[(i / 64) as usize];
        let mask = 1 << (i % 64);
        let was = *word & mask != 0;
        *word &= !mask;
        was
    }

    /// Sets bits `[first, first + count)`, clamped to the bitmap.
    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        while i < end {
            if i % 64 == 0 && end - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// ORs every bit of `other` (of the same length) into `self`.
    pub fn or_from(&mut self, other: &Bitmap) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Clears every bit set in `other`.
    pub fn clear_from(&mut self, other: &Bitmap) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut word = self.words[index] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = index as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut word = !self.words[index] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = index as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            index += 1;
            word = !*self.words.get(index)?;
        }
    }

    /// Takes the run of set bits starting at `first` (which must be set),
    /// at most `max` long, clearing them. Returns the run's length.
    pub fn take_run(&mut self, first: u64, max: u64) -> u64 {
        let mut count = 0;
        while count < max && self.test_and_clear(first + count) {
            count += 1;
        }
        count
    }
}

/// A bitmap that many threads mark at once (the software dirty log).
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: migration_sys::zeroed_atomics(len.div_ceil(64) as usize),
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Whether bit `i` is set. Bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Clears bit `i`, returning whether it was set.
    pub fn test_and_clear(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let mask = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets bit `i`, returning whether it was set already (past the end:
    /// ignored, and reads as clear).
    pub fn test_and_set(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let mask = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// The bits as bytes, bit `i` in byte `i / 8` (least significant bit
    /// first): `len.div_ceil(8)` bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self
            .words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        bytes.truncate(self.len.div_ceil(8) as usize);
        bytes
    }

    /// Sets every bit.
    pub fn fill(&self) {
        for (index, word) in self.words.iter().enumerate() {
            let bits = (self.len - index as u64 * 64).min(64);
            word.store(if bits == 64 { u64::MAX } else { (1 << bits) - 1 }, Ordering::Release);
        }
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        (from..self.len).find(|&i| !self.get(i))
    }

    /// Sets every bit to the one of `other` (of the same length), a word at a
    /// time: `invert` stores the complement instead. Not atomic as a whole:
    /// for a bitmap no other thread changes meanwhile.
    pub fn store(&self, other: &Bitmap, invert: bool) {
        debug_assert_eq!(self.len, other.len);
        for (index, (word, &bits)) in self.words.iter().zip(&other.words).enumerate() {
            let valid = (self.len - index as u64 * 64).min(64);
            let mask = if valid == 64 { u64::MAX } else { (1 << valid) - 1 };
            word.store(if invert { !bits & mask } else { bits & mask }, Ordering::Release);
        }
    }

    /// The first set bit at or after `from`, a word at a time.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut bits = self.words[index].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let bit = index as u64 * 64 + u64::from(bits.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            index += 1;
            bits = self.words.get(index)?.load(Ordering::Acquire);
        }
    }

    /// Claims a run of set bits: finds the first set bit at or after
    /// `from`, then clears it and the set bits right after it, at most
    /// `max` in all. Returns the run as (first, count). A bit another thread
    /// clears first is not part of the run: every bit is claimed once.
    pub fn take_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut at = from;
        loop {
            let first = self.next_set(at)?;
            if !self.test_and_clear(first) {
                // Another thread took it first.
                at = first + 1;
                continue;
            }
            let mut count = 1;
            while count < max && self.test_and_clear(first + count) {
                count += 1;
            }
            return Some((first, count));
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Atomically takes every set bit, clearing it, and hands each run of
    /// set bits to `sink(first, count)`. A bit set concurrently is either
    /// taken now or left for the next call: never lost.
    pub fn drain(&self, sink: &mut dyn FnMut(u64, u64)) -> u64 {
        word_runs(self.words.iter().map(|word| word.swap(0, Ordering::AcqRel)), sink)
    }
}

/// Hands each run of set bits of `words` (bit `i` of word `w` is bit
/// `64 * w + i`) to `sink(first, count)`, in order; returns the bits set.
pub(crate) fn word_runs(words: impl IntoIterator<Item = u64>, sink: &mut dyn FnMut(u64, u64)) -> u64 {
    let mut total = 0;
    let mut run: Option<(u64, u64)> = None;
    for (index, mut bits) in words.into_iter().enumerate() {
        while bits != 0 {
            let bit = index as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            total += 1;
            run = match run {
                Some((first, count)) if first + count == bit => Some((first, count + 1)),
                Some((first, count)) => {
                    sink(first, count);
                    Some((bit, 1))
                }
                None => Some((bit, 1)),
            };
        }
    }
    if let Some((first, count)) = run {
        sink(first, count);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn set_range_and_runs_agree(len in 1u64..300, ranges in proptest::collection::vec((0u64..300, 0u64..80), 0..6)) {
            let mut map = Bitmap::new(len);
            let mut model = vec![false; len as usize];
            for (first, count) in ranges {
                map.set_range(first, count);
                for i in first..(first + count).min(len) {
                    model[i as usize] = true;
                }
            }
            prop_assert_eq!(map.count_ones(), model.iter().filter(|b| **b).count() as u64);
            let mut seen = vec![false; len as usize];
            let mut from = 0;
            while let Some(first) = map.next_set(from) {
                let run = map.take_run(first, 7);
                prop_assert!(run >= 1);
                for i in first..first + run {
                    seen[i as usize] = true;
                }
                from = first + run;
            }
            prop_assert_eq!(&seen, &model);
            let first_unset = model.iter().position(|b| !*b).map(|i| i as u64);
            let mut again = Bitmap::new(len);
            for (i, bit) in model.iter().enumerate() {
                if *bit {
                    again.set(i as u64);
                }
            }
            prop_assert_eq!(again.next_clear(0), first_unset);
            prop_assert_eq!(map.count_ones(), 0);
        }

        #[test]
        fn atomic_drain_reports_every_bit_once(len in 1u64..500, bits in proptest::collection::vec(0u64..500, 0..50)) {
            let map = AtomicBitmap::new(len);
            let mut want = std::collections::BTreeSet::new();
            for bit in bits {
                map.set(bit);
                if bit < len {
                    want.insert(bit);
                }
            }
            let mut got = std::collections::BTreeSet::new();
            let total = map.drain(&mut |first, count| {
                for i in first..first + count {
                    assert!(got.insert(i), "bit {i} reported twice");
                }
            });
            prop_assert_eq!(total, want.len() as u64);
            prop_assert_eq!(got, want);
            prop_assert_eq!(map.drain(&mut |_, _| panic!("drained twice")), 0);
            map.fill();
            prop_assert_eq!(map.next_clear(0), None);
            if len > 3 {
                prop_assert!(map.test_and_clear(3));
                prop_assert!(!map.test_and_clear(3));
                prop_assert!(!map.get(3));
                prop_assert_eq!(map.next_clear(0), Some(3));
                prop_assert!(!map.test_and_set(3));
                prop_assert!(map.test_and_set(3));
                prop_assert!(map.get(3));
            }
            prop_assert!(!map.test_and_set(len));
        }

        #[test]
        fn atomic_bytes_put_bit_i_in_byte_i_over_8(len in 0u64..300, bits in proptest::collection::vec(0u64..300, 0..40)) {
            let map = AtomicBitmap::new(len);
            let mut want = vec![0u8; len.div_ceil(8) as usize];
            for bit in bits {
                map.set(bit);
                if bit < len {
                    want[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
            prop_assert_eq!(map.to_le_bytes(), want);
        }

        #[test]
        fn runs_taken_claim_every_set_bit_once(len in 1u64..400, bits in proptest::collection::vec(0u64..400, 0..80), max in 1u64..20) {
            let map = AtomicBitmap::new(len);
            let mut want: Vec<u64> = bits.into_iter().filter(|&b| b < len).collect();
            want.sort_unstable();
            want.dedup();
            for &bit in &want {
                map.set(bit);
            }
            prop_assert_eq!(map.count_ones(), want.len() as u64);
            prop_assert_eq!(map.next_set(0), want.first().copied());
            let mut got = Vec::new();
            let mut at = 0;
            while let Some((first, count)) = map.take_run(at, max) {
                prop_assert!(count >= 1 && count <= max);
                got.extend(first..first + count);
                at = first + count;
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(map.count_ones(), 0);
        }
    }
}
