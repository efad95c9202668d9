//! The source's NIC: queue pairs that write into the destination's
//! registered regions.
//!
//! - **memfd**: the destination's region files, received over its unix
//!   socket; a posted write, bounds-checked against the registration, is a
//!   `pwrite` into the file, whose pages the destination maps: the bytes
//!   land in its memory with no copy there. The posting thread does the
//!   copy a real NIC's DMA engine would do without the CPU.
//! - **tcp**: a TCP link per queue pair; a posted write goes out as a
//!   request and its bytes, and a completion thread turns the destination
//!   NIC's acknowledgements into completions.

use crate::faults::{Faults, Hit};
use crate::verbs::{CompletionQueue, QueuePair, RdmaError, RemoteAddr, WcStatus, WorkCompletion};
use migration_wire::rdma::{
    AckStatus, LinkHello, MemfdGrant, NicKind, RegionTable, WRITE_ACK_LEN, WriteAck, WriteRequest,
};
use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The source's simulated NIC, shared by every channel of a migration.
#[derive(Debug)]
pub struct SourceNic {
    /// The NIC the source insists on (`None`: whichever the destination offers).
    wanted: Option<NicKind>,
    /// Length of every RAM block, to check a destination's registration.
    blocks: Vec<u64>,
    io_timeout: Duration,
    faults: Option<Arc<Faults>>,
    /// The destination's memory, mapped once (memfd NIC).
    memfd: Mutex<Option<Arc<MemfdRemote>>>,
    /// The NIC the destination offered.
    offered: Mutex<Option<NicKind>>,
    /// Bytes written one-sided, writes and batches.
    pub(crate) bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) batches: AtomicU64,
    connect_time: Mutex<Duration>,
    /// Set once precopy is over on any channel: channels opened later (to
    /// resume postcopy) carry every page on the channel itself.
    pub(crate) precopy_over: std::sync::atomic::AtomicBool,
}

/// What the source's NIC did.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceStats {
    /// The NIC the destination offered, once known.
    pub nic: Option<NicKind>,
    /// Bytes of page data written one-sided.
    pub bytes_written: u64,
    /// One-sided writes posted.
    pub writes: u64,
    /// Page batches sent as one-sided writes.
    pub batches: u64,
    /// Time connecting to the destination's memfd NIC and receiving its
    /// region files took.
    pub connect_time: Duration,
    /// Faults that fired.
    pub faults: Option<crate::faults::FaultCounts>,
}

