//! XBZRLE page deltas: how a page changed since the copy the receiver
//! holds, as runs of unchanged bytes (skipped) and changed bytes (sent).
//!
//! A delta is a sequence of pairs. Each pair names how many bytes to skip
//! and how many to overwrite, and carries the bytes that overwrite:
//!
//! ```text
//!   old    a a a a a a a a a a a a a a a a
//!   new    a a a X Y a a a a a a Z a a a a
//!          |-3-| |2| |----6----| 1 |--4--|   unchanged, changed, ...
//!
//!   delta  03 02 'X' 'Y' | 06 01 'Z'
//!          \_________/     \____/
//!          pair 1          pair 2          (the last 4 unchanged bytes
//!                                           are not sent)
//!
//!   pair   unchanged: ULEB128 | changed: ULEB128 | `changed` bytes of new
//! ```
//!
//! Lengths are ULEB128: seven bits a byte, least significant first, the
//! high bit set on every byte but the last. Pages are at most
//! [`MAX_PAGE_LEN`] bytes, so a length takes at most three bytes.
//!
//! The unchanged run after the last changed run is left out, so an
//! unchanged page encodes to nothing. A decoder accepts a delta only in
//! the shape the encoder gives it: lengths in their shortest form and of at
//! most three bytes, no empty changed run, no empty unchanged run but at
//! the very start (for a page that differs from its first byte), no run
//! past the end of the page, every literal byte present, and nothing after
//! a pair that reaches the end of the page. It checks the whole delta
//! before it writes a byte, so a bad delta leaves the page as it was.
//!
//! The encoder merges changed runs that only a gap of one or two unchanged
//! bytes separates: sending those bytes costs no more than the two lengths
//! of a new pair would.

use crate::WireError;

/// The largest page a delta describes.
pub const MAX_PAGE_LEN: usize = 1 << 16;

/// The fewest unchanged bytes the encoder ends a changed run at; shorter
/// gaps travel as literal bytes.
const MIN_GAP: usize = 3;

/// Most bytes of one ULEB128 length (21 bits, enough for [`MAX_PAGE_LEN`]).
const MAX_LENGTH_BYTES: usize = 3;
const _: () = assert!(MAX_PAGE_LEN < 1 << (7 * MAX_LENGTH_BYTES));

/// Encodes how `new` differs from `old` (equal lengths, at most 64 KiB) into `out`
/// (cleared first). Returns false, with `out` unspecified, when the encoding would
/// exceed `limit` bytes. An empty encoding means the page is unchanged.
///
/// Pages longer than [`MAX_PAGE_LEN`] (huge pages) have no encoding: for them
/// this returns false, as for an encoding over the limit, and the page goes
/// whole.
///
/// # Panics
///
/// If `old` and `new` differ in length.
///
/// # Examples
///
/// ```
/// use migration_wire::xbzrle::{decode, encode};
///
/// let old = [0u8; 4096];
/// let mut new = old;
/// new[100..108].copy_from_slice(b"changed!");
/// let mut delta = Vec::new();
/// assert!(encode(&old, &new, 64, &mut delta));
/// assert_eq!(delta.len(), 2 + 8);
///
/// let mut page = old;
/// decode(&delta, &mut page).unwrap();
/// assert_eq!(page, new);
/// ```
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    assert_eq!(old.len(), new.len(), "xbzrle encodes pages of equal length");
    out.clear();
    if new.len() > MAX_PAGE_LEN {
        return false;
    }
    let mut pos = 0;
    loop {
        let start = first_change(old, new, pos);
        if start == new.len() {
            return true;
        }
        // Scan no further than a run that could still fit (one byte past
        // it, so that a longer run is known not to).
        let budget = limit.saturating_sub(out.len() + 2);
        let end = change_end(old, new, start, start.saturating_add(budget).saturating_add(1));
        let (unchanged, changed) = (start - pos, end - start);
        if out.len() + length_bytes(unchanged) + length_bytes(changed) + changed > limit {
            return false;
        }
        put_length(out, unchanged);
        put_length(out, changed);
        out.extend_from_slice(&new[start..end]);
        pos = end;
    }
}

