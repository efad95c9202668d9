//! The destination's NIC: guest RAM registered (pinned, given remote keys),
//! and the link the source's NIC reaches it by.
//!
//! - **memfd**: a unix socket in a private directory. A source that
//!   presents the token for a queue pair still in precopy gets every
//!   region's file descriptor and offset, and writes through them: its
//!   writes land with no copy on this side. Revoking access cannot take a
//!   descriptor back; the source's NIC checks its writes against the
//!   registration and stops writing at the end of precopy, and the memfd
//!   NIC is meant for one host under one operator.
//! - **tcp**: a TCP listener. Each queue pair's link gets a NIC thread that
//!   reads write requests, checks key, bounds and access, reads the bytes
//!   straight into the region and acknowledges; a refused write puts the
//!   queue pair in error and closes its link, and revoking the queue pair
//!   shuts its links down.

use crate::verbs::RdmaError;
use migration_sys::GuestRegion;
use migration_wire::rdma::{
    AckStatus, LINK_HELLO_LEN, LinkHello, MemfdGrant, NicKind, RegionKey, RegionTable, WRITE_REQUEST_LEN, WriteAck,
    WriteRequest,
};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Which queue pairs may write.
#[derive(Debug, Default)]
struct Access {
    revoked: HashSet<u32>,
    /// Precopy is over somewhere: no new queue pair is announced or granted.
    closed: bool,
}
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a new link has to present its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A registered region: one RAM block.
#[derive(Debug)]
pub(crate) struct Registered {
    pub(crate) key: RegionKey,
    pub(crate) region: Arc<GuestRegion>,
}

/// What the NIC's threads and the channels share.
#[derive(Debug)]
struct Shared {
    kind: NicKind,
    token: u64,
    regions: OnceLock<Vec<Registered>>,
    /// Queue pairs handed out so far (numbers `0..issued`).
    issued: AtomicU32,
    /// Queue pairs whose access is revoked, and whether queue pairs are
    /// still announced (not once precopy is over): one lock, so no queue
    /// pair is announced after the first revocation.
    access: Mutex<Access>,
    /// The TCP NIC's links, per queue pair: shut down when it is revoked
    /// and when the NIC goes away, so no NIC thread outlives either.
    links: Mutex<Vec<(u32, TcpStream)>>,
    /// The NIC is going away: its threads stop.
    stopping: AtomicBool,
    /// Bytes the TCP NIC wrote into regions.
    bytes_written: AtomicU64,
    /// Writes it refused.
    refused: AtomicU64,
    /// Bytes of pages the source's notices reported placed, checked.
    placed: AtomicU64,
}

impl Shared {
    fn access(&self) -> std::sync::MutexGuard<'_, Access> {
        self.access.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shuts the links of queue pair `qp` (all of them with `None`) down.
    fn shut_links(&self, qp: Option<u32>) {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (_, link) in links.iter().filter(|(n, _)| qp.is_none_or(|qp| *n == qp)) {
            let _ = link.shutdown(std::net::Shutdown::Both);
        }
    }

    fn may_write(&self, qp: u32) -> bool {
        !self.access().revoked.contains(&qp)
    }

