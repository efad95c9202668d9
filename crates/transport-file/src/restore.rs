//! Restoring: channels whose far end is a mapped-ram file.

use crate::{FileError, io_error};
use migration_core::error_chain::ErrorChain;
use migration_core::transport::{ChannelHalves, Closer};
use migration_core::{Channel, ChannelRx, ChannelTx, DirectPlacement, TransportError};
use migration_sys::AlignedBuf;
use migration_wire::mapped_ram::{self, CommitRecord, FileHeader};
use migration_wire::{
    BlockList, ChannelHello, Complete, EndOfRam, Features, Hello, Message, PROTOCOL_VERSION, PageBatch, PageEncoding,
    PageEntry, SyncMarker,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Pages per batch a restore channel reads (1 MiB of 4 KiB pages).
const CHUNK_PAGES: u64 = 256;

/// A checked snapshot file: header, commit record and bitmaps read and
/// validated, page bytes not read yet.
#[derive(Debug)]
pub struct Snapshot {
    /// The file.
    pub path: PathBuf,
    /// Its length in bytes.
    pub file_len: u64,
    /// Its header.
    pub header: FileHeader,
    /// Its commit record.
    pub commit: CommitRecord,
    /// Per block, the bitmap's bit-carrying bytes.
    pub bitmaps: Vec<Vec<u8>>,
}

fn invalid(path: &Path, problem: impl std::fmt::Display) -> FileError {
    FileError::Invalid {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

fn read_at(file: &File, path: &Path, offset: u64, len: usize, what: &str) -> Result<Vec<u8>, FileError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            invalid(path, format!("truncated: the file ends inside its {what}"))
        } else {
            io_error(format!("reading the {what} of {}", path.display()), e)
        }
    })?;
    Ok(buf)
}

impl Snapshot {
    /// Opens `path` and checks everything but the page bytes (which the
    /// digests in the commit record cover once they are placed).
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let file = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| io_error(format!("reading the size of {}", path.display()), e))?
            .len();
        let first = read_at(&file, path, 0, 64.min(file_len as usize).max(1), "file header")?;
        let header_len = mapped_ram::header_len(&first).map_err(|e| invalid(path, e))?;
        if header_len > 1 << 20 || header_len > file_len {
            return Err(invalid(path, format!("truncated: header of {header_len} bytes")));
        }
        let header_bytes = read_at(&file, path, 0, header_len as usize, "header")?;
        let header = FileHeader::decode(&header_bytes).map_err(|e| invalid(path, e))?;
        let layout = &header.layout;
        let commit_len = layout.commit_len();
        let unfinished = |problem: String| FileError::Unfinished {
            path: path.display().to_string(),
            problem,
        };
        if file_len < layout.state_offset + commit_len {
            return Err(unfinished(format!(
                "{file_len} bytes, shorter than its page areas and a commit record"
            )));
        }
        let record = read_at(&file, path, file_len - commit_len, commit_len as usize, "commit record")?;
        let commit = CommitRecord::decode(&header, file_len, &record).map_err(|e| unfinished(e.to_string()))?;
        // Bitmaps are read whole: bound them before allocating (1 GiB of
        // bitmap describes 32 TiB of 4 KiB pages).
        let bitmap_bytes: u64 = layout.blocks.iter().map(|b| b.bitmap_bytes() as u64).sum();
        if bitmap_bytes > 1 << 30 {
            return Err(invalid(
                path,
                format!("{bitmap_bytes} bytes of page bitmaps: more guest RAM than supported"),
            ));
        }
        let mut bitmaps = Vec::with_capacity(layout.blocks.len());
        for (block, summary) in layout.blocks.iter().zip(&commit.blocks) {
            let bitmap = read_at(&file, path, block.bitmap_offset, block.bitmap_bytes(), "page bitmap")?;
            let stored = mapped_ram::check_bitmap(block, &bitmap)
                .map_err(|e| invalid(path, format!("block {}: {e}", block.block.name)))?;
            if mapped_ram::bitmap_hash(&bitmap) != summary.bitmap_hash || stored != summary.stored_pages {
                return Err(invalid(
                    path,
                    format!("block {}: the page bitmap changed since the save", block.block.name),
                ));
            }
            bitmaps.push(bitmap);
        }
        Ok(Self {
            path: path.to_owned(),
            file_len,
            header,
            commit,
            bitmaps,
        })
    }

    /// The RAM blocks the snapshot holds.
    pub fn blocks(&self) -> BlockList {
        BlockList {
            blocks: self.header.layout.blocks.iter().map(|b| b.block.clone()).collect(),
        }
    }

    /// Whether page `page` of block `block` has its bytes stored.
    pub fn stored(&self, block: usize, page: u64) -> bool {
        self.bitmaps[block][(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    /// Reads the device state, checked against its hash.
    pub fn device_state(&self, file: &File) -> Result<Vec<u8>, FileError> {
        self.state_reader()(file)
    }

    /// What reading the device state needs, owned, for a thread of its own.
    pub(crate) fn state_reader(&self) -> impl FnOnce(&File) -> Result<Vec<u8>, FileError> + Send + 'static {
        let (path, offset, len, hash) = (
            self.path.clone(),
            self.header.layout.state_offset,
            self.commit.state_len as usize,
            self.commit.state_hash,
        );
        move |file| {
            let state = read_at(file, &path, offset, len, "device state")?;
            if mapped_ram::bitmap_hash(&state) != hash {
                return Err(invalid(&path, "the device state changed since the save"));
            }
            Ok(state)
        }
    }

    /// Opens the file for page reads, with `O_DIRECT` when asked (checked
    /// against what the file system requires).
    pub(crate) fn open_pages(&self, direct_io: bool) -> Result<File, FileError> {
        crate::open_pages(&self.path, false, direct_io, io_error)
    }
}

/// A snapshot being restored: hands out the channels the destination
/// runtime receives the migration from.
#[derive(Debug)]
pub struct RestoreSource {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshot: Snapshot,
    /// Page bytes are read through this one (`O_DIRECT` when asked).
    data: File,
    meta: File,
    channels: u16,
    direct_io: bool,
}

impl RestoreSource {
    /// Opens and checks `path` for a restore over `channels` channels;
    /// `direct_io` reads page bytes with `O_DIRECT`.
    pub fn open(path: &Path, channels: u16, direct_io: bool) -> Result<Self, FileError> {
        let snapshot = Snapshot::open(path)?;
        let data = snapshot.open_pages(direct_io)?;
        let meta = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                snapshot,
                data,
                meta,
                channels: channels.max(1),
                direct_io,
            }),
        })
    }

    /// The checked file.
    pub fn snapshot(&self) -> &Snapshot {
        &self.shared.snapshot
    }

    /// Channels the restore uses.
    pub fn channels(&self) -> u16 {
        self.shared.channels
    }

    /// The channel with this index (0: the main channel).
    pub fn channel(&self, index: u16) -> RestoreChannel {
        RestoreChannel {
            shared: Arc::clone(&self.shared),
            index,
            step: Step::Start,
            block: 0,
            chunk: u64::from(index),
            pages: 0,
            entries: Vec::new(),
            staging: AlignedBuf::zeroed(0),
            body: Vec::new(),
            head_len: 0,
            payload_len: 0,
            direct: None,
            hashes: Vec::new(),
            scratch: Vec::new(),
            placed: false,
            device_state: Vec::new(),
        }
    }
}

