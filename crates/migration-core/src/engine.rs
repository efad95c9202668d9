//! The precopy engine: a sans-IO state machine that decides which pages go
//! out next, when a pass ends, and when to switch over.
//!
//! It never reads a clock, a socket or guest memory. Inputs arrive through
//! `handle_*` (dirty pages, progress of the channel threads, the end of a
//! dirty-log sync, the VM paused) with the current time; work comes out of
//! [`PrecopyEngine::poll`]. A test drives it step by step with injected time.
//!
//! # Phases
//!
//! ```text
//!            +--------------------------------------------+
//!            v                                            |
//!  Sending(epoch) --EndEpoch--> Syncing --sync done--> decide
//!                                                 |        |
//!                                  limit met or   |        +-- not converged,
//!                                  policy forces  v            within limits
//!                                          PausePending --Pause--> AwaitPaused
//!                                                                      |
//!                                                          handle_paused(SourcePaused)
//!                                                                      v
//!                        Done <--Finish-- FinalSending(last epoch) <---+
//!  decide --limits reached, policy fails--> Failed
//! ```
//!
//! With [`PrecopyConfig::auto_converge`], a sync that starts another pass
//! may also decide to slow the guest: [`Action::Throttle`] then comes before
//! the pass's first page, and the phase stays `Sending` (see
//! [`auto_converge`]).

pub mod auto_converge;

use crate::bitmap::Bitmap;
use crate::ram::{BlockId, Ram};
pub use auto_converge::AutoConverge;
use auto_converge::Throttler;
use std::time::{Duration, Instant};

/// What to do when precopy has not converged within its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAction {
    /// Switch over anyway, accepting a longer downtime.
    Switchover,
    /// Give up: the migration fails and the source keeps running.
    Fail,
}

/// Tunables of the precopy engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecopyConfig {
    /// The downtime not to exceed. The engine switches over once the
    /// expected downtime is within half of it, or within
    /// [`SWITCHOVER_MARGIN`] of it when passes stop shrinking the dirty set.
    pub downtime_limit: Duration,
    /// Passes after which [`PrecopyConfig::on_limit`] applies (`None`: no limit).
    pub max_iterations: Option<u64>,
    /// Time after which [`PrecopyConfig::on_limit`] applies (`None`: no limit).
    pub max_time: Option<Duration>,
    /// What happens when a limit is reached first.
    pub on_limit: LimitAction,
    /// Cap on wire bytes per second before the switchover (`None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// Most pages handed out in one run.
    pub batch_pages: u32,
    /// When precopy hands over to postcopy (`None`: never; precopy switches
    /// over or fails as [`PrecopyConfig::on_limit`] says).
    pub postcopy: Option<PostcopyWhen>,
    /// Slow the guest's vCPUs while it dirties memory faster than precopy
    /// sends it (`None`: never).
    pub auto_converge: Option<AutoConverge>,
}

/// When the engine switches to postcopy, if it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyWhen {
    /// When precopy will not converge: after a pass the guest dirtied memory
    /// at least as fast as it was sent, or a pass left more to send than the
    /// one before, or a limit was reached.
    NotConverging,
    /// After this many passes (0: at once, before any page is sent), or
    /// earlier where precopy would not converge.
    AfterPasses(u64),
}

/// Why the engine switched to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyReason {
    /// The guest dirties memory faster than precopy sends it.
    NotConverging,
    /// The configured number of passes ran.
    Passes,
    /// An iteration or time limit was reached.
    Limit,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_iterations: Some(30),
            max_time: None,
            on_limit: LimitAction::Switchover,
            max_bandwidth: None,
            batch_pages: 256,
            postcopy: None,
            auto_converge: None,
        }
    }
}

