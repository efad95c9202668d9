//! Engine tests on injected time.

use super::*;
use proptest::prelude::*;

const PAGE: u64 = 4096;

fn engine(blocks: &[u64], config: PrecopyConfig, now: Instant) -> PrecopyEngine {
    PrecopyEngine::with_pages(blocks.iter().map(|&p| (p, PAGE)).collect(), config, now)
}

fn paused(at: Instant) -> SourcePaused {
    SourcePaused { at }
}

/// Drains Send actions, reporting them as sent; returns the pages sent and
/// the first non-Send action.
fn drain(e: &mut PrecopyEngine, now: Instant, sent_ram: &mut u64) -> (Vec<(u32, u64)>, Action) {
    let mut pages = Vec::new();
    loop {
        match e.poll(now) {
            Action::Send(run) => {
                pages.extend(run.pages().map(|p| (run.block.0, p)));
                *sent_ram += run.len() * PAGE;
                e.handle_progress(*sent_ram, *sent_ram);
            }
            other => return (pages, other),
        }
    }
}

/// An engine over one block of `pages` that sent its bulk pass at `t0` and
/// waits for the dirty-log sync; with the guest RAM it reported sent.
fn after_bulk_pass(pages: u64, config: PrecopyConfig, t0: Instant) -> (PrecopyEngine, u64) {
    let mut e = engine(&[pages], config, t0);
    let mut ram = 0;
    drain(&mut e, t0, &mut ram);
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    (e, ram)
}

#[test]
fn idle_guest_sends_every_page_once_then_switches_over() {
    let t0 = Instant::now();
    let mut e = engine(&[100, 37], PrecopyConfig::default(), t0);
    let mut ram = 0;
    let (pages, action) = drain(&mut e, t0, &mut ram);
    assert_eq!(pages.len(), 137);
    let unique: std::collections::BTreeSet<_> = pages.iter().collect();
    assert_eq!(unique.len(), 137);
    assert_eq!(action, Action::EndEpoch { epoch: 0 });
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    e.handle_sync_done(t0 + Duration::from_secs(1));
    assert_eq!(
        e.poll(t0),
        Action::Pause {
            expected_downtime: Duration::ZERO,
            reason: SwitchoverReason::Converged
        }
    );
    assert_eq!(e.phase(), Phase::AwaitPaused);
    e.handle_paused(&paused(t0), t0);
    let (pages, action) = drain(&mut e, t0, &mut ram);
    assert!(pages.is_empty());
    assert_eq!(action, Action::EndEpoch { epoch: 1 });
    assert_eq!(e.poll(t0), Action::Finish);
    assert_eq!(e.poll(t0), Action::Wait(None));
    assert_eq!(e.phase(), Phase::Done);
}

#[test]
fn runs_respect_the_batch_size() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        batch_pages: 16,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[100], config, t0);
    while let Action::Send(run) = e.poll(t0) {
        assert!(!run.is_empty() && run.len() <= 16, "{run:?}");
    }
}

#[test]
fn scattered_dirty_pages_share_runs_within_a_span() {
    let t0 = Instant::now();
    for batch_pages in [256, 16] {
        let config = PrecopyConfig {
            batch_pages,
            downtime_limit: Duration::ZERO,
            max_iterations: None,
            ..PrecopyConfig::default()
        };
        let (mut e, _) = after_bulk_pass(1000, config, t0);
        // Every third page dirty, and a contiguous stretch.
        let mut dirty: Vec<u64> = (0..600).step_by(3).collect();
        dirty.extend(700..760);
        for &p in &dirty {
            e.handle_dirty(BlockId(0), p, 1);
        }
        e.handle_sync_done(t0 + Duration::from_secs(1));
        let mut runs = Vec::new();
        while let Action::Send(run) = e.poll(t0) {
            runs.push(run);
        }
        let sent: Vec<u64> = runs.iter().flat_map(|r| r.pages().collect::<Vec<_>>()).collect();
        assert_eq!(sent, dirty, "exactly the dirty pages, in order, once");
        for run in &runs {
            assert!(!run.is_empty() && run.len() <= u64::from(batch_pages), "{run:?}");
            assert!(
                run.includes(run.first) && run.includes(run.first + run.count - 1),
                "{run:?}"
            );
        }
        // 260 pages, 200 of them scattered: full runs, not 200.
        let want = if batch_pages == 256 { 2 } else { 17 };
        assert!(
            runs.len() <= want,
            "{} runs for batch {batch_pages}: {runs:?}",
            runs.len()
        );
    }
}

