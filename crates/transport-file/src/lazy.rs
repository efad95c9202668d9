//! Lazy restore: the guest runs at once over memory whose pages are loaded
//! from the snapshot on first touch (userfaultfd in missing mode), while a
//! background prefetcher loads the rest in address order.
//!
//! One fault thread per RAM block waits for faults and serves each with a
//! positional read of that page into its own buffer and an atomic
//! `UFFDIO_COPY` (never by reading into guest memory, which would fault
//! again). Prefetch threads load chunks of 16 pages (64 KiB) the same way;
//! zero pages are mapped with `UFFDIO_ZEROPAGE`. Every page is claimed in a
//! bitmap before it is read, so each is loaded exactly once, by whichever
//! thread claims it first; a fault on a page the prefetcher claimed is
//! woken by the prefetcher's copy. The hash of every page loaded is kept,
//! and once all are in, the block digests are compared with the ones the
//! save recorded.

use crate::restore::Snapshot;
use crate::{FileError, io_error};
use migration_core::Ram;
use migration_core::bitmap::AtomicBitmap;
use migration_core::verify::{block_digest_atomic, page_hash, zero_page_hash};
use migration_sys::uffd::{MissingPages, Placed};
use migration_sys::{AlignedBuf, SysError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Pages the prefetcher loads at once (64 KiB of 4 KiB pages: UFFDIO_COPY
/// runs near its best there).
const PREFETCH_PAGES: u64 = 16;

/// A restore in progress whose guest may already run.
#[derive(Debug)]
pub struct LazyRestore {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    device_state: Vec<u8>,
}

#[derive(Debug)]
struct Shared {
    snapshot: Snapshot,
    data: File,
    direct_io: bool,
    blocks: Vec<Block>,
    total: u64,
    loaded: AtomicU64,
    faulted: AtomicU64,
    stop: AtomicBool,
    /// Fault service times, in nanoseconds.
    latencies: Mutex<Vec<u64>>,
    failure: Mutex<Option<String>>,
    progress: Mutex<()>,
    moved: Condvar,
}

#[derive(Debug)]
struct Block {
    missing: MissingPages,
    /// One bit per page: some thread took it on.
    claimed: AtomicBitmap,
    hashes: Box<[AtomicU64]>,
}

/// What a lazy restore came to.
#[derive(Debug, Clone, Default)]
pub struct LazyReport {
    /// Pages loaded because the guest touched them.
    pub faulted_pages: u64,
    /// Pages the prefetcher loaded.
    pub prefetched_pages: u64,
    /// Fault service time percentiles and maximum, in microseconds.
    pub fault_p50_us: f64,
    /// 99th percentile.
    pub fault_p99_us: f64,
    /// Longest.
    pub fault_max_us: f64,
    /// Blocks whose digests differ from the save's.
    pub mismatched_blocks: Vec<u32>,
}

impl Block {
    /// Claims `page`; true when this caller is the one to load it.
    fn claim(&self, page: u64) -> bool {
        !self.claimed.test_and_set(page)
    }
}

impl LazyRestore {
    /// Registers every block of `ram` (fresh anonymous memory laid out as
    /// the snapshot's blocks, never touched) for missing-page faults, starts
    /// the fault threads and `prefetchers` prefetch threads (0: pages load
    /// only when touched), and returns at once with the device state: the
    /// guest may run.
    pub fn start(snapshot: Snapshot, ram: &Ram, prefetchers: usize, direct_io: bool) -> Result<Self, FileError> {
        let path = snapshot.path.clone();
        let path = path.as_path();
        let layout = &snapshot.header.layout;
        let fits = ram.blocks().len() == layout.blocks.len()
            && ram
                .blocks()
                .iter()
                .zip(&layout.blocks)
                .all(|(b, l)| b.len() == l.block.length && b.page_size() == l.block.page_size);
        if !fits {
            return Err(FileError::Invalid {
                path: path.display().to_string(),
                problem: "guest RAM laid out unlike the snapshot's blocks".into(),
            });
        }
        let data = snapshot.open_pages(direct_io)?;
        // The guest needs its device state before it runs: read it while
        // the memory is registered.
        let state_reader = {
            let meta = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
            let read = snapshot.state_reader();
            std::thread::spawn(move || read(&meta))
        };
        let mut blocks = Vec::with_capacity(ram.blocks().len());
        for (block, laid) in ram.blocks().iter().zip(&layout.blocks) {
            let missing = MissingPages::register(Arc::clone(block.region())).map_err(|e| {
                io_error(
                    format!("registering {} for missing-page faults", laid.block.name),
                    std::io::Error::other(e),
                )
            })?;
            let pages = laid.pages();
            blocks.push(Block {
                missing,
                claimed: AtomicBitmap::new(pages),
                hashes: migration_sys::zeroed_atomics(pages as usize),
            });
        }
        let total = layout.blocks.iter().map(|b| b.pages()).sum();
        let shared = Arc::new(Shared {
            snapshot,
            data,
            direct_io,
            blocks,
            total,
            loaded: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            latencies: Mutex::default(),
            failure: Mutex::default(),
            progress: Mutex::default(),
            moved: Condvar::new(),
        });
        // Threads go straight into the restore, whose drop stops and joins
        // them if anything below fails.
        let mut lazy = Self {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            device_state: Vec::new(),
        };
        for block in 0..shared.blocks.len() {
            let shared = Arc::clone(&shared);
            lazy.threads.push(
                std::thread::Builder::new()
                    .name(format!("lazy-fault-{block}"))
                    .spawn(move || shared.serve_faults(block))
                    .map_err(|e| io_error("starting a fault thread", e))?,
            );
        }
        // Prefetching starts once the device state is in, so its reads do
        // not queue ahead of the one the guest is waiting for.
        let device_state = state_reader.join().map_err(|_| FileError::Invalid {
            path: path.display().to_string(),
            problem: "reading the device state failed".into(),
        })??;
        for index in 0..prefetchers {
            let shared = Arc::clone(&shared);
            lazy.threads.push(
                std::thread::Builder::new()
                    .name(format!("lazy-prefetch-{index}"))
                    .spawn(move || shared.prefetch(index, prefetchers))
                    .map_err(|e| io_error("starting a prefetch thread", e))?,
            );
        }
        lazy.device_state = device_state;
        Ok(lazy)
    }

    /// The guest's device state, checked against the save's hash.
    pub fn device_state(&self) -> &[u8] {
        &self.device_state
    }

    /// Pages loaded so far, of all.
    pub fn loaded(&self) -> (u64, u64) {
        (self.shared.loaded.load(Ordering::Relaxed), self.shared.total)
    }

    /// Waits (at most `timeout`) until every page is loaded, then compares
    /// digests. A failure to load a page, or the timeout, is an error: the
    /// guest cannot go on, and the pages never loaded stay unreadable (a
    /// thread touching one waits for good rather than read zeros where guest
    /// data belongs); the VMM must stop the guest.
    pub fn wait(mut self, timeout: Duration) -> Result<LazyReport, FileError> {
        let deadline = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let path = shared.snapshot.path.display().to_string();
        {
            let mut guard = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(problem) = shared.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                    return Err(FileError::Invalid { path, problem });
                }
                if shared.loaded.load(Ordering::Acquire) == shared.total {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(FileError::Invalid {
                        path,
                        problem: format!(
                            "only {} of {} pages loaded within {timeout:?}",
                            shared.loaded.load(Ordering::Relaxed),
                            shared.total
                        ),
                    });
                }
                guard = shared
                    .moved
                    .wait_timeout(guard, left.min(Duration::from_millis(100)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        self.stop();
        let mut latencies = shared.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        latencies.sort_unstable();
        let pick = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() - 1) as f64 * q).round() as usize;
            latencies[i] as f64 / 1e3
        };
        let faulted = shared.faulted.load(Ordering::Relaxed);
        let mismatched_blocks = shared
            .blocks
            .iter()
            .zip(&shared.snapshot.commit.blocks)
            .enumerate()
            .filter(|(_, (block, summary))| block_digest_atomic(&block.hashes) != summary.digest)
            .map(|(i, _)| i as u32)
            .collect();
        Ok(LazyReport {
            faulted_pages: faulted,
            prefetched_pages: shared.total - faulted,
            fault_p50_us: pick(0.5),
            fault_p99_us: pick(0.99),
            fault_max_us: latencies.last().map_or(0.0, |&n| n as f64 / 1e3),
            mismatched_blocks,
        })
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.loaded.load(Ordering::Acquire) < self.total {
            // Pages are missing (a failure, a timeout): unregistering would
            // let the guest read zeros where its data belongs. Keep them
            // unreadable instead; a VMM stops such a guest.
            for block in std::mem::take(&mut self.blocks) {
                block.missing.keep_absent_pages_blocked();
            }
        }
    }
}

impl Shared {
    fn fail(&self, problem: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(problem);
        self.stop.store(true, Ordering::Release);
        self.moved.notify_all();
    }

    fn serve_faults(&self, block: usize) {
        let page_size = self.snapshot.header.layout.blocks[block].block.page_size as usize;
        let mut buffer = AlignedBuf::zeroed(page_size);
        while !self.stop.load(Ordering::Acquire) {
            let offset = match self.blocks[block].missing.next_fault(Duration::from_millis(50)) {
                Ok(Some(offset)) => offset,
                Ok(None) => continue,
                Err(err) => return self.fail(format!("waiting for page faults: {err}")),
            };
            let started = Instant::now();
            let page = (offset / page_size) as u64;
            if !self.blocks[block].claim(page) {
                // A prefetcher is loading it: its copy wakes the faulting
                // thread (a fault after the copy cannot happen).
                continue;
            }
            if let Err(err) = self.load(block, page, 1, &mut buffer) {
                return self.fail(format!("loading page {page} of block {block} on a fault: {err}"));
            }
            self.faulted.fetch_add(1, Ordering::Relaxed);
            let nanos = started.elapsed().as_nanos() as u64;
            self.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(nanos);
        }
    }

    fn prefetch(&self, index: usize, of: usize) {
        let mut buffer = AlignedBuf::zeroed(PREFETCH_PAGES as usize * 4096);
        let mut chunk = 0usize;
        for (b, laid) in self.snapshot.header.layout.blocks.iter().enumerate() {
            let mut first = 0;
            while first < laid.pages() {
                let count = PREFETCH_PAGES.min(laid.pages() - first);
                if chunk % of == index {
                    // Claim what nobody took yet, in runs of adjacent pages.
                    let mut page = first;
                    while page < first + count {
                        if self.stop.load(Ordering::Acquire) {
                            return;
                        }
                        if !self.blocks[b].claim(page) {
                            page += 1;
                            continue;
                        }
                        let mut run = 1;
                        while page + run < first + count && self.blocks[b].claim(page + run) {
                            run += 1;
                        }
                        if let Err(err) = self.load(b, page, run, &mut buffer) {
                            return self.fail(format!("prefetching page {page} of block {b}: {err}"));
                        }
                        page += run;
                    }
                }
                chunk += 1;
                first += count;
            }
        }
    }

    /// Loads `count` claimed pages from `first`: stored ones read from the
    /// file and copied in, the others mapped as zero pages.
    fn load(&self, block: usize, first: u64, count: u64, buffer: &mut AlignedBuf) -> Result<(), SysError> {
        let laid = &self.snapshot.header.layout.blocks[block];
        let page_size = laid.block.page_size as usize;
        let target = &self.blocks[block];
        let mut page = first;
        while page < first + count {
            let stored = self.snapshot.stored(block, page);
            let mut run = 1;
            while page + run < first + count && self.snapshot.stored(block, page + run) == stored {
                run += 1;
            }
            let len = run as usize * page_size;
            let offset = page as usize * page_size;
            let placed = if stored {
                if buffer.len() < len {
                    *buffer = AlignedBuf::zeroed(len);
                }
                self.data
                    .read_exact_at(&mut buffer[..len], laid.page_offset(page))
                    .map_err(|source| SysError::Os {
                        op: if self.direct_io { "pread (O_DIRECT)" } else { "pread" },
                        source,
                    })?;
                for (i, bytes) in buffer[..len].chunks_exact(page_size).enumerate() {
                    target.hashes[page as usize + i].store(page_hash(bytes), Ordering::Relaxed);
                }
                target.missing.copy(offset, &buffer[..len])?
            } else {
                for i in 0..run {
                    target.hashes[(page + i) as usize].store(zero_page_hash(), Ordering::Relaxed);
                }
                target.missing.zero(offset, len)?
            };
            if placed != Placed::All {
                return Err(SysError::Os {
                    op: "placing a page",
                    source: std::io::Error::other("the page was present before it was loaded"),
                });
            }
            page += run;
        }
        if self.loaded.fetch_add(count, Ordering::AcqRel) + count == self.total {
            let _guard = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            self.moved.notify_all();
        }
        Ok(())
    }
}