/// A run of pages of one block to send; their dirty bits are already clear.
/// It spans `count` pages from `first`; a sparse run (of dirty pages
/// scattered in the block) holds only the pages its list names, so
/// scattered pages still travel in full batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRun {
    /// The block.
    pub block: BlockId,
    /// First page index in the block (always one of the run's pages).
    pub first: u64,
    /// Pages spanned, from `first`.
    pub count: u64,
    /// The epoch the pages belong to.
    pub epoch: u64,
    /// `None`: every page of the span. `Some(pages)`: only those.
    pub sparse: Option<Box<SparsePages>>,
}

/// The share of the downtime limit an expected downtime may take when
/// passes no longer shrink the dirty set (see [`PrecopyEngine::handle_sync_done`]).
pub const SWITCHOVER_MARGIN: f64 = 0.8;

/// A pass that leaves less than this share of what the one before left is
/// still shrinking the dirty set.
const SHRINKING: f64 = 0.8;

/// Most pages a sparse run names.
pub const SPARSE_PAGES: usize = 256;

/// The pages of a sparse run: offsets from its first page, increasing,
/// the first of them 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SparsePages {
    len: u16,
    offsets: [u32; SPARSE_PAGES],
}

impl SparsePages {
    fn new() -> Self {
        Self {
            len: 0,
            offsets: [0; SPARSE_PAGES],
        }
    }

    /// Adds an offset past the last one; false when full.
    fn push(&mut self, offset: u32) -> bool {
        if usize::from(self.len) == SPARSE_PAGES {
            return false;
        }
        self.offsets[usize::from(self.len)] = offset;
        self.len += 1;
        true
    }

    /// The offsets, in order.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for SparsePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pages at {:?}", self.len, self.offsets())
    }
}

impl PageRun {
    /// Every page from `first` to `first + count - 1`.
    pub fn contiguous(block: BlockId, first: u64, count: u64, epoch: u64) -> Self {
        Self {
            block,
            first,
            count,
            epoch,
            sparse: None,
        }
    }

    /// Whether `page` is one of the run's pages.
    pub fn includes(&self, page: u64) -> bool {
        if page < self.first || page >= self.first + self.count {
            return false;
        }
        match &self.sparse {
            None => true,
            Some(pages) => pages.offsets().binary_search(&((page - self.first) as u32)).is_ok(),
        }
    }

    /// Number of pages in the run.
    pub fn len(&self) -> u64 {
        match &self.sparse {
            None => self.count,
            Some(pages) => pages.len.into(),
        }
    }

    /// Whether the run holds no page.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The run's pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let (span, listed) = match &self.sparse {
            None => (self.count, &[][..]),
            Some(pages) => (0, pages.offsets()),
        };
        (self.first..self.first + span).chain(listed.iter().map(|&o| self.first + u64::from(o)))
    }

    /// The run's pages that `keep` accepts, as a run, if any. `keep` must
    /// accept a range of a contiguous run, or any pages of a sparse one (a
    /// list holds at most [`SPARSE_PAGES`]).
    pub fn filter(&self, keep: impl Fn(u64) -> bool) -> Option<PageRun> {
        let mut pages = self.pages().filter(|&p| keep(p));
        let first = pages.next()?;
        let mut list = SparsePages::new();
        list.push(0);
        let (mut last, mut contiguous) = (first, true);
        for page in pages {
            contiguous &= page == last + 1;
            last = page;
            let listed = list.push((page - first) as u32);
            // Never drop a page: only a contiguous result may outgrow the list.
            assert!(listed || contiguous, "a sparse run of more than {SPARSE_PAGES} pages");
        }
        let count = last - first + 1;
        Some(if contiguous {
            PageRun::contiguous(self.block, first, count, self.epoch)
        } else {
            PageRun {
                first,
                count,
                sparse: Some(Box::new(list)),
                ..self.clone()
            }
        })
    }
}