#[test]
fn a_run_filters_into_the_pages_it_holds() {
    // Pages 100, 105, 164 and 300, gathered as the engine gathers them.
    let t0 = Instant::now();
    let (mut e, _) = after_bulk_pass(
        1000,
        PrecopyConfig {
            downtime_limit: Duration::ZERO,
            max_iterations: None,
            ..PrecopyConfig::default()
        },
        t0,
    );
    for page in [100, 105, 164, 300] {
        e.handle_dirty(BlockId(0), page, 1);
    }
    e.handle_sync_done(t0 + Duration::from_secs(1));
    let Action::Send(run) = e.poll(t0) else { panic!("a run") };
    assert_eq!((run.first, run.count, run.len()), (100, 201, 4));
    assert_eq!(run.pages().collect::<Vec<_>>(), [100, 105, 164, 300]);
    assert!(run.includes(164) && !run.includes(165));
    let tail = run.filter(|p| p >= 106).expect("pages left");
    assert_eq!((tail.first, tail.count, tail.len()), (164, 137, 2));
    assert_eq!(tail.pages().collect::<Vec<_>>(), [164, 300]);
    assert!(run.filter(|p| (101..105).contains(&p)).is_none());
    // Two neighbours of a sparse run make a contiguous one.
    let pair = run.filter(|p| p <= 105).expect("pages");
    assert_eq!(pair.pages().collect::<Vec<_>>(), [100, 105]);
    let whole = PageRun::contiguous(BlockId(0), 10, 2000, 0)
        .filter(|p| (15..1500).contains(&p))
        .expect("pages");
    assert_eq!((whole.first, whole.count, whole.sparse), (15, 1485, None));
}

#[test]
fn the_measured_switchover_overhead_adds_to_the_expected_downtime() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(105),
        max_iterations: None,
        ..PrecopyConfig::default()
    };
    let (mut e, _) = after_bulk_pass(1000, config, t0);
    // 100 ms of pages fit the limit alone; with 10 ms of overhead they do not.
    e.handle_dirty(BlockId(0), 0, 100);
    e.handle_overhead(Duration::from_millis(10));
    e.handle_sync_done(t0 + Duration::from_secs(1));
    assert_eq!(e.estimates().expected_downtime, Some(Duration::from_millis(110)));
    assert_eq!(e.phase(), Phase::Sending, "not switched over");
}

/// After a bulk pass of 1000 pages in one second (bandwidth 1000 pages/s,
/// so a page is 1 ms), a second pass leaves `second` pages dirty and a
/// third `third`: the phase after each sync, with a 100 ms limit.
fn phases_with_limit_100ms(second: u64, third: u64) -> (Phase, Phase) {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(100),
        max_iterations: None,
        ..PrecopyConfig::default()
    };
    let (mut e, mut ram) = after_bulk_pass(1000, config, t0);
    e.handle_dirty(BlockId(0), 0, second);
    e.handle_sync_done(t0 + Duration::from_secs(1));
    let after_second = e.phase();
    if after_second != Phase::Sending {
        return (after_second, after_second);
    }
    // The next pass sends its pages at the same rate: `second` ms.
    let t1 = t0 + Duration::from_secs(1);
    drain(&mut e, t1, &mut ram);
    assert_eq!(e.poll(t1), Action::SyncDirtyLog);
    e.handle_dirty(BlockId(0), 0, third);
    e.handle_sync_done(t1 + Duration::from_millis(second));
    (after_second, e.phase())
}

