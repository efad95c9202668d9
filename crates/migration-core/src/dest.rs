//! The destination runtime: the handshake, then placing every page into
//! guest RAM, checked against the announced blocks, then READY / GO and
//! the digest comparison.

mod place;
mod postcopy;
mod receive;
#[cfg(test)]
mod tests;

use crate::error_chain::ErrorChain;
use crate::ram::Ram;
use crate::stats::{Event, Stats};
use crate::transport::{Channel, Closer, TransportError};
use crate::vm::{Vm, VmError};
use migration_wire::{
    BlockList, ErrorCode, Features, Hello, HelloReply, MAX_CHANNELS, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION,
    PeerError, SessionId, Verdict,
};
use place::{Placer, Prefault, RamTargets};
use receive::{EpochBarrier, Shared};
use std::time::{Duration, Instant};

/// Limits and timeouts of an incoming migration.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Largest total guest RAM accepted, in bytes.
    pub max_ram: u64,
    /// The one total guest RAM accepted, in bytes, where the destination
    /// has its memory already (preallocated): a source whose RAM is of
    /// another size is refused. `None`: any size up to `max_ram`.
    pub ram_size: Option<u64>,
    /// Longest silence from the source before the migration fails.
    pub io_timeout: Duration,
    /// How often a progress event is emitted.
    pub progress_interval: Duration,
    /// Most channels accepted.
    pub max_channels: u16,
    /// Compression codecs accepted ([`Features::LZ4`], [`Features::ZSTD`]).
    pub compression: Features,
    /// Let transports that can read the bytes of uncompressed pages
    /// straight into guest memory do so (see
    /// [`ChannelRx::place_directly`](crate::ChannelRx::place_directly)):
    /// one copy instead of two. It applies to anonymous memory (populated
    /// ahead of the stream) and to preallocated memory
    /// ([`FreshMemory::Preallocated`]); other file-backed memory is filled
    /// through its file, which spares the kernel zeroing fresh pages.
    pub direct_placement: bool,
    /// Agree to postcopy if the source asks: guest RAM must be private
    /// anonymous memory and userfaultfd usable.
    pub postcopy: bool,
    /// In postcopy, how long to wait for the source to resume a lost link
    /// before the migration is given up (and the VM's state with it).
    pub resume_timeout: Duration,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            max_channels: MAX_CHANNELS,
            compression: Features::LZ4.union(Features::ZSTD),
            max_ram: 64 << 30,
            ram_size: None,
            io_timeout: Duration::from_secs(30),
            progress_interval: Duration::from_millis(200),
            direct_placement: true,
            postcopy: false,
            resume_timeout: Duration::from_secs(300),
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
    /// A channel's connection failed or carried a malformed frame.
    #[error("channel {index}")]
    OnChannel {
        /// The channel (0 is the main connection).
        index: usize,
        /// What happened on it.
        #[source]
        source: TransportError,
    },
    /// Another channel failed first (its error is the one reported).
    #[error("another channel failed")]
    OtherChannelFailed,
    /// Postcopy failed: the guest runs here with part of its memory, the
    /// rest is on the source, and the two cannot be joined again.
    #[error("VM state lost: {0}")]
    StateLost(String),
}