/// Applies an encoding onto `page` (the receiver's copy of the old page) in place.
/// Total: any bytes give Ok or an error, never a panic; on error `page` is left
/// untouched (validate fully first, then apply).
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), WireError> {
    for run in Runs::new(delta, page.len()) {
        run?;
    }
    // Validated: every run lies inside the page.
    for run in Runs::new(delta, page.len()).map_while(Result::ok) {
        page[run.at..run.at + run.literal.len()].copy_from_slice(run.literal);
    }
    Ok(())
}

/// The bytes the encoder compares at a time inside a long run.
const BLOCK: usize = 64;

/// Views a block-sized chunk as an array.
fn block(bytes: &[u8]) -> &[u8; BLOCK] {
    bytes.try_into().expect("a block-sized chunk")
}

/// Reads an eight-byte word.
fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("an eight-byte chunk"))
}

/// A mask with the high bit of each byte of `x` that is zero set, and
/// nothing else (exact: no false positives above the first zero byte).
fn zero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// The first position at or after `from` where the pages differ, or their
/// length if they agree from `from` on.
fn first_change(old: &[u8], new: &[u8], from: usize) -> usize {
    let (old, new) = (&old[from..], &new[from..]);
    let mut pos = 0;
    // Whole blocks while the pages agree, one branch a block: the words of
    // a block are XORed and ORed together (the compiler unrolls and
    // vectorises this fixed-size fold).
    for (a, b) in old.chunks_exact(BLOCK).zip(new.chunks_exact(BLOCK)) {
        let (a, b) = (block(a), block(b));
        let differ = a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .fold(0, |acc, (a, b)| acc | (word(a) ^ word(b)));
        if differ != 0 {
            break;
        }
        pos += BLOCK;
    }
    for (a, b) in old[pos..].chunks_exact(8).zip(new[pos..].chunks_exact(8)) {
        let x = word(a) ^ word(b);
        if x != 0 {
            return from + pos + (x.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    let tail = old[pos..].iter().zip(&new[pos..]).take_while(|(a, b)| a == b).count();
    from + pos + tail
}

/// The end of the changed run that starts at `start` (where the pages
/// differ): the first position that starts [`MIN_GAP`] unchanged bytes, or
/// unchanged bytes up to the end of the page, or else the page's end. Scanning may stop at any position from `cap` on and return it: the
/// run is then known to reach at least `cap`.
fn change_end(old: &[u8], new: &[u8], start: usize, cap: usize) -> usize {
    let len = new.len();
    let mut pos = start;
    while pos < cap && pos < len {
        if pos + BLOCK <= len {
            let (a, b) = (block(&old[pos..pos + BLOCK]), block(&new[pos..pos + BLOCK]));
            let same = a
                .chunks_exact(8)
                .zip(b.chunks_exact(8))
                .fold(0, |acc, (a, b)| acc | zero_bytes(word(a) ^ word(b)));
            if same == 0 {
                // Every byte of the block changed.
                pos += BLOCK;
                continue;
            }
        }
        if pos + 8 <= len {
            let same = zero_bytes(word(&old[pos..pos + 8]) ^ word(&new[pos..pos + 8]));
            if same == 0 {
                // Every byte of the word changed.
                pos += 8;
                continue;
            }
            pos += (same.trailing_zeros() / 8) as usize;
        } else if old[pos] != new[pos] {
            pos += 1;
            continue;
        }
        // `pos` is unchanged: the run ends here if the gap is wide enough.
        let gap = old[pos..]
            .iter()
            .zip(&new[pos..])
            .take(MIN_GAP)
            .take_while(|(a, b)| a == b)
            .count();
        if gap == MIN_GAP || pos + gap == len {
            return pos;
        }
        pos += gap;
    }
    pos.min(len)
}

/// How many bytes `value` takes as ULEB128.
fn length_bytes(value: usize) -> usize {
    match value {
        0..0x80 => 1,
        0x80..0x4000 => 2,
        _ => 3,
    }
}

/// Appends `value` as ULEB128.
fn put_length(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One changed run of a validated pair: where it goes and its bytes.
struct Run<'a> {
    at: usize,
    literal: &'a [u8],
}

/// The pairs of a delta, each checked against the rules above and a page
/// of `page_len` bytes. Ends after the first error.
struct Runs<'a> {
    rest: &'a [u8],
    /// Where in the page the next pair starts.
    pos: usize,
    page_len: usize,
    first: bool,
    failed: bool,
}

impl<'a> Runs<'a> {
    fn new(delta: &'a [u8], page_len: usize) -> Self {
        Self {
            rest: delta,
            pos: 0,
            page_len,
            first: true,
            failed: false,
        }
    }

    fn pair(&mut self) -> Result<Run<'a>, WireError> {
        if self.pos == self.page_len {
            return Err(WireError::TrailingBytes {
                what: "xbzrle delta",
                count: self.rest.len(),
            });
        }
        let unchanged = self.length()?;
        if unchanged == 0 && !self.first {
            return Err(WireError::Invalid {
                what: "xbzrle unchanged run length (zero after the first pair)",
                value: 0,
            });
        }
        let changed = self.length()?;
        if changed == 0 {
            return Err(WireError::Invalid {
                what: "xbzrle changed run length",
                value: 0,
            });
        }
        let room = self.page_len - self.pos;
        if unchanged > room || changed > room - unchanged {
            return Err(WireError::TooLarge {
                what: "xbzrle run end",
                value: (self.pos + unchanged) as u64 + changed as u64,
                max: self.page_len as u64,
            });
        }
        let Some((literal, rest)) = self.rest.split_at_checked(changed) else {
            return Err(WireError::Truncated {
                what: "xbzrle literal bytes",
                need: changed,
                have: self.rest.len(),
            });
        };
        let at = self.pos + unchanged;
        self.rest = rest;
        self.pos = at + changed;
        self.first = false;
        Ok(Run { at, literal })
    }

    /// Reads a ULEB128 length of at most three bytes, in its shortest form.
    fn length(&mut self) -> Result<usize, WireError> {
        let mut value = 0;
        for i in 0..MAX_LENGTH_BYTES {
            let Some((&byte, rest)) = self.rest.split_first() else {
                return Err(WireError::Truncated {
                    what: "xbzrle run length",
                    need: i + 1,
                    have: i,
                });
            };
            self.rest = rest;
            value |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(WireError::Invalid {
                        what: "xbzrle run length (not in its shortest form)",
                        value: value as u64,
                    });
                }
                return Ok(value);
            }
        }
        Err(WireError::Invalid {
            what: "xbzrle run length (longer than three bytes)",
            value: value as u64,
        })
    }
}

