//! The source's worker threads: a channel thread per connection (the data
//! path: pages read once from guest RAM, classified, compressed, sent) and
//! the reader of the return path.

use super::{Job, Returned};
use crate::bitmap::AtomicBitmap;
use crate::compress::Compression;
use crate::engine::PageRun;
use crate::ram::BlockId;
use crate::ram::Ram;
use crate::transport::{ChannelRx, ChannelTx, TransportError};
use crate::xbzrle::{PageCache, PageNumbering, delta_limit};
use crossbeam_channel::{Receiver, Sender, bounded};
use migration_sys::PAGE_SIZE;
use migration_wire::{
    MAX_PAGES_PER_BATCH, Message, PageBatch, PageBitmap, PageEncoding, PageEntry, PageRequest, SyncMarker,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Counters the channel thread updates and the control loop reads.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Payload bytes compression saved.
    pub(super) compression_saved: AtomicU64,
    pub(super) ram_bytes: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) plain_pages: AtomicU64,
    /// Pages sent as XBZRLE deltas (unchanged ones included).
    pub(super) delta_pages: AtomicU64,
    /// Bytes of those deltas.
    pub(super) delta_bytes: AtomicU64,
    /// Pages looked up in the XBZRLE cache and not found (sent whole).
    pub(super) cache_misses: AtomicU64,
    /// Pages found in the cache whose delta was too long (sent whole).
    pub(super) delta_overflows: AtomicU64,
}

/// Why the channel thread stopped.
pub(super) enum ChannelFailure {
    Transport(TransportError),
    Memory(migration_sys::SysError),
}

impl From<TransportError> for ChannelFailure {
    fn from(err: TransportError) -> Self {
        ChannelFailure::Transport(err)
    }
}

pub(super) type ChannelThread = (Sender<Job>, JoinHandle<()>, Arc<Mutex<Option<ChannelFailure>>>);

/// The data path: reads pages from guest RAM into its own buffer once,
/// classifies them, and sends batches.
pub(super) fn spawn_channel_thread(
    index: usize,
    mut tx: Box<dyn ChannelTx>,
    ram: Ram,
    abandon: Arc<std::sync::atomic::AtomicBool>,
    counters: Arc<Counters>,
    mut encoder: PageEncoder,
) -> ChannelThread {
    let (jobs, queue) = bounded::<Job>(16);
    let error = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&error);
    let handle = std::thread::Builder::new()
        .name(format!("migration-channel-{index}"))
        .spawn(move || {
            let mut pages_in_epoch = 0u64;
            // The counters outlive this thread (a resumed link gets new
            // threads): add what this channel sends.
            let mut counted = tx.bytes_sent();
            let mut count = |tx: &dyn ChannelTx| {
                let now = tx.bytes_sent();
                counters.wire_bytes.fetch_add(now - counted, Ordering::Relaxed);
                counted = now;
            };
            let result = (|| -> Result<(), ChannelFailure> {
                for job in queue {
                    match job {
                        Job::Pages(_) | Job::EndEpoch { .. } if abandon.load(Ordering::Acquire) => {}
                        Job::Pages(run) => {
                            encoder.send_run(tx.as_mut(), &ram, &run, &counters)?;
                            pages_in_epoch += run.len();
                        }
                        Job::EndEpoch { epoch, done } => {
                            tx.send(&Message::SyncMarker(SyncMarker {
                                epoch,
                                pages: pages_in_epoch,
                            }))?;
                            pages_in_epoch = 0;
                            let _ = done.send(());
                        }
                        Job::Control(message) => tx.send(&message)?,
                        Job::DeviceState(state) => tx.send(&Message::DeviceState(&state))?,
                        Job::Discard {
                            block,
                            first,
                            count,
                            bits,
                        } => {
                            let map = PageBitmap::new(block, first, count, &bits)
                                .expect("the source builds whole bitmaps of its own blocks");
                            tx.send(&Message::Discard(map))?;
                        }
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                        Job::LastPass => {
                            if let Some(deltas) = &mut encoder.xbzrle {
                                deltas.last_pass = true;
                            }
                        }
                        // Best effort: at worst the stream competes as an equal.
                        // Postcopy places whole pages: no more deltas.
                        Job::Background => {
                            encoder.xbzrle = None;
                            let _ = migration_sys::thread::lower_priority(migration_sys::thread::BACKGROUND_NICE);
                        }
                    }
                    count(tx.as_ref());
                }
                Ok(())
            })();
            count(tx.as_ref());
            if let Err(err) = result {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
            }
            tx.shutdown();
        })
        .expect("spawning the channel thread");
    (jobs, handle, error)
}

