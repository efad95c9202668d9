//! The handshake: `Hello`, `HelloReply`, and the block list.

use crate::codec::{Reader, cap, put, reserved_zero};
use crate::{MAGIC, WireError};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Identifies one migration; every connection of a migration carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// Optional protocol features, as a bit set. The source proposes, the
/// destination answers with the subset it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    /// Zero pages travel as a flag, without their bytes.
    pub const ZERO_PAGES: Features = Features(1 << 0);
    /// Page batches may be compressed with lz4.
    pub const LZ4: Features = Features(1 << 1);
    /// Page batches may be compressed with zstd.
    pub const ZSTD: Features = Features(1 << 2);
    /// The migration may switch to postcopy; the source opens one more
    /// channel, the urgent-page channel (index `channels` in its
    /// [`ChannelHello`]).
    pub const POSTCOPY: Features = Features(1 << 3);
    /// Pages may travel as XBZRLE deltas against the destination's copy
    /// (see [`crate::delta`]).
    pub const XBZRLE: Features = Features(1 << 4);
    /// Every feature this version knows.
    pub const KNOWN: Features =
        Features(Self::ZERO_PAGES.0 | Self::LZ4.0 | Self::ZSTD.0 | Self::POSTCOPY.0 | Self::XBZRLE.0);

    /// The union of both sets.
    pub fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// Features in both sets.
    pub fn intersect(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// Whether every feature of `other` is in `self`.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHello {
    magic: [u8; 8],
    min_version: U16,
    max_version: U16,
    channels: U16,
    reserved: U16,
    features: U64,
    session: U64,
}
const _: () = assert!(size_of::<RawHello>() == 32);

/// The first message of a migration, from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the source speaks.
    pub min_version: u16,
    /// Newest protocol version the source speaks.
    pub max_version: u16,
    /// Features the source proposes.
    pub features: Features,
    /// The migration's session id.
    pub session: SessionId,
    /// Number of channels the source will open (1 for a single stream).
    pub channels: u16,
}

impl Hello {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawHello {
                magic: MAGIC,
                min_version: self.min_version.into(),
                max_version: self.max_version.into(),
                channels: self.channels.into(),
                reserved: 0.into(),
                features: self.features.0.into(),
                session: self.session.0.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "hello");
        let raw: RawHello = r.read()?;
        if raw.magic != MAGIC {
            return Err(WireError::BadMagic { found: raw.magic });
        }
        reserved_zero("hello reserved field", raw.reserved.get().into())?;
        if raw.min_version.get() == 0 || raw.min_version.get() > raw.max_version.get() {
            return Err(WireError::Invalid {
                what: "hello version range",
                value: (u64::from(raw.min_version.get()) << 16) | u64::from(raw.max_version.get()),
            });
        }
        if raw.channels.get() == 0 {
            return Err(WireError::Invalid {
                what: "hello channel count",
                value: 0,
            });
        }
        cap("hello channel count", raw.channels.get().into(), MAX_CHANNELS.into())?;
        r.finish()?;
        Ok(Self {
            min_version: raw.min_version.get(),
            max_version: raw.max_version.get(),
            features: Features(raw.features.get()),
            session: SessionId(raw.session.get()),
            channels: raw.channels.get(),
        })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHelloReply {
    version: U16,
    channels: U16,
    reserved: U32,
    features: U64,
    session: U64,
}
const _: () = assert!(size_of::<RawHelloReply>() == 24);

/// The destination's answer to [`Hello`]: what both sides will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// The protocol version chosen.
    pub version: u16,
    /// The features agreed.
    pub features: Features,
    /// The session id, echoed.
    pub session: SessionId,
    /// The channel count agreed.
    pub channels: u16,
}

impl HelloReply {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawHelloReply {
                version: self.version.into(),
                channels: self.channels.into(),
                reserved: 0.into(),
                features: self.features.0.into(),
                session: self.session.0.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "hello-reply");
        let raw: RawHelloReply = r.read()?;
        reserved_zero("hello-reply reserved field", raw.reserved.get().into())?;
        if raw.version.get() == 0 {
            return Err(WireError::Invalid {
                what: "hello-reply version",
                value: 0,
            });
        }
        if raw.channels.get() == 0 {
            return Err(WireError::Invalid {
                what: "hello-reply channel count",
                value: 0,
            });
        }
        cap(
            "hello-reply channel count",
            raw.channels.get().into(),
            MAX_CHANNELS.into(),
        )?;
        r.finish()?;
        Ok(Self {
            version: raw.version.get(),
            features: Features(raw.features.get()),
            session: SessionId(raw.session.get()),
            channels: raw.channels.get(),
        })
    }
}