impl std::fmt::Debug for RestoreChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreChannel")
            .field("index", &self.index)
            .field("step", &self.step)
            .field("block", &self.block)
            .field("direct", &self.direct.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a restore channel is in the stream it plays back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    AwaitHelloReply,
    BlockList,
    AwaitAccepted,
    Pages,
    DeviceState,
    EndOfRam,
    AwaitReady,
    Go,
    AwaitResumed,
    Complete,
    AwaitVerdict,
    Done,
}

/// A channel reading from the file. See the crate documentation.
pub struct RestoreChannel {
    shared: Arc<Shared>,
    index: u16,
    step: Step,
    /// The block and chunk (of [`CHUNK_PAGES`]) this channel reads next;
    /// channel i reads chunks i, i + channels, ...
    block: usize,
    chunk: u64,
    /// Pages sent in the epoch.
    pages: u64,
    entries: Vec<u8>,
    /// Page bytes read with `O_DIRECT` land here first (aligned memory).
    staging: AlignedBuf,
    /// The current batch as a frame body: head, then the page bytes.
    body: Vec<u8>,
    head_len: usize,
    payload_len: usize,
    /// Where page bytes may be read straight into guest memory.
    direct: Option<Arc<dyn DirectPlacement>>,
    /// Hashes of the pages of the current batch read into place.
    hashes: Vec<u64>,
    scratch: Vec<u8>,
    /// The current batch was read into place.
    placed: bool,
    device_state: Vec<u8>,
}

fn read_error(path: &Path, e: std::io::Error) -> TransportError {
    TransportError::io(format!("reading pages from {}", path.display()), e)
}

