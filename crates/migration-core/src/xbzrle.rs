//! The source's XBZRLE cache: a copy of pages as last sent, so a page sent
//! again travels as a delta against what the destination holds.
//!
//! Each data channel owns a cache for the pages routed to it: runs are cut
//! at [`CHUNK_PAGES`] boundaries and chunk `k` always goes to channel
//! `k mod channels` ([`route`]), so a page is only ever sent, cached and
//! delta-encoded by one thread, without locks, and its deltas leave in
//! order. Across epochs the destination's epoch barrier orders them too.
//!
//! The invariant the receiver relies on: a cached copy equals what the
//! destination holds for that page. Every send of a page on its channel
//! updates or drops its copy: a plain page is cached as sent, a delta's new
//! page replaces the old copy, a zero page drops it.

use crate::engine::PageRun;
use crate::ram::{BlockId, Ram};

/// Pages per routing chunk: each chunk belongs to one channel.
pub const CHUNK_PAGES: u64 = 256;

/// The largest delta sent, as a fraction of the page: a longer one saves
/// too little to be worth the receiver's read-modify-write.
pub const fn delta_limit(page_size: usize) -> usize {
    page_size / 2
}

/// A direct-mapped cache of page copies. Slot `i` of a channel's cache
/// holds one of the pages whose channel-local index is `i` modulo the slot
/// count, so a hot set no larger than the cache never collides.
#[derive(Debug)]
pub struct PageCache {
    page_size: usize,
    /// Per slot: the global page index + 1 it holds (0: empty).
    tags: Vec<u64>,
    /// Per slot: the epoch it was last written in.
    ages: Vec<u64>,
    data: Vec<u8>,
    mask: u64,
}

/// A fresh copy survives this many epochs before another page may evict it.
const LIFETIME: u64 = 2;

impl PageCache {
    /// A cache of at most `bytes` (rounded down to a power-of-two number of
    /// pages, at least one). The memory is committed as slots fill.
    pub fn new(bytes: u64, page_size: usize) -> Self {
        let pages = (bytes / page_size as u64).max(1);
        let slots = 1u64 << (63 - pages.leading_zeros());
        Self {
            page_size,
            tags: vec![0; slots as usize],
            ages: vec![0; slots as usize],
            data: vec![0; slots as usize * page_size],
            mask: slots - 1,
        }
    }

    /// Bytes of page copies the cache can hold.
    pub fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    fn slot(&self, local: u64) -> usize {
        (local & self.mask) as usize
    }

    /// The copy of page `global` (at channel-local index `local`), if cached.
    pub fn get_mut(&mut self, global: u64, local: u64, epoch: u64) -> Option<&mut [u8]> {
        let slot = self.slot(local);
        if self.tags[slot] != global + 1 {
            return None;
        }
        self.ages[slot] = epoch;
        let at = slot * self.page_size;
        Some(&mut self.data[at..at + self.page_size])
    }

    /// Caches `bytes` as page `global`'s copy, unless its slot holds another
    /// page cached within the last two epochs. Returns whether it
    /// was cached.
    pub fn insert(&mut self, global: u64, local: u64, epoch: u64, bytes: &[u8]) -> bool {
        let slot = self.slot(local);
        let tag = self.tags[slot];
        if tag != 0 && tag != global + 1 && self.ages[slot] + LIFETIME > epoch {
            return false;
        }
        self.tags[slot] = global + 1;
        self.ages[slot] = epoch;
        let at = slot * self.page_size;
        self.data[at..at + self.page_size].copy_from_slice(bytes);
        true
    }

    /// Forgets page `global`'s copy, if cached (it was sent some other way).
    pub fn remove(&mut self, global: u64, local: u64) {
        let slot = self.slot(local);
        if self.tags[slot] == global + 1 {
            self.tags[slot] = 0;
        }
    }
}

/// Where each block's pages start in the global page numbering (blocks
/// back to back), for routing and cache slots.
#[derive(Debug, Clone)]
pub struct PageNumbering {
    starts: Vec<u64>,
}

impl PageNumbering {
    /// The numbering of `ram`'s blocks.
    pub fn new(ram: &Ram) -> Self {
        let mut next = 0;
        let starts = ram
            .blocks()
            .iter()
            .map(|b| {
                // Chunks never straddle blocks: each block starts a chunk.
                let start = next;
                next += b.pages().div_ceil(CHUNK_PAGES) * CHUNK_PAGES;
                start
            })
            .collect();
        Self { starts }
    }

