//! Saving: channels whose far end is a mapped-ram file.

use crate::replies::{Replies, ReplyRx};
use migration_core::bitmap::AtomicBitmap;
use migration_core::error_chain::ErrorChain;
use migration_core::transport::{ChannelHalves, Closer};
use migration_core::verify::{block_digest_atomic, page_hash, zero_page_hash};
use migration_core::{Channel, ChannelRx, ChannelTx, TransportError};
use migration_sys::AlignedBuf;
use migration_wire::mapped_ram::{BlockSummary, CommitRecord, Layout, bitmap_hash};
use migration_wire::{
    Ack, BlockList, Codec, ErrorCode, Features, HelloReply, Message, PROTOCOL_VERSION, PageBatch, PageEncoding,
    PeerError, SessionId, Verdict,
};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How a save writes.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Write page bytes with `O_DIRECT` (aligned, bypassing the page
    /// cache), as a save of a large guest should, so it does not evict
    /// everything else from memory.
    pub direct_io: bool,
    /// Submit each channel's writes through an io_uring ring of its own
    /// (plain positional writes where the kernel refuses io_uring).
    pub io_uring: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            direct_io: false,
            io_uring: true,
        }
    }
}

/// A snapshot being saved to a file: hands out the channels the source
/// runtime sends the migration into.
#[derive(Debug)]
pub struct SaveTarget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    partial: PathBuf,
    options: SaveOptions,
    /// Answers for the main channel (index 0).
    main: Arc<Replies>,
    file: OnceLock<SaveFile>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    session: Option<SessionId>,
    channels: u16,
    joined: Vec<bool>,
    /// Sync markers seen per epoch.
    markers: BTreeMap<u64, u16>,
    ended: u16,
    device_state: Option<Vec<u8>>,
    committed: bool,
    /// The source gave up: nothing may commit any more.
    aborted: bool,
}

/// The file and what has been written to it.
#[derive(Debug)]
struct SaveFile {
    layout: Layout,
    header_checksum: u64,
    /// Page bytes go through this one (`O_DIRECT` when asked).
    data: File,
    /// Header, bitmaps, device state and commit record go through this one.
    meta: File,
    /// Per block, one bit per page: its bytes are in the file.
    stored: Vec<AtomicBitmap>,
    /// Per block, the hash of every page as saved.
    hashes: Vec<Box<[AtomicU64]>>,
    pages: AtomicU64,
}

fn refused(what: impl Into<String>) -> TransportError {
    TransportError::invalid_data("saving", what)
}

