//! How fast a running guest dirties its memory, measured before migrating
//! it (as QEMU's `calc-dirty-rate`): the figures that tell whether precopy
//! will converge over a given link, and what to set (downtime limit,
//! postcopy, compression).
//!
//! The probe collects the dirty log every short interval. A page written
//! several times within one interval counts once, as it would be sent once,
//! so with a short interval the rate is the rate of page writes a pass must
//! keep up with; the pages written at least once over the whole window are
//! the hot set (a precopy pass never has more to resend than that).

use crate::bitmap::Bitmap;
use crate::dirty::{DirtyLog, DirtyLogError};
use crate::ram::Ram;
use std::time::{Duration, Instant};

/// What the probe measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DirtyRate {
    /// Pages dirtied per second (each page counted once per interval).
    pub pages_per_sec: f64,
    /// The same in bytes per second.
    pub bytes_per_sec: f64,
    /// Pages written at least once during the window.
    pub hot_set_pages: u64,
    /// The same in bytes.
    pub hot_set_bytes: u64,
    /// The window measured.
    pub window: Duration,
    /// Collections made.
    pub intervals: u64,
}

/// Measures for `window`, collecting `log` every `interval`. The log's
/// earlier content is dropped first (collected and not counted). Sleeps
/// between collections: the window is wall-clock time by definition.
pub fn measure_dirty_rate(
    ram: &Ram,
    log: &mut dyn DirtyLog,
    window: Duration,
    interval: Duration,
) -> Result<DirtyRate, DirtyLogError> {
    let interval = interval.max(Duration::from_millis(1));
    log.collect(&mut |_, _, _| {})?;
    let mut hot: Vec<Bitmap> = ram.blocks().iter().map(|b| Bitmap::new(b.pages())).collect();
    let page_sizes: Vec<u64> = ram.blocks().iter().map(|b| u64::from(b.page_size())).collect();
    let started = Instant::now();
    let (mut pages, mut bytes, mut intervals) = (0u64, 0u64, 0u64);
    loop {
        let elapsed = started.elapsed();
        if elapsed >= window {
            break;
        }
        std::thread::sleep(interval.min(window - elapsed));
        log.collect(&mut |block, first, count| {
            let index = block.0 as usize;
            if let Some(map) = hot.get_mut(index) {
                map.set_range(first, count);
                pages += count;
                bytes += count * page_sizes[index];
            }
        })?;
        intervals += 1;
    }
    let window = started.elapsed();
    let secs = window.as_secs_f64();
    let hot_set_pages = hot.iter().map(Bitmap::count_ones).sum();
    let hot_set_bytes = hot
        .iter()
        .zip(&page_sizes)
        .map(|(map, size)| map.count_ones() * size)
        .sum();
    Ok(DirtyRate {
        pages_per_sec: pages as f64 / secs,
        bytes_per_sec: bytes as f64 / secs,
        hot_set_pages,
        hot_set_bytes,
        window,
        intervals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SoftwareDirtyLog;
    use crate::ram::{BlockId, RamBlock};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_writer_of_known_pages_is_counted_once_per_interval_and_its_hot_set_whole() {
        let region = Arc::new(migration_sys::GuestRegion::anonymous(64 * 4096).unwrap());
        let ram = Ram::new(vec![RamBlock::new("ram", region)]);
        let log = SoftwareDirtyLog::new(&ram);
        let marker = log.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&stop);
        // Marks pages 0..8 over and over: at most 8 pages per interval, a hot
        // set of 8 pages.
        let writer = std::thread::spawn(move || {
            let mut page = 0;
            while !done.load(Ordering::Relaxed) {
                marker.mark(BlockId(0), page % 8, 1);
                page += 1;
                std::thread::yield_now();
            }
        });
        let mut log = log;
        let rate = measure_dirty_rate(&ram, &mut log, Duration::from_millis(50), Duration::from_millis(10)).unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(rate.hot_set_pages, 8, "{rate:?}");
        assert_eq!(rate.hot_set_bytes, 8 * 4096);
        assert!(rate.intervals >= 5, "{rate:?}");
        // At most 8 distinct pages per interval of at least 10 ms.
        assert!(rate.pages_per_sec <= 8.0 * rate.intervals as f64 / rate.window.as_secs_f64() + 1e-9);
        assert!(rate.pages_per_sec > 0.0);
        assert_eq!(rate.bytes_per_sec, rate.pages_per_sec * 4096.0);
    }
}
