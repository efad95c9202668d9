//! A writer thread: the guest's "vCPU". It rewrites its own pages, one whole page at a time,
//! at a paced rate, and parks at a page boundary when the guest pauses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use migration_sys::PAGE_SIZE;

use crate::content::fill_content;
use crate::memory::{Mode, Shared, UNKNOWN_GENERATION};
use crate::prng::WyRand;
use crate::spec::{GuestSpec, Pattern, owned_pages};
use crate::state::WriterState;
use crate::verify::PageChecker;

/// The longest a writer sleeps in one wait, so a stale deadline never strands it.
const MAX_NAP: Duration = Duration::from_secs(1);
/// How far behind schedule a writer may fall before it forgets the debt (no catch-up bursts).
const MAX_LAG: Duration = Duration::from_millis(50);

/// One writer's fixed configuration.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub(crate) index: usize,
    pub(crate) spec: GuestSpec,
    /// Pages of this writer within the pattern's range: `index + k * writers` for `k` below.
    pub(crate) owned: u64,
}

impl WriterConfig {
    pub(crate) fn new(index: usize, spec: &GuestSpec, pages: u64) -> Self {
        let owned = owned_pages(spec.pages_in_play(pages), index, spec.writers);
        Self {
            index,
            spec: spec.clone(),
            owned,
        }
    }

    fn page_of(&self, k: u64) -> u64 {
        self.index as u64 + k * self.spec.writers as u64
    }
}

/// The initial state of writer `index`.
pub(crate) fn initial_state(seed: u64, index: usize) -> WriterState {
    WriterState {
        position: 0,
        rng: crate::prng::mix64(seed ^ crate::prng::mix64(0x7772_6974_6572 + index as u64)),
    }
}

/// The next page a writer rewrites, advancing its state.
pub(crate) fn next_page(config: &WriterConfig, state: &mut WriterState) -> u64 {
    let k = match config.spec.pattern {
        Pattern::Sequential => {
            let k = state.position;
            state.position = (k + 1) % config.owned;
            k
        }
        Pattern::Uniform | Pattern::HotSet => {
            let mut rng = WyRand(state.rng);
            let k = rng.below(config.owned);
            state.rng = rng.0;
            k
        }
    };
    config.page_of(k)
}

/// Paces page writes to a rate, scaled down by the throttle.
#[derive(Debug)]
struct Pacer {
    /// Pages per second at no throttle.
    rate: f64,
    throttle: u8,
    start: Instant,
    pages: u64,
    /// Extra time owed to the throttle: the busy time times throttle / (100 - throttle).
    owed: Duration,
}

impl Pacer {
    fn new(spec: &GuestSpec) -> Self {
        Self {
            rate: spec.dirty_rate as f64 / spec.writers as f64 / PAGE_SIZE as f64,
            throttle: 0,
            start: Instant::now(),
            pages: 0,
            owed: Duration::ZERO,
        }
    }

    fn reset(&mut self, throttle: u8) {
        self.throttle = throttle;
        self.start = Instant::now();
        self.pages = 0;
        self.owed = Duration::ZERO;
    }

    fn effective_rate(&self) -> f64 {
        self.rate * f64::from(100 - self.throttle.min(99)) / 100.0
    }

    /// Pages to write before looking at the clock again (about 10 ms worth).
    fn batch(&self) -> u64 {
        ((self.effective_rate() / 100.0) as u64).clamp(1, 256)
    }

    /// How long to wait before the next batch, if the writer is ahead of its schedule.
    fn shortfall(&mut self) -> Option<Duration> {
        if self.effective_rate() <= 0.0 {
            return Some(MAX_NAP);
        }
        let ahead = Duration::try_from_secs_f64(self.pages as f64 / self.effective_rate())
            .unwrap_or(Duration::MAX)
            .saturating_add(self.owed);
        let Some(due) = self.start.checked_add(ahead) else {
            return Some(MAX_NAP);
        };
        let now = Instant::now();
        if now < due {
            return Some(due - now);
        }
        if now - due > MAX_LAG {
            self.reset(self.throttle);
        }
        None
    }

