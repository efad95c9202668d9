//! Page packets: a batch of pages of one block, each sent as a zero flag or
//! as its bytes.
//!
//! ```text
//! +---------------------------+
//! | block u32 | count u32     |  PageBatch header (32 bytes)
//! | page_size u32             |
//! | codec u16 | rsvd u16      |
//! | epoch u64                 |
//! | payload_len u32 | rsvd u32|
//! +---------------------------+
//! | entry u64 × count         |  page index << 8 | encoding
//! +---------------------------+
//! | page bytes × plain count  |  in entry order; with a codec other than
//! +---------------------------+  `none`, those bytes compressed as one block
//! ```
//!
//! The frame header's checksum covers all of it. For a batch sent as is
//! ([`Codec::None`]) the checksum is xxh3-64 over the batch header and entry
//! table followed by the little-endian xxh3-64 of every plain page, so the
//! receiver hashes each page once and keeps the hash (the destination
//! needs it anyway, to compare digests); a compressed batch's checksum is
//! xxh3-64 of its whole body, like any other frame.
//!
//! Because the checksum of a batch sent as is covers its pages only
//! through their hashes, a receiver may read the header and entry table
//! first ([`batch_lengths`], [`PageBatch::decode_head`]), read the page
//! bytes straight into their place, hash them there, and check the frame
//! with [`pages_checksum`] afterwards.

use crate::codec::{Reader, cap, put, reserved_zero};
use crate::handshake::{MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use crate::{MAX_FRAME_BODY, WireError};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Most pages one batch may carry.
pub const MAX_PAGES_PER_BATCH: u32 = 4096;

/// Largest page index an entry can carry (56 bits).
pub const MAX_PAGE_INDEX: u64 = (1 << 56) - 1;

/// Length of the batch header that opens a pages frame's body.
pub const BATCH_HEADER_LEN: usize = 32;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBatchHeader {
    block: U32,
    count: U32,
    page_size: U32,
    codec: U16,
    reserved: U16,
    epoch: U64,
    payload_len: U32,
    reserved2: U32,
}
const _: () = assert!(size_of::<RawBatchHeader>() == BATCH_HEADER_LEN);

/// How the plain pages' bytes of a batch travel. `0` is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Codec {
    /// As they are.
    None = 1,
    /// One lz4 block.
    Lz4 = 2,
    /// One zstd frame.
    Zstd = 3,
}

impl Codec {
    /// The handshake feature both sides must agree before a batch may
    /// travel this way (none for pages as they are).
    pub fn feature(self) -> crate::Features {
        match self {
            Codec::None => crate::Features::default(),
            Codec::Lz4 => crate::Features::LZ4,
            Codec::Zstd => crate::Features::ZSTD,
        }
    }

    fn from_raw(raw: u16) -> Result<Self, WireError> {
        Ok(match raw {
            1 => Codec::None,
            2 => Codec::Lz4,
            3 => Codec::Zstd,
            other => {
                return Err(WireError::Invalid {
                    what: "page codec",
                    value: other.into(),
                });
            }
        })
    }
}

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
#[derive(Debug, Clone, Eq)]
pub struct PageBatch<'a> {
    /// Index of the block in the block list.
    pub block: u32,
    /// The epoch (pass) these pages belong to.
    pub epoch: u64,
    /// Page size of the block.
    pub page_size: u32,
    codec: Codec,
    entries: &'a [u8],
    payload: &'a [u8],
    /// xxh3-64 of every plain page, when known (computed by the sender, or
    /// verified by the receiving transport).
    hashes: Option<&'a [u64]>,
    /// The receiving transport wrote the plain pages to their place: the
    /// batch holds no payload (see [`PageBatch::decode_head`]).
    placed: bool,
}

