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
        let mut e = engine(&[1000], config, t0);
        let mut ram = 0;
        drain(&mut e, t0, &mut ram);
        assert_eq!(e.poll(t0), Action::SyncDirtyLog);
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
            if run.sparse.is_some() {
                assert!(run.count <= SPAN_PAGES, "{run:?}");
            }
        }
        // 200 scattered pages in spans of 256: a handful of runs, not 200.
        let want = if batch_pages == 256 { 5 } else { 18 };
        assert!(
            runs.len() <= want,
            "{} runs for batch {batch_pages}: {runs:?}",
            runs.len()
        );
    }
}

#[test]
fn a_run_slices_into_the_pages_it_holds() {
    let mut mask = [0u64; 4];
    for i in [0u64, 5, 64, 200] {
        mask[(i / 64) as usize] |= 1 << (i % 64);
    }
    let run = PageRun {
        sparse: Some(mask),
        ..PageRun::contiguous(BlockId(0), 100, 201, 2)
    };
    assert_eq!(run.len(), 4);
    assert_eq!(run.pages().collect::<Vec<_>>(), [100, 105, 164, 300]);
    let tail = run.slice(106, 400).expect("pages left");
    assert_eq!((tail.first, tail.count, tail.len()), (164, 137, 2));
    assert_eq!(tail.pages().collect::<Vec<_>>(), [164, 300]);
    assert!(run.slice(101, 105).is_none());
    let whole = PageRun::contiguous(BlockId(0), 10, 20, 0)
        .slice(15, 100)
        .expect("pages");
    assert_eq!((whole.first, whole.count, whole.sparse), (15, 15, None));
}

#[test]
fn the_measured_switchover_overhead_adds_to_the_expected_downtime() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(105),
        max_iterations: None,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[1000], config, t0);
    let mut ram = 0;
    drain(&mut e, t0, &mut ram);
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
    // 100 ms of pages fit the limit alone; with 10 ms of overhead they do not.
    e.handle_dirty(BlockId(0), 0, 100);
    e.handle_overhead(Duration::from_millis(10));
    e.handle_sync_done(t0 + Duration::from_secs(1));
    assert_eq!(e.estimates().expected_downtime, Some(Duration::from_millis(110)));
    assert_eq!(e.phase(), Phase::Sending, "not switched over");
}

#[test]
fn expected_downtime_is_remaining_over_measured_bandwidth() {
    let t0 = Instant::now();
    let config = PrecopyConfig {
        downtime_limit: Duration::from_millis(10),
        max_iterations: None,
        ..PrecopyConfig::default()
    };
    let mut e = engine(&[1000], config, t0);
    let mut ram = 0;
    drain(&mut e, t0, &mut ram);
    assert_eq!(e.poll(t0), Action::SyncDirtyLog);
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
                Action::EndEpoch { .. } | Action::Wait(_) => {}
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
