//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7+).
//!
//! One call walks a range of the process's page tables, reports runs of pages whose category
//! bits match, and with [`PM_SCAN_WP_MATCHING`] write-protects the matching pages in the same
//! pass (the collect-and-clear step of userfaultfd write tracking). The ABI is from
//! `linux/fs.h`, checked on this machine's Linux 6.18.
//!
//! The trap: when the output vector fills up, the walk stops at `walk_end`; pages past it are
//! neither reported nor re-protected. Callers loop from `walk_end` until it reaches `end`.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::SysError;
use crate::uffd::{IOC_READ, IOC_WRITE, ioc};

/// Page category: the page may be write-protected by userfaultfd (async WP registered).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Page category: the page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Page category: file-backed page.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// Page category: present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Page category: swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Page category: maps the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Page category: part of a huge page.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// Page category: soft-dirty (never set on this machine's kernel: no `CONFIG_MEM_SOFT_DIRTY`).
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// Scan flag: write-protect the pages that match.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Scan flag: fail with `EPERM` unless the whole range is registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// One run of pages in the output vector (`struct page_region`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte address of the run.
    pub start: u64,
    /// One past the last byte address of the run.
    pub end: u64,
    /// The run's categories, masked by the request's `return_mask`.
    pub categories: u64,
}

/// The ioctl argument (`struct pm_scan_arg`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = ioc(IOC_READ | IOC_WRITE, b'f' as u32, 16, size_of::<PmScanArg>());

const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// What to look for in one scan; the fields mirror `struct pm_scan_arg`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanRequest {
    /// First byte address to walk (page aligned).
    pub start: u64,
    /// One past the last byte address to walk (page aligned).
    pub end: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories whose meaning is inverted before matching.
    pub category_inverted: u64,
    /// A page matches only if it has all of these categories.
    pub category_mask: u64,
    /// ... and at least one of these (0: no such condition).
    pub category_anyof_mask: u64,
    /// Categories to report in [`PageRegion::categories`].
    pub return_mask: u64,
}

impl ScanRequest {
    /// Collects the pages written in `start..end` and write-protects them
    /// again in the same walk (the dirty-log scan of a `WP_ASYNC` range).
    pub fn collect_written(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Self::default()
        }
    }
}

/// The outcome of one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Number of entries of the output vector filled.
    pub regions: usize,
    /// Where the walk stopped: `end` when it finished, earlier when the output vector (or
    /// `max_pages`) ran out.
    pub walk_end: u64,
}

/// An `O_RDONLY` handle on `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    /// The open pagemap file.
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` read-only.
    pub fn open_self() -> Result<Self, SysError> {
        let file = File::open("/proc/self/pagemap").map_err(|source| SysError::Os {
            op: "open /proc/self/pagemap",
            source,
        })?;
        Ok(Self { file })
    }

    /// Runs one `PAGEMAP_SCAN` over `request`, filling `out` from its start.
    ///
    /// Fails with [`SysError::Unsupported`] on kernels without the ioctl.
    pub fn scan(&self, request: &ScanRequest, out: &mut [PageRegion]) -> Result<Scan, SysError> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: request.flags,
            start: request.start,
            end: request.end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: request.max_pages,
            category_inverted: request.category_inverted,
            category_mask: request.category_mask,
            category_anyof_mask: request.category_anyof_mask,
            return_mask: request.return_mask,
        };
        // SAFETY: `arg` is a `struct pm_scan_arg` (size checked above), the argument of
        // PAGEMAP_SCAN; its `vec`/`vec_len` describe `out`, which we borrow exclusively, so
        // the kernel writes at most `out.len()` `struct page_region`s inside it. The walk
        // reads page tables; with PM_SCAN_WP_MATCHING it also write-protects pages, which
        // changes no memory: on an async-WP range the kernel resolves later writes itself,
        // and PM_SCAN_CHECK_WPASYNC (when set) refuses any other range.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PAGEMAP_SCAN as libc::Ioctl,
                std::ptr::from_mut(&mut arg),
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOTTY) {
                return Err(SysError::Unsupported("PAGEMAP_SCAN"));
            }
            return Err(SysError::Os {
                op: "PAGEMAP_SCAN",
                source: err,
            });
        }
        let regions = (rc as usize).min(out.len());
        Ok(Scan {
            regions,
            walk_end: arg.walk_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestRegion, PAGE_SIZE};

    #[test]
    fn reports_present_pages_without_protecting() {
        let region = GuestRegion::anonymous(64 * PAGE_SIZE).unwrap();
        for page in [3usize, 4, 5, 40] {
            region.fill(page * PAGE_SIZE, 1, 1).unwrap();
        }
        let pagemap = Pagemap::open_self().unwrap();
        let base = region.addr() as u64;
        let request = ScanRequest {
            start: base,
            end: base + region.len() as u64,
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT,
            ..ScanRequest::default()
        };
        let mut out = [PageRegion::default(); 8];
        let scan = pagemap.scan(&request, &mut out).unwrap();
        assert_eq!(scan.walk_end, request.end);
        // THP may back the region with one huge page; then the whole region is present.
        let pages: Vec<(u64, u64)> = out[..scan.regions]
            .iter()
            .map(|r| ((r.start - base) / 4096, (r.end - r.start) / 4096))
            .collect();
        assert!(
            pages == [(3, 3), (40, 1)] || pages == [(0, 64)],
            "present runs {pages:?}"
        );
    }

    #[test]
    fn wp_matching_refuses_unregistered_memory() {
        let region = GuestRegion::anonymous(4 * PAGE_SIZE).unwrap();
        let pagemap = Pagemap::open_self().unwrap();
        let base = region.addr() as u64;
        let request = ScanRequest::collect_written(base, base + region.len() as u64);
        let mut out = [PageRegion::default(); 4];
        assert!(matches!(
            pagemap.scan(&request, &mut out),
            Err(SysError::Os { op: "PAGEMAP_SCAN", .. })
        ));
    }
}
