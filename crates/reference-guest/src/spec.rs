//! What the synthetic guest does: how fast it dirties memory, where, and with what.

use std::fmt;
use std::str::FromStr;

use migration_sys::PAGE_SIZE;

use crate::Content;

/// The most writer threads a guest (or a device-state blob) may ask for.
pub const MAX_WRITERS: usize = 1024;

/// Which pages the writers pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Uniformly random over all of guest RAM.
    Uniform,
    /// Uniformly random over the first [`GuestSpec::hot_set`] bytes.
    HotSet,
    /// Each writer walks its pages in order, wrapping at the end.
    Sequential,
}

impl Pattern {
    pub(crate) fn to_wire(self) -> u8 {
        match self {
            Pattern::Uniform => 1,
            Pattern::HotSet => 2,
            Pattern::Sequential => 3,
        }
    }

    pub(crate) fn from_wire(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Pattern::Uniform),
            2 => Some(Pattern::HotSet),
            3 => Some(Pattern::Sequential),
            _ => None,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Uniform => "uniform",
            Pattern::HotSet => "hotset",
            Pattern::Sequential => "sequential",
        })
    }
}

impl FromStr for Pattern {
    type Err = ParseSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uniform" => Ok(Pattern::Uniform),
            "hotset" => Ok(Pattern::HotSet),
            "sequential" => Ok(Pattern::Sequential),
            _ => Err(ParseSpecError {
                what: "pattern",
                value: s.to_owned(),
                expected: "uniform, hotset or sequential",
            }),
        }
    }
}

/// A name that is not one of a [`Pattern`]'s or a [`Content`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?} (expected {expected})")]
pub struct ParseSpecError {
    pub(crate) what: &'static str,
    pub(crate) value: String,
    pub(crate) expected: &'static str,
}

/// The workload of a synthetic guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Bytes of 4 KiB page writes per second across all writers; 0 is an idle guest (no
    /// writer threads).
    pub dirty_rate: u64,
    /// Which pages the writers pick.
    pub pattern: Pattern,
    /// Bytes: [`Pattern::HotSet`] writes only the first `hot_set` bytes of guest RAM (counted
    /// across blocks, rounded up to whole pages).
    pub hot_set: u64,
    /// What the pages hold.
    pub content: Content,
    /// Writer threads; writer `w` owns the pages whose global index is `w` modulo `writers`.
    pub writers: usize,
    /// Seeds page contents and the writers' choices.
    pub seed: u64,
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            dirty_rate: 0,
            pattern: Pattern::Uniform,
            hot_set: 0,
            content: Content::Random,
            writers: 2,
            seed: 0,
        }
    }
}

impl GuestSpec {
    /// Why this spec cannot run, if it cannot.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if self.writers == 0 {
            Some("at least one writer is needed")
        } else if self.writers > MAX_WRITERS {
            Some("too many writers")
        } else if self.pattern == Pattern::HotSet && self.hot_set == 0 {
            Some("the hotset pattern needs a non-empty hot set")
        } else {
            None
        }
    }

    /// How many pages (from global page 0) the pattern writes, out of `total`.
    pub(crate) fn pages_in_play(&self, total: u64) -> u64 {
        match self.pattern {
            Pattern::Uniform | Pattern::Sequential => total,
            Pattern::HotSet => self.hot_set.div_ceil(PAGE_SIZE as u64).min(total),
        }
    }
}

/// How many of the first `limit` global pages writer `w` of `writers` owns (pages `w`,
/// `w + writers`, `w + 2 * writers`, ...).
pub(crate) fn owned_pages(limit: u64, w: usize, writers: usize) -> u64 {
    let (w, n) = (w as u64, writers as u64);
    if limit > w { (limit - w - 1) / n + 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_partitions_the_pages() {
        for limit in [0u64, 1, 2, 7, 100] {
            for writers in [1usize, 2, 3, 8] {
                let sum: u64 = (0..writers).map(|w| owned_pages(limit, w, writers)).sum();
                assert_eq!(sum, limit, "limit {limit} writers {writers}");
            }
        }
    }

    #[test]
    fn names_parse_and_print() {
        for p in [Pattern::Uniform, Pattern::HotSet, Pattern::Sequential] {
            assert_eq!(p.to_string().parse::<Pattern>().unwrap(), p);
            assert_eq!(Pattern::from_wire(p.to_wire()), Some(p));
        }
        let err = "random".parse::<Pattern>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown pattern \"random\" (expected uniform, hotset or sequential)"
        );
    }

    #[test]
    fn hot_set_rounds_up_and_clamps() {
        let spec = GuestSpec {
            pattern: Pattern::HotSet,
            hot_set: 4097,
            ..GuestSpec::default()
        };
        assert_eq!(spec.pages_in_play(100), 2);
        assert_eq!(spec.pages_in_play(1), 1);
    }
}
