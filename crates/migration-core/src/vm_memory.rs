//! rust-vmm's `vm-memory` guest memory as migration RAM, and its dirty bitmaps as a dirty log
//! (feature `vm-memory`).
//!
//! A VMM built on rust-vmm crates holds guest RAM in a `GuestMemoryMmap`. [`ram`] makes a
//! [`Ram`] of it without copying: one [`RamBlock`] per region, in guest-address order, named
//! after the region's guest-physical address ([`block_name`]), each over the region's own
//! mapping (see [`GuestRegion::from_vm_memory`]). With `AtomicBitmap` as the regions' bitmap,
//! vm-memory marks every page the VMM writes through its API (`write_slice`, `write_obj`,
//! `store`, `VolatileSlice` copies, reads from a file into guest memory): the writes of the
//! VMM's own device models. [`VmMemoryDirtyLog`] reads those marks as a [`DirtyLog`], with the
//! same block ids as [`ram`].
//!
//! Writes that do not go through vm-memory's API (vCPUs, raw pointers from `as_ptr` or
//! `get_host_address`, other processes) leave no mark: combine the log with one that sees them,
//! such as [`KernelDirtyLog`](crate::KernelDirtyLog), in a
//! [`CombinedDirtyLog`](crate::CombinedDirtyLog).
//!
//! Both take the regions there are when they are called: regions plugged in or removed later
//! are not part of the migration, so the layout must not change while it runs.
//!
//! ```
//! use migration_core::vm_memory::{VmMemoryDirtyLog, ram};
//! use migration_core::{BlockId, DirtyLog};
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // The VMM's guest memory: 2 MiB at 0 and 2 MiB at 4 GiB.
//! let memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
//!     (GuestAddress(0), 2 << 20),
//!     (GuestAddress(4 << 30), 2 << 20),
//! ])?;
//! let ram = ram(&memory)?;
//! assert_eq!(ram.blocks()[1].name(), "ram@0x100000000");
//! let mut dirty = VmMemoryDirtyLog::new(&memory)?;
//!
//! // A device model writes guest memory through vm-memory...
//! memory.write_obj(0xfeed_u32, GuestAddress((4 << 30) + 0x3010))?;
//! // ...and the next collect reports that page: block 1, page 3.
//! let mut runs = Vec::new();
//! dirty.collect(&mut |block, first, count| runs.push((block, first, count)))?;
//! assert_eq!(runs, [(BlockId(1), 3, 1)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::bitmap::word_runs;
use crate::dirty::{DirtyLog, DirtyLogError, DirtySink};
use crate::ram::{BlockId, Ram, RamBlock};
use ::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use ::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
use migration_sys::{GuestRegion, PAGE_SIZE, SysError};
use std::sync::Arc;

/// Why vm-memory's guest memory cannot be migrated as it is.
#[derive(Debug, thiserror::Error)]
pub enum VmMemoryError {
    /// A region's mapping cannot serve as a RAM block (its length is not whole 4 KiB pages,
    /// it is not page aligned, or not read-write).
    #[error("the region at guest address {addr:#x} cannot be a RAM block")]
    Region {
        /// The region's guest-physical address.
        addr: u64,
        /// What the mapping lacks.
        #[source]
        source: SysError,
    },
    /// A region's dirty bitmap cannot be read as a log of its writes.
    #[error("the dirty bitmap of the region at guest address {addr:#x} {problem}")]
    Bitmap {
        /// The region's guest-physical address.
        addr: u64,
        /// What is wrong with the bitmap.
        problem: String,
    },
}

/// The name [`ram`] gives the block of the region at guest-physical address `addr`:
/// `ram@0x` and the address in lowercase hex, such as `ram@0x100000000`.
pub fn block_name(addr: GuestAddress) -> String {
    format!("ram@{:#x}", addr.0)
}

/// Guest RAM made of `memory`'s regions, without a copy: one block per region, in
/// guest-address order (block `i` is the `i`-th region of `memory.iter()`), named by
/// [`block_name`], over the region's own mapping, which the block keeps alive.
///
/// Fails on the first region that cannot be a block (see
/// [`GuestRegion::from_vm_memory`]).
pub fn ram<B>(memory: &GuestMemoryMmap<B>) -> Result<Ram, VmMemoryError>
where
    B: Bitmap + Send + Sync + 'static,
{
    let blocks = memory
        .iter()
        .map(|region| {
            let addr = region.start_addr();
            let guest =
                GuestRegion::from_vm_memory(region).map_err(|source| VmMemoryError::Region { addr: addr.0, source })?;
            Ok(RamBlock::new(block_name(addr), Arc::new(guest)))
        })
        .collect::<Result<_, _>>()?;
    Ok(Ram::new(blocks))
}

