//! The transport's channels. The migration's own TCP connection carries
//! every message (two-sided, as verbs SENDs would) and the transport's
//! small control exchange; a page batch sent as it is goes as one-sided
//! writes into the destination's registered memory, followed, once every
//! write completed, by a notice with the batch's head and checksum.

use crate::dest::DestNic;
use crate::faults::Hit;
use crate::source::SourceNic;
use crate::verbs::{QueuePair, RdmaError, RemoteAddr, Writes};
use migration_core::transport::{ChannelHalves, Closer};
use migration_core::{Channel, ChannelRx, ChannelTx, DirectPlacement, GuestRun, TransportError};
use migration_wire::rdma::RdmaRecord;
use migration_wire::{Codec, Message, PageBatch, WireError};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use transport_tcp::TcpChannel;

type SharedCloser = Arc<dyn Fn() + Send + Sync>;

/// An RDMA error as the channel reports it.
fn transport_error(context: &str, err: RdmaError) -> TransportError {
    match err {
        RdmaError::TimedOut { timeout, .. } => TransportError::TimedOut(timeout),
        RdmaError::Io { context: inner, source } => TransportError::io(format!("{context}: {inner}"), source),
        RdmaError::Wire(err) => TransportError::Malformed(err),
        RdmaError::LinkDown(_) => TransportError::io(context, io::Error::new(io::ErrorKind::ConnectionReset, err)),
        other => TransportError::io(context, io::Error::other(other)),
    }
}

/// The receiving methods a channel half hands to `$field` as they are
/// (all but `recv`; `bytes_received` too when named).
macro_rules! forward_rx {
    ($field:ident, bytes_received) => {
        forward_rx!($field);
        fn bytes_received(&self) -> u64 {
            self.$field.bytes_received()
        }
    };
    ($field:ident) => {
        fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
            self.$field.take_body(replacement)
        }
        fn place_directly(&mut self, target: Arc<dyn DirectPlacement>) -> bool {
            self.$field.place_directly(target)
        }
        fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
            self.$field.set_timeout(timeout)
        }
        fn prefer_latency(&mut self) {
            self.$field.prefer_latency();
        }
    };
}

/// The sending methods a channel half hands to `$field` as they are (all
/// but `send`; `bytes_sent` too when named).
macro_rules! forward_tx {
    ($field:ident, bytes_sent) => {
        forward_tx!($field);
        fn bytes_sent(&self) -> u64 {
            self.$field.bytes_sent()
        }
    };
    ($field:ident) => {
        fn shutdown(&mut self) {
            self.$field.shutdown();
        }
        fn prefer_latency(&mut self) {
            self.$field.prefer_latency();
        }
    };
}

/// A queue pair and the remote keys of the blocks, in block order.
#[derive(Debug)]
struct Remote {
    qp: Box<dyn QueuePair>,
    rkeys: Vec<u32>,
}

/// The source's side of a channel.
pub struct SourceChannel {
    tx: SourceTx,
    rx: SourceRx,
    peer: String,
    closer: SharedCloser,
}

impl std::fmt::Debug for SourceChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceChannel")
            .field("peer", &self.peer)
            .field("tx", &self.tx)
            .finish_non_exhaustive()
    }
}