/// What a channel thread does to pages between guest memory and the wire,
/// with the buffers it reuses: a zero page is recognised where it lies and
/// never copied; every other page is copied once from guest RAM into
/// `payload`, hashed there, and (optionally) compressed from there.
pub(super) struct PageEncoder {
    zero_pages: bool,
    compression: Compression,
    entries: Vec<u8>,
    payload: Vec<u8>,
    packed: Vec<u8>,
    /// xxh3-64 of each plain page, taken while it is in cache: the frame
    /// checksum of a batch sent as is is built from them.
    hashes: Vec<u64>,
    /// Deltas against the pages last sent, where agreed (precopy only).
    pub(super) xbzrle: Option<Deltas>,
}

/// A channel's XBZRLE state: its cache and the buffers of a delta batch.
pub(super) struct Deltas {
    cache: PageCache,
    numbering: PageNumbering,
    channels: usize,
    table: Vec<u8>,
    bytes: Vec<u8>,
    scratch: Vec<u8>,
    /// The VM is paused and this is the last pass: no page goes again, so
    /// the cache is no longer kept (a copy per page saved in the downtime).
    pub(super) last_pass: bool,
}

impl Deltas {
    /// A cache of `cache_bytes` for one of `channels` data channels.
    pub(super) fn new(cache_bytes: u64, ram: &Ram, channels: usize) -> Self {
        Self {
            cache: PageCache::new(cache_bytes, PAGE_SIZE),
            numbering: PageNumbering::new(ram),
            channels,
            table: Vec::new(),
            bytes: Vec::new(),
            scratch: Vec::new(),
            last_pass: false,
        }
    }
}

impl PageEncoder {
    pub(super) fn new(zero_pages: bool, compression: Compression) -> Self {
        Self {
            zero_pages,
            compression,
            entries: Vec::new(),
            payload: Vec::new(),
            packed: Vec::new(),
            hashes: Vec::new(),
            xbzrle: None,
        }
    }

