//! Statistics and events, shared by the source and the destination.

use crate::engine::{PostcopyReason, SwitchoverReason};
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
    /// The CPU throttle auto-converge applied to the guest, in percent, 0
    /// once lifted (source; `None` without auto-converge).
    pub throttle_percent: Option<u8>,
    /// Downtime measured: from the source asking its VM to pause to the
    /// destination's word that its VM runs.
    pub downtime: Option<Duration>,
    /// Where the downtime went (source, precopy).
    pub downtime_parts: Option<DowntimeParts>,
    /// Time since the first handshake byte.
    pub elapsed: Duration,
    /// Figures of the postcopy phase, once it started.
    pub postcopy: Option<PostcopyStats>,
    /// XBZRLE figures, where deltas were agreed (source) or arrived
    /// (destination).
    pub xbzrle: Option<XbzrleStats>,
}

/// The parts of a precopy downtime, in order; they add up to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DowntimeParts {
    /// Pausing the VM (its vCPUs stopping).
    pub pause: Duration,
    /// Collecting the dirty log one last time.
    pub sync: Duration,
    /// Sending the last dirty pages and the device state until the
    /// destination reports everything placed (READY).
    pub transfer: Duration,
    /// GO to the destination's word that its VM runs.
    pub handover: Duration,
    /// Guest bytes of the last pass.
    pub final_bytes: u64,
}

/// How pages sent again fared against the XBZRLE cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XbzrleStats {
    /// Bytes of cache (source).
    pub cache_bytes: u64,
    /// Pages sent (source) or placed (destination) as deltas, unchanged
    /// pages included.
    pub pages: u64,
    /// Bytes of those deltas (source).
    pub bytes: u64,
    /// Pages found in the cache: sent as deltas, or whole when the delta
    /// was too long (source).
    pub cache_hits: u64,
    /// Pages not in the cache, sent whole (source).
    pub cache_misses: u64,
    /// Pages found in the cache whose delta was too long (source).
    pub overflows: u64,
}

/// Figures of a postcopy phase.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostcopyStats {
    /// Pages sent (source) or placed (destination) because the destination
    /// asked for them.
    pub requested_pages: u64,
    /// Pages sent (source) or placed (destination) by the background stream.
    pub streamed_pages: u64,
    /// Faults the destination's fault handler saw on pages not yet placed
    /// (destination).
    pub faults: u64,
    /// Time from the handler reading a fault to the page placed, the
    /// runtime's view of a fault (destination).
    pub service: Latency,
    /// Times the link was lost and resumed.
    pub recoveries: u64,
    /// Time spent with the link lost, waiting to resume it.
    pub paused: Duration,
    /// Time from the first handshake byte to the destination holding every
    /// page (the end of postcopy), once it does.
    pub completed: Option<Duration>,
}

/// A latency distribution: percentiles and maximum, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Longest.
    pub max_us: f64,
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
    /// Auto-converge set the source guest's CPU throttle (0: lifted, as
    /// it is when the migration ends).
    Throttled {
        /// Percent of the vCPUs' time taken away.
        percent: u8,
    },
    /// The VM refused a throttle; the migration goes on without it.
    ThrottleFailed {
        /// The throttle asked for.
        percent: u8,
        /// Why it failed.
        reason: String,
    },
    /// The source VM is paused.
    Paused,
    /// The source switches to postcopy.
    PostcopyStarting {
        /// Why.
        reason: PostcopyReason,
        /// Bytes of dirty pages left at the last sync.
        remaining: u64,
    },
    /// The link was lost in postcopy: both sides wait for it to be resumed
    /// (the destination's guest blocks on the pages it lacks).
    PostcopyPaused {
        /// What broke.
        reason: String,
    },
    /// The lost link was resumed.
    PostcopyResumed {
        /// How long it was lost.
        after: Duration,
    },
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

/// A latency histogram that threads record into at once, without locks:
/// one bucket per microsecond below 64 us, then 32 buckets per doubling (a
/// bucket's midpoint within about 1.6%, its edges within 3.1%, of what it
/// holds) up to 2^35 us (about 9.5 hours; longer ones land in the last
/// bucket). The maximum is exact.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[std::sync::atomic::AtomicU64]>,
    max_ns: std::sync::atomic::AtomicU64,
}

