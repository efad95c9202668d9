//! Statistics and events, shared by the source and the destination.

use crate::engine::SwitchoverReason;
use std::time::Duration;

/// A migration's figures at one moment. Values a side cannot know are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// Guest bytes sent or placed (pages × page size, zero pages included).
    pub ram_transferred: u64,
    /// Bytes on the wire.
    pub transferred_bytes: u64,
    /// Bytes on the wire per channel (source), main connection first.
    pub channel_bytes: Vec<u64>,
    /// Bytes of dirty pages still to send (source).
    pub remaining_bytes: Option<u64>,
    /// Pages that travelled as zero pages.
    pub zero_pages: u64,
    /// Pages that travelled with their bytes.
    pub plain_pages: u64,
    /// Bytes compression took off the plain pages' payload (source).
    pub compression_saved: u64,
    /// Passes over RAM completed.
    pub iterations: u64,
    /// Guest bytes dirtied per second (source).
    pub dirty_rate: Option<f64>,
    /// Guest RAM bytes per second measured in the last pass (source).
    pub bandwidth: Option<f64>,
    /// Downtime expected when switching over (source).
    pub expected_downtime: Option<Duration>,
    /// Downtime measured: source paused to destination running.
    pub downtime: Option<Duration>,
    /// Time since the first handshake byte.
    pub elapsed: Duration,
}

impl Stats {
    /// Wire bytes per second over the whole migration.
    pub fn throughput(&self) -> f64 {
        per_second(self.transferred_bytes, self.elapsed)
    }

    /// Guest RAM bytes per second over the whole migration.
    pub fn ram_rate(&self) -> f64 {
        per_second(self.ram_transferred, self.elapsed)
    }
}

fn per_second(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { bytes as f64 / secs } else { 0.0 }
}

/// Something that happened, with the figures at that moment.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake is done; pages start to flow.
    Started,
    /// Periodic progress.
    Progress(Stats),
    /// A pass over RAM ended.
    PassEnded {
        /// The epoch that ended.
        epoch: u64,
        /// Figures after the pass's dirty sync.
        stats: Stats,
    },
    /// The source decided to switch over.
    Switchover {
        /// Why.
        reason: SwitchoverReason,
        /// The downtime it expects.
        expected_downtime: Duration,
    },
    /// The source VM is paused.
    Paused,
    /// The destination placed everything and is ready.
    Ready,
    /// The source handed the VM over (sent GO).
    HandedOver,
    /// The VM runs on the destination.
    Resumed,
    /// Block digests were compared.
    Verified(bool),
    /// The source VM was resumed after a failure.
    SourceResumed,
    /// A connection that claimed to be an extra channel was refused.
    ChannelRefused {
        /// Its address.
        peer: String,
        /// Why.
        reason: String,
    },
}