/// Why precopy gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvergenceError {
    /// The iteration limit was reached and the policy says fail.
    #[error(
        "precopy did not converge in {iterations} passes (expected downtime {expected_ms} ms, limit {limit_ms} ms)"
    )]
    Iterations {
        /// Passes completed.
        iterations: u64,
        /// Expected downtime at the last pass.
        expected_ms: u64,
        /// The configured limit.
        limit_ms: u64,
    },
    /// The time limit was reached and the policy says fail.
    #[error("precopy did not converge in {elapsed_ms} ms (expected downtime {expected_ms} ms, limit {limit_ms} ms)")]
    Timeout {
        /// Time since the start.
        elapsed_ms: u64,
        /// Expected downtime at the last pass.
        expected_ms: u64,
        /// The configured limit.
        limit_ms: u64,
    },
}

/// Why the engine switched over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The expected downtime fits the limit.
    Converged,
    /// The iteration limit was reached and the policy forces the switchover.
    IterationLimit,
    /// The time limit was reached and the policy forces the switchover.
    TimeLimit,
}

/// The next piece of work for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read and send these pages.
    Send(PageRun),
    /// Every page of `epoch` was handed out: flush the channels and send the
    /// epoch's sync marker.
    EndEpoch {
        /// The epoch that ends.
        epoch: u64,
    },
    /// Collect the dirty log, report it with [`PrecopyEngine::handle_dirty`],
    /// then call [`PrecopyEngine::handle_sync_done`].
    SyncDirtyLog,
    /// Pause the VM, collect the dirty log one last time, then call
    /// [`PrecopyEngine::handle_paused`].
    Pause {
        /// Downtime the engine expects.
        expected_downtime: Duration,
        /// Why now.
        reason: SwitchoverReason,
    },
    /// All RAM is sent: send the device state and end the stream.
    Finish,
    /// Switch to postcopy: pause the VM, collect the dirty log one last
    /// time, report it with [`PrecopyEngine::handle_dirty`], then take the
    /// pages left with [`PrecopyEngine::handle_postcopy_paused`].
    Postcopy {
        /// Why now.
        reason: PostcopyReason,
        /// Bytes of dirty pages left at the last sync (before the pause).
        remaining: u64,
    },
    /// Auto-converge: set the VM's CPU throttle to `percent` (see
    /// [`crate::vm::Vm::throttle`]), then poll again. Best effort: a VM
    /// that cannot throttle migrates on unthrottled. The runtime lifts the
    /// throttle when the migration ends, however it ends.
    Throttle {
        /// Percent of the vCPUs' time taken away, 1 to 99.
        percent: u8,
    },
    /// Precopy gave up; resume the VM and abort.
    Fail(ConvergenceError),
    /// Nothing to do until an input arrives, or until the given time.
    Wait(Option<Instant>),
}

/// Proof that the source VM is paused: only [`crate::source::pause_vm`]
/// mints one, and the engine's final pass requires it.
#[derive(Debug)]
pub struct SourcePaused {
    pub(crate) at: Instant,
}

impl SourcePaused {
    /// When the VM was paused.
    pub fn at(&self) -> Instant {
        self.at
    }
}

/// The engine's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handing out the dirty pages of a pass.
    Sending,
    /// The pass ended; waiting for the dirty-log sync.
    Syncing,
    /// Decided to switch over; the runtime must pause the VM.
    PausePending,
    /// Waiting for the runtime to report the VM paused.
    AwaitPaused,
    /// Handing out the last dirty pages, VM paused.
    FinalSending,
    /// The final epoch ended; the runtime finishes the stream.
    Finishing,
    /// Nothing left to do.
    Done,
    /// Gave up.
    Failed,
    /// Decided to switch to postcopy; the runtime must pause the VM.
    PostcopyPending,
    /// Waiting for the runtime to report the VM paused for postcopy.
    AwaitPostcopyPaused,
    /// Precopy is over; the pages left went to the postcopy runtime.
    Postcopy,
}

impl Phase {
    /// The table of allowed transitions.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Sending, Syncing)
                | (Syncing, Sending | PausePending | Failed)
                | (PausePending, AwaitPaused)
                | (AwaitPaused, FinalSending)
                | (FinalSending, Finishing)
                | (Finishing, Done)
                | (Syncing, PostcopyPending)
                | (PostcopyPending, AwaitPostcopyPaused)
                | (AwaitPostcopyPaused, Postcopy)
        )
    }
}