/// Latencies below this many microseconds get one bucket per microsecond.
const LINEAR_US: u64 = 64;
/// log2 of the buckets each doubling above [`LINEAR_US`] is split into.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Doublings covered above [`LINEAR_US`].
const DOUBLINGS: u64 = 29;
const BUCKETS: usize = (LINEAR_US + DOUBLINGS * SUB_BUCKETS) as usize;

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            max_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns / 1000)].fetch_add(1, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    /// Samples, the 50th and 99th percentiles (each its bucket's midpoint,
    /// never past the maximum) and the exact maximum. Taken while threads
    /// record, the figures may miss the latest samples, never mix them up.
    pub fn summary(&self) -> Latency {
        use std::sync::atomic::Ordering::Relaxed;
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let max_us = self.max_ns.load(Relaxed) as f64 / 1e3;
        if count == 0 {
            return Latency::default();
        }
        let at = |q: f64| percentile(&counts, count, q).min(max_us);
        Latency {
            count,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us,
        }
    }
}

/// The bucket of a latency of `us` microseconds.
fn bucket_of(us: u64) -> usize {
    if us < LINEAR_US {
        return us as usize;
    }
    // The doubling [2^k, 2^(k+1)) with k >= 6, split into SUB_BUCKETS equal parts.
    let k = u64::from(u64::BITS - 1 - us.leading_zeros());
    let sub = (us >> (k - u64::from(SUB_BUCKET_BITS))) - SUB_BUCKETS;
    let index = LINEAR_US + (k - LINEAR_US.trailing_zeros() as u64) * SUB_BUCKETS + sub;
    index.min(BUCKETS as u64 - 1) as usize
}

/// The lowest latency of bucket `index` and its width, in microseconds.
fn bucket_span(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR_US {
        return (index, 1);
    }
    let k = u64::from(LINEAR_US.trailing_zeros()) + (index - LINEAR_US) / SUB_BUCKETS;
    let sub = (index - LINEAR_US) % SUB_BUCKETS;
    let width = 1u64 << (k - u64::from(SUB_BUCKET_BITS));
    ((SUB_BUCKETS + sub) * width, width)
}

/// The midpoint of the bucket holding the sample of rank `ceil(q * total)`
/// (at least the first).
fn percentile(counts: &[u64], total: u64, q: f64) -> f64 {
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (index, &count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let (low, width) = bucket_span(index);
            return low as f64 + width as f64 / 2.0;
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        let mut next = 0;
        for index in 0..BUCKETS {
            let (low, width) = bucket_span(index);
            assert_eq!(low, next, "bucket {index}");
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(low + width - 1), index);
            if low >= LINEAR_US {
                assert!(width * 32 <= low, "bucket {index} spans {width} us from {low} us");
            } else {
                assert_eq!(width, 1);
            }
            next = low + width;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert!(next > 30 * 1_000_000, "the buckets end at {next} us");
    }

    #[test]
    fn small_latencies_are_exact_to_a_microsecond() {
        let histogram = Histogram::new();
        for n in 1..=100 {
            histogram.record(us(n));
        }
        let s = histogram.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 50.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 99.0).abs() <= 99.0 * 0.03, "{s:?}");
        assert_eq!(s.max_us, 100.0);
    }

    #[test]
    fn large_latencies_are_within_three_percent() {
        let histogram = Histogram::new();
        // 98 fast ones, then two slow ones: p99 is the first slow one.
        for _ in 0..98 {
            histogram.record(us(150));
        }
        histogram.record(Duration::from_millis(2_500));
        histogram.record(Duration::from_secs(20) + Duration::from_nanos(1_500));
        let s = histogram.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 150.0).abs() <= 150.0 * 0.03, "{s:?}");
        assert!((s.p99_us - 2.5e6).abs() <= 2.5e6 * 0.03, "{s:?}");
        assert_eq!(s.max_us, 20_000_001.5, "the maximum is exact");
    }

    #[test]
    fn percentiles_never_pass_the_maximum_and_an_empty_one_is_zero() {
        let histogram = Histogram::new();
        assert_eq!(histogram.summary(), Latency::default());
        histogram.record(Duration::from_nanos(100_200));
        let s = histogram.summary();
        assert_eq!((s.count, s.max_us), (1, 100.2));
        assert!(s.p50_us <= s.p99_us && s.p99_us <= s.max_us, "{s:?}");
        assert!(s.p50_us >= 100.2 * 0.97);
    }
}