impl SourceChannel {
    /// Channel `index` of a migration over `inner`, its one-sided writes
    /// through `nic`. The destination announces its registered memory in
    /// band; the queue pair is connected when it does.
    pub fn new(mut inner: TcpChannel, index: u16, nic: Arc<SourceNic>) -> Result<Self, TransportError> {
        let slot: Arc<Mutex<Option<Remote>>> = Arc::new(Mutex::new(None));
        let (announced, setup) = (Arc::clone(&slot), Arc::clone(&nic));
        let peer_ip = inner.peer().parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let mut connected = false;
        inner.set_record_handler(Box::new(move |bytes| match RdmaRecord::decode(bytes)? {
            RdmaRecord::Regions(table) => {
                // One queue pair per channel: a destination announcing
                // again is not following the protocol.
                if std::mem::replace(&mut connected, true) {
                    return Err(TransportError::invalid_data(
                        "receiving from the destination",
                        "a second region table on one channel",
                    ));
                }
                let qp = setup
                    .queue_pair(index, &table, peer_ip)
                    .map_err(|e| transport_error("connecting the simulated RDMA NIC", e))?;
                let rkeys = table.regions.iter().map(|r| r.rkey).collect();
                *announced.lock().unwrap_or_else(|e| e.into_inner()) = Some(Remote { qp, rkeys });
                Ok(())
            }
            RdmaRecord::Placed { .. } => Err(TransportError::invalid_data(
                "receiving from the destination",
                "a placed-batch notice, which only a source sends",
            )),
        }));
        let peer = inner.peer();
        let closer: SharedCloser = Arc::from(inner.closer()?);
        let (tx, rx) = Box::new(inner).split()?;
        let urgent = Arc::new(AtomicBool::new(false));
        Ok(Self {
            rx: SourceRx {
                inner: rx,
                nic: Arc::clone(&nic),
                slot: Arc::clone(&slot),
                urgent: Arc::clone(&urgent),
            },
            tx: SourceTx {
                inner: tx,
                index,
                nic,
                slot,
                remote: None,
                ops: 0,
                next_wr: 0,
                head: Vec::new(),
                record: Vec::new(),
                written: 0,
                closer: Arc::clone(&closer),
                urgent,
            },
            peer,
            closer,
        })
    }
}

/// The receiving half of a source channel: the migration's messages, the
/// transport's records taken out by the connection's record handler.
pub struct SourceRx {
    inner: Box<dyn ChannelRx>,
    nic: Arc<SourceNic>,
    slot: Arc<Mutex<Option<Remote>>>,
    /// This is postcopy's urgent-page channel (its hello said so), which
    /// carries no one-sided writes and gets no queue pair.
    urgent: Arc<AtomicBool>,
}

impl std::fmt::Debug for SourceRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRx").finish_non_exhaustive()
    }
}

impl ChannelRx for SourceRx {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        let message = self.inner.recv()?;
        // A destination accepts a channel only after announcing its memory
        // on it, while precopy runs: one that did not is not on rdma-sim.
        if matches!(message, Message::BlocksAccepted | Message::ChannelAccepted)
            && !self.nic.precopy_over.load(Ordering::Acquire)
            && !self.urgent.load(Ordering::Acquire)
            && self.slot.lock().unwrap_or_else(|e| e.into_inner()).is_none()
        {
            return Err(TransportError::io(
                "opening a channel of the simulated RDMA transport",
                io::Error::other(NOT_ANNOUNCED),
            ));
        }
        Ok(message)
    }

    forward_rx!(inner, bytes_received);
}

const NOT_ANNOUNCED: &str =
    "the destination announced no registered memory (is it `migrate-cli recv --transport rdma-sim`?)";

/// The sending half of a source channel.
pub struct SourceTx {
    inner: Box<dyn ChannelTx>,
    index: u16,
    nic: Arc<SourceNic>,
    /// Where the receiving half puts the queue pair once announced.
    slot: Arc<Mutex<Option<Remote>>>,
    remote: Option<Remote>,
    /// Operations (messages and batches) so far, for injected faults.
    ops: u64,
    next_wr: u64,
    head: Vec<u8>,
    record: Vec<u8>,
    /// Bytes written one-sided on this channel.
    written: u64,
    closer: SharedCloser,
    /// See [`SourceRx::urgent`].
    urgent: Arc<AtomicBool>,
}

