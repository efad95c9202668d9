//! The receiving side of every channel: pages placed as they arrive, and
//! the epoch barrier that keeps an older copy of a page from landing after
//! a newer one sent on another channel.

use super::DestError;
use super::place::{PlaceWorker, Placer, Prefault, RamTargets};
use crate::transport::{Channel, TransportError};
use migration_wire::{Ack, Message};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// No channel applies a page of epoch k+1 before every channel has placed
/// all of its pages of epoch k.
pub(crate) struct EpochBarrier {
    channels: usize,
    state: Mutex<BarrierState>,
    moved: Condvar,
}

struct BarrierState {
    /// The epoch every channel is finishing.
    epoch: u64,
    /// Channels that finished it.
    arrived: usize,
    /// A channel failed: everyone stops.
    failed: bool,
}

impl EpochBarrier {
    pub(crate) fn new(channels: usize) -> Self {
        Self {
            channels,
            state: Mutex::new(BarrierState {
                epoch: 0,
                arrived: 0,
                failed: false,
            }),
            moved: Condvar::new(),
        }
    }

    /// Reports that this channel placed every page of `epoch`, and waits
    /// (at most `timeout`) until every channel did.
    pub(crate) fn arrive(&self, epoch: u64, timeout: Duration, progress: &dyn Fn() -> u64) -> Result<(), DestError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed {
            return Err(DestError::OtherChannelFailed);
        }
        if state.epoch != epoch {
            return Err(DestError::Protocol(format!(
                "channel finished epoch {epoch} while the others finish epoch {}",
                state.epoch
            )));
        }
        state.arrived += 1;
        if state.arrived == self.channels {
            state.epoch += 1;
            state.arrived = 0;
            self.moved.notify_all();
            return Ok(());
        }
        // Wait as long as the other channels make progress; only a
        // `timeout` without any is a failure (theirs, mostly, which their own
        // receive timeouts report first).
        let mut deadline = Instant::now() + timeout;
        let mut seen = progress();
        while state.epoch == epoch && !state.failed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let now = progress();
                if now == seen {
                    return Err(DestError::Transport(TransportError::TimedOut(timeout)));
                }
                seen = now;
                deadline = Instant::now() + timeout;
                continue;
            }
            state = self
                .moved
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if state.failed {
            Err(DestError::OtherChannelFailed)
        } else {
            Ok(())
        }
    }

    /// Wakes every waiting channel with a failure.
    pub(crate) fn fail(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
        self.moved.notify_all();
    }
}

/// What every channel's thread shares.
pub(crate) struct Shared {
    pub(crate) placer: Placer,
    pub(crate) barrier: EpochBarrier,
    pub(crate) prefault: Prefault,
    /// Where a transport may read page bytes straight into guest memory
    /// (`None`: every batch goes through the placement thread).
    pub(crate) direct: Option<std::sync::Arc<RamTargets>>,
    pub(crate) io_timeout: Duration,
    /// Compression codecs agreed in the handshake.
    pub(crate) codecs: migration_wire::Features,
    /// Whether pages may arrive as XBZRLE deltas (agreed in the handshake).
    pub(crate) deltas: bool,
}

/// How a channel's stream ended.
#[derive(Debug, Default)]
pub(crate) struct ChannelEnd {
    /// Epochs received.
    pub(crate) epochs: u64,
    /// The device state (main channel only).
    pub(crate) device_state: Option<Vec<u8>>,
    /// Precopy ended with the switch to postcopy, not with all of RAM.
    pub(crate) postcopy: bool,
}

impl ChannelEnd {
    pub(crate) fn kind(&self) -> &'static str {
        if self.postcopy { "postcopy-start" } else { "end-of-ram" }
    }
}