/// Most channels one migration may use.
pub const MAX_CHANNELS: u16 = 64;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawChannelHello {
    magic: [u8; 8],
    session: U64,
    index: U16,
    channels: U16,
    reserved: U32,
}
const _: () = assert!(size_of::<RawChannelHello>() == 24);

/// The first message on every connection after the main one: which
/// migration and which channel it carries. The destination refuses another
/// session id, an index out of range, or an index it already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    /// The migration's session id, as in its [`Hello`].
    pub session: SessionId,
    /// This channel's index, `1..channels` (the main connection is 0), or
    /// `channels` for the urgent-page channel of a migration that agreed
    /// [`Features::POSTCOPY`].
    pub index: u16,
    /// The channel count agreed in the handshake.
    pub channels: u16,
}

impl ChannelHello {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawChannelHello {
                magic: MAGIC,
                session: self.session.0.into(),
                index: self.index.into(),
                channels: self.channels.into(),
                reserved: 0.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "channel-hello");
        let raw: RawChannelHello = r.read()?;
        if raw.magic != MAGIC {
            return Err(WireError::BadMagic { found: raw.magic });
        }
        reserved_zero("channel-hello reserved field", raw.reserved.get().into())?;
        let channels = raw.channels.get();
        cap("channel count", channels.into(), MAX_CHANNELS.into())?;
        let index = raw.index.get();
        if index == 0 || index > channels {
            return Err(WireError::Invalid {
                what: "channel index",
                value: index.into(),
            });
        }
        r.finish()?;
        Ok(Self {
            session: SessionId(raw.session.get()),
            index,
            channels,
        })
    }
}

/// Most RAM blocks one migration may announce.
pub const MAX_BLOCKS: usize = 256;
/// Longest block name, in bytes.
pub const MAX_BLOCK_NAME: usize = 64;
/// Smallest page size on the wire.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size on the wire (a 1 GiB huge page).
pub const MAX_PAGE_SIZE: u32 = 1 << 30;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawBlock {
    length: U64,
    page_size: U32,
    name_len: U16,
    reserved: U16,
}
const _: () = assert!(size_of::<RawBlock>() == 16);

/// One RAM block: a name, a length, and the page size used for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block's name, such as `pc.ram`.
    pub name: String,
    /// Length in bytes, a non-zero multiple of `page_size`.
    pub length: u64,
    /// Page size in bytes, a power of two in `MIN_PAGE_SIZE..=MAX_PAGE_SIZE`.
    pub page_size: u32,
}

impl Block {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.length / u64::from(self.page_size)
    }
}

/// Checks a block's page size (a power of two in
/// `MIN_PAGE_SIZE..=MAX_PAGE_SIZE`) and its length (a non-zero multiple of
/// the page size).
pub(crate) fn check_page_size_and_length(page_size: u32, length: u64) -> Result<(), WireError> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(WireError::Invalid {
            what: "block page size",
            value: page_size.into(),
        });
    }
    if length == 0 || length % u64::from(page_size) != 0 {
        return Err(WireError::Invalid {
            what: "block length",
            value: length,
        });
    }
    Ok(())
}

/// Every RAM block of the VM, in order; a block's index in this list is its
/// id in page packets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockList {
    /// The blocks.
    pub blocks: Vec<Block>,
}

impl BlockList {
    /// Sum of every block's length (saturating, for limit checks).
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().fold(0u64, |acc, b| acc.saturating_add(b.length))
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for block in &self.blocks {
            put(
                out,
                &RawBlock {
                    length: block.length.into(),
                    page_size: block.page_size.into(),
                    name_len: (block.name.len() as u16).into(),
                    reserved: 0.into(),
                },
            );
            out.extend_from_slice(block.name.as_bytes());
        }
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "block-list");
        let count: U32 = r.read()?;
        let count = count.get() as usize;
        cap("block count", count as u64, MAX_BLOCKS as u64)?;
        if count == 0 {
            return Err(WireError::Invalid {
                what: "block count",
                value: 0,
            });
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let raw: RawBlock = r.read()?;
            reserved_zero("block reserved field", raw.reserved.get().into())?;
            let (page_size, length) = (raw.page_size.get(), raw.length.get());
            check_page_size_and_length(page_size, length)?;
            let name_len = usize::from(raw.name_len.get());
            cap("block name length", name_len as u64, MAX_BLOCK_NAME as u64)?;
            if name_len == 0 {
                return Err(WireError::Invalid {
                    what: "block name length",
                    value: 0,
                });
            }
            let name = r.take_str(name_len, "block name")?.to_owned();
            blocks.push(Block {
                name,
                length,
                page_size,
            });
        }
        r.finish()?;
        Ok(Self { blocks })
    }
}
