//! The synthetic guest: its life cycle and the [`Vm`] control surface.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use migration_core::{Vm, VmError};
use migration_sys::GuestRegion;

use crate::faults::FaultStats;
use crate::memory::{Mode, Shared, UNKNOWN_GENERATION};
use crate::state::{DeviceState, StateError};
use crate::verify::PageChecker;
use crate::writer::{self, WriterConfig};
use crate::{GuestError, GuestSpec};

/// The verdict of comparing every page with what its generation says it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Pages whose content was known and compared.
    pub pages_checked: u64,
    /// Pages of unknown content (never populated nor rewritten), skipped.
    pub pages_unknown: u64,
    /// Compared pages that did not hold their expected content.
    pub mismatches: u64,
    /// The first mismatching page: (block index, page index within the block).
    pub first_mismatch: Option<(usize, u64)>,
}

impl CheckReport {
    /// Whether every known page held its expected content.
    pub fn is_ok(&self) -> bool {
        self.mismatches == 0
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pages checked, {} unknown, {} mismatches",
            self.pages_checked, self.pages_unknown, self.mismatches
        )?;
        if let Some((block, page)) = self.first_mismatch {
            write!(f, " (first at block {block} page {page})")?;
        }
        Ok(())
    }
}

/// A guest whose "vCPUs" are writer threads rewriting raw guest RAM with contents the guest
/// can recompute, so that after a migration it checks its own memory.
///
/// Each page's content is [`crate::content`] of its generation, which a private table (not
/// guest RAM) records; the table, the writers' positions and PRNG states travel as the
/// device state.
#[derive(Debug)]
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    spec: GuestSpec,
    /// A destination without its device state yet.
    awaiting_state: bool,
    started: bool,
    threads: Vec<JoinHandle<()>>,
}

impl SyntheticGuest {
    /// The source side over `blocks`. With `populate`, every page is written with its
    /// generation-0 content (over two threads); otherwise pages keep what they hold and are
    /// unknown until a writer rewrites them.
    pub fn new(blocks: Vec<Arc<GuestRegion>>, spec: GuestSpec, populate: bool) -> Result<Self, GuestError> {
        if let Some(problem) = spec.problem() {
            return Err(GuestError::InvalidSpec(problem));
        }
        let shared = Arc::new(Shared::source(blocks));
        let pages = shared.pages();
        if pages == 0 {
            return Err(GuestError::NoPages);
        }
        if populate {
            let half = pages / 2;
            thread::scope(|s| {
                let first = s.spawn(|| shared.populate(&spec, 0..half));
                let second = shared.populate(&spec, half..pages);
                let first = first.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                first.and(second)
            })?;
        }
        shared.lock().writers = (0..spec.writers).map(|w| writer::initial_state(spec.seed, w)).collect();
        Ok(Self {
            shared,
            spec,
            awaiting_state: false,
            started: false,
            threads: Vec::new(),
        })
    }

    /// The destination side: a paused guest over received RAM; its state arrives through
    /// [`Vm::load_device_state`], and [`Vm::resume`] runs it.
    ///
    /// Its first run verifies every page once, before the page's first write, so the guest may
    /// run before all its pages arrived (postcopy): a `guest-check` thread walks all pages, and
    /// a writer about to write a page nobody checked yet checks it itself first.
    pub fn destination(blocks: Vec<Arc<GuestRegion>>) -> Self {
        Self {
            shared: Arc::new(Shared::destination(blocks)),
            spec: GuestSpec::default(),
            awaiting_state: true,
            started: false,
            threads: Vec::new(),
        }
    }