/// Estimates the engine keeps, for stats and decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimates {
    /// Passes completed.
    pub iterations: u64,
    /// Guest RAM bytes per second sent in the last pass.
    pub bandwidth: f64,
    /// Guest bytes dirtied per second since the previous sync.
    pub dirty_rate: f64,
    /// Bytes of dirty pages left at the last sync.
    pub remaining_at_sync: u64,
    /// Downtime expected from the last sync.
    pub expected_downtime: Option<Duration>,
    /// Bytes of dirty pages left at the sync before the last one.
    pub remaining_before: Option<u64>,
    /// What a switchover costs besides sending pages (the last dirty-log
    /// sync, the round trips to READY and to the destination running), as
    /// the runtime measured it ([`PrecopyEngine::handle_overhead`]).
    pub overhead: Duration,
    /// The CPU throttle auto-converge decided last (0: none).
    pub throttle_percent: u8,
}

/// The precopy state machine.
#[derive(Debug)]
pub struct PrecopyEngine {
    config: PrecopyConfig,
    dirty: Vec<Bitmap>,
    page_sizes: Vec<u64>,
    phase: Phase,
    epoch: u64,
    cursor: (usize, u64),
    started: Instant,
    pass_started: Instant,
    pass_ram_start: u64,
    last_sync: Instant,
    dirtied_since_sync: u64,
    reported_ram: u64,
    reported_wire: u64,
    emitted_ram: u64,
    estimates: Estimates,
    pending: Option<Action>,
    throttler: Option<Throttler>,
}

impl PrecopyEngine {
    /// An engine for `ram`, every page dirty (the bulk pass), starting at `now`.
    pub fn new(ram: &Ram, config: PrecopyConfig, now: Instant) -> Self {
        Self::with_pages(
            ram.blocks()
                .iter()
                .map(|b| (b.pages(), u64::from(b.page_size())))
                .collect(),
            config,
            now,
        )
    }