#[test]
fn the_switchover_aims_below_the_limit() {
    // Within half the limit: at once.
    assert_eq!(phases_with_limit_100ms(50, 0).0, Phase::PausePending);
    // 70 ms, still shrinking (from 1000): another pass; 69 ms after it is
    // no longer shrinking, and within the margin (80 ms): switch.
    assert_eq!(phases_with_limit_100ms(70, 69), (Phase::Sending, Phase::PausePending));
    // 70 ms, then 40: shrinking, but within half.
    assert_eq!(phases_with_limit_100ms(70, 40), (Phase::Sending, Phase::PausePending));
    // 90 ms fits the limit but not the margin: passes go on.
    assert_eq!(phases_with_limit_100ms(90, 89), (Phase::Sending, Phase::Sending));
}

#[test]
fn expected_downtime_is_remaining_over_measured_bandwidth() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(10),
        max_iterations: None,
        ..PrecopyConfig::default()
    };
    let (mut e, mut ram) = after_bulk_pass(1000, config, t0);
    // 1000 pages in 1 s; 100 pages dirty -> expected 100 ms.
    e.handle_dirty(BlockId(0), 0, 100);
    e.handle_sync_done(t0 + Duration::from_secs(1));
    let est = e.estimates();
    assert_eq!(est.bandwidth, 1000.0 * PAGE as f64);
    assert_eq!(est.expected_downtime, Some(Duration::from_millis(100)));
    assert_eq!(est.remaining_at_sync, 100 * PAGE);
    assert_eq!(est.dirty_rate, 100.0 * PAGE as f64);
    assert_eq!(e.phase(), Phase::Sending);
    assert_eq!(e.epoch(), 1);
    // The second pass sends exactly the dirty pages.
    let (pages, action) = drain(&mut e, t0 + Duration::from_secs(1), &mut ram);
    assert_eq!(pages, (0..100).map(|p| (0, p)).collect::<Vec<_>>());
    assert_eq!(action, Action::EndEpoch { epoch: 1 });
}

fn non_converging(on_limit: LimitAction) -> Action {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(1),
        max_iterations: Some(3),
        on_limit,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[64], config, t0);
    let mut ram = 0;
    let mut now = t0;
    for _ in 0..3 {
        let (_, end) = drain(&mut e, now, &mut ram);
        assert!(matches!(end, Action::EndEpoch { .. }));
        assert_eq!(e.poll(now), Action::SyncDirtyLog);
        now += Duration::from_secs(1);
        e.handle_dirty(BlockId(0), 0, 64);
        e.handle_sync_done(now);
    }
    e.poll(now)
}

#[test]
fn iteration_limit_fails_when_told_to() {
    let action = non_converging(LimitAction::Fail);
    assert!(
        matches!(action, Action::Fail(ConvergenceError::Iterations { iterations: 3, .. })),
        "{action:?}"
    );
}

#[test]
fn iteration_limit_forces_switchover_by_default() {
    let action = non_converging(LimitAction::Switchover);
    assert!(
        matches!(
            action,
            Action::Pause {
                reason: SwitchoverReason::IterationLimit,
                ..
            }
        ),
        "{action:?}"
    );
}

#[test]
fn time_limit_applies() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(1),
        max_iterations: None,
        max_time: Some(Duration::from_secs(5)),
        on_limit: LimitAction::Fail,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[8], config, t0);
    let mut ram = 0;
    drain(&mut e, t0, &mut ram);
    e.poll(t0);
    e.handle_dirty(BlockId(0), 0, 8);
    e.handle_sync_done(t0 + Duration::from_secs(6));
    assert!(matches!(e.poll(t0), Action::Fail(ConvergenceError::Timeout { .. })));
}

