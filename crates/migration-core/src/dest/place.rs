//! Placing pages into guest RAM: the shared record of what was placed,
//! the threads that write, and the prefaulting of anonymous memory.

use super::{DestError, FreshMemory};
use crate::bitmap::AtomicBitmap;
use crate::compress::decompress;
use crate::ram::Ram;
use crate::stats::Stats;
use crate::transport::{DirectPlacement, GuestRun};
use crate::verify::{block_digest_atomic, page_hash, zero_page_hash};
use migration_sys::uffd::{MissingPages, Placed};
use migration_wire::{Codec, DeltaBatch, PageBatch, PageEncoding};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Populates guest RAM ahead of the incoming stream on a thread of its own:
/// first touch of fresh memory is slow (the kernel, and the host under it,
/// supply and zero every page), and the bulk pass places pages in address
/// order, so doing it ahead moves that cost off the receiving thread. It
/// stays at most [`Prefault::WINDOW`] bytes ahead of what was placed, so a
/// peer's announcement alone never commits memory.
pub(crate) struct Prefault {
    shared: std::sync::Arc<PrefaultState>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct PrefaultState {
    /// Bytes placed so far, and whether to stop.
    progress: std::sync::Mutex<(u64, bool)>,
    moved: std::sync::Condvar,
}

impl Prefault {
    const CHUNK: usize = 2 << 20;
    const WINDOW: u64 = 256 << 20;

    pub(crate) fn start(ram: &Ram, fresh: FreshMemory) -> Self {
        let shared = std::sync::Arc::new(PrefaultState::default());
        // File-backed memory is filled through the page cache by the
        // placement thread (see `GuestRegion::place`), without zeroing and
        // without touching pages that stay zero: only anonymous memory is
        // populated ahead, unless it is preallocated already.
        let regions: Vec<_> = ram
            .blocks()
            .iter()
            .filter(|b| !b.region().is_shared() && fresh != FreshMemory::Preallocated)
            .map(|b| std::sync::Arc::clone(b.region()))
            .collect();
        let state = std::sync::Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("migration-prefault".into())
            .spawn(move || {
                let mut ahead = 0u64;
                for region in regions {
                    let mut offset = 0;
                    while offset < region.len() {
                        {
                            let mut progress = state.progress.lock().unwrap_or_else(|e| e.into_inner());
                            while !progress.1 && ahead >= progress.0 + Self::WINDOW {
                                progress = state.moved.wait(progress).unwrap_or_else(|e| e.into_inner());
                            }
                            if progress.1 {
                                return;
                            }
                        }
                        let len = Self::CHUNK.min(region.len() - offset);
                        // Best effort: a failure only means the receiver
                        // touches those pages itself.
                        if region.populate_write(offset, len).is_err() {
                            break;
                        }
                        offset += len;
                        ahead += len as u64;
                    }
                }
            })
            .ok();
        Self {
            shared,
            thread: std::sync::Mutex::new(thread),
        }
    }

    /// Stops populating and waits until the thread is gone (postcopy: every
    /// page not held must stay absent, to fault).
    pub(crate) fn stop(&self) {
        self.shared.progress.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.shared.moved.notify_one();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }

