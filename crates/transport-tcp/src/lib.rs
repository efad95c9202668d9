//! TCP transport: each migration channel is one TCP connection carrying
//! frames (see `migration-wire`) in both directions.
//!
//! Sockets are set up through socket2: no-delay, large buffers, keepalive,
//! and a user timeout so a vanished peer is noticed. Connecting retries
//! with backoff within a bounded time, so a sender started a moment before
//! its receiver still finds it.
#![forbid(unsafe_code)]

mod record;
mod tls;
use record::{Opener, Sealer};
pub use tls::{TlsConfig, TlsError, TlsFiles, generate_certs};

use migration_core::transport::{ChannelHalves, Closer};
use migration_core::{Channel, ChannelRx, ChannelTx, DirectPlacement, GuestRun, TransportError};
use migration_sys::uring::UringSocket;
use migration_wire::page::BATCH_HEADER_LEN;
use migration_wire::{FRAME_HEADER_LEN, FrameHeader, MAX_FRAME_BODY, Message, MessageKind, PageBatch};
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Socket settings.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long `connect` keeps retrying a refused or unreachable address.
    pub connect_timeout: Duration,
    /// Longest a send may block, and the TCP user timeout: unacknowledged
    /// data older than this breaks the connection.
    pub io_timeout: Duration,
    /// Socket send and receive buffer size.
    pub buffer_size: usize,
    /// Send and receive through io_uring (a ring per channel half, used by
    /// the one thread that owns the half); plain system calls when false or
    /// when the kernel refuses io_uring.
    pub io_uring: bool,
    /// TLS on every connection (the client side for `connect`, the server
    /// side for a listener); `None`: plaintext.
    pub tls: Option<TlsConfig>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            buffer_size: 4 << 20,
            io_uring: true,
            tls: None,
        }
    }
}

fn configure(stream: &TcpStream, options: &TcpOptions) -> io::Result<()> {
    let socket = SockRef::from(stream);
    socket.set_tcp_nodelay(true)?;
    // Buffer sizes are a hint; the kernel clamps them to its limits.
    let _ = socket.set_send_buffer_size(options.buffer_size);
    let _ = socket.set_recv_buffer_size(options.buffer_size);
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(options.io_timeout))?;
    stream.set_write_timeout(Some(options.io_timeout))?;
    Ok(())
}