#[test]
fn bandwidth_cap_makes_the_engine_wait() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        max_bandwidth: Some(100 * PAGE),
        batch_pages: 10,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[1000], config, t0);
    let mut sent = 0;
    // At t0 only the burst (one batch) is allowed.
    let mut waited = None;
    for _ in 0..5 {
        match e.poll(t0) {
            Action::Send(run) => sent += run.len(),
            Action::Wait(until) => {
                waited = until;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(sent <= 20, "sent {sent} pages in no time");
    let until = waited.expect("throttled");
    assert!(until > t0);
    // A second later, about 100 more pages are allowed.
    let later = t0 + Duration::from_secs(1);
    let mut more = 0;
    while let Action::Send(run) = e.poll(later) {
        more += run.len();
    }
    assert!((90..=120).contains(&more), "{more}");
}

#[test]
fn final_pass_is_not_capped() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        max_bandwidth: Some(PAGE),
        batch_pages: 1,
        downtime_limit: Duration::from_secs(3600),
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[4], config, t0);
    let mut now = t0;
    let mut ram = 0;
    loop {
        match e.poll(now) {
            Action::Send(run) => {
                ram += run.len() * PAGE;
                e.handle_progress(ram, ram);
            }
            Action::Wait(Some(until)) => now = until,
            Action::EndEpoch { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(e.poll(now), Action::SyncDirtyLog);
    e.handle_dirty(BlockId(0), 0, 4);
    e.handle_sync_done(now + Duration::from_secs(1));
    assert!(matches!(e.poll(now), Action::Pause { .. }));
    e.handle_paused(&paused(now), now);
    let (pages, end) = drain(&mut e, now, &mut ram);
    assert_eq!(pages.len(), 4, "the final pass ignores the cap");
    assert_eq!(end, Action::EndEpoch { epoch: 1 });
}

#[test]
fn transition_table() {
    use Phase::*;
    let all = [
        Sending,
        Syncing,
        PausePending,
        AwaitPaused,
        FinalSending,
        Finishing,
        Done,
        Failed,
    ];
    let allowed: Vec<_> = all
        .iter()
        .flat_map(|a| all.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_become(*b))
        .collect();
    assert_eq!(
        allowed,
        vec![
            (Sending, Syncing),
            (Syncing, Sending),
            (Syncing, PausePending),
            (Syncing, Failed),
            (PausePending, AwaitPaused),
            (AwaitPaused, FinalSending),
            (FinalSending, Finishing),
            (Finishing, Done),
        ]
    );
    assert!(!Done.can_become(Sending));
    assert!(!Failed.can_become(FinalSending));
}

proptest! {
    /// Invariant 1: a page written after it was last handed out is handed
    /// out again before the engine finishes.
    #[test]
    fn no_dirty_bit_is_lost(writes in proptest::collection::vec((0u64..3, 0u64..50, 0usize..4), 0..200)) {
        let t0 = Instant::now();
        let config = PrecopyConfig { batch_pages: 7, downtime_limit: Duration::ZERO, max_iterations: Some(4), ..PrecopyConfig::default() };
        let mut e = engine(&[50, 50, 50], config, t0);
        // Last time each page was handed out and last time it was written.
        let mut last_sent = std::collections::HashMap::new();
        let mut last_written = std::collections::HashMap::new();
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut tick = 0u64;
        let mut writes = writes.into_iter();
        let mut ram = 0;
        loop {
            tick += 1;
            let now = t0 + Duration::from_millis(tick);
            // Writes land between actions and go to the dirty log; the VM
            // stops writing once paused.
            if !matches!(e.phase(), Phase::FinalSending | Phase::Finishing | Phase::Done)
                && let Some((block, page, _)) = writes.next() {
                last_written.insert((block, page), tick);
                log.push((block, page));
            }
            match e.poll(now) {
                Action::Send(run) => {
                    for p in run.pages() {
                        last_sent.insert((u64::from(run.block.0), p), tick);
                    }
                    ram += run.len() * PAGE;
                    e.handle_progress(ram, ram);
                }
                Action::SyncDirtyLog => {
                    for (b, p) in log.drain(..) {
                        e.handle_dirty(BlockId(b as u32), p, 1);
                    }
                    e.handle_sync_done(now);
                }
                Action::Pause { .. } => {
                    for (b, p) in log.drain(..) {
                        e.handle_dirty(BlockId(b as u32), p, 1);
                    }
                    e.handle_paused(&paused(now), now);
                }
                Action::EndEpoch { .. } | Action::Wait(_) | Action::Throttle { .. } => {}
                Action::Postcopy { .. } => unreachable!("postcopy is not configured"),
                Action::Finish => break,
                Action::Fail(err) => panic!("{err}"),
            }
        }
        for (page, written) in last_written {
            let sent = last_sent.get(&page).copied().unwrap_or(0);
            prop_assert!(sent > written, "page {:?} written at {} last sent at {}", page, written, sent);
        }
        prop_assert_eq!(last_sent.len(), 150);
    }
}

#[test]
fn a_guest_outpacing_the_link_switches_to_postcopy_after_one_pass() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(1),
        postcopy: Some(PostcopyWhen::NotConverging),
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[100], config, t0);
    let mut ram = 0;
    let (pages, action) = drain(&mut e, t0, &mut ram);
    assert_eq!((pages.len(), action), (100, Action::EndEpoch { epoch: 0 }));
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    // 100 pages sent in a second, 150 dirtied meanwhile: the guest wins.
    e.handle_dirty(BlockId(0), 0, 100);
    e.handle_dirty(BlockId(0), 0, 50);
    let t1 = t0 + Duration::from_secs(1);
    e.handle_sync_done(t1);
    assert_eq!(
        e.poll(t1),
        Action::Postcopy {
            reason: PostcopyReason::NotConverging,
            remaining: 100 * PAGE
        }
    );
    assert_eq!(e.phase(), Phase::AwaitPostcopyPaused);
    e.handle_dirty(BlockId(0), 99, 1);
    let left = e.handle_postcopy_paused(&paused(t1));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].count_ones(), 100);
    assert_eq!(e.phase(), Phase::Postcopy);
    assert_eq!(e.poll(t1), Action::Wait(None));
}

