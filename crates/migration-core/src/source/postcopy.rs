//! The source's postcopy phase: the switch (discard set, device state, GO),
//! the background stream of the pages left while page requests jump the
//! queue on the urgent channel, and the resumption of a lost link.
//!
//! From GO on the VM runs on the destination with part of its memory and
//! this side holds the rest: neither can run it alone. A lost link is
//! therefore waited out (re-dialled until [`SourceOptions::resume_timeout`]),
//! never answered by resuming the VM here.

use super::threads::PendingPages;
use super::{Job, Link, Returned, SourceError, SourceRun, Verification, device_state, pause_vm};
use crate::bitmap::Bitmap;
use crate::dirty::DirtyLog;
use crate::engine::PrecopyEngine;
use crate::error_chain::ErrorChain;
use crate::stats::{Event, PostcopyStats};
use crate::transport::{Channel, TransportError};
use crate::vm::Vm;
use crossbeam_channel::bounded;
use migration_wire::{EndOfRam, MAX_BITMAP_PAGES, Message, PostcopyStart, Resume};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Most rounds of discards sent while the guest still runs (each waits for
/// the destination to apply them).
const PREPARE_ROUNDS: u32 = 3;

/// Fewer pages than this gone stale in a round: the pause may come.
const SMALL_DISCARD: u64 = 4096;

/// Pages per discard message: 64 KiB of bits.
const DISCARD_CHUNK: u64 = 1 << 19;

/// How a stretch of the postcopy stream ended.
enum Interrupted {
    /// The link broke: wait for it to be resumed.
    LinkLost(SourceError),
    /// Something no reconnection fixes.
    Fatal(SourceError),
}

impl SourceRun<'_> {
    /// Figures of the postcopy phase, once it started.
    pub(super) fn postcopy_stats(&self) -> Option<PostcopyStats> {
        let mut stats = self.postcopy.clone()?;
        if let Some(pending) = &self.postcopy_pages {
            stats.requested_pages = pending.requested.load(Ordering::Relaxed);
        }
        Some(stats)
    }

    /// Discard messages for the pages of `pages` (one bitmap per block) not
    /// in `already` (sent before).
    fn send_discards(&mut self, link: &Link, pages: &[Bitmap], already: Option<&[Bitmap]>) -> Result<(), SourceError> {
        for (block, map) in pages.iter().enumerate() {
            let new;
            let map = match already.and_then(|a| a.get(block)) {
                Some(sent) => {
                    let mut fresh = map.clone();
                    fresh.clear_from(sent);
                    new = fresh;
                    &new
                }
                None => map,
            };
            for (first, count, bits) in bitmap_chunks(map) {
                let job = Job::Discard {
                    block: block as u32,
                    first,
                    count,
                    bits,
                };
                self.submit(link, 0, job)?;
            }
        }
        Ok(())
    }

    fn pending(&self) -> Arc<PendingPages> {
        Arc::clone(self.postcopy_pages.as_ref().expect("postcopy was agreed"))
    }

    /// The switch and the whole postcopy phase, up to the digest check.
    /// `engine` decided the switch; the VM still runs.
    pub(super) fn postcopy(
        &mut self,
        link: &mut Link,
        mut engine: PrecopyEngine,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
        vm: &mut dyn Vm,
        dirty_log: &mut dyn DirtyLog,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<Verification, SourceError> {
        let epochs = self.ended.map_or(0, |epoch| epoch + 1);
        self.engine_stats.iterations = epochs;
        self.postcopy = Some(PostcopyStats::default());
        // Postcopy places whole pages (a resumed link's threads too).
        self.xbzrle = false;

        // While the guest still runs: precopy ends on every data channel, and
        // the destination drops the pages known stale now and prepares its
        // memory. Only what the guest dirties meanwhile is left for the pause.
        for channel in 0..link.data {
            self.submit(
                link,
                channel,
                Job::Control(Message::PostcopyStart(PostcopyStart { epochs })),
            )?;
            self.submit(link, channel, Job::Background)?;
        }
        // Each round the destination drops what went stale, the guest
        // dirties less (in less time); the last round is left to the pause.
        let mut stale: Vec<Bitmap> = engine.dirty().to_vec();
        self.send_discards(link, &stale, None)?;
        self.pausing_sent = true;
        for round in 1.. {
            self.submit(link, 0, Job::Control(Message::Pausing))?;
            self.wait_for(link, "prepared (for postcopy)", |m| matches!(m, Returned::Prepared))?;
            if round == PREPARE_ROUNDS {
                break;
            }
            dirty_log.collect(&mut |block, first, count| engine.handle_dirty(block, first, count))?;
            let fresh: u64 = engine
                .dirty()
                .iter()
                .zip(&stale)
                .map(|(now, before)| {
                    let mut fresh = now.clone();
                    fresh.clear_from(before);
                    fresh.count_ones()
                })
                .sum();
            if fresh == 0 {
                break;
            }
            self.send_discards(link, engine.dirty(), Some(&stale))?;
            stale = engine.dirty().to_vec();
            if fresh < SMALL_DISCARD {
                break;
            }
        }

        self.pause_attempted = true;
        let paused = pause_vm(vm)?;
        self.paused_at = Some(paused.at());
        observer(&Event::Paused);
        dirty_log.collect(&mut |block, first, count| engine.handle_dirty(block, first, count))?;
        let left = engine.handle_postcopy_paused(&paused);
        self.send_discards(link, &left, Some(&stale))?;
        let pending = self.pending();
        pending.epoch.store(epochs, Ordering::Release);
        for (map, left) in pending.blocks.iter().zip(&left) {
            map.store(left, false);
        }
        let state = device_state(vm)?;
        self.submit(link, 0, Job::DeviceState(state))?;
        // Requests may come as soon as the guest runs there, and READY as
        // soon as the destination holds every page: in postcopy the stream
        // of what precopy did not send starts now.
        pending.active.store(true, Ordering::Release);
        self.stream_ended = true;
        let mut generation = 0;
        if let Err(err) = self.hand_over(link, observer) {
            let SourceError::HandoverUnconfirmed(why) = err else {
                return Err(err);
            };
            // GO went out, the answer did not come back. A destination that
            // runs the guest waits for the link to be resumed; one that does
            // not never accepts it, and then nobody knows.
            generation += 1;
            let cause = SourceError::Transport(TransportError::invalid_data("handing over", why.clone()));
            match self.resume_lost_link(link, &cause, generation, connect, observer) {
                Ok(()) => {
                    self.downtime = self.paused_at.map(|at| at.elapsed());
                    self.handover = Some(self.started.elapsed());
                    observer(&Event::Resumed);
                }
                Err(SourceError::StateLost(lost)) => {
                    return Err(SourceError::HandoverUnconfirmed(format!(
                        "{why}; not resumed either: {lost}"
                    )));
                }
                Err(other) => return Err(other),
            }
        }

        loop {
            match self.stream(link, &pending, epochs, observer) {
                Ok(()) => break,
                Err(Interrupted::Fatal(err)) => return Err(lost(&err)),
                Err(Interrupted::LinkLost(err)) => {
                    generation += 1;
                    self.resume_lost_link(link, &err, generation, connect, observer)?;
                }
            }
        }
        Ok(self.verify(link, observer))
    }

    /// Streams every page still pending on the data channels (page requests
    /// are served meanwhile by the return-path reader and the urgent
    /// channel), ends the stream, and waits until the destination holds
    /// every page.
    fn stream(
        &mut self,
        link: &Link,
        pending: &PendingPages,
        epochs: u64,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(), Interrupted> {
        let mut next_progress = Instant::now();
        let batch = u64::from(
            self.options
                .precopy
                .batch_pages
                .clamp(1, migration_wire::MAX_PAGES_PER_BATCH),
        );
        for (block, map) in pending.blocks.iter().enumerate() {
            let mut page = 0;
            while let Some((first, count)) = map.take_run(page, batch) {
                page = first + count;
                let run = crate::engine::PageRun::contiguous(crate::ram::BlockId(block as u32), first, count, epochs);
                let channel = link.next_data();
                self.submit(link, channel, Job::Pages(run)).map_err(classify)?;
                if let Some(stats) = &mut self.postcopy {
                    stats.streamed_pages += count;
                }
                if Instant::now() >= next_progress {
                    observer(&Event::Progress(self.stats()));
                    next_progress = Instant::now() + self.options.progress_interval;
                }
            }
        }
        let end = EndOfRam { epochs: epochs + 1 };
        let mut waits = Vec::with_capacity(link.data);
        for channel in 0..link.data {
            self.submit(link, channel, Job::Control(Message::EndOfRam(end)))
                .map_err(classify)?;
            let (done, wait) = bounded(1);
            self.submit(link, channel, Job::Flush(done)).map_err(classify)?;
            waits.push(wait);
        }
        for wait in &waits {
            self.wait_local(link, wait).map_err(classify)?;
        }
        // The pages in flight, and the ones the destination still asks for,
        // arrive; then it says it holds them all.
        self.wait_for(link, "ready (every page placed)", |m| matches!(m, Returned::Ready))
            .map_err(classify)?;
        let completed = self.started.elapsed();
        if let Some(stats) = &mut self.postcopy {
            stats.completed = Some(completed);
        }
        if let Some(urgent) = &link.urgent {
            let _ = urgent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(&Message::EndOfRam(end));
        }
        Ok(())
    }

    /// Waits out a lost link: closes what is left of it, re-dials until the
    /// destination accepts a [`Resume`] or the resume timeout passes, and
    /// marks every page the destination lacks as pending again.
    fn resume_lost_link(
        &mut self,
        link: &mut Link,
        cause: &SourceError,
        generation: u32,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<(), SourceError> {
        let lost_at = Instant::now();
        let reason = ErrorChain(cause).to_string();
        observer(&Event::PostcopyPaused { reason: reason.clone() });
        // The old threads stop: queued pages are dropped (the destination's
        // list of what it holds decides what goes again).
        self.abandon.store(true, Ordering::Release);
        link.closers.iter().for_each(|close| close());
        let old = std::mem::replace(link, empty_link());
        if old.close() {
            return Err(SourceError::Protocol("a channel thread panicked".into()));
        }
        self.abandon.store(false, Ordering::Release);

        let deadline = lost_at + self.options.resume_timeout;
        let mut last_error = reason;
        loop {
            if Instant::now() >= deadline {
                return Err(SourceError::StateLost(format!(
                    "the link to the destination was lost and could not be resumed within {:?} (last: {last_error})",
                    self.options.resume_timeout
                )));
            }
            match self.resume_link(generation, deadline, connect) {
                Ok(new) => {
                    *link = new;
                    break;
                }
                // Whatever went wrong (the destination may have been between
                // two attempts, and said so), try again until the deadline.
                Err(err) => {
                    last_error = ErrorChain(&err).to_string();
                    // Pace the attempts; the destination may need a moment
                    // to notice the loss and listen again.
                    std::thread::sleep(Duration::from_millis(100).min(deadline - Instant::now().min(deadline)));
                }
            }
        }
        let after = lost_at.elapsed();
        if let Some(stats) = &mut self.postcopy {
            stats.recoveries += 1;
            stats.paused += after;
        }
        observer(&Event::PostcopyResumed { after });
        Ok(())
    }

    /// One attempt at a new link: the main connection with [`Resume`], the
    /// destination's list of the pages it holds, then every other channel.
    fn resume_link(
        &mut self,
        generation: u32,
        deadline: Instant,
        connect: &mut dyn FnMut(u16, Duration) -> Result<Box<dyn Channel>, TransportError>,
    ) -> Result<Link, SourceError> {
        let wait = self
            .options
            .reply_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let mut main = connect(0, wait)?;
        main.set_timeout(Some(self.options.reply_timeout))?;
        main.send(&Message::Resume(Resume {
            session: self.options.session,
            generation,
        }))?;
        let mut held: Vec<Bitmap> = self.ram.blocks().iter().map(|b| Bitmap::new(b.pages())).collect();
        loop {
            if Instant::now() >= deadline {
                return Err(SourceError::Timeout {
                    what: "the list of the pages the destination holds",
                    timeout: self.options.resume_timeout,
                });
            }
            match main.recv()? {
                Message::ReceivedPages(map) => {
                    let Some(block) = held.get_mut(map.block as usize) else {
                        return Err(SourceError::Protocol(format!(
                            "the destination listed pages of block {}, which does not exist",
                            map.block
                        )));
                    };
                    if map.first + u64::from(map.count) > block.len() {
                        return Err(SourceError::Protocol(format!(
                            "the destination listed pages {}..{} of block {} of {} pages",
                            map.first,
                            map.first + u64::from(map.count),
                            map.block,
                            block.len()
                        )));
                    }
                    for page in map.pages() {
                        block.set(page);
                    }
                }
                Message::ResumeAccepted => break,
                Message::Error(err) => return Err(SourceError::Peer(err)),
                other => return Err(super::unexpected("received-pages", &other)),
            }
        }
        let extra = self.open_extra_channels(connect)?;
        // Whatever the destination does not hold goes again.
        let pending = self.pending();
        for (map, held) in pending.blocks.iter().zip(&held) {
            map.store(held, true);
        }
        let link = self.start_link(std::iter::once(main).chain(extra).collect())?;
        for jobs in &link.jobs[..link.data] {
            let _ = jobs.send(Job::Background);
        }
        Ok(link)
    }
}

/// Whether a failure in the postcopy stream is a lost link (waited out) or
/// final.
fn classify(err: SourceError) -> Interrupted {
    match err {
        SourceError::Transport(_) | SourceError::Timeout { .. } => Interrupted::LinkLost(err),
        other => Interrupted::Fatal(other),
    }
}

fn lost(err: &SourceError) -> SourceError {
    match err {
        SourceError::StateLost(reason) => SourceError::StateLost(reason.clone()),
        other => SourceError::StateLost(ErrorChain(other).to_string()),
    }
}

/// A link with no channels, in place of one being replaced.
fn empty_link() -> Link {
    Link {
        jobs: Vec::new(),
        channel_error: Vec::new(),
        closers: Vec::new(),
        returned: crossbeam_channel::never(),
        next: std::cell::Cell::new(0),
        data: 1,
        threads: Vec::new(),
        urgent: None,
    }
}

/// A block's bitmap as discard messages: (first page, pages, bits), the
/// chunks covering the block, each a multiple of 8 pages but the last.
/// Chunks with no bit set are left out.
fn bitmap_chunks(map: &Bitmap) -> Vec<(u64, u32, Vec<u8>)> {
    let chunk = DISCARD_CHUNK.min(u64::from(MAX_BITMAP_PAGES));
    let mut out = Vec::new();
    let mut first = 0;
    while first < map.len() {
        let count = chunk.min(map.len() - first);
        let mut bits = vec![0u8; count.div_ceil(8) as usize];
        let mut any = false;
        for i in 0..count {
            if map.get(first + i) {
                bits[(i / 8) as usize] |= 1 << (i % 8);
                any = true;
            }
        }
        if any {
            out.push((first, count as u32, bits));
        }
        first += count;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_chunks_cover_the_set_bits_only() {
        let mut map = Bitmap::new(DISCARD_CHUNK * 2 + 5);
        map.set(3);
        map.set(DISCARD_CHUNK * 2 + 4);
        let chunks = bitmap_chunks(&map);
        assert_eq!(chunks.len(), 2, "the empty middle chunk is left out");
        let pages: Vec<u64> = chunks
            .iter()
            .flat_map(|(first, count, bits)| {
                migration_wire::PageBitmap::new(0, *first, *count, bits)
                    .unwrap()
                    .pages()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(pages, [3, DISCARD_CHUNK * 2 + 4]);
    }
}
