//! Delta batches: pages of one block sent as XBZRLE deltas against the
//! copy the destination holds (see [`crate::xbzrle`] for the encoding).
//!
//! ```text
//! +---------------------------+
//! | block u32 | count u32     |  DeltaBatch header (24 bytes)
//! | page_size u32 | rsvd u32  |
//! | epoch u64                 |
//! +---------------------------+
//! | page u64 | len u32        |  × count, page indices strictly increasing
//! +---------------------------+
//! | delta bytes × count       |  each page's encoding, in table order
//! +---------------------------+
//! ```
//!
//! The frame checksum is xxh3-64 of the whole body, as for any frame but a
//! page batch sent as is. A delta applies to the page the destination
//! holds from an earlier epoch; the destination refuses one for a page it
//! never received. Both sides agree the `XBZRLE` feature first, and deltas
//! travel only in precopy: a page sent after the switch to postcopy is
//! placed whole, atomically.

use crate::codec::{Reader, cap, put, reserved_zero};
use crate::handshake::{MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use crate::page::MAX_PAGE_INDEX;
use crate::{MAX_PAGES_PER_BATCH, WireError};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the header that opens a delta batch.
pub const DELTA_HEADER_LEN: usize = 24;

/// Length of one entry of a delta batch's table.
pub const DELTA_ENTRY_LEN: usize = 12;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDeltaHeader {
    block: U32,
    count: U32,
    page_size: U32,
    reserved: U32,
    epoch: U64,
}
const _: () = assert!(size_of::<RawDeltaHeader>() == DELTA_HEADER_LEN);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDeltaEntry {
    page: U64,
    len: U32,
}
const _: () = assert!(size_of::<RawDeltaEntry>() == DELTA_ENTRY_LEN);

/// Appends a table entry: page `page`'s delta is `len` bytes long.
pub fn push_delta_entry(table: &mut Vec<u8>, page: u64, len: usize) {
    put(
        table,
        &RawDeltaEntry {
            page: page.into(),
            len: (len as u32).into(),
        },
    );
}

/// A batch of delta-encoded pages of one block, borrowed from a decode
/// buffer or the sender's buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaBatch<'a> {
    /// Index of the block in the block list.
    pub block: u32,
    /// The epoch (pass) these pages belong to.
    pub epoch: u64,
    /// Page size of the block.
    pub page_size: u32,
    table: &'a [u8],
    deltas: &'a [u8],
}

impl<'a> DeltaBatch<'a> {
    /// A batch over a table built with [`push_delta_entry`] and the deltas
    /// it describes, concatenated in table order. Fails if they disagree or
    /// a cap is exceeded.
    pub fn new(block: u32, epoch: u64, page_size: u32, table: &'a [u8], deltas: &'a [u8]) -> Result<Self, WireError> {
        let batch = Self {
            block,
            epoch,
            page_size,
            table,
            deltas,
        };
        batch.validate()?;
        Ok(batch)
    }