#[test]
fn postcopy_after_zero_passes_starts_before_any_page() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        postcopy: Some(PostcopyWhen::AfterPasses(0)),
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[10, 5], config, t0);
    assert_eq!(
        e.poll(t0),
        Action::Postcopy {
            reason: PostcopyReason::Passes,
            remaining: 15 * PAGE
        }
    );
    let left = e.handle_postcopy_paused(&paused(t0));
    assert_eq!(left.iter().map(Bitmap::count_ones).collect::<Vec<_>>(), [10, 5]);
}

#[test]
fn postcopy_after_passes_waits_for_them_unless_precopy_converges_first() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(1),
        max_iterations: None,
        postcopy: Some(PostcopyWhen::AfterPasses(2)),
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[100], config.clone(), t0);
    let mut ram = 0;
    let mut now = t0;
    // Each pass leaves fewer pages than the one before, the guest slower
    // than the link: converging, so only the pass count triggers postcopy.
    for (pass, dirtied) in [(0u64, 40u64), (1, 30)] {
        let _ = drain(&mut e, now, &mut ram);
        assert_eq!(e.poll(now), Action::SyncDirtyLog);
        e.handle_dirty(BlockId(0), 0, dirtied);
        now += Duration::from_secs(1);
        e.handle_sync_done(now);
        if pass == 0 {
            assert_eq!(e.phase(), Phase::Sending, "one pass is not two");
        }
    }
    assert!(matches!(
        e.poll(now),
        Action::Postcopy {
            reason: PostcopyReason::Passes,
            ..
        }
    ));
    // An idle guest converges after the bulk pass: no postcopy.
    let mut e = engine(&[100], config, t0);
    let _ = drain(&mut e, t0, &mut ram);
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    e.handle_sync_done(t0 + Duration::from_secs(1));
    assert!(matches!(e.poll(t0), Action::Pause { .. }));
}