/// Two batches are equal when they carry the same pages; attached hashes
/// are derived data and do not count.
impl PartialEq for PageBatch<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.block == other.block
            && self.epoch == other.epoch
            && self.page_size == other.page_size
            && self.codec == other.codec
            && self.entries == other.entries
            && self.payload == other.payload
            && self.placed == other.placed
    }
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
        Self::with_codec(block, epoch, page_size, Codec::None, entries, payload)
    }

    /// A batch whose plain pages' bytes are compressed with `codec` into
    /// `payload`, which must be shorter than the bytes it stands for (send
    /// them as they are otherwise).
    pub fn with_codec(
        block: u32,
        epoch: u64,
        page_size: u32,
        codec: Codec,
        entries: &'a [u8],
        payload: &'a [u8],
    ) -> Result<Self, WireError> {
        let batch = Self {
            block,
            epoch,
            page_size,
            codec,
            entries,
            payload,
            hashes: None,
            placed: false,
        };
        batch.validate(payload.len())?;
        Ok(batch)
    }

    /// Checks the batch; `payload_len` is the payload's length (declared
    /// by the header, for a placed batch that holds none).
    fn validate(&self, payload_len: usize) -> Result<(), WireError> {
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
        let len = payload_len as u64;
        let fits = match self.codec {
            Codec::None => len == want,
            // Compressed: something for something, and smaller.
            Codec::Lz4 | Codec::Zstd if want == 0 => len == 0,
            Codec::Lz4 | Codec::Zstd => len != 0 && len < want,
        };
        if !fits {
            return Err(WireError::Invalid {
                what: "page payload length",
                value: len,
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

    /// The plain pages in runs of consecutive indices, in entry order:
    /// `(first page, pages)`. Their bytes follow one another in the payload
    /// in the same order, so a run is one stretch of the payload and one
    /// stretch of the block.
    pub fn plain_runs(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let mut plain = self
            .entries()
            .flatten()
            .filter(|e| e.encoding == PageEncoding::Plain)
            .map(|e| e.page)
            .peekable();
        std::iter::from_fn(move || {
            let first = plain.next()?;
            let mut pages = 1;
            while plain.next_if(|&page| page == first + pages).is_some() {
                pages += 1;
            }
            Some((first, pages))
        })
    }

    /// The same batch with the xxh3-64 of each plain page attached, in
    /// order (a batch sent as is only; the count must match).
    pub fn with_hashes(mut self, hashes: &'a [u64]) -> Self {
        debug_assert_eq!(self.codec, Codec::None);
        debug_assert!(self.placed || hashes.len() * self.page_size as usize == self.payload.len());
        self.hashes = Some(hashes);
        self
    }

    /// The xxh3-64 of each plain page, when attached.
    pub fn page_hashes(&self) -> Option<&'a [u64]> {
        self.hashes
    }

    /// Whether the receiving transport already wrote the plain pages to
    /// their place, so the batch carries hashes but no payload.
    pub fn is_placed(&self) -> bool {
        self.placed
    }

    /// The checksum its frame header carries (see the module docs).
    pub fn frame_checksum(&self) -> u64 {
        let mut head = Vec::with_capacity(self.payload_offset());
        self.encode_head(&mut head);
        self.checksum_with_head(&head)
    }

    /// [`PageBatch::frame_checksum`] for a batch whose head (from
    /// [`PageBatch::encode_head`]) is already encoded as `head`.
    pub fn checksum_with_head(&self, head: &[u8]) -> u64 {
        if self.codec != Codec::None {
            return crate::frame::checksum(&[head, self.payload]);
        }
        match self.hashes {
            Some(hashes) => pages_checksum(head, hashes),
            None => checksum_of_hashes(head, self.payload.chunks_exact(self.page_size as usize).map(page_hash)),
        }
    }

    /// How the plain pages' bytes travel.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Length of the plain pages' bytes once decompressed.
    pub fn plain_len(&self) -> usize {
        self.entries()
            .flatten()
            .filter(|e| e.encoding == PageEncoding::Plain)
            .count()
            * self.page_size as usize
    }

    /// The bytes of the plain pages, in entry order (compressed as one
    /// block unless [`PageBatch::codec`] is [`Codec::None`]).
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
                codec: (self.codec as u16).into(),
                reserved: 0.into(),
                epoch: self.epoch.into(),
                payload_len: (self.declared_payload_len() as u32).into(),
                reserved2: 0.into(),
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
        size_of::<RawBatchHeader>() + self.entries.len() + self.declared_payload_len()
    }

    /// The payload's length on the wire (a placed batch holds none).
    fn declared_payload_len(&self) -> usize {
        if self.placed {
            self.plain_len()
        } else {
            self.payload.len()
        }
    }

    /// Reads the batch header: the raw header, the entry table's length and
    /// the payload's length.
    fn read_header(r: &mut Reader<'a>) -> Result<(RawBatchHeader, usize, usize), WireError> {
        let raw: RawBatchHeader = r.read()?;
        reserved_zero("page batch reserved field", raw.reserved.get().into())?;
        reserved_zero("page batch reserved field", raw.reserved2.get().into())?;
        let count = raw.count.get();
        cap("pages in batch", count.into(), MAX_PAGES_PER_BATCH.into())?;
        let (entries, payload) = (count as usize * 8, raw.payload_len.get() as usize);
        Ok((raw, entries, payload))
    }

    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "pages");
        let (raw, entries, payload) = Self::read_header(&mut r)?;
        let entries = r.take(entries)?;
        let payload = r.take(payload)?;
        r.finish()?;
        let codec = Codec::from_raw(raw.codec.get())?;
        Self::with_codec(
            raw.block.get(),
            raw.epoch.get(),
            raw.page_size.get(),
            codec,
            entries,
            payload,
        )
    }

    /// A batch whose plain pages a transport read straight into their
    /// place (from a file, say), so it carries no payload: what
    /// [`PageBatch::decode_head`] gives for a received one. Attach the
    /// pages' hashes with [`PageBatch::with_hashes`].
    pub fn placed(block: u32, epoch: u64, page_size: u32, entries: &'a [u8]) -> Result<Self, WireError> {
        let batch = Self {
            block,
            epoch,
            page_size,
            codec: Codec::None,
            entries,
            payload: &[],
            hashes: None,
            placed: true,
        };
        batch.validate(batch.plain_len())?;
        Ok(batch)
    }

    /// Decodes a batch sent as is from its header and entry table alone
    /// (`head`, exactly [`BATCH_HEADER_LEN`] plus the entry table's length
    /// from [`batch_lengths`]), for a receiver that reads the payload
    /// straight into place. The batch holds no payload and reports
    /// [`PageBatch::is_placed`]; attach the pages' hashes with
    /// [`PageBatch::with_hashes`] once they are read and checked. A
    /// compressed batch is an error here: its payload must be read whole.
    pub fn decode_head(head: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(head, "pages head");
        let (raw, entries, payload) = Self::read_header(&mut r)?;
        let entries = r.take(entries)?;
        r.finish()?;
        let codec = Codec::from_raw(raw.codec.get())?;
        if codec != Codec::None {
            return Err(WireError::Invalid {
                what: "codec of a batch placed as it arrives",
                value: codec as u64,
            });
        }
        let batch = Self {
            block: raw.block.get(),
            epoch: raw.epoch.get(),
            page_size: raw.page_size.get(),
            codec,
            entries,
            payload: &[],
            hashes: None,
            placed: true,
        };
        batch.validate(payload)?;
        Ok(batch)
    }
}

