//! Control messages from the source: epoch sync markers, end of RAM, and
//! the digests that close a migration.

use crate::WireError;
use crate::codec::{Reader, cap, put};
use crate::handshake::MAX_BLOCKS;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSyncMarker {
    epoch: U64,
    pages: U64,
}
const _: () = assert!(size_of::<RawSyncMarker>() == 16);

/// Every page of `epoch` has been sent on this channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncMarker {
    /// The epoch that ends.
    pub epoch: u64,
    /// Pages this channel sent in the epoch.
    pub pages: u64,
}

impl SyncMarker {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawSyncMarker {
                epoch: self.epoch.into(),
                pages: self.pages.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "sync-marker");
        let raw: RawSyncMarker = r.read()?;
        r.finish()?;
        Ok(Self {
            epoch: raw.epoch.get(),
            pages: raw.pages.get(),
        })
    }
}

/// All RAM and the device state have been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfRam {
    /// Number of epochs sent (the last epoch is `epochs - 1`).
    pub epochs: u64,
}

impl EndOfRam {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.epochs.to_le_bytes());
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "end-of-ram");
        let epochs: U64 = r.read()?;
        r.finish()?;
        Ok(Self { epochs: epochs.get() })
    }
}

/// Digests of every block of the source's frozen RAM, in block-list order.
/// A block's digest is xxh3-64 over the little-endian xxh3-64 of each of its
/// pages, so the destination computes it from the pages it placed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Complete {
    /// One digest per block.
    pub digests: Vec<u64>,
}

impl Complete {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.digests.len() as u32).to_le_bytes());
        for digest in &self.digests {
            out.extend_from_slice(&digest.to_le_bytes());
        }
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "complete");
        let count: U32 = r.read()?;
        cap("digest count", count.get().into(), MAX_BLOCKS as u64)?;
        let mut digests = Vec::with_capacity(count.get() as usize);
        for _ in 0..count.get() {
            let digest: U64 = r.read()?;
            digests.push(digest.get());
        }
        r.finish()?;
        Ok(Self { digests })
    }
}