/// Resolves `addr` (`host:port`).
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::io(format!("resolving {addr}"), e))?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::io(
            format!("resolving {addr}"),
            io::Error::new(io::ErrorKind::NotFound, "no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to `addr`, retrying with backoff until `connect_timeout`.
pub fn connect(addr: &str, options: &TcpOptions) -> Result<TcpChannel, TransportError> {
    let addrs = resolve(addr)?;
    let deadline = Instant::now() + options.connect_timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        let mut last = None;
        for target in &addrs {
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            match TcpStream::connect_timeout(target, remaining) {
                Ok(stream) => {
                    configure(&stream, options).map_err(|e| TransportError::io("configuring the socket", e))?;
                    return TcpChannel::new(stream, options, addr);
                }
                Err(err) => last = Some(err),
            }
        }
        let err = last.expect("at least one address");
        if Instant::now() + backoff >= deadline {
            return Err(TransportError::io(
                format!("connecting to {addr} (gave up after {:?})", options.connect_timeout),
                err,
            ));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// A listening socket that hands out channels.
#[derive(Debug)]
pub struct TcpListener {
    listener: std::net::TcpListener,
    options: TcpOptions,
}

impl TcpListener {
    /// Listens on `addr` (`host:port`; port 0 picks a free one).
    pub fn bind(addr: &str, options: TcpOptions) -> Result<Self, TransportError> {
        let target = resolve(addr)?[0];
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)
            .map_err(|e| TransportError::io("creating a socket", e))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| TransportError::io("setting SO_REUSEADDR", e))?;
        socket
            .bind(&target.into())
            .map_err(|e| TransportError::io(format!("binding {addr}"), e))?;
        socket
            .listen(16)
            .map_err(|e| TransportError::io(format!("listening on {addr}"), e))?;
        Ok(Self {
            listener: socket.into(),
            options,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(|e| TransportError::io("reading the bound address", e))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<TcpChannel, TransportError> {
        self.accept_within(None)
    }

    /// Waits for the next connection, at most `timeout` (`None`: forever).
    pub fn accept_within(&self, timeout: Option<Duration>) -> Result<TcpChannel, TransportError> {
        // Linux applies the receive timeout of a listening socket to accept.
        SockRef::from(&self.listener)
            .set_read_timeout(timeout)
            .map_err(|e| TransportError::io("setting the accept timeout", e))?;
        let (stream, _) = self.listener.accept().map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                TransportError::TimedOut(timeout.unwrap_or_default())
            }
            _ => TransportError::io("accepting a connection", e),
        })?;
        configure(&stream, &self.options).map_err(|e| TransportError::io("configuring the socket", e))?;
        TcpChannel::new(stream, &self.options, "")
    }
}

/// The sending half of a TCP channel.
#[derive(Debug)]
pub struct TcpTx {
    stream: TcpStream,
    uring: Option<UringSocket>,
    head: Vec<u8>,
    sent: u64,
    tls: Option<Sealer>,
}

impl ChannelTx for TcpTx {
    /// Plain system calls from now on: a ring's submit-and-wait costs more
    /// than it saves on small messages someone waits for (postcopy's fault
    /// latency, median: 93-95 us against 121-125 us with the ring, in
    /// paired runs of `bench/postcopy.py`'s case at once).
    fn prefer_latency(&mut self) {
        self.uring = None;
    }

    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.head.clear();
        // The page bytes are written from the channel thread's buffer
        // without a copy.
        let payload = message.encode_head(&mut self.head);
        let what = || format!("sending {}", message.kind().name());
        let (uring, stream) = (&mut self.uring, &mut self.stream);
        let sent = match &mut self.tls {
            // Encrypted in place, a batch of records per write.
            Some(tls) => tls.seal(&[&self.head, payload], &mut |records| match uring {
                Some(ring) => ring.send_all(&[records]),
                None => stream.write_all(records),
            }),
            None => match uring {
                Some(ring) => ring.send_all(&[&self.head, payload]),
                None => write_all_vectored(stream, &mut [IoSlice::new(&self.head), IoSlice::new(payload)]),
            }
            .map(|()| (self.head.len() + payload.len()) as u64),
        }
        .map_err(|e| TransportError::io(what(), e))?;
        self.sent += sent;
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn shutdown(&mut self) {
        if let Some(tls) = &mut self.tls {
            let _ = tls.close(&mut |records| self.stream.write_all(records));
        }
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The receiving half of a TCP channel.
pub struct TcpRx {
    wire: RxWire,
    /// The page hashes of the last pages frame, verified.
    hashes: Vec<u64>,
    body: Vec<u8>,
    /// Where page bytes of batches sent as is go, when set.
    direct: Option<Arc<dyn DirectPlacement>>,
    /// One page read back from guest memory, to hash it.
    scratch: Vec<u8>,
    /// Takes records of the transport's own out of the stream.
    records: Option<RecordHandler>,
}

impl std::fmt::Debug for TcpRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRx")
            .field("stream", &self.wire.stream)
            .field("uring", &self.wire.uring)
            .field("received", &self.wire.received())
            .field("direct", &self.direct.is_some())
            .finish_non_exhaustive()
    }
}

/// How the receiving half reads bytes off its connection.
struct RxWire {
    stream: TcpStream,
    uring: Option<UringSocket>,
    tls: Option<Opener>,
    timeout: Option<Duration>,
    /// Plaintext connections: bytes read so far.
    plain_received: u64,
}

/// Reads what is there (at least a byte, 0 at end of stream) into `buf`.
fn recv_some(uring: &mut Option<UringSocket>, stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match uring {
        Some(ring) => ring.recv(buf),
        None => (&*stream).read(buf),
    }
}

/// Reads exactly `len` bytes through `read`, which reads what it can at the
/// given count of bytes already read and returns how many it read.
fn read_fully(
    what: &str,
    at_frame_start: bool,
    len: usize,
    timeout: Option<Duration>,
    mut read: impl FnMut(usize) -> io::Result<usize>,
) -> Result<(), TransportError> {
    let mut filled = 0;
    while filled < len {
        match read(filled) {
            Ok(0) if filled == 0 && at_frame_start => return Err(TransportError::Closed),
            Ok(0) => {
                return Err(TransportError::io(
                    format!("reading {what}"),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended after {filled} of {len} bytes"),
                    ),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(TransportError::TimedOut(timeout.unwrap_or_default()));
            }
            Err(e) => return Err(TransportError::io(format!("reading {what}"), e)),
        }
    }
    Ok(())
}

impl RxWire {
    /// Wire bytes read so far (ciphertext on a TLS connection).
    fn received(&self) -> u64 {
        self.tls.as_ref().map_or(self.plain_received, Opener::received)
    }

    /// Fills `buf` with the next bytes of the stream (plaintext).
    fn read_exact(&mut self, what: &str, at_frame_start: bool, buf: &mut [u8]) -> Result<(), TransportError> {
        let (uring, stream) = (&mut self.uring, &self.stream);
        match &mut self.tls {
            // Ciphertext is read in large reads and decrypted in place.
            Some(tls) => read_fully(what, at_frame_start, buf.len(), self.timeout, |filled| {
                tls.read(&mut buf[filled..], |sealed| recv_some(uring, stream, sealed))
            }),
            None => {
                read_fully(what, at_frame_start, buf.len(), self.timeout, |filled| {
                    recv_some(uring, stream, &mut buf[filled..])
                })?;
                self.plain_received += buf.len() as u64;
                Ok(())
            }
        }
    }

    /// Reads the next bytes of the stream straight into guest memory,
    /// `runs` after one another, leaving in `hashes` the hash of each page
    /// (`page_size` bytes) as it landed.
    fn place(
        &mut self,
        runs: &[GuestRun<'_>],
        page_size: usize,
        hashes: &mut Vec<u64>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), TransportError> {
        hashes.clear();
        let plain = self.tls.is_none();
        let (uring, stream, tls) = (&mut self.uring, &self.stream, &mut self.tls);
        let mut hasher = migration_wire::page::PageHasher::new(page_size);
        for run in runs {
            let mut hashed = 0;
            read_fully("page bytes", false, run.len, self.timeout, |filled| {
                let at = run.offset + filled;
                let n = match tls {
                    // Decrypted where the ciphertext landed, hashed there
                    // and copied once into guest memory.
                    Some(tls) => {
                        return tls.read_to(
                            run.len - filled,
                            |off, plain| {
                                hasher.feed(plain, hashes);
                                run.region.write(at + off, plain).map_err(io::Error::other)
                            },
                            |sealed| recv_some(uring, stream, sealed),
                        );
                    }
                    None => match uring {
                        Some(ring) => ring.recv_into(run.region, at, run.len - filled)?,
                        None => run.region.recv_from(stream.as_fd(), at, run.len - filled)?,
                    },
                };
                // Hash the pages completed by this read while they are warm.
                hashed = run
                    .hash_pages(hashed, filled + n, page_size, scratch, hashes)
                    .map_err(io::Error::other)?;
                Ok(n)
            })?;
            if plain {
                self.plain_received += run.len as u64;
            }
        }
        Ok(())
    }
}

/// The shortest average run of contiguous guest memory a batch's pages
/// must form to be read straight into place (a read per run).
const MIN_DIRECT_RUN: usize = 16 << 10;

impl TcpRx {
    /// Reads body bytes `[from, to)` into the buffer.
    fn read_exact(&mut self, what: &str, at_frame_start: bool, from: usize, to: usize) -> Result<(), TransportError> {
        self.wire.read_exact(what, at_frame_start, &mut self.body[from..to])
    }

    /// For a pages frame whose batch header and entry table (`head_len`
    /// bytes) are in the buffer: reads the `payload` bytes straight into
    /// guest memory where the direct placement says, hashing each page as
    /// it lands, and checks the frame's checksum. Returns false, having
    /// read nothing more, when the batch is not one to place this way.
    fn place_payload(&mut self, header: &FrameHeader, head_len: usize, payload: usize) -> Result<bool, TransportError> {
        let head = &self.body[..head_len];
        let mut runs = Vec::new();
        let (Some(direct), Ok(batch)) = (&self.direct, PageBatch::decode_head(head)) else {
            return Ok(false);
        };
        if !direct.runs(&batch, &mut runs) || runs.iter().map(|r| r.len).sum::<usize>() != payload {
            return Ok(false);
        }
        // Pages scattered in guest memory would cost a read each: one read
        // into the buffer and a copy from there is cheaper.
        if payload / runs.len().max(1) < MIN_DIRECT_RUN {
            return Ok(false);
        }
        self.wire
            .place(&runs, batch.page_size as usize, &mut self.hashes, &mut self.scratch)?;
        let actual = migration_wire::page::pages_checksum(head, &self.hashes);
        if actual != header.checksum {
            self.hashes.clear();
            return Err(TransportError::Malformed(migration_wire::WireError::Checksum {
                kind: header.kind.name(),
                expected: header.checksum,
                actual,
            }));
        }
        Ok(true)
    }
}

impl TcpRx {
    /// For the frame of `header`, read so far: when it is a record of the
    /// transport's own and a handler takes them, reads and checks the body,
    /// hands it to the handler and returns true. Returns false, having read
    /// nothing more, for any other frame.
    fn take_record(&mut self, header: &FrameHeader) -> Result<bool, TransportError> {
        let Some(handler) = &mut self.records else {
            return Ok(false);
        };
        if header.kind != MessageKind::Transport {
            return Ok(false);
        }
        let len = header.len as usize;
        if self.body.len() < len {
            self.body.resize(len, 0);
        }
        self.wire.read_exact(header.kind.name(), false, &mut self.body[..len])?;
        let body = &self.body[..len];
        header.verify(body)?;
        handler(body)?;
        Ok(true)
    }

    /// Reads and decodes the next frame header.
    fn read_header(&mut self) -> Result<FrameHeader, TransportError> {
        if self.body.len() < FRAME_HEADER_LEN {
            self.body.resize(FRAME_HEADER_LEN, 0);
        }
        self.read_exact("a frame header", true, 0, FRAME_HEADER_LEN)?;
        let mut raw = [0u8; FRAME_HEADER_LEN];
        raw.copy_from_slice(&self.body[..FRAME_HEADER_LEN]);
        match FrameHeader::decode(&raw, MAX_FRAME_BODY) {
            Ok(header) => Ok(header),
            // A TLS record (handshake or alert) where a first frame belongs.
            Err(_)
                if self.wire.tls.is_none()
                    && self.wire.received() == FRAME_HEADER_LEN as u64
                    && raw[1] == 0x03
                    && matches!(raw[0], 0x15 | 0x16) =>
            {
                Err(TransportError::io(
                    "reading the first frame",
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer speaks TLS, this side does not (--tls-cert, --tls-key, --tls-ca)",
                    ),
                ))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Hands every record of the transport's own
    /// ([`Message::Transport`]) to `handler` instead of returning it from
    /// [`ChannelRx::recv`], which goes on to the next message: how a
    /// transport built on this one takes its in-band records out of the
    /// stream. An error from the handler is the receive's error.
    pub fn set_record_handler(&mut self, handler: RecordHandler) {
        self.records = Some(handler);
    }
}

/// Takes the records of a transport built on TCP out of the stream (see
/// [`TcpRx::set_record_handler`]).
pub type RecordHandler = Box<dyn FnMut(&[u8]) -> Result<(), TransportError> + Send>;

impl ChannelRx for TcpRx {
    /// See [`TcpTx::prefer_latency`].
    fn prefer_latency(&mut self) {
        self.wire.uring = None;
    }

    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        let header = loop {
            let header = self.read_header()?;
            if !self.take_record(&header)? {
                break header;
            }
        };
        let len = header.len as usize;
        if self.body.len() < len {
            self.body.resize(len, 0);
        }
        let mut have = 0;
        if header.kind == MessageKind::Pages && self.direct.is_some() && len >= BATCH_HEADER_LEN {
            // Head first: the batch header says how long the entry table is,
            // and the entries say where the page bytes go.
            self.read_exact("a page batch header", false, 0, BATCH_HEADER_LEN)?;
            have = BATCH_HEADER_LEN;
            if let Ok((entries, payload)) = migration_wire::page::batch_lengths(&self.body[..BATCH_HEADER_LEN])
                && BATCH_HEADER_LEN + entries + payload == len
                && payload > 0
            {
                let head_len = BATCH_HEADER_LEN + entries;
                self.read_exact("a page batch's entries", false, have, head_len)?;
                have = head_len;
                // The payload goes straight into guest memory where the
                // direct placement says, if it describes the whole batch;
                // anything else is read into the buffer and checked there.
                if self.place_payload(&header, head_len, payload)? {
                    // Decoded again: returning the batch decoded above on
                    // one path only is beyond the borrow checker.
                    let batch = PageBatch::decode_head(&self.body[..head_len])?;
                    return Ok(Message::Pages(batch.with_hashes(&self.hashes)));
                }
            }
        }
        self.read_exact(header.kind.name(), false, have, len)?;
        let body = &self.body[..len];
        if header.kind == MessageKind::Pages {
            // Hashes every page once; the hashes travel with the batch.
            let batch = migration_wire::page::verify_pages(&header, body, &mut self.hashes)?;
            return Ok(Message::Pages(batch));
        }
        header.verify(body)?;
        Ok(Message::decode_body(header.kind, body)?)
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.body, replacement)
    }

    fn place_directly(&mut self, target: Arc<dyn DirectPlacement>) -> bool {
        self.direct = Some(target);
        true
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let wire = &mut self.wire;
        wire.stream
            .set_read_timeout(timeout)
            .map_err(|e| TransportError::io("setting the receive timeout", e))?;
        if let Some(ring) = &mut wire.uring {
            ring.set_timeout(timeout);
        }
        wire.timeout = timeout;
        Ok(())
    }

    fn bytes_received(&self) -> u64 {
        self.wire.received()
    }
}

/// A TCP connection carrying migration frames both ways.
#[derive(Debug)]
pub struct TcpChannel {
    tx: TcpTx,
    rx: TcpRx,
    peer: String,
}

impl TcpChannel {
    fn new(mut stream: TcpStream, options: &TcpOptions, addr: &str) -> Result<Self, TransportError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let (sealer, opener) = match &options.tls {
            Some(tls) => {
                stream
                    .set_read_timeout(Some(options.io_timeout))
                    .map_err(|e| TransportError::io("setting the handshake timeout", e))?;
                let session = tls.handshake(&mut stream, addr).map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::TimedOut(options.io_timeout),
                    _ => TransportError::io(format!("TLS handshake with {peer}"), e),
                })?;
                stream
                    .set_read_timeout(None)
                    .map_err(|e| TransportError::io("clearing the handshake timeout", e))?;
                (Some(session.0), Some(session.1))
            }
            None => (None, None),
        };
        let reader = stream
            .try_clone()
            .map_err(|e| TransportError::io("cloning the socket", e))?;
        // A ring each for the sending and the receiving half, which two
        // threads may own; no ring where the kernel refuses io_uring.
        let ring = |s: &TcpStream| options.io_uring.then(|| UringSocket::new(s).ok()).flatten();
        let mut send_ring = ring(&stream);
        if let Some(r) = &mut send_ring {
            r.set_timeout(Some(options.io_timeout));
        }
        let recv_ring = send_ring.as_ref().and_then(|_| ring(&reader));
        Ok(Self {
            tx: TcpTx {
                uring: send_ring,
                stream,
                head: Vec::new(),
                sent: 0,
                tls: sealer,
            },
            rx: TcpRx {
                wire: RxWire {
                    stream: reader,
                    uring: recv_ring,
                    tls: opener,
                    timeout: None,
                    plain_received: 0,
                },
                hashes: Vec::new(),
                body: Vec::new(),
                direct: None,
                scratch: Vec::new(),
                records: None,
            },
            peer,
        })
    }

    /// Whether the connection runs TLS.
    pub fn is_tls(&self) -> bool {
        self.tx.tls.is_some()
    }

    /// See [`TcpRx::set_record_handler`].
    pub fn set_record_handler(&mut self, handler: RecordHandler) {
        self.rx.set_record_handler(handler);
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.tx
            .stream
            .local_addr()
            .map_err(|e| TransportError::io("reading the local address", e))
    }

    /// `io_uring` or `plain`: how this channel moves bytes.
    pub fn backend(&self) -> &'static str {
        if self.tx.uring.is_some() && self.rx.wire.uring.is_some() {
            "io_uring"
        } else {
            "plain"
        }
    }
}