impl std::fmt::Debug for SourceTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTx")
            .field("index", &self.index)
            .field("remote", &self.remote)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl SourceTx {
    /// Whether `batch` goes as one-sided writes: pages sent as they are,
    /// with their hashes, while precopy runs. Fails when the destination
    /// announced no registered memory.
    fn one_sided(&mut self, batch: &PageBatch<'_>) -> Result<bool, TransportError> {
        if batch.codec() != Codec::None
            || batch.is_placed()
            || batch.page_hashes().is_none()
            || batch.payload().is_empty()
            || self.nic.precopy_over.load(Ordering::Acquire)
            || self.urgent.load(Ordering::Acquire)
        {
            return Ok(false);
        }
        if self.remote.is_none() {
            self.remote = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        if self.remote.is_none() {
            return Err(TransportError::io(
                "sending pages over the simulated RDMA transport",
                io::Error::other(NOT_ANNOUNCED),
            ));
        }
        Ok(true)
    }

    /// Writes the plain pages of `batch` into the destination's memory, a
    /// write per run of consecutive pages, waits for every completion, then
    /// sends the notice.
    fn send_one_sided(&mut self, batch: &PageBatch<'_>) -> Result<(), TransportError> {
        let context = "writing pages over the simulated RDMA NIC";
        let remote = self.remote.as_mut().expect("checked by one_sided");
        let rkey = *remote.rkeys.get(batch.block as usize).ok_or_else(|| {
            TransportError::io(
                context,
                io::Error::other(format!("no region for block {}", batch.block)),
            )
        })?;
        let page_size = batch.page_size as usize;
        let payload = batch.payload();
        // A write per run of consecutive plain pages, each a stretch of the
        // payload.
        let mut writes = Writes::new(remote.qp.as_mut(), self.next_wr);
        let (mut at, mut posted) = (0, 0u64);
        for (first, pages) in batch.plain_runs() {
            let len = pages as usize * page_size;
            let offset = first
                .checked_mul(page_size as u64)
                .ok_or_else(|| TransportError::invalid_data(context, "page index overflows"))?;
            writes
                .post(&payload[at..at + len], RemoteAddr { rkey, offset })
                .map_err(|e| transport_error(context, e))?;
            at += len;
            posted += 1;
        }
        self.next_wr = writes
            .complete(self.nic.io_timeout())
            .map_err(|e| transport_error(context, e))?;
        self.nic.bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.nic.writes.fetch_add(posted, Ordering::Relaxed);
        self.nic.batches.fetch_add(1, Ordering::Relaxed);
        self.written += payload.len() as u64;
        self.head.clear();
        batch.encode_head(&mut self.head);
        self.record.clear();
        RdmaRecord::Placed {
            checksum: batch.checksum_with_head(&self.head),
            head: &self.head,
        }
        .encode(&mut self.record);
        self.inner.send(&Message::Transport(&self.record))
    }

    /// Drops the link, as a pulled cable would: the queue pair and the
    /// connection both ways.
    fn drop_link(&mut self) {
        if let Some(remote) = &mut self.remote {
            remote.qp.drop_link();
        }
        (self.closer)();
    }
}

impl ChannelTx for SourceTx {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.ops += 1;
        if let Some(Hit::DropLink) = self.nic.faults().and_then(|f| f.on_operation(self.index, self.ops)) {
            self.drop_link();
            return Err(TransportError::io(
                "sending over the simulated RDMA link",
                io::Error::new(io::ErrorKind::ConnectionReset, "injected fault: the link dropped"),
            ));
        }
        match message {
            Message::Pages(batch) if self.one_sided(batch)? => return self.send_one_sided(batch),
            // From here the guest may run on the destination: pages are
            // placed whole by its receiver, never written into its memory.
            Message::PostcopyStart(_) | Message::Resume(_) => {
                self.nic.precopy_over.store(true, Ordering::Release);
            }
            Message::ChannelHello(hello) if hello.index >= hello.channels => {
                self.urgent.store(true, Ordering::Release);
            }
            _ => {}
        }
        self.inner.send(message)
    }

    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent() + self.written
    }

    forward_tx!(inner);
}

