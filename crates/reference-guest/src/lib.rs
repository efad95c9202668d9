//! A synthetic guest for migration tests, benchmarks and the CLI.
//!
//! Writer threads stand in for vCPUs: each rewrites whole 4 KiB pages of raw guest RAM (through
//! [`migration_sys::GuestRegion`]'s volatile copies) at a paced dirty rate, with contents that
//! are a pure function of (seed, page, generation). A private table records every page's
//! generation; it travels with the writers' positions as the guest's device state. After a
//! migration the destination guest checks every page against that table on its first run, so
//! a lost, stale or misplaced page shows up as a mismatch.
//!
//! The destination's writers do not wait for that check: each page is checked once, before its
//! first write, by whichever thread touches it first (a `guest-check` thread walks them all).
//! So the guest can run while its pages still arrive (postcopy), and the threads time their
//! waits for absent pages ([`SyntheticGuest::fault_stats`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use migration_core::Vm;
//! use migration_sys::GuestRegion;
//! use reference_guest::{GuestSpec, SyntheticGuest};
//!
//! let ram = vec![Arc::new(GuestRegion::anonymous(8 << 20)?)];
//! let spec = GuestSpec { dirty_rate: 16 << 20, ..GuestSpec::default() };
//! let mut guest = SyntheticGuest::new(ram, spec, true)?;
//! guest.start()?;
//! guest.pause()?;
//! assert!(guest.check().is_ok());
//! let state = guest.save_device_state()?;
//! # let _ = (state, Duration::ZERO);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod content;
mod faults;
mod guest;
pub mod kvm;
mod memory;
mod prng;
mod spec;
mod state;
mod verify;
mod writer;

pub use content::{Content, HEADER_LEN, content, fill_content};
pub use faults::FaultStats;
pub use guest::{CheckReport, SyntheticGuest};
pub use memory::UNKNOWN_GENERATION;
pub use spec::{GuestSpec, MAX_WRITERS, ParseSpecError, Pattern};
pub use state::StateError;

/// Failures of the synthetic guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Guest RAM could not be read or written.
    #[error("guest memory access failed")]
    Memory(#[from] migration_sys::SysError),
    /// The spec cannot run.
    #[error("invalid guest spec: {0}")]
    InvalidSpec(&'static str),
    /// The RAM blocks hold no whole page.
    #[error("guest ram has no pages")]
    NoPages,
    /// The guest was started already.
    #[error("guest is already started")]
    AlreadyStarted,
    /// The operation needs a paused guest.
    #[error("guest is running")]
    Running,
    /// A destination guest has no device state loaded yet.
    #[error("guest has no device state")]
    NoState,
    /// The device state could not be loaded.
    #[error("cannot load guest device state")]
    State(#[from] StateError),
    /// A guest thread could not be spawned.
    #[error("cannot spawn a guest thread")]
    Spawn(#[source] std::io::Error),
    /// A writer thread failed and stopped.
    #[error("guest writer failed: {0}")]
    WriterFailed(String),
}