impl SourceNic {
    /// A NIC for guest RAM of blocks of `blocks` bytes each; `wanted` names
    /// the NIC the destination must offer, if any.
    pub fn new(wanted: Option<NicKind>, blocks: Vec<u64>, io_timeout: Duration, faults: Option<Arc<Faults>>) -> Self {
        Self {
            wanted,
            blocks,
            io_timeout,
            faults,
            memfd: Mutex::new(None),
            offered: Mutex::new(None),
            bytes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            connect_time: Mutex::new(Duration::ZERO),
            precopy_over: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn faults(&self) -> Option<&Arc<Faults>> {
        self.faults.as_ref()
    }

    pub(crate) fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// What the NIC did so far.
    pub fn stats(&self) -> SourceStats {
        SourceStats {
            nic: *self.offered.lock().unwrap_or_else(|e| e.into_inner()),
            bytes_written: self.bytes.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            connect_time: *self.connect_time.lock().unwrap_or_else(|e| e.into_inner()),
            faults: self.faults.as_ref().map(|f| f.counts()),
        }
    }

    /// Checks a destination's announcement against guest RAM and what was
    /// asked for.
    fn check(&self, table: &RegionTable) -> Result<(), RdmaError> {
        if let Some(wanted) = self.wanted
            && wanted != table.nic
        {
            return Err(RdmaError::Setup(format!(
                "the destination offers the {} NIC, this side asked for {} (--rdma-nic)",
                table.nic.name(),
                wanted.name()
            )));
        }
        let fits = table.regions.len() == self.blocks.len()
            && table
                .regions
                .iter()
                .enumerate()
                .all(|(i, r)| r.block == i as u32 && r.len == self.blocks[i]);
        if !fits {
            return Err(RdmaError::Setup(format!(
                "the destination registered {:?}, guest RAM has blocks of {:?} bytes",
                table.regions, self.blocks
            )));
        }
        Ok(())
    }

    /// Connects channel `channel`'s queue pair to what `table` announces,
    /// on the destination at `peer` (its control connection's address): a
    /// TCP NIC must listen there.
    pub fn queue_pair(
        &self,
        channel: u16,
        table: &RegionTable,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Box<dyn QueuePair>, RdmaError> {
        self.check(table)?;
        if table.nic == NicKind::Tcp
            && let (Ok(link), Some(peer)) = (table.link.parse::<SocketAddr>(), peer)
            && link.ip() != peer
        {
            return Err(RdmaError::Setup(format!(
                "the destination at {peer} names a TCP NIC on another host, {link}"
            )));
        }
        *self.offered.lock().unwrap_or_else(|e| e.into_inner()) = Some(table.nic);
        let cq = CompletionQueue::new(self.faults.clone());
        match table.nic {
            NicKind::Memfd => {
                let remote = {
                    let mut slot = self.memfd.lock().unwrap_or_else(|e| e.into_inner());
                    match &*slot {
                        Some(remote) => Arc::clone(remote),
                        None => {
                            let started = Instant::now();
                            let remote = Arc::new(MemfdRemote::connect(table, self.io_timeout)?);
                            *self.connect_time.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
                            *slot = Some(Arc::clone(&remote));
                            remote
                        }
                    }
                };
                Ok(Box::new(MemfdQp {
                    state: QpState::new(table.qp, channel, self.faults.clone()),
                    remote,
                    cq,
                    written: 0,
                }))
            }
            NicKind::Tcp => Ok(Box::new(TcpQp::connect(
                table,
                channel,
                cq,
                self.faults.clone(),
                self.io_timeout,
            )?)),
        }
    }
}

/// Opens a NIC link: the queue pair and the token `table` announced.
fn send_hello(link: &mut impl Write, table: &RegionTable) -> Result<(), RdmaError> {
    let hello = LinkHello {
        token: table.token,
        qp: table.qp,
    };
    link.write_all(&hello.encode())
        .map_err(|e| RdmaError::io("sending the NIC link's hello", e))
}

/// The destination's registered regions: the file each lives in and its
/// offset there. A write goes through the file into the page cache the
/// destination maps, as a DMA engine writes physical pages: no mapping on
/// this side, no page tables to fill.
#[derive(Debug)]
struct MemfdRemote {
    /// Per region: its key, its file, where it starts in the file and its length.
    regions: Vec<(u32, std::fs::File, u64, u64)>,
}

impl MemfdRemote {
    /// Fetches the regions' files over the destination's socket.
    fn connect(table: &RegionTable, timeout: Duration) -> Result<Self, RdmaError> {
        let link = &table.link;
        let mut stream = UnixStream::connect(link)
            .map_err(|e| RdmaError::io(format!("connecting to the memfd NIC at {link}"), e))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| RdmaError::io("setting the NIC link's timeout", e))?;
        send_hello(&mut stream, table)?;
        let want = 4 + table.regions.len() * 16;
        let mut bytes = vec![0u8; MemfdGrant::MAX_LEN];
        let (got, fds) = migration_sys::fdpass::recv_with_fds(&stream, &mut bytes, migration_sys::fdpass::MAX_FDS)
            .map_err(|e| RdmaError::io("receiving the memfd NIC's grant", e))?;
        if got == 0 {
            return Err(RdmaError::Setup(
                "the memfd NIC closed its link without a grant (wrong token?)".into(),
            ));
        }
        if got < want {
            stream
                .read_exact(&mut bytes[got..want])
                .map_err(|e| RdmaError::io("receiving the memfd NIC's grant", e))?;
        }
        let grant = MemfdGrant::decode(&bytes[..want.max(got)])?;
        if grant.regions.len() != table.regions.len() || fds.len() != table.regions.len() {
            return Err(RdmaError::Setup(format!(
                "the memfd NIC granted {} regions with {} descriptors, {} were announced",
                grant.regions.len(),
                fds.len(),
                table.regions.len()
            )));
        }
        let mut regions = Vec::with_capacity(fds.len());
        for ((key, (rkey, offset)), fd) in table.regions.iter().zip(grant.regions).zip(fds) {
            if rkey != key.rkey {
                return Err(RdmaError::Setup(format!(
                    "the memfd NIC granted key {rkey:#x} where {:#x} was announced",
                    key.rkey
                )));
            }
            let file = std::fs::File::from(fd);
            let size = file
                .metadata()
                .map_err(|e| RdmaError::io("reading the size of a granted region", e))?
                .len();
            if offset.checked_add(key.len).is_none_or(|end| end > size) {
                return Err(RdmaError::Setup(format!(
                    "the memfd NIC granted {} bytes at offset {offset} of a {size}-byte file",
                    key.len
                )));
            }
            regions.push((rkey, file, offset, key.len));
        }
        Ok(Self { regions })
    }

    /// Writes `bytes` at `offset` of region `rkey`; false (nothing written)
    /// when there is no such region or the bytes do not fit in it.
    fn write(&self, rkey: u32, offset: u64, bytes: &[u8]) -> Result<bool, RdmaError> {
        use std::os::unix::fs::FileExt;
        let Some((_, file, base, len)) = self.regions.iter().find(|(key, ..)| *key == rkey) else {
            return Ok(false);
        };
        if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > *len) {
            return Ok(false);
        }
        file.write_all_at(bytes, base + offset)
            .map_err(|e| RdmaError::io("writing into the destination's memory", e))?;
        Ok(true)
    }
}

/// What both simulated NICs' queue pairs keep: their number, their
/// channel, the faults to inject, and whether they are in error.
#[derive(Debug)]
struct QpState {
    number: u32,
    channel: u16,
    faults: Option<Arc<Faults>>,
    /// Writes posted so far (for faults that hit the N-th).
    posted: u64,
    /// Why the queue pair is in error, once it is.
    error: Option<String>,
}

impl QpState {
    fn new(number: u32, channel: u16, faults: Option<Arc<Faults>>) -> Self {
        Self {
            number,
            channel,
            faults,
            posted: 0,
            error: None,
        }
    }