    fn record(&mut self, pages: u64, busy: Duration) {
        self.pages += pages;
        if self.throttle > 0 {
            let t = u32::from(self.throttle.min(99));
            self.owed = self.owed.saturating_add(busy * t / (100 - t));
        }
    }
}

/// The writer thread's body: runs until the guest stops. On a destination's first run,
/// `checker` verifies each page before the writer's first write to it (see [`crate::verify`]);
/// it is dropped once every page is verified.
pub(crate) fn run(shared: Arc<Shared>, config: WriterConfig, mut state: WriterState, mut checker: Option<PageChecker>) {
    let mut pacer = Pacer::new(&config.spec);
    let mut parked_epoch = u64::MAX;
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    loop {
        let mut control = shared.lock();
        control.writers[config.index] = state;
        let mut waited = false;
        loop {
            if control.mode == Mode::Stopping {
                return;
            }
            let runnable = control.mode == Mode::Running && control.throttle < 100 && config.owned > 0;
            if runnable {
                break;
            }
            if control.mode == Mode::Paused && parked_epoch != control.epoch {
                parked_epoch = control.epoch;
                control.parked += 1;
                shared.changed.notify_all();
            }
            control = shared.changed.wait(control).unwrap_or_else(|e| e.into_inner());
            waited = true;
        }
        if waited || control.throttle != pacer.throttle {
            pacer.reset(control.throttle);
        }
        if let Some(wait) = pacer.shortfall() {
            // Woken early by a pause or throttle change, or not: either way look again.
            drop(shared.changed.wait_timeout(control, wait.min(MAX_NAP)));
            continue;
        }
        drop(control);
        if checker.is_some() && shared.is_verified() {
            checker = None;
        }

        let started = Instant::now();
        let mut done = 0;
        while done < pacer.batch() && !shared.interrupt.load(Ordering::Acquire) {
            let page = next_page(&config, &mut state);
            if let Some(checker) = &mut checker {
                if !shared.check_before_write(page, checker) {
                    return; // The guest is being dropped.
                }
            }
            let slot = &shared.table[page as usize];
            let generation = match slot.load(Ordering::Relaxed) {
                g if g >= UNKNOWN_GENERATION - 1 => 1,
                g => g + 1,
            };
            fill_content(config.spec.seed, page, generation, config.spec.content, &mut buf);
            if let Err(e) = shared.write_page(page, &buf) {
                let mut control = shared.lock();
                control.failure = Some(format!("writer {} at page {page}: {e}", config.index));
                control.dead += 1;
                shared.changed.notify_all();
                return;
            }
            slot.store(generation, Ordering::Release);
            if checker.is_some() {
                // The first access, if the page's generation was unknown (nothing to read).
                shared.first_access.get_or_init(Instant::now);
            }
            shared.writes.fetch_add(1, Ordering::Relaxed);
            done += 1;
        }
        pacer.record(done, started.elapsed());
        shared.notify_progress();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_walks_owned_pages_in_order_and_wraps() {
        let spec = GuestSpec {
            pattern: Pattern::Sequential,
            writers: 3,
            ..GuestSpec::default()
        };
        let config = WriterConfig::new(1, &spec, 10);
        let mut state = initial_state(0, 1);
        let pages: Vec<u64> = (0..5).map(|_| next_page(&config, &mut state)).collect();
        assert_eq!(pages, [1, 4, 7, 1, 4]);
    }

    #[test]
    fn hot_set_stays_inside() {
        let spec = GuestSpec {
            pattern: Pattern::HotSet,
            hot_set: 5 * PAGE_SIZE as u64,
            writers: 2,
            ..GuestSpec::default()
        };
        for w in 0..2 {
            let config = WriterConfig::new(w, &spec, 100);
            let mut state = initial_state(3, w);
            for _ in 0..200 {
                let p = next_page(&config, &mut state);
                assert!(p < 5 && p as usize % 2 == w, "page {p}");
            }
        }
    }

    #[test]
    fn throttle_scales_the_rate() {
        let spec = GuestSpec {
            dirty_rate: 100 * PAGE_SIZE as u64 * 100,
            writers: 1,
            ..GuestSpec::default()
        };
        let mut pacer = Pacer::new(&spec);
        assert_eq!(pacer.batch(), 100);
        pacer.reset(50);
        assert_eq!(pacer.batch(), 50);
    }
}