/// From the first [`BATCH_HEADER_LEN`] bytes of a pages frame's body: the
/// length of the entry table and of the payload that follow (checked
/// against the caps, not yet against each other).
pub fn batch_lengths(header: &[u8]) -> Result<(usize, usize), WireError> {
    let mut r = Reader::new(header, "page batch header");
    let (_, entries, payload) = PageBatch::read_header(&mut r)?;
    r.finish()?;
    Ok((entries, payload))
}

/// The checksum of a pages frame sent as is, from its batch header and
/// entry table (`head`) and the xxh3-64 of each plain page, in order.
pub fn pages_checksum(head: &[u8], hashes: &[u64]) -> u64 {
    checksum_of_hashes(head, hashes.iter().copied())
}

fn checksum_of_hashes(head: &[u8], hashes: impl Iterator<Item = u64>) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(head);
    for hash in hashes {
        hasher.update(&hash.to_le_bytes());
    }
    hasher.digest()
}

/// The hash of one page's bytes (xxh3-64): what a pages frame's checksum
/// is built from, and what the destination keeps to compare digests.
pub fn page_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// [`page_hash`] of each page in a run of page bytes that arrives in
/// pieces of any size (a page may straddle two pieces).
#[derive(Clone)]
pub struct PageHasher {
    page_size: usize,
    /// Bytes of the current page fed so far, and their running hash.
    partial: usize,
    hasher: Xxh3,
}

impl std::fmt::Debug for PageHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHasher")
            .field("page_size", &self.page_size)
            .field("partial", &self.partial)
            .finish()
    }
}

impl PageHasher {
    /// A hasher for pages of `page_size` bytes.
    pub fn new(page_size: usize) -> Self {
        Self {
            page_size,
            partial: 0,
            hasher: Xxh3::new(),
        }
    }

    /// Feeds the next `bytes`, pushing the hash of every page they complete.
    pub fn feed(&mut self, mut bytes: &[u8], hashes: &mut Vec<u64>) {
        if self.partial > 0 {
            let take = (self.page_size - self.partial).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.partial += take;
            bytes = &bytes[take..];
            if self.partial < self.page_size {
                return;
            }
            hashes.push(self.hasher.digest());
            self.hasher.reset();
            self.partial = 0;
        }
        let mut pages = bytes.chunks_exact(self.page_size);
        hashes.extend(pages.by_ref().map(page_hash));
        let rest = pages.remainder();
        if !rest.is_empty() {
            self.hasher.update(rest);
            self.partial = rest.len();
        }
    }
}

/// Checks a pages frame against its header's checksum (see the module
/// docs) and returns its batch. For a batch sent as is, the batch carries
/// the xxh3-64 of every plain page, in order, kept in `hashes` (see
/// [`PageBatch::page_hashes`]); `hashes` is cleared otherwise.
pub fn verify_pages<'a>(
    header: &crate::FrameHeader,
    body: &'a [u8],
    hashes: &'a mut Vec<u64>,
) -> Result<PageBatch<'a>, WireError> {
    let batch = check_pages(header, body, hashes)?;
    let hashes: &'a [u64] = hashes;
    Ok(if hashes.is_empty() {
        batch
    } else {
        batch.with_hashes(hashes)
    })
}

/// [`verify_pages`] without attaching the hashes.
pub(crate) fn check_pages<'a>(
    header: &crate::FrameHeader,
    body: &'a [u8],
    hashes: &mut Vec<u64>,
) -> Result<PageBatch<'a>, WireError> {
    hashes.clear();
    let batch = PageBatch::decode(body)?;
    let actual = if batch.codec == Codec::None {
        hashes.extend(batch.payload.chunks_exact(batch.page_size as usize).map(page_hash));
        pages_checksum(&body[..batch.payload_offset()], hashes)
    } else {
        crate::frame::checksum(&[body])
    };
    if actual == header.checksum {
        Ok(batch)
    } else {
        hashes.clear();
        Err(WireError::Checksum {
            kind: header.kind.name(),
            expected: header.checksum,
            actual,
        })
    }
}