    /// Whether a write may go ahead: on a queue pair in error it is
    /// flushed, and an injected queue-pair error fails it and puts the
    /// queue pair in error; either is the status to complete it with.
    fn admit(&mut self) -> Result<(), WcStatus> {
        if self.error.is_some() {
            return Err(WcStatus::Flushed);
        }
        self.posted += 1;
        if let Some(Hit::QpError) = self.faults.as_ref().and_then(|f| f.on_write(self.channel, self.posted)) {
            self.error = Some("injected fault".into());
            return Err(WcStatus::QpError);
        }
        Ok(())
    }
}

/// A queue pair of the memfd NIC.
#[derive(Debug)]
struct MemfdQp {
    state: QpState,
    remote: Arc<MemfdRemote>,
    cq: CompletionQueue,
    written: u64,
}

impl QueuePair for MemfdQp {
    fn number(&self) -> u32 {
        self.state.number
    }

    fn post_write(&mut self, wr_id: u64, local: &[u8], remote: RemoteAddr) -> Result<(), RdmaError> {
        let status = match self.state.admit() {
            Err(status) => status,
            Ok(()) => match self.remote.write(remote.rkey, remote.offset, local) {
                Ok(true) => {
                    self.written += local.len() as u64;
                    WcStatus::Success
                }
                // No such key, or outside the region: refused, nothing written.
                Ok(false) => {
                    self.state.error = Some("a write was refused".into());
                    WcStatus::RemoteAccess
                }
                Err(_) => {
                    self.state.error = Some("a write failed".into());
                    WcStatus::QpError
                }
            },
        };
        self.cq.push(WorkCompletion { wr_id, status });
        Ok(())
    }

    fn completions(&self) -> &CompletionQueue {
        &self.cq
    }