/// Runs `passes` passes over one block of `pages` pages, at one second of
/// injected time each unless `secs(k)` says otherwise, where the guest
/// dirties `dirtied(k)` pages (from page 0) during pass `k` (0: the bulk
/// pass); each pass sends every page left. Returns the throttle the engine
/// set before each pass, if any, and the engine after the last sync.
fn throttle_passes(
    config: PrecopyConfig,
    pages: u64,
    passes: usize,
    secs: impl Fn(usize) -> f64,
    dirtied: impl Fn(usize) -> u64,
) -> (Vec<Option<u8>>, PrecopyEngine, Instant) {
    let t0 = Instant::now();
    let mut e = engine(&[pages], config, t0);
    let mut ram = 0;
    let mut now = t0;
    let mut throttles = Vec::new();
    for k in 0..passes {
        let mut throttle = None;
        let mut sent = 0;
        let end = loop {
            match e.poll(now) {
                Action::Throttle { percent } => {
                    assert!(throttle.is_none(), "two throttles before pass {k}");
                    assert_eq!(sent, 0, "a throttle in the middle of pass {k}");
                    throttle = Some(percent);
                    assert_eq!(e.phase(), Phase::Sending, "a throttle does not change the phase");
                }
                Action::Send(run) => {
                    sent += run.count;
                    ram += run.count * PAGE;
                    e.handle_progress(ram, ram);
                }
                other => break other,
            }
        };
        assert!(matches!(end, Action::EndEpoch { .. }), "pass {k} ended with {end:?}");
        assert_eq!(e.poll(now), Action::SyncDirtyLog);
        e.handle_dirty(BlockId(0), 0, dirtied(k).min(pages));
        now += Duration::from_secs_f64(secs(k));
        e.handle_sync_done(now);
        throttles.push(throttle);
    }
    (throttles, e, now)
}

/// A guest that never fits a 1 ms downtime limit, with auto-converge.
fn auto_converging(auto: Option<AutoConverge>) -> PrecopyConfig {
    PrecopyConfig {
        downtime_limit: Duration::from_millis(1),
        max_iterations: None,
        auto_converge: auto,
        ..PrecopyConfig::default()
    }
}

#[test]
fn no_throttle_while_sends_outpace_dirtying() {
    // Each pass dirties 48% of what it sent (just under the 50% trigger),
    // for a second each: the passes shrink, and none is throttled.
    let mut left = vec![10_000u64];
    for _ in 0..10 {
        left.push(left.last().unwrap() * 48 / 100);
    }
    let (throttles, e, _) = throttle_passes(
        auto_converging(Some(AutoConverge::default())),
        10_000,
        10,
        |_| 1.0,
        |k| left[k + 1],
    );
    assert_eq!(throttles, vec![None; 10]);
    assert_eq!(e.estimates().throttle_percent, 0);
}

#[test]
fn throttle_starts_at_initial_then_increments_every_second_hit_up_to_the_cap() {
    let auto = AutoConverge {
        initial: 30,
        increment: 25,
        max: 90,
        ..AutoConverge::default()
    };
    // Every pass takes a second and the guest dirties all it sent. The sync
    // after the bulk pass starts the first period; the syncs after passes
    // 1, 2, ... are hits, and every second one raises the throttle before
    // the next pass: 30, 55, 80, then the 90 cap, then nothing more.
    let (throttles, e, now) = throttle_passes(auto_converging(Some(auto)), 100, 13, |_| 1.0, |_| 100);
    let want = [
        None,
        None,
        None,
        Some(30),
        None,
        Some(55),
        None,
        Some(80),
        None,
        Some(90),
        None,
        None,
        None,
    ];
    assert_eq!(throttles, want);
    assert_eq!(e.estimates().throttle_percent, 90);
    // The engine keeps sending: the throttle never ends precopy.
    let mut e = e;
    assert!(matches!(e.poll(now), Action::Send(_)));
}

