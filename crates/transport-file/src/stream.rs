//! Stream files: the migration stream itself, frame after frame, written
//! to a file or a pipe and played back from one.
//!
//! A stream save records what the source sends on its one channel (the
//! handshake as agreed, every page batch of every pass in order, sync
//! markers, device state, end of RAM) and, last, a `Complete` frame with
//! the digests of the pages it holds; then it is synced and renamed into
//! place, all before it tells the source READY, so a handed-over VM is
//! always durable. The source's own digests of its frozen RAM, which come
//! after the handover, are compared with the stream's for the verdict. A
//! stream that does not end with its digests right after the end of RAM is
//! an unfinished save, refused before the restored guest runs. Pages may be compressed (lz4, zstd) as on the wire.
//! Played back, the file is the source of a migration into the destination
//! runtime: later passes overwrite earlier copies of a page, in order.

use crate::replies::{Replies, ReplyRx};
use crate::{FileError, io_error};
use migration_core::compress::decompress;
use migration_core::transport::{ChannelHalves, Closer};
use migration_core::verify::{block_digest, page_hash, zero_page_hash};
use migration_core::{Channel, ChannelRx, ChannelTx, TransportError};
use migration_wire::{
    Ack, Codec, Complete, FRAME_HEADER_LEN, Features, FrameHeader, HelloReply, MAX_FRAME_BODY, Message, MessageKind,
    PROTOCOL_VERSION, PageEncoding, Verdict,
};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a stream save writes.
#[derive(Debug)]
enum Sink {
    /// A file under a temporary name, renamed on commit.
    File {
        writer: BufWriter<File>,
        partial: PathBuf,
        path: PathBuf,
    },
    /// Standard output (a pipe).
    Stdout(BufWriter<std::io::Stdout>),
}

/// A stream save into a file (or `-`: standard output). It has one
/// channel; the source must use one.
#[derive(Debug)]
pub struct StreamTarget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    sink: Mutex<Option<Sink>>,
    replies: Arc<Replies>,
    committed: Mutex<bool>,
}

fn refused(what: impl Into<String>) -> TransportError {
    TransportError::invalid_data("stream file", what)
}

