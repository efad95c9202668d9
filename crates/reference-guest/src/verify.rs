//! A destination's first run: every page is verified once, before its first write, by
//! whichever guest thread touches it first.
//!
//! With postcopy the guest runs before all its pages arrived, so a check that held the writers
//! back until it had read every page would hold them until the whole of RAM arrived. Instead
//! each page carries a claim:
//!
//! ```text
//!   UNCHECKED --claim (one thread wins)--> CHECKING --compared--> CHECKED
//! ```
//!
//! The `guest-check` thread walks all pages in order and checks each one it can claim. A writer
//! about to write an unchecked page claims and checks it first; if another thread holds the
//! claim, it waits for that check to end. No page is written before it is checked, so the
//! verdict still proves every page arrived intact, and no page is checked twice. The thread
//! finishing the last page publishes the verdict.
//!
//! The verifying read is each page's first access. If [`GuestRegion::resident`] says the page
//! is absent, the read waits for the page to arrive, and the thread times it into a
//! [`FaultLog`]. Once every page is checked the writers stop looking at the claims, so later
//! writes cost nothing extra.
//!
//! [`GuestRegion::resident`]: migration_sys::GuestRegion::resident

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use migration_sys::{PAGE_SIZE, SysError};

use crate::CheckReport;
use crate::content::{Content, fill_content};
use crate::faults::{BlockedClock, FaultLog};
use crate::memory::{Shared, UNKNOWN_GENERATION};
use crate::spec::GuestSpec;

const UNCHECKED: u8 = 0;
const CHECKING: u8 = 1;
const CHECKED: u8 = 2;

/// `first_mismatch` when no page mismatched.
const NO_MISMATCH: u64 = u64::MAX;

/// The outcome of checking one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its generation is unknown: nothing to compare with.
    Unknown,
    Intact,
    Mismatch,
}

/// The claims and the running tally of a destination's first-run check.
#[derive(Debug)]
pub(crate) struct Verification {
    /// One of [`UNCHECKED`], [`CHECKING`], [`CHECKED`] per global page.
    claims: Vec<AtomicU8>,
    /// Pages not yet [`CHECKED`]; the thread that takes it to zero publishes the report.
    remaining: AtomicU64,
    pages_checked: AtomicU64,
    pages_unknown: AtomicU64,
    mismatches: AtomicU64,
    /// The lowest mismatching global page, or [`NO_MISMATCH`].
    first_mismatch: AtomicU64,
    pub(crate) faults: FaultLog,
}

impl Verification {
    pub(crate) fn new(pages: u64) -> Self {
        Self {
            claims: (0..pages).map(|_| AtomicU8::new(UNCHECKED)).collect(),
            remaining: AtomicU64::new(pages),
            pages_checked: AtomicU64::new(0),
            pages_unknown: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            first_mismatch: AtomicU64::new(NO_MISMATCH),
            faults: FaultLog::new(),
        }
    }

