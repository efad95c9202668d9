//! [`WriteTracker`]: the kernel-tracked write log of one [`GuestRegion`].
//!
//! The region is registered with a userfaultfd in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED` (plus `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
//! when the kernel offers it, which `MAP_SHARED` shmem and hugetlbfs regions need). In async
//! mode the kernel resolves a write to a protected page itself: it unprotects the page and marks
//! it `PAGE_IS_WRITTEN`, with no handler thread (about 0.8 µs per first write here).
//! [`WriteTracker::collect`] reads and clears those marks with `PAGEMAP_SCAN`
//! (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category and return mask
//! `PAGE_IS_WRITTEN`): every written page is reported and write-protected again in one ioctl.
//!
//! Notes from this machine (Linux 6.18):
//! - Right after registration every page reads as written. [`WriteTracker::new`]
//!   write-protects the whole range with `UFFDIO_WRITEPROTECT` (with `WP_UNPOPULATED` that
//!   marks unpopulated entries too), so the first collect reports only later writes.
//! - `PAGEMAP_SCAN` stops at `walk_end` when its output vector is full; the pages past it are
//!   neither reported nor re-protected. `collect` loops until the walk reaches the end.
//! - The `UFFDIO_API` answer lists every feature the kernel offers, not the ones enabled, and
//!   the kernel silently enables `WP_UNPOPULATED` with `WP_ASYNC`. A descriptor takes only one
//!   handshake, so the offered features are probed on a throwaway descriptor first.
//! - Tracking is per page table: it sees writes made through this process's mapping (by any
//!   of its threads, or by the kernel on its behalf, since the descriptor is not
//!   `UFFD_USER_MODE_ONLY`), not writes another process makes through its own mapping of the
//!   same file.
//! - A write to a write-protected transparent huge page splits it, so reports stay exact at
//!   4 KiB (tested). On hugetlbfs (not tested here) a run covers whole huge pages, and every
//!   4 KiB page in it is reported.

use std::sync::Arc;

use crate::pagemap::{PageRegion, Pagemap, ScanRequest};
use crate::uffd::{UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED, Userfaultfd};
use crate::{GuestRegion, PAGE_SIZE, SysError};

/// Default number of `page_region` entries in the output vector of one scan.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Kernel-tracked write log of one [`GuestRegion`] (userfaultfd async write-protect, collected
/// with `PAGEMAP_SCAN`). Dropping it unregisters the range.
#[derive(Debug)]
pub struct WriteTracker {
    /// The async write-protect descriptor the region is registered with.
    uffd: Userfaultfd,
    /// `/proc/self/pagemap`, read-only, for `PAGEMAP_SCAN`.
    pagemap: Pagemap,
    /// The tracked region; held so it stays mapped while registered.
    region: Arc<GuestRegion>,
    /// The output vector of one scan.
    out: Vec<PageRegion>,
}

impl WriteTracker {
    /// Starts tracking writes to the whole region. The first [`collect`](Self::collect)
    /// reports exactly the pages written after this returns.
    pub fn new(region: Arc<GuestRegion>) -> Result<Self, SysError> {
        Self::with_capacity(region, DEFAULT_CAPACITY)
    }