    fn drop_link(&mut self) {
        self.state.error.get_or_insert_with(|| "the link dropped".into());
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }
}

/// What the TCP queue pair's completion thread shares with the poster.
#[derive(Debug, Default)]
struct InFlight {
    /// Length of each write awaiting its acknowledgement.
    writes: HashMap<u64, u32>,
    /// The link is gone: no acknowledgement will come.
    down: bool,
}

/// A queue pair of the TCP NIC.
#[derive(Debug)]
struct TcpQp {
    state: QpState,
    stream: TcpStream,
    cq: Arc<CompletionQueue>,
    in_flight: Arc<Mutex<InFlight>>,
    written: Arc<AtomicU64>,
}

impl TcpQp {
    fn connect(
        table: &RegionTable,
        channel: u16,
        cq: CompletionQueue,
        faults: Option<Arc<Faults>>,
        timeout: Duration,
    ) -> Result<Self, RdmaError> {
        let addr: SocketAddr = table
            .link
            .parse()
            .map_err(|_| RdmaError::Setup(format!("the TCP NIC's address {:?} is not HOST:PORT", table.link)))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| RdmaError::io(format!("connecting to the TCP NIC at {addr}"), e))?;
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(timeout))
        };
        setup(&stream).map_err(|e| RdmaError::io("configuring the NIC link", e))?;
        send_hello(&mut stream, table)?;
        let reader = stream
            .try_clone()
            .map_err(|e| RdmaError::io("cloning the NIC link", e))?;
        let cq = Arc::new(cq);
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
        let written = Arc::new(AtomicU64::new(0));
        let (acks, pending, bytes) = (Arc::clone(&cq), Arc::clone(&in_flight), Arc::clone(&written));
        std::thread::Builder::new()
            .name(format!("rdma-cq-{channel}"))
            .spawn(move || complete_acks(reader, &acks, &pending, &bytes))
            .map_err(|e| RdmaError::io("starting the completion thread", e))?;
        Ok(Self {
            state: QpState::new(table.qp, channel, faults),
            stream,
            cq,
            in_flight,
            written,
        })
    }

    /// Puts the queue pair in error and closes its link (a reliable
    /// connection in error is torn down).
    fn fail(&mut self, reason: &str) {
        self.state.error.get_or_insert_with(|| reason.into());
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Turns the destination NIC's acknowledgements into completions until the
/// link ends; then every write still in flight completes `LinkDown`.
fn complete_acks(mut reader: TcpStream, cq: &CompletionQueue, in_flight: &Mutex<InFlight>, written: &AtomicU64) {
    let mut raw = [0u8; WRITE_ACK_LEN];
    while reader.read_exact(&mut raw).is_ok() {
        let Ok(ack) = WriteAck::decode(&raw) else { break };
        let len = in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writes
            .remove(&ack.wr_id);
        let Some(len) = len else { break };
        let status = match ack.status {
            AckStatus::Done => {
                written.fetch_add(len.into(), Ordering::Relaxed);
                WcStatus::Success
            }
            AckStatus::RemoteAccess => WcStatus::RemoteAccess,
        };
        cq.push(WorkCompletion {
            wr_id: ack.wr_id,
            status,
        });
    }
    let lost: Vec<u64> = {
        let mut state = in_flight.lock().unwrap_or_else(|e| e.into_inner());
        state.down = true;
        state.writes.drain().map(|(id, _)| id).collect()
    };
    for wr_id in lost {
        cq.push(WorkCompletion {
            wr_id,
            status: WcStatus::LinkDown,
        });
    }
}

impl QueuePair for TcpQp {
    fn number(&self) -> u32 {
        self.state.number
    }

    fn post_write(&mut self, wr_id: u64, local: &[u8], remote: RemoteAddr) -> Result<(), RdmaError> {
        let complete = |cq: &CompletionQueue, status| cq.push(WorkCompletion { wr_id, status });
        if let Err(status) = self.state.admit() {
            if status == WcStatus::QpError {
                self.fail("injected fault");
            }
            complete(&self.cq, status);
            return Ok(());
        }
        let len = u32::try_from(local.len()).map_err(|_| RdmaError::Setup("a write of 4 GiB or more".into()))?;
        {
            let mut state = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if state.down {
                drop(state);
                complete(&self.cq, WcStatus::LinkDown);
                return Ok(());
            }
            state.writes.insert(wr_id, len);
        }
        let header = WriteRequest {
            wr_id,
            rkey: remote.rkey,
            offset: remote.offset,
            len,
        }
        .encode();
        if write_all_vectored(&mut self.stream, &header, local).is_err() {
            // The completion thread completes it `LinkDown` once the link
            // is seen gone.
            self.fail("the link dropped");
        }
        Ok(())
    }

    fn completions(&self) -> &CompletionQueue {
        &self.cq
    }

    fn drop_link(&mut self) {
        self.fail("the link dropped");
    }

    fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl Drop for TcpQp {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Writes `head` then `body`, in as few calls as the socket takes.
fn write_all_vectored(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    let total = head.len() + body.len();
    while done < total {
        let wrote = if done < head.len() {
            stream.write_vectored(&[IoSlice::new(&head[done..]), IoSlice::new(body)])
        } else {
            stream.write(&body[done - head.len()..])
        };
        let n = match wrote {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}
