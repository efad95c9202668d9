//! The mapped-ram snapshot file: every page of guest RAM at a fixed offset.
//!
//! ```text
//! 0                  +-------------------------------------------+
//!                    | file header (64 bytes): magic "VMMAPRAM", |
//!                    | version, block count, header length,      |
//!                    | session, RAM bytes, device state offset,  |
//!                    | checksum                                  |
//!                    | block header x block count (96 bytes):    |
//!                    | name, length, page size, bitmap offset,   |
//!                    | page area offset                          |
//! header_len         +-------------------------------------------+  4 KiB multiple
//! bitmap_offset      | block 0 bitmap: bit i (byte i/8, LSB      |
//!                    | first) set = page i's bytes are stored    |
//! pages_offset       +-------------------------------------------+  1 MiB aligned
//!                    | block 0 pages: page i at                  |
//!                    | pages_offset + i * page_size; a page whose|
//!                    | bit is clear reads as zero (a hole)       |
//!                    +-------------------------------------------+
//!                    | block 1 bitmap, pages, ...                |
//! state_offset       +-------------------------------------------+  1 MiB aligned
//!                    | device state (state_len bytes)            |
//! commit_offset      +-------------------------------------------+  4 KiB aligned
//!                    | commit record: magic "VMCOMMIT", device   |
//!                    | state length and hash, header checksum,   |
//!                    | per block: digest, stored pages, bitmap   |
//!                    | hash; checksum. Written last.             |
//! file end           +-------------------------------------------+
//! ```
//!
//! Offsets are not trusted: a reader recomputes the layout from the
//! blocks ([`Layout::new`]) and refuses a header whose offsets differ. The
//! commit record ends the file; a file without a valid one is a save that
//! did not finish. Nothing here does I/O.