    /// Where a write of `len` bytes at `offset` of region `rkey` from queue
    /// pair `qp` lands, or why it may not.
    fn check(&self, qp: u32, rkey: u32, offset: u64, len: u64) -> Result<(&Arc<GuestRegion>, usize), String> {
        let regions = self.regions.get().ok_or("no memory is registered")?;
        let found = regions
            .iter()
            .find(|r| r.key.rkey == rkey)
            .ok_or_else(|| format!("no region has key {rkey:#x}"))?;
        if !self.may_write(qp) {
            return Err(format!("queue pair {qp}'s access is revoked"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= found.key.len => Ok((&found.region, offset as usize)),
            _ => Err(format!(
                "{len} bytes at offset {offset} run outside block {}'s {} bytes",
                found.key.block, found.key.len
            )),
        }
    }
}

/// The destination's simulated NIC.
#[derive(Debug)]
pub struct DestNic {
    shared: Arc<Shared>,
    /// Where the source's NIC connects.
    link: String,
    /// The private directory of the memfd NIC's socket, removed on drop.
    socket_dir: Option<PathBuf>,
    /// How long registering took.
    registered_in: Mutex<Option<Duration>>,
}

/// What the destination's NIC did.
#[derive(Debug, Clone, Copy, Default)]
pub struct DestStats {
    /// Bytes of guest RAM registered.
    pub registered_bytes: u64,
    /// Time registering (pinning) them took.
    pub register_time: Duration,
    /// Bytes the TCP NIC wrote into guest RAM (the memfd NIC's writes are
    /// the source's own).
    pub nic_bytes_written: u64,
    /// Writes the NIC refused.
    pub refused_writes: u64,
    /// Bytes of pages that arrived by one-sided writes, checked where they
    /// landed.
    pub placed_bytes: u64,
}

impl DestNic {
    /// Starts a NIC of `kind`; a TCP NIC listens on `ip` (port chosen by the
    /// kernel).
    pub fn start(kind: NicKind, ip: IpAddr) -> Result<Self, RdmaError> {
        let shared = Arc::new(Shared {
            kind,
            token: crate::random_u64()?,
            regions: OnceLock::new(),
            issued: AtomicU32::new(0),
            access: Mutex::new(Access::default()),
            links: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            bytes_written: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            placed: AtomicU64::new(0),
        });
        let (link, socket_dir) = match kind {
            NicKind::Memfd => {
                let dir = private_dir()?;
                let path = dir.join("nic.sock");
                let listener = UnixListener::bind(&path)
                    .map_err(|e| RdmaError::io(format!("binding the memfd NIC's socket {}", path.display()), e))?;
                let serve = Arc::clone(&shared);
                spawn("rdma-memfd-nic", move || serve_memfd(&serve, &listener))?;
                (path.to_string_lossy().into_owned(), Some(dir))
            }
            NicKind::Tcp => {
                let listener = TcpListener::bind(SocketAddr::new(ip, 0))
                    .map_err(|e| RdmaError::io(format!("binding the TCP NIC on {ip}"), e))?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| RdmaError::io("reading the TCP NIC's address", e))?;
                let serve = Arc::clone(&shared);
                spawn("rdma-tcp-nic", move || serve_tcp(&serve, &listener))?;
                (addr.to_string(), None)
            }
        };
        Ok(Self {
            shared,
            link,
            socket_dir,
            registered_in: Mutex::new(None),
        })
    }

    /// The NIC's kind.
    pub fn kind(&self) -> NicKind {
        self.shared.kind
    }

    /// Where the source's NIC connects (a socket path or `host:port`).
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Registers guest RAM, one region per block in block order, giving
    /// each a remote key. With `pin_all` every page is populated first, on
    /// two threads, as `ibv_reg_mr` pins memory (QEMU's `rdma-pin-all`);
    /// without, pages are allocated as writes reach them, as an on-demand
    /// paging registration does. The memfd NIC shares memory by file, so it
    /// needs regions mapped from a file (a memfd or a file). Once only.
    pub fn register(&self, blocks: &[Arc<GuestRegion>], pin_all: bool) -> Result<Duration, RdmaError> {
        if self.shared.kind == NicKind::Memfd {
            if let Some(at) = blocks.iter().position(|b| b.backing().is_none()) {
                return Err(RdmaError::Setup(format!(
                    "the memfd NIC shares guest RAM by file descriptor, but block {at} is private memory \
                     (postcopy and --guard-pages use private memory: use --rdma-nic tcp there)"
                )));
            }
            if blocks.len() > migration_sys::fdpass::MAX_FDS {
                return Err(RdmaError::Setup(format!(
                    "the memfd NIC passes at most {} regions, guest RAM has {} blocks",
                    migration_sys::fdpass::MAX_FDS,
                    blocks.len()
                )));
            }
        }
        let started = Instant::now();
        if pin_all {
            migration_sys::region::populate_all(blocks.iter().map(|b| &**b))?;
        }
        let mut used = HashSet::new();
        let mut regions = Vec::with_capacity(blocks.len());
        for (index, region) in blocks.iter().enumerate() {
            // Distinct, unguessable keys.
            let rkey = loop {
                let key = crate::random_u64()? as u32;
                if used.insert(key) {
                    break key;
                }
            };
            regions.push(Registered {
                key: RegionKey {
                    block: index as u32,
                    rkey,
                    len: region.len() as u64,
                },
                region: Arc::clone(region),
            });
        }
        self.shared
            .regions
            .set(regions)
            .map_err(|_| RdmaError::Setup("guest RAM is registered already".into()))?;
        let took = started.elapsed();
        *self.registered_in.lock().unwrap_or_else(|e| e.into_inner()) = Some(took);
        Ok(took)
    }

    /// A new queue pair's announcement, once memory is registered and while
    /// precopy runs; `None` otherwise (pages then travel on the channel).
    pub fn announce(&self) -> Option<RegionTable> {
        let regions = self.shared.regions.get()?;
        let access = self.shared.access();
        if access.closed {
            return None;
        }
        Some(RegionTable {
            nic: self.shared.kind,
            qp: self.shared.issued.fetch_add(1, Ordering::AcqRel),
            token: self.shared.token,
            link: self.link.clone(),
            regions: regions.iter().map(|r| r.key).collect(),
        })
    }

    /// Revokes queue pair `qp`'s access (its channel's precopy is over):
    /// its TCP links are shut down, the memfd NIC grants it nothing more,
    /// and no further queue pair is announced: from here the guest may run
    /// on this side, and pages are placed whole by the receiver.
    pub fn revoke(&self, qp: u32) {
        {
            let mut access = self.shared.access();
            access.closed = true;
            access.revoked.insert(qp);
        }
        self.shared.shut_links(Some(qp));
    }

    /// Whether queue pair `qp` may write.
    pub fn may_write(&self, qp: u32) -> bool {
        self.shared.may_write(qp)
    }

    /// The region of block `block`, when registered.
    pub fn region(&self, block: u32) -> Option<&Arc<GuestRegion>> {
        let regions = self.shared.regions.get()?;
        regions.get(block as usize).map(|r| &r.region)
    }

    /// What the NIC did so far.
    pub fn stats(&self) -> DestStats {
        DestStats {
            registered_bytes: self
                .shared
                .regions
                .get()
                .map_or(0, |r| r.iter().map(|r| r.key.len).sum()),
            register_time: self
                .registered_in
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_default(),
            nic_bytes_written: self.shared.bytes_written.load(Ordering::Relaxed),
            refused_writes: self.shared.refused.load(Ordering::Relaxed),
            placed_bytes: self.shared.placed.load(Ordering::Relaxed),
        }
    }

    /// Counts `bytes` of pages placed by one-sided writes and checked.
    pub(crate) fn count_placed(&self, bytes: u64) {
        self.shared.placed.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for DestNic {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.shut_links(None);
        // Wake the listening thread so it sees the flag.
        match self.shared.kind {
            NicKind::Memfd => drop(UnixStream::connect(&self.link)),
            NicKind::Tcp => {
                if let Ok(addr) = self.link.parse::<SocketAddr>() {
                    drop(TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
                }
            }
        }
        if let Some(dir) = &self.socket_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), RdmaError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
        .map_err(|e| RdmaError::io("starting a NIC thread", e))
}

/// A fresh directory only this user may enter, for the NIC's socket.
fn private_dir() -> Result<PathBuf, RdmaError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "migrate-rdma-{}-{:016x}",
        std::process::id(),
        crate::random_u64()?
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| RdmaError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Reads a link's hello and checks its token and queue pair.
fn hello(shared: &Shared, stream: &mut impl Read) -> Result<LinkHello, String> {
    let mut raw = [0u8; LINK_HELLO_LEN];
    stream
        .read_exact(&mut raw)
        .map_err(|e| format!("reading the hello: {e}"))?;
    let hello = LinkHello::decode(&raw).map_err(|e| e.to_string())?;
    if hello.token != shared.token {
        return Err("wrong token".into());
    }
    if hello.qp >= shared.issued.load(Ordering::Acquire) {
        return Err(format!("queue pair {} was never announced", hello.qp));
    }
    Ok(hello)
}

fn serve_memfd(shared: &Shared, listener: &UnixListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
        // A link that fails its hello, or whose queue pair's precopy is
        // over, is closed with nothing granted.
        let Ok(hello) = hello(shared, &mut stream) else {
            continue;
        };
        let access = shared.access();
        if access.closed || access.revoked.contains(&hello.qp) {
            continue;
        }
        drop(access);
        let Some(regions) = shared.regions.get() else { continue };
        let mut grant = MemfdGrant { regions: Vec::new() };
        let mut fds = Vec::new();
        for r in regions {
            // `register` checked every region has a file.
            let Some((file, offset)) = r.region.backing() else {
                continue;
            };
            grant.regions.push((r.key.rkey, offset));
            fds.push(file.as_fd());
        }
        let mut bytes = Vec::new();
        grant.encode(&mut bytes);
        let _ = migration_sys::fdpass::send_with_fds(&stream, &bytes, &fds);
    }
}

fn serve_tcp(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let link = Arc::clone(shared);
        let _ = spawn("rdma-tcp-qp", move || serve_queue_pair(&link, stream));
    }
}

/// One queue pair's link on the TCP NIC: writes applied straight into the
/// registered regions, each acknowledged, until the link closes, a write is
/// refused, or the queue pair is revoked; the link is shut down then.
fn serve_queue_pair(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let Ok(hello) = hello(shared, &mut stream) else { return };
    // From here the link lives until the source closes it or its queue
    // pair is revoked (which shuts it down).
    let _ = stream.set_read_timeout(None);
    let Ok(link) = stream.try_clone() else { return };
    let link_fd = {
        let mut links = shared.links.lock().unwrap_or_else(|e| e.into_inner());
        links.push((hello.qp, link));
        links.last().map(|(_, l)| std::os::fd::AsRawFd::as_raw_fd(l))
    };
    // Revoked before the link was listed: nothing shut it down.
    if shared.may_write(hello.qp) {
        apply_writes(shared, hello.qp, &mut stream);
    }
    // A refused write puts the queue pair in error: its link closes (the
    // bytes that followed the request are never read).
    let _ = stream.shutdown(std::net::Shutdown::Both);
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(_, l)| Some(std::os::fd::AsRawFd::as_raw_fd(l)) != link_fd);
}