#[test]
fn a_period_lasts_at_least_a_second_of_engine_time() {
    // Passes of half a second: a period spans two of them, so the throttle
    // comes after four passes past the bulk one rather than two.
    let (throttles, ..) = throttle_passes(
        auto_converging(Some(AutoConverge::default())),
        100,
        10,
        |_| 0.5,
        |_| 100,
    );
    assert_eq!(
        throttles,
        [None, None, None, None, None, Some(20), None, None, None, Some(30)]
    );
    // A period below the trigger as a whole is no hit, even where one of
    // its passes alone would be: pass 1 sends 100 pages and dirties 60,
    // pass 2 sends those 60 and dirties 15 (75 of 160); pass 3 sends 15
    // and dirties 9, pass 4 sends 9 and dirties 2 (11 of 24). Judged pass
    // by pass, passes 1 and 3 would be two hits, and pass 4 throttled.
    let dirtied = [100, 60, 15, 9, 2, 1];
    let (throttles, ..) = throttle_passes(
        auto_converging(Some(AutoConverge::default())),
        100,
        6,
        |_| 0.5,
        |k| dirtied[k],
    );
    assert_eq!(throttles, vec![None; 6]);
}

#[test]
fn tailslow_steps_only_as_far_as_the_dirtying_needs() {
    // A trigger of 90%, the guest dirtying all it sent: the ideal CPU share
    // is 90% of the current one, a step smaller than the increment.
    let auto = AutoConverge {
        tailslow: true,
        trigger_percent: 90,
        ..AutoConverge::default()
    };
    let (throttles, e, _) = throttle_passes(auto_converging(Some(auto)), 100, 12, |_| 1.0, |_| 100);
    // 20 (initial), then cpu 80 -> 72: 28; 72 -> 64: 36; 64 -> 57: 43; 57 -> 51: 49.
    let applied: Vec<u8> = throttles.iter().flatten().copied().collect();
    assert_eq!(applied, [20, 28, 36, 43, 49]);
    assert_eq!(e.estimates().throttle_percent, 49);
    // Without tailslow the same guest gets the full increment.
    let plain = AutoConverge {
        tailslow: false,
        ..auto
    };
    let (throttles, ..) = throttle_passes(auto_converging(Some(plain)), 100, 12, |_| 1.0, |_| 100);
    let applied: Vec<u8> = throttles.iter().flatten().copied().collect();
    assert_eq!(applied, [20, 30, 40, 50, 60]);
}

#[test]
fn the_bulk_pass_is_never_throttled_nor_judged() {
    // A long bulk pass during which the guest dirties all of RAM: no
    // throttle comes during or right after it, and it counts as no hit
    // (else the sync after pass 1 would already act).
    let (throttles, ..) = throttle_passes(
        auto_converging(Some(AutoConverge::default())),
        100,
        4,
        |k| if k == 0 { 30.0 } else { 1.0 },
        |_| 100,
    );
    assert_eq!(throttles, [None, None, None, Some(20)]);
    // A guest that converges after the bulk pass is never throttled.
    let t0 = Instant::now();
    let mut e = engine(&[100], auto_converging(Some(AutoConverge::default())), t0);
    let mut ram = 0;
    let (pages, end) = drain(&mut e, t0, &mut ram);
    assert_eq!((pages.len(), end), (100, Action::EndEpoch { epoch: 0 }));
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    e.handle_sync_done(t0 + Duration::from_secs(60));
    assert!(matches!(e.poll(t0), Action::Pause { .. }));
}

#[test]
fn a_sync_that_ends_precopy_sets_no_throttle() {
    // Throttled, then a limit: the failure comes, not another throttle.
    let config = PrecopyConfig {
        max_iterations: Some(5),
        on_limit: LimitAction::Fail,
        ..auto_converging(Some(AutoConverge::default()))
    };
    let (throttles, mut e, now) = throttle_passes(config, 100, 5, |_| 1.0, |_| 100);
    assert_eq!(throttles, [None, None, None, Some(20), None]);
    assert!(matches!(e.poll(now), Action::Fail(ConvergenceError::Iterations { .. })));
}

#[test]
fn no_throttle_action_without_auto_converge() {
    let (throttles, e, _) = throttle_passes(auto_converging(None), 100, 13, |_| 1.0, |_| 100);
    assert_eq!(throttles, vec![None; 13]);
    assert_eq!(e.estimates().throttle_percent, 0);
}