impl ChannelTx for TcpChannel {
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError> {
        self.tx.send(message)
    }

    fn bytes_sent(&self) -> u64 {
        self.tx.bytes_sent()
    }

    fn shutdown(&mut self) {
        self.tx.shutdown();
    }

    fn prefer_latency(&mut self) {
        self.tx.prefer_latency();
    }
}

impl ChannelRx for TcpChannel {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        self.rx.recv()
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        self.rx.take_body(replacement)
    }

    fn place_directly(&mut self, target: Arc<dyn DirectPlacement>) -> bool {
        self.rx.place_directly(target)
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.rx.set_timeout(timeout)
    }

    fn bytes_received(&self) -> u64 {
        self.rx.bytes_received()
    }

    fn prefer_latency(&mut self) {
        self.rx.prefer_latency();
    }
}

impl Channel for TcpChannel {
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        let TcpChannel { tx, rx, .. } = *self;
        Ok((Box::new(tx), Box::new(rx)))
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn closer(&self) -> Result<Closer, TransportError> {
        let stream = self
            .tx
            .stream
            .try_clone()
            .map_err(|e| TransportError::io("cloning the socket", e))?;
        Ok(Box::new(move || {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_wire::{PageBatch, PageEncoding, PageEntry, SyncMarker};

    fn pair() -> (TcpChannel, TcpChannel) {
        pair_with(true)
    }

    fn pair_with(io_uring: bool) -> (TcpChannel, TcpChannel) {
        let options = TcpOptions {
            io_uring,
            ..TcpOptions::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0", options.clone()).expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let client = std::thread::spawn(move || connect(&addr, &options).expect("connect"));
        let server = listener.accept().expect("accept");
        (client.join().expect("join"), server)
    }

    #[test]
    fn a_channel_that_prefers_latency_moves_to_plain_calls_and_still_carries_frames() {
        let (mut a, mut b) = pair_with(true);
        if a.backend() != "io_uring" {
            eprintln!("no io_uring here: nothing to switch from");
            return;
        }
        ChannelTx::prefer_latency(&mut a);
        ChannelRx::prefer_latency(&mut a);
        ChannelRx::prefer_latency(&mut b);
        assert_eq!(a.backend(), "plain");
        // One half of `b` keeps its ring: the two move bytes independently.
        exchange_frames(a, b);
    }

    #[test]
    fn records_go_to_the_handler_and_recv_returns_the_next_message() {
        let (mut a, mut b) = pair();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        b.set_record_handler(Box::new(move |bytes| {
            if bytes == b"bad" {
                return Err(TransportError::invalid_data("taking a record", "refused"));
            }
            sink.lock().expect("lock").push(bytes.to_vec());
            Ok(())
        }));
        let marker = SyncMarker { epoch: 3, pages: 4 };
        a.send(&Message::Transport(b"one")).expect("send");
        a.send(&Message::Transport(b"")).expect("send");
        a.send(&Message::SyncMarker(marker)).expect("send");
        a.send(&Message::Transport(b"bad")).expect("send");
        assert!(matches!(b.recv().expect("recv"), Message::SyncMarker(m) if m == marker));
        assert_eq!(*seen.lock().expect("lock"), vec![b"one".to_vec(), Vec::new()]);
        assert!(b.recv().is_err(), "the handler's error is the receive's");
        // Without a handler a record is a message like any other.
        let (mut c, mut d) = pair();
        c.send(&Message::Transport(b"two")).expect("send");
        assert!(matches!(d.recv().expect("recv"), Message::Transport(b"two")));
    }

    #[test]
    fn frames_cross_a_real_socket_both_ways_with_either_backend() {
        for io_uring in [true, false] {
            let (a, b) = pair_with(io_uring);
            let want = if io_uring { "io_uring" } else { "plain" };
            assert_eq!(a.backend(), want);
            assert_eq!(b.backend(), want);
            exchange_frames(a, b);
        }
    }

    fn exchange_frames(mut a: TcpChannel, mut b: TcpChannel) {
        let mut entries = Vec::new();
        plain_batch(&mut entries, &[(9, false), (10, true)]);
        let payload = vec![7u8; 4096];
        let batch = PageBatch::new(1, 3, 4096, &entries, &payload).expect("batch");
        a.send(&Message::Pages(batch.clone())).expect("send");
        a.send(&Message::SyncMarker(SyncMarker { epoch: 3, pages: 2 }))
            .expect("send");
        match b.recv().expect("recv") {
            Message::Pages(got) => {
                assert_eq!(got, batch);
                // The receiver hashed the plain page while checking the frame.
                assert_eq!(
                    got.page_hashes(),
                    Some(&[migration_wire::page::page_hash(&payload)][..])
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            b.recv().expect("recv"),
            Message::SyncMarker(SyncMarker { epoch: 3, pages: 2 })
        );
        assert_eq!(a.bytes_sent(), b.bytes_received());
        b.send(&Message::Ready).expect("send");
        assert_eq!(a.recv().expect("recv"), Message::Ready);
        a.shutdown();
        assert!(matches!(b.recv(), Err(TransportError::Closed)));
    }

    /// Block 0 is `region`; nothing else exists.
    struct OneRegion(migration_sys::GuestRegion);

    impl DirectPlacement for OneRegion {
        fn runs<'a>(&'a self, batch: &PageBatch<'_>, runs: &mut Vec<migration_core::GuestRun<'a>>) -> bool {
            if batch.block != 0 {
                return false;
            }
            for entry in batch.entries().flatten() {
                if entry.encoding != PageEncoding::Plain {
                    continue;
                }
                let offset = entry.page as usize * 4096;
                match runs.last_mut() {
                    Some(run) if run.offset + run.len == offset => run.len += 4096,
                    _ => runs.push(migration_core::GuestRun {
                        region: &self.0,
                        offset,
                        len: 4096,
                    }),
                }
            }
            true
        }
    }

    fn plain_batch(entries: &mut Vec<u8>, pages: &[(u64, bool)]) {
        for &(page, zero) in pages {
            let encoding = if zero { PageEncoding::Zero } else { PageEncoding::Plain };
            PageEntry { page, encoding }.push_to(entries);
        }
    }

    #[test]
    fn page_bytes_land_straight_in_guest_memory_with_either_backend_plain_or_tls() {
        let pki = Pki::new("direct");
        for (io_uring, tls) in [(true, false), (false, false), (true, true), (false, true)] {
            let (mut a, mut b) = if tls {
                let (a, b) = tls_pair(Some(pki.server()), Some(pki.client(&pki, None)), io_uring);
                (a.expect("client"), b.expect("server"))
            } else {
                pair_with(io_uring)
            };
            // Between inaccessible pages: the last page is written to its very end.
            let pages = 16;
            let target = Arc::new(OneRegion(
                migration_sys::GuestRegion::anonymous_guarded(pages * 4096).expect("region"),
            ));
            assert!(b.place_directly(Arc::clone(&target) as _));
            // Twelve plain pages: over TLS they span records, and pages
            // straddle record boundaries.
            let mut list = vec![(1, false), (2, true)];
            list.extend((5..pages as u64).map(|p| (p, false)));
            let mut entries = Vec::new();
            plain_batch(&mut entries, &list);
            let payload: Vec<u8> = (0..12 * 4096).map(|i| (i % 251) as u8).collect();
            let batch = PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch");
            a.send(&Message::Pages(batch.clone())).expect("send");
            // A batch for a block the target does not have arrives as usual.
            let other = PageBatch::new(3, 0, 4096, &entries, &payload).expect("batch");
            a.send(&Message::Pages(other.clone())).expect("send");
            match b.recv().expect("recv") {
                Message::Pages(got) => {
                    assert!(got.is_placed());
                    assert!(got.payload().is_empty());
                    assert_eq!(got.entries().collect::<Vec<_>>(), batch.entries().collect::<Vec<_>>());
                    let want: Vec<u64> = payload.chunks(4096).map(migration_wire::page::page_hash).collect();
                    assert_eq!(got.page_hashes(), Some(&want[..]));
                }
                other => panic!("{other:?}"),
            }
            let mut page = vec![0u8; 4096];
            target.0.read(4096, &mut page).expect("read");
            assert_eq!(page, payload[..4096]);
            let mut rest = vec![0u8; 11 * 4096];
            target.0.read(5 * 4096, &mut rest).expect("read");
            assert!(
                rest == payload[4096..],
                "pages 5.. landed where they belong (tls {tls})"
            );
            assert!(target.0.is_zero(2 * 4096, 3 * 4096).expect("zero"));
            match b.recv().expect("recv") {
                Message::Pages(got) => {
                    assert!(!got.is_placed());
                    assert_eq!(got, other);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(a.bytes_sent(), b.bytes_received());
        }
    }

    #[test]
    fn scattered_pages_arrive_whole_instead_of_a_read_each() {
        let (mut a, mut b) = pair_with(true);
        let target = Arc::new(OneRegion(
            migration_sys::GuestRegion::anonymous(16 * 4096).expect("region"),
        ));
        assert!(b.place_directly(Arc::clone(&target) as _));
        let mut entries = Vec::new();
        plain_batch(&mut entries, &[(0, false), (2, false), (4, false), (6, false)]);
        let payload: Vec<u8> = (0..4 * 4096).map(|i| (i % 253) as u8).collect();
        let batch = PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch");
        a.send(&Message::Pages(batch.clone())).expect("send");
        match b.recv().expect("recv") {
            Message::Pages(got) => {
                assert!(!got.is_placed(), "one-page runs are not read straight into place");
                assert_eq!(got, batch);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            target.0.is_zero(0, 16 * 4096).expect("zero"),
            "nothing placed by the transport"
        );
    }

    #[test]
    fn a_corrupt_page_placed_directly_fails_the_frame_checksum() {
        let mut entries = Vec::new();
        plain_batch(&mut entries, &[(0, false)]);
        let payload = vec![3u8; 4096];
        let mut frame = Vec::new();
        Message::Pages(PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch")).encode(&mut frame);
        let target = Arc::new(OneRegion(migration_sys::GuestRegion::anonymous(4096).expect("region")));
        let err = recv_with_last_bit_flipped(frame, 1, Some(target));
        assert!(
            matches!(
                err,
                TransportError::Malformed(migration_wire::WireError::Checksum { .. })
            ),
            "{err}"
        );
    }

    /// What a receiver (placing pages in `target`, if any) makes of `frame`
    /// with its last byte XORed with `flip`, sent by a raw socket.
    fn recv_with_last_bit_flipped(mut frame: Vec<u8>, flip: u8, target: Option<Arc<OneRegion>>) -> TransportError {
        let listener = TcpListener::bind("127.0.0.1:0", TcpOptions::default()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let writer = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            let last = frame.len() - 1;
            frame[last] ^= flip;
            stream.write_all(&frame).expect("write");
        });
        let mut server = listener.accept().expect("accept");
        if let Some(target) = target {
            server.place_directly(target);
        }
        let err = server.recv().expect_err("corrupt frame");
        writer.join().expect("join");
        err
    }

    /// A throwaway PKI in a directory removed on drop.
    struct Pki(std::path::PathBuf);

    impl Pki {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("tcp-tls-{}-{tag}", std::process::id()));
            generate_certs(&dir).expect("certificates");
            Self(dir)
        }

        fn files(&self, side: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
            (
                self.0.join(format!("{side}-cert.pem")),
                self.0.join(format!("{side}-key.pem")),
                self.0.join("ca.pem"),
            )
        }

        /// A TLS listener on a free loopback port with this PKI's server side.
        fn listener(&self) -> TcpListener {
            TcpListener::bind(
                "127.0.0.1:0",
                TcpOptions {
                    tls: Some(self.server()),
                    ..TcpOptions::default()
                },
            )
            .expect("bind")
        }

        fn server(&self) -> TlsConfig {
            let (cert, key, ca) = self.files("server");
            TlsConfig::server(
                &TlsFiles {
                    cert: &cert,
                    key: &key,
                    ca: &ca,
                },
                &[],
            )
            .expect("server config")
        }

        fn client(&self, trusting: &Pki, name: Option<&str>) -> TlsConfig {
            let (cert, key, _) = self.files("client");
            let ca = trusting.0.join("ca.pem");
            TlsConfig::client(
                &TlsFiles {
                    cert: &cert,
                    key: &key,
                    ca: &ca,
                },
                name,
            )
            .expect("client config")
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Connects `client` options to a listener with `server` options; both
    /// outcomes.
    fn tls_pair(
        server: Option<TlsConfig>,
        client: Option<TlsConfig>,
        io_uring: bool,
    ) -> (Result<TcpChannel, TransportError>, Result<TcpChannel, TransportError>) {
        let listener = TcpListener::bind(
            "127.0.0.1:0",
            TcpOptions {
                tls: server,
                io_uring,
                io_timeout: Duration::from_secs(10),
                ..TcpOptions::default()
            },
        )
        .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let options = TcpOptions {
            tls: client,
            io_uring,
            io_timeout: Duration::from_secs(10),
            ..TcpOptions::default()
        };
        let connecting = std::thread::spawn(move || connect(&addr, &options));
        let accepted = listener.accept_within(Some(Duration::from_secs(30)));
        (connecting.join().expect("join"), accepted)
    }

    #[test]
    fn frames_cross_a_tls_connection_both_ways_with_either_backend() {
        let pki = Pki::new("ok");
        for io_uring in [true, false] {
            let (client, server) = tls_pair(Some(pki.server()), Some(pki.client(&pki, None)), io_uring);
            let (a, b) = (client.expect("client"), server.expect("server"));
            assert!(a.is_tls() && b.is_tls());
            // Both directions, a page batch included; a large one too.
            let (mut a2, mut b2) = (a, b);
            let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
            let mut entries = Vec::new();
            plain_batch(&mut entries, &(0..256).map(|page| (page, false)).collect::<Vec<_>>());
            let batch = PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch");
            a2.send(&Message::Pages(batch.clone())).expect("send");
            match b2.recv().expect("recv") {
                Message::Pages(got) => assert_eq!(got, batch),
                other => panic!("{other:?}"),
            }
            exchange_frames(a2, b2);
        }
    }

    fn handshake_error<T: std::fmt::Debug>(result: Result<T, TransportError>) -> String {
        let err = result.expect_err("refused");
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        text
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_on_both_sides() {
        let (pki, other) = (Pki::new("ca"), Pki::new("other"));
        let (client, server) = tls_pair(Some(pki.server()), Some(other.client(&pki, None)), true);
        let server = handshake_error(server);
        assert!(server.contains("TLS handshake"), "{server}");
        assert!(server.to_lowercase().contains("certificate"), "{server}");
        assert!(
            client.is_err() || {
                // The client may finish its side first; its first read then fails.
                let mut c = client.expect("client");
                c.recv().is_err()
            }
        );
    }

    #[test]
    fn a_wrong_server_name_is_refused_by_the_client() {
        let pki = Pki::new("name");
        let (client, _server) = tls_pair(
            Some(pki.server()),
            Some(pki.client(&pki, Some("elsewhere.example"))),
            true,
        );
        let client = handshake_error(client);
        assert!(client.contains("TLS handshake"), "{client}");
        assert!(
            client.contains("NotValidForName") || client.contains("not valid"),
            "{client}"
        );
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let pki = Pki::new("nocert");
        let listener = pki.listener();
        let addr = listener.local_addr().expect("addr");
        let ca = pki.0.join("ca.pem");
        let bare = std::thread::spawn(move || {
            let mut roots = rustls::RootCertStore::empty();
            for cert in <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_file_iter(&ca)
                .expect("ca")
            {
                roots.add(cert.expect("cert")).expect("add");
            }
            let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            let mut conn = rustls::ClientConnection::new(
                std::sync::Arc::new(config),
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            )
            .expect("conn");
            let mut stream = TcpStream::connect(addr).expect("connect");
            let mut result = Ok(());
            while conn.is_handshaking() && result.is_ok() {
                result = conn.complete_io(&mut stream).map(|_| ());
            }
            // TLS 1.3: the server's refusal may arrive after our Finished.
            let mut byte = [0u8; 1];
            result.and_then(|()| {
                std::io::Read::read(&mut rustls::Stream::new(&mut conn, &mut stream), &mut byte).map(|_| ())
            })
        });
        let server = handshake_error(listener.accept_within(Some(Duration::from_secs(30))));
        assert!(server.to_lowercase().contains("certificate"), "{server}");
        assert!(bare.join().expect("join").is_err(), "the bare client is refused too");
    }

    #[test]
    fn hundreds_of_tls_connections_in_a_row_all_complete_their_handshakes() {
        // Each client hangs up as soon as its side is done: the server must
        // still see a whole handshake every time (an interrupted read on
        // the client once left the server with half of one).
        let pki = Pki::new("many");
        let listener = pki.listener();
        let addr = listener.local_addr().expect("addr").to_string();
        let accepting = std::thread::spawn(move || {
            (0..300)
                .filter_map(|_| listener.accept_within(Some(Duration::from_secs(30))).err())
                .map(|e| handshake_error::<()>(Err(e)))
                .collect::<Vec<_>>()
        });
        let options = TcpOptions {
            tls: Some(pki.client(&pki, None)),
            ..TcpOptions::default()
        };
        for _ in 0..300 {
            drop(connect(&addr, &options).expect("connect"));
        }
        let failed = accepting.join().expect("join");
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[test]
    fn plaintext_and_tls_peers_are_told_apart() {
        let pki = Pki::new("plain");
        // A plaintext client at a TLS listener: it speaks first, as a
        // source does.
        let listener = pki.listener();
        let addr = listener.local_addr().expect("addr").to_string();
        let plain = std::thread::spawn(move || {
            let mut client = connect(&addr, &TcpOptions::default()).expect("connect");
            client.send(&Message::Ready).expect("send");
            match client.recv() {
                Ok(Message::Error(err)) => err.message,
                other => panic!("wanted the listener's refusal, got {other:?}"),
            }
        });
        let server = handshake_error(listener.accept_within(Some(Duration::from_secs(30))));
        assert!(server.contains("does not speak TLS"), "{server}");
        let told = plain.join().expect("join");
        assert!(
            told.contains("requires TLS"),
            "the plaintext client is told why: {told}"
        );
        // A TLS client at a plaintext listener.
        let listener = TcpListener::bind("127.0.0.1:0", TcpOptions::default()).expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let plain_server = std::thread::spawn(move || {
            let mut server = listener.accept_within(Some(Duration::from_secs(30))).expect("accept");
            server.recv().map(|_| ()).map_err(|e| handshake_error::<()>(Err(e)))
        });
        let options = TcpOptions {
            tls: Some(pki.client(&pki, None)),
            ..TcpOptions::default()
        };
        assert!(connect(&addr, &options).is_err(), "the TLS client gets no TLS answer");
        let err = plain_server
            .join()
            .expect("join")
            .expect_err("a TLS hello is not a frame");
        assert!(err.contains("speaks TLS"), "{err}");
    }

    #[test]
    fn corrupt_frame_is_rejected_by_checksum() {
        let mut frame = Vec::new();
        Message::SyncMarker(SyncMarker { epoch: 1, pages: 1 }).encode(&mut frame);
        let err = recv_with_last_bit_flipped(frame, 0x40, None);
        assert!(
            matches!(
                err,
                TransportError::Malformed(migration_wire::WireError::Checksum { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn silence_times_out_and_truncation_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0", TcpOptions::default()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            wait.recv().expect("released");
            stream.write_all(&[1, 0, 0, 0, 6, 0]).expect("write");
        });
        let mut server = listener.accept().expect("accept");
        server.set_timeout(Some(Duration::from_millis(50))).expect("timeout");
        assert!(matches!(server.recv(), Err(TransportError::TimedOut(_))));
        release.send(()).expect("release");
        server.set_timeout(Some(Duration::from_secs(30))).expect("timeout");
        writer.join().expect("join");
        let err = server.recv().expect_err("truncated header");
        assert!(matches!(err, TransportError::Io { .. }), "{err}");
    }

    #[test]
    fn accept_within_times_out_and_closer_unblocks_a_receiver() {
        let listener = TcpListener::bind("127.0.0.1:0", TcpOptions::default()).expect("bind");
        let err = listener
            .accept_within(Some(Duration::from_millis(50)))
            .expect_err("nobody connects");
        assert!(matches!(err, TransportError::TimedOut(_)), "{err}");
        let (client, mut server) = pair();
        let closer = server.closer().expect("closer");
        let reader = std::thread::spawn(move || server.recv().map(|_| ()));
        closer();
        assert!(reader.join().expect("join").is_err());
        drop(client);
    }

    #[test]
    fn connect_gives_up_within_its_timeout() {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let options = TcpOptions {
            connect_timeout: Duration::from_millis(300),
            ..TcpOptions::default()
        };
        let err = connect(&format!("127.0.0.1:{port}"), &options).expect_err("nobody listens");
        assert!(err.to_string().contains("gave up"), "{err}");
    }
}
