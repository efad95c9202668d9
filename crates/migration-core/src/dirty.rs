//! Dirty logs: where the engine learns which pages were written since the
//! last sync.
//!
//! Backends, chosen by what the VMM has:
//! - [`KernelDirtyLog`]: the kernel tracks every write to process memory
//!   (userfaultfd write-protect in async mode, collected with
//!   `PAGEMAP_SCAN`); nobody has to cooperate;
//! - [`SoftwareDirtyLog`]: a bitmap the VMM marks itself, for writes its
//!   emulated devices make;
//! - [`KvmDirtyLog`]: KVM's log of what its vCPUs wrote into guest RAM
//!   slots (`KVM_GET_DIRTY_LOG`, with `KVM_CLEAR_DIRTY_LOG` where the kernel
//!   offers manual protect);
//! - [`CombinedDirtyLog`]: several logs ORed together.

use crate::bitmap::{AtomicBitmap, word_runs};
use crate::ram::{BlockId, Ram};
use migration_sys::{KvmVm, SysError, WriteTracker};
use std::sync::Arc;

/// Why a dirty log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The kernel refused.
    #[error("kernel dirty tracking failed")]
    Sys(#[from] SysError),
    /// The backend failed otherwise.
    #[error("{0}")]
    Backend(String),
}

/// Receives the runs of pages a dirty log reports: `(block, first page, count)`.
pub type DirtySink<'a> = dyn FnMut(BlockId, u64, u64) + 'a;

/// A source of "which pages were written since the last collect".
///
/// `collect` hands every page written since the previous call (or since the
/// log was created) to the sink exactly as the log knows it, and clears the
/// log in the same step: a write that races with `collect` is reported by
/// this call or by the next one, never lost.
pub trait DirtyLog: Send {
    /// Reports and clears the pages written since the last call. Returns
    /// the number of pages reported.
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError>;
}

/// The kernel's own write tracking of every block.
#[derive(Debug)]
pub struct KernelDirtyLog {
    trackers: Vec<WriteTracker>,
}

impl KernelDirtyLog {
    /// Starts tracking writes to every block of `ram`. Writes made before
    /// this returns are not reported.
    pub fn start(ram: &Ram) -> Result<Self, DirtyLogError> {
        let trackers = ram
            .blocks()
            .iter()
            .map(|block| WriteTracker::new(Arc::clone(block.region())))
            .collect::<Result<_, _>>()?;
        Ok(Self { trackers })
    }
}

impl DirtyLog for KernelDirtyLog {
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for (index, tracker) in self.trackers.iter_mut().enumerate() {
            let id = BlockId(index as u32);
            total += tracker.collect(&mut |first, count| sink(id, first, count))?;
        }
        Ok(total)
    }
}

/// A dirty bitmap per block that the VMM marks for the writes it makes
/// itself (emulated DMA, device models). Cloning shares the bitmaps.
#[derive(Debug, Clone)]
pub struct SoftwareDirtyLog {
    maps: Arc<Vec<AtomicBitmap>>,
}

impl SoftwareDirtyLog {
    /// A clear log sized for `ram`.
    pub fn new(ram: &Ram) -> Self {
        Self {
            maps: Arc::new(ram.blocks().iter().map(|b| AtomicBitmap::new(b.pages())).collect()),
        }
    }

    /// Marks `count` pages from `first` of `block` as written. Marks outside
    /// the block are ignored.
    pub fn mark(&self, block: BlockId, first: u64, count: u64) {
        if let Some(map) = self.maps.get(block.0 as usize) {
            for page in first..first.saturating_add(count).min(map.len()) {
                map.set(page);
            }
        }
    }
}

impl DirtyLog for SoftwareDirtyLog {
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for (index, map) in self.maps.iter().enumerate() {
            let id = BlockId(index as u32);
            total += map.drain(&mut |first, count| sink(id, first, count));
        }
        Ok(total)
    }
}

/// What KVM's vCPUs wrote into the slots of a VM that are RAM blocks.
///
/// Starting it turns dirty logging on for every slot whose memory is a
/// block of the RAM (the same [`migration_sys::GuestRegion`]), with the
/// manual-protect protocol where the kernel offers it; dropping it turns
/// logging off again, so a guest that stays on the source after a failed
/// migration stops paying for write-protect faults.
///
/// A `collect` reads each slot's bitmap, reports it, and then clears those
/// bits (write-protecting the pages again) before it returns. A vCPU write
/// between the read and the clear lands before the page is read for
/// sending, which happens after `collect` returns; a write after the clear
/// faults and is logged for the next call. Writes the VMM makes itself
/// (emulated devices) are not in KVM's log: combine this with a
/// [`SoftwareDirtyLog`] for those.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<KvmVm>,
    /// (slot id, block) of every logged slot.
    slots: Vec<(u32, BlockId)>,
    manual: bool,
    bitmap: Vec<u64>,
}