    fn validate(&self) -> Result<(), WireError> {
        if !self.page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(WireError::Invalid {
                what: "delta batch page size",
                value: self.page_size.into(),
            });
        }
        if self.table.len() % DELTA_ENTRY_LEN != 0 {
            return Err(WireError::Invalid {
                what: "delta table length",
                value: self.table.len() as u64,
            });
        }
        cap("pages in delta batch", self.len() as u64, MAX_PAGES_PER_BATCH.into())?;
        let mut previous: Option<u64> = None;
        let mut total = 0u64;
        for (page, len) in self.raw_entries() {
            if page > MAX_PAGE_INDEX || previous.is_some_and(|p| page <= p) {
                return Err(WireError::Invalid {
                    what: "page order in delta batch (indices must increase)",
                    value: page,
                });
            }
            previous = Some(page);
            // A delta longer than the page is never worth sending.
            cap("delta length", len.into(), self.page_size.into())?;
            total += u64::from(len);
        }
        if total != self.deltas.len() as u64 {
            return Err(WireError::Invalid {
                what: "delta payload length",
                value: self.deltas.len() as u64,
            });
        }
        Ok(())
    }

    fn raw_entries(&self) -> impl Iterator<Item = (u64, u32)> + 'a {
        self.table.chunks_exact(DELTA_ENTRY_LEN).map(|raw| {
            let entry = RawDeltaEntry::read_from_bytes(raw).expect("chunks are entry-sized");
            (entry.page.get(), entry.len.get())
        })
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.table.len() / DELTA_ENTRY_LEN
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Each page's index and delta, in order (an empty delta: the page is
    /// unchanged).
    pub fn pages(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let deltas = self.deltas;
        self.raw_entries().scan(0usize, move |at, (page, len)| {
            let start = *at;
            *at += len as usize;
            // Validated: the lengths add up to the payload.
            Some((page, &deltas[start..*at]))
        })
    }

    /// Appends the body.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawDeltaHeader {
                block: self.block.into(),
                count: (self.len() as u32).into(),
                page_size: self.page_size.into(),
                reserved: 0.into(),
                epoch: self.epoch.into(),
            },
        );
        out.extend_from_slice(self.table);
        out.extend_from_slice(self.deltas);
    }

    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "deltas");
        let raw: RawDeltaHeader = r.read()?;
        reserved_zero("delta batch reserved field", raw.reserved.get().into())?;
        let count = raw.count.get();
        cap("pages in delta batch", count.into(), MAX_PAGES_PER_BATCH.into())?;
        let table = r.take(count as usize * DELTA_ENTRY_LEN)?;
        let deltas = r.take(body.len() - DELTA_HEADER_LEN - table.len())?;
        r.finish()?;
        Self::new(raw.block.get(), raw.epoch.get(), raw.page_size.get(), table, deltas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(pages: &[(u64, &[u8])], table: &mut Vec<u8>, deltas: &mut Vec<u8>) {
        for &(page, delta) in pages {
            push_delta_entry(table, page, delta.len());
            deltas.extend_from_slice(delta);
        }
    }

    #[test]
    fn round_trips_and_lists_its_pages() {
        let (mut table, mut deltas) = (Vec::new(), Vec::new());
        batch_of(
            &[(3, b"\x00\x02ab"), (9, b""), (10, b"\x05\x01z")],
            &mut table,
            &mut deltas,
        );
        let batch = DeltaBatch::new(1, 4, 4096, &table, &deltas).expect("valid");
        let mut body = Vec::new();
        batch.encode(&mut body);
        let back = DeltaBatch::decode(&body).expect("decodes");
        assert_eq!(back, batch);
        let pages: Vec<_> = back.pages().collect();
        assert_eq!(pages, [(3, &b"\x00\x02ab"[..]), (9, &b""[..]), (10, &b"\x05\x01z"[..])]);
    }

    #[test]
    fn refuses_disorder_long_deltas_and_a_short_payload() {
        let (mut table, mut deltas) = (Vec::new(), Vec::new());
        batch_of(&[(5, b"ab"), (5, b"cd")], &mut table, &mut deltas);
        assert!(DeltaBatch::new(0, 0, 4096, &table, &deltas).is_err());
        let (mut table, mut deltas) = (Vec::new(), Vec::new());
        batch_of(&[(1, &[7u8; 4097])], &mut table, &mut deltas);
        assert!(DeltaBatch::new(0, 0, 4096, &table, &deltas).is_err());
        let (mut table, mut deltas) = (Vec::new(), Vec::new());
        batch_of(&[(1, b"abc")], &mut table, &mut deltas);
        assert!(DeltaBatch::new(0, 0, 4096, &table, &deltas[..2]).is_err());
        assert!(DeltaBatch::new(0, 0, 4095, &table, &deltas).is_err());
    }
}