impl DestError {
    fn code(&self) -> ErrorCode {
        match self {
            DestError::Protocol(_)
            | DestError::Transport(TransportError::Malformed(_))
            | DestError::OnChannel {
                source: TransportError::Malformed(_),
                ..
            } => ErrorCode::Protocol,
            DestError::Version { .. } => ErrorCode::Version,
            DestError::Limit(_) => ErrorCode::Limit,
            DestError::Aborted(_) => ErrorCode::Cancelled,
            DestError::Transport(_)
            | DestError::OnChannel { .. }
            | DestError::Vm(_)
            | DestError::Memory(_)
            | DestError::OtherChannelFailed
            | DestError::StateLost(_) => ErrorCode::Internal,
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
    /// The extra channels, by index - 1, as they join.
    extra: Vec<Option<Box<dyn Channel>>>,
    io_timeout: Duration,
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

    /// The channel count agreed in the handshake (the main one included).
    pub fn channels(&self) -> u16 {
        self.hello.channels
    }

    /// Whether the migration may switch to postcopy (agreed in the
    /// handshake): guest RAM must then be private anonymous memory.
    pub fn postcopy(&self) -> bool {
        self.hello.features.contains(Features::POSTCOPY)
    }

    /// How many extra channels have not joined yet.
    pub fn missing_channels(&self) -> usize {
        self.extra.iter().filter(|c| c.is_none()).count()
    }

    /// Takes a new connection as one of this migration's extra channels. A
    /// connection of another session, with an index out of range or one
    /// already taken, is refused (and told why); the migration goes on.
    pub fn join_channel(&mut self, channel: Box<dyn Channel>) -> Result<u16, DestError> {
        join_channel(
            channel,
            self.hello.session,
            self.hello.channels,
            self.io_timeout,
            &mut self.extra,
        )
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

/// Takes `channel` into its slot of `slots` (one per extra channel, by
/// index - 1) if its [`ChannelHello`](migration_wire::ChannelHello) names
/// `session` and a free slot; otherwise tells it why not.
fn join_channel(
    mut channel: Box<dyn Channel>,
    session: SessionId,
    channels: u16,
    io_timeout: Duration,
    slots: &mut [Option<Box<dyn Channel>>],
) -> Result<u16, DestError> {
    let hello = (|| {
        channel.set_timeout(Some(io_timeout))?;
        match channel.recv()? {
            Message::ChannelHello(hello) => Ok(hello),
            other => Err(unexpected("channel-hello", &other)),
        }
    })();
    match hello {
        Ok(hello) => seat_channel(channel, hello, session, channels, slots),
        Err(err) => {
            tell_peer(channel.as_mut(), &err);
            Err(err)
        }
    }
}

/// Takes `channel`, whose [`ChannelHello`](migration_wire::ChannelHello) was
/// `hello`, into its slot of `slots` (one per extra channel, by index - 1)
/// if it names `session` and a free slot; otherwise tells it why not.
fn seat_channel(
    mut channel: Box<dyn Channel>,
    hello: migration_wire::ChannelHello,
    session: SessionId,
    channels: u16,
    slots: &mut [Option<Box<dyn Channel>>],
) -> Result<u16, DestError> {
    let result = (|| {
        if hello.session != session {
            return Err(DestError::Protocol(format!(
                "channel of session {:#x}, this migration is session {:#x}",
                hello.session.0, session.0
            )));
        }
        if hello.channels != channels {
            return Err(DestError::Protocol(format!(
                "channel says {} channels, the handshake agreed {channels}",
                hello.channels
            )));
        }
        let Some(slot) = slots.get(usize::from(hello.index) - 1) else {
            return Err(DestError::Protocol(format!(
                "channel index {} of {}, and postcopy (whose urgent-page channel it would be) was not agreed",
                hello.index, hello.channels
            )));
        };
        if slot.is_some() {
            return Err(DestError::Protocol(format!("channel {} joined twice", hello.index)));
        }
        channel.send(&Message::ChannelAccepted)?;
        Ok(hello.index)
    })();
    match result {
        Ok(index) => {
            slots[usize::from(index) - 1] = Some(channel);
            Ok(index)
        }
        Err(err) => {
            tell_peer(channel.as_mut(), &err);
            Err(err)
        }
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
            // The data channels, and the urgent-page channel of postcopy.
            extra: (1..hello.channels + u16::from(hello.features.contains(Features::POSTCOPY)))
                .map(|_| None)
                .collect(),
            hello,
            blocks,
            started,
            io_timeout: options.io_timeout,
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
        other => return Err(unexpected("hello", &other)),
    };
    let version = hello.max_version.min(PROTOCOL_VERSION);
    if version < hello.min_version || version < MIN_PROTOCOL_VERSION {
        return Err(DestError::Version {
            min: hello.min_version,
            max: hello.max_version,
        });
    }
    if hello.channels > options.max_channels {
        return Err(DestError::Limit(format!(
            "source proposes {} channels, this destination accepts at most {} (--channels)",
            hello.channels, options.max_channels
        )));
    }
    let codecs = Features::LZ4.union(Features::ZSTD);
    let asked = hello.features.intersect(codecs);
    if !options.compression.contains(asked) {
        let name = |f: Features| match (f.contains(Features::LZ4), f.contains(Features::ZSTD)) {
            (true, true) => "lz4 or zstd",
            (true, false) => "lz4",
            (false, true) => "zstd",
            (false, false) => "none",
        };
        return Err(DestError::Limit(format!(
            "source asks for {} compression, this destination allows {} (--compress)",
            name(asked),
            name(options.compression)
        )));
    }
    let mut features = hello.features.intersect(Features::KNOWN);
    if !options.postcopy {
        features = Features(features.0 & !Features::POSTCOPY.0);
    }
    // What was agreed is what counts from here on.
    let hello = Hello { features, ..hello };
    channel.send(&Message::HelloReply(HelloReply {
        version,
        features,
        session: hello.session,
        channels: hello.channels,
    }))?;
    let blocks = match channel.recv()? {
        Message::BlockList(blocks) => blocks,
        other => return Err(unexpected("block-list", &other)),
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
    if let Some(size) = options.ram_size
        && total != size
    {
        return Err(DestError::Limit(format!(
            "source RAM of {total} bytes, this destination preallocated {size} (--prealloc)"
        )));
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
    /// Fresh memory: every page is zero until written, so a zero page needs
    /// no write. Fresh anonymous memory is populated ahead of the incoming
    /// pages; fresh file-backed memory is filled through its file, so the
    /// kernel allocates each page without zeroing it first.
    Zeroed,
    /// Zero like [`FreshMemory::Zeroed`], and every page already allocated
    /// and mapped (guest RAM preallocated when the VMM started): incoming
    /// page bytes go straight into it.
    Preallocated,
    /// Reused memory (a file): every page is overwritten.
    Unknown,
}

/// Receives the migration into `ram` (which must match the block list):
/// accepts the block list, gathers the extra channels from `accept` (each
/// call waits at most the time it is given for the next connection; strays
/// are refused and reported as [`Event::ChannelRefused`]; in postcopy a lost
/// link is resumed through it too), receives every
/// channel's pages, drives `vm` through load and resume, and compares
/// digests.
pub fn run_destination(
    mut incoming: Incoming,
    accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
    ram: &Ram,
    fresh: FreshMemory,
    vm: &mut dyn Vm,
    options: &DestOptions,
    observer: &mut dyn FnMut(&Event),
) -> Result<DestReport, Box<DestFailure>> {
    let agreed_codecs = incoming.hello.features.intersect(options.compression);
    let gathered = gather_channels(&mut incoming, ram, accept, observer);
    let Incoming {
        channel,
        hello,
        blocks,
        started,
        extra,
        ..
    } = incoming;
    let mut state = DestRun {
        started,
        resumed: false,
        iterations: 0,
        handover: None,
        received_bytes: 0,
        postcopy: None,
    };
    let shared = Shared {
        placer: Placer::new(ram, fresh),
        barrier: EpochBarrier::new(usize::from(hello.channels)),
        prefault: Prefault::start(ram, fresh),
        direct: options
            .direct_placement
            .then(|| std::sync::Arc::new(RamTargets::new(ram, fresh))),
        io_timeout: options.io_timeout,
        codecs: agreed_codecs,
        deltas: hello.features.contains(Features::XBZRLE),
    };
    let postcopy = hello.features.contains(Features::POSTCOPY);
    let result = match (gathered, extra.into_iter().collect::<Option<Vec<_>>>()) {
        (Err(err), _) => Err(err),
        (Ok(()), Some(mut extra)) => {
            let urgent = if postcopy { extra.pop() } else { None };
            let link = Link {
                session: hello.session,
                channels: hello.channels,
                urgent,
            };
            state.run(channel, extra, link, &shared, &blocks, vm, options, accept, observer)
        }
        (Ok(()), None) => Err(DestError::Protocol("not every channel joined".into())),
    };
    let mut stats = shared.placer.stats(started);
    drop(shared);
    stats.transferred_bytes = state.received_bytes;
    stats.iterations = state.iterations;
    stats.postcopy = state.postcopy.clone();
    match result {
        Ok((verified, mismatched_blocks)) => Ok(DestReport {
            stats,
            verified,
            mismatched_blocks,
            until_handover: state.handover.unwrap_or_else(|| started.elapsed()),
        }),
        Err(error) => Err(Box::new(DestFailure {
            error,
            stats,
            resumed: state.resumed,
        })),
    }
}

/// Accepts the block list, then waits for every extra channel to join.
fn gather_channels(
    incoming: &mut Incoming,
    ram: &Ram,
    accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
    observer: &mut dyn FnMut(&Event),
) -> Result<(), DestError> {
    if ram.block_list() != incoming.blocks {
        return Err(DestError::Limit(
            "prepared guest RAM does not match the block list".into(),
        ));
    }
    incoming.channel.send(&Message::BlocksAccepted)?;
    while incoming.missing_channels() > 0 {
        let channel = accept(incoming.io_timeout).map_err(|err| {
            DestError::Protocol(format!(
                "waiting for channel {} of {}: {}",
                incoming.extra.iter().position(Option::is_none).unwrap_or(0) + 1,
                incoming.channels(),
                ErrorChain(&err)
            ))
        })?;
        let peer = channel.peer();
        if let Err(err) = incoming.join_channel(channel) {
            observer(&Event::ChannelRefused {
                peer,
                reason: ErrorChain(&err).to_string(),
            });
        }
    }
    Ok(())
}

struct DestRun {
    started: Instant,
    resumed: bool,
    iterations: u64,
    handover: Option<Duration>,
    /// Wire bytes of channels done with.
    received_bytes: u64,
    /// Figures of the postcopy phase, once it started.
    postcopy: Option<crate::stats::PostcopyStats>,
}

/// What the destination keeps of its link to the source beyond the data
/// channels: who the source is, and the urgent-page channel of postcopy.
struct Link {
    session: SessionId,
    /// Data channels agreed, the main one included.
    channels: u16,
    urgent: Option<Box<dyn Channel>>,
}

impl DestRun {
    /// The whole migration on this side; tells the source why if it fails.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        mut channel: Box<dyn Channel>,
        extra: Vec<Box<dyn Channel>>,
        link: Link,
        shared: &Shared,
        blocks: &BlockList,
        vm: &mut dyn Vm,
        options: &DestOptions,
        accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(Option<bool>, Vec<u32>), DestError> {
        debug_assert_eq!(shared.placer.ram().block_list(), *blocks);
        observer(&Event::Started);
        let result = match self.transfer(channel.as_mut(), extra, shared, options, observer) {
            Ok((end, extra)) if end.postcopy => {
                self.iterations = end.epochs;
                return postcopy::run(
                    self, channel, extra, link, end.epochs, shared, vm, options, accept, observer,
                );
            }
            Ok((end, extra)) => {
                self.count_bytes(&extra);
                self.hand_over(channel.as_mut(), end, shared, vm, options, observer)
            }
            Err(err) => Err(err),
        };
        self.received_bytes += channel.bytes_received() + channel.bytes_sent();
        if let Err(err) = &result {
            tell_peer(channel.as_mut(), err);
        }
        result
    }

    fn count_bytes(&mut self, channels: &[Box<dyn Channel>]) {
        self.received_bytes += channels.iter().map(|c| c.bytes_received()).sum::<u64>();
    }

    /// Precopy's end: device state, READY, GO, and the digest check.
    fn hand_over(
        &mut self,
        channel: &mut dyn Channel,
        end: receive::ChannelEnd,
        shared: &Shared,
        vm: &mut dyn Vm,
        options: &DestOptions,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(Option<bool>, Vec<u32>), DestError> {
        self.iterations = end.epochs;
        if let Some(missing) = shared.placer.first_missing() {
            return Err(DestError::Protocol(format!(
                "end of RAM, but page {} of block {} never arrived",
                missing.1, missing.0
            )));
        }
        let Some(device_state) = end.device_state else {
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
            other => return Err(unexpected("go", &other)),
        }
        self.handover = Some(self.started.elapsed());
        vm.resume()?;
        self.resumed = true;
        channel.send(&Message::Resumed)?;
        observer(&Event::Resumed);

        // The VM runs here now; compare the source's frozen RAM with what
        // was placed.
        let verdict = compare_digests(channel, shared, options, observer)?;
        channel.send(&Message::Verdict(verdict.clone()))?;
        Ok((Some(verdict.is_verified()), verdict.mismatched))
    }

    /// Every channel's pages until the end of RAM: the extra channels on
    /// threads of their own, the main one here. The first failure stops
    /// them all.
    fn transfer(
        &mut self,
        channel: &mut dyn Channel,
        extra: Vec<Box<dyn Channel>>,
        shared: &Shared,
        options: &DestOptions,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(receive::ChannelEnd, Vec<Box<dyn Channel>>), DestError> {
        let mut closers: Vec<Closer> = Vec::with_capacity(extra.len() + 1);
        closers.push(channel.closer()?);
        for c in &extra {
            closers.push(c.closer()?);
        }
        let first_error: std::sync::Mutex<Option<DestError>> = std::sync::Mutex::new(None);
        let fail = |err: DestError| {
            let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() && !matches!(err, DestError::OtherChannelFailed) {
                *slot = Some(err);
            }
            shared.barrier.fail();
        };
        let (main, ends) = std::thread::scope(|scope| {
            let threads: Vec<_> = extra
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    let (fail, closers) = (&fail, &closers);
                    std::thread::Builder::new()
                        .name(format!("migration-recv-{}", i + 1))
                        .spawn_scoped(scope, move || {
                            let result = receive::receive(i + 1, c.as_mut(), shared);
                            match result {
                                Ok(end) => Some((end, c)),
                                Err(err) => {
                                    fail(err);
                                    // Unblock the other data channels. The
                                    // main one stays open: it may still
                                    // carry the source's reason (an abort),
                                    // read below.
                                    closers.iter().skip(1).for_each(|close| close());
                                    None
                                }
                            }
                        })
                        .expect("spawning a channel thread")
                })
                .collect();
            let progress = ProgressTicker::new(options.progress_interval);
            let result = progress.around(observer, shared, self.started, || receive::receive(0, channel, shared));
            if result.is_err() {
                // Main's own error is returned as it is (below); the slot
                // holds only what a data channel hit first.
                shared.barrier.fail();
                closers.iter().skip(1).for_each(|close| close());
            }
            let ends: Vec<_> = threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect();
            (result, ends)
        });
        let first = first_error.into_inner().unwrap_or_else(|e| e.into_inner());
        // A fault found here (a corrupt frame, a full disk, a broken
        // protocol) is the cause; a closed or reset channel may only be the
        // source leaving, whose abort then says why.
        let is_consequence = |err: &DestError| {
            matches!(
                err,
                DestError::OtherChannelFailed
                    | DestError::Transport(TransportError::Closed | TransportError::Io { .. })
                    | DestError::OnChannel {
                        source: TransportError::Closed | TransportError::Io { .. },
                        ..
                    }
            )
        };
        match (main, first) {
            (Ok(end), None) => {
                let (ends, channels): (Vec<_>, Vec<_>) = ends.into_iter().flatten().unzip();
                // Every channel ends the same way: all of RAM sent, or the
                // switch to postcopy.
                if let Some(other) = ends.iter().find(|e| e.postcopy != end.postcopy) {
                    return Err(DestError::Protocol(format!(
                        "the main channel ended with {}, another with {}",
                        end.kind(),
                        other.kind()
                    )));
                }
                Ok((end, channels))
            }
            (_, Some(err)) if !is_consequence(&err) => Err(err),
            (Err(err), _) if !is_consequence(&err) => Err(err),
            (main, first) => {
                let err = first.or(main.err()).unwrap_or(DestError::OtherChannelFailed);
                Err(abort_reason(channel).unwrap_or(err))
            }
        }
    }
}

/// Receives the digests of the source's frozen RAM and compares them with
/// the pages placed; the verdict is the caller's to send. The source hashes
/// all of its RAM first: the wait allows for it.
fn compare_digests(
    rx: &mut dyn crate::transport::ChannelRx,
    shared: &Shared,
    options: &DestOptions,
    observer: &mut dyn FnMut(&Event),
) -> Result<Verdict, DestError> {
    let hashing = Duration::from_secs_f64(shared.placer.ram().total_bytes() as f64 / (256u64 << 20) as f64);
    rx.set_timeout(Some(options.io_timeout + hashing))?;
    let digests = match rx.recv()? {
        Message::Complete(complete) => complete.digests,
        other => return Err(unexpected("complete", &other)),
    };
    let placed = shared.placer.digests();
    if digests.len() != placed.len() {
        return Err(DestError::Protocol(format!(
            "{} digests for {} blocks",
            digests.len(),
            placed.len()
        )));
    }
    let mismatched = placed
        .iter()
        .zip(&digests)
        .enumerate()
        .filter(|(_, (ours, theirs))| ours != theirs)
        .map(|(i, _)| i as u32)
        .collect();
    let verdict = Verdict { mismatched };
    observer(&Event::Verified(verdict.is_verified()));
    Ok(verdict)
}

/// The error for a message that is not the one the protocol expects next.
fn unexpected(wanted: &str, got: &Message<'_>) -> DestError {
    DestError::Protocol(format!("expected {wanted}, got {}", got.kind().name()))
}

/// After a failure on a data channel: whether the source said why on the
/// main connection (it aborts there before closing the others). Bounded.
fn abort_reason(channel: &mut dyn Channel) -> Option<DestError> {
    channel.set_timeout(Some(Duration::from_millis(500))).ok()?;
    for _ in 0..64 {
        match channel.recv() {
            Ok(Message::Abort(reason)) => return Some(DestError::Aborted(reason)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Emits progress events from a ticker thread while the main channel
/// receives on this one.
struct ProgressTicker {
    interval: Duration,
}

impl ProgressTicker {
    fn new(interval: Duration) -> Self {
        Self { interval }
    }

    fn around<T>(
        &self,
        observer: &mut dyn FnMut(&Event),
        shared: &Shared,
        started: Instant,
        work: impl FnOnce() -> T + Send,
    ) -> T
    where
        T: Send,
    {
        let (done, finished) = crossbeam_channel::bounded::<()>(1);
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let result = work();
                drop(done);
                result
            });
            loop {
                observer(&Event::Progress(shared.placer.stats(started)));
                match finished.recv_timeout(self.interval) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
            worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}
