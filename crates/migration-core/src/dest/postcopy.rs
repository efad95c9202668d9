//! The destination's postcopy phase.
//!
//! At the switch every page this side does not hold (never sent, or sent and
//! changed since: the source's discard set) is dropped, so it is absent, and
//! guest RAM is registered with userfaultfd in missing mode; then the guest
//! runs. A thread per block reads its faults: a page held but absent (a zero
//! page never written) is mapped at once, any other is asked for on the
//! return path, once. Every channel's thread places the pages that arrive
//! with one `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` per run of pages, which wakes
//! the threads waiting on them; the received bitmap is the truth, and a page
//! already held is never placed or asked for again.
//!
//! ```text
//!  guest thread --fault--> fault thread --PageRequest--> (main, to source)
//!                             | held: UFFDIO_ZEROPAGE
//!  urgent channel --pages--> receiver --UFFDIO_COPY--> wakes the guest thread
//!  data channels  --pages--> receivers (the background stream)
//!  control (this thread): READY when every page is held; a lost link is
//!  waited for (listening again until the resume timeout), then the source
//!  is told what is held and the pages asked for are asked again.
//! ```

use super::place::Placer;
use super::receive::Shared;
use super::{DestError, DestOptions, DestRun, Link, compare_digests, seat_channel, tell_peer, unexpected};
use crate::bitmap::AtomicBitmap;
use crate::error_chain::ErrorChain;
use crate::stats::{Event, Histogram, PostcopyStats};
use crate::transport::{Channel, ChannelHalves, ChannelRx, ChannelTx, Closer, TransportError};
use crate::vm::Vm;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use migration_sys::uffd::{MissingPages, Placed};
use migration_wire::{Features, Message, PageBitmap, PageRequest, SessionId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pages per received-pages message: 64 KiB of bits.
const BITMAP_CHUNK: u64 = 1 << 19;

/// How often the control loop looks at progress and the watchdog.
const TICK: Duration = Duration::from_millis(50);

/// What the threads tell the control loop.
enum Happened {
    /// A channel's thread ended: its stream ended, or it failed.
    ChannelEnded {
        index: usize,
        result: Result<(), DestError>,
    },
    /// Sending a page request failed: the link is gone.
    RequestFailed(TransportError),
    /// A fault thread could not serve faults.
    FaultFailed(migration_sys::SysError),
}

/// What every postcopy thread shares.
struct Postcopy<'a> {
    placer: &'a Placer,
    /// Per block: the userfaultfd registration pages are placed through.
    missing: Vec<MissingPages>,
    /// Per block: pages asked for since the switch.
    requested: Vec<AtomicBitmap>,
    /// Per block and page: when it was first asked for, in nanoseconds
    /// since `base`.
    requested_at: Vec<Box<[AtomicU64]>>,
    base: Instant,
    /// The epoch postcopy pages carry.
    epoch: u64,
    codecs: Features,
    io_timeout: Duration,
    /// Pages not held yet.
    remaining: AtomicU64,
    /// The main connection's sending half, while the link is up.
    requests: Mutex<Option<Box<dyn ChannelTx>>>,
    events: Sender<Happened>,
    stop_faults: AtomicBool,
    faults: AtomicU64,
    service: Histogram,
    requested_pages: AtomicU64,
    streamed_pages: AtomicU64,
}

/// One link's channels, the main one first.
struct LinkChannels {
    main: Box<dyn Channel>,
    data: Vec<Box<dyn Channel>>,
    urgent: Box<dyn Channel>,
}