impl<'a> Iterator for Runs<'a> {
    type Item = Result<Run<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let run = self.pair();
        self.failed = run.is_err();
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes with no limit.
    fn delta(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(encode(old, new, usize::MAX, &mut out));
        out
    }

    /// Decodes onto a copy of `old`.
    fn applied(delta: &[u8], old: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut page = old.to_vec();
        decode(delta, &mut page).map(|()| page)
    }

    /// Decodes onto a 16-byte page of `0x11`, checking it stays untouched
    /// when decoding fails.
    fn decode16(delta: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut page = [0x11u8; 16];
        let result = decode(delta, &mut page);
        if result.is_err() {
            assert_eq!(page, [0x11; 16], "a failed decode left the page alone");
        }
        result.map(|()| page.to_vec())
    }

    /// `old` with each `(position, bytes)` written over it (clipped to the page).
    fn edited(old: &[u8], edits: &[(prop::sample::Index, Vec<u8>)]) -> Vec<u8> {
        let mut new = old.to_vec();
        if new.is_empty() {
            return new;
        }
        for (at, bytes) in edits {
            let at = at.index(new.len());
            let len = bytes.len().min(new.len() - at);
            new[at..at + len].copy_from_slice(&bytes[..len]);
        }
        new
    }

    #[test]
    fn the_example_of_the_module_docs() {
        let old = b"aaaaaaaaaaaaaaaa";
        let new = b"aaaXYaaaaaaZaaaa";
        let delta = delta(old, new);
        assert_eq!(delta, b"\x03\x02XY\x06\x01Z");
        assert_eq!(applied(&delta, old).unwrap(), new);
    }