/// Applies queue pair `qp`'s writes from `stream` until it ends, fails, or
/// a write is refused.
fn apply_writes(shared: &Shared, qp: u32, stream: &mut TcpStream) {
    let mut raw = [0u8; WRITE_REQUEST_LEN];
    while !shared.stopping.load(Ordering::Acquire) && stream.read_exact(&mut raw).is_ok() {
        let Ok(request) = WriteRequest::decode(&raw) else {
            return;
        };
        let status = match shared.check(qp, request.rkey, request.offset, request.len.into()) {
            Ok((region, offset)) => {
                if receive_into(stream, region, offset, request.len as usize).is_err() {
                    return;
                }
                shared.bytes_written.fetch_add(request.len.into(), Ordering::Relaxed);
                AckStatus::Done
            }
            Err(_) => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                AckStatus::RemoteAccess
            }
        };
        let ack = WriteAck {
            wr_id: request.wr_id,
            status,
        };
        if stream.write_all(&ack.encode()).is_err() || status != AckStatus::Done {
            return;
        }
    }
}

/// Reads exactly `len` bytes from `stream` into `region` at `offset`.
fn receive_into(stream: &TcpStream, region: &GuestRegion, offset: usize, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match region.recv_from(stream.as_fd(), offset + done, len - done) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