/// Runs the switch and the postcopy phase, up to the digest check.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    run: &mut DestRun,
    mut main: Box<dyn Channel>,
    data: Vec<Box<dyn Channel>>,
    link: Link,
    epochs: u64,
    shared: &Shared,
    vm: &mut dyn Vm,
    options: &DestOptions,
    accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
    observer: &mut dyn FnMut(&Event),
) -> Result<(Option<bool>, Vec<u32>), DestError> {
    // Until the guest runs here the source owns the VM: a failure is
    // reported to it, and it resumes.
    let switched = switch(&mut *main, link.urgent.is_some(), shared, vm, options);
    let missing = match switched {
        Ok(switched) => switched,
        Err(err) => {
            tell_peer(main.as_mut(), &err);
            run.received_bytes += main.bytes_received() + main.bytes_sent();
            return Err(err);
        }
    };
    let urgent = link.urgent.expect("checked by the switch");
    run.handover = Some(run.started.elapsed());
    if let Err(err) = vm.resume() {
        let err = DestError::from(err);
        tell_peer(main.as_mut(), &err);
        missing.into_iter().for_each(MissingPages::keep_absent_pages_blocked);
        return Err(err);
    }
    run.resumed = true;

    let ram = shared.placer.ram();
    let (events, happened) = unbounded();
    let pc = Postcopy {
        placer: &shared.placer,
        missing,
        requested: ram.blocks().iter().map(|b| AtomicBitmap::new(b.pages())).collect(),
        requested_at: ram
            .blocks()
            .iter()
            .map(|b| migration_sys::zeroed_atomics(b.pages() as usize))
            .collect(),
        base: Instant::now(),
        epoch: epochs,
        codecs: shared.codecs,
        io_timeout: options.io_timeout,
        remaining: AtomicU64::new(
            shared
                .placer
                .received()
                .iter()
                .map(|held| held.len() - held.count_ones())
                .sum(),
        ),
        requests: Mutex::new(None),
        events,
        stop_faults: AtomicBool::new(false),
        faults: AtomicU64::new(0),
        service: Histogram::new(),
        requested_pages: AtomicU64::new(0),
        streamed_pages: AtomicU64::new(0),
    };
    let mut control = Control {
        started: run.started,
        session: link.session,
        channels: link.channels,
        generation: 0,
        recoveries: 0,
        paused: Duration::ZERO,
        bytes: 0,
        completed: Mutex::new(None),
    };
    let channels = LinkChannels { main, data, urgent };
    let result = std::thread::scope(|scope| {
        let faults: Vec<_> = (0..pc.missing.len())
            .map(|block| {
                let pc = &pc;
                std::thread::Builder::new()
                    .name(format!("migration-faults-{block}"))
                    .spawn_scoped(scope, move || pc.serve_faults(block))
                    .expect("spawning a fault thread")
            })
            .collect();
        let result = control.stream(&pc, channels, &happened, shared, options, accept, observer);
        pc.stop_faults.store(true, Ordering::Release);
        for thread in faults {
            let _ = thread.join();
        }
        result
    });
    run.received_bytes += control.bytes;
    let stats = pc.stats(&control);
    run.postcopy = Some(stats);
    let Postcopy { missing, .. } = pc;
    let (mut tx, mut rx) = match result {
        // Every page is held: no fault is served any more, and a page absent
        // now reads as zeros, which every page held but absent is.
        Ok(halves) => {
            drop(missing);
            halves
        }
        Err(err) => {
            // The guest must not run on with zeros where its pages belong: a
            // thread touching a missing page waits for good instead. (Pausing
            // it here could wait for good too: a vCPU blocked on a missing
            // page never stops.) What becomes of it is the VMM's call.
            missing.into_iter().for_each(MissingPages::keep_absent_pages_blocked);
            return Err(err);
        }
    };
    observer(&Event::Ready);
    let verified = compare_digests(&mut *rx, shared, options, observer).and_then(|verdict| {
        tx.send(&Message::Verdict(verdict.clone()))?;
        Ok((Some(verdict.is_verified()), verdict.mismatched))
    });
    run.received_bytes += rx.bytes_received() + tx.bytes_sent();
    verified
}