impl RestoreChannel {
    /// Fills the next batch of this channel's pages; false when none is left.
    fn next_batch(&mut self) -> Result<bool, TransportError> {
        let shared = Arc::clone(&self.shared);
        let snapshot = &shared.snapshot;
        let blocks = &snapshot.header.layout.blocks;
        while self.block < blocks.len() {
            let laid = &blocks[self.block];
            let first = self.chunk * CHUNK_PAGES;
            if first >= laid.pages() {
                // Chunks restart at every block, still spread over channels.
                self.chunk -= laid.pages().div_ceil(CHUNK_PAGES);
                self.block += 1;
                continue;
            }
            let count = CHUNK_PAGES.min(laid.pages() - first);
            let page_size = laid.block.page_size as usize;
            // Runs of stored pages: (first page, pages).
            let mut runs: Vec<(u64, u64)> = Vec::new();
            self.entries.clear();
            for page in first..first + count {
                let stored = snapshot.stored(self.block, page);
                let encoding = if stored {
                    PageEncoding::Plain
                } else {
                    PageEncoding::Zero
                };
                PageEntry { page, encoding }.push_to(&mut self.entries);
                if stored {
                    match runs.last_mut() {
                        Some((start, n)) if *start + *n == page => *n += 1,
                        _ => runs.push((page, 1)),
                    }
                }
            }
            self.pages += count;
            self.chunk += u64::from(shared.channels);
            self.placed = self.read_into_place(laid, &runs)?;
            if !self.placed {
                self.read_into_body(laid, &runs, page_size)?;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads the stored pages straight into guest memory where the direct
    /// placement says, hashing each there. False when it does not apply.
    fn read_into_place(&mut self, laid: &mapped_ram::BlockLayout, runs: &[(u64, u64)]) -> Result<bool, TransportError> {
        let Some(direct) = self.direct.clone() else {
            return Ok(false);
        };
        let batch = PageBatch::placed(self.block as u32, 0, laid.block.page_size, &self.entries)?;
        let mut targets = Vec::new();
        if !direct.runs(&batch, &mut targets) {
            return Ok(false);
        }
        let page_size = laid.block.page_size as usize;
        self.hashes.clear();
        let path = &self.shared.snapshot.path;
        // The targets cover the stored pages in order, each a stretch of
        // adjacent ones, which are adjacent in the file too.
        let stored: Vec<u64> = runs.iter().flat_map(|&(start, n)| start..start + n).collect();
        let mut next = 0;
        for target in &targets {
            let count = target.len / page_size;
            let first = match stored.get(next..next + count) {
                Some(&[first, ..]) if stored[next + count - 1] == first + count as u64 - 1 => first,
                _ => return Err(self.unexpected("placement runs unlike the batch's stored pages")),
            };
            next += count;
            let mut done = 0;
            while done < target.len {
                let n = target
                    .region
                    .read_file_at(
                        &self.shared.data,
                        laid.page_offset(first) + done as u64,
                        target.offset + done,
                        target.len - done,
                    )
                    .map_err(|e| read_error(path, e))?;
                if n == 0 {
                    return Err(read_error(path, std::io::ErrorKind::UnexpectedEof.into()));
                }
                done += n;
            }
            target
                .hash_pages(0, target.len, page_size, &mut self.scratch, &mut self.hashes)
                .map_err(|e| read_error(path, std::io::Error::other(e)))?;
        }
        Ok(true)
    }

    /// Reads the stored pages into the body buffer, after the batch head.
    fn read_into_body(
        &mut self,
        laid: &mapped_ram::BlockLayout,
        runs: &[(u64, u64)],
        page_size: usize,
    ) -> Result<(), TransportError> {
        let path = &self.shared.snapshot.path;
        let len = runs.iter().map(|&(_, n)| n as usize * page_size).sum::<usize>();
        self.head_len = migration_wire::page::BATCH_HEADER_LEN + self.entries.len();
        self.body.resize(self.head_len + len, 0);
        let direct_io = self.shared.direct_io;
        if direct_io && self.staging.len() < len {
            self.staging = AlignedBuf::zeroed(len);
        }
        let mut at = 0;
        for &(start, n) in runs {
            let bytes = n as usize * page_size;
            let offset = laid.page_offset(start);
            if direct_io {
                // O_DIRECT needs aligned memory: stage, then copy.
                self.shared
                    .data
                    .read_exact_at(&mut self.staging[at..at + bytes], offset)
                    .map_err(|e| read_error(path, e))?;
                self.body[self.head_len + at..self.head_len + at + bytes]
                    .copy_from_slice(&self.staging[at..at + bytes]);
            } else {
                self.shared
                    .data
                    .read_exact_at(&mut self.body[self.head_len + at..self.head_len + at + bytes], offset)
                    .map_err(|e| read_error(path, e))?;
            }
            at += bytes;
        }
        self.payload_len = len;
        let mut head = Vec::with_capacity(self.head_len);
        self.batch()?.encode_head(&mut head);
        self.body[..self.head_len].copy_from_slice(&head);
        Ok(())
    }

    fn batch(&self) -> Result<PageBatch<'_>, TransportError> {
        let laid = &self.shared.snapshot.header.layout.blocks[self.block];
        let block = self.block as u32;
        if self.placed {
            return Ok(PageBatch::placed(block, 0, laid.block.page_size, &self.entries)?.with_hashes(&self.hashes));
        }
        let payload = &self.body[self.head_len..self.head_len + self.payload_len];
        Ok(PageBatch::new(block, 0, laid.block.page_size, &self.entries, payload)?)
    }

    fn unexpected(&self, what: &str) -> TransportError {
        TransportError::invalid_data(format!("restoring on channel {}", self.index), what)
    }
}

impl ChannelRx for RestoreChannel {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        let snapshot = &self.shared.snapshot;
        let session = snapshot.header.session;
        match self.step {
            Step::Start if self.index == 0 => {
                self.step = Step::AwaitHelloReply;
                Ok(Message::Hello(Hello {
                    min_version: PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                    features: Features::ZERO_PAGES,
                    session,
                    channels: self.shared.channels,
                }))
            }
            Step::Start => {
                self.step = Step::AwaitAccepted;
                Ok(Message::ChannelHello(ChannelHello {
                    session,
                    index: self.index,
                    channels: self.shared.channels,
                }))
            }
            Step::BlockList => {
                self.step = Step::AwaitAccepted;
                Ok(Message::BlockList(snapshot.blocks()))
            }
            Step::Pages => {
                if self.next_batch()? {
                    return Ok(Message::Pages(self.batch()?));
                }
                self.step = if self.index == 0 {
                    Step::DeviceState
                } else {
                    Step::EndOfRam
                };
                Ok(Message::SyncMarker(SyncMarker {
                    epoch: 0,
                    pages: self.pages,
                }))
            }
            Step::DeviceState => {
                self.device_state = snapshot
                    .device_state(&self.shared.meta)
                    .map_err(|e| self.unexpected(&ErrorChain(&e).to_string()))?;
                self.step = Step::EndOfRam;
                Ok(Message::DeviceState(&self.device_state))
            }
            Step::EndOfRam => {
                self.step = if self.index == 0 { Step::AwaitReady } else { Step::Done };
                Ok(Message::EndOfRam(EndOfRam { epochs: 1 }))
            }
            Step::Go => {
                self.step = Step::AwaitResumed;
                Ok(Message::Go)
            }
            Step::Complete => {
                self.step = Step::AwaitVerdict;
                Ok(Message::Complete(Complete {
                    digests: snapshot.commit.blocks.iter().map(|b| b.digest).collect(),
                }))
            }
            Step::Done => Err(TransportError::Closed),
            _ => Err(self.unexpected("the destination waited for the file while it owed an answer")),
        }
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.body, replacement)
    }

