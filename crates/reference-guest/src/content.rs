//! What a page holds: a pure function of (seed, page, generation, kind).
//!
//! Every non-zero page starts with a 16-byte header: the global page index (`u64` LE), the
//! generation (`u32` LE) and 32 bits of the page's key, so a page placed at the wrong index, or
//! an older copy of the right one, never passes the check.

use std::fmt;
use std::str::FromStr;

use migration_sys::PAGE_SIZE;

use crate::ParseSpecError;
use crate::prng::{WyRand, mix64};

/// Bytes at the start of every non-zero page that name it.
pub const HEADER_LEN: usize = 16;

/// The kind of data the guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Content {
    /// Incompressible pseudo-random bytes.
    Random,
    /// Words with spaces and newlines; lz4 compresses a page about 2:1.
    Text,
    /// Half the pages all zero (chosen per page and generation), the others random.
    ZeroHeavy,
    /// Random bytes fixed per page; each rewrite changes only the header and
    /// one 64-byte window (a small change per write, as XBZRLE likes).
    Sparse,
}

impl Content {
    pub(crate) fn to_wire(self) -> u8 {
        match self {
            Content::Random => 1,
            Content::Text => 2,
            Content::ZeroHeavy => 3,
            Content::Sparse => 4,
        }
    }

    pub(crate) fn from_wire(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Content::Random),
            2 => Some(Content::Text),
            3 => Some(Content::ZeroHeavy),
            4 => Some(Content::Sparse),
            _ => None,
        }
    }
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Content::Random => "random",
            Content::Text => "text",
            Content::ZeroHeavy => "zero-heavy",
            Content::Sparse => "sparse",
        })
    }
}

impl FromStr for Content {
    type Err = ParseSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Content::Random),
            "text" => Ok(Content::Text),
            "zero-heavy" => Ok(Content::ZeroHeavy),
            "sparse" => Ok(Content::Sparse),
            _ => Err(ParseSpecError {
                what: "content",
                value: s.to_owned(),
                expected: "random, text, zero-heavy or sparse",
            }),
        }
    }
}

/// The words text pages are made of: few enough that lz4 finds repeats (about 2.2:1).
const VOCABULARY: [&str; 16] = [
    "the",
    "guest",
    "page",
    "memory",
    "dirty",
    "bitmap",
    "channel",
    "source",
    "destination",
    "migration",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
];

/// The content of `page` (global index across blocks) at `generation`.
pub fn content(seed: u64, page: u64, generation: u32, kind: Content) -> [u8; PAGE_SIZE] {
    let mut out = [0u8; PAGE_SIZE];
    fill_content(seed, page, generation, kind, &mut out);
    out
}