impl SaveTarget {
    /// A save into `path`, written under a temporary name beside it until
    /// it commits.
    pub fn new(path: &Path, options: SaveOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                partial: crate::partial_path(path, "snapshot"),
                options,
                main: Arc::default(),
                file: OnceLock::new(),
                state: Mutex::default(),
            }),
        }
    }

    /// The channel with this index (0: the main channel).
    pub fn channel(&self, index: u16) -> SaveChannel {
        let replies = if index == 0 {
            Arc::clone(&self.shared.main)
        } else {
            Arc::default()
        };
        SaveChannel {
            tx: SaveTx {
                shared: Arc::clone(&self.shared),
                index,
                replies: Arc::clone(&replies),
                bounce: AlignedBuf::zeroed(0),
                ring: None,
                sent: 0,
                closed: Arc::default(),
            },
            rx: ReplyRx::new(replies),
        }
    }

    /// Whether the save committed: the file exists under its final name.
    pub fn committed(&self) -> bool {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).committed
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let committed = self.state.get_mut().map(|s| s.committed).unwrap_or(false);
        if !committed {
            // Never leave a half-written file behind when we know it is one.
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// A channel into the file. See the crate documentation.
#[derive(Debug)]
pub struct SaveChannel {
    tx: SaveTx,
    rx: ReplyRx,
}

/// The writing half.
#[derive(Debug)]
pub struct SaveTx {
    shared: Arc<Shared>,
    index: u16,
    replies: Arc<Replies>,
    /// Page bytes staged for `O_DIRECT`, which needs aligned memory.
    bounce: AlignedBuf,
    /// This channel's ring for page writes, once the file exists (`None`
    /// inside: io_uring refused, plain writes).
    ring: Option<Option<migration_sys::uring::UringSocket>>,
    sent: u64,
    closed: Arc<AtomicBool>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self) -> Result<&SaveFile, TransportError> {
        self.file.get().ok_or_else(|| refused("pages before the block list"))
    }

    fn create(&self, blocks: &BlockList, session: SessionId) -> Result<(), TransportError> {
        if self.file.get().is_some() {
            return Err(refused("a second block list"));
        }
        let layout = Layout::new(blocks).map_err(|e| refused(format!("a block list the file cannot hold: {e}")))?;
        let path = self.partial.display().to_string();
        let meta = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.partial)
            .map_err(|e| TransportError::io(format!("creating {path}"), e))?;
        meta.set_len(layout.state_offset)
            .map_err(|e| TransportError::io(format!("sizing {path}"), e))?;
        let header = layout.encode_header(session);
        meta.write_all_at(&header, 0)
            .map_err(|e| TransportError::io(format!("writing the header of {path}"), e))?;
        let data = crate::open_pages(&self.partial, true, self.options.direct_io, TransportError::io)?;
        let header_checksum = migration_wire::mapped_ram::FileHeader::decode(&header)
            .map_err(|e| refused(format!("the header just encoded does not decode: {e}")))?
            .checksum;
        let file = SaveFile {
            stored: layout.blocks.iter().map(|b| AtomicBitmap::new(b.pages())).collect(),
            hashes: layout
                .blocks
                .iter()
                .map(|b| migration_sys::zeroed_atomics(b.pages() as usize))
                .collect(),
            layout,
            header_checksum,
            data,
            meta,
            pages: AtomicU64::new(0),
        };
        self.file.set(file).map_err(|_| refused("a second block list"))
    }

    /// Writes bitmaps, device state and the commit record, and renames the
    /// file into place (see the crate docs for the order).
    fn commit(&self, epochs: u64, device_state: &[u8]) -> Result<(), TransportError> {
        let file = self.file()?;
        let path = self.partial.display().to_string();
        let layout = &file.layout;
        let mut summaries = Vec::with_capacity(layout.blocks.len());
        for (i, block) in layout.blocks.iter().enumerate() {
            let bitmap = file.stored[i].to_le_bytes();
            file.meta
                .write_all_at(&bitmap, block.bitmap_offset)
                .map_err(|e| TransportError::io(format!("writing the bitmap of {}", block.block.name), e))?;
            summaries.push(BlockSummary {
                digest: block_digest_atomic(&file.hashes[i]),
                stored_pages: bitmap.iter().map(|b| u64::from(b.count_ones())).sum(),
                bitmap_hash: bitmap_hash(&bitmap),
            });
        }
        file.meta
            .write_all_at(device_state, layout.state_offset)
            .map_err(|e| TransportError::io(format!("writing the device state to {path}"), e))?;
        let state_len = device_state.len() as u64;
        file.meta
            .set_len(layout.file_len(state_len))
            .map_err(|e| TransportError::io(format!("sizing {path}"), e))?;
        file.meta
            .sync_data()
            .map_err(|e| TransportError::io(format!("syncing {path}"), e))?;
        let record = CommitRecord {
            state_len,
            state_hash: migration_wire::mapped_ram::bitmap_hash(device_state),
            header_hash: file.header_checksum,
            epochs,
            blocks: summaries,
        };
        file.meta
            .write_all_at(&record.encode(layout), layout.commit_offset(state_len))
            .map_err(|e| TransportError::io(format!("writing the commit record of {path}"), e))?;
        file.meta
            .sync_data()
            .map_err(|e| TransportError::io(format!("syncing {path}"), e))?;
        crate::install(&self.partial, &self.path)
            .map_err(|e| TransportError::io(format!("renaming {path} to {}", self.path.display()), e))?;
        Ok(())
    }
}

impl SaveFile {
    fn mark(&self, block: usize, page: u64, stored: bool, hash: u64) {
        if stored {
            self.stored[block].set(page);
        } else {
            self.stored[block].test_and_clear(page);
        }
        self.hashes[block][page as usize].store(hash, Ordering::Relaxed);
    }
}