    /// Whether every page is checked.
    pub(crate) fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Takes the claim on an unchecked `page`; false if another thread has or had it.
    fn try_claim(&self, page: u64) -> bool {
        self.claims[page as usize]
            .compare_exchange(UNCHECKED, CHECKING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    fn is_checked(&self, page: u64) -> bool {
        self.claims[page as usize].load(Ordering::Acquire) == CHECKED
    }

    /// Records the verdict on a claimed `page` and releases it as checked. True for the call
    /// that checked the last page.
    fn finish(&self, page: u64, verdict: Verdict) -> bool {
        if verdict == Verdict::Unknown {
            self.pages_unknown.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pages_checked.fetch_add(1, Ordering::Relaxed);
        }
        if verdict == Verdict::Mismatch {
            self.first_mismatch.fetch_min(page, Ordering::Relaxed);
            self.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        self.claims[page as usize].store(CHECKED, Ordering::Release);
        // AcqRel: the last decrement sees every tally above, from every thread.
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// One guest thread's means to check pages: scratch buffers and its fault clock.
#[derive(Debug)]
pub(crate) struct PageChecker {
    seed: u64,
    content: Content,
    clock: BlockedClock,
    actual: Box<[u8; PAGE_SIZE]>,
    expected: Box<[u8; PAGE_SIZE]>,
    resident: Vec<bool>,
}

impl PageChecker {
    pub(crate) fn new(spec: &GuestSpec, clock: BlockedClock) -> Self {
        Self {
            seed: spec.seed,
            content: spec.content,
            clock,
            actual: Box::new([0; PAGE_SIZE]),
            expected: Box::new([0; PAGE_SIZE]),
            resident: Vec::with_capacity(1),
        }
    }
}

impl Shared {
    /// The `guest-check` thread's walk: checks every page no writer claimed first. Stops early
    /// if the guest is dropped meanwhile.
    pub(crate) fn check_unclaimed(&self, checker: &mut PageChecker) {
        let Some(verification) = &self.verification else {
            return;
        };
        for page in 0..self.pages() {
            if page % 256 == 0 && self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if verification.try_claim(page) {
                self.check_claimed(verification, page, checker);
            }
        }
        // A guest without pages has nothing whose check would publish the verdict.
        if verification.is_done() {
            self.publish_verdict(verification);
        }
    }

    /// Makes sure `page` is checked before a writer writes it: checks it if nobody did, or
    /// waits for the thread checking it. False if the guest is being dropped meanwhile (the
    /// writer must then not write).
    pub(crate) fn check_before_write(&self, page: u64, checker: &mut PageChecker) -> bool {
        let Some(verification) = &self.verification else {
            return true;
        };
        if verification.is_checked(page) {
            return true;
        }
        if verification.try_claim(page) {
            self.check_claimed(verification, page, checker);
            return true;
        }
        // Another thread is checking it: one page, whose read waits at most for the page to
        // arrive (a fault round trip, ~100 us). Yielding keeps that thread's CPU free.
        while !verification.is_checked(page) {
            if self.stopping.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Whether the first-run check is over (or there is none): writers stop consulting it.
    pub(crate) fn is_verified(&self) -> bool {
        self.verification.as_ref().is_none_or(Verification::is_done)
    }

    /// Compares a page this thread claimed with what its generation says, then releases it.
    fn check_claimed(&self, verification: &Verification, page: u64, checker: &mut PageChecker) {
        // Nobody writes a page before it is checked, so its generation is the loaded one.
        let generation = self.table[page as usize].load(Ordering::Acquire);
        let verdict = if generation == UNKNOWN_GENERATION {
            Verdict::Unknown
        } else {
            fill_content(checker.seed, page, generation, checker.content, &mut checker.expected);
            let read = self.read_first(verification, page, checker);
            self.first_access.get_or_init(Instant::now);
            if read.is_ok() && checker.actual == checker.expected {
                Verdict::Intact
            } else {
                Verdict::Mismatch
            }
        };
        if verification.finish(page, verdict) {
            self.publish_verdict(verification);
        }
    }

    /// Reads `page` into the checker's buffer, timing the read if the page is absent (it
    /// waits for the page to arrive). A failed residency query times nothing.
    fn read_first(&self, verification: &Verification, page: u64, checker: &mut PageChecker) -> Result<(), SysError> {
        let absent = matches!(self.is_resident(page, &mut checker.resident), Ok(false));
        if !absent {
            return self.read_page(page, &mut checker.actual);
        }
        let started = Instant::now();
        let read = self.read_page(page, &mut checker.actual);
        verification.faults.record(&checker.clock, started.elapsed());
        read
    }

    /// Hands the verdict to [`crate::SyntheticGuest::wait_check`] (once).
    fn publish_verdict(&self, verification: &Verification) {
        let first = verification.first_mismatch.load(Ordering::Relaxed);
        let report = CheckReport {
            pages_checked: verification.pages_checked.load(Ordering::Relaxed),
            pages_unknown: verification.pages_unknown.load(Ordering::Relaxed),
            mismatches: verification.mismatches.load(Ordering::Relaxed),
            first_mismatch: (first != NO_MISMATCH).then(|| self.locate(first)),
        };
        let mut control = self.lock();
        control.report.get_or_insert(report);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use migration_sys::GuestRegion;

    use super::*;
    use crate::prng::WyRand;

    const WAIT: Duration = Duration::from_secs(10);

    fn spec() -> GuestSpec {
        GuestSpec {
            seed: 0xc1a1,
            ..GuestSpec::default()
        }
    }

    /// A destination over `blocks` of the given page counts, its RAM and table at generation 1
    /// except the pages in `unknown`, which are left unknown.
    fn destination(pages: &[usize], unknown: &[u64]) -> (Arc<Shared>, Vec<Arc<GuestRegion>>) {
        let blocks: Vec<_> = pages
            .iter()
            .map(|&n| Arc::new(GuestRegion::anonymous(n * PAGE_SIZE).unwrap()))
            .collect();
        let shared = Shared::destination(blocks.clone());
        let spec = spec();
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for page in (0..shared.pages()).filter(|p| !unknown.contains(p)) {
            fill_content(spec.seed, page, 1, spec.content, &mut buf);
            shared.write_page(page, &buf).unwrap();
            shared.table[page as usize].store(1, Ordering::Relaxed);
        }
        (Arc::new(shared), blocks)
    }

    fn checker(shared: &Shared, name: &str) -> PageChecker {
        let clock = shared.verification.as_ref().unwrap().faults.clock(name);
        PageChecker::new(&spec(), clock)
    }

    /// What a writer does to `page`: check it if need be, then write its next generation.
    fn write_next(shared: &Shared, page: u64, checker: &mut PageChecker) {
        assert!(shared.check_before_write(page, checker));
        let spec = spec();
        let slot = &shared.table[page as usize];
        let generation = slot.load(Ordering::Relaxed).wrapping_add(1);
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        fill_content(spec.seed, page, generation, spec.content, &mut buf);
        shared.write_page(page, &buf).unwrap();
        slot.store(generation, Ordering::Release);
    }

    fn verdict(shared: &Shared) -> Option<CheckReport> {
        shared.lock().report
    }

    #[test]
    fn checker_and_writers_racing_check_every_page_once() {
        let unknown = [3, 700];
        let (shared, _blocks) = destination(&[512, 1, 511], &unknown);
        let pages = shared.pages();
        std::thread::scope(|s| {
            let walk = s.spawn(|| shared.check_unclaimed(&mut checker(&shared, "guest-check")));
            for w in 0..3u64 {
                let shared = &shared;
                s.spawn(move || {
                    let mut checker = checker(shared, &format!("guest-writer-{w}"));
                    let mut rng = WyRand(w + 1);
                    // Writers own every third page, as in the guest; they race the walk.
                    for _ in 0..2000 {
                        let page = w + 3 * rng.below(pages / 3);
                        write_next(shared, page, &mut checker);
                    }
                });
            }
            walk.join().unwrap();
        });
        let verification = shared.verification.as_ref().unwrap();
        assert!(verification.is_done());
        assert!(verification.claims.iter().all(|c| c.load(Ordering::Relaxed) == CHECKED));
        // A page checked twice would count twice (and would have been rewritten in between,
        // so the second check would fail).
        let report = verdict(&shared).expect("a verdict once every page is checked");
        assert_eq!(
            report,
            CheckReport {
                pages_checked: pages - 2,
                pages_unknown: 2,
                mismatches: 0,
                first_mismatch: None,
            }
        );
    }

    #[test]
    fn a_corrupt_page_a_writer_reaches_first_is_a_mismatch() {
        let (shared, blocks) = destination(&[4, 4], &[]);
        blocks[1].fill(2 * PAGE_SIZE, PAGE_SIZE, 0xee).unwrap();
        let mut writer = checker(&shared, "guest-writer-0");
        write_next(&shared, 6, &mut writer);
        write_next(&shared, 6, &mut writer);
        assert_eq!(verdict(&shared), None, "a verdict before every page was checked");
        shared.check_unclaimed(&mut checker(&shared, "guest-check"));
        let report = verdict(&shared).expect("verdict");
        assert_eq!((report.pages_checked, report.mismatches), (8, 1), "{report}");
        assert_eq!(report.first_mismatch, Some((1, 2)));
        // The writer went on after its check: the page holds its latest write.
        let mut page = Box::new([0u8; PAGE_SIZE]);
        shared.read_page(6, &mut page).unwrap();
        assert_eq!(&*page, &crate::content(spec().seed, 6, 3, spec().content));
    }

    #[test]
    fn a_writer_waits_for_the_thread_checking_its_page() {
        let (shared, blocks) = destination(&[8], &[]);
        blocks[0].fill(5 * PAGE_SIZE, PAGE_SIZE, 0xee).unwrap();
        let verification = shared.verification.as_ref().unwrap();
        // Stand in for a checker whose read of page 5 waits for the page to arrive.
        assert!(verification.try_claim(5));
        let (wrote, written) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                write_next(&shared, 5, &mut checker(&shared, "guest-writer-0"));
                wrote.send(()).unwrap();
            });
            // Not a synchronisation: however slow the writer, it must not get past the claim.
            assert!(
                written.recv_timeout(Duration::from_millis(50)).is_err(),
                "wrote a claimed page"
            );
            let mut page = Box::new([0u8; PAGE_SIZE]);
            shared.read_page(5, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == 0xee), "the page changed under its check");
            assert!(!verification.finish(5, Verdict::Mismatch));
            written
                .recv_timeout(WAIT)
                .expect("the writer went on once the page was checked");
        });
        shared.check_unclaimed(&mut checker(&shared, "guest-check"));
        let report = verdict(&shared).expect("verdict");
        assert_eq!((report.pages_checked, report.mismatches), (8, 1), "{report}");
        assert_eq!(report.first_mismatch, Some((0, 5)));
    }

    #[test]
    fn checked_pages_and_source_guests_skip_the_claims() {
        let (shared, _blocks) = destination(&[2], &[]);
        let mut writer = checker(&shared, "guest-writer-0");
        assert!(!shared.is_verified());
        write_next(&shared, 0, &mut writer);
        write_next(&shared, 1, &mut writer);
        assert!(shared.is_verified());
        assert!(verdict(&shared).is_some_and(|r| r.is_ok() && r.pages_checked == 2));

        let source = Shared::source(vec![Arc::new(GuestRegion::anonymous(PAGE_SIZE).unwrap())]);
        assert!(source.verification.is_none() && source.is_verified());
    }
}