use crate::codec::{Reader, cap, put};
use crate::handshake::{Block, BlockList, MAX_BLOCK_NAME, MAX_BLOCKS, check_page_size_and_length};
use crate::{SessionId, WireError};
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first bytes of a mapped-ram file.
pub const FILE_MAGIC: [u8; 8] = *b"VMMAPRAM";
/// The first bytes of its commit record.
pub const COMMIT_MAGIC: [u8; 8] = *b"VMCOMMIT";
/// The format version this crate writes and reads.
pub const FILE_VERSION: u32 = 1;
/// Alignment of bitmaps, the commit record, and every O_DIRECT access.
pub const BLOCK_ALIGN: u64 = 4096;
/// Alignment of page areas and the device state.
pub const AREA_ALIGN: u64 = 1 << 20;
/// Largest device state a file holds.
pub const MAX_STATE_LEN: u64 = 1 << 30;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFileHeader {
    magic: [u8; 8],
    version: U32,
    flags: U32,
    block_count: U32,
    header_len: U32,
    session: U64,
    ram_bytes: U64,
    state_offset: U64,
    reserved: U64,
    checksum: U64,
}
const FILE_HEADER_LEN: usize = 64;
const _: () = assert!(size_of::<RawFileHeader>() == FILE_HEADER_LEN);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBlockHeader {
    name_len: U16,
    reserved: U16,
    page_size: U32,
    length: U64,
    bitmap_offset: U64,
    pages_offset: U64,
    name: [u8; MAX_BLOCK_NAME],
}
const _: () = assert!(size_of::<RawBlockHeader>() == 96);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCommit {
    magic: [u8; 8],
    version: U32,
    block_count: U32,
    state_offset: U64,
    state_len: U64,
    state_hash: U64,
    header_hash: U64,
    epochs: U64,
}
const _: () = assert!(size_of::<RawCommit>() == 56);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBlockSummary {
    digest: U64,
    stored_pages: U64,
    bitmap_hash: U64,
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None`
/// on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Where one RAM block lives in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// The block as announced.
    pub block: Block,
    /// Offset of its page bitmap.
    pub bitmap_offset: u64,
    /// Length of the bitmap area (whole 4 KiB units).
    pub bitmap_len: u64,
    /// Offset of page 0.
    pub pages_offset: u64,
}

impl BlockLayout {
    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.block.pages()
    }

    /// File offset of `page` (which must be below [`BlockLayout::pages`]).
    pub fn page_offset(&self, page: u64) -> u64 {
        self.pages_offset + page * u64::from(self.block.page_size)
    }

    /// Bytes of the bitmap that carry bits (the rest of its area is zero).
    pub fn bitmap_bytes(&self) -> usize {
        self.pages().div_ceil(8) as usize
    }
}

/// The fixed layout of a file for a block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The blocks, in order.
    pub blocks: Vec<BlockLayout>,
    /// Length of the file header with its block headers (4 KiB multiple).
    pub header_len: u64,
    /// Where the device state starts (after the last page area).
    pub state_offset: u64,
}

impl Layout {
    /// Lays out `blocks`: header, then per block its bitmap and page area.
    pub fn new(blocks: &BlockList) -> Result<Self, WireError> {
        cap("block count", blocks.blocks.len() as u64, MAX_BLOCKS as u64)?;
        if blocks.blocks.is_empty() {
            return Err(WireError::Invalid {
                what: "block count",
                value: 0,
            });
        }
        let too_large = || WireError::TooLarge {
            what: "mapped-ram file size",
            value: u64::MAX,
            max: i64::MAX as u64,
        };
        let header_len =
            align_up((FILE_HEADER_LEN + blocks.blocks.len() * 96) as u64, BLOCK_ALIGN).ok_or_else(too_large)?;
        let mut at = header_len;
        let mut laid = Vec::with_capacity(blocks.blocks.len());
        for block in &blocks.blocks {
            check_block(block)?;
            let pages = block.pages();
            let bitmap_offset = at;
            let bitmap_len = align_up(pages.div_ceil(8), BLOCK_ALIGN).ok_or_else(too_large)?;
            let pages_offset = bitmap_offset
                .checked_add(bitmap_len)
                .and_then(|end| align_up(end, AREA_ALIGN))
                .ok_or_else(too_large)?;
            at = pages_offset.checked_add(block.length).ok_or_else(too_large)?;
            laid.push(BlockLayout {
                block: block.clone(),
                bitmap_offset,
                bitmap_len,
                pages_offset,
            });
        }
        let state_offset = align_up(at, AREA_ALIGN).ok_or_else(too_large)?;
        if state_offset > i64::MAX as u64 / 2 {
            return Err(too_large());
        }
        Ok(Self {
            blocks: laid,
            header_len,
            state_offset,
        })
    }

    /// Length of the commit record (a 4 KiB multiple).
    pub fn commit_len(&self) -> u64 {
        let raw = size_of::<RawCommit>() + self.blocks.len() * size_of::<RawBlockSummary>() + 8;
        align_up(raw as u64, BLOCK_ALIGN).unwrap_or(BLOCK_ALIGN)
    }

    /// Where the commit record starts, for a device state of `state_len`.
    pub fn commit_offset(&self, state_len: u64) -> u64 {
        self.state_offset + align_up(state_len, BLOCK_ALIGN).unwrap_or(0)
    }

    /// Length of a complete file with a device state of `state_len`.
    pub fn file_len(&self, state_len: u64) -> u64 {
        self.commit_offset(state_len) + self.commit_len()
    }

    /// The header bytes (`header_len` long, zero padded).
    pub fn encode_header(&self, session: SessionId) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len as usize);
        // `Layout::new` checked that the blocks fit in a file, so this sum
        // cannot overflow.
        let ram_bytes = self
            .blocks
            .iter()
            .fold(0u64, |sum, b| sum.saturating_add(b.block.length));
        put(
            &mut out,
            &RawFileHeader {
                magic: FILE_MAGIC,
                version: FILE_VERSION.into(),
                flags: 0.into(),
                block_count: (self.blocks.len() as u32).into(),
                header_len: (self.header_len as u32).into(),
                session: session.0.into(),
                ram_bytes: ram_bytes.into(),
                state_offset: self.state_offset.into(),
                reserved: 0.into(),
                checksum: 0.into(),
            },
        );
        for b in &self.blocks {
            let mut name = [0u8; MAX_BLOCK_NAME];
            name[..b.block.name.len()].copy_from_slice(b.block.name.as_bytes());
            put(
                &mut out,
                &RawBlockHeader {
                    name_len: (b.block.name.len() as u16).into(),
                    reserved: 0.into(),
                    page_size: b.block.page_size.into(),
                    length: b.block.length.into(),
                    bitmap_offset: b.bitmap_offset.into(),
                    pages_offset: b.pages_offset.into(),
                    name,
                },
            );
        }
        let checksum = header_checksum(&out);
        out[FILE_HEADER_LEN - 8..FILE_HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        out.resize(self.header_len as usize, 0);
        out
    }
}

/// What a file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// The layout, checked against the one its blocks give.
    pub layout: Layout,
    /// The session that wrote the file.
    pub session: SessionId,
    /// The header's checksum, which the commit record repeats.
    pub checksum: u64,
}

/// From the first 64 bytes of a file: the header's whole length (to read
/// before [`FileHeader::decode`]).
pub fn header_len(first: &[u8]) -> Result<u64, WireError> {
    let raw = read_file_header(first)?;
    Ok(raw.header_len.get().into())
}

fn read_file_header(bytes: &[u8]) -> Result<RawFileHeader, WireError> {
    let raw: RawFileHeader = Reader::new(bytes, "mapped-ram file header").read()?;
    if raw.magic != FILE_MAGIC {
        return Err(WireError::Invalid {
            what: "mapped-ram file magic (not a mapped-ram snapshot)",
            value: u64::from_le_bytes(raw.magic),
        });
    }
    if raw.version.get() != FILE_VERSION {
        return Err(WireError::Invalid {
            what: "mapped-ram file version",
            value: raw.version.get().into(),
        });
    }
    if raw.flags.get() != 0 || raw.reserved.get() != 0 {
        return Err(WireError::Invalid {
            what: "mapped-ram reserved header field",
            value: u64::from(raw.flags.get()) | raw.reserved.get(),
        });
    }
    cap("block count", raw.block_count.get().into(), MAX_BLOCKS as u64)?;
    Ok(raw)
}

fn header_checksum(header: &[u8]) -> u64 {
    // The checksum field itself counts as zero.
    let mut copy = header.to_vec();
    copy[FILE_HEADER_LEN - 8..FILE_HEADER_LEN].fill(0);
    xxh3_64(&copy)
}

fn check_block(block: &Block) -> Result<(), WireError> {
    if block.name.is_empty() || block.name.len() > MAX_BLOCK_NAME {
        return Err(WireError::Invalid {
            what: "block name length",
            value: block.name.len() as u64,
        });
    }
    check_page_size_and_length(block.page_size, block.length)
}

impl FileHeader {
    /// Decodes a header (`bytes` at least its [`header_len`]), refusing
    /// offsets other than the ones its blocks give.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let raw = read_file_header(bytes)?;
        let count = raw.block_count.get() as usize;
        let used = FILE_HEADER_LEN + count * size_of::<RawBlockHeader>();
        let header = Reader::new(bytes, "mapped-ram block headers").take(used)?;
        let checksum = header_checksum(header);
        if checksum != raw.checksum.get() {
            return Err(WireError::Checksum {
                kind: "mapped-ram header",
                expected: raw.checksum.get(),
                actual: checksum,
            });
        }
        let mut r = Reader::new(&header[FILE_HEADER_LEN..], "mapped-ram block headers");
        let mut blocks = Vec::with_capacity(count);
        let mut offsets = Vec::with_capacity(count);
        for _ in 0..count {
            let b: RawBlockHeader = r.read()?;
            let len = b.name_len.get() as usize;
            if len > MAX_BLOCK_NAME || b.reserved.get() != 0 || b.name[len..].iter().any(|&c| c != 0) {
                return Err(WireError::Invalid {
                    what: "block header",
                    value: len as u64,
                });
            }
            let name = std::str::from_utf8(&b.name[..len]).map_err(|_| WireError::Utf8 { what: "block name" })?;
            blocks.push(Block {
                name: name.to_owned(),
                length: b.length.get(),
                page_size: b.page_size.get(),
            });
            offsets.push((b.bitmap_offset.get(), b.pages_offset.get()));
        }
        let layout = Layout::new(&BlockList { blocks })?;
        let agrees = layout.header_len == u64::from(raw.header_len.get())
            && layout.state_offset == raw.state_offset.get()
            && layout
                .blocks
                .iter()
                .try_fold(0u64, |sum, b| sum.checked_add(b.block.length))
                == Some(raw.ram_bytes.get())
            && layout
                .blocks
                .iter()
                .zip(&offsets)
                .all(|(b, &(bitmap, pages))| b.bitmap_offset == bitmap && b.pages_offset == pages);
        if !agrees {
            return Err(WireError::Invalid {
                what: "mapped-ram layout (offsets other than the blocks give)",
                value: raw.state_offset.get(),
            });
        }
        Ok(Self {
            layout,
            session: SessionId(raw.session.get()),
            checksum,
        })
    }
}

/// What one block's pages came to, in the commit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockSummary {
    /// Digest of the block's page hashes (as the migration's `Complete`).
    pub digest: u64,
    /// Pages whose bytes are stored (bits set in the bitmap).
    pub stored_pages: u64,
    /// xxh3-64 of the bitmap's bit-carrying bytes.
    pub bitmap_hash: u64,
}

/// The record written last: a file with a valid one is a finished save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    /// Device state length.
    pub state_len: u64,
    /// xxh3-64 of the device state.
    pub state_hash: u64,
    /// The header's checksum: the record belongs to that header.
    pub header_hash: u64,
    /// Passes the save made over RAM.
    pub epochs: u64,
    /// Per block, in order.
    pub blocks: Vec<BlockSummary>,
}

impl CommitRecord {
    /// The record's bytes ([`Layout::commit_len`] long, zero padded).
    pub fn encode(&self, layout: &Layout) -> Vec<u8> {
        let mut out = Vec::with_capacity(layout.commit_len() as usize);
        put(
            &mut out,
            &RawCommit {
                magic: COMMIT_MAGIC,
                version: FILE_VERSION.into(),
                block_count: (self.blocks.len() as u32).into(),
                state_offset: layout.state_offset.into(),
                state_len: self.state_len.into(),
                state_hash: self.state_hash.into(),
                header_hash: self.header_hash.into(),
                epochs: self.epochs.into(),
            },
        );
        for b in &self.blocks {
            put(
                &mut out,
                &RawBlockSummary {
                    digest: b.digest.into(),
                    stored_pages: b.stored_pages.into(),
                    bitmap_hash: b.bitmap_hash.into(),
                },
            );
        }
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out.resize(layout.commit_len() as usize, 0);
        out
    }

    /// Decodes the record at the end of a file of `file_len` bytes whose
    /// header is `header`; `bytes` are the file's last
    /// [`Layout::commit_len`] bytes. Every way it can fail means the save
    /// did not finish, or the file was damaged since.
    pub fn decode(header: &FileHeader, file_len: u64, bytes: &[u8]) -> Result<Self, WireError> {
        let layout = &header.layout;
        let mut r = Reader::new(bytes, "commit record");
        let raw: RawCommit = r.read()?;
        if raw.magic != COMMIT_MAGIC {
            return Err(WireError::Invalid {
                what: "commit record magic (the save did not finish)",
                value: u64::from_le_bytes(raw.magic),
            });
        }
        let count = raw.block_count.get() as usize;
        if raw.version.get() != FILE_VERSION || count != layout.blocks.len() {
            return Err(WireError::Invalid {
                what: "commit record version or block count",
                value: count as u64,
            });
        }
        let mut blocks = Vec::with_capacity(count);
        for laid in &layout.blocks {
            let b: RawBlockSummary = r.read()?;
            if b.stored_pages.get() > laid.pages() {
                return Err(WireError::Invalid {
                    what: "stored pages in the commit record",
                    value: b.stored_pages.get(),
                });
            }
            blocks.push(BlockSummary {
                digest: b.digest.get(),
                stored_pages: b.stored_pages.get(),
                bitmap_hash: b.bitmap_hash.get(),
            });
        }
        let covered = size_of::<RawCommit>() + count * size_of::<RawBlockSummary>();
        let stored: U64 = r.read()?;
        let actual = xxh3_64(&bytes[..covered]);
        if stored.get() != actual {
            return Err(WireError::Checksum {
                kind: "commit record",
                expected: stored.get(),
                actual,
            });
        }
        let state_len = raw.state_len.get();
        cap("device state length", state_len, MAX_STATE_LEN)?;
        if raw.state_offset.get() != layout.state_offset || layout.file_len(state_len) != file_len {
            return Err(WireError::Invalid {
                what: "file length for the commit record (truncated or extended since)",
                value: file_len,
            });
        }
        if raw.header_hash.get() != header.checksum {
            return Err(WireError::Invalid {
                what: "commit record of another header",
                value: raw.header_hash.get(),
            });
        }
        Ok(Self {
            state_len,
            state_hash: raw.state_hash.get(),
            header_hash: raw.header_hash.get(),
            epochs: raw.epochs.get(),
            blocks,
        })
    }
}

/// Checks a block's bitmap bytes (its [`BlockLayout::bitmap_bytes`]) and
/// counts the pages it marks stored: a bit past the block's last page is an
/// error (a bitmap pointing past the page area).
pub fn check_bitmap(block: &BlockLayout, bitmap: &[u8]) -> Result<u64, WireError> {
    if bitmap.len() != block.bitmap_bytes() {
        return Err(WireError::Truncated {
            what: "page bitmap",
            need: block.bitmap_bytes(),
            have: bitmap.len(),
        });
    }
    let pages = block.pages();
    let tail_bits = pages % 8;
    if tail_bits != 0
        && let Some(&last) = bitmap.last()
        && last >> tail_bits != 0
    {
        return Err(WireError::Invalid {
            what: "page bitmap (marks a page past the end of its block)",
            value: pages,
        });
    }
    Ok(bitmap.iter().map(|b| u64::from(b.count_ones())).sum())
}

/// xxh3-64 of a bitmap's bit-carrying bytes, as the commit record keeps it.
pub fn bitmap_hash(bitmap: &[u8]) -> u64 {
    xxh3_64(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blocks() -> BlockList {
        BlockList {
            blocks: vec![
                Block {
                    name: "pc.ram".into(),
                    length: 10 << 20,
                    page_size: 4096,
                },
                Block {
                    name: "pc.ram.high".into(),
                    length: 3 * 4096,
                    page_size: 4096,
                },
            ],
        }
    }

    #[test]
    fn layout_is_aligned_and_ordered() {
        let layout = Layout::new(&blocks()).unwrap();
        assert_eq!(layout.header_len, 4096);
        let mut end = layout.header_len;
        for b in &layout.blocks {
            assert_eq!(b.bitmap_offset % BLOCK_ALIGN, 0);
            assert_eq!(b.pages_offset % AREA_ALIGN, 0);
            assert!(b.bitmap_offset >= end);
            assert!(b.pages_offset >= b.bitmap_offset + b.bitmap_len);
            end = b.pages_offset + b.block.length;
        }
        assert!(layout.state_offset >= end);
        assert_eq!(layout.state_offset % AREA_ALIGN, 0);
        assert_eq!(layout.file_len(1), layout.state_offset + 4096 + layout.commit_len());
    }

    #[test]
    fn header_and_commit_round_trip() {
        let layout = Layout::new(&blocks()).unwrap();
        let bytes = layout.encode_header(SessionId(7));
        assert_eq!(header_len(&bytes).unwrap(), layout.header_len);
        let header = FileHeader::decode(&bytes).unwrap();
        assert_eq!(header.layout, layout);
        assert_eq!(header.session, SessionId(7));
        let commit = CommitRecord {
            state_len: 5000,
            state_hash: 1,
            header_hash: header.checksum,
            epochs: 3,
            blocks: vec![
                BlockSummary {
                    digest: 9,
                    stored_pages: 2,
                    bitmap_hash: 4,
                },
                BlockSummary::default(),
            ],
        };
        let record = commit.encode(&layout);
        assert_eq!(record.len() as u64, layout.commit_len());
        let file_len = layout.file_len(5000);
        assert_eq!(CommitRecord::decode(&header, file_len, &record).unwrap(), commit);
        // Another length (truncated or grown) is refused.
        assert!(CommitRecord::decode(&header, file_len - 4096, &record).is_err());
        // So is a record of another header.
        let other = FileHeader::decode(&layout.encode_header(SessionId(8))).unwrap();
        assert!(CommitRecord::decode(&other, file_len, &record).is_err());
        // And nothing at all (a save that never committed).
        assert!(CommitRecord::decode(&header, file_len, &vec![0; record.len()]).is_err());
    }

    #[test]
    fn forged_offsets_and_versions_are_refused() {
        let layout = Layout::new(&blocks()).unwrap();
        let good = layout.encode_header(SessionId(1));
        // Move block 0's page area by a page, fixing up the checksum.
        let mut bad = good.clone();
        let at = FILE_HEADER_LEN + 24;
        let moved = u64::from_le_bytes(bad[at..at + 8].try_into().unwrap()) + 4096;
        bad[at..at + 8].copy_from_slice(&moved.to_le_bytes());
        let used = FILE_HEADER_LEN + 2 * 96;
        let sum = header_checksum(&bad[..used]);
        bad[FILE_HEADER_LEN - 8..FILE_HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        let err = FileHeader::decode(&bad).unwrap_err();
        assert!(err.to_string().contains("layout"), "{err}");
        // A flipped bit anywhere in the used part fails the checksum or a check.
        for bit in 0..used * 8 {
            let mut flipped = good.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(FileHeader::decode(&flipped).is_err(), "bit {bit}");
        }
        let mut version = good.clone();
        version[8] = 2;
        assert!(
            FileHeader::decode(&version)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
        let mut magic = good;
        magic[0] = b'X';
        assert!(FileHeader::decode(&magic).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn offsets_that_would_overflow_are_refused_not_wrapped() {
        // A block ending just below 2^64 and a second with a large bitmap:
        // the second's offsets overflow (found by review).
        let list = BlockList {
            blocks: vec![
                Block {
                    name: "huge".into(),
                    length: ((1u64 << 34) - 3) << 30,
                    page_size: 1 << 30,
                },
                Block {
                    name: "next".into(),
                    length: 1 << 50,
                    page_size: 4096,
                },
            ],
        };
        assert!(Layout::new(&list).is_err());
    }

    #[test]
    fn bitmap_bits_past_the_block_are_refused() {
        let layout = Layout::new(&blocks()).unwrap();
        let high = &layout.blocks[1]; // 3 pages: one bitmap byte
        assert_eq!(check_bitmap(high, &[0b101]).unwrap(), 2);
        let err = check_bitmap(high, &[0b1000]).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(check_bitmap(high, &[]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = header_len(&bytes);
            let _ = FileHeader::decode(&bytes);
            let header = FileHeader::decode(&Layout::new(&blocks()).unwrap().encode_header(SessionId(1))).unwrap();
            let _ = CommitRecord::decode(&header, bytes.len() as u64, &bytes);
            let _ = check_bitmap(&header.layout.blocks[1], &bytes);
        }

        #[test]
        fn any_valid_block_list_lays_out_and_round_trips(
            sizes in proptest::collection::vec((1u64..4096, 12u32..22), 1..6)
        ) {
            let list = BlockList {
                blocks: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &(pages, shift))| Block {
                        name: format!("b{i}"),
                        length: pages << shift,
                        page_size: 1 << shift,
                    })
                    .collect(),
            };
            let layout = Layout::new(&list).unwrap();
            let header = FileHeader::decode(&layout.encode_header(SessionId(3))).unwrap();
            prop_assert_eq!(header.layout, layout);
        }
    }
}