/// The destination's side of a channel.
pub struct DestChannel {
    tx: DestTx,
    rx: DestRx,
    peer: String,
    closer: SharedCloser,
}

impl std::fmt::Debug for DestChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestChannel")
            .field("peer", &self.peer)
            .field("qp", &self.rx.qp.get())
            .finish_non_exhaustive()
    }
}

/// The destination's NIC, set once it is chosen: a destination accepts
/// its first channel before it knows the guest, so the channels hold the
/// slot and the NIC comes later.
pub type DestNicSlot = OnceLock<Arc<DestNic>>;

impl DestChannel {
    /// A destination channel over `inner`, announcing the registered memory
    /// of the NIC in `nic` before its first message once there is some.
    pub fn new(inner: TcpChannel, nic: Arc<DestNicSlot>) -> Result<Self, TransportError> {
        let peer = inner.peer();
        let closer: SharedCloser = Arc::from(inner.closer()?);
        let (tx, rx) = Box::new(inner).split()?;
        let qp = Arc::new(OnceLock::new());
        let urgent = Arc::new(AtomicBool::new(false));
        Ok(Self {
            tx: DestTx {
                inner: tx,
                nic: Arc::clone(&nic),
                qp: Arc::clone(&qp),
                record: Vec::new(),
                urgent: Arc::clone(&urgent),
            },
            rx: DestRx {
                inner: rx,
                nic,
                qp,
                urgent,
                hashes: Vec::new(),
                scratch: Vec::new(),
                placed: 0,
            },
            peer,
            closer,
        })
    }
}

/// The sending half of a destination channel.
pub struct DestTx {
    inner: Box<dyn ChannelTx>,
    nic: Arc<DestNicSlot>,
    /// This channel's queue pair, once announced.
    qp: Arc<OnceLock<u32>>,
    record: Vec<u8>,
    /// See [`DestRx::urgent`].
    urgent: Arc<AtomicBool>,
}

impl std::fmt::Debug for DestTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestTx")
            .field("qp", &self.qp.get())
            .finish_non_exhaustive()
    }
}

impl ChannelTx for DestTx {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        // Announced before the first message once memory is registered,
        // never to a peer being refused, never on postcopy's urgent-page
        // channel (it carries pages only once the guest runs here).
        if self.qp.get().is_none()
            && !matches!(message, Message::Error(_))
            && !self.urgent.load(Ordering::Acquire)
            && let Some(table) = self.nic.get().and_then(|nic| nic.announce())
        {
            let _ = self.qp.set(table.qp);
            self.record.clear();
            RdmaRecord::Regions(table).encode(&mut self.record);
            self.inner.send(&Message::Transport(&self.record))?;
        }
        self.inner.send(message)
    }

    forward_tx!(inner, bytes_sent);
}

/// The receiving half of a destination channel.
pub struct DestRx {
    inner: Box<dyn ChannelRx>,
    nic: Arc<DestNicSlot>,
    qp: Arc<OnceLock<u32>>,
    /// The channel's hello named it postcopy's urgent-page channel.
    urgent: Arc<AtomicBool>,
    hashes: Vec<u64>,
    scratch: Vec<u8>,
    /// Bytes the source wrote one-sided, as its notices said.
    placed: u64,
}

impl std::fmt::Debug for DestRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestRx")
            .field("qp", &self.qp.get())
            .field("placed", &self.placed)
            .finish_non_exhaustive()
    }
}