    pub(super) fn send_run(
        &mut self,
        tx: &mut dyn ChannelTx,
        ram: &Ram,
        run: &PageRun,
        counters: &Counters,
    ) -> Result<(), ChannelFailure> {
        let block = ram.block(run.block).expect("the engine only names announced blocks");
        let page_size = block.page_size() as usize;
        debug_assert_eq!(page_size, PAGE_SIZE);
        self.entries.clear();
        self.hashes.clear();
        // The buffer keeps its length between runs, so pages are read into
        // initialised memory without zeroing it again each time.
        let need = run.len() as usize * page_size;
        if self.payload.len() < need {
            self.payload.resize(need, 0);
        }
        let mut filled = 0;
        let mut zero = 0;
        // Deltas start with the second pass: the bulk pass fills no cache.
        let mut deltas = self.xbzrle.as_mut().filter(|_| run.epoch > 0);
        if let Some(d) = deltas.as_deref_mut() {
            d.table.clear();
            d.bytes.clear();
        }
        let (mut delta_pages, mut misses, mut overflows) = (0u64, 0u64, 0u64);
        for page in run.pages() {
            let offset = page as usize * page_size;
            let cache_key = deltas.as_deref().map(|d| {
                let global = d.numbering.global(run.block, page);
                (global, PageNumbering::local(global, d.channels))
            });
            // A zero page is recognised where it lies (a read at several
            // times the speed of a copy) and never copied. A write racing
            // with the check is in the dirty log, so the page goes again.
            let zero_in_place = self.zero_pages
                && block
                    .region()
                    .is_zero(offset, page_size)
                    .map_err(ChannelFailure::Memory)?;
            let encoding = if zero_in_place {
                zero += 1;
                if let (Some(d), Some((global, local))) = (deltas.as_deref_mut(), cache_key) {
                    d.cache.remove(global, local);
                }
                PageEncoding::Zero
            } else {
                let slot = &mut self.payload[filled..filled + page_size];
                block.region().read(offset, slot).map_err(ChannelFailure::Memory)?;
                // What the destination holds for the page, if cached: the
                // page goes as a delta against it when that is short.
                if let (Some(d), Some((global, local))) = (deltas.as_deref_mut(), cache_key) {
                    match d.cache.get_mut(global, local, run.epoch) {
                        Some(cached) => {
                            if migration_wire::xbzrle::encode(cached, slot, delta_limit(page_size), &mut d.scratch) {
                                if !d.scratch.is_empty() && !d.last_pass {
                                    cached.copy_from_slice(slot);
                                }
                                migration_wire::push_delta_entry(&mut d.table, page, d.scratch.len());
                                d.bytes.extend_from_slice(&d.scratch);
                                delta_pages += 1;
                                // The slot in `payload` is free for the next page.
                                continue;
                            }
                            if !d.last_pass {
                                cached.copy_from_slice(slot);
                            }
                            overflows += 1;
                        }
                        None => {
                            if !d.last_pass {
                                d.cache.insert(global, local, run.epoch, slot);
                            }
                            misses += 1;
                        }
                    }
                }
                if self.compression == Compression::None {
                    self.hashes.push(migration_wire::page::page_hash(slot));
                }
                filled += page_size;
                PageEncoding::Plain
            };
            PageEntry { page, encoding }.push_to(&mut self.entries);
        }
        if let Some(d) = deltas.as_deref()
            && delta_pages > 0
        {
            let batch = migration_wire::DeltaBatch::new(run.block.0, run.epoch, page_size as u32, &d.table, &d.bytes)
                .expect("a delta batch built from the engine's runs is consistent");
            tx.send(&Message::Deltas(batch))?;
            counters.delta_pages.fetch_add(delta_pages, Ordering::Relaxed);
            counters.delta_bytes.fetch_add(d.bytes.len() as u64, Ordering::Relaxed);
        }
        counters.cache_misses.fetch_add(misses, Ordering::Relaxed);
        counters.delta_overflows.fetch_add(overflows, Ordering::Relaxed);
        let plain = &self.payload[..filled];
        let compressed = filled > 0 && self.compression.compress(plain, &mut self.packed);
        let batch = if compressed {
            counters
                .compression_saved
                .fetch_add((filled - self.packed.len()) as u64, Ordering::Relaxed);
            PageBatch::with_codec(
                run.block.0,
                run.epoch,
                page_size as u32,
                self.compression.codec(),
                &self.entries,
                &self.packed,
            )
        } else {
            PageBatch::new(run.block.0, run.epoch, page_size as u32, &self.entries, plain).map(|batch| {
                if self.compression == Compression::None {
                    batch.with_hashes(&self.hashes)
                } else {
                    batch
                }
            })
        }
        .expect("a batch built from the engine's runs is consistent");
        if !batch.is_empty() {
            tx.send(&Message::Pages(batch))?;
        }
        counters
            .ram_bytes
            .fetch_add(run.len() * page_size as u64, Ordering::Relaxed);
        counters.zero_pages.fetch_add(zero, Ordering::Relaxed);
        counters
            .plain_pages
            .fetch_add(run.len() - zero - delta_pages, Ordering::Relaxed);
        Ok(())
    }
}

/// The pages still to send in postcopy, per block: set at the switch,
/// claimed (cleared) by whoever sends a page first, the background stream
/// or a page request.
#[derive(Debug)]
pub(super) struct PendingPages {
    pub(super) blocks: Vec<AtomicBitmap>,
    /// The epoch postcopy pages carry; set at the switch.
    pub(super) epoch: AtomicU64,
    /// Set at the switch: page requests are expected from then on.
    pub(super) active: std::sync::atomic::AtomicBool,
    /// Pages requested by the destination and queued on the urgent channel.
    pub(super) requested: AtomicU64,
}

impl PendingPages {
    pub(super) fn new(ram: &Ram) -> Self {
        Self {
            blocks: ram.blocks().iter().map(|b| AtomicBitmap::new(b.pages())).collect(),
            epoch: AtomicU64::new(0),
            active: std::sync::atomic::AtomicBool::new(false),
            requested: AtomicU64::new(0),
        }
    }