    fn place_directly(&mut self, target: Arc<dyn DirectPlacement>) -> bool {
        self.direct = Some(target);
        true
    }

    fn set_timeout(&mut self, _timeout: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn bytes_received(&self) -> u64 {
        0
    }
}

impl ChannelTx for RestoreChannel {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.step = match (self.step, message) {
            (Step::AwaitHelloReply, Message::HelloReply(_)) => Step::BlockList,
            (Step::AwaitAccepted, Message::BlocksAccepted | Message::ChannelAccepted) => Step::Pages,
            (Step::AwaitReady, Message::Ready) => Step::Go,
            (Step::AwaitResumed, Message::Resumed) => Step::Complete,
            (Step::AwaitVerdict, Message::Verdict(_)) => Step::Done,
            (_, Message::Ack(_)) => self.step,
            (_, Message::Error(err)) => {
                self.step = Step::Done;
                return Err(self.unexpected(&format!("the destination refused the snapshot: {}", err.message)));
            }
            (step, other) => {
                return Err(self.unexpected(&format!("{} while the file is at {step:?}", other.kind().name())));
            }
        };
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        0
    }

    fn shutdown(&mut self) {
        self.step = Step::Done;
    }
}

impl Channel for RestoreChannel {
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        Err(self.unexpected("a restore channel cannot be split"))
    }

    fn peer(&self) -> String {
        self.shared.snapshot.path.display().to_string()
    }

    fn closer(&self) -> Result<Closer, TransportError> {
        // Every read is local and bounded: nothing blocks to be woken.
        Ok(Box::new(|| {}))
    }
}