impl DestRx {
    /// Checks a placed-batch notice against the memory its pages landed
    /// in: hashes each plain page where it is and compares the batch's
    /// checksum. Leaves the hashes in `hashes`.
    fn check_placed(
        nic: Option<&Arc<DestNic>>,
        qp: Option<u32>,
        batch: &PageBatch<'_>,
        checksum: u64,
        head: &[u8],
        hashes: &mut Vec<u64>,
        scratch: &mut Vec<u8>,
    ) -> Result<u64, TransportError> {
        let context = "receiving a placed batch";
        let (Some(nic), Some(qp)) = (nic, qp) else {
            return Err(TransportError::invalid_data(
                context,
                "no memory was announced on this channel",
            ));
        };
        if !nic.may_write(qp) {
            return Err(TransportError::invalid_data(
                context,
                "a batch written after this channel's precopy ended",
            ));
        }
        let region = nic
            .region(batch.block)
            .ok_or_else(|| TransportError::invalid_data(context, format!("no block {}", batch.block)))?;
        let page_size = batch.page_size as usize;
        hashes.clear();
        // Each run of pages hashed where it landed.
        for (first, pages) in batch.plain_runs() {
            let run = usize::try_from(first)
                .ok()
                .and_then(|p| p.checked_mul(page_size))
                .map(|offset| GuestRun {
                    region,
                    offset,
                    len: pages as usize * page_size,
                })
                .ok_or_else(|| TransportError::invalid_data(context, "page index overflows"))?;
            run.hash_pages(0, run.len, page_size, scratch, hashes)
                .map_err(|e| TransportError::invalid_data(context, e.to_string()))?;
        }
        let actual = migration_wire::page::pages_checksum(head, hashes);
        if actual != checksum {
            hashes.clear();
            return Err(TransportError::Malformed(WireError::Checksum {
                kind: "placed pages",
                expected: checksum,
                actual,
            }));
        }
        Ok((hashes.len() * page_size) as u64)
    }
}

impl ChannelRx for DestRx {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        let message = self.inner.recv()?;
        match message {
            Message::Transport(bytes) => match RdmaRecord::decode(bytes)? {
                RdmaRecord::Placed { checksum, head } => {
                    let batch = PageBatch::decode_head(head)?;
                    let placed = Self::check_placed(
                        self.nic.get(),
                        self.qp.get().copied(),
                        &batch,
                        checksum,
                        head,
                        &mut self.hashes,
                        &mut self.scratch,
                    )?;
                    self.placed += placed;
                    if let Some(nic) = self.nic.get() {
                        nic.count_placed(placed);
                    }
                    Ok(Message::Pages(batch.with_hashes(&self.hashes)))
                }
                RdmaRecord::Regions(_) => Err(TransportError::invalid_data(
                    "receiving from the source",
                    "a region table, which only a destination sends",
                )),
            },
            // This channel's precopy is over: no more writes through its
            // queue pair, and no new queue pairs.
            Message::ChannelHello(hello) => {
                if hello.index >= hello.channels {
                    self.urgent.store(true, Ordering::Release);
                }
                Ok(message)
            }
            Message::EndOfRam(_) | Message::PostcopyStart(_) => {
                if let (Some(nic), Some(&qp)) = (self.nic.get(), self.qp.get()) {
                    nic.revoke(qp);
                }
                Ok(message)
            }
            other => Ok(other),
        }
    }

    fn bytes_received(&self) -> u64 {
        self.inner.bytes_received() + self.placed
    }

    forward_rx!(inner);
}

/// Both channel types hand everything to their halves.
macro_rules! forward_channel {
    ($channel:ty) => {
        impl ChannelTx for $channel {
            fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
                self.tx.send(message)
            }
            forward_tx!(tx, bytes_sent);
        }

        impl ChannelRx for $channel {
            fn recv(&mut self) -> Result<Message<'_>, TransportError> {
                self.rx.recv()
            }
            forward_rx!(rx, bytes_received);
        }

        impl Channel for $channel {
            fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
                Ok((Box::new(self.tx), Box::new(self.rx)))
            }
            fn peer(&self) -> String {
                self.peer.clone()
            }
            fn closer(&self) -> Result<Closer, TransportError> {
                let closer = Arc::clone(&self.closer);
                Ok(Box::new(move || closer()))
            }
        }
    };
}

forward_channel!(SourceChannel);
forward_channel!(DestChannel);