    /// An engine over blocks of `(pages, page size)`, for tests and for VMMs
    /// that keep their own RAM model.
    pub fn with_pages(blocks: Vec<(u64, u64)>, mut config: PrecopyConfig, now: Instant) -> Self {
        // A run becomes one page packet: keep it within what the wire carries.
        config.batch_pages = config.batch_pages.clamp(1, migration_wire::MAX_PAGES_PER_BATCH);
        let mut engine = Self {
            throttler: config.auto_converge.map(Throttler::new),
            dirty: blocks.iter().map(|&(pages, _)| Bitmap::full(pages)).collect(),
            page_sizes: blocks.iter().map(|&(_, size)| size).collect(),
            config,
            phase: Phase::Sending,
            epoch: 0,
            cursor: (0, 0),
            started: now,
            pass_started: now,
            pass_ram_start: 0,
            last_sync: now,
            dirtied_since_sync: 0,
            reported_ram: 0,
            reported_wire: 0,
            emitted_ram: 0,
            estimates: Estimates::default(),
            pending: None,
        };
        if engine.config.postcopy == Some(PostcopyWhen::AfterPasses(0)) {
            // Postcopy at once: the engine starts deciding it, and nothing
            // goes out before the switch.
            engine.phase = Phase::PostcopyPending;
            engine.pending = Some(Action::Postcopy {
                reason: PostcopyReason::Passes,
                remaining: engine.remaining_bytes(),
            });
        }
        engine
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The epoch being sent.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The configuration.
    pub fn config(&self) -> &PrecopyConfig {
        &self.config
    }

    /// The latest estimates.
    pub fn estimates(&self) -> Estimates {
        self.estimates
    }

    /// Bytes of pages still marked dirty (not yet handed out).
    pub fn remaining_bytes(&self) -> u64 {
        self.dirty
            .iter()
            .zip(&self.page_sizes)
            .map(|(map, size)| map.count_ones() * size)
            .sum()
    }

    fn become_(&mut self, next: Phase) {
        debug_assert!(self.phase.can_become(next), "{:?} -> {:?}", self.phase, next);
        self.phase = next;
    }

    /// Marks pages written since the last sync. Runs outside the block are
    /// clamped; a sync only sets bits, never clears them.
    pub fn handle_dirty(&mut self, block: BlockId, first: u64, count: u64) {
        if let Some(map) = self.dirty.get_mut(block.0 as usize) {
            map.set_range(first, count);
            self.dirtied_since_sync += count * self.page_sizes[block.0 as usize];
        }
    }

    /// Cumulative guest bytes and wire bytes the channels have sent.
    pub fn handle_progress(&mut self, ram_bytes: u64, wire_bytes: u64) {
        self.reported_ram = self.reported_ram.max(ram_bytes);
        self.reported_wire = self.reported_wire.max(wire_bytes);
    }

    /// What a switchover costs besides sending pages, as measured: it is
    /// added to every expected downtime from the next sync on.
    pub fn handle_overhead(&mut self, overhead: Duration) {
        self.estimates.overhead = overhead;
    }

    /// The dirty log was collected after a pass: estimate and decide.
    pub fn handle_sync_done(&mut self, now: Instant) {
        if self.phase != Phase::Syncing {
            return;
        }
        let pass_time = now.saturating_duration_since(self.pass_started).as_secs_f64();
        let pass_ram = self.reported_ram.saturating_sub(self.pass_ram_start);
        if pass_ram > 0 && pass_time > 0.0 {
            self.estimates.bandwidth = pass_ram as f64 / pass_time;
        }
        let since_sync = now.saturating_duration_since(self.last_sync).as_secs_f64();
        if since_sync > 0.0 {
            self.estimates.dirty_rate = self.dirtied_since_sync as f64 / since_sync;
        }
        let dirtied = std::mem::take(&mut self.dirtied_since_sync);
        self.last_sync = now;
        self.estimates.iterations += 1;
        let remaining = self.remaining_bytes();
        self.estimates.remaining_before = (self.estimates.iterations > 1).then_some(self.estimates.remaining_at_sync);
        self.estimates.remaining_at_sync = remaining;
        let overhead = self.estimates.overhead;
        let expected = if remaining == 0 {
            Some(overhead)
        } else if self.estimates.bandwidth > 0.0 {
            Some(overhead + Duration::from_secs_f64(remaining as f64 / self.estimates.bandwidth))
        } else {
            None
        };
        self.estimates.expected_downtime = expected;
        let expected_or_max = expected.unwrap_or(Duration::MAX);

        if self.converged(expected_or_max, remaining) {
            return self.switch_over(expected_or_max, SwitchoverReason::Converged);
        }
        let limit_ms = self.config.downtime_limit.as_millis() as u64;
        let expected_ms = expected.map_or(u64::MAX, |d| d.as_millis() as u64);
        let elapsed = now.saturating_duration_since(self.started);
        let hit = if self
            .config
            .max_iterations
            .is_some_and(|max| self.estimates.iterations >= max)
        {
            Some((
                SwitchoverReason::IterationLimit,
                ConvergenceError::Iterations {
                    iterations: self.estimates.iterations,
                    expected_ms,
                    limit_ms,
                },
            ))
        } else if self.config.max_time.is_some_and(|max| elapsed >= max) {
            Some((
                SwitchoverReason::TimeLimit,
                ConvergenceError::Timeout {
                    elapsed_ms: elapsed.as_millis() as u64,
                    expected_ms,
                    limit_ms,
                },
            ))
        } else {
            None
        };
        if let Some(when) = self.config.postcopy {
            let passes_done = matches!(when, PostcopyWhen::AfterPasses(n) if self.estimates.iterations >= n);
            let reason = if hit.is_some() {
                Some(PostcopyReason::Limit)
            } else if self.is_not_converging() {
                Some(PostcopyReason::NotConverging)
            } else if passes_done {
                Some(PostcopyReason::Passes)
            } else {
                None
            };
            if let Some(reason) = reason {
                return self.start_postcopy(reason, remaining);
            }
        }
        match (hit, self.config.on_limit) {
            (Some((reason, _)), LimitAction::Switchover) => self.switch_over(expected_or_max, reason),
            (Some((_, error)), LimitAction::Fail) => {
                self.become_(Phase::Failed);
                self.pending = Some(Action::Fail(error));
            }
            (None, _) => {
                self.become_(Phase::Sending);
                self.start_pass(now);
                self.decide_throttle(now, dirtied, pass_ram);
            }
        }
    }

    /// Whether to switch over now. An estimate is only an estimate (the
    /// last pages travel faster or slower than the pass before them), so
    /// the engine aims below the limit: at once when the expected downtime
    /// is within half of it; within [`SWITCHOVER_MARGIN`] of it only once
    /// passes stop shrinking the dirty set (another pass would not buy a
    /// shorter downtime).
    fn converged(&self, expected: Duration, remaining: u64) -> bool {
        let limit = self.config.downtime_limit;
        if remaining == 0 || expected <= limit / 2 {
            return true;
        }
        // After the bulk pass nothing says yet how passes shrink: try one.
        let shrinking = self
            .estimates
            .remaining_before
            .is_none_or(|before| (remaining as f64) < before as f64 * SHRINKING);
        expected <= limit.mul_f64(SWITCHOVER_MARGIN) && !shrinking
    }

    /// Whether the last pass shows precopy cannot converge: the guest
    /// dirtied memory at least as fast as the pass sent it, or this pass
    /// left no less than 90% of what the one before left (a guest that
    /// rewrites all of its memory in every pass looks like that: its dirty
    /// set, not its write rate, is what the log shows).
    fn is_not_converging(&self) -> bool {
        let e = &self.estimates;
        let outpaced = e.bandwidth > 0.0 && e.dirty_rate >= e.bandwidth;
        let stuck = e
            .remaining_before
            .is_some_and(|before| e.remaining_at_sync as f64 >= before as f64 * 0.9);
        outpaced || stuck
    }

    /// Auto-converge, at a sync that starts another pass: the throttle goes
    /// out before the pass's first page.
    fn decide_throttle(&mut self, now: Instant, dirtied: u64, sent: u64) {
        if let Some(percent) = self.throttler.as_mut().and_then(|t| t.handle_sync(now, dirtied, sent)) {
            self.estimates.throttle_percent = percent;
            self.pending = Some(Action::Throttle { percent });
        }
    }

    fn start_postcopy(&mut self, reason: PostcopyReason, remaining: u64) {
        self.become_(Phase::PostcopyPending);
        self.pending = Some(Action::Postcopy { reason, remaining });
    }

    /// The pages still marked dirty (not yet handed out), one bitmap per
    /// block: before the pause, the pages the destination holds stale.
    pub fn dirty(&self) -> &[Bitmap] {
        &self.dirty
    }

    /// The VM is paused for postcopy and the dirty log was collected one
    /// last time: precopy ends, and the pages left to send, one bitmap per
    /// block, go to the postcopy runtime.
    pub fn handle_postcopy_paused(&mut self, paused: &SourcePaused) -> Vec<Bitmap> {
        let _ = paused;
        if self.phase != Phase::AwaitPostcopyPaused {
            return Vec::new();
        }
        self.become_(Phase::Postcopy);
        self.dirty
            .iter_mut()
            .map(|map| std::mem::replace(map, Bitmap::new(0)))
            .collect()
    }

    fn switch_over(&mut self, expected_downtime: Duration, reason: SwitchoverReason) {
        self.become_(Phase::PausePending);
        self.pending = Some(Action::Pause {
            expected_downtime,
            reason,
        });
    }

    fn start_pass(&mut self, now: Instant) {
        self.epoch += 1;
        self.cursor = (0, 0);
        self.pass_started = now;
        self.pass_ram_start = self.reported_ram;
    }

    /// The VM is paused and the dirty log was collected one last time: send
    /// what is left, without the bandwidth cap.
    pub fn handle_paused(&mut self, paused: &SourcePaused, now: Instant) {
        let _ = paused;
        if self.phase == Phase::AwaitPaused {
            self.become_(Phase::FinalSending);
            self.start_pass(now);
        }
    }

    /// The next piece of work.
    pub fn poll(&mut self, now: Instant) -> Action {
        if let Some(action) = self.pending.take() {
            match action {
                Action::Pause { .. } => self.become_(Phase::AwaitPaused),
                Action::Postcopy { .. } => self.become_(Phase::AwaitPostcopyPaused),
                _ => {}
            }
            return action;
        }
        match self.phase {
            Phase::Sending | Phase::FinalSending => {
                if self.phase == Phase::Sending
                    && let Some(until) = self.throttled_until(now)
                {
                    return Action::Wait(Some(until));
                }
                if let Some(run) = self.next_run() {
                    self.emitted_ram += run.len() * self.page_sizes[run.block.0 as usize];
                    return Action::Send(run);
                }
                let epoch = self.epoch;
                if self.phase == Phase::Sending {
                    self.become_(Phase::Syncing);
                } else {
                    self.become_(Phase::Finishing);
                }
                Action::EndEpoch { epoch }
            }
            Phase::Finishing => {
                self.become_(Phase::Done);
                Action::Finish
            }
            Phase::Syncing => {
                // The runtime asked for work right after EndEpoch: sync now.
                Action::SyncDirtyLog
            }
            Phase::PausePending
            | Phase::AwaitPaused
            | Phase::Done
            | Phase::Failed
            | Phase::PostcopyPending
            | Phase::AwaitPostcopyPaused
            | Phase::Postcopy => Action::Wait(None),
        }
    }

    fn next_run(&mut self) -> Option<PageRun> {
        let (mut block, mut page) = self.cursor;
        while block < self.dirty.len() {
            if let Some(first) = self.dirty[block].next_set(page) {
                let max = u64::from(self.config.batch_pages.max(1));
                let map = &mut self.dirty[block];
                let count = map.take_run(first, max);
                let mut run = PageRun::contiguous(BlockId(block as u32), first, count, self.epoch);
                if count < max.min(SPARSE_PAGES as u64) {
                    // Dirty pages scattered: gather the next ones of the
                    // block into the same run, so they share one batch.
                    let mut list = SparsePages::new();
                    for i in 0..count {
                        list.push(i as u32);
                    }
                    let (mut taken, mut last) = (count, first + count - 1);
                    let end = map.len().min(first + u64::from(u32::MAX));
                    while taken < max.min(SPARSE_PAGES as u64)
                        && let Some(next) = map.next_set(last + 1).filter(|&p| p < end)
                    {
                        map.test_and_clear(next);
                        list.push((next - first) as u32);
                        taken += 1;
                        last = next;
                    }
                    if taken > count {
                        run.count = last - first + 1;
                        run.sparse = Some(Box::new(list));
                    }
                }
                self.cursor = (block, run.first + run.count);
                return Some(run);
            }
            block += 1;
            page = 0;
        }
        self.cursor = (block, 0);
        None
    }

    fn throttled_until(&self, now: Instant) -> Option<Instant> {
        let rate = self.config.max_bandwidth? as f64;
        // Wire bytes sent plus what was handed out but not yet reported,
        // counted at full page size.
        let spent = self.reported_wire as f64 + self.emitted_ram.saturating_sub(self.reported_ram) as f64;
        let burst = f64::from(self.config.batch_pages) * 4096.0;
        let allowed = rate * now.saturating_duration_since(self.started).as_secs_f64() + burst;
        (spent > allowed).then(|| self.started + Duration::from_secs_f64((spent - burst) / rate))
    }
}

#[cfg(test)]
mod tests;