impl StreamTarget {
    /// A stream save into `path` (`-`: standard output). A file is written
    /// under a temporary name beside it and renamed once complete.
    pub fn create(path: &Path) -> Result<Self, FileError> {
        let sink = if path == Path::new("-") {
            Sink::Stdout(BufWriter::with_capacity(1 << 20, std::io::stdout()))
        } else {
            let partial = crate::partial_path(path, "stream");
            let file = File::create(&partial).map_err(|e| io_error(format!("creating {}", partial.display()), e))?;
            Sink::File {
                writer: BufWriter::with_capacity(1 << 20, file),
                partial,
                path: path.to_owned(),
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                sink: Mutex::new(Some(sink)),
                replies: Arc::default(),
                committed: Mutex::new(false),
            }),
        })
    }

    /// The one channel.
    pub fn channel(&self) -> StreamChannel {
        StreamChannel {
            shared: Arc::clone(&self.shared),
            rx: Some(ReplyRx::new(Arc::clone(&self.shared.replies))),
            frame: Vec::new(),
            scratch: Vec::new(),
            hashes: Vec::new(),
            sent: 0,
        }
    }

    /// Whether the stream goes to standard output.
    pub fn to_stdout(&self) -> bool {
        matches!(
            *self.shared.sink.lock().unwrap_or_else(|e| e.into_inner()),
            Some(Sink::Stdout(_))
        )
    }

    /// Whether the stream was completed (and, for a file, renamed into place).
    pub fn committed(&self) -> bool {
        *self.shared.committed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let committed = *self.committed.get_mut().unwrap_or_else(|e| e.into_inner());
        let sink = self.sink.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Sink::File { partial, .. }) = sink
            && !committed
        {
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// The channel of a stream save.
#[derive(Debug)]
pub struct StreamChannel {
    shared: Arc<Shared>,
    rx: Option<ReplyRx>,
    frame: Vec<u8>,
    scratch: Vec<u8>,
    /// Per block, the hash of every page as last recorded (only the sending
    /// half, this one, touches them).
    hashes: Vec<Vec<u64>>,
    sent: u64,
}

impl Shared {
    /// Writes `parts`, one after the other, as one frame.
    fn write(&self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let writer: &mut dyn Write = match sink.as_mut() {
            Some(Sink::File { writer, .. }) => writer,
            Some(Sink::Stdout(writer)) => writer,
            None => return Err(TransportError::Closed),
        };
        parts
            .iter()
            .try_for_each(|part| writer.write_all(part))
            .map_err(|e| TransportError::io("writing the stream", e))
    }

    /// Flushes and syncs the stream; renames a file into place.
    fn commit(&self) -> Result<(), TransportError> {
        let mut guard = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let io = |context: String| move |source| TransportError::io(context, source);
        match guard.as_mut() {
            Some(Sink::File { writer, partial, path }) => {
                writer.flush().map_err(io(format!("writing {}", partial.display())))?;
                writer
                    .get_ref()
                    .sync_data()
                    .map_err(io(format!("syncing {}", partial.display())))?;
                crate::install(partial, path).map_err(io(format!("renaming to {}", path.display())))?;
            }
            Some(Sink::Stdout(writer)) => writer.flush().map_err(io("writing standard output".into()))?,
            None => return Err(TransportError::Closed),
        }
        *guard = None;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }
}

impl StreamChannel {
    /// Each block's digest of the pages the stream holds.
    fn digests(&self) -> Vec<u64> {
        self.hashes.iter().map(|h| block_digest(h)).collect()
    }

    fn record(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.frame.clear();
        // Page bytes are written from where they are, not copied first.
        let payload = message.encode_head(&mut self.frame);
        self.shared.write(&[&self.frame, payload])?;
        self.sent += (self.frame.len() + payload.len()) as u64;
        Ok(())
    }

    /// Keeps the hash of every page of `batch`, as a destination would.
    fn hash_pages(&mut self, batch: &migration_wire::PageBatch<'_>) -> Result<(), TransportError> {
        let Some(block) = self.hashes.get_mut(batch.block as usize) else {
            return Err(refused(format!("pages of block {}, which does not exist", batch.block)));
        };
        let page_size = batch.page_size as usize;
        let known = batch.page_hashes();
        let plain: &[u8] = if batch.codec() == Codec::None {
            batch.payload()
        } else {
            self.scratch.resize(batch.plain_len(), 0);
            decompress(batch.codec(), batch.payload(), &mut self.scratch).map_err(|e| refused(e.to_string()))?;
            &self.scratch
        };
        let mut at = 0;
        for entry in batch.entries() {
            let entry = entry.map_err(|e| refused(e.to_string()))?;
            let Some(slot) = block.get_mut(entry.page as usize) else {
                return Err(refused(format!(
                    "page {} past the end of block {}",
                    entry.page, batch.block
                )));
            };
            *slot = match entry.encoding {
                PageEncoding::Plain => {
                    // The source hashed the pages it sent as is already.
                    let hash = known
                        .and_then(|known| known.get(at / page_size).copied())
                        .unwrap_or_else(|| page_hash(&plain[at..at + page_size]));
                    at += page_size;
                    hash
                }
                // Pages are 4 KiB (the source's encoder asserts it).
                PageEncoding::Zero => zero_page_hash(),
            };
        }
        Ok(())
    }
}

impl ChannelTx for StreamChannel {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        let replies = Arc::clone(&self.shared.replies);
        match message {
            Message::Hello(hello) => {
                if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) || hello.channels != 1 {
                    return Err(refused("a stream carries protocol version 1 on one channel"));
                }
                let features = hello
                    .features
                    .intersect(Features::ZERO_PAGES.union(Features::LZ4).union(Features::ZSTD));
                // The stream records the handshake as agreed.
                let mut agreed = *hello;
                agreed.features = features;
                agreed.min_version = PROTOCOL_VERSION;
                agreed.max_version = PROTOCOL_VERSION;
                self.record(&Message::Hello(agreed))?;
                replies.push(&Message::HelloReply(HelloReply {
                    version: PROTOCOL_VERSION,
                    features,
                    session: hello.session,
                    channels: 1,
                }));
            }
            Message::BlockList(blocks) => {
                self.hashes = blocks.blocks.iter().map(|b| vec![0; b.pages() as usize]).collect();
                self.record(message)?;
                replies.push(&Message::BlocksAccepted);
            }
            Message::Pages(batch) => {
                self.hash_pages(batch)?;
                self.record(message)?;
            }
            Message::SyncMarker(marker) => {
                self.record(message)?;
                replies.push(&Message::Ack(Ack {
                    epoch: marker.epoch,
                    pages: 0,
                    bytes: self.sent,
                }));
            }
            Message::DeviceState(_) => self.record(message)?,
            Message::EndOfRam(_) => {
                // The stream ends with the digests of what it holds, and is
                // made durable and put in place before READY: once the
                // source hands over, the file is the VM.
                self.record(message)?;
                let digests = self.digests();
                let committed = self
                    .record(&Message::Complete(Complete { digests }))
                    .and_then(|()| self.shared.commit());
                if let Err(err) = committed {
                    replies.push(&Message::Error(migration_wire::PeerError {
                        code: migration_wire::ErrorCode::Internal,
                        message: format!(
                            "the stream did not commit: {}",
                            migration_core::error_chain::ErrorChain(&err)
                        ),
                    }));
                    return Err(err);
                }
                replies.push(&Message::Ready);
            }
            Message::Go => replies.push(&Message::Resumed),
            Message::Complete(complete) => {
                // The source's digests of its frozen RAM against the stream's.
                let mismatched = self
                    .digests()
                    .iter()
                    .enumerate()
                    .filter(|&(i, digest)| complete.digests.get(i) != Some(digest))
                    .map(|(i, _)| i as u32)
                    .collect();
                replies.push(&Message::Verdict(Verdict { mismatched }));
            }
            Message::Abort(_) => replies.close(),
            other => return Err(refused(format!("unexpected {} in a stream", other.kind().name()))),
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn shutdown(&mut self) {}
}

impl StreamChannel {
    fn rx(&mut self) -> Result<&mut ReplyRx, TransportError> {
        self.rx.as_mut().ok_or(TransportError::Closed)
    }
}

impl ChannelRx for StreamChannel {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        self.rx()?.recv()
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        match self.rx.as_mut() {
            Some(rx) => rx.take_body(replacement),
            None => replacement,
        }
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.rx()?.set_timeout(timeout)
    }

    fn bytes_received(&self) -> u64 {
        self.rx.as_ref().map_or(0, |rx| rx.bytes_received())
    }
}

