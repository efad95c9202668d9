//! The migration engine: guest RAM model, dirty logs, the sans-IO precopy
//! state machine, the channel boundary, and the runtime that drives them
//! with threads so a VMM embeds live migration without the CLI.
//!
//! A source calls [`source::run_source`] with a connected
//! [`transport::Channel`], its [`ram::Ram`], its [`vm::Vm`] and a
//! [`dirty::DirtyLog`]; a destination calls [`dest::accept`] on a new
//! connection, prepares RAM for the announced blocks, and calls
//! [`dest::run_destination`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bitmap;
pub mod cancel;
pub mod compress;
pub mod dest;
pub mod dirty;
pub mod dirty_rate;
pub mod engine;
pub mod error_chain;
pub mod ram;
pub mod source;
pub mod stats;
pub mod transport;
pub mod verify;
pub mod vm;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
pub mod xbzrle;

pub use cancel::Cancel;
pub use compress::Compression;
pub use dirty::{CombinedDirtyLog, DirtyLog, DirtyLogError, KernelDirtyLog, KvmDirtyLog, SoftwareDirtyLog};
pub use engine::{
    Action, LimitAction, PageRun, PostcopyReason, PostcopyWhen, PrecopyConfig, PrecopyEngine, SourcePaused,
};
pub use ram::{BlockId, Ram, RamBlock};
pub use stats::{Event, Histogram, Latency, PostcopyStats, Stats};
pub use transport::{Channel, ChannelRx, ChannelTx, DirectPlacement, GuestRun, TransportError};
pub use vm::{Vm, VmError};