    /// Starts the guest: the writer threads (none for an idle guest) and, on a destination,
    /// the self-check beside them. The guest is then running.
    pub fn start(&mut self) -> Result<(), GuestError> {
        if self.started {
            return Err(GuestError::AlreadyStarted);
        }
        if self.awaiting_state {
            return Err(GuestError::NoState);
        }
        self.started = true;
        let mut control = self.shared.lock();
        control.mode = Mode::Running;
        self.shared.interrupt.store(false, Ordering::Release);
        let writers = if self.spec.dirty_rate > 0 { self.spec.writers } else { 0 };
        let verification = self.shared.verification.as_ref();
        for index in 0..writers {
            let name = format!("guest-writer-{index}");
            let config = WriterConfig::new(index, &self.spec, self.shared.pages());
            let state = control.writers[index];
            let checker = verification.map(|v| PageChecker::new(&self.spec, v.faults.clock(&name)));
            let shared = Arc::clone(&self.shared);
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || writer::run(shared, config, state, checker))
                .map_err(GuestError::Spawn)?;
            self.threads.push(handle);
            control.threads += 1;
        }
        drop(control);
        if let Some(verification) = verification {
            let name = "guest-check";
            let mut checker = PageChecker::new(&self.spec, verification.faults.clock(name));
            let shared = Arc::clone(&self.shared);
            let handle = thread::Builder::new()
                .name(name.into())
                .spawn(move || shared.check_unclaimed(&mut checker))
                .map_err(GuestError::Spawn)?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// What the guest runs (on a destination, the spec its device state carried).
    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// Pages of guest RAM, across all blocks.
    pub fn page_count(&self) -> u64 {
        self.shared.pages()
    }

    /// The generation of a global page: `None` if its content is unknown or `page` is out of
    /// range. Exact only while the guest is paused.
    pub fn generation(&self, page: u64) -> Option<u32> {
        let slot = self.shared.table.get(usize::try_from(page).ok()?)?;
        Some(slot.load(Ordering::Acquire)).filter(|&g| g != UNKNOWN_GENERATION)
    }

    /// Total page writes completed so far (monotonic, across pause, resume and migration).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Waits until at least `at_least` page writes completed; false if `timeout` passed first.
    pub fn wait_writes(&self, at_least: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.writes() >= at_least {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match self.shared.progressed.wait_timeout(guard, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// When the guest first completed an access to its memory after it started (on a
    /// destination: the first page verified, by the self-check or by a writer).
    pub fn first_access(&self) -> Option<std::time::Instant> {
        self.shared.first_access.get().copied()
    }

    /// The destination's self-check verdict, waiting up to `timeout` for every page to be
    /// checked (by the `guest-check` thread or by the writer that reached it first).
    pub fn wait_check(&self, timeout: Duration) -> Option<CheckReport> {
        let control = self.shared.lock();
        let (control, _) = self
            .shared
            .changed
            .wait_timeout_while(control, timeout, |c| c.report.is_none())
            .unwrap_or_else(|e| e.into_inner());
        control.report
    }

    /// The waits of the guest's threads for pages that had not arrived yet: accesses that
    /// found their page absent (it had not arrived yet), timed by the guest thread from just
    /// before the access to its completion.
    ///
    /// Measured on a destination's first run, for each page's first access (the read that
    /// verifies it), until every page is verified; zeros on a source. Can be read at any time.
    pub fn fault_stats(&self) -> FaultStats {
        self.shared
            .verification
            .as_ref()
            .map(|v| v.faults.stats())
            .unwrap_or_default()
    }

    /// Checks every page now against the generation table. Meaningful only while paused: a
    /// running writer may be between a page and its table entry.
    pub fn check(&self) -> CheckReport {
        self.shared.check(&self.spec).unwrap_or_default()
    }

    fn is_running(&self) -> bool {
        self.started && self.shared.lock().mode == Mode::Running
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), GuestError> {
        if self.started {
            return Err(GuestError::AlreadyStarted);
        }
        let state = DeviceState::decode(bytes, self.shared.pages())?;
        for (slot, g) in self.shared.table.iter().zip(&state.generations) {
            slot.store(*g, Ordering::Relaxed);
        }
        self.shared.writes.store(state.writes, Ordering::Relaxed);
        let mut control = self.shared.lock();
        control.writers = state.writers;
        control.report = None;
        drop(control);
        self.spec = state.spec;
        self.awaiting_state = false;
        Ok(())
    }

    fn save(&self) -> Result<Vec<u8>, GuestError> {
        if self.is_running() {
            return Err(GuestError::Running);
        }
        if self.awaiting_state {
            return Err(GuestError::NoState);
        }
        let state = DeviceState {
            spec: self.spec.clone(),
            writers: self.shared.lock().writers.clone(),
            writes: self.writes(),
            generations: self.shared.table.iter().map(|g| g.load(Ordering::Acquire)).collect(),
        };
        Ok(state.encode())
    }
}

impl Vm for SyntheticGuest {
    fn pause(&mut self) -> Result<(), VmError> {
        let mut control = self.shared.lock();
        if control.mode != Mode::Running {
            return Ok(());
        }
        control.mode = Mode::Paused;
        control.epoch += 1;
        control.parked = 0;
        self.shared.interrupt.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        while control.parked + control.dead < control.threads {
            control = self.shared.changed.wait(control).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if !self.started {
            return Ok(self.start()?);
        }
        let mut control = self.shared.lock();
        if let Some(failure) = &control.failure {
            return Err(GuestError::WriterFailed(failure.clone()).into());
        }
        control.mode = Mode::Running;
        self.shared.interrupt.store(false, Ordering::Release);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(self.save()?)
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        Ok(self.load(state)?)
    }

    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.shared.lock().throttle = percent.min(100);
        self.shared.changed.notify_all();
        Ok(())
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        let mut control = self.shared.lock();
        control.mode = Mode::Stopping;
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.interrupt.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        drop(control);
        for handle in self.threads.drain(..) {
            // A writer that panicked has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

impl From<GuestError> for VmError {
    fn from(e: GuestError) -> Self {
        VmError::with_source("synthetic guest", e)
    }
}

impl From<StateError> for VmError {
    fn from(e: StateError) -> Self {
        GuestError::from(e).into()
    }
}