    /// Reports how many bytes were placed so far.
    pub(crate) fn advance(&self, placed: u64) {
        self.shared.progress.lock().unwrap_or_else(|e| e.into_inner()).0 = placed;
        self.shared.moved.notify_one();
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where incoming pages go, for a transport that reads page bytes straight
/// into guest memory (see [`DirectPlacement`]).
pub(crate) struct RamTargets {
    ram: Ram,
    /// Per block: whether its pages are placed by the transport. Fresh
    /// file-backed memory is not: written through its file, the kernel
    /// allocates a page without zeroing it first.
    direct: Vec<bool>,
    /// Cleared at the switch to postcopy: from then on every page is placed
    /// atomically (UFFDIO_COPY), never written in place.
    enabled: std::sync::atomic::AtomicBool,
}

impl RamTargets {
    pub(crate) fn new(ram: &Ram, fresh: FreshMemory) -> Self {
        let direct = ram
            .blocks()
            .iter()
            .map(|b| !b.region().is_shared() || fresh == FreshMemory::Preallocated)
            .collect();
        Self {
            ram: ram.clone(),
            direct,
            enabled: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Stops direct placement (see [`RamTargets::enabled`]).
    pub(crate) fn disable(&self) {
        self.enabled.store(false, Ordering::Release);
    }
}

impl DirectPlacement for RamTargets {
    fn runs<'a>(&'a self, batch: &PageBatch<'_>, runs: &mut Vec<GuestRun<'a>>) -> bool {
        if !self.enabled.load(Ordering::Acquire) {
            return false;
        }
        let Some(block) = self.ram.blocks().get(batch.block as usize) else {
            return false;
        };
        if !self.direct[batch.block as usize] || batch.page_size != block.page_size() {
            return false;
        }
        let page_size = block.page_size() as usize;
        // Indices increase strictly within a batch: the last is the highest.
        if batch
            .entries()
            .last()
            .is_some_and(|e| !e.is_ok_and(|e| e.page < block.pages()))
        {
            return false;
        }
        runs.extend(batch.plain_runs().map(|(first, pages)| GuestRun {
            region: block.region(),
            offset: first as usize * page_size,
            len: pages as usize * page_size,
        }));
        true
    }
}

/// Places pages into guest RAM and keeps the hash of every page placed.
/// Shared by every channel's thread: within an epoch each page arrives at
/// most once, and the epoch barrier orders one epoch's updates before the
/// next's, so relaxed atomics suffice.
pub(crate) struct Placer {
    ram: Ram,
    hashes: Vec<Box<[AtomicU64]>>,
    received: Vec<AtomicBitmap>,
    zeroed: Vec<AtomicBitmap>,
    pub(crate) placed: AtomicU64,
    zero_pages: AtomicU64,
    plain_pages: AtomicU64,
    delta_pages: AtomicU64,
}

impl Placer {
    pub(crate) fn new(ram: &Ram, fresh: FreshMemory) -> Self {
        Self {
            ram: ram.clone(),
            hashes: ram
                .blocks()
                .iter()
                .map(|b| migration_sys::zeroed_atomics(b.pages() as usize))
                .collect(),
            received: ram.blocks().iter().map(|b| AtomicBitmap::new(b.pages())).collect(),
            zeroed: ram
                .blocks()
                .iter()
                .map(|b| {
                    let map = AtomicBitmap::new(b.pages());
                    if fresh != FreshMemory::Unknown {
                        map.fill();
                    }
                    map
                })
                .collect(),
            placed: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            plain_pages: AtomicU64::new(0),
            delta_pages: AtomicU64::new(0),
        }
    }

    pub(crate) fn ram(&self) -> &Ram {
        &self.ram
    }

    pub(crate) fn placed_bytes(&self) -> u64 {
        self.placed.load(Ordering::Relaxed) * migration_sys::PAGE_SIZE as u64
    }

    pub(crate) fn stats(&self, started: Instant) -> Stats {
        Stats {
            ram_bytes: self.ram.total_bytes(),
            ram_transferred: self.placed_bytes(),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            plain_pages: self.plain_pages.load(Ordering::Relaxed),
            xbzrle: match self.delta_pages.load(Ordering::Relaxed) {
                0 => None,
                pages => Some(crate::stats::XbzrleStats {
                    pages,
                    ..Default::default()
                }),
            },
            elapsed: started.elapsed(),
            ..Stats::default()
        }
    }

    /// The first page that never arrived, as (block, page).
    pub(crate) fn first_missing(&self) -> Option<(usize, u64)> {
        self.received
            .iter()
            .enumerate()
            .find_map(|(block, map)| map.next_clear(0).map(|page| (block, page)))
    }

    /// Each block's digest of the pages placed.
    pub(crate) fn digests(&self) -> Vec<u64> {
        self.hashes.iter().map(|hashes| block_digest_atomic(hashes)).collect()
    }

    /// Checks a batch against the announced blocks: the block, its page
    /// size, and every entry's page.
    fn check(&self, batch: &PageBatch<'_>) -> Result<&crate::ram::RamBlock, DestError> {
        let pages = batch
            .entries()
            .map(|entry| entry.map(|e| e.page).map_err(|e| DestError::Protocol(e.to_string())));
        self.check_pages(batch.block, batch.page_size, pages)
    }

    /// Checks pages of `block` sent with `page_size`-byte pages against the
    /// announced blocks.
    fn check_pages(
        &self,
        block: u32,
        page_size: u32,
        pages: impl Iterator<Item = Result<u64, DestError>>,
    ) -> Result<&crate::ram::RamBlock, DestError> {
        let Some(found) = self.ram.blocks().get(block as usize) else {
            return Err(DestError::Protocol(format!(
                "page batch for block {block}, but only {} blocks were announced",
                self.ram.blocks().len()
            )));
        };
        if page_size != found.page_size() {
            return Err(DestError::Protocol(format!(
                "page batch with {page_size}-byte pages for block {} of {}-byte pages",
                found.name(),
                found.page_size()
            )));
        }
        let count = found.pages();
        for page in pages {
            let page = page?;
            if page >= count {
                return Err(DestError::Protocol(format!(
                    "page {page} is outside block {} of {count} pages",
                    found.name()
                )));
            }
        }
        Ok(found)
    }

    /// Checks a batch of deltas and applies each to the copy of its page in
    /// guest RAM (the epoch barrier has placed every earlier copy), into a
    /// buffer the returned placement writes back; records the new pages'
    /// hashes. A delta for a page never received, or one that does not
    /// decode, fails the batch before anything is written.
    pub(crate) fn plan_deltas(&self, batch: &DeltaBatch<'_>) -> Result<Placement, DestError> {
        let index = batch.block as usize;
        let block = self.check_pages(batch.block, batch.page_size, batch.pages().map(|(page, _)| Ok(page)))?;
        let page_size = block.page_size() as usize;
        let mut owned = Vec::with_capacity(batch.len() * page_size);
        let mut placement = Placement {
            region: Arc::clone(block.region()),
            page_size,
            payload_at: 0,
            writes: Vec::new(),
            owned: None,
        };
        let mut updates = Vec::with_capacity(batch.len());
        for (page, delta) in batch.pages() {
            if !self.received[index].get(page) {
                return Err(DestError::Protocol(format!(
                    "a delta for page {page} of block {}, which was never sent whole",
                    block.name()
                )));
            }
            if delta.is_empty() {
                continue; // Unchanged.
            }
            let at = owned.len();
            owned.resize(at + page_size, 0);
            let copy = &mut owned[at..];
            block
                .region()
                .read(page as usize * page_size, copy)
                .map_err(DestError::Memory)?;
            migration_wire::xbzrle::decode(delta, copy).map_err(|e| {
                DestError::Protocol(format!("the delta for page {page} of block {}: {e}", block.name()))
            })?;
            updates.push((page, page_hash(copy)));
            placement.push_plain(page, at);
        }
        // Every delta decoded: record the pages.
        for (page, hash) in updates {
            self.hashes[index][page as usize].store(hash, Ordering::Relaxed);
            self.zeroed[index].test_and_clear(page);
        }
        let pages = batch.len() as u64;
        self.delta_pages.fetch_add(pages, Ordering::Relaxed);
        self.placed.fetch_add(pages, Ordering::Relaxed);
        placement.owned = Some(owned);
        Ok(placement)
    }

    /// Checks a batch against the announced blocks and records its pages
    /// (hashes, received and zero bitmaps), returning the writes that place
    /// it. Nothing is written on a batch that fails a check.
    pub(crate) fn plan(&self, batch: &PageBatch<'_>) -> Result<Placement, DestError> {
        let index = batch.block as usize;
        let block = self.check(batch)?;
        let page_size = block.page_size() as usize;
        let payload = batch.payload();
        // Compressed pages are expanded here, once, into a buffer the
        // placement owns; plain ones are placed from the frame body, unless
        // the transport placed them already.
        let placed = batch.is_placed();
        let mut owned = None;
        let payload = if batch.codec() == Codec::None {
            payload
        } else {
            let mut expanded = vec![0u8; batch.plain_len()];
            decompress(batch.codec(), payload, &mut expanded).map_err(|e| DestError::Protocol(e.to_string()))?;
            &*owned.insert(expanded)
        };
        let mut placement = Placement {
            region: Arc::clone(block.region()),
            page_size,
            payload_at: batch.payload_offset(),
            writes: Vec::new(),
            owned: None,
        };
        let mut data_at = 0usize;
        let (mut zero, mut plain) = (0, 0);
        // The transport hashed each page when it checked the frame.
        let known = batch.page_hashes();
        for entry in batch.entries().flatten() {
            let hash = match entry.encoding {
                PageEncoding::Plain => {
                    let known = known.and_then(|h| h.get(plain as usize).copied());
                    plain += 1;
                    self.zeroed[index].test_and_clear(entry.page);
                    if placed {
                        // The transport hashed the page where it landed.
                        known.ok_or_else(|| DestError::Protocol("a placed batch without its page hashes".into()))?
                    } else {
                        let bytes = &payload[data_at..data_at + page_size];
                        placement.push_plain(entry.page, data_at);
                        data_at += page_size;
                        known.unwrap_or_else(|| page_hash(bytes))
                    }
                }
                PageEncoding::Zero => {
                    if !self.zeroed[index].get(entry.page) {
                        placement.writes.push(Write::Zero { page: entry.page });
                        self.zeroed[index].set(entry.page);
                    }
                    zero += 1;
                    zero_page_hash()
                }
            };
            self.hashes[index][entry.page as usize].store(hash, Ordering::Relaxed);
            self.received[index].set(entry.page);
        }
        self.zero_pages.fetch_add(zero, Ordering::Relaxed);
        self.plain_pages.fetch_add(plain, Ordering::Relaxed);
        self.placed.fetch_add(zero + plain, Ordering::Relaxed);
        placement.owned = owned;
        Ok(placement)
    }

    /// Whether page `page` of block `block` is held (placed, or known zero).
    pub(crate) fn holds(&self, block: usize, page: u64) -> bool {
        self.received[block].get(page)
    }

    /// The pages held, one bitmap per block.
    pub(crate) fn received(&self) -> &[AtomicBitmap] {
        &self.received
    }

    /// Postcopy, at the switch: the page is stale (the source changed it
    /// after sending it) and no longer held. Returns whether it was held.
    pub(crate) fn forget(&self, block: usize, page: u64) -> bool {
        let held = self.received[block].test_and_clear(page);
        if held {
            self.placed.fetch_sub(1, Ordering::Relaxed);
        }
        held
    }

    /// Postcopy: places every page of a checked batch that is not held yet,
    /// each atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` into memory
    /// registered for missing-page faults (`missing`, one per block), which
    /// wakes the threads waiting on it, and records it. A page present
    /// already (another channel placed it first) is left as it is: the
    /// source is paused, so both copies hold the same bytes. Calls
    /// `placed(page)` for each page this call placed.
    pub(crate) fn place_missing(
        &self,
        batch: &PageBatch<'_>,
        missing: &MissingPages,
        placed: &mut dyn FnMut(u64),
    ) -> Result<(), DestError> {
        let index = batch.block as usize;
        let block = self.check(batch)?;
        let page_size = block.page_size() as usize;
        let expanded;
        let payload = if batch.codec() == Codec::None {
            batch.payload()
        } else {
            let mut out = vec![0u8; batch.plain_len()];
            decompress(batch.codec(), batch.payload(), &mut out).map_err(|e| DestError::Protocol(e.to_string()))?;
            expanded = out;
            &expanded[..]
        };
        let known = batch.page_hashes();
        let (mut data_at, mut plain_index) = (0usize, 0usize);
        // Runs of consecutive pages of one kind, none held: (first page,
        // count, payload offset of a plain run or None for zeros, index of
        // its first page's hash in `hashes`).
        let mut runs: Vec<(u64, u64, Option<usize>, usize)> = Vec::new();
        let mut hashes = Vec::with_capacity(batch.len());
        for entry in batch.entries().flatten() {
            let at = (entry.encoding == PageEncoding::Plain).then_some(data_at);
            let hash = match entry.encoding {
                PageEncoding::Plain => {
                    let hash = known
                        .and_then(|h| h.get(plain_index).copied())
                        .unwrap_or_else(|| page_hash(&payload[data_at..data_at + page_size]));
                    data_at += page_size;
                    plain_index += 1;
                    hash
                }
                PageEncoding::Zero => zero_page_hash(),
            };
            hashes.push(hash);
            if self.received[index].get(entry.page) {
                continue;
            }
            let this = hashes.len() - 1;
            match runs.last_mut() {
                // A run takes the next entry when it is the next page, of the
                // same kind, next in the payload, with no page held between.
                Some((first, count, Some(start), h))
                    if at.is_some_and(|at| {
                        *first + *count == entry.page
                            && *start + *count as usize * page_size == at
                            && *h + *count as usize == this
                    }) =>
                {
                    *count += 1;
                }
                Some((first, count, None, h))
                    if at.is_none() && *first + *count == entry.page && *h + *count as usize == this =>
                {
                    *count += 1;
                }
                _ => runs.push((entry.page, 1, at, this)),
            }
        }
        let mut record = |page: u64, hash: u64, zero: bool| {
            self.hashes[index][page as usize].store(hash, Ordering::Relaxed);
            if !self.received[index].test_and_set(page) {
                self.placed.fetch_add(1, Ordering::Relaxed);
                if zero {
                    self.zero_pages.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.plain_pages.fetch_add(1, Ordering::Relaxed);
                }
                placed(page);
            }
        };
        for (first, count, at, hash_at) in runs {
            let mut done = 0;
            while done < count {
                let page = first + done;
                let offset = page as usize * page_size;
                let len = (count - done) as usize * page_size;
                let outcome = match at {
                    Some(start) => {
                        let from = start + done as usize * page_size;
                        missing.copy(offset, &payload[from..from + len])?
                    }
                    None => missing.zero(offset, len)?,
                };
                let placed_pages = match outcome {
                    Placed::All => count - done,
                    Placed::UpTo(bytes) => (bytes / page_size) as u64,
                };
                for p in page..page + placed_pages {
                    record(p, hashes[hash_at + (p - first) as usize], at.is_none());
                }
                // A page found present ends the ioctl: it is someone else's.
                done += placed_pages + u64::from(matches!(outcome, Placed::UpTo(_)));
            }
        }
        Ok(())
    }
}

/// One write into guest RAM, in entry order.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// `count` plain pages from `page`, their bytes at `at` in the payload.
    Run { page: u64, at: usize, count: usize },
    /// A page that must read as zero.
    Zero { page: u64 },
}

/// The writes that place one batch.
pub(crate) struct Placement {
    region: std::sync::Arc<migration_sys::GuestRegion>,
    page_size: usize,
    /// Where the payload starts in the frame body.
    payload_at: usize,
    writes: Vec<Write>,
    /// The expanded bytes of a compressed batch, placed instead of the body.
    owned: Option<Vec<u8>>,
}

impl Placement {
    /// Whether there is nothing to write (every page placed by the
    /// transport, or zero already).
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Adds a plain page, joining it to the previous run when adjacent in
    /// memory and in the payload, so a run is placed with one write.
    fn push_plain(&mut self, page: u64, at: usize) {
        if let Some(Write::Run {
            page: first,
            at: start,
            count,
        }) = self.writes.last_mut()
            && *first + *count as u64 == page
            && *start + *count * self.page_size == at
        {
            *count += 1;
            return;
        }
        self.writes.push(Write::Run { page, at, count: 1 });
    }

    /// Performs the writes; `body` is the frame body the plan was made from.
    fn apply(&self, body: &[u8], zero_page: &[u8]) -> Result<(), migration_sys::SysError> {
        let payload = match &self.owned {
            Some(owned) => owned.as_slice(),
            None => &body[self.payload_at..],
        };
        for write in &self.writes {
            match *write {
                Write::Run { page, at, count } => {
                    let bytes = &payload[at..at + count * self.page_size];
                    self.region.place(page as usize * self.page_size, bytes)?;
                }
                Write::Zero { page } => {
                    let offset = page as usize * self.page_size;
                    // Reused memory: write only where it is not zero already.
                    if !self.region.is_zero(offset, self.page_size)? {
                        self.region.place(offset, zero_page)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Threads that write pages into guest RAM, so that filling fresh memory
/// (slow here: the kernel and the host under it supply every page) overlaps
/// with receiving and checking the next batches, and several pages are in
/// the works at once. Within an epoch every page is sent at most once, so
/// batches of one epoch may land in any order; [`PlaceWorker::flush`] at
/// every epoch's end keeps an older copy of a page from landing after a
/// newer one.
pub(crate) struct PlaceWorker {
    jobs: Option<crossbeam_channel::Sender<(Placement, Vec<u8>)>>,
    spare: crossbeam_channel::Receiver<Vec<u8>>,
    shared: std::sync::Arc<PlaceShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct PlaceShared {
    /// Batches submitted and not yet placed, and the first failure.
    state: std::sync::Mutex<(usize, Option<migration_sys::SysError>)>,
    idle: std::sync::Condvar,
}

impl PlaceWorker {
    /// One thread: a second measured no faster on this 2-core machine,
    /// where the sender and the receiving thread need the cores too.
    const THREADS: usize = 1;

    pub(crate) fn start() -> Self {
        let (jobs, queue) = crossbeam_channel::bounded::<(Placement, Vec<u8>)>(4);
        let (give_back, spare) = crossbeam_channel::bounded(8);
        let shared = std::sync::Arc::new(PlaceShared::default());
        let threads = (0..Self::THREADS)
            .map(|i| {
                let queue = queue.clone();
                let give_back = give_back.clone();
                let shared = std::sync::Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("migration-place-{i}"))
                    .spawn(move || {
                        let zero_page = vec![0u8; migration_sys::PAGE_SIZE];
                        for (placement, body) in queue {
                            let result = placement.apply(&body, &zero_page);
                            let _ = give_back.try_send(body);
                            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                            state.0 -= 1;
                            if let Err(err) = result {
                                state.1.get_or_insert(err);
                            }
                            shared.idle.notify_all();
                        }
                    })
                    .expect("spawning a placement thread")
            })
            .collect();
        Self {
            jobs: Some(jobs),
            spare,
            shared,
            threads,
        }
    }

    /// A buffer to receive the next frame into.
    pub(crate) fn spare(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_default()
    }

    fn failed(state: &mut (usize, Option<migration_sys::SysError>)) -> Result<(), DestError> {
        match state.1.take() {
            Some(err) => Err(DestError::Memory(err)),
            None => Ok(()),
        }
    }

    pub(crate) fn submit(&self, placement: Placement, body: Vec<u8>) -> Result<(), DestError> {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            Self::failed(&mut state)?;
            state.0 += 1;
        }
        let jobs = self.jobs.as_ref().expect("running");
        jobs.send((placement, body))
            .map_err(|_| DestError::Protocol("the placement threads stopped".into()))
    }

    /// Returns once every submitted batch is placed.
    pub(crate) fn flush(&self) -> Result<(), DestError> {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.0 > 0 {
            state = self.shared.idle.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        Self::failed(&mut state)
    }
}

impl Drop for PlaceWorker {
    fn drop(&mut self) {
        self.jobs.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