/// Writes [`content`] into `out`, without a copy through the stack.
pub fn fill_content(seed: u64, page: u64, generation: u32, kind: Content, out: &mut [u8; PAGE_SIZE]) {
    let key = mix64(seed ^ mix64(page ^ mix64(u64::from(generation))));
    match kind {
        Content::Random => fill_random(key, out),
        Content::ZeroHeavy if is_zero_page(key) => {
            out.fill(0);
            return;
        }
        Content::ZeroHeavy => fill_random(key, out),
        Content::Text => fill_text(key, out),
        Content::Sparse => {
            fill_random(mix64(seed ^ mix64(page ^ SPARSE_BASE)), out);
            let at = SPARSE_WINDOW * (1 + (key % (PAGE_SIZE / SPARSE_WINDOW - 1) as u64) as usize);
            let mut rng = WyRand(key);
            for word in out[at..at + SPARSE_WINDOW].chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
    }
    out[..8].copy_from_slice(&page.to_le_bytes());
    out[8..12].copy_from_slice(&generation.to_le_bytes());
    out[12..16].copy_from_slice(&(key as u32).to_le_bytes());
}

/// Bytes a sparse page's rewrite changes besides its header.
const SPARSE_WINDOW: usize = 64;
/// Mixed into a sparse page's key for the bytes every generation shares.
const SPARSE_BASE: u64 = 0x5350_4152_5345;

fn is_zero_page(key: u64) -> bool {
    mix64(key ^ 0x5a5a_5a5a_5a5a_5a5a) & 1 == 0
}

fn fill_random(key: u64, out: &mut [u8; PAGE_SIZE]) {
    let mut rng = WyRand(key);
    for word in out.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

fn fill_text(key: u64, out: &mut [u8; PAGE_SIZE]) {
    let mut rng = WyRand(key);
    let mut pos = HEADER_LEN;
    let mut bits = 0u64;
    let mut left = 0;
    while pos < PAGE_SIZE {
        // One byte of randomness per word: 4 bits pick the word, 4 the separator after it.
        if left == 0 {
            bits = rng.next_u64();
            left = 8;
        }
        let r = bits & 0xff;
        bits >>= 8;
        left -= 1;
        let word = VOCABULARY[(r & 0xf) as usize].as_bytes();
        let n = word.len().min(PAGE_SIZE - pos);
        out[pos..pos + n].copy_from_slice(&word[..n]);
        pos += n;
        if pos < PAGE_SIZE {
            out[pos] = match r >> 4 {
                0 => b'\n',
                1 => b',',
                _ => b' ',
            };
            pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_named() {
        for kind in [Content::Random, Content::Text, Content::ZeroHeavy, Content::Sparse] {
            for page in [0u64, 1, 77, 1 << 40] {
                let a = content(9, page, 3, kind);
                assert_eq!(a, content(9, page, 3, kind), "{kind} page {page}");
                if a.iter().any(|&b| b != 0) {
                    assert_eq!(a[..8], page.to_le_bytes());
                    assert_eq!(a[8..12], 3u32.to_le_bytes());
                }
            }
        }
    }

    #[test]
    fn generations_pages_and_seeds_differ() {
        for kind in [Content::Random, Content::Text, Content::Sparse] {
            assert_ne!(content(1, 5, 0, kind), content(1, 5, 1, kind));
            assert_ne!(content(1, 5, 0, kind), content(1, 6, 0, kind));
            assert_ne!(content(1, 5, 0, kind), content(2, 5, 0, kind));
        }
        let mut differing = 0;
        for generation in 0..100 {
            let a = content(1, 5, generation, Content::ZeroHeavy);
            let b = content(1, 5, generation + 1, Content::ZeroHeavy);
            differing += usize::from(a != b);
        }
        // Only two consecutive zero pages may be equal (about a quarter of the pairs).
        assert!(differing > 50, "{differing}");
    }

    #[test]
    fn sparse_rewrites_change_at_most_header_and_two_windows() {
        for generation in 0..50 {
            let a = content(4, 9, generation, Content::Sparse);
            let b = content(4, 9, generation + 1, Content::Sparse);
            let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert!(differing <= 8 + 2 * SPARSE_WINDOW, "{differing} bytes differ");
            assert!(differing > 4, "{differing} bytes differ");
        }
    }

    #[test]
    fn zero_heavy_is_about_half_zero() {
        let zero = (0..1000u64)
            .filter(|&p| content(42, p, 1, Content::ZeroHeavy).iter().all(|&b| b == 0))
            .count();
        assert!((400..=600).contains(&zero), "{zero} of 1000 pages are zero");
    }

    #[test]
    fn text_compresses_about_two_to_one() {
        let mut raw = 0usize;
        let mut packed = 0usize;
        for p in 0..300u64 {
            let page = content(3, p, p as u32 % 7, Content::Text);
            let text = &page[HEADER_LEN..];
            assert!(text.iter().all(|b| b.is_ascii_lowercase() || b" \n,".contains(b)));
            raw += page.len();
            packed += lz4_flex::block::compress(&page).len();
        }
        let ratio = raw as f64 / packed as f64;
        assert!((1.8..=3.0).contains(&ratio), "lz4 ratio {ratio}");
    }

    #[test]
    fn names_parse_and_print() {
        for kind in [Content::Random, Content::Text, Content::ZeroHeavy, Content::Sparse] {
            assert_eq!(kind.to_string().parse::<Content>().unwrap(), kind);
            assert_eq!(Content::from_wire(kind.to_wire()), Some(kind));
        }
        assert!("zero".parse::<Content>().is_err());
        assert_eq!(Content::from_wire(0), None);
    }
}