/// The writes the VMM makes through vm-memory's API, read from the regions' `AtomicBitmap`s
/// as a [`DirtyLog`]. Block ids are those of [`ram`] for the same memory.
///
/// The log takes the bitmaps over: it clears them when it is made (writes before that are not
/// reported) and on every collect, so nothing else may read-and-clear them meanwhile.
///
/// # How a collect reads and clears
///
/// Each 64-bit word of a bitmap is swapped with zero in one atomic step
/// (`AtomicBitmap::get_and_reset`, a `fetch_and(0)` per word). vm-memory marks a page with an
/// atomic `fetch_or` after the write it stands for has landed. So a mark the swap takes was made
/// after its write, and the swap, which reads that mark, makes the write visible to the page
/// copy the engine makes after the collect; a mark made after the swap stays in the bitmap for
/// the next collect. No mark is lost between reading and clearing. A write still under way
/// when its page is copied is marked once it is done, and sent again after the next collect.
///
/// Each collect allocates one `u64` per 64 bitmap pages of every region (vm-memory hands out
/// the cleared words as a vector), 1/32768 of guest RAM with 4 KiB pages.
///
/// # Bitmap pages
///
/// A bitmap counts in pages of its own size, which `AtomicBitmap` does not expose; the log
/// takes it as the bitmap's bytes divided by its bits, which is exact for the power-of-two
/// page sizes vm-memory uses (the host's page size). A bit stands for the 4 KiB pages its
/// bytes cover: several with larger bitmap pages, the one holding it with smaller ones.
#[derive(Debug)]
pub struct VmMemoryDirtyLog {
    regions: Vec<TrackedRegion>,
}

/// One region's bitmap, and how its bits map to 4 KiB pages.
#[derive(Debug)]
struct TrackedRegion {
    /// The region's mapping, which holds the bitmap.
    mapping: Arc<MmapRegion<AtomicBitmap>>,
    /// Bytes of guest memory one bit stands for.
    bit_bytes: usize,
    /// Bytes of the region.
    len: usize,
}

