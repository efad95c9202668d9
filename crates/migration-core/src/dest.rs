//! The destination runtime: the handshake, then placing every page into
//! guest RAM, checked against the announced blocks, then READY / GO and
//! the digest comparison.

use crate::bitmap::Bitmap;
use crate::error_chain::ErrorChain;
use crate::ram::Ram;
use crate::stats::{Event, Stats};
use crate::transport::{Channel, TransportError};
use crate::verify::{block_digest, page_hash};
use crate::vm::{Vm, VmError};
use migration_wire::{
    Ack, BlockList, ErrorCode, Features, Hello, HelloReply, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, PageBatch,
    PageEncoding, PeerError, SessionId, Verdict,
};
use std::time::{Duration, Instant};

/// Limits and timeouts of an incoming migration.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Largest total guest RAM accepted, in bytes.
    pub max_ram: u64,
    /// Longest silence from the source before the migration fails.
    pub io_timeout: Duration,
    /// How often a progress event is emitted.
    pub progress_interval: Duration,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            max_ram: 64 << 30,
            io_timeout: Duration::from_secs(30),
            progress_interval: Duration::from_millis(200),
        }
    }
}

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// The channel failed.
    #[error("connection to the source failed")]
    Transport(#[from] TransportError),
    /// The source broke the protocol.
    #[error("source broke the protocol: {0}")]
    Protocol(String),
    /// No protocol version in common.
    #[error(
        "source speaks protocol versions {min}..={max}, this destination {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
    )]
    Version {
        /// Oldest version the source speaks.
        min: u16,
        /// Newest version the source speaks.
        max: u16,
    },
    /// The source asked for more than the limits allow.
    #[error("{0}")]
    Limit(String),
    /// The source gave up.
    #[error("source aborted: {0}")]
    Aborted(String),
    /// The VM failed to load its state or resume.
    #[error("vm control failed")]
    Vm(#[from] VmError),
    /// Guest memory could not be written.
    #[error("guest memory access failed")]
    Memory(#[from] migration_sys::SysError),
}

impl DestError {
    fn code(&self) -> ErrorCode {
        match self {
            DestError::Protocol(_) | DestError::Transport(TransportError::Malformed(_)) => ErrorCode::Protocol,
            DestError::Version { .. } => ErrorCode::Version,
            DestError::Limit(_) => ErrorCode::Limit,
            DestError::Aborted(_) => ErrorCode::Cancelled,
            DestError::Transport(_) | DestError::Vm(_) | DestError::Memory(_) => ErrorCode::Internal,
        }
    }
}

/// A connection whose handshake succeeded: the block list is known, guest
/// RAM is not yet prepared.
pub struct Incoming {
    channel: Box<dyn Channel>,
    hello: Hello,
    blocks: BlockList,
    started: Instant,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("peer", &self.channel.peer())
            .field("session", &self.hello.session)
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl Incoming {
    /// The blocks the source announced (already checked against the limits).
    pub fn blocks(&self) -> &BlockList {
        &self.blocks
    }

    /// The session id.
    pub fn session(&self) -> SessionId {
        self.hello.session
    }

    /// The source's address.
    pub fn peer(&self) -> String {
        self.channel.peer()
    }

    /// Refuses the migration after the handshake (guest RAM could not be
    /// prepared), telling the source why.
    pub fn refuse(mut self, code: ErrorCode, message: &str) {
        let _ = self.channel.send(&Message::Error(PeerError {
            code,
            message: message.to_string(),
        }));
    }
}

/// Runs the handshake on a new connection. On a refusal the source is told
/// why before the error returns.
pub fn accept(mut channel: Box<dyn Channel>, options: &DestOptions) -> Result<Incoming, DestError> {
    let started = Instant::now();
    let result = handshake(channel.as_mut(), options);
    match result {
        Ok((hello, blocks)) => Ok(Incoming {
            channel,
            hello,
            blocks,
            started,
        }),
        Err(err) => {
            tell_peer(channel.as_mut(), &err);
            Err(err)
        }
    }
}

fn tell_peer(channel: &mut dyn Channel, err: &DestError) {
    if matches!(
        err,
        DestError::Transport(TransportError::Closed | TransportError::Io { .. })
    ) {
        return;
    }
    let _ = channel.send(&Message::Error(PeerError {
        code: err.code(),
        message: ErrorChain(err).to_string(),
    }));
}

fn handshake(channel: &mut dyn Channel, options: &DestOptions) -> Result<(Hello, BlockList), DestError> {
    channel.set_timeout(Some(options.io_timeout))?;
    let hello = match channel.recv()? {
        Message::Hello(hello) => hello,
        other => {
            return Err(DestError::Protocol(format!(
                "expected hello, got {}",
                other.kind().name()
            )));
        }
    };
    let version = hello.max_version.min(PROTOCOL_VERSION);
    if version < hello.min_version || version < MIN_PROTOCOL_VERSION {
        return Err(DestError::Version {
            min: hello.min_version,
            max: hello.max_version,
        });
    }
    if hello.channels != 1 {
        return Err(DestError::Limit(format!(
            "source proposes {} channels, this destination accepts at most 1",
            hello.channels
        )));
    }
    channel.send(&Message::HelloReply(HelloReply {
        version,
        features: hello.features.intersect(Features::KNOWN),
        session: hello.session,
        channels: 1,
    }))?;
    let blocks = match channel.recv()? {
        Message::BlockList(blocks) => blocks,
        other => {
            return Err(DestError::Protocol(format!(
                "expected block-list, got {}",
                other.kind().name()
            )));
        }
    };
    let total = blocks.total_bytes();
    if total > options.max_ram {
        return Err(DestError::Limit(format!(
            "block list of {} bytes ({} blocks) exceeds the destination's limit of {} bytes (--max-mem)",
            total,
            blocks.blocks.len(),
            options.max_ram
        )));
    }
    for (i, block) in blocks.blocks.iter().enumerate() {
        if block.page_size as usize != migration_sys::PAGE_SIZE {
            return Err(DestError::Limit(format!(
                "block {i} ({}) uses {}-byte pages; this destination places {}-byte pages",
                block.name,
                block.page_size,
                migration_sys::PAGE_SIZE
            )));
        }
        if blocks.blocks[..i].iter().any(|b| b.name == block.name) {
            return Err(DestError::Protocol(format!(
                "block name {} announced twice",
                block.name
            )));
        }
    }
    Ok((hello, blocks))
}

/// The result of a migration that completed on this side.
#[derive(Debug, Clone)]
pub struct DestReport {
    /// Final figures.
    pub stats: Stats,
    /// Whether the source's digests matched the pages placed (`None` if the
    /// source never sent them).
    pub verified: Option<bool>,
    /// Blocks whose digests differ.
    pub mismatched_blocks: Vec<u32>,
    /// Time from the first handshake byte to the handover (GO).
    pub until_handover: Duration,
}

/// A failed incoming migration.
#[derive(Debug)]
pub struct DestFailure {
    /// What went wrong.
    pub error: DestError,
    /// Figures at the failure.
    pub stats: Stats,
    /// GO was received: the VM runs here.
    pub resumed: bool,
}

/// How a page is known to hold zeros before it is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshMemory {
    /// Fresh anonymous memory: every page is zero until written, so a zero
    /// page needs no write.
    Zeroed,
    /// Reused memory (a file): every page is overwritten.
    Unknown,
}

/// Receives the migration into `ram` (which must match the block list),
/// drives `vm` through load and resume, and compares digests.
pub fn run_destination(
    incoming: Incoming,
    ram: &Ram,
    fresh: FreshMemory,
    vm: &mut dyn Vm,
    options: &DestOptions,
    observer: &mut dyn FnMut(&Event),
) -> Result<DestReport, Box<DestFailure>> {
    let Incoming {
        mut channel,
        blocks,
        started,
        ..
    } = incoming;
    let mut placer = Placer::new(ram, fresh);
    let prefault = Prefault::start(ram);
    let mut state = DestRun {
        started,
        prefault: &prefault,
        worker: PlaceWorker::start(),
        placer: &mut placer,
        resumed: false,
        iterations: 0,
        handover: None,
    };
    let result = state.run(channel.as_mut(), &blocks, vm, options, observer);
    let resumed = state.resumed;
    let iterations = state.iterations;
    let handover = state.handover;
    drop(state);
    drop(prefault);
    let mut stats = placer.stats(started);
    stats.transferred_bytes = channel.bytes_received() + channel.bytes_sent();
    stats.iterations = iterations;
    match result {
        Ok((verified, mismatched_blocks)) => Ok(DestReport {
            stats,
            verified,
            mismatched_blocks,
            until_handover: handover.unwrap_or_else(|| started.elapsed()),
        }),
        Err(error) => {
            tell_peer(channel.as_mut(), &error);
            Err(Box::new(DestFailure { error, stats, resumed }))
        }
    }
}

struct DestRun<'a, 'r> {
    started: Instant,
    prefault: &'a Prefault,
    worker: PlaceWorker,
    placer: &'a mut Placer<'r>,
    resumed: bool,
    iterations: u64,
    handover: Option<Duration>,
}

impl DestRun<'_, '_> {
    fn run(
        &mut self,
        channel: &mut dyn Channel,
        blocks: &BlockList,
        vm: &mut dyn Vm,
        options: &DestOptions,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(Option<bool>, Vec<u32>), DestError> {
        if self.placer.ram.block_list() != *blocks {
            return Err(DestError::Limit(
                "prepared guest RAM does not match the block list".into(),
            ));
        }
        channel.send(&Message::BlocksAccepted)?;
        observer(&Event::Started);
        let mut epoch = 0u64;
        let mut device_state: Option<Vec<u8>> = None;
        let mut pages_in_epoch = 0u64;
        let mut next_progress = Instant::now();
        // Pages and markers until the end of RAM.
        loop {
            if Instant::now() >= next_progress {
                let mut stats = self.placer.stats(self.started);
                stats.transferred_bytes = channel.bytes_received();
                stats.iterations = epoch;
                observer(&Event::Progress(stats));
                next_progress = Instant::now() + options.progress_interval;
            }
            let mut placement = None;
            let ack = match channel.recv()? {
                Message::Pages(batch) => {
                    if batch.epoch != epoch {
                        return Err(DestError::Protocol(format!(
                            "page batch of epoch {} while receiving epoch {epoch}",
                            batch.epoch
                        )));
                    }
                    placement = Some(self.placer.plan(&batch)?);
                    pages_in_epoch += batch.len() as u64;
                    self.prefault
                        .advance(self.placer.placed * migration_sys::PAGE_SIZE as u64);
                    None
                }
                Message::SyncMarker(marker) => {
                    if marker.pages != pages_in_epoch {
                        return Err(DestError::Protocol(format!(
                            "sync marker of epoch {} counts {} pages, {pages_in_epoch} arrived",
                            marker.epoch, marker.pages
                        )));
                    }
                    pages_in_epoch = 0;
                    if marker.epoch != epoch {
                        return Err(DestError::Protocol(format!(
                            "sync marker for epoch {} while receiving epoch {epoch}",
                            marker.epoch
                        )));
                    }
                    epoch += 1;
                    Some(Ack {
                        epoch: marker.epoch,
                        pages: self.placer.placed,
                        bytes: channel.bytes_received(),
                    })
                }
                Message::DeviceState(blob) => {
                    if device_state.is_some() {
                        return Err(DestError::Protocol("device state sent twice".into()));
                    }
                    device_state = Some(blob.to_vec());
                    None
                }
                Message::EndOfRam(end) => {
                    if end.epochs != epoch {
                        return Err(DestError::Protocol(format!(
                            "end of RAM after {} epochs, but {epoch} epochs were received",
                            end.epochs
                        )));
                    }
                    break;
                }
                Message::Abort(reason) => return Err(DestError::Aborted(reason)),
                other => {
                    return Err(DestError::Protocol(format!(
                        "unexpected {} during the transfer",
                        other.kind().name()
                    )));
                }
            };
            if let Some(placement) = placement {
                // The body moves to the placement thread; receive into a spare.
                let body = channel.take_body(self.worker.spare());
                self.worker.submit(placement, body)?;
            }
            if let Some(ack) = ack {
                // Acknowledge an epoch only once it is in guest RAM.
                self.worker.flush()?;
                channel.send(&Message::Ack(ack))?;
            }
        }
        self.worker.flush()?;
        self.iterations = epoch;
        if let Some(missing) = self.placer.first_missing() {
            return Err(DestError::Protocol(format!(
                "end of RAM, but page {} of block {} never arrived",
                missing.1, missing.0
            )));
        }
        let Some(device_state) = device_state else {
            return Err(DestError::Protocol("end of RAM without device state".into()));
        };
        vm.load_device_state(&device_state)?;
        channel.send(&Message::Ready)?;
        observer(&Event::Ready);
        let go = channel.recv().map_err(|err| {
            DestError::Protocol(format!(
                "after READY, waiting for GO: {}; this side never ran the guest, the source decides",
                ErrorChain(&err)
            ))
        })?;
        match go {
            Message::Go => {}
            Message::Abort(reason) => return Err(DestError::Aborted(reason)),
            other => return Err(DestError::Protocol(format!("expected go, got {}", other.kind().name()))),
        }
        self.handover = Some(self.started.elapsed());
        vm.resume()?;
        self.resumed = true;
        channel.send(&Message::Resumed)?;
        observer(&Event::Resumed);

        // The VM runs here now; compare the source's frozen RAM with what
        // was placed. The source hashes all of its RAM first: allow for it.
        let hashing = Duration::from_secs_f64(self.placer.ram.total_bytes() as f64 / (256u64 << 20) as f64);
        channel.set_timeout(Some(options.io_timeout + hashing))?;
        let digests = match channel.recv()? {
            Message::Complete(complete) => complete.digests,
            other => {
                return Err(DestError::Protocol(format!(
                    "expected complete, got {}",
                    other.kind().name()
                )));
            }
        };
        if digests.len() != self.placer.hashes.len() {
            return Err(DestError::Protocol(format!(
                "{} digests for {} blocks",
                digests.len(),
                self.placer.hashes.len()
            )));
        }
        let mismatched: Vec<u32> = self
            .placer
            .hashes
            .iter()
            .zip(&digests)
            .enumerate()
            .filter(|(_, (hashes, digest))| block_digest(hashes) != **digest)
            .map(|(i, _)| i as u32)
            .collect();
        let verdict = Verdict {
            mismatched: mismatched.clone(),
        };
        observer(&Event::Verified(verdict.is_verified()));
        channel.send(&Message::Verdict(verdict))?;
        Ok((Some(mismatched.is_empty()), mismatched))
    }
}

/// Populates guest RAM ahead of the incoming stream on a thread of its own:
/// first touch of fresh memory is slow (the kernel, and the host under it,
/// supply and zero every page), and the bulk pass places pages in address
/// order, so doing it ahead moves that cost off the receiving thread. It
/// stays at most [`Prefault::WINDOW`] bytes ahead of what was placed, so a
/// peer's announcement alone never commits memory.
struct Prefault {
    shared: std::sync::Arc<PrefaultState>,
    thread: Option<std::thread::JoinHandle<()>>,
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

    fn start(ram: &Ram) -> Self {
        let shared = std::sync::Arc::new(PrefaultState::default());
        // File-backed memory is filled through the page cache by the
        // placement thread (see `GuestRegion::place`), without zeroing and
        // without touching pages that stay zero: only anonymous memory is
        // populated ahead.
        let regions: Vec<_> = ram
            .blocks()
            .iter()
            .filter(|b| !b.region().is_shared())
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
        Self { shared, thread }
    }

    /// Reports how many bytes were placed so far.
    fn advance(&self, placed: u64) {
        self.shared.progress.lock().unwrap_or_else(|e| e.into_inner()).0 = placed;
        self.shared.moved.notify_one();
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.shared.progress.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.shared.moved.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Places pages into guest RAM and keeps the hash of every page placed.
struct Placer<'r> {
    ram: &'r Ram,
    hashes: Vec<Vec<u64>>,
    received: Vec<Bitmap>,
    zeroed: Vec<Bitmap>,
    zero_hash: u64,
    placed: u64,
    zero_pages: u64,
    plain_pages: u64,
}

impl<'r> Placer<'r> {
    fn new(ram: &'r Ram, fresh: FreshMemory) -> Self {
        let page = migration_sys::PAGE_SIZE;
        Self {
            ram,
            hashes: ram.blocks().iter().map(|b| vec![0; b.pages() as usize]).collect(),
            received: ram.blocks().iter().map(|b| Bitmap::new(b.pages())).collect(),
            zeroed: ram
                .blocks()
                .iter()
                .map(|b| match fresh {
                    FreshMemory::Zeroed => Bitmap::full(b.pages()),
                    FreshMemory::Unknown => Bitmap::new(b.pages()),
                })
                .collect(),
            zero_hash: page_hash(&vec![0; page]),
            placed: 0,
            zero_pages: 0,
            plain_pages: 0,
        }
    }

    fn stats(&self, started: Instant) -> Stats {
        Stats {
            ram_bytes: self.ram.total_bytes(),
            ram_transferred: self.placed * migration_sys::PAGE_SIZE as u64,
            zero_pages: self.zero_pages,
            plain_pages: self.plain_pages,
            elapsed: started.elapsed(),
            ..Stats::default()
        }
    }

    fn first_missing(&self) -> Option<(usize, u64)> {
        self.received
            .iter()
            .enumerate()
            .find_map(|(block, map)| map.next_clear(0).map(|page| (block, page)))
    }

    /// Checks a batch against the announced blocks and records its pages
    /// (hashes, received and zero bitmaps), returning the writes that place
    /// it. Nothing is written on a batch that fails a check.
    fn plan(&mut self, batch: &PageBatch<'_>) -> Result<Placement, DestError> {
        let index = batch.block as usize;
        let Some(block) = self.ram.blocks().get(index) else {
            return Err(DestError::Protocol(format!(
                "page batch for block {}, but only {} blocks were announced",
                batch.block,
                self.ram.blocks().len()
            )));
        };
        let page_size = block.page_size() as usize;
        if batch.page_size as usize != page_size {
            return Err(DestError::Protocol(format!(
                "page batch with {}-byte pages for block {} of {page_size}-byte pages",
                batch.page_size,
                block.name()
            )));
        }
        let pages = block.pages();
        let payload = batch.payload();
        let mut placement = Placement {
            region: std::sync::Arc::clone(block.region()),
            page_size,
            payload_at: batch.payload_offset(),
            writes: Vec::new(),
        };
        let mut data_at = 0usize;
        for entry in batch.entries() {
            let entry = entry.map_err(|e| DestError::Protocol(e.to_string()))?;
            if entry.page >= pages {
                return Err(DestError::Protocol(format!(
                    "page {} is outside block {} of {pages} pages",
                    entry.page,
                    block.name()
                )));
            }
            let hash = match entry.encoding {
                PageEncoding::Plain => {
                    let bytes = payload
                        .get(data_at..data_at + page_size)
                        .ok_or_else(|| DestError::Protocol("page payload too short".into()))?;
                    placement.push_plain(entry.page, data_at);
                    data_at += page_size;
                    self.zeroed[index].test_and_clear(entry.page);
                    self.plain_pages += 1;
                    page_hash(bytes)
                }
                PageEncoding::Zero => {
                    if !self.zeroed[index].get(entry.page) {
                        placement.writes.push(Write::Zero { page: entry.page });
                        self.zeroed[index].set(entry.page);
                    }
                    self.zero_pages += 1;
                    self.zero_hash
                }
            };
            self.hashes[index][entry.page as usize] = hash;
            self.received[index].set(entry.page);
            self.placed += 1;
        }
        Ok(placement)
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
struct Placement {
    region: std::sync::Arc<migration_sys::GuestRegion>,
    page_size: usize,
    /// Where the payload starts in the frame body.
    payload_at: usize,
    writes: Vec<Write>,
}

impl Placement {
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
        let payload = &body[self.payload_at..];
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
struct PlaceWorker {
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

    fn start() -> Self {
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
    fn spare(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_default()
    }

    fn failed(state: &mut (usize, Option<migration_sys::SysError>)) -> Result<(), DestError> {
        match state.1.take() {
            Some(err) => Err(DestError::Memory(err)),
            None => Ok(()),
        }
    }

    fn submit(&self, placement: Placement, body: Vec<u8>) -> Result<(), DestError> {
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
    fn flush(&self) -> Result<(), DestError> {
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