    #[test]
    fn an_unchanged_page_encodes_to_nothing() {
        let page = vec![0x5au8; 4096];
        let mut out = vec![1, 2, 3];
        assert!(encode(&page, &page, 0, &mut out));
        assert!(out.is_empty());
        assert_eq!(applied(&[], &page).unwrap(), page);
        assert!(encode(&[], &[], 0, &mut out) && out.is_empty());
    }

    #[test]
    fn a_header_and_a_window_encode_small() {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 256) as u8).collect();
        let mut new = old.clone();
        new[..16].iter_mut().for_each(|b| *b ^= 0x5a);
        new[1500..1564].iter_mut().for_each(|b| *b = b.wrapping_add(1));
        let mut out = Vec::new();
        assert!(encode(&old, &new, old.len(), &mut out));
        assert!(out.len() < 100, "{} bytes", out.len());
        assert_eq!(out.len(), (2 + 16) + (2 + 1 + 64));
        assert_eq!(applied(&out, &old).unwrap(), new);
    }

    #[test]
    fn short_gaps_travel_as_literal_bytes() {
        let old = [0u8; 32];
        let mut new = old;
        // Changed, one unchanged, changed, two unchanged, changed, three
        // unchanged, changed.
        for i in [4, 6, 9, 13] {
            new[i] = 1;
        }
        assert_eq!(delta(&old, &new), [4, 6, 1, 0, 1, 0, 0, 1, 3, 1, 1]);
    }

    #[test]
    fn a_change_at_either_end_of_a_page() {
        let old = vec![0u8; 4096];
        for at in [0, 1, 7, 8, 4088, 4094, 4095] {
            let mut new = old.clone();
            new[at] = 0xff;
            let delta = delta(&old, &new);
            assert_eq!(delta.len(), length_bytes(at) + 2, "change at {at}");
            assert_eq!(applied(&delta, &old).unwrap(), new);
        }
    }

    #[test]
    fn largest_pages_round_trip() {
        let old = vec![0u8; MAX_PAGE_LEN];
        let new = vec![1u8; MAX_PAGE_LEN];
        let whole = delta(&old, &new);
        assert_eq!(whole.len(), 1 + 3 + MAX_PAGE_LEN);
        assert_eq!(applied(&whole, &old).unwrap(), new);
        let mut last = old.clone();
        last[MAX_PAGE_LEN - 1] = 1;
        let delta = delta(&old, &last);
        assert_eq!(delta, [0xff, 0xff, 0x03, 0x01, 0x01]);
        assert_eq!(applied(&delta, &old).unwrap(), last);
    }

    #[test]
    fn random_pages_overflow_a_small_limit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        let old: Vec<u8> = (0..4096).map(|_| random()).collect();
        let new: Vec<u8> = (0..4096).map(|_| random()).collect();
        let mut out = Vec::new();
        assert!(!encode(&old, &new, 2048, &mut out));
        assert!(!encode(&old, &new, 4096, &mut out));
        assert!(encode(&old, &new, usize::MAX, &mut out));
        assert!(out.len() > 4096);
    }

    #[test]
    fn a_limit_is_inclusive() {
        let old = [0u8; 64];
        let mut new = old;
        new[10..20].fill(1);
        let mut out = Vec::new();
        assert!(encode(&old, &new, 12, &mut out));
        assert_eq!(out.len(), 12);
        assert!(!encode(&old, &new, 11, &mut out));
        assert!(!encode(&old, &new, 0, &mut out));
    }

    #[test]
    fn huge_pages_have_no_encoding() {
        let page = vec![0u8; MAX_PAGE_LEN + 1];
        assert!(!encode(&page, &page, usize::MAX, &mut Vec::new()));
    }

    #[test]
    #[should_panic(expected = "equal length")]
    fn pages_of_different_lengths_are_misuse() {
        encode(&[0; 8], &[0; 9], usize::MAX, &mut Vec::new());
    }

    #[test]
    fn well_formed_deltas_decode() {
        let mut expected = [0x11u8; 16];
        expected[0] = 0xaa;
        expected[5..7].copy_from_slice(&[0xbb, 0xcc]);
        assert_eq!(decode16(&[0, 1, 0xaa, 4, 2, 0xbb, 0xcc]).unwrap(), expected);
        assert_eq!(decode16(&[15, 1, 0xaa]).unwrap()[15], 0xaa);
        assert_eq!(decode16(&[]).unwrap(), [0x11; 16]);
    }

    #[test]
    fn overlong_lengths_are_rejected() {
        // Four bytes.
        assert!(matches!(
            decode16(&[0x80, 0x80, 0x80, 0x00, 0x01, 0xaa]),
            Err(WireError::Invalid { what, .. }) if what.contains("longer")
        ));
        // Not the shortest form: 1 as two bytes, 0 as two and three bytes.
        for delta in [
            &[0x81, 0x00, 0x01, 0xaa][..],
            &[0x80, 0x00, 0x01, 0xaa],
            &[0x80, 0x80, 0x00, 0x01, 0xaa],
        ] {
            assert!(
                matches!(decode16(delta), Err(WireError::Invalid { what, .. }) if what.contains("shortest")),
                "{delta:02x?}"
            );
        }
        // The same in the changed length.
        assert!(matches!(
            decode16(&[0x00, 0x81, 0x00, 0xaa]),
            Err(WireError::Invalid { what, .. }) if what.contains("shortest")
        ));
    }

    #[test]
    fn empty_runs_are_rejected() {
        assert_eq!(
            decode16(&[0, 0]),
            Err(WireError::Invalid {
                what: "xbzrle changed run length",
                value: 0
            })
        );
        assert_eq!(
            decode16(&[3, 0]),
            Err(WireError::Invalid {
                what: "xbzrle changed run length",
                value: 0
            })
        );
        // An empty unchanged run only at the start; the page is untouched
        // although the first pair was good.
        assert!(matches!(
            decode16(&[0, 1, 0xaa, 0, 1, 0xbb]),
            Err(WireError::Invalid { what, value: 0 }) if what.contains("unchanged")
        ));
    }

    #[test]
    fn runs_past_the_page_are_rejected() {
        let past = |value| WireError::TooLarge {
            what: "xbzrle run end",
            value,
            max: 16,
        };
        assert_eq!(decode16(&[16, 1, 0xaa]), Err(past(17)));
        assert_eq!(decode16(&[15, 2, 0xaa, 0xbb]), Err(past(17)));
        assert_eq!(decode16(&[0, 17]), Err(past(17)));
        assert_eq!(decode16(&[0xff, 0xff, 0x7f, 1, 0]), Err(past((1 << 21) - 1 + 1)));
        assert_eq!(decode16(&[8, 1, 0xaa, 7, 1, 0xbb]), Err(past(17)));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut delta = vec![0, 16];
        delta.extend([0xaa; 16]);
        assert_eq!(decode16(&delta).unwrap(), [0xaa; 16]);
        delta.push(0);
        assert_eq!(
            decode16(&delta),
            Err(WireError::TrailingBytes {
                what: "xbzrle delta",
                count: 1
            })
        );
        // Before the page's end, a stray byte is a pair cut short.
        assert!(matches!(decode16(&[0, 1, 0xaa, 3]), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn truncated_deltas_are_rejected() {
        assert_eq!(
            decode16(&[0, 4, 1, 2, 3]),
            Err(WireError::Truncated {
                what: "xbzrle literal bytes",
                need: 4,
                have: 3
            })
        );
        assert!(matches!(decode16(&[0]), Err(WireError::Truncated { .. })));
        assert!(matches!(decode16(&[0x80]), Err(WireError::Truncated { .. })));
        assert!(matches!(decode16(&[1, 0x80, 0x80]), Err(WireError::Truncated { .. })));
    }

    fn page() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..=8192)
    }

    fn sparse_edits() -> impl Strategy<Value = Vec<(prop::sample::Index, Vec<u8>)>> {
        proptest::collection::vec(
            (
                any::<prop::sample::Index>(),
                proptest::collection::vec(any::<u8>(), 1..80),
            ),
            0..12,
        )
    }

    /// Two independent random pages of one length.
    fn random_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (0usize..=8192).prop_flat_map(|len| {
            (
                proptest::collection::vec(any::<u8>(), len),
                proptest::collection::vec(any::<u8>(), len),
            )
        })
    }

    /// The checks every pair of pages passes: with the page length as limit,
    /// encoding succeeds exactly when the unlimited encoding fits, gives the
    /// same bytes, and they decode to `new`.
    fn check_round_trip(old: &[u8], new: &[u8], limit: usize) -> Result<(), TestCaseError> {
        let whole = delta(old, new);
        prop_assert_eq!(&applied(&whole, old).unwrap(), new);
        prop_assert_eq!(whole.is_empty(), old == new);
        let mut out = Vec::new();
        let fits = encode(old, new, limit, &mut out);
        prop_assert_eq!(fits, whole.len() <= limit);
        if fits {
            prop_assert_eq!(&out, &whole);
            prop_assert_eq!(&applied(&out, old).unwrap(), new);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn sparse_edits_round_trip(old in page(), edits in sparse_edits()) {
            let new = edited(&old, &edits);
            check_round_trip(&old, &new, old.len())?;
        }

        #[test]
        fn random_pages_round_trip((old, new) in random_pair()) {
            check_round_trip(&old, &new, old.len())?;
        }

        #[test]
        fn any_limit_is_kept(old in page(), edits in sparse_edits(), limit in 0usize..600) {
            let new = edited(&old, &edits);
            check_round_trip(&old, &new, limit)?;
        }

        #[test]
        fn unchanged_pages_encode_to_nothing(old in page()) {
            let mut out = vec![7];
            prop_assert!(encode(&old, &old, 0, &mut out));
            prop_assert!(out.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            delta in proptest::collection::vec(any::<u8>(), 0..300),
            old in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut page = old.clone();
            match decode(&delta, &mut page) {
                Ok(()) => prop_assert_eq!(page.len(), old.len()),
                Err(_) => prop_assert_eq!(page, old),
            }
        }

        #[test]
        fn appended_bytes_are_rejected(
            old in page(),
            edits in sparse_edits(),
            extra in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            // With the last byte changed the delta reaches the page's end:
            // nothing may follow.
            let mut new = edited(&old, &edits);
            if let Some(last) = new.last_mut() {
                *last = !old[old.len() - 1];
            }
            let mut delta = delta(&old, &new);
            delta.extend(&extra);
            let mut page = old.clone();
            let left_over = match decode(&delta, &mut page) {
                Err(WireError::TrailingBytes { count, .. }) => count,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(left_over, extra.len());
            prop_assert_eq!(page, old);
        }
    }
}