impl SaveTx {
    fn write_pages(&mut self, batch: &PageBatch<'_>) -> Result<(), TransportError> {
        let shared = Arc::clone(&self.shared);
        let file = shared.file()?;
        let index = batch.block as usize;
        let Some(block) = file.layout.blocks.get(index) else {
            return Err(refused(format!("pages of block {}, which does not exist", batch.block)));
        };
        let page_size = block.block.page_size as usize;
        if batch.codec() != Codec::None || batch.page_size as usize != page_size {
            return Err(refused("a compressed batch, or one of another page size"));
        }
        let payload = batch.payload();
        let known = batch.page_hashes();
        // Runs of plain pages adjacent in the file are written at once.
        let mut run: Option<(u64, usize, usize)> = None; // first page, payload offset, pages
        let mut at = 0usize;
        let mut plain = 0usize;
        for entry in batch.entries() {
            let entry = entry.map_err(|e| refused(e.to_string()))?;
            if entry.page >= block.pages() {
                return Err(refused(format!(
                    "page {} past the end of {}",
                    entry.page, block.block.name
                )));
            }
            match entry.encoding {
                PageEncoding::Plain => {
                    let bytes = &payload[at..at + page_size];
                    let hash = known
                        .and_then(|h| h.get(plain).copied())
                        .unwrap_or_else(|| page_hash(bytes));
                    file.mark(index, entry.page, true, hash);
                    run = match run {
                        Some((first, from, n)) if first + n as u64 == entry.page => Some((first, from, n + 1)),
                        Some(done) => {
                            self.write_run(file, index, done, payload)?;
                            Some((entry.page, at, 1))
                        }
                        None => Some((entry.page, at, 1)),
                    };
                    at += page_size;
                    plain += 1;
                }
                PageEncoding::Zero => file.mark(index, entry.page, false, zero_page_hash()),
            }
        }
        if let Some(done) = run {
            self.write_run(file, index, done, payload)?;
        }
        file.pages.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_run(
        &mut self,
        file: &SaveFile,
        block: usize,
        (first, from, pages): (u64, usize, usize),
        payload: &[u8],
    ) -> Result<(), TransportError> {
        let layout = &file.layout.blocks[block];
        let len = pages * layout.block.page_size as usize;
        let bytes = &payload[from..from + len];
        let offset = layout.page_offset(first);
        let options = &self.shared.options;
        let ring = self.ring.get_or_insert_with(|| {
            options
                .io_uring
                .then(|| migration_sys::uring::UringSocket::new(&file.data).ok())
                .flatten()
        });
        let bytes = if options.direct_io {
            if self.bounce.len() < len {
                self.bounce = AlignedBuf::zeroed(len.next_power_of_two());
            }
            self.bounce[..len].copy_from_slice(bytes);
            &self.bounce[..len]
        } else {
            bytes
        };
        let result = match ring {
            Some(ring) => ring.write_all_at(bytes, offset),
            None => file.data.write_all_at(bytes, offset),
        };
        result.map_err(|e| TransportError::io(format!("writing pages of {} at offset {offset}", layout.block.name), e))
    }

    fn handle(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        let shared = Arc::clone(&self.shared);
        match message {
            Message::Hello(hello) if self.index == 0 => {
                if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) {
                    self.replies.push(&Message::Error(PeerError {
                        code: ErrorCode::Version,
                        message: format!("the file format speaks protocol version {PROTOCOL_VERSION}"),
                    }));
                    return Ok(());
                }
                let mut state = shared.state();
                state.session = Some(hello.session);
                state.channels = hello.channels.max(1);
                state.joined = vec![false; state.channels as usize];
                self.replies.push(&Message::HelloReply(HelloReply {
                    version: PROTOCOL_VERSION,
                    // Pages are stored as they are: no compression.
                    features: hello.features.intersect(Features::ZERO_PAGES),
                    session: hello.session,
                    channels: state.channels,
                }));
            }
            Message::BlockList(blocks) if self.index == 0 => {
                let session = shared
                    .state()
                    .session
                    .ok_or_else(|| refused("a block list before hello"))?;
                if let Err(err) = shared.create(blocks, session) {
                    self.replies.push(&Message::Error(PeerError {
                        code: ErrorCode::Internal,
                        message: ErrorChain(&err).to_string(),
                    }));
                    return Err(err);
                }
                self.replies.push(&Message::BlocksAccepted);
            }
            Message::ChannelHello(hello) => {
                let mut state = shared.state();
                let index = hello.index as usize;
                let fits = Some(hello.session) == state.session
                    && hello.index == self.index
                    && (1..state.joined.len()).contains(&index)
                    && !state.joined[index];
                if !fits {
                    return Err(refused(format!("channel {} of another save, or twice", hello.index)));
                }
                state.joined[index] = true;
                self.replies.push(&Message::ChannelAccepted);
            }
            Message::Pages(batch) => self.write_pages(batch)?,
            Message::SyncMarker(marker) => {
                let mut state = shared.state();
                let channels = state.channels;
                let seen = state.markers.entry(marker.epoch).or_default();
                *seen += 1;
                if *seen == channels {
                    // Every channel's pages of the epoch are written.
                    let pages = shared.file()?.pages.load(Ordering::Relaxed);
                    shared.main.push(&Message::Ack(Ack {
                        epoch: marker.epoch,
                        pages,
                        bytes: 0,
                    }));
                }
            }
            Message::DeviceState(blob) if self.index == 0 => {
                shared.state().device_state = Some(blob.to_vec());
            }
            Message::EndOfRam(end) => {
                let mut state = shared.state();
                state.ended += 1;
                if state.aborted {
                    return Err(refused("the source aborted the save"));
                }
                if state.ended == state.channels {
                    let device_state = state.device_state.take().unwrap_or_default();
                    match shared.commit(end.epochs, &device_state) {
                        Ok(()) => {
                            state.committed = true;
                            shared.main.push(&Message::Ready);
                        }
                        Err(err) => {
                            shared.main.push(&Message::Error(PeerError {
                                code: ErrorCode::Internal,
                                message: format!("the snapshot did not commit: {}", ErrorChain(&err)),
                            }));
                            return Err(err);
                        }
                    }
                }
            }
            Message::Go if self.index == 0 => self.replies.push(&Message::Resumed),
            Message::Complete(complete) if self.index == 0 => {
                let file = shared.file()?;
                let mismatched = file
                    .hashes
                    .iter()
                    .enumerate()
                    .filter(|(i, hashes)| complete.digests.get(*i) != Some(&block_digest_atomic(hashes)))
                    .map(|(i, _)| i as u32)
                    .collect();
                self.replies.push(&Message::Verdict(Verdict { mismatched }));
            }
            Message::Abort(_) => self.replies.close(),
            other => {
                return Err(refused(format!(
                    "unexpected {} on channel {}",
                    other.kind().name(),
                    self.index
                )));
            }
        }
        Ok(())
    }
}

impl ChannelTx for SaveTx {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(TransportError::Closed);
        }
        self.handle(message)?;
        if let Message::Pages(batch) = message {
            self.sent += batch.body_len() as u64;
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn shutdown(&mut self) {}
}

impl ChannelTx for SaveChannel {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.tx.send(message)
    }

    fn bytes_sent(&self) -> u64 {
        self.tx.bytes_sent()
    }

    fn shutdown(&mut self) {
        self.tx.shutdown();
    }
}

impl ChannelRx for SaveChannel {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        self.rx.recv()
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        self.rx.take_body(replacement)
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.rx.set_timeout(timeout)
    }

    fn bytes_received(&self) -> u64 {
        self.rx.bytes_received()
    }
}

impl Channel for SaveChannel {
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        let SaveChannel { tx, rx } = *self;
        Ok((Box::new(tx), Box::new(rx)))
    }

    fn peer(&self) -> String {
        self.tx.shared.path.display().to_string()
    }

    fn closer(&self) -> Result<Closer, TransportError> {
        let replies = Arc::clone(&self.tx.replies);
        let closed = Arc::clone(&self.tx.closed);
        Ok(Box::new(move || {
            closed.store(true, Ordering::Relaxed);
            replies.close();
        }))
    }
}
