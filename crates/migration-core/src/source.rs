//! The source runtime: drives the precopy engine with a channel thread for
//! the data path and a reader thread for the return path.
//!
//! ```text
//!  caller thread (control)         channel thread            reader thread
//!  engine.poll() -> PageRun ---->  read pages (volatile),    return path ->
//!  dirty log sync                  classify, send batch      crossbeam queue
//!  pause / READY / GO / verify     sync markers, control     (acks, errors)
//! ```

mod postcopy;
mod threads;

use crate::cancel::Cancel;
use crate::compress::Compression;
use crate::dirty::{DirtyLog, DirtyLogError};
use crate::engine::{Action, PageRun, PrecopyConfig, PrecopyEngine, SourcePaused};
use crate::error_chain::ErrorChain;
use crate::ram::Ram;
use crate::stats::{Event, Stats};
use crate::transport::{Channel, Closer, TransportError};
use crate::verify::ram_digests;
use crate::vm::{Vm, VmError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use migration_wire::{
    BlockList, ChannelHello, Complete, EndOfRam, Features, Hello, MAX_FRAME_BODY, MIN_PROTOCOL_VERSION, Message,
    PROTOCOL_VERSION, PeerError, SessionId, Verdict,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use threads::{ChannelFailure, Counters, PageEncoder, spawn_channel_thread, spawn_reader_thread};

/// Settings of an outgoing migration.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Precopy tunables.
    pub precopy: PrecopyConfig,
    /// This migration's session id.
    pub session: SessionId,
    /// Longest wait for an answer from the destination (handshake, READY,
    /// resumed, verdict).
    pub reply_timeout: Duration,
    /// How often a progress event is emitted.
    pub progress_interval: Duration,
    /// Set to stop the migration; honoured until the handover.
    pub cancel: Cancel,
    /// How page batches are compressed on the channel threads.
    pub compression: Compression,
    /// Channels to use: the main connection and `channels - 1` more, each
    /// with a thread of its own. The destination may refuse more than its
    /// limit.
    pub channels: u16,
    /// In postcopy, how long to try to resume a lost link before the
    /// migration is given up (and the VM's state with it).
    pub resume_timeout: Duration,
    /// Bytes of XBZRLE cache, shared out among the data channels (`None`:
    /// pages sent again travel whole). Used where the destination agrees,
    /// from the second pass on, in precopy only.
    pub xbzrle_cache: Option<u64>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            precopy: PrecopyConfig::default(),
            session: SessionId(0),
            reply_timeout: Duration::from_secs(30),
            progress_interval: Duration::from_millis(200),
            cancel: Cancel::new(),
            channels: 1,
            compression: Compression::None,
            resume_timeout: Duration::from_secs(300),
            xbzrle_cache: None,
        }
    }
}