    /// Checks a request against the blocks and turns it into a run for the
    /// urgent channel, claiming its pages from the background stream.
    fn serve(&self, request: PageRequest) -> Result<PageRun, String> {
        let Some(pending) = self.blocks.get(request.block as usize) else {
            return Err(format!(
                "the destination asked for pages of block {}, but there are {} blocks",
                request.block,
                self.blocks.len()
            ));
        };
        let end = request.page.checked_add(request.count.into());
        if request.count > MAX_PAGES_PER_BATCH || end.is_none_or(|end| end > pending.len()) {
            return Err(format!(
                "the destination asked for {} pages from page {} of block {} of {} pages (outside it, or more than {MAX_PAGES_PER_BATCH} at once)",
                request.count,
                request.page,
                request.block,
                pending.len()
            ));
        }
        for page in request.page..request.page + u64::from(request.count) {
            pending.test_and_clear(page);
        }
        self.requested.fetch_add(request.count.into(), Ordering::Relaxed);
        Ok(PageRun::contiguous(
            BlockId(request.block),
            request.page,
            request.count.into(),
            self.epoch.load(Ordering::Acquire),
        ))
    }
}

/// The urgent-page channel's sending half: the return-path reader sends
/// requested pages on it itself, so a request costs no hand-over to another
/// thread; the lock is taken by the control thread only to end the stream.
pub(super) struct UrgentSender {
    pub(super) tx: Box<dyn ChannelTx>,
    pub(super) encoder: PageEncoder,
    pub(super) counters: Arc<Counters>,
}

impl UrgentSender {
    /// Sends one message, counting its bytes.
    pub(super) fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        let before = self.tx.bytes_sent();
        let result = self.tx.send(message);
        self.counters
            .wire_bytes
            .fetch_add(self.tx.bytes_sent() - before, Ordering::Relaxed);
        result
    }

    fn send_run(&mut self, ram: &Ram, run: PageRun) -> Result<(), ChannelFailure> {
        let before = self.tx.bytes_sent();
        let result = self.encoder.send_run(self.tx.as_mut(), ram, &run, &self.counters);
        self.counters
            .wire_bytes
            .fetch_add(self.tx.bytes_sent() - before, Ordering::Relaxed);
        result
    }
}

/// Where the return-path reader sends page requests: straight onto the
/// urgent channel, so a request never waits behind the control loop or
/// another thread's wake-up.
pub(super) struct RequestRoute {
    pub(super) urgent: Arc<Mutex<UrgentSender>>,
    pub(super) pending: Arc<PendingPages>,
    pub(super) ram: Ram,
}

/// The return path: forwards what the destination says; page requests go
/// straight to the urgent channel (see [`RequestRoute`]).
pub(super) fn spawn_reader_thread(mut rx: Box<dyn ChannelRx>, route: Option<RequestRoute>) -> Receiver<Returned> {
    let (forward, returned) = bounded(1024);
    std::thread::Builder::new()
        .name("migration-return-path".into())
        .spawn(move || {
            // It serves page requests (postcopy): a guest waits on each.
            let _ = migration_sys::thread::prefer_latency();
            if route.is_some() {
                rx.prefer_latency();
            }
            // The destination may be quiet for long stretches (a long pass).
            if let Err(err) = rx.set_timeout(None) {
                let _ = forward.send(Returned::Failed(err));
                return;
            }
            loop {
                let message = match rx.recv() {
                    Ok(Message::Ack(ack)) => Returned::Ack(ack.epoch),
                    Ok(Message::Ready) => Returned::Ready,
                    Ok(Message::Prepared) => Returned::Prepared,
                    Ok(Message::Resumed) => Returned::Resumed,
                    Ok(Message::Verdict(v)) => Returned::Verdict(v),
                    Ok(Message::Error(e)) => Returned::Error(e),
                    Ok(Message::PageRequest(request)) => match &route {
                        Some(route) if route.pending.active.load(Ordering::Acquire) => {
                            match route.pending.serve(request) {
                                Ok(run) => {
                                    let mut urgent = route.urgent.lock().unwrap_or_else(|e| e.into_inner());
                                    match urgent.send_run(&route.ram, run) {
                                        Ok(()) => continue,
                                        Err(ChannelFailure::Transport(err)) => Returned::Failed(err),
                                        Err(ChannelFailure::Memory(err)) => {
                                            Returned::Protocol(format!("reading a requested page failed: {err}"))
                                        }
                                    }
                                }
                                Err(problem) => Returned::Protocol(problem),
                            }
                        }
                        _ => Returned::Unexpected("page-request"),
                    },
                    Ok(other) => Returned::Unexpected(other.kind().name()),
                    Err(err) => Returned::Failed(err),
                };
                let last = matches!(
                    message,
                    Returned::Failed(_) | Returned::Error(_) | Returned::Verdict(_) | Returned::Protocol(_)
                );
                if forward.send(message).is_err() || last {
                    return;
                }
            }
        })
        .expect("spawning the return-path thread");
    returned
}