/// The switch: precopy receiving is over; drop every page not held, register
/// guest RAM for missing-page faults, apply the discard set, load the device
/// state, and wait for GO.
fn switch(
    main: &mut dyn Channel,
    agreed: bool,
    shared: &Shared,
    vm: &mut dyn Vm,
    options: &DestOptions,
) -> Result<Vec<MissingPages>, DestError> {
    if !agreed {
        return Err(DestError::Protocol(
            "the source switched to postcopy, which the handshake did not agree".into(),
        ));
    }
    shared.prefault.stop();
    if let Some(direct) = &shared.direct {
        direct.disable();
    }
    let placer = &shared.placer;
    let ram = placer.ram();
    let mut missing = Vec::with_capacity(ram.blocks().len());
    for (index, block) in ram.blocks().iter().enumerate() {
        let held = &placer.received()[index];
        // Registered first: no page can come back (say, a huge page
        // collapsed) between the drop and the registration.
        missing.push(MissingPages::register(Arc::clone(block.region()))?);
        discard_runs(block.region(), (0..block.pages()).filter(|&page| !held.get(page)))?;
    }
    main.set_timeout(Some(options.io_timeout))?;
    let mut device_state = None;
    loop {
        match main.recv()? {
            Message::Discard(map) => {
                let Some(block) = ram.blocks().get(map.block as usize) else {
                    return Err(DestError::Protocol(format!(
                        "discard for block {}, but only {} blocks were announced",
                        map.block,
                        ram.blocks().len()
                    )));
                };
                if map.first + u64::from(map.count) > block.pages() {
                    return Err(DestError::Protocol(format!(
                        "discard of pages {}..{} of block {} of {} pages",
                        map.first,
                        map.first + u64::from(map.count),
                        block.name(),
                        block.pages()
                    )));
                }
                let index = map.block as usize;
                discard_runs(block.region(), map.pages().filter(|&page| placer.forget(index, page)))?;
            }
            // The source runs until this side applied what it knew was stale.
            Message::Pausing => main.send(&Message::Prepared)?,
            Message::DeviceState(blob) if device_state.is_none() => device_state = Some(blob.to_vec()),
            Message::DeviceState(_) => return Err(DestError::Protocol("device state sent twice".into())),
            Message::Go => break,
            Message::Abort(reason) => return Err(DestError::Aborted(reason)),
            other => return Err(unexpected("discard, pausing, device-state or go", &other)),
        }
    }
    let device_state = device_state.ok_or_else(|| DestError::Protocol("go without device state".into()))?;
    vm.load_device_state(&device_state)?;
    Ok(missing)
}

/// Drops each run of the ascending `pages` from `region`, many runs per
/// system call.
fn discard_runs(region: &migration_sys::GuestRegion, pages: impl Iterator<Item = u64>) -> Result<(), DestError> {
    let page_size = migration_sys::PAGE_SIZE;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for page in pages {
        let offset = page as usize * page_size;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += page_size,
            _ => runs.push((offset, page_size)),
        }
    }
    region.discard_runs(&runs)?;
    Ok(())
}