impl Channel for StreamChannel {
    fn split(mut self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        let rx = self.rx.take().ok_or(TransportError::Closed)?;
        Ok((self, Box::new(rx)))
    }

    fn peer(&self) -> String {
        match &*self.shared.sink.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Sink::File { path, .. }) => path.display().to_string(),
            _ => "standard output".into(),
        }
    }

    fn closer(&self) -> Result<Closer, TransportError> {
        let replies = Arc::clone(&self.shared.replies);
        Ok(Box::new(move || replies.close()))
    }
}

/// Plays a stream back: the source side of a restore from a stream file
/// (or `-`: standard input).
pub struct StreamSource {
    reader: Box<dyn Read + Send>,
    name: String,
    body: Vec<u8>,
    /// Frame kinds read so far, to know what comes next.
    step: Step,
    hashes: Vec<u64>,
    /// The body of the stream's final digests, read ahead at its end of RAM.
    digests: Vec<u8>,
    received: u64,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("name", &self.name)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Frames from the stream, up to its end of RAM.
    Frames,
    /// End of RAM given; the destination owes READY.
    AwaitReady,
    /// READY came: GO is next.
    Go,
    /// GO given; the destination owes RESUMED.
    AwaitResumed,
    /// The stream's final frame (the digests) is next.
    Complete,
    /// Played to the end.
    Done,
}