/// Receives one channel's pages and markers until its `EndOfRam`. The main
/// channel (index 0) also takes the device state and acknowledges every
/// epoch once all channels placed it.
pub(crate) fn receive(index: usize, channel: &mut dyn Channel, shared: &Shared) -> Result<ChannelEnd, DestError> {
    let worker = PlaceWorker::start();
    if let Some(direct) = &shared.direct {
        channel.place_directly(std::sync::Arc::clone(direct) as _);
    }
    let mut end = ChannelEnd::default();
    let mut epoch = 0u64;
    let mut pages_in_epoch = 0u64;
    // Every page batch and marker belongs to the epoch being received.
    let in_epoch = |what: &str, got: u64, epoch: u64| {
        if got == epoch {
            Ok(())
        } else {
            Err(DestError::Protocol(format!(
                "channel {index}: {what} {got} while receiving epoch {epoch}"
            )))
        }
    };
    loop {
        let mut placement = None;
        let mut ack = None;
        let message = channel
            .recv()
            .map_err(|source| DestError::OnChannel { index, source })?;
        match message {
            Message::Pages(batch) => {
                in_epoch("page batch of epoch", batch.epoch, epoch)?;
                if !shared.codecs.contains(batch.codec().feature()) {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: a {:?} batch, a codec the handshake did not agree",
                        batch.codec()
                    )));
                }
                placement = Some(shared.placer.plan(&batch)?);
                pages_in_epoch += batch.len() as u64;
                shared.prefault.advance(shared.placer.placed_bytes());
            }
            Message::Deltas(batch) => {
                if !shared.deltas {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: delta pages, which the handshake did not agree"
                    )));
                }
                in_epoch("delta batch of epoch", batch.epoch, epoch)?;
                placement = Some(shared.placer.plan_deltas(&batch)?);
                pages_in_epoch += batch.len() as u64;
            }
            Message::SyncMarker(marker) => {
                in_epoch("sync marker for epoch", marker.epoch, epoch)?;
                if marker.pages != pages_in_epoch {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: sync marker of epoch {} counts {} pages, {pages_in_epoch} arrived",
                        marker.epoch, marker.pages
                    )));
                }
                // This channel's share of the epoch is in guest RAM; wait
                // for the others before taking pages of the next epoch.
                worker.flush()?;
                shared
                    .barrier
                    .arrive(epoch, shared.io_timeout, &|| shared.placer.placed_bytes())?;
                if index == 0 {
                    ack = Some(Ack {
                        epoch,
                        pages: shared.placer.placed.load(std::sync::atomic::Ordering::Relaxed),
                        bytes: channel.bytes_received(),
                    });
                }
                epoch += 1;
                pages_in_epoch = 0;
            }
            Message::DeviceState(blob) if index == 0 => {
                if end.device_state.is_some() {
                    return Err(DestError::Protocol("device state sent twice".into()));
                }
                end.device_state = Some(blob.to_vec());
            }
            Message::PostcopyStart(start) => {
                if start.epochs != epoch || pages_in_epoch != 0 {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: postcopy starts after {} epochs, but {epoch} epochs were received",
                        start.epochs
                    )));
                }
                if end.device_state.is_some() {
                    return Err(DestError::Protocol("device state before the switch to postcopy".into()));
                }
                worker.flush()?;
                end.epochs = epoch;
                end.postcopy = true;
                return Ok(end);
            }
            Message::EndOfRam(eor) => {
                if eor.epochs != epoch || pages_in_epoch != 0 {
                    return Err(DestError::Protocol(format!(
                        "channel {index}: end of RAM after {} epochs, but {epoch} epochs were received",
                        eor.epochs
                    )));
                }
                worker.flush()?;
                end.epochs = epoch;
                return Ok(end);
            }
            Message::Abort(reason) => return Err(DestError::Aborted(reason)),
            other => {
                return Err(DestError::Protocol(format!(
                    "channel {index}: unexpected {} during the transfer",
                    other.kind().name()
                )));
            }
        }
        if let Some(placement) = placement.filter(|p| !p.is_empty()) {
            // The body moves to the placement thread; receive into a spare.
            let body = channel.take_body(worker.spare());
            worker.submit(placement, body)?;
        }
        if let Some(ack) = ack {
            channel.send(&Message::Ack(ack))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn barrier_releases_only_when_every_channel_arrived() {
        let barrier = Arc::new(EpochBarrier::new(2));
        let (tx, rx) = std::sync::mpsc::channel();
        let other = Arc::clone(&barrier);
        let waiter = std::thread::spawn(move || {
            let result = other.arrive(0, Duration::from_secs(30), &|| 0);
            tx.send(()).expect("send");
            result
        });
        // The first arrival waits: nothing is released yet.
        assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
        barrier
            .arrive(0, Duration::from_secs(30), &|| 0)
            .expect("second arrival releases");
        rx.recv_timeout(Duration::from_secs(30)).expect("released");
        waiter.join().expect("join").expect("ok");
        // The next epoch works the same way, and a wrong epoch is an error.
        assert!(barrier.arrive(0, Duration::from_secs(1), &|| 0).is_err());
    }

    #[test]
    fn a_waiting_channel_waits_on_while_the_others_make_progress() {
        let barrier = EpochBarrier::new(2);
        let ticks = std::sync::atomic::AtomicU64::new(0);
        // Progress for the first few checks, then none: the wait outlasts
        // several timeouts, then ends.
        let progress = || {
            let n = ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            n.min(4)
        };
        let err = barrier
            .arrive(0, Duration::from_millis(5), &progress)
            .expect_err("no progress at last");
        assert!(
            matches!(err, DestError::Transport(TransportError::TimedOut(_))),
            "{err}"
        );
        assert!(
            ticks.load(std::sync::atomic::Ordering::Relaxed) >= 5,
            "waited through the progress"
        );
    }

    #[test]
    fn failure_wakes_waiters_and_timeouts_are_bounded() {
        let barrier = Arc::new(EpochBarrier::new(3));
        let other = Arc::clone(&barrier);
        let waiter = std::thread::spawn(move || other.arrive(0, Duration::from_secs(30), &|| 0));
        barrier.fail();
        assert!(matches!(
            waiter.join().expect("join"),
            Err(DestError::OtherChannelFailed)
        ));
        let lonely = EpochBarrier::new(2);
        assert!(matches!(
            lonely.arrive(0, Duration::from_millis(10), &|| 0),
            Err(DestError::Transport(TransportError::TimedOut(_)))
        ));
    }
}