    /// Same as [`new`](Self::new), with an output vector of `capacity` runs per scan (at least
    /// one). A small vector costs more ioctls per collect, never lost pages.
    pub fn with_capacity(region: Arc<GuestRegion>, capacity: usize) -> Result<Self, SysError> {
        let offered = Userfaultfd::available_features()?;
        if offered & UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(SysError::Unsupported("UFFD_FEATURE_WP_ASYNC"));
        }
        if offered & UFFD_FEATURE_WP_UNPOPULATED == 0 {
            return Err(SysError::Unsupported("UFFD_FEATURE_WP_UNPOPULATED"));
        }
        let shmem = offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        if region.is_shared() && shmem == 0 {
            return Err(SysError::Unsupported("UFFD_FEATURE_WP_HUGETLBFS_SHMEM"));
        }
        let uffd = Userfaultfd::new(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | shmem)?;
        let pagemap = Pagemap::open_self()?;
        uffd.register_write_protect(region.addr(), region.len())?;
        // From here on, `Drop` unregisters if anything fails.
        let tracker = Self {
            uffd,
            pagemap,
            region,
            out: vec![PageRegion::default(); capacity.max(1)],
        };
        tracker
            .uffd
            .write_protect(tracker.region.addr(), tracker.region.len(), true)?;
        Ok(tracker)
    }

    /// The tracked region.
    pub fn region(&self) -> &Arc<GuestRegion> {
        &self.region
    }

    /// Collects the pages written since the last collect (or since [`new`](Self::new)),
    /// write-protecting them again in the same ioctl, and calls `sink(first_page, page_count)`
    /// for every run of written [`PAGE_SIZE`] pages, page indices relative to the region
    /// start. Returns the number of pages reported.
    ///
    /// A page written while the collect runs is reported now or by the next collect, never
    /// lost. If this fails part way, some pages may have been reported and re-protected, and
    /// the rest are still marked written; a caller that cannot tell which should treat the
    /// whole region as dirty.
    pub fn collect(&mut self, sink: &mut dyn FnMut(u64, u64)) -> Result<u64, SysError> {
        let base = self.region.addr() as u64;
        let end = base + self.region.len() as u64;
        let page = PAGE_SIZE as u64;
        let mut request = ScanRequest::collect_written(base, end);
        let mut total = 0;
        loop {
            let scan = self.pagemap.scan(&request, &mut self.out)?;
            for run in &self.out[..scan.regions] {
                // The kernel reports runs inside [start, end); clamp anyway so a surprise
                // cannot become an out-of-range page index.
                let start = run.start.clamp(base, end);
                let stop = run.end.clamp(start, end);
                let first = (start - base) / page;
                let count = (stop - base).div_ceil(page) - first;
                if count > 0 {
                    sink(first, count);
                    total += count;
                }
            }
            if scan.walk_end >= end {
                return Ok(total);
            }
            if scan.walk_end <= request.start {
                return Err(SysError::Os {
                    op: "PAGEMAP_SCAN",
                    source: std::io::Error::other("the walk made no progress"),
                });
            }
            request.start = scan.walk_end;
        }
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        // Errors are ignored: closing the descriptor right after unregisters the range too.
        let _ = self.uffd.unregister(self.region.addr(), self.region.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::PAGE_IS_HUGE;
    use crate::test_util::ShmFile;
    use std::collections::BTreeSet;

    const MIB: usize = 1 << 20;

    /// Collects into a set, checking that no run reaches past the region.
    fn collect_set(tracker: &mut WriteTracker) -> BTreeSet<u64> {
        let pages = tracker.region().pages() as u64;
        let mut set = BTreeSet::new();
        let n = tracker
            .collect(&mut |first, count| {
                assert!(count > 0 && first + count <= pages, "run {first}+{count}");
                set.extend(first..first + count);
            })
            .unwrap();
        assert_eq!(n, set.len() as u64, "a page was reported twice in one collect");
        set
    }

    /// A deterministic scattered set of `n` pages below `pages`, with some adjacent runs.
    fn scattered(n: usize, pages: u64, seed: u64) -> BTreeSet<u64> {
        let mut x = seed | 1;
        let mut set = BTreeSet::new();
        while set.len() < n {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % pages;
            set.insert(p);
            // Every eighth pick also takes a run of up to three neighbours.
            if x % 8 == 0 {
                for q in p + 1..(p + 4).min(pages) {
                    if set.len() < n {
                        set.insert(q);
                    }
                }
            }
        }
        set
    }

    fn touch(region: &GuestRegion, pages: &BTreeSet<u64>, byte: u8) {
        for &p in pages {
            // Write one byte in the middle of the page: enough to dirty it.
            region.write(p as usize * PAGE_SIZE + 100, &[byte]).unwrap();
        }
    }

    /// Number of 4 KiB pages of `region` that are part of a huge page.
    fn huge_pages(region: &GuestRegion) -> u64 {
        let pagemap = Pagemap::open_self().unwrap();
        let base = region.addr() as u64;
        let request = ScanRequest {
            start: base,
            end: base + region.len() as u64,
            category_mask: PAGE_IS_HUGE,
            return_mask: PAGE_IS_HUGE,
            ..ScanRequest::default()
        };
        let mut out = vec![PageRegion::default(); region.pages()];
        let scan = pagemap.scan(&request, &mut out).unwrap();
        out[..scan.regions].iter().map(|r| (r.end - r.start) / 4096).sum()
    }

    fn exact_set_on(region: Arc<GuestRegion>) {
        // Pages written before tracking starts must not be reported.
        region.fill(0, 16 * PAGE_SIZE, 0xCC).unwrap();
        let mut tracker = WriteTracker::new(Arc::clone(&region)).unwrap();
        assert!(collect_set(&mut tracker).is_empty());

        let pages = region.pages() as u64;
        let written = scattered(1000, pages, 0x9E37_79B9_7F4A_7C15);
        touch(&region, &written, 1);
        // Reads never count as writes.
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in (0..pages).step_by(97) {
            region.read(p as usize * PAGE_SIZE, &mut buf).unwrap();
        }
        assert_eq!(collect_set(&mut tracker), written);
        assert!(collect_set(&mut tracker).is_empty());

        // Writes after a collect show up in the next one, including re-writes of pages
        // already reported once.
        let again: BTreeSet<u64> = written.iter().copied().step_by(3).chain([0, pages - 1]).collect();
        touch(&region, &again, 2);
        region.fill(5 * PAGE_SIZE, 3 * PAGE_SIZE, 9).unwrap();
        let mut expected = again;
        expected.extend([5, 6, 7]);
        assert_eq!(collect_set(&mut tracker), expected);
        assert!(collect_set(&mut tracker).is_empty());
    }

    #[test]
    fn reports_exactly_the_written_pages() {
        exact_set_on(Arc::new(GuestRegion::anonymous(64 * MIB).unwrap()));
    }

    #[test]
    fn works_on_a_shared_shm_file() {
        let shm = ShmFile::new(64 * MIB as u64);
        let region = GuestRegion::shared_file(&shm.file, 64 * MIB).unwrap();
        exact_set_on(Arc::new(region));
    }

    #[test]
    fn stays_exact_on_transparent_huge_pages() {
        // Populated before tracking, so THP (in madvise mode here) may back it with 2 MiB pages.
        let region = Arc::new(GuestRegion::anonymous(16 * MIB).unwrap());
        region.populate_write(0, region.len()).unwrap();
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| !mode.contains("[never]"));
        if thp {
            let huge = huge_pages(&region);
            assert!(huge > 0, "expected THP to back a populated MADV_HUGEPAGE region");
        }
        let mut tracker = WriteTracker::new(Arc::clone(&region)).unwrap();
        assert!(collect_set(&mut tracker).is_empty());
        let written: BTreeSet<u64> = [1, 511, 512, 513, 2000, 4095].into();
        touch(&region, &written, 3);
        assert_eq!(collect_set(&mut tracker), written);
        assert!(collect_set(&mut tracker).is_empty());
    }

    #[test]
    fn loops_past_a_full_output_vector() {
        let region = Arc::new(GuestRegion::anonymous(4 * MIB).unwrap());
        let mut tracker = WriteTracker::with_capacity(Arc::clone(&region), 4).unwrap();
        // 100 non-adjacent pages: 100 runs, 25 times the vector's capacity.
        let written: BTreeSet<u64> = (0..100).map(|i| 2 * i + 7).collect();
        touch(&region, &written, 1);
        let (mut calls, mut sum) = (0, 0);
        let n = tracker
            .collect(&mut |_, count| {
                calls += 1;
                sum += count;
            })
            .unwrap();
        assert_eq!((n, calls, sum), (100, 100, 100));
        // Everything was re-protected, including pages past the first walk_end.
        assert!(collect_set(&mut tracker).is_empty());
        touch(&region, &written, 2);
        assert_eq!(collect_set(&mut tracker), written);
        assert!(collect_set(&mut tracker).is_empty());
    }

    /// The trap `collect` loops around, shown on the raw ioctl: a scan whose output vector
    /// fills up stops at `walk_end`, and the pages past it stay marked written.
    #[test]
    fn one_scan_stops_at_walk_end() {
        let region = Arc::new(GuestRegion::anonymous(4 * MIB).unwrap());
        let tracker = WriteTracker::new(Arc::clone(&region)).unwrap();
        let written: Vec<u64> = (0..20).map(|i| 2 * i + 7).collect();
        for &p in &written {
            region.fill(p as usize * PAGE_SIZE, 1, 1).unwrap();
        }
        let base = region.addr() as u64;
        let request = ScanRequest::collect_written(base, base + region.len() as u64);
        let mut out = [PageRegion::default(); 4];
        let first = tracker.pagemap.scan(&request, &mut out).unwrap();
        assert_eq!(first.regions, 4);
        assert!(first.walk_end < request.end);
        let starts: Vec<u64> = out.iter().map(|r| (r.start - base) / 4096).collect();
        assert_eq!(starts, written[..4]);
        // A fresh scan from the start finds the rest, still unprotected.
        let mut out = [PageRegion::default(); 64];
        let second = tracker.pagemap.scan(&request, &mut out).unwrap();
        assert_eq!(second.walk_end, request.end);
        let starts: Vec<u64> = out[..second.regions].iter().map(|r| (r.start - base) / 4096).collect();
        assert_eq!(starts, written[4..]);
    }

    #[test]
    fn reports_whole_runs() {
        let region = Arc::new(GuestRegion::anonymous(8 * MIB).unwrap());
        let mut tracker = WriteTracker::with_capacity(Arc::clone(&region), 2).unwrap();
        region.fill(10 * PAGE_SIZE, 600 * PAGE_SIZE, 1).unwrap();
        region.fill(1000 * PAGE_SIZE + 1, 1, 1).unwrap();
        let mut runs = Vec::new();
        let n = tracker.collect(&mut |first, count| runs.push((first, count))).unwrap();
        assert_eq!(n, 601);
        assert_eq!(runs, [(10, 600), (1000, 1)]);
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        const WRITERS: u64 = 4;
        let region = Arc::new(GuestRegion::anonymous(32 * MIB).unwrap());
        let mut tracker = WriteTracker::with_capacity(Arc::clone(&region), 16).unwrap();
        let pages = region.pages() as u64;
        let all = scattered(4000, pages, 0xD1B5_4A32_D192_ED03);
        let mut seen = BTreeSet::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..WRITERS)
                .map(|w| {
                    // Writer `w` owns the pages congruent to `w` modulo WRITERS.
                    let mine: Vec<u64> = all.iter().copied().filter(|p| p % WRITERS == w).collect();
                    let region = &region;
                    s.spawn(move || {
                        for p in mine {
                            region.fill(p as usize * PAGE_SIZE, PAGE_SIZE, w as u8 + 1).unwrap();
                        }
                    })
                })
                .collect();
            while !handles.iter().all(|h| h.is_finished()) {
                tracker
                    .collect(&mut |first, count| seen.extend(first..first + count))
                    .unwrap();
            }
        });
        seen.extend(collect_set(&mut tracker));
        assert_eq!(seen, all);
        assert!(collect_set(&mut tracker).is_empty());
    }

    #[test]
    fn drop_unregisters_so_a_new_tracker_can_register() {
        let region = Arc::new(GuestRegion::anonymous(MIB).unwrap());
        let first = WriteTracker::new(Arc::clone(&region)).unwrap();
        // The range is taken while the first tracker lives.
        assert!(WriteTracker::new(Arc::clone(&region)).is_err());
        drop(first);
        let mut second = WriteTracker::new(Arc::clone(&region)).unwrap();
        region.fill(3 * PAGE_SIZE, 1, 1).unwrap();
        assert_eq!(collect_set(&mut second), BTreeSet::from([3]));
    }
}
