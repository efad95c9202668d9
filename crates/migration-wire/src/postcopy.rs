//! Postcopy messages: the switch from precopy, the set of pages the
//! destination must drop, and the reconnection after a lost link.
//!
//! ```text
//!  source (guest still running)            destination
//!  PostcopyStart (every channel) ------->   precopy receiving ends; pages
//!                                           not held dropped, RAM registered
//!  Discard* (main) ---------------------->  stale pages dropped
//!  Pausing ------------------------------>
//!                 <---------------------- Prepared
//!  (guest paused) Discard* (the pages dirtied meanwhile),
//!  DeviceState, Go (main) --------------->  guest runs, faults on absent pages
//!                 <---------------------- Resumed, PageRequest*
//!  pages (urgent channel: requested ones;
//!         the others: the rest, streamed)
//!  EndOfRam (every channel) ------------->
//!                 <---------------------- Ready (every page placed)
//!  Complete -----------------------------> Verdict
//!
//!  after a lost link, on a new main connection:
//!  Resume ------------------------------->
//!                 <---------------------- ReceivedPages*, ResumeAccepted
//!  (extra channels join again; requested pages are asked for again)
//! ```

use crate::WireError;
use crate::codec::{Reader, put, reserved_zero};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Most pages one [`PageBitmap`] covers (2 MiB of bits).
pub const MAX_BITMAP_PAGES: u32 = 1 << 24;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawPageBitmap {
    block: U32,
    count: U32,
    first: U64,
}
const _: () = assert!(size_of::<RawPageBitmap>() == 16);

/// A set of pages of one block, as bits: bit `i` (least significant bit
/// first) of `bits` stands for page `first + i`. Carries the pages a
/// destination must discard at the switch to postcopy, and the pages it
/// holds when a lost link is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBitmap<'a> {
    /// Index of the block.
    pub block: u32,
    /// The page bit 0 stands for; a multiple of 8.
    pub first: u64,
    /// Pages covered, `1..=MAX_BITMAP_PAGES`.
    pub count: u32,
    bits: &'a [u8],
}

impl<'a> PageBitmap<'a> {
    /// A bitmap of `count` pages from `first` (a multiple of 8): `bits` holds
    /// exactly `count.div_ceil(8)` bytes, and no bit past `count` is set.
    pub fn new(block: u32, first: u64, count: u32, bits: &'a [u8]) -> Result<Self, WireError> {
        if first % 8 != 0 {
            return Err(WireError::Invalid {
                what: "page bitmap first page (not a multiple of 8)",
                value: first,
            });
        }
        if count == 0 || count > MAX_BITMAP_PAGES {
            return Err(WireError::Invalid {
                what: "page bitmap page count",
                value: count.into(),
            });
        }
        if first.checked_add(count.into()).is_none() {
            return Err(WireError::Invalid {
                what: "page bitmap first page",
                value: first,
            });
        }
        let len = count.div_ceil(8) as usize;
        if bits.len() != len {
            return Err(WireError::Truncated {
                what: "page bitmap bits",
                need: len,
                have: bits.len(),
            });
        }
        let spare = count % 8;
        if spare != 0 && bits[len - 1] >> spare != 0 {
            return Err(WireError::Invalid {
                what: "page bitmap bits past its count",
                value: u64::from(bits[len - 1]),
            });
        }
        Ok(Self {
            block,
            first,
            count,
            bits,
        })
    }

    /// The bits, least significant bit of byte 0 first.
    pub fn bits(&self) -> &'a [u8] {
        self.bits
    }

    /// Whether page `first + i` is in the set (false past `count`).
    pub fn contains(&self, i: u32) -> bool {
        i < self.count && self.bits[(i / 8) as usize] >> (i % 8) & 1 == 1
    }

    /// The pages in the set, as block page indices in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + 'a {
        let first = self.first;
        self.bits.iter().enumerate().flat_map(move |(byte, &b)| {
            (0..8)
                .filter(move |bit| b >> bit & 1 == 1)
                .map(move |bit| first + byte as u64 * 8 + bit)
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawPageBitmap {
                block: self.block.into(),
                count: self.count.into(),
                first: self.first.into(),
            },
        );
        out.extend_from_slice(self.bits);
    }

    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "page-bitmap");
        let raw: RawPageBitmap = r.read()?;
        let count = raw.count.get();
        if count == 0 || count > MAX_BITMAP_PAGES {
            return Err(WireError::Invalid {
                what: "page bitmap page count",
                value: count.into(),
            });
        }
        let bits = r.take(count.div_ceil(8) as usize)?;
        r.finish()?;
        Self::new(raw.block.get(), raw.first.get(), count, bits)
    }
}

/// Precopy ends on this channel after `epochs` epochs; postcopy follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyStart {
    /// Epochs of precopy sent (the last is `epochs - 1`).
    pub epochs: u64,
}

impl PostcopyStart {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.epochs.to_le_bytes());
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "postcopy-start");
        let epochs: U64 = r.read()?;
        r.finish()?;
        Ok(Self { epochs: epochs.get() })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawResume {
    magic: [u8; 8],
    session: U64,
    generation: U32,
    reserved: U32,
}
const _: () = assert!(size_of::<RawResume>() == 24);

/// The first message of a new main connection that resumes a postcopy
/// migration whose link was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The migration's session id, as in its `Hello`.
    pub session: crate::SessionId,
    /// How many times the link was resumed before, plus one: a peer that
    /// counts differently lost track of the migration.
    pub generation: u32,
}

impl Resume {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawResume {
                magic: crate::MAGIC,
                session: self.session.0.into(),
                generation: self.generation.into(),
                reserved: 0.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "resume");
        let raw: RawResume = r.read()?;
        if raw.magic != crate::MAGIC {
            return Err(WireError::BadMagic { found: raw.magic });
        }
        reserved_zero("resume reserved field", raw.reserved.get().into())?;
        r.finish()?;
        Ok(Self {
            session: crate::SessionId(raw.session.get()),
            generation: raw.generation.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_lists_its_pages_and_rejects_stray_bits() {
        let bits = [0b1000_0101u8, 0b0000_0010];
        let map = PageBitmap::new(3, 16, 10, &bits).unwrap();
        assert_eq!(map.pages().collect::<Vec<_>>(), [16, 18, 23, 25]);
        assert!(map.contains(0) && !map.contains(1) && map.contains(9) && !map.contains(10));
        // Bit 10 is past a count of 10.
        assert!(PageBitmap::new(3, 16, 10, &[0, 0b0000_0100]).is_err());
        assert!(PageBitmap::new(3, 17, 10, &bits).is_err(), "first not a multiple of 8");
        assert!(PageBitmap::new(3, 16, 0, &[]).is_err());
        assert!(PageBitmap::new(3, 16, 10, &bits[..1]).is_err());
        assert!(PageBitmap::new(3, u64::MAX - 7, 10, &bits).is_err());
        let mut out = Vec::new();
        map.encode(&mut out);
        assert_eq!(PageBitmap::decode(&out).unwrap(), map);
    }
}
