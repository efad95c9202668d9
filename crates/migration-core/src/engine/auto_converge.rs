//! Auto-converge: slows the source guest's vCPUs while it dirties memory
//! faster than precopy sends it, so that precopy converges (QEMU's
//! `cpu-throttle-*` parameters).
//!
//! The throttle is decided at dirty-log syncs, over periods of at least
//! [`PERIOD`] of the engine's (injected) time, each made of whole passes;
//! the bulk pass, which sends all of RAM whatever the guest does, is in
//! none. A period whose guest bytes dirtied exceed
//! [`AutoConverge::trigger_percent`] of the guest bytes sent in it is a
//! hit; every [`HITS_TO_ACT`]th hit (consecutive or not) raises the
//! throttle: the first time to [`AutoConverge::initial`], then by
//! [`AutoConverge::increment`] (or less, with
//! [`AutoConverge::tailslow`]), never above [`AutoConverge::max`].

use std::time::{Duration, Instant};

/// The shortest time a throttle decision looks at (QEMU: syncs more than
/// a second apart).
pub const PERIOD: Duration = Duration::from_secs(1);

/// Hits it takes to raise the throttle once (QEMU: 2).
pub const HITS_TO_ACT: u32 = 2;

/// Tunables of auto-converge, in percent of the guest's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoConverge {
    /// The throttle set by the first action.
    pub initial: u8,
    /// What each later action adds.
    pub increment: u8,
    /// The highest throttle.
    pub max: u8,
    /// Add less than [`AutoConverge::increment`] where less would do: just
    /// enough for the guest's dirtying to fall to the trigger, if it slows in
    /// proportion to its CPU time (QEMU's `cpu-throttle-tailslow`).
    pub tailslow: bool,
    /// A period is a hit when the guest dirtied more than this percentage of
    /// the bytes sent in it (QEMU's `throttle-trigger-threshold`).
    pub trigger_percent: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            max: 99,
            tailslow: false,
            trigger_percent: 50,
        }
    }
}

impl AutoConverge {
    /// The throttle after an action at `current`, for a period that dirtied
    /// `dirtied` bytes against a trigger of `trigger` bytes (`dirtied` is the
    /// larger). QEMU's `mig_throttle_guest_down`.
    pub fn raised(&self, current: u8, dirtied: u64, trigger: u64) -> u8 {
        let next = if current == 0 {
            u32::from(self.initial)
        } else if self.tailslow {
            // The CPU share that would bring the dirtying down to the
            // trigger, and the step to it (at least 1 as dirtied > trigger).
            let cpu_now = 100 - u32::from(current.min(100));
            let cpu_ideal = u128::from(cpu_now) * u128::from(trigger) / u128::from(dirtied.max(1));
            let step = cpu_now - (cpu_ideal as u32).min(cpu_now);
            u32::from(current) + step.min(u32::from(self.increment))
        } else {
            u32::from(current) + u32::from(self.increment)
        };
        next.min(u32::from(self.max)).min(99) as u8
    }
}

/// One period's figures, since its first sync.
#[derive(Debug, Clone, Copy)]
struct Period {
    started: Instant,
    dirtied: u64,
    sent: u64,
}

/// The auto-converge decision the engine keeps.
#[derive(Debug, Clone)]
pub(super) struct Throttler {
    config: AutoConverge,
    /// `None` until the bulk pass ended.
    period: Option<Period>,
    hits: u32,
    percent: u8,
}

impl Throttler {
    pub(super) fn new(config: AutoConverge) -> Self {
        Self {
            config,
            period: None,
            hits: 0,
            percent: 0,
        }
    }

    /// A dirty-log sync at `now` after a pass that sent `sent` guest bytes
    /// while `dirtied` guest bytes were dirtied, precopy going on. Returns
    /// the throttle to apply when it changes.
    pub(super) fn handle_sync(&mut self, now: Instant, dirtied: u64, sent: u64) -> Option<u8> {
        let Some(period) = &mut self.period else {
            // The bulk pass ended: the first period starts.
            self.period = Some(Period {
                started: now,
                dirtied: 0,
                sent: 0,
            });
            return None;
        };
        period.dirtied = period.dirtied.saturating_add(dirtied);
        period.sent = period.sent.saturating_add(sent);
        if now.saturating_duration_since(period.started) < PERIOD {
            return None;
        }
        let Period { dirtied, sent, .. } = std::mem::replace(
            period,
            Period {
                started: now,
                dirtied: 0,
                sent: 0,
            },
        );
        let trigger = (u128::from(sent) * u128::from(self.config.trigger_percent) / 100) as u64;
        if dirtied <= trigger {
            return None;
        }
        self.hits += 1;
        if self.hits < HITS_TO_ACT {
            return None;
        }
        self.hits = 0;
        let next = self.config.raised(self.percent, dirtied, trigger);
        (next != self.percent).then(|| {
            self.percent = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_action_sets_the_initial_throttle_then_increments_up_to_the_cap() {
        let c = AutoConverge {
            max: 45,
            ..AutoConverge::default()
        };
        assert_eq!(c.raised(0, 100, 50), 20);
        assert_eq!(c.raised(20, 100, 50), 30);
        assert_eq!(c.raised(40, 100, 50), 45);
        assert_eq!(c.raised(45, 100, 50), 45);
        let over = AutoConverge {
            initial: 99,
            max: 100,
            ..AutoConverge::default()
        };
        assert_eq!(over.raised(0, 100, 50), 99, "never more than 99%");
        assert_eq!(over.raised(99, 100, 50), 99);
    }

    #[test]
    fn tailslow_steps_to_the_ideal_cpu_share_at_most_by_the_increment() {
        let c = AutoConverge {
            tailslow: true,
            ..AutoConverge::default()
        };
        // At 20%: cpu_now 80; dirtying 10% over the trigger wants 80 * 100 / 110 = 72 (floor),
        // a step of 8.
        assert_eq!(c.raised(20, 110, 100), 28);
        // Far over the trigger: the full increment.
        assert_eq!(c.raised(20, 1000, 100), 30);
        // Just over: at least one.
        assert_eq!(c.raised(50, 1001, 1000), 51);
        // The first action is the initial throttle, tailslow or not.
        assert_eq!(c.raised(0, 110, 100), 20);
    }
}
