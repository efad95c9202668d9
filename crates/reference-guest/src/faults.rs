//! Timing of the guest's waits for pages that had not arrived yet (postcopy faults), measured
//! in the guest thread that waited: the migration runtime only sees when it placed a page,
//! not how long the guest stood still for it.

use migration_core::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the guest's threads measured of their waits for absent pages.
///
/// Counted are accesses that found their page absent (it had not arrived yet), timed by the
/// guest thread from just before the access to its completion; on a destination's first run
/// that is the read verifying a page, the first access of each page. A page that arrived
/// between the residency query and the read counts too, with a short latency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultStats {
    /// Accesses that found their page absent.
    pub faults: u64,
    /// Median latency of those accesses, in microseconds (from a log-linear histogram: exact to
    /// 1 us below 64 us, within about 3% above).
    pub p50_us: f64,
    /// 99th percentile latency, in microseconds (same histogram).
    pub p99_us: f64,
    /// The longest latency, in microseconds (exact).
    pub max_us: f64,
    /// Per guest thread (by name: `guest-writer-0`, `guest-check`, ...), the sum of its
    /// latencies: how long it stood still waiting for pages.
    pub blocked: Vec<(String, Duration)>,
}

/// The time one guest thread spent waiting for absent pages, in nanoseconds. The thread adds
/// to it; [`FaultLog::stats`] reads it.
#[derive(Debug)]
pub(crate) struct BlockedClock(Arc<AtomicU64>);

/// The faults of all the guest's threads: one shared histogram and a clock per thread.
#[derive(Debug)]
pub(crate) struct FaultLog {
    histogram: Histogram,
    /// Every thread's clock, in the order the threads were started. Locked only to add a
    /// thread and to read the clocks, never on a fault.
    threads: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl FaultLog {
    pub(crate) fn new() -> Self {
        Self {
            histogram: Histogram::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// A clock for the thread named `name`, listed in [`FaultStats::blocked`] from now on.
    pub(crate) fn clock(&self, name: &str) -> BlockedClock {
        let nanos = Arc::new(AtomicU64::new(0));
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.push((name.to_owned(), Arc::clone(&nanos)));
        BlockedClock(nanos)
    }

    /// One access that found its page absent and took `latency`, in the thread of `clock`.
    pub(crate) fn record(&self, clock: &BlockedClock, latency: Duration) {
        self.histogram.record(latency);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        clock.0.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> FaultStats {
        let latency = self.histogram.summary();
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let blocked = threads
            .iter()
            .map(|(name, ns)| (name.clone(), Duration::from_nanos(ns.load(Ordering::Relaxed))))
            .collect();
        FaultStats {
            faults: latency.count,
            p50_us: latency.p50_us,
            p99_us: latency.p99_us,
            max_us: latency.max_us,
            blocked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn empty_log_reports_zeros_and_every_thread() {
        let log = FaultLog::new();
        let check = log.clock("guest-check");
        let writer = log.clock("guest-writer-0");
        assert_eq!(log.stats().faults, 0);
        assert_eq!(log.stats().p99_us, 0.0);
        log.record(&writer, us(40));
        log.record(&writer, us(60));
        log.record(&check, us(7));
        let stats = log.stats();
        assert_eq!(stats.faults, 3);
        assert_eq!(stats.max_us, 60.0);
        assert_eq!(
            stats.blocked,
            [
                ("guest-check".to_owned(), us(7)),
                ("guest-writer-0".to_owned(), us(100))
            ]
        );
    }
}
