//! Faults injected on demand, for tests: a queue-pair error, delayed or
//! reordered completions, a dropped link. Probabilities draw from a seeded
//! random source, so a run with the same seed and the same work draws the
//! same faults.

use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What to inject, parsed from `seed=N,delay=P,reorder=P,qp-error=C@N,drop-link=C@N`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Seed of the random source (`seed=N`, default 1).
    pub seed: u64,
    /// Probability that a completion is held back for one to four polls
    /// (`delay=P`).
    pub delay: f64,
    /// Probability that a poll returns the completions it has in shuffled
    /// order (`reorder=P`).
    pub reorder: f64,
    /// Channel C's N-th write (counted from 1) fails and puts its queue pair
    /// in error (`qp-error=C@N`), once per process.
    pub qp_error: Option<(u16, u64)>,
    /// Channel C's link drops at its N-th operation, a message or a page
    /// batch sent on it
    /// (`drop-link=C@N`), once per process: its NIC link and its control
    /// connection close, as when a cable is pulled.
    pub drop_link: Option<(u16, u64)>,
}

/// Why a fault plan does not parse.
#[derive(Debug, thiserror::Error)]
#[error("fault plan {spec:?}: {reason} (expected seed=N,delay=P,reorder=P,qp-error=CHANNEL@N,drop-link=CHANNEL@N)")]
pub struct FaultPlanError {
    spec: String,
    reason: String,
}

impl FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| FaultPlanError {
            spec: spec.to_owned(),
            reason,
        };
        let mut plan = FaultPlan {
            seed: 1,
            ..FaultPlan::default()
        };
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| fail(format!("{item:?} is not KEY=VALUE")))?;
            let probability = |value: &str| match value.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err(fail(format!("{key}={value}: not a probability in 0..=1"))),
            };
            let at = |value: &str| -> Result<(u16, u64), FaultPlanError> {
                let parsed = value
                    .split_once('@')
                    .and_then(|(c, n)| Some((c.parse().ok()?, n.parse().ok()?)));
                match parsed {
                    Some((channel, nth)) if nth > 0 => Ok((channel, nth)),
                    _ => Err(fail(format!("{key}={value}: not CHANNEL@N with N from 1"))),
                }
            };
            match key {
                "seed" => plan.seed = value.parse().map_err(|_| fail(format!("seed={value}: not a number")))?,
                "delay" => plan.delay = probability(value)?,
                "reorder" => plan.reorder = probability(value)?,
                "qp-error" => plan.qp_error = Some(at(value)?),
                "drop-link" => plan.drop_link = Some(at(value)?),
                other => return Err(fail(format!("unknown fault {other:?}"))),
            }
        }
        Ok(plan)
    }
}

/// How many faults of each kind fired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Completions held back.
    pub delayed: u64,
    /// Polls that returned their completions shuffled.
    pub reordered: u64,
    /// Queue-pair errors.
    pub qp_errors: u64,
    /// Dropped links.
    pub link_drops: u64,
}

/// A fault plan in force: the random source and what fired.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    rng: Mutex<u64>,
    qp_error_fired: AtomicBool,
    drop_fired: AtomicBool,
    delayed: AtomicU64,
    reordered: AtomicU64,
}

/// A fault that hits a write or an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hit {
    QpError,
    DropLink,
}

impl Faults {
    /// Puts `plan` in force.
    pub fn new(plan: FaultPlan) -> Self {
        Self {
            rng: Mutex::new(plan.seed),
            plan,
            qp_error_fired: AtomicBool::new(false),
            drop_fired: AtomicBool::new(false),
            delayed: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// What fired so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            delayed: self.delayed.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
            qp_errors: u64::from(self.qp_error_fired.load(Ordering::Relaxed)),
            link_drops: u64::from(self.drop_fired.load(Ordering::Relaxed)),
        }
    }

    /// The next number of the random source (splitmix64).
    fn next(&self) -> u64 {
        let mut state = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// For a completion: the polls to hold it back for (0: deliver now).
    pub(crate) fn hold(&self) -> u32 {
        if self.chance(self.plan.delay) {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            1 + (self.next() % 4) as u32
        } else {
            0
        }
    }

    /// Shuffles completions about to be returned, when the dice say so.
    pub(crate) fn maybe_shuffle<T>(&self, items: &mut [T]) {
        if items.len() < 2 || !self.chance(self.plan.reorder) {
            return;
        }
        self.reordered.fetch_add(1, Ordering::Relaxed);
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }

    /// For channel `channel`'s `nth` write (from 1) and `nth_op` operation:
    /// the fault that hits it, if any.
    pub(crate) fn on_write(&self, channel: u16, nth: u64) -> Option<Hit> {
        (self.plan.qp_error == Some((channel, nth)) && !self.qp_error_fired.swap(true, Ordering::Relaxed))
            .then_some(Hit::QpError)
    }

    /// For channel `channel`'s `nth` operation (from 1): whether its link drops now.
    pub(crate) fn on_operation(&self, channel: u16, nth: u64) -> Option<Hit> {
        (self.plan.drop_link == Some((channel, nth)) && !self.drop_fired.swap(true, Ordering::Relaxed))
            .then_some(Hit::DropLink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_parses_and_bad_ones_say_why() {
        let plan: FaultPlan = "seed=7,delay=0.25,reorder=1,qp-error=1@20,drop-link=0@3"
            .parse()
            .expect("parses");
        assert_eq!(
            plan,
            FaultPlan {
                seed: 7,
                delay: 0.25,
                reorder: 1.0,
                qp_error: Some((1, 20)),
                drop_link: Some((0, 3)),
            }
        );
        assert_eq!("".parse::<FaultPlan>().expect("empty").seed, 1);
        for bad in ["delay=2", "qp-error=1", "qp-error=1@0", "bogus=1", "seed", "reorder=x"] {
            let err = bad.parse::<FaultPlan>().expect_err(bad).to_string();
            assert!(err.contains(bad.split('=').next().unwrap_or(bad)), "{err}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_faults_and_one_shot_faults_fire_once() {
        let draw = |seed| {
            let faults = Faults::new(FaultPlan {
                seed,
                delay: 0.5,
                ..FaultPlan::default()
            });
            (0..64).map(|_| faults.hold()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert!(draw(3).iter().any(|&h| h > 0) && draw(3).contains(&0));
        let faults = Faults::new("qp-error=2@5,drop-link=1@2".parse().expect("plan"));
        assert_eq!(faults.on_write(2, 4), None);
        assert_eq!(faults.on_write(1, 5), None);
        assert_eq!(faults.on_write(2, 5), Some(Hit::QpError));
        assert_eq!(faults.on_write(2, 5), None, "fires once");
        assert_eq!(faults.on_operation(1, 2), Some(Hit::DropLink));
        assert_eq!(faults.on_operation(1, 2), None);
        assert_eq!(
            faults.counts(),
            FaultCounts {
                qp_errors: 1,
                link_drops: 1,
                ..FaultCounts::default()
            }
        );
    }

    #[test]
    fn a_shuffle_keeps_every_item() {
        let faults = Faults::new(FaultPlan {
            reorder: 1.0,
            ..FaultPlan::default()
        });
        let mut items: Vec<u32> = (0..32).collect();
        faults.maybe_shuffle(&mut items);
        assert_ne!(items, (0..32).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..32).collect::<Vec<_>>());
        assert_eq!(faults.counts().reordered, 1);
    }
}