impl VmMemoryDirtyLog {
    /// A log over the bitmaps of `memory`'s regions, cleared now. Fails when a region's bitmap
    /// does not cover the whole region (vm-memory ignores marks past a bitmap's end, so writes
    /// there would go unseen; the default bitmap of `MmapRegionBuilder::new` is empty), or its
    /// page size cannot be told.
    pub fn new(memory: &GuestMemoryMmap<AtomicBitmap>) -> Result<Self, VmMemoryError> {
        let regions = memory
            .iter()
            .map(|region| {
                let mapping = region.get_mmap();
                let len = mapping.size();
                let bit_bytes = bit_bytes(mapping.bitmap(), len).map_err(|problem| VmMemoryError::Bitmap {
                    addr: region.start_addr().0,
                    problem,
                })?;
                mapping.bitmap().reset();
                Ok(TrackedRegion {
                    mapping,
                    bit_bytes,
                    len,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { regions })
    }
}

/// Bytes of guest memory each bit of `bitmap`, kept for a region of `len` bytes, stands for.
fn bit_bytes(bitmap: &AtomicBitmap, len: usize) -> Result<usize, String> {
    let (bits, bytes) = (bitmap.len(), bitmap.byte_size());
    if bytes < len || bits == 0 {
        return Err(format!("covers {bytes} of the region's {len} bytes"));
    }
    // `bits` is `bytes` divided by the page size, rounded up. When the quotient back is a whole
    // power of two it is the page size, or (one bit) a smaller value that, clamped to the
    // region like every bit's range, covers the same bytes.
    let page = bytes / bits;
    if page * bits != bytes || !page.is_power_of_two() {
        return Err(format!(
            "has {bits} bits for {bytes} bytes, which tells no power-of-two page size"
        ));
    }
    Ok(page)
}

impl TrackedRegion {
    /// Swaps the bitmap with zeros and hands the 4 KiB pages of its set bits to `sink` as
    /// `(first, count)` runs, in order, each page once. Returns the pages reported.
    fn drain(&self, sink: &mut dyn FnMut(u64, u64)) -> u64 {
        let words = self.mapping.bitmap().get_and_reset();
        let mut total = 0;
        // Pages `[first, end)` not yet handed on: runs of bits may share a page.
        let mut run: Option<(u64, u64)> = None;
        let mut flush = |(first, end): (u64, u64)| {
            sink(first, end - first);
            total += end - first;
        };
        word_runs(words, &mut |first_bit, bits| {
            let start = (first_bit as usize).saturating_mul(self.bit_bytes);
            if start >= self.len {
                // Past the region: never marked by its writes.
                return;
            }
            let end = ((first_bit + bits) as usize)
                .saturating_mul(self.bit_bytes)
                .min(self.len);
            let (first, last) = ((start / PAGE_SIZE) as u64, end.div_ceil(PAGE_SIZE) as u64);
            match &mut run {
                Some((_, run_end)) if first <= *run_end => *run_end = (*run_end).max(last),
                _ => {
                    if let Some(done) = run.replace((first, last)) {
                        flush(done);
                    }
                }
            }
        });
        if let Some(done) = run {
            flush(done);
        }
        total
    }
}

impl DirtyLog for VmMemoryDirtyLog {
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for (index, region) in self.regions.iter().enumerate() {
            let id = BlockId(index as u32);
            total += region.drain(&mut |first, count| sink(id, first, count));
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::vm_memory::mmap::MmapRegionBuilder;
    use ::vm_memory::{Bytes, GuestRegionMmap};
    use std::num::NonZeroUsize;
    use std::sync::atomic::{AtomicBool, Ordering};

    const PAGE: u64 = PAGE_SIZE as u64;

    fn memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap<AtomicBitmap> {
        let ranges: Vec<_> = ranges.iter().map(|&(addr, len)| (GuestAddress(addr), len)).collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("vm-memory maps guest memory")
    }

    /// Guest memory of one region of `len` bytes at 0, with `bitmap` as its bitmap.
    fn memory_with_bitmap(len: usize, bitmap: AtomicBitmap) -> GuestMemoryMmap<AtomicBitmap> {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
            .expect("mmap");
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).expect("region");
        GuestMemoryMmap::from_regions(vec![region]).expect("memory")
    }

    fn pages(log: &mut dyn DirtyLog) -> Vec<(u32, u64)> {
        let mut pages = Vec::new();
        let total = log
            .collect(&mut |block, first, count| pages.extend((first..first + count).map(|p| (block.0, p))))
            .expect("collect");
        assert_eq!(total, pages.len() as u64, "the total counts every page reported");
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, pages, "pages come in order, each once");
        pages
    }

    #[test]
    fn blocks_are_the_regions_in_address_order_over_the_same_memory() {
        let memory = memory(&[(0, 64 * PAGE_SIZE), (1 << 30, 16 * PAGE_SIZE)]);
        memory.write_slice(b"high", GuestAddress((1 << 30) + 5 * PAGE)).unwrap();
        let ram = ram(&memory).unwrap();
        let names: Vec<_> = ram.blocks().iter().map(RamBlock::name).collect();
        assert_eq!(names, ["ram@0x0", "ram@0x40000000"]);
        assert_eq!(ram.blocks()[0].len(), 64 * PAGE);
        assert_eq!(ram.blocks()[1].len(), 16 * PAGE);
        let mut bytes = [0u8; 4];
        ram.blocks()[1].region().read(5 * PAGE_SIZE, &mut bytes).unwrap();
        assert_eq!(&bytes, b"high");
        ram.blocks()[0].region().write(7, b"low").unwrap();
        let mut back = [0u8; 3];
        memory.read_slice(&mut back, GuestAddress(7)).unwrap();
        assert_eq!(&back, b"low");
    }

    #[test]
    fn a_region_that_is_not_whole_pages_is_refused() {
        let memory = memory(&[(0, 4 * PAGE_SIZE), (1 << 20, PAGE_SIZE + 8)]);
        match ram(&memory) {
            Err(VmMemoryError::Region { addr, source }) => {
                assert_eq!(addr, 1 << 20);
                assert!(matches!(source, SysError::InvalidLength { .. }));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reports_exactly_the_pages_written_through_vm_memory_once() {
        let memory = memory(&[(0, 64 * PAGE_SIZE), (1 << 30, 16 * PAGE_SIZE)]);
        // Written before the log: not reported.
        memory.write_obj(1u64, GuestAddress(9 * PAGE)).unwrap();
        let mut log = VmMemoryDirtyLog::new(&memory).unwrap();
        memory.write_obj(2u64, GuestAddress(3 * PAGE + 8)).unwrap();
        // Across a page boundary: both pages.
        memory.write_slice(&[7; 16], GuestAddress(5 * PAGE - 8)).unwrap();
        memory.write_obj(3u32, GuestAddress(63 * PAGE)).unwrap();
        memory
            .write_slice(&[1; 3 * PAGE_SIZE], GuestAddress((1 << 30) + 13 * PAGE))
            .unwrap();
        assert_eq!(
            pages(&mut log),
            [(0, 3), (0, 4), (0, 5), (0, 63), (1, 13), (1, 14), (1, 15)]
        );
        assert!(pages(&mut log).is_empty());
        // Reads mark nothing.
        let _: u64 = memory.read_obj(GuestAddress(3 * PAGE)).unwrap();
        assert!(pages(&mut log).is_empty());
        memory.write_obj(4u8, GuestAddress(0)).unwrap();
        assert_eq!(pages(&mut log), [(0, 0)]);
    }

    #[test]
    fn bitmap_pages_of_other_sizes_map_to_the_4k_pages_they_cover() {
        let small = memory_with_bitmap(
            8 * PAGE_SIZE,
            AtomicBitmap::new(8 * PAGE_SIZE, NonZeroUsize::new(512).unwrap()),
        );
        let mut log = VmMemoryDirtyLog::new(&small).unwrap();
        small.write_obj(1u64, GuestAddress(2 * PAGE + 600)).unwrap();
        small.write_obj(1u64, GuestAddress(2 * PAGE + 3000)).unwrap();
        small.write_obj(1u64, GuestAddress(3 * PAGE)).unwrap();
        small.write_obj(1u64, GuestAddress(7 * PAGE + 4000)).unwrap();
        assert_eq!(pages(&mut log), [(0, 2), (0, 3), (0, 7)]);

        let large = memory_with_bitmap(
            8 * PAGE_SIZE,
            AtomicBitmap::new(8 * PAGE_SIZE, NonZeroUsize::new(4 * PAGE_SIZE).unwrap()),
        );
        let mut log = VmMemoryDirtyLog::new(&large).unwrap();
        large.write_obj(1u64, GuestAddress(5 * PAGE)).unwrap();
        assert_eq!(pages(&mut log), [(0, 4), (0, 5), (0, 6), (0, 7)]);
    }

    #[test]
    fn a_bitmap_that_does_not_cover_its_region_is_refused() {
        let empty = memory_with_bitmap(4 * PAGE_SIZE, AtomicBitmap::default());
        assert!(matches!(
            VmMemoryDirtyLog::new(&empty),
            Err(VmMemoryError::Bitmap { addr: 0, .. })
        ));
        let short = memory_with_bitmap(
            4 * PAGE_SIZE,
            AtomicBitmap::new(2 * PAGE_SIZE, NonZeroUsize::new(PAGE_SIZE).unwrap()),
        );
        assert!(VmMemoryDirtyLog::new(&short).is_err());
        let odd = memory_with_bitmap(
            3 * PAGE_SIZE,
            AtomicBitmap::new(3 * PAGE_SIZE, NonZeroUsize::new(2 * PAGE_SIZE).unwrap()),
        );
        assert!(VmMemoryDirtyLog::new(&odd).is_err());
    }

    /// A device thread writes every page once through vm-memory while the log is collected
    /// and every reported page copied to a shadow, as precopy does: once the writes stop and a
    /// last collect is copied, the shadow equals the memory. As no page is written twice, a
    /// mark lost between reading and clearing the bitmap leaves a page stale: reading the
    /// words and then storing zeros (`clone` then `reset`) failed 5 runs of 6 here, with 3 to 5
    /// stale pages.
    #[test]
    fn no_write_racing_with_collect_is_lost() {
        const PAGES: usize = 8192;
        let memory = memory(&[(0, PAGES * PAGE_SIZE)]);
        let ram = ram(&memory).unwrap();
        let region = Arc::clone(ram.blocks()[0].region());
        // Fault every page in first, so writes are quick and many land during collects.
        region.fill(0, region.len(), 0).unwrap();
        let mut log = VmMemoryDirtyLog::new(&memory).unwrap();
        let mut shadow = vec![0u8; region.len()];
        let done = AtomicBool::new(false);
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            let device = scope.spawn(|| {
                start.wait();
                for page in 0..PAGES as u64 {
                    // Every page once, in an order that is not the bitmap's.
                    let page = page * 7919 % PAGES as u64;
                    memory.write_obj(page + 1, GuestAddress(page * PAGE + 8)).unwrap();
                }
                done.store(true, Ordering::Release);
            });
            let mut copy = |log: &mut VmMemoryDirtyLog| {
                log.collect(&mut |_, first, count| {
                    let range = first as usize * PAGE_SIZE..(first + count) as usize * PAGE_SIZE;
                    region.read(range.start, &mut shadow[range]).unwrap();
                })
                .unwrap()
            };
            start.wait();
            loop {
                let finished = done.load(Ordering::Acquire);
                copy(&mut log);
                if finished {
                    break;
                }
            }
            device.join().unwrap();
        });
        let mut now = vec![0u8; region.len()];
        region.read(0, &mut now).unwrap();
        let stale = (0..PAGES)
            .filter(|&p| shadow[p * PAGE_SIZE..][..PAGE_SIZE] != now[p * PAGE_SIZE..][..PAGE_SIZE])
            .count();
        assert_eq!(stale, 0, "pages written during a collect were not reported");
    }
}