impl KvmDirtyLog {
    /// Starts logging the writes to every slot of `vm` that maps a block of
    /// `ram`. A slot that is no block is refused: its pages could not be
    /// named on the wire. Writes before this returns are not reported.
    pub fn start(vm: Arc<KvmVm>, ram: &Ram) -> Result<Self, DirtyLogError> {
        let mut slots = Vec::new();
        for slot in vm.slot_list() {
            let block = ram
                .blocks()
                .iter()
                .position(|b| Arc::ptr_eq(b.region(), &slot.region))
                .ok_or_else(|| {
                    DirtyLogError::Backend(format!("KVM slot {} maps memory that is no RAM block", slot.id))
                })?;
            slots.push((slot.id, BlockId(block as u32)));
        }
        let manual = vm.enable_manual_protect()?;
        let mut log = Self {
            vm,
            slots,
            manual,
            bitmap: Vec::new(),
        };
        for &(id, _) in &log.slots {
            log.vm.set_dirty_logging(id, true)?;
        }
        // Turning logging on leaves the log empty and the slot write-protected;
        // read it once anyway so that nothing from before counts.
        log.collect(&mut |_, _, _| {})?;
        Ok(log)
    }

    /// Whether the log uses the manual-protect protocol (`KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_protect(&self) -> bool {
        self.manual
    }
}

impl DirtyLog for KvmDirtyLog {
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for &(id, block) in &self.slots {
            self.vm.dirty_log(id, &mut self.bitmap)?;
            let found = word_runs(self.bitmap.iter().copied(), &mut |first, count| {
                sink(block, first, count)
            });
            if self.manual && found > 0 {
                self.vm.clear_dirty_log(id, &self.bitmap)?;
            }
            total += found;
        }
        Ok(total)
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        for &(id, _) in &self.slots {
            // Best effort: a VM whose slot cannot change any more keeps logging.
            let _ = self.vm.set_dirty_logging(id, false);
        }
    }
}

/// Several dirty logs read as one; a page may be reported by more than one.
pub struct CombinedDirtyLog {
    logs: Vec<Box<dyn DirtyLog>>,
}

impl std::fmt::Debug for CombinedDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CombinedDirtyLog")
            .field("logs", &self.logs.len())
            .finish()
    }
}

impl CombinedDirtyLog {
    /// The union of `logs`.
    pub fn new(logs: Vec<Box<dyn DirtyLog>>) -> Self {
        Self { logs }
    }
}

impl DirtyLog for CombinedDirtyLog {
    fn collect(&mut self, sink: &mut DirtySink<'_>) -> Result<u64, DirtyLogError> {
        let mut total = 0;
        for log in &mut self.logs {
            total += log.collect(sink)?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamBlock;
    use migration_sys::GuestRegion;

    fn ram(pages: &[usize]) -> Ram {
        Ram::new(
            pages
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    RamBlock::new(
                        format!("b{i}"),
                        Arc::new(GuestRegion::anonymous(p * 4096).expect("mmap")),
                    )
                })
                .collect(),
        )
    }

    fn collect_all(log: &mut dyn DirtyLog) -> Vec<(u32, u64)> {
        let mut pages = Vec::new();
        log.collect(&mut |b, first, count| pages.extend((first..first + count).map(|p| (b.0, p))))
            .expect("collect");
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    #[test]
    fn software_log_reports_marks_once_and_ignores_out_of_range() {
        let ram = ram(&[16, 8]);
        let mut log = SoftwareDirtyLog::new(&ram);
        let vmm = log.clone();
        vmm.mark(BlockId(0), 3, 2);
        vmm.mark(BlockId(1), 7, 5);
        vmm.mark(BlockId(9), 0, 1);
        assert_eq!(collect_all(&mut log), vec![(0, 3), (0, 4), (1, 7)]);
        assert!(collect_all(&mut log).is_empty());
    }

    #[test]
    fn kernel_log_sees_writes_per_block() {
        let ram = ram(&[32, 32]);
        let mut log = KernelDirtyLog::start(&ram).expect("tracking starts");
        ram.blocks()[0].region().write(5 * 4096, &[1; 10]).expect("write");
        ram.blocks()[1]
            .region()
            .write(31 * 4096 + 100, &[2; 10])
            .expect("write");
        assert_eq!(collect_all(&mut log), vec![(0, 5), (1, 31)]);
        assert!(collect_all(&mut log).is_empty());
    }

    #[test]
    fn combined_log_is_the_union() {
        let ram = ram(&[32]);
        let soft = SoftwareDirtyLog::new(&ram);
        let kernel = KernelDirtyLog::start(&ram).expect("tracking starts");
        let mut log = CombinedDirtyLog::new(vec![Box::new(kernel), Box::new(soft.clone())]);
        soft.mark(BlockId(0), 1, 1);
        ram.blocks()[0].region().write(2 * 4096, &[1]).expect("write");
        assert_eq!(collect_all(&mut log), vec![(0, 1), (0, 2)]);
    }
}