/// Why an outgoing migration failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The channel failed.
    #[error("connection to the destination failed")]
    Transport(#[from] TransportError),
    /// The destination reported an error.
    #[error("destination failed: {}", .0.message)]
    Peer(PeerError),
    /// The destination broke the protocol.
    #[error("destination broke the protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("destination did not send {what} within {timeout:?}")]
    Timeout {
        /// The answer awaited.
        what: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// Precopy gave up.
    #[error(transparent)]
    Convergence(#[from] crate::engine::ConvergenceError),
    /// The dirty log failed.
    #[error("dirty log failed")]
    DirtyLog(#[from] DirtyLogError),
    /// The VM failed to pause, save or resume.
    #[error("vm control failed")]
    Vm(#[from] VmError),
    /// Guest memory could not be read.
    #[error("guest memory access failed")]
    Memory(#[from] migration_sys::SysError),
    /// The device state does not fit in a frame.
    #[error("device state of {len} bytes exceeds the frame limit of {max} bytes")]
    DeviceStateTooLarge {
        /// Its size.
        len: usize,
        /// The largest frame body.
        max: usize,
    },
    /// The migration was cancelled before the handover.
    #[error("migration cancelled")]
    Cancelled,
    /// The link broke after GO was sent: whether the destination runs is
    /// unknown, so the source stays paused.
    #[error(
        "handover unconfirmed: GO was sent but the destination did not confirm it runs ({0}); the source stays paused"
    )]
    HandoverUnconfirmed(String),
    /// Postcopy failed: the destination's guest runs with part of its
    /// memory, the rest is here, and the two cannot be joined again.
    #[error("VM state lost: {0}")]
    StateLost(String),
}

/// The result of a migration that handed the VM over.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// Final figures.
    pub stats: Stats,
    /// Whether the destination's digests matched the source's frozen RAM
    /// (`None` if the verdict never came).
    pub verified: Option<bool>,
    /// Blocks whose digests differ.
    pub mismatched_blocks: Vec<u32>,
    /// Time from the first handshake byte to the destination running.
    pub until_handover: Duration,
    /// Why the digests could not be compared, when `verified` is `None`.
    pub verification_error: Option<String>,
}

/// A failed migration.
#[derive(Debug)]
pub struct SourceFailure {
    /// What went wrong.
    pub error: SourceError,
    /// Figures at the failure.
    pub stats: Stats,
    /// The VM runs on the source again. True on every failure before GO,
    /// unless the VM itself failed to resume (then an operator must act).
    pub source_resumed: bool,
    /// GO was sent: the source must not run the VM again.
    pub handed_over: bool,
}

/// Pauses the VM and mints the proof the final pass requires.
pub fn pause_vm(vm: &mut dyn Vm) -> Result<SourcePaused, VmError> {
    // The downtime starts with the request: the vCPUs may take a while to stop.
    let at = Instant::now();
    vm.pause()?;
    Ok(SourcePaused { at })
}

pub(super) enum Job {
    Pages(PageRun),
    EndEpoch {
        epoch: u64,
        done: Sender<()>,
    },
    Control(Message<'static>),
    DeviceState(Vec<u8>),
    /// A [`Message::Discard`] of these bits.
    Discard {
        block: u32,
        first: u64,
        count: u32,
        bits: Vec<u8>,
    },
    Flush(Sender<()>),
    /// From now on the thread carries postcopy's background stream: it
    /// yields the CPU to the threads that serve page requests.
    Background,
    /// The VM is paused: the pages that follow are the last precopy sends.
    LastPass,
}

/// What the reader thread forwards from the return path.
pub(super) enum Returned {
    Ack(u64),
    Ready,
    Prepared,
    Resumed,
    Verdict(Verdict),
    Error(PeerError),
    Unexpected(&'static str),
    /// The destination broke the protocol (a page request out of range).
    Protocol(String),
    Failed(TransportError),
}

/// Runs an outgoing migration over `channel` (connected, nothing sent yet)
/// and, when [`SourceOptions::channels`] asks for more, the connections
/// `connect(index, wait)` opens for channels `1..channels` (and, in
/// postcopy, for the urgent-page channel and a lost link's resumption),
/// trying for at most `wait`.
///
/// `dirty_log` must already be tracking writes. On success the VM stays
/// paused (it lives on the destination now); on any failure before GO it is
/// running again when this returns (see [`SourceFailure::source_resumed`]).
/// A throttle auto-converge set is lifted in every case, before the VM
/// resumes.
pub fn run_source(
    channel: Box<dyn Channel>,
    connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
    ram: &Ram,
    vm: &mut dyn Vm,
    dirty_log: &mut dyn DirtyLog,
    options: &SourceOptions,
    observer: &mut dyn FnMut(&Event),
) -> Result<SourceReport, Box<SourceFailure>> {
    let started = Instant::now();
    let mut run = SourceRun {
        ram,
        options,
        started,
        // The data channels, and one more for the urgent-page channel.
        counters: (0..=options.channels.max(1))
            .map(|_| Arc::new(Counters::default()))
            .collect(),
        pause_attempted: false,
        paused_at: None,
        handed_over: false,
        source_resumed: false,
        engine_stats: Stats {
            ram_bytes: ram.total_bytes(),
            throttle_percent: options.precopy.auto_converge.map(|_| 0),
            ..Stats::default()
        },
        downtime: None,
        downtime_parts: None,
        handover: None,
        early: std::collections::VecDeque::new(),
        acked: None,
        ended: None,
        stream_ended: false,
        complete_sent: false,
        zero_pages: true,
        xbzrle: false,
        abandon: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        postcopy_pages: None,
        postcopy: None,
        pausing_sent: false,
        throttle_asked: false,
    };
    let result = run.run(channel, connect, vm, dirty_log, observer);
    let stats = run.stats();
    match result {
        Ok(verification) => Ok(SourceReport {
            until_handover: run.handover.unwrap_or(stats.elapsed),
            stats,
            verified: verification.verified,
            mismatched_blocks: verification.mismatched,
            verification_error: verification.error,
        }),
        Err(error) => Err(Box::new(SourceFailure {
            error,
            stats,
            source_resumed: run.source_resumed,
            handed_over: run.handed_over,
        })),
    }
}

/// The outcome of comparing digests after the handover.
struct Verification {
    verified: Option<bool>,
    mismatched: Vec<u32>,
    error: Option<String>,
}

/// The threads' ends the control thread holds: one job queue and error
/// slot per channel (index 0 is the main connection, then the data
/// channels, then the urgent-page channel in a migration that may switch to
/// postcopy), the return path, and a closer per channel to unblock its
/// thread on failure.
struct Link {
    jobs: Vec<Sender<Job>>,
    channel_error: Vec<Arc<Mutex<Option<ChannelFailure>>>>,
    closers: Vec<Closer>,
    returned: Receiver<Returned>,
    /// The channel the next page run goes to.
    next: std::cell::Cell<usize>,
    /// How many channels carry streamed pages (the urgent one does not).
    data: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The urgent-page channel of a migration that may switch to postcopy.
    urgent: Option<Arc<Mutex<threads::UrgentSender>>>,
}

impl Link {
    /// The next data channel in round robin: within an epoch a page goes
    /// out once, so any channel may carry it.
    fn next_data(&self) -> usize {
        let channel = self.next.get();
        self.next.set((channel + 1) % self.data);
        channel
    }

    /// Lets every channel thread finish its queue and stop, then closes
    /// the main connection, which ends the return-path reader. Returns
    /// whether a thread panicked.
    fn close(mut self) -> bool {
        let closers = std::mem::take(&mut self.closers);
        let threads = std::mem::take(&mut self.threads);
        if let Some(urgent) = self.urgent.take() {
            urgent.lock().unwrap_or_else(|e| e.into_inner()).tx.shutdown();
        }
        drop(self);
        let mut panicked = false;
        for thread in threads {
            panicked |= thread.join().is_err();
        }
        if let Some(close) = closers.first() {
            close();
        }
        panicked
    }
}

/// How precopy ended.
enum Switch {
    /// Every page is sent and the VM is paused: hand over.
    Stopped,
    /// The engine decided to switch to postcopy (the VM still runs).
    Postcopy(Box<PrecopyEngine>),
}

struct SourceRun<'a> {
    ram: &'a Ram,
    options: &'a SourceOptions,
    started: Instant,
    /// Per channel.
    counters: Vec<Arc<Counters>>,
    pause_attempted: bool,
    paused_at: Option<Instant>,
    handed_over: bool,
    source_resumed: bool,
    engine_stats: Stats,
    downtime: Option<Duration>,
    /// The precopy downtime's parts, filled in as they pass.
    downtime_parts: Option<crate::stats::DowntimeParts>,
    handover: Option<Duration>,
    /// Handover messages that arrived while waiting for something else.
    early: std::collections::VecDeque<Returned>,
    /// The last epoch the destination acknowledged as placed.
    acked: Option<u64>,
    /// The last epoch whose sync markers went out: a destination cannot
    /// acknowledge a later one.
    ended: Option<u64>,
    /// End of RAM went out on every channel: READY may come.
    stream_ended: bool,
    /// The block digests went out: a verdict may come.
    complete_sent: bool,
    /// Whether zero pages may travel as a flag (agreed in the handshake).
    zero_pages: bool,
    /// Whether pages sent again travel as XBZRLE deltas: agreed in the
    /// handshake, and cleared at the switch to postcopy.
    xbzrle: bool,
    /// Set on failure: channel threads drop the page jobs still queued.
    abandon: Arc<std::sync::atomic::AtomicBool>,
    /// Postcopy was agreed: the pages still to send in postcopy, per block
    /// (empty until the switch), shared with the return-path reader.
    postcopy_pages: Option<Arc<threads::PendingPages>>,
    /// Figures of the postcopy phase.
    postcopy: Option<crate::stats::PostcopyStats>,
    /// The switch to postcopy asked the destination to prepare.
    pausing_sent: bool,
    /// Auto-converge asked the VM for a throttle, which must be lifted.
    throttle_asked: bool,
}

impl SourceRun<'_> {
    fn sum(&self, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters.iter().map(|c| field(c).load(Ordering::Relaxed)).sum()
    }

    fn stats(&self) -> Stats {
        Stats {
            ram_transferred: self.sum(|c| &c.ram_bytes),
            transferred_bytes: self.sum(|c| &c.wire_bytes),
            zero_pages: self.sum(|c| &c.zero_pages),
            compression_saved: self.sum(|c| &c.compression_saved),
            plain_pages: self.sum(|c| &c.plain_pages),
            channel_bytes: self
                .counters
                .iter()
                .take(usize::from(self.options.channels.max(1)) + usize::from(self.postcopy_pages.is_some()))
                .map(|c| c.wire_bytes.load(Ordering::Relaxed))
                .collect(),
            elapsed: self.started.elapsed(),
            downtime: self.downtime,
            downtime_parts: self.downtime_parts,
            postcopy: self.postcopy_stats(),
            xbzrle: self.options.xbzrle_cache.map(|cache_bytes| {
                let (pages, overflows) = (self.sum(|c| &c.delta_pages), self.sum(|c| &c.delta_overflows));
                crate::stats::XbzrleStats {
                    cache_bytes,
                    pages,
                    bytes: self.sum(|c| &c.delta_bytes),
                    cache_hits: pages + overflows,
                    cache_misses: self.sum(|c| &c.cache_misses),
                    overflows,
                }
            }),
            ..self.engine_stats.clone()
        }
    }

    fn refresh(&mut self, engine: &PrecopyEngine) {
        let est = engine.estimates();
        self.engine_stats.iterations = est.iterations;
        self.engine_stats.remaining_bytes = Some(engine.remaining_bytes());
        self.engine_stats.bandwidth = (est.bandwidth > 0.0).then_some(est.bandwidth);
        self.engine_stats.dirty_rate = (est.iterations > 0).then_some(est.dirty_rate);
        self.engine_stats.expected_downtime = est.expected_downtime;
    }

    fn run(
        &mut self,
        mut channel: Box<dyn Channel>,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
        vm: &mut dyn Vm,
        dirty_log: &mut dyn DirtyLog,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<Verification, SourceError> {
        let channels = match self.open_channels(channel.as_mut(), connect) {
            Ok(extra) => extra,
            Err(err) => {
                self.source_resumed = true;
                return Err(err);
            }
        };
        observer(&Event::Started);
        let mut link = match self.start_link(std::iter::once(channel).chain(channels).collect()) {
            Ok(link) => link,
            Err(err) => {
                self.source_resumed = true;
                return Err(err.into());
            }
        };
        let outcome = match self.precopy(&link, vm, dirty_log, observer) {
            Ok(Switch::Stopped) => self.hand_over(&link, observer).map(|()| self.verify(&link, observer)),
            Ok(Switch::Postcopy(engine)) => self.postcopy(&mut link, *engine, connect, vm, dirty_log, observer),
            Err(err) => Err(err),
        };
        // Auto-converge ends with the migration: the guest runs on here
        // unthrottled after a failure, and a VM handed over is left
        // unthrottled too.
        self.lift_throttle(vm, observer);
        if let Err(err) = &outcome
            && !self.handed_over
        {
            // Before GO the source is the truth: it runs again at once,
            // before anything else can block, and the destination is told
            // to discard.
            self.source_resumed = !self.pause_attempted || vm.resume().is_ok();
            if self.source_resumed {
                observer(&Event::SourceResumed);
            }
            // Let the abort reach the wire before the data channels close,
            // so the destination reports the reason rather than a closed
            // channel (bounded: the link may be dead). Queued pages are
            // dropped, not sent: the guest runs again.
            self.abandon.store(true, Ordering::Release);
            let (done, flushed) = bounded(1);
            let abort = Job::Control(Message::Abort(ErrorChain(err).to_string()));
            let wait = Duration::from_secs(1);
            if link.jobs[0].send_timeout(abort, wait).is_ok()
                && link.jobs[0].send_timeout(Job::Flush(done), wait).is_ok()
            {
                let _ = flushed.recv_timeout(wait);
            }
        }
        if outcome.is_err() {
            // Unblock the other channels' threads; the main one still
            // carries the abort.
            link.closers.iter().skip(1).for_each(|close| close());
        }
        if link.close() {
            return Err(SourceError::Protocol("a channel thread panicked".into()));
        }
        outcome
    }

    /// Applies auto-converge's throttle. Best effort: a VM that refuses it
    /// migrates on as it is.
    fn throttle(&mut self, vm: &mut dyn Vm, percent: u8, observer: &mut dyn FnMut(&Event)) {
        self.throttle_asked = true;
        match vm.throttle(percent) {
            Ok(()) => {
                self.engine_stats.throttle_percent = Some(percent);
                observer(&Event::Throttled { percent });
            }
            Err(err) => observer(&Event::ThrottleFailed {
                percent,
                reason: ErrorChain(&err).to_string(),
            }),
        }
    }

    /// Lifts a throttle auto-converge asked for (applied or not: a VM that
    /// failed may have half applied it).
    fn lift_throttle(&mut self, vm: &mut dyn Vm, observer: &mut dyn FnMut(&Event)) {
        if self.throttle_asked {
            self.throttle(vm, 0, observer);
            self.throttle_asked = false;
        }
    }

    /// Spawns a thread per channel (the main one first, then the data
    /// channels, then the urgent-page channel when postcopy was agreed) and
    /// the return-path reader on the main one.
    fn start_link(&self, channels: Vec<Box<dyn Channel>>) -> Result<Link, TransportError> {
        let data = usize::from(self.options.channels.max(1));
        let halves = channels
            .into_iter()
            .map(|c| {
                let closer = c.closer()?;
                let (tx, rx) = c.split()?;
                Ok((tx, rx, closer))
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        let mut link = Link {
            jobs: Vec::new(),
            channel_error: Vec::new(),
            closers: Vec::new(),
            returned: crossbeam_channel::never(),
            next: std::cell::Cell::new(0),
            data,
            threads: Vec::new(),
            urgent: None,
        };
        let mut main_rx = None;
        for (index, (tx, rx, closer)) in halves.into_iter().enumerate() {
            if index == data {
                // The urgent-page channel: the return-path reader sends on it.
                let mut tx = tx;
                tx.prefer_latency();
                link.closers.push(closer);
                link.urgent = Some(Arc::new(Mutex::new(threads::UrgentSender {
                    tx,
                    encoder: PageEncoder::new(self.zero_pages, Compression::None),
                    counters: Arc::clone(&self.counters[index]),
                })));
                continue;
            }
            let (jobs, thread, error) = spawn_channel_thread(
                index,
                tx,
                self.ram.clone(),
                Arc::clone(&self.abandon),
                Arc::clone(&self.counters[index]),
                self.encoder(),
            );
            link.jobs.push(jobs);
            link.channel_error.push(error);
            link.closers.push(closer);
            link.threads.push(thread);
            if index == 0 {
                main_rx = Some(rx);
            }
        }
        // The return path comes back on the main connection only; page
        // requests on it go straight to the urgent channel's thread.
        let route = self.postcopy_pages.as_ref().and_then(|pending| {
            link.urgent.as_ref().map(|urgent| threads::RequestRoute {
                urgent: Arc::clone(urgent),
                pending: Arc::clone(pending),
                ram: self.ram.clone(),
            })
        });
        if let Some(rx) = main_rx {
            link.returned = spawn_reader_thread(rx, route);
        }
        Ok(link)
    }

    /// A data channel's page encoder.
    fn encoder(&self) -> PageEncoder {
        let mut encoder = PageEncoder::new(self.zero_pages, self.options.compression);
        if self.xbzrle
            && let Some(bytes) = self.options.xbzrle_cache
        {
            let channels = usize::from(self.options.channels.max(1));
            encoder.xbzrle = Some(threads::Deltas::new(bytes / channels as u64, self.ram, channels));
        }
        encoder
    }

    fn proposed_features(&self) -> Features {
        let mut features = Features::ZERO_PAGES.union(self.options.compression.codec().feature());
        if self.options.precopy.postcopy.is_some() {
            features = features.union(Features::POSTCOPY);
        }
        if self.options.xbzrle_cache.is_some() {
            features = features.union(Features::XBZRLE);
        }
        features
    }

    /// The handshake on the main connection, then the extra channels.
    fn open_channels(
        &mut self,
        channel: &mut dyn Channel,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
    ) -> Result<Vec<Box<dyn Channel>>, SourceError> {
        self.handshake(channel)?;
        self.open_extra_channels(connect)
    }

    /// Opens the data channels after the main one and, where postcopy was
    /// agreed, the urgent-page channel (index `channels`).
    fn open_extra_channels(
        &mut self,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
    ) -> Result<Vec<Box<dyn Channel>>, SourceError> {
        let channels = self.options.channels.max(1);
        let last = if self.postcopy_pages.is_some() {
            channels
        } else {
            channels - 1
        };
        let mut extra = Vec::with_capacity(usize::from(last));
        for index in 1..=last {
            let mut c = connect(index, self.options.reply_timeout)?;
            c.set_timeout(Some(self.options.reply_timeout))?;
            c.send(&Message::ChannelHello(ChannelHello {
                session: self.options.session,
                index,
                channels,
            }))?;
            match c.recv()? {
                Message::ChannelAccepted => {}
                Message::Error(err) => return Err(SourceError::Peer(err)),
                other => return Err(unexpected("channel-accepted", &other)),
            }
            extra.push(c);
        }
        Ok(extra)
    }

    fn handshake(&mut self, channel: &mut dyn Channel) -> Result<(), SourceError> {
        channel.set_timeout(Some(self.options.reply_timeout))?;
        channel.send(&Message::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            features: self.proposed_features(),
            session: self.options.session,
            channels: self.options.channels.max(1),
        }))?;
        match channel.recv()? {
            Message::HelloReply(reply) => {
                if reply.session != self.options.session {
                    return Err(SourceError::Protocol(format!(
                        "hello reply for session {:#x}, expected {:#x}",
                        reply.session.0, self.options.session.0
                    )));
                }
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&reply.version) {
                    return Err(SourceError::Protocol(format!(
                        "destination chose protocol version {}, we speak {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                        reply.version
                    )));
                }
                if !Features::KNOWN.contains(reply.features) {
                    return Err(SourceError::Protocol(format!(
                        "destination agreed to features {:#x} that were not proposed",
                        reply.features.0
                    )));
                }
                if reply.channels != self.options.channels.max(1) {
                    return Err(SourceError::Protocol(format!(
                        "destination agreed to {} channels, the source proposed {}",
                        reply.channels,
                        self.options.channels.max(1)
                    )));
                }
                self.zero_pages = reply.features.contains(Features::ZERO_PAGES);
                self.xbzrle = reply.features.contains(Features::XBZRLE) && self.options.xbzrle_cache.is_some();
                if self.options.precopy.postcopy.is_some() {
                    if !reply.features.contains(Features::POSTCOPY) {
                        return Err(SourceError::Protocol(
                            "the source may switch to postcopy (--postcopy), the destination does not allow it \
                             (it needs anonymous guest memory and userfaultfd)"
                                .into(),
                        ));
                    }
                    self.postcopy_pages = Some(Arc::new(threads::PendingPages::new(self.ram)));
                }
                let codec = self.options.compression.codec().feature();
                if !reply.features.contains(codec) {
                    return Err(SourceError::Protocol(format!(
                        "the source asks for {} compression, the destination does not allow it (its --compress)",
                        self.options.compression
                    )));
                }
            }
            Message::Error(err) => return Err(SourceError::Peer(err)),
            other => return Err(unexpected("hello-reply", &other)),
        }
        let blocks: BlockList = self.ram.block_list();
        channel.send(&Message::BlockList(blocks))?;
        match channel.recv()? {
            Message::BlocksAccepted => Ok(()),
            Message::Error(err) => Err(SourceError::Peer(err)),
            other => Err(unexpected("blocks-accepted", &other)),
        }
    }

    /// Why the channel thread stopped: what the destination said if it said
    /// anything (its error explains a reset connection), else the local error.
    fn channel_failure(&mut self, link: &Link) -> SourceError {
        let failure = link
            .channel_error
            .iter()
            .find_map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        // A link that broke under the channel is best explained by the
        // destination, if it says why; a failure of this side's own (its
        // memory, its transport refusing what it was given) explains itself.
        let broke = match &failure {
            Some(ChannelFailure::Transport(err)) => err.is_broken_link(),
            Some(ChannelFailure::Memory(_)) => false,
            None => true,
        };
        if broke {
            let deadline = Instant::now() + Duration::from_millis(200);
            while let Ok(message) = link.returned.recv_deadline(deadline) {
                match message {
                    Returned::Error(err) => return SourceError::Peer(err),
                    Returned::Failed(_) => break,
                    _ => {}
                }
            }
        }
        match failure {
            Some(ChannelFailure::Transport(err)) => SourceError::Transport(err),
            Some(ChannelFailure::Memory(err)) => SourceError::Memory(err),
            None => SourceError::Transport(TransportError::Closed),
        }
    }

    /// Hands a job to the channel thread, blocking while it is busy but
    /// watching the return path and the cancel flag.
    fn submit(&mut self, link: &Link, channel: usize, mut job: Job) -> Result<(), SourceError> {
        loop {
            match link.jobs[channel].send_timeout(job, TICK) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                    self.check_cancel()?;
                    while let Ok(message) = link.returned.try_recv() {
                        self.handle_returned(message)?;
                    }
                    job = back;
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Err(self.channel_failure(link)),
            }
        }
    }

    /// Precopy up to the destination's READY, or up to the switch to
    /// postcopy.
    fn precopy(
        &mut self,
        link: &Link,
        vm: &mut dyn Vm,
        dirty_log: &mut dyn DirtyLog,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<Switch, SourceError> {
        let mut engine = PrecopyEngine::new(self.ram, self.options.precopy.clone(), self.started);
        let mut next_progress = Instant::now();
        // With deltas, each page keeps to the channel that caches it.
        let numbering = self.xbzrle.then(|| crate::xbzrle::PageNumbering::new(self.ram));
        // The shortest wait for an epoch's acknowledgement once its pages
        // left: the round trip, with as little transfer in it as seen.
        let mut round_trip = Duration::MAX;
        loop {
            self.check_cancel()?;
            while let Ok(message) = link.returned.try_recv() {
                self.handle_returned(message)?;
            }
            let now = Instant::now();
            engine.handle_progress(self.sum(|c| &c.ram_bytes), self.sum(|c| &c.wire_bytes));
            if now >= next_progress {
                self.refresh(&engine);
                observer(&Event::Progress(self.stats()));
                next_progress = now + self.options.progress_interval;
            }
            match engine.poll(now) {
                Action::Send(run) => match &numbering {
                    Some(numbering) => {
                        for (channel, piece) in crate::xbzrle::route(numbering, run, link.data) {
                            self.submit(link, channel, Job::Pages(piece))?;
                        }
                    }
                    None => {
                        let channel = link.next_data();
                        self.submit(link, channel, Job::Pages(run))?;
                    }
                },
                Action::EndEpoch { epoch } => {
                    self.ended = Some(epoch);
                    // Every channel closes the epoch with its own marker.
                    let mut waits = Vec::with_capacity(link.data);
                    for channel in 0..link.data {
                        let (done, wait) = bounded(1);
                        self.submit(link, channel, Job::EndEpoch { epoch, done })?;
                        waits.push(wait);
                    }
                    for wait in &waits {
                        self.wait_local(link, wait)?;
                    }
                    // Wait until the destination placed the whole epoch: the
                    // bandwidth measured is then end to end, and nothing sits in
                    // socket buffers to drain while the VM is paused.
                    let flushed = Instant::now();
                    self.wait_acked(link, epoch)?;
                    round_trip = round_trip.min(flushed.elapsed());
                }
                Action::SyncDirtyLog => {
                    let syncing = Instant::now();
                    dirty_log.collect(&mut |block, first, count| engine.handle_dirty(block, first, count))?;
                    // A switchover syncs once more, then waits for READY and
                    // for the destination running: two round trips.
                    engine.handle_overhead(syncing.elapsed() + round_trip.saturating_mul(2));
                    engine.handle_progress(self.sum(|c| &c.ram_bytes), self.sum(|c| &c.wire_bytes));
                    engine.handle_sync_done(Instant::now());
                    self.refresh(&engine);
                    observer(&Event::PassEnded {
                        epoch: engine.epoch(),
                        stats: self.stats(),
                    });
                }
                Action::Pause {
                    expected_downtime,
                    reason,
                } => {
                    observer(&Event::Switchover {
                        reason,
                        expected_downtime,
                    });
                    self.pause_attempted = true;
                    let paused = pause_vm(vm)?;
                    self.paused_at = Some(paused.at());
                    let collecting = Instant::now();
                    observer(&Event::Paused);
                    dirty_log.collect(&mut |block, first, count| engine.handle_dirty(block, first, count))?;
                    self.downtime_parts = Some(crate::stats::DowntimeParts {
                        pause: collecting - paused.at(),
                        sync: collecting.elapsed(),
                        final_bytes: engine.remaining_bytes(),
                        ..Default::default()
                    });
                    if self.xbzrle {
                        for channel in 0..link.data {
                            self.submit(link, channel, Job::LastPass)?;
                        }
                    }
                    // The device state is final now: it goes ahead of the
                    // last pages, so saving and sending it overlaps with them.
                    let state = device_state(vm)?;
                    self.submit(link, 0, Job::DeviceState(state))?;
                    engine.handle_paused(&paused, Instant::now());
                }
                Action::Postcopy { reason, remaining } => {
                    observer(&Event::PostcopyStarting { reason, remaining });
                    self.refresh(&engine);
                    return Ok(Switch::Postcopy(Box::new(engine)));
                }
                Action::Throttle { percent } => self.throttle(vm, percent, observer),
                Action::Finish => break,
                Action::Fail(error) => return Err(error.into()),
                Action::Wait(until) => {
                    let deadline = until.unwrap_or(next_progress).min(next_progress);
                    match link.returned.recv_deadline(deadline) {
                        Ok(message) => self.handle_returned(message)?,
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Err(self.channel_failure(link)),
                    }
                }
            }
        }
        self.refresh(&engine);
        self.engine_stats.remaining_bytes = Some(0);
        // Report passes over RAM, the final one included, as the destination
        // counts them.
        self.engine_stats.iterations = engine.epoch() + 1;

        // The end of the stream (the device state went out at the pause),
        // then wait for READY.
        self.stream_ended = true;
        let mut waits = Vec::with_capacity(link.data);
        for channel in 0..link.data {
            let end = EndOfRam {
                epochs: engine.epoch() + 1,
            };
            self.submit(link, channel, Job::Control(Message::EndOfRam(end)))?;
            let (done, wait) = bounded(1);
            self.submit(link, channel, Job::Flush(done))?;
            waits.push(wait);
        }
        for wait in &waits {
            self.wait_local(link, wait)?;
        }
        self.wait_for(link, "ready", |m| matches!(m, Returned::Ready))?;
        if let (Some(parts), Some(at)) = (&mut self.downtime_parts, self.paused_at) {
            parts.transfer = at.elapsed().saturating_sub(parts.pause + parts.sync);
        }
        observer(&Event::Ready);
        self.check_cancel()?;
        Ok(Switch::Stopped)
    }

    /// The handover: record it, send GO, wait for the destination to run.
    fn hand_over(&mut self, link: &Link, observer: &mut dyn FnMut(&Event)) -> Result<(), SourceError> {
        self.handed_over = true;
        observer(&Event::HandedOver);
        let (done, wait) = bounded(1);
        let go_sent = link.jobs[0]
            .send(Job::Control(Message::Go))
            .and_then(|()| link.jobs[0].send(Job::Flush(done)))
            .is_ok()
            && wait.recv_timeout(self.options.reply_timeout).is_ok();
        if !go_sent {
            let err = self.channel_failure(link);
            return Err(SourceError::HandoverUnconfirmed(ErrorChain(&err).to_string()));
        }
        if let Err(err) = self.wait_for(link, "resumed", |m| matches!(m, Returned::Resumed)) {
            return Err(SourceError::HandoverUnconfirmed(ErrorChain(&err).to_string()));
        }
        self.downtime = self.paused_at.map(|at| at.elapsed());
        if let (Some(parts), Some(downtime)) = (&mut self.downtime_parts, self.downtime) {
            parts.handover = downtime.saturating_sub(parts.pause + parts.sync + parts.transfer);
        }
        self.handover = Some(self.started.elapsed());
        observer(&Event::Resumed);
        Ok(())
    }

    /// After the handover: hash the frozen RAM (the VM never runs here
    /// again) and let the destination compare. Nothing here can undo the
    /// handover, so failures become an unverified result, not an error.
    fn verify(&mut self, link: &Link, observer: &mut dyn FnMut(&Event)) -> Verification {
        let unverified = |error: String| Verification {
            verified: None,
            mismatched: Vec::new(),
            error: Some(error),
        };
        let digests = match ram_digests(self.ram, 2) {
            Ok(digests) => digests,
            Err(err) => return unverified(format!("hashing the source's frozen RAM failed: {err}")),
        };
        self.complete_sent = true;
        if link.jobs[0]
            .send(Job::Control(Message::Complete(Complete { digests })))
            .is_err()
        {
            let err = self.channel_failure(link);
            return unverified(format!("sending the block digests failed: {}", ErrorChain(&err)));
        }
        match self.wait_for(link, "verdict", |m| matches!(m, Returned::Verdict(_))) {
            Ok(Returned::Verdict(verdict)) => {
                observer(&Event::Verified(verdict.is_verified()));
                Verification {
                    verified: Some(verdict.is_verified()),
                    mismatched: verdict.mismatched,
                    error: None,
                }
            }
            Ok(_) => unverified("unexpected answer instead of the verdict".into()),
            Err(err) => unverified(format!("no verdict on the block digests: {}", ErrorChain(&err))),
        }
    }

    /// Waits for the channel thread to acknowledge a job, while watching the
    /// return path for errors.
    fn wait_local(&mut self, link: &Link, done: &Receiver<()>) -> Result<(), SourceError> {
        loop {
            crossbeam_channel::select! {
                recv(done) -> r => return match r {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.channel_failure(link)),
                },
                recv(link.returned) -> m => match m {
                    Ok(message) => self.handle_returned(message)?,
                    Err(_) => return Err(self.channel_failure(link)),
                },
                default(TICK) => self.check_cancel()?,
            }
        }
    }

    fn wait_acked(&mut self, link: &Link, epoch: u64) -> Result<(), SourceError> {
        let timeout = self.options.reply_timeout;
        let deadline = Instant::now() + timeout;
        while self.acked.is_none_or(|acked| acked < epoch) {
            self.check_cancel()?;
            match link.returned.recv_deadline(deadline.min(Instant::now() + TICK)) {
                Ok(message) => self.handle_returned(message)?,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SourceError::Timeout {
                        what: "the acknowledgement of an epoch",
                        timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Closed.into()),
            }
        }
        Ok(())
    }

    fn wait_for(
        &mut self,
        link: &Link,
        what: &'static str,
        wanted: impl Fn(&Returned) -> bool,
    ) -> Result<Returned, SourceError> {
        let timeout = self.options.reply_timeout;
        let deadline = Instant::now() + timeout;
        if let Some(message) = self.early.pop_front() {
            if wanted(&message) {
                return Ok(message);
            }
            return Err(SourceError::Protocol("handover message out of order".into()));
        }
        loop {
            if !self.handed_over {
                self.check_cancel()?;
            }
            match link.returned.recv_deadline(deadline.min(Instant::now() + TICK)) {
                Ok(message) if wanted(&message) => return Ok(message),
                Ok(message) => self.handle_returned(message)?,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => return Err(SourceError::Timeout { what, timeout }),
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Closed.into()),
            }
        }
    }

    fn check_cancel(&self) -> Result<(), SourceError> {
        if self.options.cancel.is_cancelled() && !self.handed_over {
            Err(SourceError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn handle_returned(&mut self, message: Returned) -> Result<(), SourceError> {
        match message {
            Returned::Ack(epoch) => {
                if self.ended.is_none_or(|ended| epoch > ended) {
                    return Err(SourceError::Protocol(format!(
                        "the destination acknowledged epoch {epoch}, which was not sent yet"
                    )));
                }
                self.acked = Some(self.acked.map_or(epoch, |a| a.max(epoch)));
                Ok(())
            }
            Returned::Ready if !self.stream_ended => Err(SourceError::Protocol(
                "the destination said READY before the stream ended".into(),
            )),
            Returned::Resumed if !self.handed_over => Err(SourceError::Protocol(
                "the destination said it runs the guest before GO".into(),
            )),
            Returned::Verdict(_) if !self.complete_sent => Err(SourceError::Protocol(
                "the destination sent a verdict before the block digests".into(),
            )),
            Returned::Error(err) => Err(SourceError::Peer(err)),
            Returned::Failed(err) => Err(err.into()),
            Returned::Unexpected(kind) => Err(SourceError::Protocol(format!("unexpected {kind} on the return path"))),
            Returned::Protocol(problem) => Err(SourceError::Protocol(problem)),
            Returned::Prepared if !self.pausing_sent => Err(SourceError::Protocol(
                "the destination said it is prepared for postcopy before the source was pausing".into(),
            )),
            // Handover messages answer the stream that was just flushed;
            // `wait_for` takes them in order.
            handover @ (Returned::Ready | Returned::Prepared | Returned::Resumed | Returned::Verdict(_)) => {
                self.early.push_back(handover);
                Ok(())
            }
        }
    }
}

/// The paused VM's device state, which must fit in a frame.
fn device_state(vm: &mut dyn Vm) -> Result<Vec<u8>, SourceError> {
    let state = vm.save_device_state()?;
    if state.len() > MAX_FRAME_BODY as usize {
        return Err(SourceError::DeviceStateTooLarge {
            len: state.len(),
            max: MAX_FRAME_BODY as usize,
        });
    }
    Ok(state)
}

/// How often blocking waits look at the cancel flag.
const TICK: Duration = Duration::from_millis(100);

fn unexpected(wanted: &str, got: &Message<'_>) -> SourceError {
    SourceError::Protocol(format!("expected {wanted}, got {}", got.kind().name()))
}
