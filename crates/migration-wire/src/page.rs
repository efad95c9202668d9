//! Page packets: a batch of pages of one block, each sent as a zero flag or
//! as its bytes.
//!
//! ```text
//! +---------------------------+
//! | block u32 | count u32     |  PageBatch header (24 bytes)
//! | page_size u32 | rsvd u32  |
//! | epoch u64                 |
//! +---------------------------+
//! | entry u64 × count         |  page index << 8 | encoding
//! +---------------------------+
//! | page bytes × plain count  |  in entry order
//! +---------------------------+
//! ```
//!
//! The frame header's checksum covers all of it.

use crate::codec::{Reader, cap, put, reserved_zero};
use crate::handshake::{MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use crate::{MAX_FRAME_BODY, WireError};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Most pages one batch may carry.
pub const MAX_PAGES_PER_BATCH: u32 = 4096;

/// Largest page index an entry can carry (56 bits).
pub const MAX_PAGE_INDEX: u64 = (1 << 56) - 1;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBatchHeader {
    block: U32,
    count: U32,
    page_size: U32,
    reserved: U32,
    epoch: U64,
}
const _: () = assert!(size_of::<RawBatchHeader>() == 24);

/// How one page travels. `0` is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageEncoding {
    /// The page is all zero bytes; no payload.
    Zero = 1,
    /// The page's bytes follow in the payload.
    Plain = 2,
}

/// One page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageEntry {
    /// Index of the page in its block.
    pub page: u64,
    /// How it travels.
    pub encoding: PageEncoding,
}

impl PageEntry {
    /// The entry's wire form. `page` must be at most [`MAX_PAGE_INDEX`].
    pub fn to_raw(self) -> u64 {
        debug_assert!(self.page <= MAX_PAGE_INDEX);
        (self.page << 8) | self.encoding as u64
    }

    /// Decodes an entry's wire form.
    pub fn from_raw(raw: u64) -> Result<Self, WireError> {
        let encoding = match raw & 0xff {
            1 => PageEncoding::Zero,
            2 => PageEncoding::Plain,
            other => {
                return Err(WireError::Invalid {
                    what: "page encoding",
                    value: other,
                });
            }
        };
        Ok(Self {
            page: raw >> 8,
            encoding,
        })
    }

    /// Appends the entry's wire form to an entry table being built.
    pub fn push_to(self, entries: &mut Vec<u8>) {
        entries.extend_from_slice(&self.to_raw().to_le_bytes());
    }
}

/// A batch of pages of one block, borrowed from a decode buffer or from the
/// sender's buffers. Page indices strictly increase within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch<'a> {
    /// Index of the block in the block list.
    pub block: u32,
    /// The epoch (pass) these pages belong to.
    pub epoch: u64,
    /// Page size of the block.
    pub page_size: u32,
    entries: &'a [u8],
    payload: &'a [u8],
}

impl<'a> PageBatch<'a> {
    /// A batch over an entry table built with [`PageEntry::push_to`] and the
    /// bytes of its plain pages, in entry order.
    ///
    /// Fails if the table and payload disagree or a cap is exceeded, so
    /// that a batch that exists always encodes to a frame its peer accepts.
    pub fn new(
        block: u32,
        epoch: u64,
        page_size: u32,
        entries: &'a [u8],
        payload: &'a [u8],
    ) -> Result<Self, WireError> {
        let batch = Self {
            block,
            epoch,
            page_size,
            entries,
            payload,
        };
        batch.validate()?;
        Ok(batch)
    }

    fn validate(&self) -> Result<(), WireError> {
        if !self.page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(WireError::Invalid {
                what: "batch page size",
                value: self.page_size.into(),
            });
        }
        if self.entries.len() % 8 != 0 {
            return Err(WireError::Invalid {
                what: "entry table length",
                value: self.entries.len() as u64,
            });
        }
        let count = self.entries.len() / 8;
        cap("pages in batch", count as u64, MAX_PAGES_PER_BATCH.into())?;
        let mut plain = 0u64;
        let mut previous: Option<u64> = None;
        for entry in self.entries() {
            let entry = entry?;
            // Strictly increasing: a page appears once per batch, so where
            // it lands never depends on the order entries are applied in.
            if previous.is_some_and(|p| entry.page <= p) {
                return Err(WireError::Invalid {
                    what: "page order in batch (indices must increase)",
                    value: entry.page,
                });
            }
            previous = Some(entry.page);
            if entry.encoding == PageEncoding::Plain {
                plain += 1;
            }
        }
        let want = plain * u64::from(self.page_size);
        let body = (size_of::<RawBatchHeader>() + self.entries.len()) as u64 + want;
        cap("page batch size", body, MAX_FRAME_BODY.into())?;
        if self.payload.len() as u64 != want {
            return Err(WireError::Invalid {
                what: "page payload length",
                value: self.payload.len() as u64,
            });
        }
        Ok(())
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len() / 8
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in order. Every entry of a constructed or decoded batch
    /// is valid, so the `Err` arm is unreachable in practice.
    pub fn entries(&self) -> impl Iterator<Item = Result<PageEntry, WireError>> + 'a {
        self.entries.chunks_exact(8).map(|raw| {
            let mut word = [0u8; 8];
            word.copy_from_slice(raw);
            PageEntry::from_raw(u64::from_le_bytes(word))
        })
    }

    /// The bytes of the plain pages, in entry order.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Appends the batch header and entry table (everything but the payload).
    pub fn encode_head(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawBatchHeader {
                block: self.block.into(),
                count: ((self.entries.len() / 8) as u32).into(),
                page_size: self.page_size.into(),
                reserved: 0.into(),
                epoch: self.epoch.into(),
            },
        );
        out.extend_from_slice(self.entries);
    }

    /// Where the payload starts in the frame body (after the batch header
    /// and the entry table).
    pub fn payload_offset(&self) -> usize {
        size_of::<RawBatchHeader>() + self.entries.len()
    }

    /// Length of the frame body this batch encodes to.
    pub fn body_len(&self) -> usize {
        size_of::<RawBatchHeader>() + self.entries.len() + self.payload.len()
    }

    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "pages");
        let raw: RawBatchHeader = r.read()?;
        reserved_zero("page batch reserved field", raw.reserved.get().into())?;
        let count = raw.count.get();
        cap("pages in batch", count.into(), MAX_PAGES_PER_BATCH.into())?;
        let entries = r.take(count as usize * 8)?;
        let payload = r.rest();
        Self::new(raw.block.get(), raw.epoch.get(), raw.page_size.get(), entries, payload)
    }
}