impl StreamSource {
    /// Plays back `path` (`-`: standard input), whose first bytes, if
    /// already read (to tell the format), are `prefix`.
    pub fn open(path: &Path, prefix: Vec<u8>) -> Result<Self, FileError> {
        let reader: Box<dyn Read + Send> = if path == Path::new("-") {
            Box::new(std::io::Cursor::new(prefix).chain(std::io::stdin()))
        } else {
            let file = File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
            Box::new(std::io::BufReader::with_capacity(1 << 20, file))
        };
        Ok(Self {
            reader,
            name: if path == Path::new("-") {
                "standard input".into()
            } else {
                path.display().to_string()
            },
            body: Vec::new(),
            step: Step::Frames,
            hashes: Vec::new(),
            digests: Vec::new(),
            received: 0,
        })
    }

    fn read_frame(&mut self) -> Result<FrameHeader, TransportError> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        // An end of file says where the stream stopped short.
        let failed = |e: std::io::Error, short: &dyn Fn() -> String| {
            let source = match e.kind() {
                std::io::ErrorKind::UnexpectedEof => std::io::Error::new(e.kind(), short()),
                _ => e,
            };
            TransportError::io(format!("reading {}", self.name), source)
        };
        self.reader
            .read_exact(&mut head)
            .map_err(|e| failed(e, &|| "the stream ends before its digests: not a finished save".into()))?;
        let header = FrameHeader::decode(&head, MAX_FRAME_BODY)?;
        self.body.resize(header.len as usize, 0);
        self.reader
            .read_exact(&mut self.body)
            .map_err(|e| failed(e, &|| format!("the stream ends inside a {} frame", header.kind.name())))?;
        self.received += (FRAME_HEADER_LEN + self.body.len()) as u64;
        // A pages frame is checked where it is decoded, in `recv`.
        if header.kind != MessageKind::Pages {
            header.verify(&self.body)?;
        }
        Ok(header)
    }
}

impl ChannelRx for StreamSource {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        match self.step {
            Step::Frames => {
                let header = self.read_frame()?;
                match header.kind {
                    MessageKind::EndOfRam => {
                        // The digests must follow at once: a stream without
                        // them is an unfinished save, refused before READY.
                        let end = std::mem::take(&mut self.body);
                        let digests = self.read_frame()?;
                        if digests.kind != MessageKind::Complete {
                            return Err(refused(format!(
                                "{} after the end of RAM: the stream's digests are missing (an unfinished save?)",
                                digests.kind.name()
                            )));
                        }
                        self.digests = std::mem::replace(&mut self.body, end);
                        self.step = Step::AwaitReady;
                    }
                    MessageKind::Complete => return Err(refused("digests before the end of RAM in the stream")),
                    _ => {}
                }
                if header.kind == MessageKind::Pages {
                    let batch = migration_wire::page::verify_pages(&header, &self.body, &mut self.hashes)?;
                    return Ok(Message::Pages(batch));
                }
                Ok(Message::decode_body(header.kind, &self.body)?)
            }
            Step::Complete => {
                self.step = Step::Done;
                Ok(Message::decode_body(MessageKind::Complete, &self.digests)?)
            }
            Step::Go => {
                self.step = Step::AwaitResumed;
                Ok(Message::Go)
            }
            Step::Done => Err(TransportError::Closed),
            Step::AwaitReady | Step::AwaitResumed => Err(refused("the destination read before it answered")),
        }
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.body, replacement)
    }

    fn set_timeout(&mut self, _timeout: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }
}

impl ChannelTx for StreamSource {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        match (self.step, message) {
            (Step::AwaitReady, Message::Ready) => self.step = Step::Go,
            (Step::AwaitResumed, Message::Resumed) => self.step = Step::Complete,
            (_, Message::Error(err)) => {
                self.step = Step::Done;
                return Err(refused(format!("the destination refused the stream: {}", err.message)));
            }
            // Handshake answers, acknowledgements and the verdict need no reply.
            _ => {}
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        0
    }

    fn shutdown(&mut self) {}
}

impl Channel for StreamSource {
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        Err(refused("a stream being played back cannot be split"))
    }

    fn peer(&self) -> String {
        self.name.clone()
    }

    fn closer(&self) -> Result<Closer, TransportError> {
        Ok(Box::new(|| {}))
    }
}
