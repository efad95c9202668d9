//! What the guest's threads share: RAM blocks addressed by global page index, the generation
//! table, the write counter and the run control.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use migration_sys::{GuestRegion, PAGE_SIZE, SysError};

use crate::CheckReport;
use crate::content::fill_content;
use crate::spec::GuestSpec;
use crate::state::WriterState;
use crate::verify::Verification;

/// The generation of a page whose content is not known (not populated, never rewritten).
pub const UNKNOWN_GENERATION: u32 = u32::MAX;

/// Whether the writers may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Running,
    Paused,
    Stopping,
}

/// The run control, under one mutex.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) mode: Mode,
    /// Bumped by every pause; a writer parks once per epoch.
    pub(crate) epoch: u64,
    /// Writers parked in the current epoch.
    pub(crate) parked: usize,
    /// Writer threads that exited after a failure.
    pub(crate) dead: usize,
    /// Writer threads spawned.
    pub(crate) threads: usize,
    pub(crate) throttle: u8,
    /// Each writer's state as of its last batch boundary.
    pub(crate) writers: Vec<WriterState>,
    pub(crate) report: Option<CheckReport>,
    pub(crate) failure: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    blocks: Vec<Arc<GuestRegion>>,
    /// Global index of each block's first page, then the total.
    starts: Vec<u64>,
    pub(crate) table: Vec<AtomicU32>,
    pub(crate) writes: AtomicU64,
    pub(crate) control: Mutex<Control>,
    pub(crate) changed: Condvar,
    /// Set whenever the writers should stop between pages (pause, stop).
    pub(crate) interrupt: AtomicBool,
    /// Set when the guest is being dropped.
    pub(crate) stopping: AtomicBool,
    pub(crate) progress: Mutex<()>,
    pub(crate) progressed: Condvar,
    /// When the guest first completed an access to its memory after it started (on a
    /// destination: the first page verified, by whichever thread got to one first).
    pub(crate) first_access: std::sync::OnceLock<std::time::Instant>,
    /// A destination's first-run check: who checks which page, and the tally. `None` on a
    /// source, whose writers then never look at it.
    pub(crate) verification: Option<Verification>,
}

impl Shared {
    /// A source's shared state over `blocks`, every page of unknown content.
    pub(crate) fn source(blocks: Vec<Arc<GuestRegion>>) -> Self {
        Self::new(blocks, false)
    }

    /// A destination's: like [`Shared::source`], and it checks every page on its first run.
    pub(crate) fn destination(blocks: Vec<Arc<GuestRegion>>) -> Self {
        Self::new(blocks, true)
    }

    fn new(blocks: Vec<Arc<GuestRegion>>, destination: bool) -> Self {
        let mut starts = Vec::with_capacity(blocks.len() + 1);
        let mut total = 0u64;
        for b in &blocks {
            starts.push(total);
            total += (b.len() / PAGE_SIZE) as u64;
        }
        starts.push(total);
        let table = (0..total).map(|_| AtomicU32::new(UNKNOWN_GENERATION)).collect();
        Self {
            blocks,
            starts,
            table,
            writes: AtomicU64::new(0),
            control: Mutex::new(Control {
                mode: Mode::Paused,
                epoch: 0,
                parked: 0,
                dead: 0,
                threads: 0,
                throttle: 0,
                writers: Vec::new(),
                report: None,
                failure: None,
            }),
            changed: Condvar::new(),
            interrupt: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            progress: Mutex::new(()),
            progressed: Condvar::new(),
            first_access: std::sync::OnceLock::new(),
            verification: destination.then(|| Verification::new(total)),
        }
    }

    pub(crate) fn pages(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The control, even if a thread panicked while holding it (its fields stay consistent:
    /// every update is a single assignment).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (block, page within block) of a global page index below [`Shared::pages`].
    pub(crate) fn locate(&self, page: u64) -> (usize, u64) {
        let block = self.starts.partition_point(|&s| s <= page) - 1;
        (block, page - self.starts[block])
    }

    pub(crate) fn write_page(&self, page: u64, buf: &[u8; PAGE_SIZE]) -> Result<(), SysError> {
        let (block, index) = self.locate(page);
        self.blocks[block].write(index as usize * PAGE_SIZE, buf)
    }

    pub(crate) fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SysError> {
        let (block, index) = self.locate(page);
        self.blocks[block].read(index as usize * PAGE_SIZE, buf)
    }

    /// Whether `page` is resident now (false: an access would wait for it to arrive, or fault
    /// it in). `scratch` is reused across calls to save an allocation.
    pub(crate) fn is_resident(&self, page: u64, scratch: &mut Vec<bool>) -> Result<bool, SysError> {
        let (block, index) = self.locate(page);
        scratch.clear();
        self.blocks[block].resident(index as usize * PAGE_SIZE, PAGE_SIZE, scratch)?;
        Ok(scratch.first().copied().unwrap_or(true))
    }

    /// Tells whoever waits in [`crate::SyntheticGuest::wait_writes`] that writes moved on.
    pub(crate) fn notify_progress(&self) {
        drop(self.progress.lock().unwrap_or_else(|e| e.into_inner()));
        self.progressed.notify_all();
    }

    /// Writes generation 0 of `pages` (a range of global pages) and records it.
    pub(crate) fn populate(&self, spec: &GuestSpec, pages: std::ops::Range<u64>) -> Result<(), SysError> {
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for page in pages {
            fill_content(spec.seed, page, 0, spec.content, &mut buf);
            self.write_page(page, &buf)?;
            self.table[page as usize].store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Compares every page with the content its generation says it holds. Returns `None` if
    /// the guest is dropped meanwhile.
    pub(crate) fn check(&self, spec: &GuestSpec) -> Option<CheckReport> {
        let mut report = CheckReport::default();
        let mut actual = Box::new([0u8; PAGE_SIZE]);
        let mut expected = Box::new([0u8; PAGE_SIZE]);
        for (page, generation) in self.table.iter().enumerate() {
            if page % 256 == 0 && self.stopping.load(Ordering::Relaxed) {
                return None;
            }
            let generation = generation.load(Ordering::Acquire);
            if generation == UNKNOWN_GENERATION {
                report.pages_unknown += 1;
                continue;
            }
            report.pages_checked += 1;
            let page = page as u64;
            fill_content(spec.seed, page, generation, spec.content, &mut expected);
            let same = self.read_page(page, &mut actual).is_ok() && actual == expected;
            self.first_access.get_or_init(std::time::Instant::now);
            if !same {
                report.mismatches += 1;
                report.first_mismatch.get_or_insert(self.locate(page));
            }
        }
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_walks_blocks_of_different_sizes() {
        let blocks = [3usize, 1, 2]
            .iter()
            .map(|&n| Arc::new(GuestRegion::anonymous(n * PAGE_SIZE).unwrap()))
            .collect();
        let shared = Shared::source(blocks);
        assert_eq!(shared.pages(), 6);
        let located: Vec<_> = (0..6).map(|p| shared.locate(p)).collect();
        assert_eq!(located, [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]);
    }
}