impl Postcopy<'_> {
    /// A block's fault thread: maps held pages, asks for the others once.
    /// It never touches guest memory and takes no lock a guest thread holds.
    fn serve_faults(&self, block: usize) {
        let missing = &self.missing[block];
        let page_size = migration_sys::PAGE_SIZE;
        // A guest thread waits on every fault read here.
        let _ = migration_sys::thread::prefer_latency();
        while !self.stop_faults.load(Ordering::Acquire) {
            let offset = match missing.next_fault(Duration::from_millis(20)) {
                Ok(Some(offset)) => offset,
                Ok(None) => continue,
                Err(err) => {
                    let _ = self.events.send(Happened::FaultFailed(err));
                    return;
                }
            };
            let page = (offset / page_size) as u64;
            if self.placer.holds(block, page) {
                // Held yet absent: a zero page never written, or one placed
                // a moment ago (then this finds it present and wakes).
                let mapped = match missing.zero(offset, page_size) {
                    Ok(Placed::All) => Ok(()),
                    Ok(Placed::UpTo(_)) => missing.wake(offset, page_size),
                    Err(err) => Err(err),
                };
                if let Err(err) = mapped {
                    let _ = self.events.send(Happened::FaultFailed(err));
                    return;
                }
                continue;
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
            // Asked for once; and not at all when it landed meanwhile.
            if !self.requested[block].test_and_set(page) && !self.placer.holds(block, page) {
                let at = self.base.elapsed().as_nanos().max(1) as u64;
                self.requested_at[block][page as usize].store(at, Ordering::Relaxed);
                self.request(block, page);
            }
        }
    }

    /// Asks the source for a page, if the link is up (otherwise it is asked
    /// again when the link is resumed).
    fn request(&self, block: usize, page: u64) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = requests.as_mut() {
            let request = PageRequest {
                block: block as u32,
                page,
                count: 1,
            };
            if let Err(err) = tx.send(&Message::PageRequest(request)) {
                // The link is gone; the control loop takes over.
                let _ = self.events.send(Happened::RequestFailed(err));
            }
        }
    }

    /// Receives one channel's pages until its end of RAM.
    fn receive(&self, index: usize, rx: &mut dyn ChannelRx, urgent: bool) -> Result<(), DestError> {
        let on_channel = |source| DestError::OnChannel { index, source };
        // The background stream yields the CPU to the urgent path, which
        // runs as soon as it wakes (best effort both: at worst they compete
        // as equals).
        let _ = if urgent {
            rx.prefer_latency();
            migration_sys::thread::prefer_latency()
        } else {
            migration_sys::thread::lower_priority(migration_sys::thread::BACKGROUND_NICE)
        };
        // The urgent channel is quiet while the guest faults on nothing.
        rx.set_timeout((!urgent).then_some(self.io_timeout))
            .map_err(on_channel)?;
        loop {
            match rx.recv().map_err(on_channel)? {
                Message::Pages(batch) => {
                    if batch.epoch != self.epoch {
                        return Err(DestError::Protocol(format!(
                            "channel {index}: page batch of epoch {} in postcopy, epoch {}",
                            batch.epoch, self.epoch
                        )));
                    }
                    if !self.codecs.contains(batch.codec().feature()) {
                        return Err(DestError::Protocol(format!(
                            "channel {index}: a {:?} batch, a codec the handshake did not agree",
                            batch.codec()
                        )));
                    }
                    let block = batch.block as usize;
                    let Some(missing) = self.missing.get(block) else {
                        return Err(DestError::Protocol(format!(
                            "page batch for block {}, but only {} blocks were announced",
                            batch.block,
                            self.missing.len()
                        )));
                    };
                    self.placer
                        .place_missing(&batch, missing, &mut |page| self.placed(block, page, urgent))?;
                }
                Message::EndOfRam(end) if end.epochs == self.epoch + 1 => return Ok(()),
                Message::EndOfRam(end) => {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: end of RAM after {} epochs, postcopy is epoch {}",
                        end.epochs, self.epoch
                    )));
                }
                Message::Abort(reason) => return Err(DestError::Aborted(reason)),
                other => {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: unexpected {} in postcopy",
                        other.kind().name()
                    )));
                }
            }
        }
    }

    /// A page this side did not hold was placed.
    fn placed(&self, block: usize, page: u64, urgent: bool) {
        self.remaining.fetch_sub(1, Ordering::AcqRel);
        if urgent {
            self.requested_pages.fetch_add(1, Ordering::Relaxed);
        } else {
            self.streamed_pages.fetch_add(1, Ordering::Relaxed);
        }
        if self.requested[block].get(page) {
            let at = self.requested_at[block][page as usize].load(Ordering::Relaxed);
            let now = self.base.elapsed().as_nanos() as u64;
            if at > 0 {
                self.service.record(Duration::from_nanos(now.saturating_sub(at)));
            }
        }
    }

    /// Asks again for every page asked for and not held (after a resumed
    /// link: the old requests may be lost).
    fn request_again(&self) {
        for (block, requested) in self.requested.iter().enumerate() {
            let mut page = 0;
            while let Some(next) = requested.next_set(page) {
                if !self.placer.holds(block, next) {
                    self.request(block, next);
                }
                page = next + 1;
            }
        }
    }

    fn stats(&self, control: &Control) -> PostcopyStats {
        PostcopyStats {
            requested_pages: self.requested_pages.load(Ordering::Relaxed),
            streamed_pages: self.streamed_pages.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            service: self.service.summary(),
            recoveries: control.recoveries,
            paused: control.paused,
            completed: *control.completed.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// The control loop's own state.
struct Control {
    /// When the migration started.
    started: Instant,
    session: SessionId,
    channels: u16,
    /// Links resumed so far.
    generation: u32,
    recoveries: u64,
    paused: Duration,
    /// Wire bytes of links done with.
    bytes: u64,
    /// When every page was held, from the start.
    completed: Mutex<Option<Duration>>,
}

/// How one link's stretch of postcopy ended.
enum LinkEnd {
    /// Every channel ended its stream and every page is held: the main
    /// connection's halves, for the digest check.
    Done(ChannelHalves),
    /// The link broke.
    Lost(DestError),
}

impl Control {
    /// Runs links until every page is held and every channel ended, resuming
    /// lost ones.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &mut self,
        pc: &Postcopy<'_>,
        mut channels: LinkChannels,
        happened: &Receiver<Happened>,
        shared: &Shared,
        options: &DestOptions,
        accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<ChannelHalves, DestError> {
        let mut resumed_sent = false;
        loop {
            let (ready_sent, end) = self.run_link(pc, channels, happened, &mut resumed_sent, shared, observer);
            let err = match end {
                Ok(LinkEnd::Done(halves)) => return Ok(halves),
                Ok(LinkEnd::Lost(err)) => err,
                Err(fatal) => return Err(lost(fatal)),
            };
            let lost_at = Instant::now();
            observer(&Event::PostcopyPaused {
                reason: ErrorChain(&err).to_string(),
            });
            // Even with every page here (READY may not have reached the
            // source) the link is waited for: the source learns from the
            // resumed link that nothing is missing.
            channels = match self.resume(pc, accept, options, &err) {
                Ok(channels) => channels,
                // Every page is here: only the digest check is lost.
                Err(_) if ready_sent || pc.remaining.load(Ordering::Acquire) == 0 => return Err(err),
                Err(lost) => return Err(lost),
            };
            let after = lost_at.elapsed();
            self.recoveries += 1;
            self.paused += after;
            observer(&Event::PostcopyResumed { after });
        }
    }

    /// One link: a thread per channel, until the stream ends or the link
    /// breaks. Returns whether READY was sent, and how the link ended (an
    /// error: a failure no resumed link mends).
    #[allow(clippy::too_many_arguments)]
    fn run_link(
        &mut self,
        pc: &Postcopy<'_>,
        channels: LinkChannels,
        happened: &Receiver<Happened>,
        resumed_sent: &mut bool,
        shared: &Shared,
        observer: &mut dyn FnMut(&Event),
    ) -> (bool, Result<LinkEnd, DestError>) {
        let LinkChannels { main, data, urgent } = channels;
        let mut closers: Vec<Closer> = Vec::new();
        for c in std::iter::once(&main).chain(&data).chain(std::iter::once(&urgent)) {
            match c.closer() {
                Ok(close) => closers.push(close),
                Err(err) => return (false, Ok(LinkEnd::Lost(err.into()))),
            }
        }
        let (mut tx, main_rx) = match main.split() {
            Ok(halves) => halves,
            Err(err) => return (false, Ok(LinkEnd::Lost(err.into()))),
        };
        // The fault threads' page requests go out on it.
        tx.prefer_latency();
        *pc.requests.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let mut ready_sent = false;
        let send = |message: &Message<'_>| -> Result<(), TransportError> {
            match pc.requests.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                Some(tx) => tx.send(message),
                None => Err(TransportError::Closed),
            }
        };
        // RESUMED goes out on the first link only: a source that missed it
        // learns the guest runs here when this side accepts its resume.
        let first = if *resumed_sent {
            Ok(())
        } else {
            *resumed_sent = true;
            observer(&Event::Resumed);
            send(&Message::Resumed)
        };
        pc.request_again();
        let urgent_index = data.len() + 1;
        let outcome = std::thread::scope(|scope| {
            let mut threads = Vec::new();
            let mut spawn = |index: usize, mut rx: Box<dyn ChannelRx>, urgent: bool| {
                let thread = std::thread::Builder::new()
                    .name(format!("migration-postcopy-{index}"))
                    .spawn_scoped(scope, move || {
                        let result = pc.receive(index, rx.as_mut(), urgent);
                        let _ = pc.events.send(Happened::ChannelEnded { index, result });
                        rx
                    })
                    .expect("spawning a postcopy channel thread");
                threads.push(thread);
            };
            spawn(0, main_rx, false);
            for (i, c) in data.into_iter().enumerate() {
                spawn(i + 1, c, false);
            }
            spawn(urgent_index, urgent, true);
            let outcome = match first {
                Ok(()) => self.watch(pc, happened, threads.len(), &mut ready_sent, shared, &send, observer),
                Err(err) => Ok(Some(DestError::from(err))),
            };
            if let Err(fatal) = &outcome {
                // Tell the source why while the link still carries it.
                let _ = send(&Message::Error(migration_wire::PeerError {
                    code: fatal.code(),
                    message: ErrorChain(fatal).to_string(),
                }));
            }
            if !matches!(outcome, Ok(None)) {
                closers.iter().for_each(|close| close());
            }
            let rxs: Vec<Box<dyn ChannelRx>> = threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect();
            (outcome, rxs)
        });
        let (mut outcome, mut rxs) = outcome;
        // No request goes out on this link any more; then what the threads
        // reported after the verdict on it is drained (a fault thread that
        // failed stays a failure).
        let tx = pc.requests.lock().unwrap_or_else(|e| e.into_inner()).take();
        while let Ok(event) = happened.try_recv() {
            if let Happened::FaultFailed(err) = event {
                outcome = Err(DestError::Memory(err));
            }
        }
        self.bytes += rxs.iter().skip(1).map(|rx| rx.bytes_received()).sum::<u64>();
        let end = match (outcome, tx) {
            (Ok(None), Some(tx)) => Ok(LinkEnd::Done((tx, rxs.swap_remove(0)))),
            (Ok(None), None) => Ok(LinkEnd::Lost(TransportError::Closed.into())),
            (Ok(Some(err)), tx) => {
                self.bytes += rxs[0].bytes_received() + tx.map_or(0, |tx| tx.bytes_sent());
                Ok(LinkEnd::Lost(err))
            }
            (Err(fatal), tx) => {
                self.bytes += rxs[0].bytes_received() + tx.map_or(0, |tx| tx.bytes_sent());
                Err(fatal)
            }
        };
        (ready_sent, end)
    }

    /// Waits for the channels of one link: `Ok(None)` when every one ended
    /// its stream and every page is held, `Ok(Some(error))` when the link
    /// broke, `Err` when something no resumed link mends happened.
    #[allow(clippy::too_many_arguments)]
    fn watch(
        &self,
        pc: &Postcopy<'_>,
        happened: &Receiver<Happened>,
        threads: usize,
        ready_sent: &mut bool,
        shared: &Shared,
        send: &dyn Fn(&Message<'_>) -> Result<(), TransportError>,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<Option<DestError>, DestError> {
        let mut ended = 0;
        let mut last_placed = shared.placer.placed.load(Ordering::Relaxed);
        let mut last_progress = Instant::now();
        let mut next_report = Instant::now();
        loop {
            if !*ready_sent && pc.remaining.load(Ordering::Acquire) == 0 {
                if let Err(err) = send(&Message::Ready) {
                    return Ok(Some(err.into()));
                }
                *ready_sent = true;
                *self.completed.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.started.elapsed());
            }
            if *ready_sent && ended == threads {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= next_report {
                let mut stats = shared.placer.stats(self.started);
                stats.postcopy = Some(pc.stats(self));
                observer(&Event::Progress(stats));
                next_report = now + Duration::from_millis(200);
            }
            // Pages left yet none arrives, or every page here yet the streams
            // do not end: the link is as good as lost.
            let placed = shared.placer.placed.load(Ordering::Relaxed);
            if placed != last_placed {
                last_placed = placed;
                last_progress = now;
            } else if now - last_progress > pc.io_timeout {
                return Ok(Some(DestError::Transport(TransportError::TimedOut(pc.io_timeout))));
            }
            match happened.recv_timeout(TICK) {
                Ok(Happened::ChannelEnded { result: Ok(()), .. }) => {
                    ended += 1;
                    last_progress = Instant::now();
                }
                Ok(Happened::ChannelEnded {
                    result: Err(err),
                    index,
                }) => {
                    return match err {
                        DestError::OnChannel { .. } | DestError::Transport(_) => Ok(Some(err)),
                        other => {
                            let _ = index;
                            Err(other)
                        }
                    };
                }
                Ok(Happened::RequestFailed(err)) => return Ok(Some(err.into())),
                Ok(Happened::FaultFailed(err)) => return Err(DestError::Memory(err)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(DestError::OtherChannelFailed),
            }
        }
    }

    /// Waits for the source to resume the lost link: a new main connection
    /// with [`Message::Resume`], answered with the pages held, then every
    /// other channel. A new `Resume` starts over (the source retries when an
    /// attempt fails part way); gives up at the resume timeout.
    fn resume(
        &mut self,
        pc: &Postcopy<'_>,
        accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
        options: &DestOptions,
        cause: &DestError,
    ) -> Result<LinkChannels, DestError> {
        let deadline = Instant::now() + options.resume_timeout;
        // The main connection of the attempt under way, and its channels.
        let mut attempt: Option<Attempt> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DestError::StateLost(format!(
                    "the link to the source was lost ({}) and not resumed within {:?}",
                    ErrorChain(cause),
                    options.resume_timeout
                )));
            }
            let asked = Instant::now();
            let mut channel = match accept(left) {
                Ok(channel) => channel,
                Err(_) => {
                    // Bounded by `left`; an accept that fails at once (out
                    // of descriptors, say) is not retried in a busy loop.
                    if asked.elapsed() < Duration::from_millis(10) {
                        std::thread::sleep(Duration::from_millis(50).min(left));
                    }
                    continue;
                }
            };
            // What the connection is, by its first message.
            enum First {
                Resume(migration_wire::Resume),
                Hello(migration_wire::ChannelHello),
                Other(&'static str),
            }
            let first = channel.set_timeout(Some(options.io_timeout.min(left))).and_then(|()| {
                Ok(match channel.recv()? {
                    Message::Resume(resume) => First::Resume(resume),
                    Message::ChannelHello(hello) => First::Hello(hello),
                    other => First::Other(other.kind().name()),
                })
            });
            match first {
                Ok(First::Resume(resume)) if resume.session == self.session && resume.generation >= self.generation => {
                    if self.list_held(pc, channel.as_mut()).is_ok() {
                        self.generation = resume.generation;
                        let slots = (0..self.channels).map(|_| None).collect();
                        attempt = Some((channel, slots));
                    }
                }
                Ok(First::Hello(hello)) if attempt.is_some() => {
                    let (_, slots) = attempt.as_mut().expect("an attempt under way");
                    let _ = seat_channel(channel, hello, self.session, self.channels, slots);
                }
                Ok(First::Resume(_) | First::Hello(_)) => {
                    let err = DestError::Protocol(format!(
                        "not a resume of postcopy migration {:#x} (link {} or later)",
                        self.session.0, self.generation
                    ));
                    tell_peer(channel.as_mut(), &err);
                }
                Ok(First::Other(what)) => {
                    let err = DestError::Protocol(format!(
                        "{what} while waiting to resume postcopy migration {:#x}",
                        self.session.0
                    ));
                    tell_peer(channel.as_mut(), &err);
                }
                Err(_) => {}
            }
            if attempt
                .as_ref()
                .is_some_and(|(_, slots)| slots.iter().all(Option::is_some))
            {
                let (main, slots) = attempt.take().expect("an attempt under way");
                let mut joined: Vec<_> = slots.into_iter().flatten().collect();
                let urgent = joined.pop().expect("the urgent-page channel");
                return Ok(LinkChannels {
                    main,
                    data: joined,
                    urgent,
                });
            }
        }
    }

    /// Tells a resuming source which pages this side holds.
    fn list_held(&self, pc: &Postcopy<'_>, main: &mut dyn Channel) -> Result<(), TransportError> {
        for (block, held) in pc.placer.received().iter().enumerate() {
            let bytes = held.to_le_bytes();
            let mut first = 0;
            while first < held.len() {
                let count = BITMAP_CHUNK.min(held.len() - first);
                let bits = &bytes[(first / 8) as usize..(first + count).div_ceil(8) as usize];
                let map =
                    PageBitmap::new(block as u32, first, count as u32, bits).expect("a whole chunk of our own bitmap");
                main.send(&Message::ReceivedPages(map))?;
                first += count;
            }
        }
        main.send(&Message::ResumeAccepted)
    }
}

/// A resumption under way: its main connection, and a slot per other
/// channel.
type Attempt = (Box<dyn Channel>, Vec<Option<Box<dyn Channel>>>);

/// A failure no resumed link mends, after the guest ran here.
fn lost(err: DestError) -> DestError {
    match err {
        DestError::StateLost(_) => err,
        other => DestError::StateLost(ErrorChain(&other).to_string()),
    }
}