    /// The global index of `page` of `block`.
    pub fn global(&self, block: BlockId, page: u64) -> u64 {
        self.starts[block.0 as usize] + page
    }

    /// The index of global page `global` among those of channel `channel`
    /// of `channels` (the chunks it owns, back to back).
    pub fn local(global: u64, channels: usize) -> u64 {
        let chunk = global / CHUNK_PAGES;
        (chunk / channels as u64) * CHUNK_PAGES + global % CHUNK_PAGES
    }
}

/// Splits `run` among the channels that own its pages' chunks, of
/// `channels`: each piece with its channel. A contiguous run is cut at chunk
/// boundaries; a sparse one gives each channel one run of all its pages.
pub fn route(numbering: &PageNumbering, run: PageRun, channels: usize) -> Vec<(usize, PageRun)> {
    let owner = |page: u64| ((numbering.global(run.block, page) / CHUNK_PAGES) % channels as u64) as usize;
    if run.sparse.is_some() {
        return (0..channels)
            .filter_map(|channel| run.filter(|page| owner(page) == channel).map(|piece| (channel, piece)))
            .collect();
    }
    let end = run.first + run.count;
    let mut pieces = Vec::new();
    let mut first = run.first;
    while first < end {
        let global = numbering.global(run.block, first);
        let count = ((global / CHUNK_PAGES + 1) * CHUNK_PAGES - global).min(end - first);
        pieces.push((owner(first), PageRun::contiguous(run.block, first, count, run.epoch)));
        first += count;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_copy_is_not_evicted_and_an_old_one_is() {
        let mut cache = PageCache::new(2 * 4096, 4096);
        assert_eq!(cache.capacity(), 2 * 4096);
        let page = [7u8; 4096];
        assert!(cache.insert(10, 0, 1, &page));
        assert_eq!(cache.get_mut(10, 0, 1).map(|c| c[0]), Some(7));
        // Page 12 maps to the same slot (local 2 of 2 slots): refused while fresh.
        assert!(!cache.insert(12, 2, 2, &[1u8; 4096]));
        assert!(cache.get_mut(12, 2, 2).is_none());
        // Two epochs later the old copy gives way.
        assert!(cache.insert(12, 2, 4, &[1u8; 4096]));
        assert!(cache.get_mut(10, 0, 4).is_none());
        assert_eq!(cache.get_mut(12, 2, 4).map(|c| c[0]), Some(1));
        cache.remove(12, 2);
        assert!(cache.get_mut(12, 2, 4).is_none());
    }

    #[test]
    fn runs_are_cut_at_chunks_and_each_chunk_keeps_its_channel() {
        let numbering = PageNumbering { starts: vec![0, 512] };
        let run = PageRun::contiguous(BlockId(0), 200, 300, 3);
        let pieces: Vec<_> = route(&numbering, run, 2)
            .into_iter()
            .map(|(channel, piece)| (channel, piece.first, piece.count, piece.epoch))
            .collect();
        assert_eq!(pieces, [(0, 200, 56, 3), (1, 256, 244, 3)]);
        // Block 1 starts at chunk 2: channel 0 again.
        assert_eq!(numbering.global(BlockId(1), 5), 517);
        let run = PageRun::contiguous(BlockId(1), 0, 1, 0);
        let channels: Vec<_> = route(&numbering, run, 2)
            .into_iter()
            .map(|(channel, _)| channel)
            .collect();
        assert_eq!(channels, [0]);
        // A sparse run: each channel gets one run of the pages it owns.
        let mut list = Vec::new();
        for page in [3u64, 300, 301, 600, 900] {
            list.push(page);
        }
        let sparse = crate::engine::PageRun::contiguous(BlockId(0), 0, 1000, 4)
            .filter(|p| list.contains(&p))
            .expect("pages");
        let pieces: Vec<(usize, Vec<u64>)> = route(&numbering, sparse, 2)
            .into_iter()
            .map(|(channel, piece)| (channel, piece.pages().collect()))
            .collect();
        assert_eq!(pieces, [(0, vec![3, 600]), (1, vec![300, 301, 900])]);
        // Channel-local indices of a channel's chunks are back to back.
        assert_eq!(PageNumbering::local(256 + 3, 2), 3);
        assert_eq!(PageNumbering::local(2 * 256 + 3, 2), 256 + 3);
        assert_eq!(PageNumbering::local(3 * 256 + 3, 2), 256 + 3);
    }
}
